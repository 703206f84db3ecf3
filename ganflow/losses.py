"""GAN losses on D's logits. Each kind is a (d_loss, g_loss) pair chosen from LOSSES."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def bce_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    # D maximises log D(x) + log(1 - D(G(z))): BCE with target 1 on real, 0 on fake
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def bce_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    # non-saturating: G maximises log D(G(z)) instead of minimising log(1 - D(G(z)))
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    # D pushes real logits above +1 and fake logits below -1
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    # G raises D's logit on its samples
    return -fake_logits.mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """E[||grad_x D(x)||^2] over the real images D scored (Mescheder et al. 2018): the gradient
    penalty that keeps D flat on the data. ``real_inputs`` must require grad; the graph is kept,
    so the penalty trains D."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


DLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GLoss = Callable[[torch.Tensor], torch.Tensor]

LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "bce": (bce_d_loss, bce_g_loss),
    "hinge": (hinge_d_loss, hinge_g_loss),
}
