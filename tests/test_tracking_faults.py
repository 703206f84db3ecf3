"""Tracking server trouble: a real `mlflow server` killed mid-training and started again.

Training must not stop or stall while the server is away, and the run must end up with every
metric step exactly once. No Ray here: RunLogger is driven the way rank 0's loop drives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ganflow.endpoints import check_reachable
from ganflow.errors import TrackingError
from ganflow.localcluster import free_port, start_mlflow_server
from ganflow.tracking import INCOMPLETE_TAG, MISSING_GRIDS_TAG, RunLogger

STEPS_PER_EPOCH = 4
KEYS = ("loss_d", "loss_g")


def start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store in ``root``, in its own process group (uvicorn runs
    as a child); the background job runner is off, it only slows the start."""
    return start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}",
        port,
        root / f"server-{time.time_ns()}.log",
        ["--default-artifact-root", (root / "artifacts").as_uri()],
        timeout=90,
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=root,
    )


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill the server's process group (the one start_server made)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def server_root(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    procs: list[subprocess.Popen] = []
    yield root, procs
    for proc in procs:
        if proc.poll() is None:
            stop_server(proc)


def log_epoch(logger: RunLogger, epoch: int, grid: bool = True) -> float:
    """What the training loop does for one epoch; returns the seconds the epoch's flush took."""
    for i in range(STEPS_PER_EPOCH):
        step = (epoch - 1) * STEPS_PER_EPOCH + i + 1
        logger.log_metrics({"loss_d": 1.0 / step, "loss_g": float(step)}, step=step)
    started = time.monotonic()
    if grid:
        logger.log_grid(torch.zeros(4, 1, 8, 8), step=epoch)
    logger.log_metrics({"epoch": float(epoch)}, step=epoch)
    logger.flush()
    return time.monotonic() - started


def test_server_killed_mid_training_then_back_every_step_arrives_once(server_root, capfd):
    root, procs = server_root
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.append(start_server(root, port))
    client = MlflowClient(url)
    run_id = client.create_run(client.create_experiment("faults")).info.run_id
    logger = RunLogger(url, run_id)

    log_epoch(logger, 1)
    assert logger.pending == 0

    stop_server(procs[-1], signal.SIGKILL)
    # a restarted worker (new logger) replays epoch 1 while the server is away: its history is unknown
    replay = RunLogger(url, run_id)
    for epoch in (2, 3):
        started = time.monotonic()
        took = log_epoch(logger, epoch)
        assert took < 10 and time.monotonic() - started < 10  # never stalls the epoch
    log_epoch(replay, 1, grid=False)
    assert logger.pending == 2 * STEPS_PER_EPOCH * len(KEYS) + 2  # kept for later, nothing dropped
    assert logger.dropped == 0 and logger.grids_lost == 2
    with pytest.raises(TrackingError) as info:  # what the next stage's start would say
        check_reachable(url, timeout=2)
    assert str(info.value).startswith(f"tracking.uri: MLflow server at {url} is unreachable")
    assert "\n" not in str(info.value)

    procs.append(start_server(root, port))  # the same port and database
    log_epoch(logger, 4)
    assert logger.close() == 0 and logger.pending == 0
    assert replay.close() == 0  # its replayed points were already in the run: dropped, not duplicated

    for key in KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, 4 * STEPS_PER_EPOCH + 1)), key
    assert sorted(m.step for m in client.get_metric_history(run_id, "epoch")) == [1, 2, 3, 4]
    tags = client.get_run(run_id).data.tags
    assert INCOMPLETE_TAG not in tags and tags[MISSING_GRIDS_TAG] == "2"  # grids are not queued

    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    failed = [w for w in warnings if w.startswith("warning: MLflow logging failed, training continues")]
    assert len(failed) == 2 and len(warnings) == 3, warnings  # once per logger; the lost grids at close
    assert warnings[-1].endswith(f"2 sample grid(s) could not be delivered; tagged {MISSING_GRIDS_TAG}=2")


def test_store_never_back_bounded_queue_one_warning_no_exception(capfd):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    started = time.monotonic()
    logger = RunLogger(url, "0" * 32, max_pending=10)
    for step in range(1, 6):
        logger.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, step=step)
    assert logger.flush() is False
    assert (logger.pending, logger.dropped) == (10, 5)  # the oldest dropped, and counted
    assert logger.close(attempts=2, wait_s=0.1) == 15
    assert time.monotonic() - started < 10
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("warning: MLflow logging failed")
    assert err[1] == f"warning: MLflow run {'0' * 32}: 15 metric point(s) could not be delivered"  # no tag: store away


def test_unreachable_tracking_uri_is_one_line_naming_it():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_reachable(url, timeout=2)
    message = str(info.value)
    assert message.startswith(f"tracking.uri: MLflow server at {url} is unreachable (") and "\n" not in message
    assert time.monotonic() - started < 5
