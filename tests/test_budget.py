"""The training budget in images shown (ganflow/budget.py): epochs and ticks for any data size."""

from __future__ import annotations

import pytest

from ganflow.budget import images_per_epoch, plan


def test_the_same_kimg_gives_small_and_large_sets_the_same_images_shown():
    digits = plan(kimg=75, tick_kimg=2.5, epochs=None, n_train=1259, batch_size=64)
    small = plan(kimg=75, tick_kimg=2.5, epochs=None, n_train=70, batch_size=64)
    assert digits.images_per_epoch == 19 * 64 and small.images_per_epoch == 64  # drop_last
    assert digits.epochs == 62 and small.epochs == 1172  # the first epoch end at or past 75,000 images
    for schedule in (digits, small):
        assert 75.0 <= schedule.kimg < 75.0 + schedule.images_per_epoch / 1000
        assert schedule.ticks[-1] == schedule.epochs  # the run's end is always a tick
        assert len(schedule.ticks) == 30  # one per 2.5 kimg, whatever an epoch holds
        kimg = [schedule.kimg_at(e) for e in schedule.ticks]
        assert all(b - a < 2.5 + schedule.images_per_epoch / 1000 for a, b in zip(kimg, kimg[1:]))


def test_an_epoch_larger_than_a_tick_makes_every_epoch_a_tick():
    large = plan(kimg=20, tick_kimg=2.5, epochs=None, n_train=10_000, batch_size=100)
    assert large.epochs == 2 and large.ticks == (1, 2)
    assert large.tick_index(2) == 2 and large.tick_index(3) is None


def test_epochs_override_the_budget_and_ranks_drop_their_own_remainder():
    assert plan(kimg=75, tick_kimg=1000, epochs=3, n_train=1259, batch_size=64).ticks == (3,)
    assert images_per_epoch(130, 64, world=2) == 128  # 65 per rank: two batches of 32 each
    with pytest.raises(ValueError, match=r"train\.batch_size: 64 is larger .* \(50 training images over 1"):
        plan(kimg=1, tick_kimg=1, epochs=None, n_train=50, batch_size=64)


def test_only_the_budgets_last_part_may_be_exported():
    """train.export_from: the ticks before that share of the budget are never the exported G (a
    first tick's noise once scored lowest on 15 validation images); the last tick always may be."""
    p = plan(10.0, 1.0, None, n_train=1000, batch_size=100)  # 1 kimg an epoch, a tick each
    assert [e for e in p.ticks if p.exportable(e, 0.5)] == [5, 6, 7, 8, 9, 10]
    assert [e for e in p.ticks if p.exportable(e, 0.0)] == list(p.ticks)
    assert [e for e in p.ticks if p.exportable(e, 1.0)] == [10]
