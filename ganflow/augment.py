"""Differentiable augmentation of every image D sees (Zhao et al. 2020, "DiffAugment").

With a few thousand images, D memorises the real set and its feedback to G collapses. Augmenting
only the real images would teach G to draw the augmentations; augmenting real and generated images
alike, in the D step and in the G step, with operations G's gradient can pass through, keeps D from
memorising without changing the distribution G learns. Each operation draws its randomness per
sample from the torch.Generator it is given (the train loop's noise generator, seeded per run,
rank and epoch, so a resumed epoch augments as it did the first time).

Policies (``train.augment_policy``, parsed by ganflow.config.policy_of): a comma-separated list of
  translation  shift by up to ``train.augment_translation`` of the side, integer pixels, the
               uncovered border filled with 0 (mid-grey in [-1, 1]);
  cutout       zero one square of ``train.augment_cutout`` of the side, at a random centre;
  color        brightness, saturation (RGB only) and contrast jitter.
``auto`` = translation,cutout for grey images, translation,cutout,color for RGB.

Adaptive strength (``train.augment: auto``, after ADA, Karras et al. 2020): each operation is
applied to a sample with probability p, and p follows D's over-fitting. The heuristic is
r_t = E[sign(D(x))] over the real images D sees: 0 when D cannot tell its training images from
fakes, 1 when it is sure of every one, as it becomes when it memorises a small set. Every
``train.ada_interval`` D steps p moves by (images seen since) / (``train.ada_kimg`` x 1000) up when
r_t is above ``train.ada_target`` and down when below, within [0, 1]. On data that D does not
over-fit within the budget r_t stays low and p near 0, which leaves such runs as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ganflow.config import shift_pixels


def _randint(low: int, high: int, shape: tuple[int, ...], gen: torch.Generator | None, device) -> torch.Tensor:
    where = gen.device if gen is not None else "cpu"
    return torch.randint(low, high, shape, generator=gen, device=where).to(device)


def _rand(shape: tuple[int, ...], gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    where = gen.device if gen is not None else "cpu"
    return torch.rand(shape, generator=gen, device=where).to(device=like.device, dtype=like.dtype)


def translate(x: torch.Tensor, ratio: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) -> same shape, each sample shifted by its own (dy, dx), zero-filled."""
    b, _, h, w = x.shape
    ry, rx = shift_pixels(h, ratio), shift_pixels(w, ratio)
    if ry == 0 and rx == 0:
        return x
    dy = _randint(-ry, ry + 1, (b, 1, 1), gen, x.device)
    dx = _randint(-rx, rx + 1, (b, 1, 1), gen, x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy + ry  # (B, H, 1) into the padded image
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx + rx  # (B, 1, W)
    padded = F.pad(x, [rx, rx, ry, ry])  # (B, C, H + 2ry, W + 2rx), zeros around
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # advanced indexing on dims 0, 2, 3 -> (B, H, W, C): gradients flow back to x
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square of side ``ratio`` x (H, W) per sample, its centre anywhere in the image."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sh == 0 or sw == 0:
        return x
    cy = _randint(0, h, (b, 1, 1), gen, x.device)
    cx = _randint(0, w, (b, 1, 1), gen, x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - sh // 2, cx - sw // 2
    inside = (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2] (RGB), contrast x[0.5, 1.5], per sample."""
    shape = (x.shape[0], 1, 1, 1)
    x = x + (_rand(shape, gen, x) - 0.5)
    if x.shape[1] == 3:
        grey = x.mean(dim=1, keepdim=True)
        x = grey + (x - grey) * (_rand(shape, gen, x) * 2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * (_rand(shape, gen, x) + 0.5)


Augment = Callable[..., torch.Tensor]  # apply(x, gen, p=1.0)


def augmenter(policy: tuple[str, ...], translation: float, cutout_ratio: float) -> Augment:
    """``apply(x, gen, p=1.0)``: what the train loop does to every D input. Each operation is
    applied to each sample with probability ``p`` (ADA's adaptive strength, train.augment auto;
    1 for diffaugment), drawn from ``gen`` like the operations' own randomness; p = 0 (and an
    empty policy) is the identity and draws nothing."""
    ops: list[Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = []
    for name in policy:
        if name == "translation":
            ops.append(lambda x, gen: translate(x, translation, gen))
        elif name == "cutout":
            ops.append(lambda x, gen: cutout(x, cutout_ratio, gen))
        elif name == "color":
            ops.append(color)

    def apply(x: torch.Tensor, gen: torch.Generator | None = None, p: float = 1.0) -> torch.Tensor:
        if p <= 0.0:
            return x
        for op in ops:
            if p >= 1.0:
                x = op(x, gen)
            else:  # this op on a random p of the samples, the identity on the rest
                chosen = (_rand((x.shape[0], 1, 1, 1), gen, x) < p).to(x.dtype)
                x = x + chosen * (op(x, gen) - x)
        return x

    return apply


@dataclass
class AdaptiveP:
    """The controller of ``train.augment: auto``: ``observe`` each D step's mean sign of D's real
    logits; every ``interval`` steps p moves by ``step`` towards less (r_t below target) or more
    (above) augmentation. Its whole state is in ``state_dict`` (checkpointed, so a resumed run
    adjusts p exactly as the uninterrupted run would have)."""

    target: float
    step: float  # the change of p per adjustment: images per adjustment / (ada_kimg x 1000)
    interval: int
    p: float = 0.0
    pending: float = 0.0  # the sum of the signs observed since the last adjustment
    seen: int = 0  # and how many steps they came from
    last_rt: float = float("nan")  # r_t of the last adjustment

    def observe(self, sign_mean: float, reduce: Callable[[float], float] | None = None) -> None:
        """``reduce``: the mean of a value over the ranks (DDP), so that every rank holds one p."""
        self.pending += sign_mean
        self.seen += 1
        if self.seen < self.interval:
            return
        rt = self.pending / self.seen
        if reduce is not None:
            rt = reduce(rt)
        self.pending, self.seen, self.last_rt = 0.0, 0, rt
        if rt != self.target:
            self.p = min(1.0, max(0.0, self.p + math.copysign(self.step, rt - self.target)))

    def state_dict(self) -> dict[str, float]:
        rt = self.last_rt if math.isfinite(self.last_rt) else None  # strict JSON in the checkpoint's meta
        return {"p": self.p, "pending": self.pending, "seen": self.seen, "last_rt": rt}

    def load_state_dict(self, values: dict[str, float]) -> None:
        self.p, self.pending = float(values["p"]), float(values["pending"])
        self.seen = int(values["seen"])
        self.last_rt = float("nan") if values["last_rt"] is None else float(values["last_rt"])
