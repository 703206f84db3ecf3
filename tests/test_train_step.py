"""The GAN update itself, without Ray: what each step touches, EMA, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from ganflow import gan_step as step_module
from ganflow.checkpoint_io import load_checkpoint, save_checkpoint
from ganflow.config import from_dict, resolve_paths
from ganflow.gan_step import amp_dtype, build_state, ema_decay_at, gan_step, update_ema
from ganflow.losses import LOSSES
from ganflow.models import build_discriminator, build_generator
from ganflow.train_loop import synced_batchnorm
from tests.conftest import REPO, tiny_cfg


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_cpu_mixed_precision_follows_train_amp(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert amp_dtype(tiny_cfg(tmp_path, train=dict(amp="off")), cpu) is None
    assert amp_dtype(tiny_cfg(tmp_path, train=dict(amp="bf16")), cpu) == torch.bfloat16
    monkeypatch.setattr(step_module, "cpu_has_bf16", lambda: False)
    assert amp_dtype(tiny_cfg(tmp_path, train=dict(amp="auto")), cpu) is None  # emulated bf16 is slower than float32
    monkeypatch.setattr(step_module, "cpu_has_bf16", lambda: True)
    assert amp_dtype(tiny_cfg(tmp_path, train=dict(amp="auto")), cpu) == torch.bfloat16

    # one step under it: G and D compute in bf16; weights, optimizer state and losses stay float32
    cfg = tiny_cfg(tmp_path, train=dict(amp="bf16"))
    state = build_state(cfg, cpu, 1e-3, 1e-3)
    outputs = []
    state.g.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    state.d.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    before = params_of(state.g)
    diag = gan_step(state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), update_g=True)
    assert outputs and set(outputs) == {torch.bfloat16}
    assert changed(before, state.g) and all(p.dtype == torch.float32 for p in state.g.parameters())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in diag.values())
    assert all(s.dtype == torch.float32 for group in state.opt_g.state.values() for s in group.values())


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_auto_widths_are_what_the_networks_are_built_with(tmp_path, arch):
    for size, width in ((32, 64), (64, 32)):
        cfg = resolve_paths(from_dict({"data": {"image_size": size}, "model": {"arch": arch}}), tmp_path)
        g, d = build_generator(cfg), build_discriminator(cfg)
        assert g.width == width
        first = next(m for m in d.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.out_channels == width
        last = [m for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
        assert last.in_channels == width and last.out_channels == cfg.data.channels


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("size, channels", [(16, 1), (32, 3), (64, 1), (128, 3)])
def test_model_shapes(tmp_path, size, channels, arch):
    cfg = resolve_paths(
        from_dict(
            {
                "data": {"image_size": size, "channels": channels},
                "model": {"latent_dim": 8, "g_width": 4, "d_width": 4, "arch": arch},
            }
        ),
        tmp_path,
    )
    g, d = build_generator(cfg), build_discriminator(cfg)
    x = g(torch.randn(3, 8))
    assert x.shape == (3, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3,)
    cg, cd = build_generator(cfg, 5), build_discriminator(cfg, 5)  # class-conditional
    code = torch.cat([torch.randn(3, 8), torch.eye(5)[[0, 2, 4]]], dim=1)
    assert cg(code).shape == (3, channels, size, size) and cd(cg(code), code[:, 8:]).shape == (3,)


def test_resnet_discriminator_has_no_batchnorm_and_spectral_norm_on_every_layer(tmp_path):
    cfg = resolve_paths(from_dict({"model": {"arch": "resnet", "spectral_norm": True, "d_width": 4}}), tmp_path)
    d = build_discriminator(cfg, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    weighted = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert weighted and all(hasattr(m, "parametrizations") for m in weighted)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_resnet_step_updates_both_networks(tmp_path, loss):
    cfg = tiny_cfg(tmp_path, train=dict(loss=loss))
    cfg.model.arch = "resnet"
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3, [0.5, 0.5])
    g0, d0 = params_of(state.g), params_of(state.d)
    diag = gan_step(
        state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), True, torch.tensor([0, 1] * 4)
    )
    assert changed(g0, state.g) and changed(d0, state.d) and all(torch.isfinite(v) for v in diag.values())


def test_spectral_norm_discriminator_has_no_batchnorm(tmp_path):
    cfg = resolve_paths(from_dict({"model": {"spectral_norm": True}}), tmp_path)
    d = build_discriminator(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    assert any(hasattr(m, "parametrizations") for m in d.modules())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_step_updates_both_networks(tmp_path, loss):
    cfg = tiny_cfg(tmp_path, train=dict(loss=loss))
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    g0, d0, ema0 = params_of(state.g), params_of(state.d), params_of(state.ema_g)
    diag = gan_step(state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), update_g=True)
    assert changed(g0, state.g) and changed(d0, state.d) and changed(ema0, state.ema_g)
    assert set(diag) == {"loss_d", "loss_g", "d_real", "d_fake", "rt"}
    assert all(torch.isfinite(v) for v in diag.values())
    assert 0 < diag["d_real"] < 1 and 0 < diag["d_fake"] < 1
    assert state.g_steps == 1


def test_the_d_step_leaves_g_alone(tmp_path):
    """With update_g=False only D moves, and G's gradients are exactly what they were."""
    cfg = tiny_cfg(tmp_path)
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    for p in state.g.parameters():
        p.grad = torch.full_like(p, 0.5)
    g0 = params_of(state.g)
    d0 = params_of(state.d)
    diag = gan_step(state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), update_g=False)
    assert not changed(g0, state.g)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in state.g.parameters())
    assert changed(d0, state.d)
    assert torch.isnan(diag["loss_g"]) and state.g_steps == 0


