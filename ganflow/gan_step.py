"""One GAN update and the state it updates: networks, optimizers, EMA of G, mixed precision.

Per batch: the D step on fake.detach() (G's gradients untouched), with the R1 penalty every
train.r1_every steps and, optionally, LeCam and consistency regularisation; then, every
train.d_steps batches, the G step, with the mode-seeking term when set; an EMA copy of G follows
every G step. Adaptive augmentation (ganflow.augment) applies to every image D sees. No Ray, no
I/O: the loop (ganflow.train_loop) and the sweep's trials drive it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganflow.augment import AdaptiveP, Augment, augmenter
from ganflow.config import Config, policy_of
from ganflow.losses import LOSSES, r1_penalty
from ganflow.models import (
    build_discriminator,
    build_generator,
    class_grid_codes,
    one_hot,
)

DIAGNOSTICS = ("loss_d", "loss_g", "d_real", "d_fake", "rt")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (sample, evaluate and export through this)."""
    return model.module if hasattr(model, "module") else model


def noise_seed(seed: int, rank: int, epoch: int) -> int:
    """Noise seed per (run seed, rank, epoch): ranks draw different z, and a resumed epoch
    draws exactly the z it drew the first time."""
    return int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0])


def fixed_noise(cfg: Config, n: int = 64, num_classes: int = 0) -> torch.Tensor:
    """The same G inputs every epoch, so sample grids show progress, not new draws; a
    conditional G's grid has one row of 8 per class."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    if num_classes:
        return class_grid_codes(cfg.model.latent_dim, num_classes, 8, g)
    return torch.randn(n, cfg.model.latent_dim, generator=g)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for this device, or None for full precision.

    CUDA: auto = bf16 where the GPU has it, else fp16 (with a gradient scaler). CPU: auto = bf16
    where the CPU computes it natively (AVX512-BF16 or AMX), else full precision; bf16 forces it."""
    if cfg.train.amp == "off":
        return None
    if device.type == "cuda":
        if cfg.train.amp == "fp16":
            return torch.float16
        if cfg.train.amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if cfg.train.amp == "fp16":
            return torch.float16
        if cfg.train.amp == "bf16" or cpu_has_bf16():
            return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively; without it, bf16 autocast is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass
class GanState:
    """Everything one worker trains; g and d may be DDP-wrapped, ema_g never is."""

    g: nn.Module
    d: nn.Module
    ema_g: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = full precision
    augment: Augment | None = None  # applied to every D input, real and generated (train.augment)
    consistency: Augment | None = None  # train.consistency > 0: the transform D's logits must not follow
    ada: AdaptiveP | None = None  # train.augment auto: the controller of the augmentation's probability
    prior: list[float] | None = None  # a conditional G's class frequencies (train split); None = unconditional
    epoch: int = 0  # the next epoch to run
    step: int = 0  # batches done (D steps)
    g_steps: int = 0
    starts: int = 1  # how many times the worker group started on this run (1 + restarts/resumes)
    best_fd: float = float("inf")  # the best in-training fd_domain so far, and where
    best_epoch: int = 0
    best_ema_g: dict[str, torch.Tensor] | None = None  # the EMA generator of best_epoch (CPU)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished tick
    lecam_ema: torch.Tensor | None = None  # train.lecam > 0: EMAs of D's mean real and fake logits
    mode_seeking: float = 0.0  # train.mode_seeking resolved for this G (Config.mode_seeking_weight)

    @property
    def augment_p(self) -> float:
        """The probability each augmentation is applied with: ADA's p, 1 for diffaugment."""
        return self.ada.p if self.ada is not None else (1.0 if self.augment is not None else 0.0)


