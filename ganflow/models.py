"""DCGAN-style generator and discriminator (Radford et al. 2015) for 16..128 pixel images.

G maps a latent vector to an image in [-1, 1]; D maps an image to one logit per sample.
Both double/halve their resolution per layer between 4x4 and data.image_size.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ganflow.config import Config


def _upsamplings(image_size: int) -> int:
    """Number of stride-2 layers between 4x4 and image_size x image_size."""
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size
        self.width = width
        n = _upsamplings(image_size)
        ch = width * 2 ** (n - 1)
        layers: list[nn.Module] = [
            # (B, latent, 1, 1) -> (B, ch, 4, 4)
            nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):
            # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        # (B, width, S/2, S/2) -> (B, C, S, S) in [-1, 1]
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, latent) -> (B, C, S, S)
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, width: int, spectral_norm: bool = False):
        super().__init__()
        # spectral norm bounds D's Lipschitz constant; BatchNorm would undo that, so it goes
        wrap = _sn if spectral_norm else (lambda m: m)
        n = _upsamplings(image_size)
        ch = width
        # (B, C, S, S) -> (B, width, S/2, S/2); no normalisation on the input layer (DCGAN)
        layers: list[nn.Module] = [wrap(nn.Conv2d(channels, ch, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(n - 1):
            # (B, ch, s, s) -> (B, 2ch, s/2, s/2)
            layers.append(wrap(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=spectral_norm)))
            if not spectral_norm:
                layers.append(nn.BatchNorm2d(ch * 2))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch *= 2
        # (B, ch, 4, 4) -> (B, 1, 1, 1)
        layers.append(wrap(nn.Conv2d(ch, 1, 4, 1, 0)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, S, S) in [-1, 1] -> logits (B,)
        return self.net(x).flatten()


def dcgan_init(module: nn.Module) -> None:
    """Weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0, as in the DCGAN paper."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def recompute_batchnorm(g: Generator, seed: int = 0, batches: int = 16, batch_size: int = 64) -> None:
    """Give G's BatchNorm layers running statistics computed for G's own weights.

    The EMA generator is an average of weights; statistics copied from the live G belong to
    other weights, and running it in eval mode with them mismatches every normalisation. This
    resets them and averages the batch statistics (momentum None = a cumulative mean) of
    ``batches`` x ``batch_size`` samples from fixed noise, so the same weights always get the
    same statistics. Leaves G in eval mode.
    """
    norms = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    device = next(g.parameters()).device
    noise = torch.Generator().manual_seed(seed)
    g.train()
    for _ in range(batches):
        g(torch.randn(batch_size, g.latent_dim, generator=noise).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    g.eval()


def build_generator(cfg: Config) -> Generator:
    g = Generator(cfg.model.latent_dim, cfg.data.channels, cfg.data.image_size, cfg.model.g_width)
    dcgan_init(g)
    return g


def build_discriminator(cfg: Config) -> Discriminator:
    d = Discriminator(cfg.data.channels, cfg.data.image_size, cfg.model.d_width, cfg.model.spectral_norm)
    dcgan_init(d)
    return d
