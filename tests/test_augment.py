"""Differentiable augmentation (ganflow/augment.py): what each operation does, that gradients pass
through it to G, and that the augmentations do not leak into what G draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ganflow.augment import augmenter, cutout, translate
from ganflow.config import from_dict, policy_of
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset
from ganflow.errors import GanflowError
from ganflow.gan_step import build_state, gan_step
from tests.conftest import tiny_cfg


def test_translation_shifts_each_image_and_fills_with_zero():
    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8) + 1  # no zeros inside
    y = translate(x, 0.25, torch.Generator().manual_seed(0))
    for a, b in zip(x, y):
        # every output pixel is either filler (0) or the input's pixel at one common offset
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(b[(b != 0)], torch.roll(a, (-dy, -dx), (1, 2))[(b != 0)])
        ]
        assert found, (a, b)
        dy, dx = found[0]
        assert int((b == 0).sum()) == 64 - (8 - abs(dy)) * (8 - abs(dx))
    assert torch.equal(translate(x, 0.0), x)


def test_cutout_zeroes_one_square_of_the_configured_side():
    x = torch.ones(256, 1, 16, 16)
    y = cutout(x, 0.5, torch.Generator().manual_seed(0))
    zeros = (y == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 64 and zeros.min() > 0  # an 8 x 8 square, clipped at the border
    assert torch.equal(cutout(x, 0.0), x)


def test_same_generator_same_augmentation_and_gradients_flow_back():
    apply = augmenter(policy_of("auto", 3), 0.125, 0.5)
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    a = apply(x, torch.Generator().manual_seed(3))
    b = apply(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, apply(x, torch.Generator().manual_seed(4)))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_policies_and_their_errors():
    assert policy_of("auto", 1) == ("translation", "cutout")
    assert policy_of("auto", 3) == ("translation", "cutout", "color")
    assert policy_of("color, translation", 3) == ("color", "translation")
    with pytest.raises(GanflowError, match=r"train\.augment_policy: .*unknown augmentation rotate"):
        from_dict({"train": {"augment_policy": "translation,rotate"}})


def tiny(tmp_path, **train):
    """Wider than conftest's TINY: D must be able to over-fit for the controller to act."""
    return tiny_cfg(
        tmp_path,
        model={"latent_dim": 32, "g_width": 16, "d_width": 16},
        train={"batch_size": 64, "lr_g": 1e-3, "lr_d": 1e-3, **train},
    )


def test_the_g_step_reaches_g_through_the_augmentation(tmp_path):
    cfg = tiny(tmp_path, augment="diffaugment")
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    seen = []
    original = state.d.forward
    state.d.forward = lambda x: (seen.append(x.detach().clone()), original(x))[1]
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    before = [p.detach().clone() for p in state.g.parameters()]
    gan_step(state, cfg, real, torch.Generator().manual_seed(0), update_g=True)
    assert not torch.equal(seen[0], real)  # D saw the real batch augmented
    assert any((s == 0).float().mean() > 0.1 for s in seen[1:])  # and the fakes, cut out too
    assert any(not torch.equal(a, b) for a, b in zip(before, state.g.parameters()))


def grey_blocks(x: torch.Tensor, side: int = 4, tol: float = 0.3) -> float:
    """Fraction of images holding a side x side block of mid-grey (cutout's fill, 0 in [-1, 1])."""
    near = (x.abs() < tol).float()
    return float((F.avg_pool2d(near, side, stride=1).flatten(1).max(1).values >= 0.999).float().mean())


def train_briefly(cfg, real_all: torch.Tensor, leak: bool, steps: int = 600) -> torch.Tensor:
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    apply = state.augment
    if leak:  # the mistake DiffAugment avoids: augment the real images only
        state.augment = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        real = real_all[torch.randint(0, len(real_all), (64,), generator=gen)]
        gan_step(state, cfg, apply(real, gen) if leak else real, gen, update_g=True)
    state.g.eval()
    with torch.no_grad():
        return state.g(torch.randn(500, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1)))


@pytest.mark.slow  # trains for minutes
@pytest.mark.timeout(900)
def test_cutout_does_not_leak_into_samples(tmp_path):
    """A strong cutout (half the side) on every D input: G's samples hold no more grey squares than
    the real digits. The control trains the same way with the cut-outs on the real images only,
    and G learns to draw them: the detector sees a leak when there is one."""
    cfg = tiny(tmp_path, augment="diffaugment", augment_policy="cutout", augment_cutout=0.5)
    prepare(cfg)
    dataset = PreparedDataset(cfg.paths.prepared, part="train")
    real_all = torch.stack([dataset[i][0] for i in range(len(dataset))])
    real_rate = grey_blocks(real_all)
    proper = grey_blocks(train_briefly(cfg, real_all, leak=False))
    leaky = grey_blocks(train_briefly(cfg, real_all, leak=True))
    assert proper <= real_rate + 0.05, (proper, real_rate)
    assert leaky >= real_rate + 0.15, (leaky, real_rate)


# ----------------------------------------------------------------- adaptive strength (augment: auto)


def test_each_operation_is_applied_to_a_share_p_of_the_samples():
    apply = augmenter(("cutout",), 0.125, 0.5)
    x = torch.ones(2000, 1, 16, 16)
    assert torch.equal(apply(x, torch.Generator().manual_seed(0), 0.0), x)  # p = 0: the identity
    for p in (0.25, 0.7):
        cut = (apply(x, torch.Generator().manual_seed(1), p) == 0).flatten(1).any(dim=1).float().mean()
        assert abs(float(cut) - p) < 0.04, (p, float(cut))
    assert bool((apply(x, torch.Generator().manual_seed(2), 1.0) == 0).flatten(1).any(dim=1).all())


