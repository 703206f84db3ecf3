"""Images as arrays, numpy only: network output to uint8, and sample grids.

Imported by tracking (the grids logged per tick), sampling, evaluation and the CLI; it imports
no torch, so the light modules can draw a grid without pulling in the networks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_uint8(images: Any) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (a numpy array or a torch tensor, on any device) -> uint8 (N, H, W, C)."""
    if hasattr(images, "detach"):  # a tensor: to host memory as float32, without importing torch here
        images = images.detach().float().cpu().numpy()
    x = np.asarray(images, dtype=np.float32)
    x = np.round((np.clip(x, -1.0, 1.0) + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid if c != 1 else grid[:, :, 0]
