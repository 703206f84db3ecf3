"""The class-conditional generator and discriminator (model.conditional), without Ray: what the
class does to G and D, the classes drawn at the data's frequencies, export and sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ganflow.artifacts import class_prior
from ganflow.config import from_dict, resolve_paths
from ganflow.data import prepare
from ganflow.errors import GanflowError
from ganflow.gan_step import build_state, gan_step
from ganflow.models import allocate, build_discriminator, build_generator, class_grid_codes, draw_codes
from ganflow.sampling import export_generator, load_generator_dir, load_sampler, sample
from tests.conftest import tiny_cfg


def test_allocate_follows_the_prior_exactly():
    classes = allocate([0.5, 0.3, 0.2], 10)
    assert classes.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    counts = np.bincount(allocate([1, 1, 1], 100).numpy())
    assert counts.sum() == 100 and counts.max() - counts.min() == 1  # largest remainder, not drawn
    assert np.bincount(allocate([0.0, 1.0], 7).numpy(), minlength=2).tolist() == [0, 7]


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_the_class_changes_what_g_draws_and_how_d_judges(tmp_path, spectral_norm):
    cfg = tiny_cfg(tmp_path, model=dict(spectral_norm=spectral_norm))
    torch.manual_seed(0)
    g, d = build_generator(cfg, 10), build_discriminator(cfg, 10)
    assert g.code_dim == 18
    with torch.no_grad():  # conditional BatchNorm starts neutral: give its class weights a value
        for m in g.modules():
            if hasattr(m, "gain"):
                m.gain.weight.normal_(0, 0.5)
    g.eval()
    z = torch.randn(4, 8)
    codes = [torch.cat([z, torch.nn.functional.one_hot(torch.full((4,), k), 10).float()], 1) for k in (3, 7)]
    with torch.no_grad():
        a, b = g(codes[0]), g(codes[1])
        assert a.shape == (4, 1, 16, 16) and not torch.allclose(a, b)
        x = torch.rand(4, 1, 16, 16) * 2 - 1
        assert not torch.allclose(d(x, codes[0][:, 8:]), d(x, codes[1][:, 8:]))
    # unconditional networks keep the layers and state-dict keys exported generators have
    plain = build_generator(cfg)
    assert not any("gain" in k for k in plain.state_dict()) and plain.code_dim == 8


def test_a_conditional_step_trains_the_class_weights(tmp_path):
    cfg = tiny_cfg(tmp_path)
    prior = [0.1] * 10
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3, prior)
    gains = [m.gain.weight.detach().clone() for m in state.g.modules() if hasattr(m, "gain")]
    embed = state.d.embed.weight.detach().clone()
    labels = torch.arange(8)
    diag = gan_step(state, cfg, torch.rand(8, 1, 16, 16) * 2 - 1, torch.Generator().manual_seed(0), True, labels)
    assert all(torch.isfinite(v) for v in diag.values())
    after = [m.gain.weight for m in state.g.modules() if hasattr(m, "gain")]
    assert any(not torch.equal(a, b) for a, b in zip(gains, after)) and not torch.equal(embed, state.d.embed.weight)


def test_class_prior_follows_model_conditional(tmp_path):
    cfg = resolve_paths(from_dict({"data": {"image_size": 16}}), tmp_path)
    prepare(cfg)
    assert class_prior(cfg) is None  # the default: unconditional
    cfg.model.conditional = "auto"
    names, prior = class_prior(cfg)
    manifest = json.loads((cfg.paths.prepared / "manifest.json").read_text())
    train = [manifest["split"]["train_class_counts"][n] for n in names]
    assert names == [str(i) for i in range(10)] and prior == pytest.approx(np.array(train) / sum(train))
    assert sum(train) == manifest["split"]["train"]


def test_conditional_true_on_unlabelled_data_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((16, 16), i * 5, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = resolve_paths(
        from_dict(
            {"data": {"image_size": 16, "source": "folder", "path": str(folder)}, "model": {"conditional": True}}
        ),
        tmp_path,
    )
    prepare(cfg)
    with pytest.raises(GanflowError, match="model.conditional: true needs labelled data"):
        class_prior(cfg)
    cfg.model.conditional = "auto"
    assert class_prior(cfg) is None


def test_exported_conditional_generator_samples_by_class(tmp_path):
    cfg = tiny_cfg(tmp_path)
    g = build_generator(cfg, 3).eval()
    spec = {
        "latent_dim": 8,
        "channels": 1,
        "image_size": 16,
        "g_width": 8,
        "num_classes": 3,
        "class_names": ["cat", "dog", "owl"],
        "class_prior": [0.5, 0.25, 0.25],
    }
    export_generator(g.state_dict(), spec, tmp_path / "gen")
    assert load_generator_dir(tmp_path / "gen").num_classes == 3
    sampler = load_sampler(str(tmp_path / "gen"))
    codes = sampler.codes(8, seed=0)
    assert codes.shape == (8, 11) and codes[:, 8:].sum(0).tolist() == [4.0, 2.0, 2.0]  # at the prior
    assert (sampler.codes(5, 0, sampler.class_index("dog"))[:, 9] == 1).all()
    assert sampler.class_index("2") == 2
    with pytest.raises(GanflowError, match="'bird' is not one of this generator's classes \\(cat, dog, owl\\)"):
        sampler.class_index("bird")
    owls = sample(str(tmp_path / "gen"), 4, seed=1, class_name="owl")
    with torch.no_grad():
        expected = g(torch.from_numpy(sampler.codes(4, 1, 2)))
    assert (
        owls.shape == (4, 16, 16, 1)
        and np.abs(owls.astype(int) - ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()).max()
        <= 1
    )


def test_a_conditional_generator_of_the_old_layout_is_refused_in_one_line(tmp_path):
    """Conditional DCGAN generators exported before G's first layer took the class (its first
    weight was (latent_dim, ...)) cannot load into this version: a clear refusal, not a traceback."""
    cfg = tiny_cfg(tmp_path)
    old = {k: v[:8] if k == "net.0.weight" else v for k, v in build_generator(cfg, 3).state_dict().items()}
    spec = {
        "latent_dim": 8,
        "channels": 1,
        "image_size": 16,
        "g_width": 8,
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "class_prior": [0.4, 0.3, 0.3],
    }
    export_generator(old, spec, tmp_path / "gen")
    with pytest.raises(GanflowError, match="do not fit this version's dcgan generator .*export it again") as info:
        load_generator_dir(tmp_path / "gen")
    assert "\n" not in str(info.value)


def test_class_option_on_an_unconditional_generator_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path)
    export_generator(
        build_generator(cfg).state_dict(),
        {"latent_dim": 8, "channels": 1, "image_size": 16, "g_width": 8},
        tmp_path / "gen",
    )
    with pytest.raises(GanflowError, match="--class: this generator is not class-conditional"):
        sample(str(tmp_path / "gen"), 2, seed=0, class_name="3")


def test_class_grid_has_a_row_per_class():
    codes = class_grid_codes(4, 3, 2, torch.Generator().manual_seed(0))
    assert codes[:, 4:].argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    z = draw_codes(6, 4, [1, 2], torch.Generator().manual_seed(0))
    assert z[:, 4:].argmax(1).tolist() == [0, 0, 1, 1, 1, 1]


def test_an_exported_resnet_generator_loads_as_one(tmp_path):
    from ganflow.models import ResnetGenerator

    cfg = tiny_cfg(tmp_path, model=dict(arch="resnet"))
    g = build_generator(cfg, 2).eval()
    spec = {
        "latent_dim": 8,
        "channels": 1,
        "image_size": 16,
        "g_width": 8,
        "num_classes": 2,
        "arch": "resnet",
        "class_names": ["a", "b"],
        "class_prior": [0.5, 0.5],
    }
    export_generator(g.state_dict(), spec, tmp_path / "gen")
    loaded = load_generator_dir(tmp_path / "gen")
    assert isinstance(loaded, ResnetGenerator)
    code = torch.from_numpy(load_sampler(str(tmp_path / "gen")).codes(4, seed=0))
    with torch.no_grad():
        assert torch.equal(loaded(code), g(code))
    export_generator(g.state_dict(), {**spec, "arch": "vit"}, tmp_path / "bad")
    with pytest.raises(GanflowError, match="unknown arch 'vit'"):
        load_generator_dir(tmp_path / "bad")