def test_bce_losses_match_the_paper():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    d_loss, g_loss = LOSSES["bce"]
    expected_d = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(d_loss(real, fake), expected_d)
    assert torch.allclose(g_loss(fake), -torch.log(torch.sigmoid(fake)).mean())  # non-saturating
    h_d, h_g = LOSSES["hinge"]
    assert torch.allclose(h_d(real, fake), torch.tensor((0 + 2) / 2 + (1.5 + 0) / 2))
    assert torch.allclose(h_g(fake), torch.tensor(1.25))


def test_ema_moves_toward_the_model():
    model = torch.nn.Linear(2, 2)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.weight.clone()
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, before + 0.1 * (model.weight - before))


def test_ema_decay_warms_up_to_the_configured_value_within_the_default_run():
    from sklearn.datasets import load_digits

    from ganflow.artifacts import TRAIN
    from ganflow.budget import schedule_of
    from ganflow.config import load_config
    from ganflow.data import three_way_split
    from ganflow.gan_step import EMA_RAMPUP

    assert ema_decay_at(0.99, 0) == 0.0  # the first update copies G
    assert ema_decay_at(0.99, 100) == pytest.approx(0.5 ** (1 / (EMA_RAMPUP * 100)))  # half-life 10 steps
    assert all(ema_decay_at(0.99, n) <= ema_decay_at(0.99, n + 1) for n in range(3000))
    # the project's params on the digits: the configured decay is reached, and early enough that
    # the exported EMA averages with it for a good part of the run
    cfg = load_config(REPO / "params.yaml")
    split = three_way_split(load_digits().target, cfg.data.validation_fraction, cfg.data.test_fraction)
    plan = schedule_of(cfg.train, int((split == TRAIN).sum()))
    steps = plan.epochs * plan.images_per_epoch // cfg.train.batch_size
    assert ema_decay_at(cfg.train.ema_decay, steps) == pytest.approx(cfg.train.ema_decay)
    assert ema_decay_at(cfg.train.ema_decay, steps * 2 // 3) == pytest.approx(cfg.train.ema_decay)


def test_checkpoint_round_trip_restores_everything_and_the_config_lrs(tmp_path):
    cfg = tiny_cfg(tmp_path)
    state = build_state(cfg, torch.device("cpu"), 1e-3, 2e-3)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(3):
        gan_step(state, cfg, real, torch.Generator().manual_seed(1), update_g=True)
    state.epoch, state.step = 2, 6
    state.history = [{"epoch": 1, "loss_d": 1.0}, {"epoch": 2, "loss_d": 0.9}]
    (tmp_path / "ck").mkdir()
    save_checkpoint(state, cfg, tmp_path / "ck", {"run_id": "abc"})

    other = build_state(cfg, torch.device("cpu"), 5e-4, 5e-4)
    meta = load_checkpoint(other, cfg, tmp_path / "ck", lr_g=5e-4, lr_d=7e-4)
    assert meta["run_id"] == "abc" and meta["config"]["train"]["batch_size"] == 8
    assert (other.epoch, other.step, other.g_steps, other.starts) == (2, 6, 3, 2)
    for a, b in [(state.g, other.g), (state.d, other.d), (state.ema_g, other.ema_g)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert other.opt_g.state_dict()["state"][0]["step"] == state.opt_g.state_dict()["state"][0]["step"]
    # learning rates come from the config given now, not from the saved optimizer
    assert other.opt_g.param_groups[0]["lr"] == 5e-4 and other.opt_d.param_groups[0]["lr"] == 7e-4
    # with the same learning rates, both continue identically
    for opt, lr in ((state.opt_g, 5e-4), (state.opt_d, 7e-4)):
        opt.param_groups[0]["lr"] = lr
    for _ in range(2):
        a = gan_step(state, cfg, real, torch.Generator().manual_seed(2), update_g=True)
        b = gan_step(other, cfg, real, torch.Generator().manual_seed(2), update_g=True)
        assert torch.equal(a["loss_d"], b["loss_d"]) and torch.equal(a["loss_g"], b["loss_g"])
    assert all(torch.equal(x, y) for x, y in zip(state.ema_g.parameters(), other.ema_g.parameters()))


def test_r1_penalty_is_the_squared_input_gradient():
    from ganflow.losses import r1_penalty

    w = torch.randn(1, 2, 3, 3, requires_grad=True)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = (x * w).flatten(1).sum(1) * 2.0  # D(x) = 2 <w, x>: grad 2w for every image
    penalty = r1_penalty(logits, x)
    assert torch.allclose(penalty, 4 * w.detach().pow(2).sum())
    penalty.backward()  # the graph is kept: the penalty trains D's weights (d/dw 4|w|^2 = 8w)
    assert torch.allclose(w.grad, 8 * w.detach())


def test_lazy_r1_changes_the_d_step_only_every_r1_every_steps(tmp_path):
    real = torch.rand(8, 1, 16, 16) * 2 - 1

    def d_after_step(step: int, gamma: float):
        cfg = tiny_cfg(tmp_path, train=dict(r1_gamma=gamma, r1_every=4))
        state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
        state.step = step
        diag = gan_step(state, cfg, real, torch.Generator().manual_seed(0), update_g=False)
        return params_of(state.d), diag["loss_d"]

    plain, plain_loss = d_after_step(0, 0.0)
    penalised, penalised_loss = d_after_step(0, 10.0)
    skipped, _ = d_after_step(1, 10.0)
    assert any(not torch.equal(a, b) for a, b in zip(plain, penalised))  # step 0: R1 applied
    assert all(torch.equal(a, b) for a, b in zip(plain, skipped))  # step 1: not an R1 step
    assert torch.equal(plain_loss, penalised_loss)  # the logged loss_d is the loss, not the penalty


def test_the_resume_key_follows_the_training_code_and_the_encoder(tmp_path):
    """A checkpoint written by other training code, or whose best_fd another encoder measured,
    is not resumed: the run name changes with either, while its params part stays."""
    import json
    import shutil
    from pathlib import Path

    import ganflow
    from ganflow.artifacts import FORMAT
    from ganflow.checkpoints import run_name, stale_runs

    cfg = tiny_cfg(tmp_path)
    cfg.paths.prepared.mkdir(parents=True)
    (cfg.paths.prepared / "manifest.json").write_text(json.dumps({"format": FORMAT, "images_sha256": "abc"}))
    cfg.paths.encoder.mkdir(parents=True)
    for name in ("encoder.safetensors", "reference.safetensors"):
        (cfg.paths.encoder / name).write_bytes(b"v1")
    code = tmp_path / "code"
    shutil.copytree(Path(ganflow.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))

    first = run_name(cfg, 1e-3, 1e-3, code)
    assert first == run_name(cfg, 1e-3, 1e-3, code)  # deterministic: that is how resume finds it
    with open(code / "losses.py", "a") as fh:
        fh.write("\n# a fix\n")
    after_fix = run_name(cfg, 1e-3, 1e-3, code)
    (cfg.paths.encoder / "reference.safetensors").write_bytes(b"v2")
    new_encoder = run_name(cfg, 1e-3, 1e-3, code)
    assert len({first, after_fix, new_encoder}) == 3
    # metrics choose the best tick, and so what is exported: their code is in the key (the
    # hand-kept list it replaced had left metrics.py out); the sweep's and the registry's are not
    with open(code / "metrics.py", "a") as fh:
        fh.write("\n# a fix\n")
    new_encoder, before = run_name(cfg, 1e-3, 1e-3, code), new_encoder
    assert new_encoder != before
    for name in ("tuning.py", "registry.py", "cli.py"):
        with open(code / name, "a") as fh:
            fh.write("\n# an edit\n")
    assert run_name(cfg, 1e-3, 1e-3, code) == new_encoder
    assert first.rsplit("-", 1)[0] == after_fix.rsplit("-", 1)[0] == new_encoder.rsplit("-", 1)[0]
    assert run_name(cfg, 2e-3, 1e-3, code).rsplit("-", 1)[0] != first.rsplit("-", 1)[0]  # other params
    other = cfg.model_copy(deep=True)
    other.train.seed += 1
    assert run_name(other, 1e-3, 1e-3, code) != new_encoder
    other = cfg.model_copy(deep=True)  # how it runs, not what it computes: the same run, resumed
    other.train.checkpoint_every, other.train.max_failures, other.train.kimg = 5, 0, cfg.train.kimg * 2
    assert run_name(other, 1e-3, 1e-3, code) == new_encoder
    other.train.epochs = 7  # the budget in the old unit: the same run too
    assert run_name(other, 1e-3, 1e-3, code) == new_encoder

    # the old run's checkpoint is kept and named; another params' run is not
    storage = tmp_path / "ray_results"
    for name, epoch in ((first, 3), (run_name(cfg, 2e-3, 1e-3, code), 5)):
        (storage / name / "checkpoint_000002").mkdir(parents=True)
        (storage / name / "checkpoint_000002" / "meta.json").write_text(json.dumps({"epoch": epoch}))
    assert stale_runs(str(storage), new_encoder) == [(first, 3)]
    assert stale_runs(str(storage), first) == []


def test_sync_batchnorm_only_on_cuda_ranks_and_keeps_params_and_keys(tmp_path):
    assert synced_batchnorm(2, torch.device("cuda")) and not synced_batchnorm(1, torch.device("cuda"))
    assert not synced_batchnorm(2, torch.device("cpu"))  # torch has no SyncBatchNorm for CPU tensors
    cfg = tiny_cfg(tmp_path)
    for g in (build_generator(cfg), build_generator(cfg, 10), build_discriminator(cfg)):
        keys, params = list(g.state_dict()), list(g.parameters())
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(g)
        converted = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert converted and not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
        # the optimizers built on the old modules keep training the same tensors, and a checkpoint
        # or an export of either loads into the other
        assert list(synced.state_dict()) == keys and all(a is b for a, b in zip(synced.parameters(), params))


def test_mode_seeking_penalty_is_code_gap_over_image_gap():
    from ganflow.gan_step import mode_seeking_penalty

    z = torch.zeros(4, 3)
    z[2:] = 2.0  # every pair (i, i + 2) differs by 2 in each code entry
    fake = torch.zeros(4, 1, 2, 2)
    fake[2:] = 0.5  # and by 0.5 in each pixel
    assert torch.isclose(mode_seeking_penalty(fake, z), torch.tensor(2.0 / 0.5), rtol=1e-4)
    fake[2:] = 0.0  # two codes, one image: the collapse it penalises
    assert mode_seeking_penalty(fake, z) > 1e4


def test_mode_seeking_adds_to_g_loss_only_and_pairs_classes(tmp_path):
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])

    class Recorder(torch.nn.Module):  # G, remembering the codes (z and class) it was given
        def __init__(self, g):
            super().__init__()
            self.g, self.codes = g, []

        def forward(self, z):
            self.codes.append(z.detach().clone())
            return self.g(z)

    def step(weight: float, prior=None, update_g=True):
        cfg = tiny_cfg(tmp_path, train=dict(mode_seeking=weight))
        torch.manual_seed(0)
        state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3, prior)
        state.g = Recorder(state.g)
        diag = gan_step(
            state, cfg, real, torch.Generator().manual_seed(0), update_g=update_g, labels=labels if prior else None
        )
        return state, diag

    plain, plain_diag = step(0.0)
    seeking, seeking_diag = step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.d.parameters(), seeking.d.parameters()))  # D: the same
    assert any(not torch.equal(a, b) for a, b in zip(plain.g.parameters(), seeking.g.parameters()))  # G: pushed
    assert torch.equal(plain_diag["loss_g"], seeking_diag["loss_g"])  # the logged loss is the adversarial one

    prior = [0.2] * 5
    state, _ = step(1.0, prior)
    classes = state.g.codes[0][:, 8:].argmax(1)
    assert torch.equal(classes[4:], classes[:4]) and torch.equal(classes[:4], labels[:4])  # pairs of one class
    state, _ = step(1.0, prior, update_g=False)  # a D-only step draws the fakes at the real classes
    assert torch.equal(state.g.codes[0][:, 8:].argmax(1), labels)
    state, _ = step(0.0, prior)
    assert torch.equal(state.g.codes[0][:, 8:].argmax(1), labels)


