"""Differentiable augmentation of every image D sees (Zhao et al. 2020, "DiffAugment").

With a few thousand images, D memorises the real set and its feedback to G collapses. Augmenting
only the real images would teach G to draw the augmentations; augmenting real and generated images
alike, in the D step and in the G step, with operations G's gradient can pass through, keeps D from
memorising without changing the distribution G learns. Each operation draws its randomness per
sample from the torch.Generator it is given (the train loop's noise generator, seeded per run,
rank and epoch, so a resumed epoch augments as it did the first time).

Policies (``train.augment_policy``): a comma-separated list of
  translation  shift by up to ``train.augment_translation`` of the side, integer pixels, the
               uncovered border filled with 0 (mid-grey in [-1, 1]);
  cutout       zero one square of ``train.augment_cutout`` of the side, at a random centre;
  color        brightness, saturation (RGB only) and contrast jitter.
``auto`` = translation,cutout for grey images, translation,cutout,color for RGB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

OPERATIONS = ("translation", "cutout", "color")


def policy_of(policy: str, channels: int) -> tuple[str, ...]:
    """The operations a policy string names, in a fixed order; raises ValueError on a bad name."""
    if policy == "auto":
        return ("translation", "cutout", "color") if channels == 3 else ("translation", "cutout")
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown or not names:
        raise ValueError(f"unknown augmentation {', '.join(unknown) or '(empty)'}; use auto or a comma-separated "
                         f"list of {', '.join(OPERATIONS)}")
    return names


def _randint(low: int, high: int, shape: tuple[int, ...], gen: torch.Generator | None, device) -> torch.Tensor:
    where = gen.device if gen is not None else "cpu"
    return torch.randint(low, high, shape, generator=gen, device=where).to(device)


def _rand(shape: tuple[int, ...], gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    where = gen.device if gen is not None else "cpu"
    return torch.rand(shape, generator=gen, device=where).to(device=like.device, dtype=like.dtype)


def translate(x: torch.Tensor, ratio: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) -> same shape, each sample shifted by its own (dy, dx), zero-filled."""
    b, _, h, w = x.shape
    ry, rx = int(h * ratio + 0.5), int(w * ratio + 0.5)
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


Augment = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def augmenter(policy: tuple[str, ...], translation: float, cutout_ratio: float) -> Augment:
    """``apply(x, gen)``: what the train loop does to every D input (identity for an empty policy)."""
    ops: list[Augment] = []
    for name in policy:
        if name == "translation":
            ops.append(lambda x, gen: translate(x, translation, gen))
        elif name == "cutout":
            ops.append(lambda x, gen: cutout(x, cutout_ratio, gen))
        elif name == "color":
            ops.append(color)

    def apply(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        for op in ops:
            x = op(x, gen)
        return x

    return apply
