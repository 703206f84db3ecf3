"""The CUDA path: one GPU worker, NCCL-free single rank, mixed precision. Runs only where CUDA is."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import run
from tests.test_training import TRAIN, final_meta, make_project, only_run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_short_gpu_training_with_amp(tmp_path):
    root = tmp_path / "p"
    params = make_project(root, cluster={"use_gpu": True}, train={"epochs": 2, "tick_kimg": 1.0, "amp": "auto"})
    proc = run([sys.executable, TRAIN, "--params", str(params)], cwd=root, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = final_meta(root)
    assert meta["device"].startswith("cuda")
    assert meta["amp"] in ("torch.bfloat16", "torch.float16")
    assert all(np.isfinite(row["loss_d"]) for row in meta["history"])
    client, r = only_run(root)
    assert r.info.status == "FINISHED"
    spec = json.loads((root / "models" / "generator" / "generator.json").read_text())
    assert spec["epoch"] == 2
