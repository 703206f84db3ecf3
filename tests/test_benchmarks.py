"""Every benchmark keeps running: each script in benchmarks/ in its tiny mode (--smoke), end to end
(real Ray, real training, its own scratch data), and its table printed with figures in it."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, run

pytestmark = pytest.mark.slow

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
# script -> lines its table must hold (each with a figure), as regular expressions
EXPECTED = {
    "train_throughput.py": [
        rf"bare loop, 1 process, \d+ threads\s+{NUMBER} img/s",
        rf"bare loop, \d+ threads, float32 \(amp off\)\s+{NUMBER} img/s\s+x{NUMBER}",
        rf"train stage, steps only\s+{NUMBER} img/s\s+x{NUMBER} bare",
        rf"train stage, whole epochs\s+{NUMBER} img/s\s+x{NUMBER} bare",
        rf"fixed cost \(start-up, export\)\s+-?{NUMBER} s",
    ],
    "eval_protocol.py": [
        rf"real vs real\s+fd_domain\s+{NUMBER} ± {NUMBER}",
        r"verbatim copies .* flagged 1",
        r"30 % copies .* flagged 1",
        r"held-out real .*: flagged 0",
        rf"pixel judge\s+8x8-pixel FD {NUMBER}",
        rf"cost\s+evaluation {NUMBER} s",
    ],
    "scaling.py": [rf"1 worker, 1 node\s+{NUMBER}\s+1\.00", rf"2 workers, 2 nodes\s+{NUMBER}\s+{NUMBER}"],
    "tune_efficiency.py": [
        rf"sweep sha fd_class 2x2\.4 \+ train\s+\S+\s+\S+\s+{NUMBER} ±\s+nan\s+{NUMBER}\s+[01]\s+{NUMBER}\s+\d+\s+(?:{NUMBER}|-)\n",
        rf"fixed 0\.0002\s+0\.0002\s+0\.0002\s+{NUMBER} ±\s+nan",
        rf"sweep sha fd_class 2x2\.4 \+ train: {NUMBER} kimg of trials = {NUMBER}x one training's {NUMBER} kimg",
        r"compare\.json: seeds \[0\], tick_draws \d+, \d+ s, at \w+",
        r"rank agreement with the full budget \(2 ticks of 1 kimg\), over 4 grid points",
        rf"\n\s+2\s+2\.0\s+-?{NUMBER}\s+(?:-?{NUMBER}|nan)\n",
        r"grid wall time \d+ s",
        r"grid\.json: seeds \[0\], tick_draws \d+, \d+ s, at \w+",
    ],
    "quality.py": [
        r"digits: the project's prepared digits",
        rf"default\s+{NUMBER} kimg\s+{NUMBER}\s+{NUMBER}\s+-?{NUMBER}\s+{NUMBER}\s+{NUMBER}",
    ],
    "scale.py": [
        rf"600 parallel \(auto\)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
        rf"600 single process\s+{NUMBER}\s+1\.00\s+{NUMBER}",
        r"peak RSS growth 300 -> 600",
        rf"the train stage, one epoch[^\n]*\n[^\n]*\n\s*600\s+{NUMBER}\s+{NUMBER}",
    ],
    "inference_batch.py": [
        rf"digits, 32 px, conditional \(smoke: 16 px\)\s+one draw\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x",
        rf"100 images, 64 px RGB \(smoke: 16 px\)\s+128\s+{NUMBER}\s+{NUMBER}\s+1\.00x",
    ],
    "prepare_speed.py": [rf"\s+0\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"],
    "soak.py": [
        rf"run-1: exit 0, {NUMBER} min, worker restarts 0 \(-\), cleaner/worker-group lines in the log 1",
        r"1 loaded runs: 0 worker restart\(s\) in all; all exited 0",
    ],
    "cpu_share.py": [rf"other\s+{NUMBER}\s+{NUMBER}%", rf"training workers\s+{NUMBER}\s+{NUMBER}%"],
}


def test_every_benchmark_script_is_covered():
    scripts = [p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")]  # _: helpers
    assert sorted(scripts) == sorted(EXPECTED)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_in_smoke_mode(script: str, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each script starts its own Ray
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # the scripts' default --params, as in the repo
    proc = run([str(BIN / "python"), str(REPO / "benchmarks" / script), "--smoke"], tmp_path, timeout=1500, env=env)
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    for pattern in EXPECTED[script]:
        assert re.search(pattern, proc.stdout), f"{script}: no line matching {pattern!r} in:\n{proc.stdout}"


def test_quality_probes_the_rows_in_turn_and_takes_the_median(monkeypatch):
    """--budget-s: every row's update speed is probed before any training, the rows taking turns
    in each of 3 rounds, and each row gets the median of its own probes."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    readings = {"default": iter([3.0, 1.0, 2.0]), "before": iter([5.0, 4.0, 9.0])}
    calls = []

    def probe(cfg):
        calls.append(cfg)
        return next(readings[cfg])

    monkeypatch.setattr(quality, "seconds_per_kimg", probe)
    assert quality.probe_rows(["default", "before"]) == [2.0, 5.0]
    assert calls == ["default", "before"] * 3


def test_every_quality_row_is_a_valid_params_file(monkeypatch):
    """Each variant of quality.py names keys and values the config accepts, and changes it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality

    from ganflow.config import load_config

    cfg = load_config(REPO / "params.yaml")
    for name, changes in quality.VARIANTS.items():
        row = quality.row_cfg(cfg, name)
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            assert getattr(getattr(row, section), key) == value, (name, dotted)


def test_quality_refuses_a_set_it_cannot_build_before_training_any(monkeypatch, capsys):
    """A run over several sets checks each set's source package first: without scikit-image the
    faces would fail only after the sets before them had trained."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import _scratch
    import quality

    real_find_spec = _scratch.importlib.util.find_spec
    monkeypatch.setattr(
        _scratch.importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real_find_spec(name, *a)
    )
    assert _scratch.dataset_unavailable("faces-100-64") == (
        "faces-100-64 reads scikit-image's bundled LFW subset: pip install scikit-image"
    )
    assert _scratch.dataset_unavailable("digits-100") is None

    def no_training(*_args, **_kwargs):
        raise AssertionError("a set was prepared before the check")

    monkeypatch.setattr(quality, "dataset_cfg", no_training)
    monkeypatch.setattr(
        sys, "argv", ["quality.py", "--params", str(REPO / "params.yaml"), "--dataset", "digits-100,faces-100"]
    )
    assert quality.main() == 2
    assert capsys.readouterr().err.strip() == (
        "error: faces-100 reads scikit-image's bundled LFW subset: pip install scikit-image"
    )
