"""MLflow: the store, the experiment, one run per training. Rank 0 and the driver only.

The driver creates the experiment and the run (SQLite dislikes concurrent creators); rank 0
logs into that run by id. Logging never crashes training: a failed call is reported once on
stderr and training goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ganflow.config import Config
from ganflow.errors import GanflowError, first_line

STEP_METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "imgs_per_sec")
SAMPLES_KEY = "samples"  # every epoch's sample grid goes under this one image key


class TrackingError(GanflowError):
    """The tracking store cannot be used."""


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else an absolute sqlite:/// path in the project.

    The default must be absolute: Ray workers and jobs run in other working directories.
    """
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{cfg.paths.mlflow_db}"


def artifact_root(cfg: Config) -> str:
    """Absolute artifact location for experiments created in the local SQLite store."""
    return cfg.paths.mlflow_artifacts.as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"tracking.uri: MLflow server at {uri} answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking.uri: MLflow server at {uri} is unreachable ({reason})") from None


def connect(cfg: Config) -> tuple[Any, str]:
    """(MlflowClient, experiment id): the store is created and the experiment looked up or
    created here, once, in the driver."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    location = artifact_root(cfg) if uri.startswith("sqlite:") else None
    return client, client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr_g": 1e-4}} -> {"train.lr_g": "0.0001"} for MLflow params."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = "" if value is None else str(value)
    return out


def params_hash(cfg: Config) -> str:
    """A short hash of the resolved config, machine-independent (paths relative to the project)."""
    values = cfg.to_dict()
    for section in ("paths", "data"):
        for key, value in values[section].items():
            if isinstance(value, str) and value.startswith("/"):
                values[section][key] = cfg.relative(Path(value))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(client: Any, experiment_id: str, cfg: Config, run_name: str, tags: dict[str, str]) -> str:
    """Create a run with the flattened config as params; returns its id."""
    from mlflow.entities import Param

    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = [Param(k, v[:6000]) for k, v in sorted(flatten(cfg.to_dict()).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


class RunLogger:
    """Rank 0's handle on the training run: per-step metrics and per-epoch sample grids.

    After a restart the loop replays epochs from the last checkpoint; points already in
    the run (same key, step at or below the last logged one) are not logged again, so the
    run's history holds every step and epoch once.
    """

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self._last: dict[str, int] = {}
        self._pending: list = []
        self._warned = False

    def _last_step(self, key: str) -> int:
        if key not in self._last:
            history = self._call(self.client.get_metric_history, self.run_id, key) or []
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            if not self._warned:
                print(f"warning: MLflow logging failed, training continues: {exc}", file=sys.stderr)
                self._warned = True
            return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric points; they reach MLflow at the next ``flush`` (once per epoch),
        so per-step logging costs the training loop almost nothing."""
        from mlflow.entities import Metric

        stamp = _now_ms()
        for key, value in metrics.items():
            if step > self._last_step(key):
                self._pending.append(Metric(key, float(value), stamp, step))
                self._last[key] = step

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self._call(self.client.log_batch, self.run_id, metrics=pending[i : i + 1000])

    def log_grid(self, images, step: int) -> None:
        """images: (N, C, H, W) tensor in [-1, 1] -> one grid image under SAMPLES_KEY."""
        from ganflow.sampling import make_grid, to_uint8

        if step <= self._last_step("epoch"):
            return
        self.flush()
        self._call(self.client.log_image, self.run_id, make_grid(to_uint8(images)), key=SAMPLES_KEY, step=step)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def log_evaluation(cfg: Config, run_id: str | None, metrics: dict[str, Any], grid: Path) -> bool:
    """Add the evaluate stage's numbers and grid to the training's run. The files are the
    record; a tracking store that fails here costs a warning, not the evaluation."""
    if not run_id:
        return False
    from mlflow.tracking import MlflowClient

    from mlflow.entities import Metric

    numbers = {f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    stamp = _now_ms()
    try:
        check_reachable(tracking_uri(cfg))
        client = MlflowClient(tracking_uri(cfg))
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in sorted(numbers.items())])
        client.log_artifact(run_id, str(grid), artifact_path="eval")
    except Exception as exc:  # noqa: BLE001 - any store failure is reported the same way
        print(f"warning: evaluation not logged to MLflow run {run_id}: {first_line(exc)}", file=sys.stderr)
        return False
    return True
