"""The typed config: every bad params file is refused with one line naming file, key, reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ganflow.config import Config, ConfigError, load_config
from tests.conftest import REPO, run


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_project_params_file_loads_and_resolves_paths():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.source == "digits"
    assert cfg.paths.prepared == REPO / "data" / "prepared"
    assert all(p.is_absolute() for p in cfg.paths.model_dump().values())
    # every key of the file is a key of the config and the values round-trip
    assert Config.model_validate(yaml.safe_load((REPO / "params.yaml").read_text())).train == cfg.train


def test_copies_keep_where_the_config_came_from(tmp_path):
    """Every derived config (a trial's, a resolved one, a worker's) is a model_copy: the project
    root and params file it was loaded from travel with it, and nothing sets them again."""
    params = tmp_path / "params.yaml"
    params.write_text("train: {seed: 3}\n")
    cfg = load_config(params)
    copies = [cfg.model_copy(deep=True), cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 4})})]
    for copy in copies:
        assert (copy.root, copy.source) == (tmp_path, params)


def test_empty_file_gives_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.train == Config().train
    assert cfg.paths.prepared == tmp_path.resolve() / "data" / "prepared"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  lr_gg: 0.1\n", "params.yaml: train.lr_gg: unknown key"),
        ("trian:\n  epochs: 1\n", "params.yaml: trian: unknown key"),
        ("train:\n  lr_g: 0\n", "params.yaml: train.lr_g: must be > 0"),
        ("train:\n  lr_g: -1e-3\n", "params.yaml: train.lr_g: must be > 0"),
        ("train:\n  epochs: ten\n", "params.yaml: train.epochs: must be an integer, got 'ten'"),
        ("train:\n  epochs: 2.5\n", "params.yaml: train.epochs: must be an integer, got 2.5"),
        ("train:\n  lr_d: fast\n", "params.yaml: train.lr_d: must be a number, got 'fast'"),
        ("cluster:\n  use_gpu: maybe\n", "params.yaml: cluster.use_gpu: must be true or false, got 'maybe'"),
        ("data:\n  source: s3\n", "params.yaml: data.source: must be one of 'digits', 'folder' or 'npz', got 's3'"),
        ("data:\n  channels: 2\n", "params.yaml: data.channels: must be one of 1 or 3, got 2"),
        ("data:\n  image_size: 48\n", "params.yaml: data.image_size: must be a power of two from 16 to 128"),
        ("data:\n  image_size: 8\n", "params.yaml: data.image_size: must be a power of two from 16 to 128"),
        ("data: 3\n", "params.yaml: data: must be a mapping of keys, got 3"),
        ("- a\n- b\n", "params.yaml: top level must be a mapping of sections, got list"),
        (
            "train:\n  batch_size: 10\ncluster:\n  num_workers: 4\n",
            "params.yaml: train.batch_size: must be divisible by cluster.num_workers (4)",
        ),
        ("tune:\n  lr_g_min: 1e-2\n  lr_g_max: 1e-3\n", "params.yaml: tune.lr_g_max: must be > lr_g_min (0.01)"),
        (
            "tune:\n  lr_g_min: 1e-3\n  lr_d_max: 1e-4\n  lr_g_over_d_max: 2\n",
            "params.yaml: tune.lr_g_over_d_max: leaves no pair to sample: lr_g_min (0.001) must be below 2 x "
            "lr_d_max (0.0001)",
        ),
        (
            "tune:\n  scheduler: pbt\n  search: optuna\n",
            "params.yaml: tune.search: pbt explores the rates itself: use random or grid with it",
        ),
        (
            "tune:\n  scheduler: pbt\ncluster:\n  num_workers: 2\n",
            "params.yaml: tune.scheduler: pbt needs one-worker trials (cluster.num_workers: 1); use asha (or auto) "
            "with several workers",
        ),
        (
            "tune:\n  scheduler: sha\ncluster:\n  num_workers: 2\n",
            "params.yaml: tune.scheduler: sha needs one-worker trials (cluster.num_workers: 1); use asha (or auto) "
            "with several workers",
        ),
        (
            "tune:\n  scheduler: bohb\n",
            "params.yaml: tune.scheduler: must be one of 'auto', 'sha', 'asha' or 'pbt', got 'bohb'",
        ),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(path) == expected.replace("params.yaml", str(path), 1)


def test_the_sweep_tries_the_train_rates_first_when_they_lie_in_its_range(tmp_path):
    def first(text: str):
        return load_config(write(tmp_path, text)).sweep_first_trial

    assert first("train:\n  lr_g: 3.0e-4\n  lr_d: 4.0e-4\n") == [{"lr_g": 3e-4, "lr_d": 4e-4}]
    assert first("tune:\n  search: optuna\n") == [{"lr_g": 5e-4, "lr_d": 5e-4}]
    assert first("tune:\n  include_train_rates: false\n") == []
    assert first("tune:\n  search: grid\n") == []  # a grid has its own points
    assert first("tune:\n  lr_d_min: 1.0e-3\n") == []  # 5e-4 is outside the lr_d range: not forced in
    assert first("train:\n  lr_g: 1.0e-2\n") == [{"lr_g": 1e-2, "lr_d": 5e-4}]  # the range's ends count


def test_a_grid_runs_every_pair_of_its_points(tmp_path):
    cfg = load_config(write(tmp_path, "tune:\n  search: grid\n  grid_points: 3\n  num_samples: 4\n"))
    assert cfg.tune.trials == 9
    assert load_config(write(tmp_path, "tune:\n  num_samples: 4\n")).tune.trials == 4
    from ganflow.tuning import search_space

    text = "tune:\n  search: grid\n  grid_points: 4\n  lr_g_min: 1e-5\n  lr_g_max: 1e-2\n"
    assert search_space(load_config(write(tmp_path, text)))["lr_g"]["grid_search"] == pytest.approx(
        [1e-5, 1e-4, 1e-3, 1e-2]
    )


def test_several_errors_are_counted_on_one_line(tmp_path):
    message = error_of(write(tmp_path, "train:\n  lr_g: 0\n  lr_d: 0\n  epochs: 0\n"))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: train.")
    assert message.endswith("(and 2 more errors)")


def test_invalid_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "train: [1, 2\n")
    assert error_of(path).startswith(f"{path}: line ")
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `2e-4` as a string; users write it all the time
    assert load_config(write(tmp_path, "train:\n  lr_g: 2e-4\n")).train.lr_g == pytest.approx(2e-4)


def test_check_config_cli(tmp_path):
    good = run(["ganflow", "check-config", str(REPO / "params.yaml")], cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    printed = yaml.safe_load(good.stdout)
    assert printed["train"]["lr_g"] == pytest.approx(5e-4)
    assert printed["paths"]["prepared"] == str(REPO / "data" / "prepared")
    assert "# model widths at 32 px: G 64, D 64; tune.scheduler: sha" in good.stdout.splitlines()

    bad = write(tmp_path, "train:\n  lr_g: 0\n")
    proc = run(["ganflow", "check-config", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: train.lr_g: must be > 0"]
    assert "Traceback" not in proc.stderr


def test_cpus_per_worker_auto_shares_the_cpus_among_a_trainings_workers(tmp_path):
    from ganflow.config import from_dict, resolve_paths
    from ganflow.raycluster import cpus_for_workers
    from ganflow.tuning import trial_config

    def cfg(**cluster):
        return resolve_paths(from_dict({"cluster": cluster}), tmp_path)

    assert cfg().cluster.cpus_per_worker == "auto"
    assert cpus_for_workers(cfg(), [2.0]) == 2.0  # one worker: the whole machine
    assert cpus_for_workers(cfg(num_workers=2), [2.0]) == 1.0
    assert cpus_for_workers(cfg(num_workers=4), [4.0, 4.0]) == 2.0
    assert cpus_for_workers(cfg(), [4.0, 8.0]) == 8.0  # at most one node's: a worker runs on one node
    assert cpus_for_workers(cfg(num_workers=32), [2.0]) == 1.0  # too many workers: refused later, at 1 CPU each
    assert cpus_for_workers(cfg(cpus_per_worker=0.5), [2.0]) == 0.5  # a number is kept
    assert trial_config(cfg()).cluster.cpus_per_worker == 1.0  # trials run side by side
    with pytest.raises(Exception, match="cpus_per_worker"):
        cfg(cpus_per_worker="all")


def test_a_worker_computes_with_a_thread_per_cpu_at_most_omp_num_threads(monkeypatch):
    from ganflow.raycluster import worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [worker_threads(c) for c in (0.5, 1.0, 2.0, 8.0)] == [1, 1, 2, 8]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # set by whoever started Ray: a cap, never a floor
    assert [worker_threads(c) for c in (1.0, 2.0, 8.0)] == [1, 2, 2]
    for unusable in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert worker_threads(4.0) == 4


@pytest.mark.parametrize(("size", "width"), [(16, 64), (32, 64), (64, 32), (128, 16)])
def test_auto_widths_keep_the_4x4_layers_at_256_channels(size, width):
    """model.g_width/d_width auto: 2048 / image_size, at most 64. The 32 px digits keep the width
    they were tuned at; a 64 px net's finest layers are half as wide (it trains ~2.4x faster)."""
    from ganflow.config import from_dict

    assert from_dict({"data": {"image_size": size}}).net_widths == (width, width)
    given = from_dict({"data": {"image_size": size}, "model": {"g_width": 48}})
    assert given.net_widths == (48, width)
    for bad in (0, "x", 2.5, True):
        assert error_of_dict({"model": {"d_width": bad}}) == (
            f"params.yaml: model.d_width: must be auto or a whole number > 0, got {bad!r}"
        )