def test_mode_seeking_auto_is_on_for_a_conditional_g_only(tmp_path):
    """train.mode_seeking auto: the conditional G's weight (MODE_SEEKING_AUTO), and none for an
    unconditional G, whose G step then equals an explicit 0's; a number is used as it is."""
    from ganflow.config import MODE_SEEKING_AUTO

    auto = tiny_cfg(tmp_path, train=dict(mode_seeking="auto"))
    assert auto.mode_seeking_weight(conditional=True) == MODE_SEEKING_AUTO > 0
    assert auto.mode_seeking_weight(conditional=False) == 0.0
    assert tiny_cfg(tmp_path, train=dict(mode_seeking=0.3)).mode_seeking_weight(conditional=False) == 0.3
    assert build_state(auto, torch.device("cpu"), 1e-3, 1e-3, [0.5, 0.5]).mode_seeking == MODE_SEEKING_AUTO

    real = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])

    def trained(weight, prior=None):
        cfg = tiny_cfg(tmp_path, train=dict(mode_seeking=weight))
        state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3, prior)
        gan_step(state, cfg, real, torch.Generator().manual_seed(0), update_g=True, labels=labels if prior else None)
        return list(state.g.parameters())

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    unconditional = trained("auto")
    assert same(unconditional, trained(0.0))  # auto: as 0
    assert not same(unconditional, trained(MODE_SEEKING_AUTO))  # (the term does move G)
    conditional = trained("auto", [0.5, 0.5])
    assert same(conditional, trained(MODE_SEEKING_AUTO, [0.5, 0.5]))  # a labelled set trains as before
    assert not same(conditional, trained(0.0, [0.5, 0.5]))
    with pytest.raises(Exception, match="mode_seeking"):
        tiny_cfg(tmp_path, train=dict(mode_seeking="on"))


