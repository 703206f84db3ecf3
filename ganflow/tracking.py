"""MLflow: the store, the experiment, one run per training. Rank 0 and the driver only.

The driver creates the experiment and the run (SQLite dislikes concurrent creators); rank 0
logs into that run by id. Logging never crashes training: a failed call is reported once on
stderr and training goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ganflow.config import Config
from ganflow.endpoints import artifact_root, check_reachable, tracking_uri
from ganflow.errors import first_line

SAMPLES_KEY = "samples"  # every epoch's sample grid goes under this one image key


def connect(cfg: Config) -> tuple[Any, str]:
    """(MlflowClient, experiment id): the store is created and the experiment looked up or
    created here, once, in the driver."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
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


# ------------------------------------------------------------------ names, descriptions, tags
# What a person sees in the MLflow UI's run list and compare view: a name that says what the
# run is, a description (the run page's "Description", tag mlflow.note.content) and tags saying
# where it came from. Training runs and sweep trials log the same metric names (fd_domain, kid,
# loss_d, ...) and the same image key (samples), so any of them can be compared with any other.
NOTE_TAG = "mlflow.note.content"
STOPPED_EARLY = "stopped early"  # a trial's ganflow.trial_status when the scheduler cut it, + " (sha)" or " (asha)"
SCHEDULER_NAMES = {"sha": "synchronous successive halving", "asha": "ASHA (asynchronous successive halving)"}


def lr_text(lr: float) -> str:
    """A learning rate as run names and tables show it: 0.00032 -> "3.2e-4"."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def provenance(cfg: Config, dvc_stage: str) -> dict[str, str]:
    """The tags saying where a run came from: the code, the DVC stage, the data, the params."""
    from ganflow.artifacts import prepared_hash

    return {
        "git_commit": git_commit(cfg.root),
        "dvc_stage": dvc_stage,
        "data_hash": prepared_hash(cfg.paths.prepared),
        "params_hash": params_hash(cfg),
    }


def _data_text(cfg: Config) -> str:
    from ganflow.artifacts import read_manifest

    data = cfg.data
    source = {
        "digits": "scikit-learn's bundled digits",
        "folder": f"the image folder `{cfg.relative(data.path)}`",
        "npz": f"`{cfg.relative(data.path)}`",
    }[data.source]
    manifest = read_manifest(cfg.paths.prepared)
    return (
        f"Data: {source}, {manifest['count']} images of {data.image_size}x{data.image_size}x{data.channels} "
        f"(`{cfg.relative(cfg.paths.prepared)}`, images sha256 {manifest['images_sha256'][:12]})."
    )


def _workers_text(cfg: Config) -> str:
    device = "GPU" if cfg.cluster.use_gpu else "CPU"
    return f"{cfg.cluster.num_workers} Ray Train worker(s) on {device}, global batch {cfg.train.batch_size}"


def start_training_run(
    client: Any,
    experiment_id: str,
    cfg: Config,
    lr_g: float,
    lr_d: float,
    tags: dict[str, str],
    trial: int | None = None,
) -> str:
    """Create the run of one training (``trial`` None) or of one sweep trial (``trial`` k, with
    tags naming its sweep): name, description, ``tags``, the config and the learning rates it
    used as params. Returns the run id."""
    lrs = f"lr_g={lr_text(lr_g)} lr_d={lr_text(lr_d)}"
    budget = f"{cfg.train.epochs} epochs" if cfg.train.epochs else f"{cfg.train.kimg:g} kimg (thousand images shown)"
    if trial is None:
        name = f"train {lrs}"
        what = f"GAN training with {lrs}: {budget}"
    else:
        name = f"trial {trial} {lrs}"
        what = (
            f"Trial {trial} of {cfg.tune.trials} of a learning-rate sweep (parent run "
            f"{tags.get('sweep_id', '?')}), {lrs}: up to {budget} "
            + (
                f"(PBT may replace its weights and rates every {cfg.tune.pbt_interval} ticks: see its lr_g/lr_d metrics)"
                if cfg.sweep_scheduler == "pbt"
                else f"({cfg.sweep_scheduler} may stop it early)"
            )
        )
    note = (
        f"{what}, {_workers_text(cfg)}, {cfg.train.loss} loss, augment {cfg.train.augment}; fd_domain "
        f"scored every {cfg.eval.every} tick(s) of {cfg.train.tick_kimg:g} kimg, a sample grid (`samples`) every "
        f"tick; metric steps of per-tick values are epochs, of per-step values D steps.\n\n{_data_text(cfg)}"
    )
    run_id = start_run(client, experiment_id, cfg, name, {**tags, NOTE_TAG: note})
    from mlflow.entities import Param

    from ganflow.artifacts import class_prior

    # the learning rates this run used (train.lr_* in the params may be overridden by tune), and
    # what the params' auto values became for this data (a compare view shows the weights used)
    used = {"lr_g": repr(lr_g), "lr_d": repr(lr_d), **cfg.resolved_params(class_prior(cfg) is not None)}
    client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(used.items())])
    return run_id


def start_sweep_run(client: Any, experiment_id: str, cfg: Config, tags: dict[str, str]) -> str:
    """Create a sweep's parent run (its trials are nested under it); its ``sweep_id`` tag is its
    own id, as its trials' is. Returns the run id."""
    t = cfg.tune
    scheduler = (
        f"population-based training, exploit/explore every {t.pbt_interval} ticks"
        if cfg.sweep_scheduler == "pbt"
        else f"{SCHEDULER_NAMES[cfg.sweep_scheduler]}, grace period {t.grace_period}, reduction factor {t.reduction_factor}"
    )
    note = (
        f"Learning-rate sweep: {t.trials} trials ({t.search} search, {scheduler}, "
        f"in ticks of {t.tick_kimg:g} kimg) of up to {t.kimg:g} kimg each, "
        f"lr_g {f'on a grid of {t.grid_points} log-spaced values' if t.search == 'grid' else 'log-uniform'} in "
        f"[{lr_text(t.lr_g_min)}, {lr_text(t.lr_g_max)}], lr_d in [{lr_text(t.lr_d_min)}, {lr_text(t.lr_d_max)}]"
        f"{'; trial 1: train.lr_g and lr_d' if cfg.sweep_first_trial else ''}; objective: fd_recent, the mean of the last two ticks' validation fd_class (a conditional G: the FD "
        "per class) or fd_domain (lower is better). One nested run per trial; "
        f"each trial: {_workers_text(cfg)}.\n\n{_data_text(cfg)}"
    )
    run_id = start_run(client, experiment_id, cfg, f"tune {t.trials} trials", {**tags, NOTE_TAG: note})
    client.set_tag(run_id, "sweep_id", run_id)
    return run_id


