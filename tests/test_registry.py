"""The registry's champion rule: validation fd_domain is compared only between versions measured
the same way (same encoder, reference and eval.seed), a challenger must beat the champion by more
than their combined spread over latent draws, a flagged copier never wins, and two registers
racing against a real `mlflow server` end with the right champion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from ganflow.config import load_config
from ganflow.data import prepare
from ganflow.localcluster import free_port
from ganflow.models import Generator
from ganflow.registry import register
from ganflow.sampling import export_generator
from tests.conftest import REPO

NAME = "test-generator"


def log_generator(uri: str, artifacts: Path) -> str:
    """A tiny generator logged as an MLflow model (pt2) in a run of experiment ganflow; its run id."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("ganflow") is None:  # artifacts under tmp, not ./mlruns
        mlflow.create_experiment("ganflow", artifact_location=None if uri.startswith("http") else artifacts.as_uri())
    mlflow.set_experiment("ganflow")
    g = Generator(8, 1, 16, 8).eval()
    z = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with torch.no_grad():
        out = g(torch.from_numpy(z)).numpy()
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            g, name="generator", signature=infer_signature(z, out), input_example=z, pip_requirements=["torch"]
        )
    return run.info.run_id


def project(
    root: Path,
    uri: str,
    run_id: str,
    *,
    fd: float,
    weights_seed: int,
    encoder_seed: int = 0,
    copying: bool = False,
    sd: float = 0.05,
) -> Path:
    """A project with what the register stage reads: a prepared data set, an encoder's files, an
    exported generator (its own weights) of run ``run_id`` and its evaluation."""
    root.mkdir(parents=True)
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump({"data": {"image_size": 16}, "tracking": {"uri": uri}, "registry": {"model_name": NAME}})
    )
    cfg = load_config(params)
    prepare(cfg)
    cfg.paths.encoder.mkdir(parents=True)
    torch.manual_seed(encoder_seed)  # another seed: another encoder, another fd_domain scale
    save_file({"w": torch.randn(4, 4)}, str(cfg.paths.encoder / "encoder.safetensors"))
    save_file({"mu": torch.randn(4)}, str(cfg.paths.encoder / "reference.safetensors"))
    torch.manual_seed(weights_seed)
    export_generator(
        Generator(8, 1, 16, 8).state_dict(),
        {
            "latent_dim": 8,
            "channels": 1,
            "image_size": 16,
            "g_width": 8,
            "mlflow_run_id": run_id,
            "best_epoch": 1,
            "lr_g": 2e-4,
            "lr_d": 2e-4,
        },
        cfg.paths.generator,
    )
    cfg.paths.metrics.mkdir(parents=True)
    (cfg.paths.metrics / "eval.json").write_text(
        json.dumps(
            {
                "fd_domain": fd * 1.1,
                "fd_domain_sd": sd,
                "fd_domain_over_real": fd,
                "copying_flagged": float(copying),
                "validation": {"fd_domain": fd, "fd_domain_sd": sd, "fd_domain_over_real": fd},
            }
        )
    )
    return params


def champion(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(uri).get_model_version_by_alias(NAME, "champion").version)