def test_each_tick_is_scored_on_the_mean_of_several_fixed_latent_draws(tmp_path, monkeypatch):
    """The exported tick and the sweep's objective rest on evaluate_ema: eval.tick_draws draws,
    the same vectors at every tick, the first draw the one a single-draw evaluation uses."""
    import types

    import numpy as np

    from ganflow import train_loop

    seen: list[torch.Tensor] = []
    monkeypatch.setattr(train_loop, "encode", lambda encoder, images: (images.flatten(1).numpy(), None))

    class Split:
        draw_size, draw_counts = 6, [3, 3]

    def quick(features, asked=None):
        seen.append(torch.as_tensor(features))
        return {"fd_domain": float(np.abs(features).mean()), "kid": float(features.mean()), "kid_std": 0.0}

    reference = types.SimpleNamespace(split=Split(), quick=quick, encoder=None)
    calls: list[int] = []

    def ema_g(z: torch.Tensor) -> torch.Tensor:
        calls.append(len(z))
        return z[:, :4]

    state = types.SimpleNamespace(ema_g=ema_g, device=torch.device("cpu"), prior=None)

    def evaluate(draws: int) -> dict:
        seen.clear()
        cfg = tiny_cfg(tmp_path, eval=dict(tick_draws=draws, tick_samples=1))
        return train_loop.evaluate_ema(state, cfg, reference)

    one = evaluate(1)
    first = seen[0]
    three = evaluate(3)
    assert len(seen) == 3 and torch.equal(seen[0], first)  # draw 1 is the single-draw evaluation's
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])  # fresh vectors per draw
    assert three["fd_domain"] == pytest.approx(np.mean([float(s.abs().mean()) for s in seen]))
    assert three["fd_domain"] != one["fd_domain"]
    again = evaluate(3)
    assert again == three  # every tick sees the same vectors
    assert calls[-1] == 3 * 6  # the draws went through G as one batch, not one call each
    assert evaluate(100) == evaluate(100)  # 600 samples: in batches of train_loop.INFERENCE_BATCH
    assert calls[-5:] == [128, 128, 128, 128, 88] and train_loop.INFERENCE_BATCH == 128
    assert len(seen) == 100 and all(len(s) == 6 for s in seen)
    # a small split's draws (6 samples here) are added up to eval.tick_samples
    assert train_loop.tick_draws(tiny_cfg(tmp_path, eval=dict(tick_draws=3, tick_samples=20)), 6) == 4
    assert train_loop.tick_draws(tiny_cfg(tmp_path, eval=dict(tick_draws=3, tick_samples=20)), 538) == 3