def test_resolved_params_say_what_the_auto_values_became():
    """What a run logs beside the params as written: per G, the auto values resolved."""
    from ganflow.config import from_dict

    rgb64 = from_dict({"data": {"image_size": 64, "channels": 3}, "train": {"mode_seeking": "auto"}})
    assert rgb64.resolved_params(conditional=False) == {
        "resolved.model.conditional": "False",
        "resolved.model.g_width": "32",
        "resolved.model.d_width": "32",
        "resolved.train.mode_seeking": "0.0",
        "resolved.train.augment_policy": "translation,cutout,color",
    }
    assert rgb64.resolved_params(conditional=True)["resolved.train.mode_seeking"] == "0.5"
    fixed = from_dict({"train": {"mode_seeking": 0.2, "augment_policy": "cutout"}})
    assert fixed.resolved_params(conditional=True)["resolved.train.mode_seeking"] == "0.2"
    assert fixed.resolved_params(conditional=False)["resolved.train.augment_policy"] == "cutout"
    off = from_dict({"train": {"augment": "none"}})
    assert off.resolved_params(conditional=False)["resolved.train.augment_policy"] == "none"


def test_consistency_needs_a_shift_of_a_pixel():
    """bCR's transform is a shift: one that rounds to 0 px would add nothing but its cost."""
    from ganflow.config import from_dict

    assert from_dict({"data": {"image_size": 32}, "train": {"consistency": 1.0}}).train.consistency == 1.0
    assert error_of_dict({"data": {"image_size": 16}, "train": {"consistency": 1.0, "augment_translation": 0.03}}) == (
        "params.yaml: train.consistency: needs a shift of at least 1 px, and train.augment_translation 0.03 "
        "x data.image_size 16 rounds to 0"
    )


def error_of_dict(values: dict) -> str:
    from ganflow.config import from_dict

    with pytest.raises(ConfigError) as info:
        from_dict(values)
    return str(info.value)