def test_champion_is_the_best_of_the_versions_measured_like_the_newest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_generator(uri, tmp_path / "artifacts")

    def reg(name, **kw):
        return register(load_config(project(tmp_path / name, uri, run_id, **kw)))

    a = reg("a", fd=2.0, weights_seed=1)
    assert (a["version"], a["promoted"], champion(uri)) == (1, True, "1")
    # another encoder: its fd_domain is another scale; the newest's group has only it
    b = reg("b", fd=5.0, weights_seed=2, encoder_seed=1)
    assert b["eval_key"] != a["eval_key"] and b["champion_fd_domain_before"] is None
    assert (b["promoted"], champion(uri)) == (True, "2")
    # back on the first encoder: compared with version 1 only, and better
    c = reg("c", fd=1.5, weights_seed=3)
    assert (c["promoted"], c["champion_fd_domain_before"], champion(uri)) == (True, None, "3")
    d = reg("d", fd=3.0, weights_seed=4)  # worse than 3 on the same scale
    assert (d["promoted"], d["champion_version"], d["champion_fd_domain_before"], champion(uri)) == (False, 3, 1.5, "3")
    e = reg("e", fd=0.1, weights_seed=5, copying=True)  # flagged: never champion, however low
    assert (e["promoted"], champion(uri)) == (False, "3")
    # better, but within the two versions' combined spread (0.1 < hypot(0.2, 0.05)): the champion stays
    f = reg("f", fd=1.4, weights_seed=6, sd=0.2)
    assert (f["promoted"], f["champion_version"], champion(uri)) == (False, 3, "3")
    # better beyond the spread: promoted; the tags hold mean and sd, validation and test
    g = reg("g", fd=1.0, weights_seed=7)
    assert (g["promoted"], champion(uri)) == (True, "7")
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(uri).get_model_version(NAME, "7").tags
    assert (float(tags["validation_fd_domain"]), float(tags["validation_fd_domain_sd"])) == (1.0, 0.05)
    assert float(tags["fd_domain"]) == pytest.approx(1.1) and float(tags["fd_domain_sd"]) == 0.05
    # the same weights under another encoder are a new version, not the old one's measurement
    again = register(load_config(project(tmp_path / "a2", uri, run_id, fd=9.0, weights_seed=1, encoder_seed=1)))
    assert again["created"] and again["version"] == 8 and champion(uri) == "2"


@pytest.mark.server
@pytest.mark.timeout(900)
def test_two_registers_racing_on_a_tracking_server_end_with_the_best_champion(tmp_path):
    from ganflow.localcluster import _stop, start_mlflow_server

    port = free_port()
    server = start_mlflow_server(
        f"sqlite:///{tmp_path / 'server.db'}",
        port,
        tmp_path / "server.log",
        ["--artifacts-destination", str(tmp_path / "artifacts")],
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        run_id = log_generator(uri, tmp_path / "artifacts")
        # two registers at once: both race to create the registered model and to move champion
        fds = (3.0, 2.0)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "pipelines" / "register.py"),
                    "--params",
                    str(project(tmp_path / f"r{i}", uri, run_id, fd=fd, weights_seed=i)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, fd in enumerate(fds)
        ]
        outputs = [p.communicate(timeout=600) for p in procs]
        for p, (_out, err) in zip(procs, outputs):
            assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
        from mlflow.tracking import MlflowClient

        versions = MlflowClient(uri).search_model_versions(f"name='{NAME}'")
        best = min(versions, key=lambda v: float(v.tags["validation_fd_domain"]))
        assert len(versions) == 2 and float(best.tags["validation_fd_domain"]) == 2.0
        assert champion(uri) == str(best.version)
    finally:
        _stop(server.pid)


class RacedClient:
    """A registry client whose first ``losses`` alias moves lose a race, as on an MLflow server."""

    def __init__(self, losses: int, message: str = "(sqlite3.IntegrityError) UNIQUE constraint failed: x") -> None:
        self.losses, self.message, self.calls, self.aliases = losses, message, 0, {}

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.losses:
            raise MlflowException(f"BAD_REQUEST: {self.message}")
        self.aliases[alias] = version


def test_an_alias_move_that_loses_a_race_is_tried_again_and_other_errors_are_not():
    from mlflow.exceptions import MlflowException

    from ganflow.registry import set_alias

    raced = RacedClient(losses=2)
    set_alias(raced, NAME, "challenger", "3")
    assert raced.aliases == {"challenger": "3"} and raced.calls == 3
    with pytest.raises(MlflowException, match="UNIQUE constraint failed"):
        set_alias(RacedClient(losses=9), NAME, "challenger", "3", tries=2)
    other = RacedClient(losses=1, message="RESOURCE_DOES_NOT_EXIST: no such version")
    with pytest.raises(MlflowException, match="no such version"):
        set_alias(other, NAME, "champion", "7")
    assert other.calls == 1