def test_the_controller_raises_p_while_d_overfits_and_lowers_it_after():
    from ganflow.augment import AdaptiveP

    ada = AdaptiveP(target=0.6, step=0.05, interval=4)
    for _ in range(4 * 10):  # D sure of every real image: r_t = 1 > 0.6
        ada.observe(1.0)
    assert ada.p == pytest.approx(0.5) and ada.last_rt == pytest.approx(1.0)
    for _ in range(3):  # within an interval nothing moves
        ada.observe(0.0)
    assert ada.p == pytest.approx(0.5)
    saved = ada.state_dict()
    for _ in range(4 * 20):  # D unsure: p falls to 0 and stays there
        ada.observe(0.0)
    assert ada.p == 0.0
    resumed = AdaptiveP(target=0.6, step=0.05, interval=4)  # a restart mid-interval continues exactly
    resumed.load_state_dict(saved)
    resumed.observe(0.0)
    assert resumed.p == pytest.approx(0.45) and resumed.seen == 0
    ranks = AdaptiveP(target=0.6, step=0.05, interval=1)  # DDP: the mean over ranks decides
    ranks.observe(1.0, reduce=lambda v: (v + 0.0) / 2)
    assert ranks.p == 0.0 and ranks.last_rt == 0.5


def test_overfitting_d_raises_p_in_the_loop_and_diffaugment_holds_it_at_one(tmp_path):
    """A real G/D pair on 64 fixed images: D soon tells them from G's, r_t passes the target and
    p rises; with augment none there is no p, with diffaugment it is 1."""
    cfg = tiny(tmp_path, augment="auto", ada_kimg=0.5, ada_interval=1)
    state = build_state(cfg, torch.device("cpu"), 2e-3, 2e-3)
    assert state.ada is not None and state.augment_p == 0.0
    real = torch.rand(64, 1, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    rts = []
    for _ in range(40):
        diag = gan_step(state, cfg, real, gen, update_g=True)
        state.ada.observe(float(diag["rt"]))
        rts.append(float(diag["rt"]))
    assert max(rts) > cfg.train.ada_target and state.augment_p > 0.0, (rts, state.augment_p)
    assert build_state(tiny(tmp_path, augment="none"), torch.device("cpu"), 1e-3, 1e-3).augment_p == 0.0
    assert build_state(tiny(tmp_path, augment="diffaugment"), torch.device("cpu"), 1e-3, 1e-3).augment_p == 1.0


def test_lecam_adds_a_penalty_that_anchors_d_to_its_recent_outputs(tmp_path):
    from ganflow.gan_step import lecam_penalty

    ema = torch.tensor([1.0, -1.0])  # lately: real logits about +1, fake about -1
    assert float(lecam_penalty(torch.full((4,), -2.0), torch.full((4,), 2.0), ema)) == 0.0  # nothing beyond
    assert float(lecam_penalty(torch.full((4,), 1.0), torch.full((4,), -1.0), ema)) == pytest.approx(8.0)
    cfg = tiny(tmp_path, lecam=0.3)
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    gan_step(state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), update_g=True)
    assert state.lecam_ema is not None and bool(state.lecam_ema.ne(0).all())  # the EMAs moved
    assert build_state(tiny(tmp_path), torch.device("cpu"), 1e-3, 1e-3).lecam_ema is None


def test_consistency_regularisation_penalises_d_for_following_the_transform(tmp_path):
    """bCR: zero when D's logits do not move under the transform, the mean squared change when they
    do; it changes D's update (with or without augmentation of what D sees); off builds nothing."""
    from ganflow.gan_step import consistency_penalty

    assert float(consistency_penalty(torch.ones(4), torch.ones(4))) == 0.0
    assert float(consistency_penalty(torch.zeros(4), torch.full((4,), 2.0))) == pytest.approx(4.0)
    real = torch.rand(8, 1, 16, 16) * 2 - 1

    def d_after_one_step(**train):
        cfg = tiny(tmp_path, **train)
        state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
        gan_step(state, cfg, real, torch.Generator().manual_seed(0), update_g=False)
        return state, [p.grad.clone() for p in state.d.parameters()]  # D's gradient of its whole loss

    off, d_off = d_after_one_step(augment="none")
    assert off.consistency is None
    on, d_on = d_after_one_step(augment="none", consistency=10.0)
    assert on.consistency is not None and on.augment is None  # the transform, without augmenting D's inputs
    assert any(not torch.equal(a, b) for a, b in zip(d_off, d_on))
    # with D's inputs augmented too (p = 1) the term still changes D's gradient
    _, d_augmented = d_after_one_step(augment="diffaugment")
    _, d_both = d_after_one_step(augment="diffaugment", consistency=10.0)
    assert any(not torch.equal(a, b) for a, b in zip(d_augmented, d_both))


def test_an_r1_step_keeps_the_other_penalties(tmp_path):
    """On the steps R1 applies to, LeCam still counts (R1 once replaced the total with its own)."""
    real = torch.rand(8, 1, 16, 16) * 2 - 1

    def d_after_one_step(**train):
        cfg = tiny(tmp_path, r1_gamma=1.0, r1_every=1, **train)
        state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
        state.lecam_ema = None if state.lecam_ema is None else torch.tensor([5.0, -5.0])  # a penalty now
        gan_step(state, cfg, real, torch.Generator().manual_seed(0), update_g=False)
        return [p.grad.clone() for p in state.d.parameters()]  # Adam's first step follows only the signs

    assert any(not torch.equal(a, b) for a, b in zip(d_after_one_step(), d_after_one_step(lecam=0.3)))