INCOMPLETE_TAG = "ganflow.incomplete_metrics"  # metric points a run lacks (the tracking store was away)
MISSING_GRIDS_TAG = "ganflow.missing_sample_grids"  # epochs whose sample grid was not logged


class RunLogger:
    """Rank 0's handle on the training run: per-step metrics and per-epoch sample grids.

    After a restart the loop replays epochs from the last checkpoint; points already in
    the run (same key, step at or below the last logged one) are not logged again, so the
    run's history holds every step and epoch once.

    A tracking server that goes away does not stop training. Points that could not be sent
    stay queued (at most ``max_pending``; beyond that the oldest are dropped and counted) and
    go out at a later flush once the server answers again. Each request gets a short timeout
    and no retries of MLflow's own (those back off for minutes); after a failure the store is
    left alone for a backoff that doubles from 2 s to 60 s, so one epoch waits for at most one
    failed request. ``close`` makes the last attempts; points that never arrived are counted
    in the run's ``ganflow.incomplete_metrics`` tag (when the store takes it) and one warning.
    Sample grids are not queued; the epochs that lost theirs are counted the same way.
    """

    MAX_PENDING = 100_000  # queued metric points (about 25 MB): 20,000 steps of the five per-step diagnostics
    BACKOFF_S = (2.0, 60.0)  # first and longest wait before the store is tried again

    def __init__(self, uri: str, run_id: str, max_pending: int = MAX_PENDING):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.max_pending = max_pending
        self._last: dict[str, int] = {}  # per key: the last step queued here or found in the run
        self._unchecked: set[str] = set()  # keys whose history in the run could not be read yet
        self._pending: list = []
        self.dropped = 0  # points dropped from a full queue
        self.grids_lost = 0  # sample grids not logged
        self._backoff = 0.0
        self._retry_at = 0.0  # time.monotonic() before which the store is not tried
        self._warned = False

    def _call(self, fn, *args, force: bool = False, **kwargs) -> tuple[bool, Any]:
        """(ok, result) of one tracking call; never raises. While backing off after a failure
        the store is not tried (ok is False) unless ``force``."""
        if not force and time.monotonic() < self._retry_at:
            return False, None
        try:
            with _quick_requests():
                result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            low, high = self.BACKOFF_S
            self._backoff = min(high, max(low, 2 * self._backoff))
            self._retry_at = time.monotonic() + self._backoff
            if not self._warned:
                print(
                    f"warning: MLflow logging failed, training continues and the metrics are kept "
                    f"to be sent later: {first_line(exc)[:300]}",
                    file=sys.stderr,
                )
                self._warned = True
            return False, None
        self._backoff = 0.0
        return True, result

    def _last_step(self, key: str) -> int:
        if key not in self._last:
            self._last[key] = -1
            self._unchecked.add(key)
            self._check_history(key)
        return self._last[key]

    def _check_history(self, key: str, force: bool = False) -> bool:
        """Read the last step of ``key`` already in the run; drop queued points at or below it
        (an epoch replayed after a restart while the store was unreachable)."""
        ok, history = self._call(self.client.get_metric_history, self.run_id, key, force=force)
        if not ok:
            return False
        logged = max((m.step for m in history), default=-1)
        if logged >= 0:
            self._pending = [m for m in self._pending if m.key != key or m.step > logged]
        self._last[key] = max(self._last[key], logged)
        self._unchecked.discard(key)
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric points; they reach MLflow at the next ``flush`` (once per epoch),
        so per-step logging costs the training loop almost nothing."""
        from mlflow.entities import Metric

        stamp = _now_ms()  # kept on a retry: a batch sent twice is stored once
        for key, value in metrics.items():
            if step > self._last_step(key):
                self._pending.append(Metric(key, float(value), stamp, step))
                self._last[key] = step
        excess = len(self._pending) - self.max_pending
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess

    @property
    def pending(self) -> int:
        """Metric points queued, not yet in the run."""
        return len(self._pending)

    def flush(self, force: bool = False) -> bool:
        """Send the queued points. True when none are left; after a failure the rest stay
        queued for the next flush. ``force``: try even while backing off."""
        for key in sorted(self._unchecked):
            if not self._check_history(key, force=force):
                return False
        while self._pending:
            batch = self._pending[:1000]  # MLflow takes at most 1000 metrics per batch
            ok, _ = self._call(self.client.log_batch, self.run_id, metrics=batch, force=force)
            if not ok:
                return False
            del self._pending[: len(batch)]
        return True

    def log_grid(self, images, step: int, cols: int | None = None) -> None:
        """images: (N, C, H, W) tensor in [-1, 1] -> one grid image (``cols`` wide, default
        square) under SAMPLES_KEY."""
        from ganflow.images import make_grid, to_uint8

        if step <= self._last_step("epoch"):
            return
        self.flush()
        grid = make_grid(to_uint8(images), cols)
        ok, _ = self._call(self.client.log_image, self.run_id, grid, key=SAMPLES_KEY, step=step)
        if not ok:
            self.grids_lost += 1  # images are not queued: one grid per epoch is not worth the memory

    def close(self, attempts: int = 3, wait_s: float = 1.0) -> int:
        """The last flush, tried ``attempts`` times ``wait_s`` apart even while backing off.
        Returns how many metric points never reached the run; never raises."""
        for attempt in range(attempts):
            if self.flush(force=True):
                break
            if attempt + 1 < attempts:
                time.sleep(wait_s)
        from mlflow.entities import RunTag

        lost = len(self._pending) + self.dropped
        tags = {INCOMPLETE_TAG: lost, MISSING_GRIDS_TAG: self.grids_lost}
        tags = {k: str(v) for k, v in tags.items() if v}
        if tags:
            tagged, _ = self._call(
                self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], force=True
            )
            what = " and ".join(
                f"{n} {noun}" for n, noun in ((lost, "metric point(s)"), (self.grids_lost, "sample grid(s)")) if n
            )
            marked = f"; tagged {', '.join(f'{k}={v}' for k, v in tags.items())}" if tagged else ""
            print(f"warning: MLflow run {self.run_id}: {what} could not be delivered{marked}", file=sys.stderr)
        return lost


@contextlib.contextmanager
def _quick_requests(timeout_s: int = 5):
    """MLflow's HTTP settings for RunLogger's calls: a short timeout and no retries (MLflow's
    default is 7 retries backing off over minutes, and a 120 s timeout). They are read from
    the environment at each request."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def log_evaluation(cfg: Config, run_id: str | None, metrics: dict[str, Any], grid: Path) -> bool:
    """Add the evaluate stage's numbers and grid to the training's run. The files are the
    record; a tracking store that fails here costs a warning, not the evaluation."""
    if not run_id:
        return False
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    numbers = {f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    # per-class figures (class_fd_over_real, class_freq) as eval_<key>_<class>: which class is weak
    numbers.update(
        {
            f"eval_{k}_{name}": float(v)
            for k, d in metrics.items()
            if isinstance(d, dict)
            for name, v in d.items()
            if isinstance(v, (int, float))
        }
    )
    numbers = {k: v for k, v in numbers.items() if math.isfinite(v)}
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