def build_state(
    cfg: Config, device: torch.device, lr_g: float, lr_d: float, prior: list[float] | None = None
) -> GanState:
    """``prior``: the class frequencies of a conditional G (None: unconditional)."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    classes = len(prior) if prior else 0
    g = build_generator(cfg, classes).to(device)
    d = build_discriminator(cfg, classes).to(device)
    ema_g = copy.deepcopy(g).eval().requires_grad_(False)
    betas = (cfg.train.beta1, cfg.train.beta2)
    dtype = amp_dtype(cfg, device)
    fp16 = dtype == torch.float16
    ops = augmenter(
        policy_of(cfg.train.augment_policy, cfg.data.channels), cfg.train.augment_translation, cfg.train.augment_cutout
    )
    return GanState(
        g=g,
        d=d,
        ema_g=ema_g,
        opt_g=torch.optim.Adam(g.parameters(), lr=lr_g, betas=betas),
        opt_d=torch.optim.Adam(d.parameters(), lr=lr_d, betas=betas),
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
        device=device,
        dtype=dtype,
        augment=ops if cfg.train.augment != "none" else None,
        # bCR's transform is a shift (the paper's, with flips): invariance to cutout's hidden half
        # of the image or to colour left D unable to tell real from fake on 100 digits (D(x) 0.5)
        consistency=augmenter(("translation",), cfg.train.augment_translation, 0.0)
        if cfg.train.consistency > 0
        else None,
        ada=ada_controller(cfg),
        prior=list(prior) if prior else None,
        lecam_ema=torch.zeros(2, device=device) if cfg.train.lecam > 0 else None,
        mode_seeking=cfg.mode_seeking_weight(conditional=classes > 0),
    )


def ada_controller(cfg: Config) -> AdaptiveP | None:
    """train.augment auto: p starts at 0 and moves by the images of one adjustment over ada_kimg."""
    if cfg.train.augment != "auto":
        return None
    step = cfg.train.batch_size * cfg.train.ada_interval / (cfg.train.ada_kimg * 1000.0)
    return AdaptiveP(target=cfg.train.ada_target, step=step, interval=cfg.train.ada_interval)


def _autocast(state: GanState):
    if state.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=state.dtype)


EMA_RAMPUP = 0.1  # the EMA's half-life is at most this share of the G steps taken so far


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay after ``updates`` G steps. Its half-life (in G steps) ramps up with the run,
    as StyleGAN's EMA half-life ramps with the images shown: at most EMA_RAMPUP x the steps so
    far, so a short run's EMA does not hold on to the random initial weights; ``decay`` itself
    is reached once the run has taken ln(0.5) / ln(decay) / EMA_RAMPUP steps (690 for 0.99)."""
    if decay <= 0.0:
        return 0.0
    half_life = min(math.log(0.5) / math.log(decay), EMA_RAMPUP * updates)
    return 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Average the weights only: the EMA G's BatchNorm statistics are recomputed for its own
    weights (models.recompute_batchnorm) before it is evaluated, sampled or exported."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def gan_step(
    state: GanState,
    cfg: Config,
    real: torch.Tensor,
    z_gen: torch.Generator,
    update_g: bool,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One D update, then (if update_g) one G update. real: (B, C, H, W) in [-1, 1]; labels:
    (B,) their classes, used by a conditional G and D (the fakes are drawn for the same classes,
    so they follow the data's class frequencies).

    Returns detached diagnostics: loss_d, loss_g, d_real, d_fake (mean D probabilities).
    """
    d_loss_fn, g_loss_fn = LOSSES[cfg.train.loss]
    b = real.shape[0]
    z = torch.randn(b, cfg.model.latent_dim, generator=z_gen, device=z_gen.device).to(state.device)
    seeking = state.mode_seeking > 0 and update_g and b >= 2  # the G step pairs fakes i and i + b//2
    c = c_fake = None
    if state.prior:
        c = c_fake = one_hot(labels, len(state.prior)).to(state.device)  # (B, K)
        if seeking:  # a pair shares its class
            c_fake = c.clone()
            c_fake[b // 2 : 2 * (b // 2)] = c[: b // 2]
        z = torch.cat([z, c_fake], dim=1)
    # D sees every image through the same random augmentation, real and generated, in both steps
    p = state.augment_p
    seen = (lambda x: state.augment(x, z_gen, p)) if state.augment is not None else (lambda x: x)
    judge = (lambda x: state.d(x, c)) if c is not None else state.d  # real images, their classes
    judge_fake = (lambda x: state.d(x, c_fake)) if c is not None else state.d  # fakes, the classes drawn

    # D step: minimise d_loss(D(x), D(G(z))) on fake.detach(), so no gradient reaches G; every
    # train.r1_every steps plus the R1 penalty on the same real images (lazy regularisation)
    r1 = cfg.train.r1_gamma > 0 and state.step % cfg.train.r1_every == 0
    with _autocast(state):
        fake = state.g(z)
        real_seen = seen(real)
        if r1:
            real_seen = real_seen.detach().requires_grad_(True)
        real_logits = judge(real_seen)
        fake_seen = seen(fake.detach())
        fake_logits = judge_fake(fake_seen)
        loss_d = d_loss_fn(real_logits.float(), fake_logits.float())  # the diagnostic: without the penalties
        total_d = loss_d
        if state.lecam_ema is not None:
            total_d = total_d + cfg.train.lecam * lecam_penalty(
                real_logits.float(), fake_logits.float(), state.lecam_ema
            )
        if state.consistency is not None:  # bCR: D's logit should not change when its input is shifted
            t = state.consistency
            total_d = total_d + cfg.train.consistency * (
                consistency_penalty(real_logits, judge(t(real_seen, z_gen, 1.0)))
                + consistency_penalty(fake_logits, judge_fake(t(fake_seen, z_gen, 1.0)))
            )
        if r1:
            total_d = total_d + 0.5 * cfg.train.r1_gamma * cfg.train.r1_every * r1_penalty(real_logits, real_seen)
    state.opt_d.zero_grad(set_to_none=True)
    state.scaler_d.scale(total_d).backward()
    state.scaler_d.step(state.opt_d)
    state.scaler_d.update()

    if state.lecam_ema is not None:  # after the penalty: it anchors to the outputs of earlier steps
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        state.lecam_ema.lerp_(means, 1.0 - cfg.train.lecam_decay)
    diagnostics = {
        "loss_d": loss_d.detach(),
        "rt": torch.sign(real_logits.detach().float()).mean(),  # ADA's over-fitting heuristic
        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
    }
    if not update_g:
        diagnostics["loss_g"] = torch.full_like(diagnostics["loss_d"], float("nan"))
        return diagnostics

    # G step: minimise g_loss(D(G(z))) through D; D's gradients from this pass are thrown
    # away (zeroed before D's next step), and no_sync keeps DDP from all-reducing them
    no_sync = state.d.no_sync() if hasattr(state.d, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with _autocast(state):
            loss_g = g_loss_fn(judge_fake(seen(fake)).float())  # the diagnostic: without the penalty
            total_g = loss_g
            if seeking:
                total_g = loss_g + state.mode_seeking * mode_seeking_penalty(fake, z[:, : cfg.model.latent_dim])
        state.opt_g.zero_grad(set_to_none=True)
        state.scaler_g.scale(total_g).backward()
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()
    update_ema(state.ema_g, unwrap(state.g), ema_decay_at(cfg.train.ema_decay, state.g_steps))
    state.g_steps += 1
    diagnostics["loss_g"] = loss_g.detach()
    return diagnostics


def lecam_penalty(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): keeps D's outputs on real images from running away from what it
    said of fakes lately, and the reverse; ``ema`` = (EMA of mean real logit, of mean fake logit)."""
    return F.relu(real_logits - ema[1]).pow(2).mean() + F.relu(ema[0] - fake_logits).pow(2).mean()


def consistency_penalty(logits: torch.Tensor, transformed_logits: torch.Tensor) -> torch.Tensor:
    """bCR's term for one side (real or generated): the mean squared change of D's logits when
    the images are transformed; both passes get the gradient, as in the paper."""
    return (logits.float() - transformed_logits.float()).pow(2).mean()


def mode_seeking_penalty(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over the pairs (i, i + B//2) of a batch (Mao et
    al. 2019): large when two codes give nearly the same image. A conditional batch pairs equal
    classes (gan_step), so the pairs differ by their codes only."""
    half = fake.shape[0] // 2
    image_gap = (fake[:half] - fake[half : 2 * half]).float().abs().mean()
    code_gap = (z[:half] - z[half : 2 * half]).float().abs().mean()
    return 1.0 / (image_gap / code_gap + eps)
