"""The training budget in images shown, and the ticks that evaluation, sample grids and
checkpoints happen at.

An epoch is the wrong unit for a budget: 60 epochs of 1,259 digits are 1,140 G steps, 60 epochs
of 70 photos are 60. As StyleGAN counts training in thousands of real images shown to D
(``--kimg``), ``train.kimg`` is the length of a run whatever the data's size, and
``train.tick_kimg`` the interval at which the run is evaluated, its sample grid logged and
(every ``train.checkpoint_every`` ticks) checkpointed, so a run on 70 images and one on 70,000
leave as many grids and evaluations behind.

The loop still walks whole epochs (a resumed run restarts at an epoch boundary, exactly as it
was), so a tick ends at the end of the first epoch that reaches it, and the run at the end of
the first epoch that reaches ``train.kimg``: on a data set larger than a tick every epoch is a
tick, and the run may overshoot its budget by less than one epoch. ``train.epochs``, when set,
is the old unit and overrides ``train.kimg``.

Torch-free: the driver, the sweep and the loop all plan with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """One run's plan: ``epochs`` passes over the train split of ``images_per_epoch`` images each
    (what the ranks consume together: drop_last, per rank), ticks at the end of the epochs in
    ``ticks`` (1-based, the last one always the run's last epoch)."""

    images_per_epoch: int
    epochs: int
    ticks: tuple[int, ...]

    def kimg_at(self, epoch: int) -> float:
        """Thousands of real images D has seen after ``epoch`` epochs."""
        return epoch * self.images_per_epoch / 1000.0

    @property
    def kimg(self) -> float:
        return self.kimg_at(self.epochs)

    def exportable(self, epoch: int, export_from: float) -> bool:
        """Whether the tick ending at ``epoch`` may be the exported generator: it lies at or past
        ``export_from`` of the budget (the last epoch always does)."""
        return epoch >= self.epochs or self.kimg_at(epoch) >= export_from * self.kimg - 1e-9

    def tick_index(self, epoch: int) -> int | None:
        """1-based index of the tick that ends at ``epoch``, None where none does."""
        try:
            return self.ticks.index(epoch) + 1
        except ValueError:
            return None


def images_per_epoch(n_train: int, batch_size: int, world: int = 1) -> int:
    """Real images one epoch shows D: each rank gets n_train // world of the shuffled split
    (DistributedSampler, drop_last) and drops its last incomplete batch."""
    per_rank = batch_size // world
    return world * per_rank * ((n_train // world) // per_rank) if per_rank else 0


def plan(kimg: float, tick_kimg: float, epochs: int | None, n_train: int, batch_size: int, world: int = 1) -> Schedule:
    """The schedule of a run of ``kimg`` thousand images (or ``epochs`` epochs when given) with a
    tick every ``tick_kimg`` thousand. Raises ValueError when an epoch holds no full batch."""
    per_epoch = images_per_epoch(n_train, batch_size, world)
    if per_epoch <= 0:
        raise ValueError(
            f"train.batch_size: {batch_size} is larger than the prepared dataset allows "
            f"({n_train} training images over {world} worker(s))"
        )
    total = epochs if epochs is not None else max(1, math.ceil(kimg * 1000.0 / per_epoch - 1e-9))
    tick_images = tick_kimg * 1000.0
    ticks, next_at = [], tick_images
    for epoch in range(1, total + 1):
        shown = epoch * per_epoch
        if shown >= next_at - 1e-6 or epoch == total:
            ticks.append(epoch)
            next_at = (math.floor(shown / tick_images + 1e-9) + 1) * tick_images
    return Schedule(images_per_epoch=per_epoch, epochs=total, ticks=tuple(ticks))


def schedule_of(train, n_train: int, world: int = 1) -> Schedule:
    """The plan of a ``train:`` section (ganflow.config.TrainConfig) on ``n_train`` images."""
    return plan(train.kimg, train.tick_kimg, train.epochs, n_train, train.batch_size, world)
