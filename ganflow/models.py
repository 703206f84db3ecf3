"""DCGAN-style generator and discriminator (Radford et al. 2015) for 16..128 pixel images.

G maps a code to an image in [-1, 1]; D maps an image to one logit per sample. Both double/halve
their resolution per layer between 4x4 and data.image_size.

Class-conditional (``num_classes`` > 0, model.conditional): G's code is the latent vector followed
by a one-hot class vector (N, latent_dim + num_classes), one tensor, so every consumer of G (the
exported safetensors, the MLflow model, DDP, evaluation) keeps one input; G's first layer takes the
whole code and its BatchNorm layers take their scale and shift from the class (conditional
BatchNorm, de Vries et al. 2017), and D adds the projection of its pooled features (their sum over
the 4x4 positions / 4) on a class embedding to its logit (Miyato & Koyama 2018).
Unconditional networks keep exactly the layers and state-dict keys they always had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ganflow.config import Config


def _upsamplings(image_size: int) -> int:
    """Number of stride-2 layers between 4x4 and image_size x image_size."""
    return int(math.log2(image_size)) - 2


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine parameters; the scale and shift come from the class:
    gamma = 1 + c @ W_gain, beta = c @ W_bias for a one-hot (or any weighting) c (B, K). Both
    start at zero, so a fresh layer is a plain BatchNorm."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(features, affine=False)
        self.gain = nn.Linear(num_classes, features, bias=False)
        self.bias = nn.Linear(num_classes, features, bias=False)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, F, H, W), c: (B, K) -> (B, F, H, W)
        gamma = 1.0 + self.gain(c)
        beta = self.bias(c)
        return self.norm(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, num_classes: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.code_dim = latent_dim + num_classes  # the width of G's input
        self.channels = channels
        self.image_size = image_size
        self.width = width

        def norm(features: int) -> nn.Module:
            return ConditionalBatchNorm2d(features, num_classes) if num_classes else nn.BatchNorm2d(features)

        n = _upsamplings(image_size)
        ch = width * 2 ** (n - 1)
        layers: list[nn.Module] = [
            # (B, latent [+ classes], 1, 1) -> (B, ch, 4, 4): a conditional G gets its class here
            # too, so the class shapes the image from the first layer, not only through the
            # BatchNorm scale and shift that start neutral
            nn.ConvTranspose2d(self.code_dim, ch, 4, 1, 0, bias=False),
            norm(ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):
            # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                norm(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        # (B, width, S/2, S/2) -> (B, C, S, S) in [-1, 1]
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        # code: (B, latent [+ classes]) -> (B, C, S, S)
        x = code.reshape(code.shape[0], self.code_dim, 1, 1)
        if not self.num_classes:
            return self.net(x)
        c = code[:, self.latent_dim :]
        for layer in self.net:
            x = layer(x, c) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


class Discriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, width: int, spectral_norm: bool = False, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
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
        if num_classes:  # projection: <embed(y), sum-pooled features>, added to the logit
            self.embed = wrap(nn.Linear(num_classes, ch, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, S, S) in [-1, 1], c: (B, K) one-hot classes (conditional D only) -> logits (B,)
        if not self.num_classes:
            return self.net(x).flatten()
        h = self.net[:-1](x)  # (B, ch, 4, 4)
        # sum-pooled / sqrt(positions): the scale of one position for uncorrelated positions. Of
        # the scales measured (60 epochs, one seed) this one held the class best for its fd: mean
        # pooling (1/16 of the sum here) left the class term too weak (G drew the asked digit
        # 39 % of the time), the plain sum (SNGAN's) let D's class term grow first and cost
        # recall
        pooled = h.sum((2, 3)) / math.sqrt(h.shape[2] * h.shape[3])
        return self.net[-1](h).flatten() + (self.embed(c) * pooled).sum(1)


# --------------------------------------------------------------------------- residual (model.arch: resnet)


class _GBlock(nn.Module):
    """Up-sampling residual block of G: (BN-ReLU-up-conv3-BN-ReLU-conv3) + (up-conv1)."""

    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()

        def norm(features: int) -> nn.Module:
            return ConditionalBatchNorm2d(features, num_classes) if num_classes else nn.BatchNorm2d(features)

        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, 1, 0)

    def _norm(self, layer: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return layer(x, c) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        # (B, cin, s, s) -> (B, cout, 2s, 2s)
        h = nn.functional.interpolate(torch.relu(self._norm(self.norm1, x, c)), scale_factor=2.0, mode="nearest")
        h = self.conv2(torch.relu(self._norm(self.norm2, self.conv1(h), c)))
        return h + self.skip(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResnetGenerator(nn.Module):
    """SNGAN/BigGAN-style G: a linear map of z to 4x4, one up-sampling residual block per
    doubling (channels halve from width * 2^(n-1) to width), then BN-ReLU-conv3-tanh. Same
    input and output as the DCGAN G (conditional through its BatchNorm layers)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, num_classes: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.code_dim = latent_dim + num_classes
        self.channels = channels
        self.image_size = image_size
        self.width = width
        n = _upsamplings(image_size)
        ch = width * 2 ** (n - 1)
        self.top = ch
        self.linear = nn.Linear(latent_dim, ch * 16)  # (B, latent) -> (B, ch, 4, 4)
        blocks = []
        for i in range(n):
            cout = max(width, ch // 2) if i < n - 1 else width
            blocks.append(_GBlock(ch, cout, num_classes))
            ch = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.BatchNorm2d(ch)
        self.out_conv = nn.Conv2d(ch, channels, 3, 1, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        # code: (B, latent [+ classes]) -> (B, C, S, S) in [-1, 1]
        z = code[:, : self.latent_dim]
        c = code[:, self.latent_dim :] if self.num_classes else None
        x = self.linear(z).reshape(z.shape[0], self.top, 4, 4)
        for block in self.blocks:
            x = block(x, c)
        return torch.tanh(self.out_conv(torch.relu(self.out_norm(x))))


class _DBlock(nn.Module):
    """Down-sampling residual block of D: (ReLU-conv3-ReLU-conv3-avgpool) + (conv1-avgpool); the
    first block of D skips the leading ReLU (its input is the image)."""

    def __init__(self, cin: int, cout: int, wrap, first: bool):
        super().__init__()
        self.first = first
        self.conv1, self.conv2 = wrap(nn.Conv2d(cin, cout, 3, 1, 1)), wrap(nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = wrap(nn.Conv2d(cin, cout, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, cin, s, s) -> (B, cout, s/2, s/2)
        h = self.conv1(x if self.first else torch.relu(x))
        h = nn.functional.avg_pool2d(self.conv2(torch.relu(h)), 2)
        skip = nn.functional.avg_pool2d(x, 2) if self.first else x
        skip = self.skip(skip)
        return h + (skip if self.first else nn.functional.avg_pool2d(skip, 2))


class ResnetDiscriminator(nn.Module):
    """SNGAN-style D: down-sampling residual blocks to 4x4 (channels double from width), ReLU,
    sum pooling, a linear logit; the class projection of a conditional D on the pooled features.
    No BatchNorm; spectral norm on every layer when model.spectral_norm."""

    def __init__(self, channels: int, image_size: int, width: int, spectral_norm: bool = False, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        wrap = _sn if spectral_norm else (lambda m: m)
        n = _upsamplings(image_size)
        blocks, ch = [], channels
        for i in range(n):
            cout = width * 2**i
            blocks.append(_DBlock(ch, cout, wrap, first=i == 0))
            ch = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = wrap(nn.Linear(ch, 1))
        if num_classes:
            self.embed = wrap(nn.Linear(num_classes, ch, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, S, S) -> logits (B,)
        h = torch.relu(self.blocks(x)).sum((2, 3))  # (B, ch)
        out = self.linear(h).flatten()
        if self.num_classes:
            out = out + (self.embed(c) * h).sum(1)
        return out


def resnet_init(module: nn.Module) -> None:
    """Xavier-uniform weights for convolutions and linear maps (SNGAN), zero biases; BatchNorm at
    scale 1, shift 0; a conditional BatchNorm's class scale and shift at 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.xavier_uniform_(weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    _neutral_class_norms(module)


def _neutral_class_norms(module: nn.Module) -> None:
    """Every conditional BatchNorm back to scale 1, shift 0 for every class (after an init that
    drew its class weights like any linear map)."""
    for m in module.modules():
        if isinstance(m, ConditionalBatchNorm2d):
            nn.init.zeros_(m.gain.weight)
            nn.init.zeros_(m.bias.weight)


GENERATORS = {"dcgan": Generator, "resnet": ResnetGenerator}
DISCRIMINATORS = {"dcgan": Discriminator, "resnet": ResnetDiscriminator}


def dcgan_init(module: nn.Module) -> None:
    """Weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0, as in the DCGAN paper; a
    conditional BatchNorm's class scale and shift start at 0 (scale 1, shift 0 for every class)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # D's class embedding
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
    _neutral_class_norms(module)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) int classes -> (B, K) float one-hot."""
    return nn.functional.one_hot(labels.long(), num_classes).float()


def allocate(prior: Sequence[float], n: int) -> torch.Tensor:
    """n class indices, sorted, with each class's count the largest-remainder rounding of
    n * prior: samples at the real class frequencies without the noise of drawing them."""
    p = torch.as_tensor(list(prior), dtype=torch.float64)
    p = p / p.sum()
    exact = p * n
    counts = exact.floor().long()
    short = n - int(counts.sum())
    if short:
        counts[torch.argsort(exact - counts, descending=True, stable=True)[:short]] += 1
    return torch.repeat_interleave(torch.arange(len(p)), counts)


def draw_codes(n: int, latent_dim: int, prior: Sequence[float] | None, generator: torch.Generator) -> torch.Tensor:
    """n inputs for G: latent vectors N(0, I) from ``generator``, followed for a conditional G
    (``prior`` = its classes' frequencies) by one-hot classes allocated at those frequencies."""
    z = torch.randn(n, latent_dim, generator=generator)
    if not prior:
        return z
    return torch.cat([z, one_hot(allocate(prior, n), len(prior))], dim=1)


def class_grid_codes(latent_dim: int, num_classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs for a grid with one row per class, ``per_class`` samples each (row k = class k)."""
    z = torch.randn(num_classes * per_class, latent_dim, generator=generator)
    classes = torch.arange(num_classes).repeat_interleave(per_class)
    return torch.cat([z, one_hot(classes, num_classes)], dim=1)


@torch.no_grad()
def recompute_batchnorm(
    g: Generator, seed: int = 0, batches: int = 16, batch_size: int = 64, prior: Sequence[float] | None = None
) -> None:
    """Give G's BatchNorm layers running statistics computed for G's own weights.

    The EMA generator is an average of weights; statistics copied from the live G belong to
    other weights, and running it in eval mode with them mismatches every normalisation. This
    resets them and averages the batch statistics (momentum None = a cumulative mean) of
    ``batches`` x ``batch_size`` samples from fixed noise, so the same weights always get the
    same statistics. A conditional G draws its classes at ``prior`` (uniform when None). Leaves
    G in eval mode.
    """
    norms = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    device = next(g.parameters()).device
    noise = torch.Generator().manual_seed(seed)
    g.train()
    prior = prior or ([1.0] * g.num_classes if g.num_classes else None)
    for _ in range(batches):
        g(draw_codes(batch_size, g.latent_dim, prior, noise).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    g.eval()


def build_generator(cfg: Config, num_classes: int = 0) -> nn.Module:
    g = GENERATORS[cfg.model.arch](
        cfg.model.latent_dim, cfg.data.channels, cfg.data.image_size, cfg.net_widths[0], num_classes
    )
    (dcgan_init if cfg.model.arch == "dcgan" else resnet_init)(g)
    return g


def build_discriminator(cfg: Config, num_classes: int = 0) -> nn.Module:
    d = DISCRIMINATORS[cfg.model.arch](
        cfg.data.channels, cfg.data.image_size, cfg.net_widths[1], cfg.model.spectral_norm, num_classes
    )
    (dcgan_init if cfg.model.arch == "dcgan" else resnet_init)(d)
    return d
