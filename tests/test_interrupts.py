"""`dvc repro` interrupted during training, for real: Ctrl-C (SIGINT to the process group, as a
terminal sends it) and SIGTERM to the dvc process alone (as `kill` or a job scheduler sends it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, checkpoint_registered, edit_params, run, wait_until

pytestmark = pytest.mark.slow


def start_repro(root: Path, stage: str = "train") -> subprocess.Popen:
    # dvc runs the stage as `$SHELL -c`: /bin/sh (CI has no SHELL) stays between dvc and the
    # stage, the harder case (tests/test_stop_with_dvc.py covers both)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SHELL": "/bin/sh"}
    return subprocess.Popen(
        [str(BIN / "dvc"), "repro", stage],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
        # as from a terminal: Ctrl-C not ignored. A test runner started in the background of a
        # script inherits SIGINT ignored, and so would dvc and the stage: a Ctrl-C test would then
        # only see Ray's own processes in the group die of it (this hid a stage that went on)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("ray_results/train-*/checkpoint_*/meta.json"))


def newest_epoch(root: Path) -> int:
    try:
        return json.loads(checkpoints(root)[-1].read_text())["epoch"] if checkpoints(root) else 0
    except (OSError, ValueError):
        return 0  # being written


def wait_for_new_checkpoint(root: Path, proc: subprocess.Popen, after_epoch: int, timeout: float = 900) -> None:
    """Until a checkpoint past ``after_epoch`` is on disk and registered by Ray's controller (a
    resumed run may first checkpoint the epoch it resumed at)."""
    wait_until(
        lambda: newest_epoch(root) > after_epoch and checkpoint_registered(root / "ray_results"),
        timeout,
        f"a registered checkpoint past epoch {after_epoch}",
        proc,
    )


def stage_process(proc: subprocess.Popen) -> psutil.Process:
    """The train stage's Python process under dvc."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "pipelines/train.py" in " ".join(child.cmdline()):
            return child
    raise AssertionError("the train stage is not running under dvc")


def the_run(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("ganflow").experiment_id], "tags.`ganflow.stage` = 'train'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def assert_clean_workspace(root: Path, lock: str) -> None:
    """Nothing half-written: no generator, no temporary siblings, dvc.lock as before."""
    assert not (root / "models" / "generator").exists()
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not [p for p in leftovers if ".venv" not in p.parts], leftovers
    assert (root / "dvc.lock").read_text() == lock


@pytest.mark.timeout(3600)  # generous: the limits below are for a hang, not for speed
def test_interrupted_dvc_repro_leaves_a_clean_state_and_resumes(project):
    root = project
    edit_params(
        root / "params.yaml",
        data={"image_size": 32},
        model={"latent_dim": 32, "g_width": 32, "d_width": 32},
        train={"epochs": 8, "tick_kimg": 1.0, "batch_size": 64, "max_failures": 0},
        eval={"num_samples": 200, "encoder_epochs": 2, "kid_subsets": 5, "kid_subset_size": 100},
        tune={"enabled": False},
    )
    run([str(BIN / "dvc"), "repro", "tune"], root, timeout=1200, check=True)  # prepare, encoder, tune
    lock = (root / "dvc.lock").read_text()

    # 1. SIGTERM to dvc alone: dvc dies at once; the stage, its parent gone, stops like on Ctrl-C
    proc = start_repro(root)
    wait_for_new_checkpoint(root, proc, 0)
    stage = stage_process(proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    stage.wait(timeout=120)
    client, r = the_run(root)
    assert r.info.status == "KILLED" and r.data.tags["ganflow.failure"] == "interrupted"
    assert_clean_workspace(root, lock)
    first_stop = json.loads(checkpoints(root)[-1].read_text())["epoch"]
    assert 1 <= first_stop < 8

    # 2. Ctrl-C (SIGINT to the whole process group) during the resumed run
    proc = start_repro(root)
    wait_for_new_checkpoint(root, proc, first_stop)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "resuming" in out, out[-2000:]
    assert "error: training interrupted; MLflow run" in err, err[-2000:]
    client, r = the_run(root)
    assert r.info.status == "KILLED"
    assert_clean_workspace(root, lock)
    second_stop = json.loads(checkpoints(root)[-1].read_text())["epoch"]
    assert first_stop < second_stop < 8

    # 3. the next dvc repro resumes from the checkpoint, in the same MLflow run, and finishes
    done = run([str(BIN / "dvc"), "repro", "train"], root, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout
    client, r = the_run(root)
    assert r.info.status == "FINISHED"
    epochs = sorted(m.step for m in client.get_metric_history(r.info.run_id, "epoch"))
    assert epochs == list(range(1, 9))  # every epoch logged once across three processes
    meta = json.loads(checkpoints(root)[-1].read_text())
    assert meta["epoch"] == 8 and meta["starts"] == 3
    assert (root / "models" / "generator" / "generator.safetensors").exists()
    assert (root / "dvc.lock").read_text() != lock  # DVC recorded the finished stage


def ray_workers_under(pid: int) -> list[psutil.Process]:
    """Ray's worker processes (trial drivers, Train controllers and workers, ...) started under ``pid``."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if (proc.cmdline() or [""])[0].startswith("ray::"):
                found.append(proc)
    return found


@contextlib.contextmanager
def cpu_hog():
    """A busy loop per core beside the test: a loaded machine."""
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.timeout(3600)  # generous: the limits below are for a hang, not for speed
def test_ctrl_c_during_the_sweep_fails_the_stage_and_writes_nothing(project):
    """Ray Tune's own Ctrl-C handler ends a sweep early and returns normally: the stage would
    then pick the best of a partial sweep, write tune/best.json, and DVC would record it. The
    Ctrl-C comes while trials train, on a loaded machine; the stage must end (exit 130) and take
    the trials' processes with it. DVC deletes the previous tune/best.json before the stage runs;
    its cache keeps it, so `dvc checkout` restores it."""
    root = project
    edit_params(
        root / "params.yaml",
        data={"image_size": 32},
        model={"latent_dim": 32, "g_width": 32, "d_width": 32},
        train={"batch_size": 64},
        eval={"encoder_epochs": 2},
        tune={"enabled": False, "num_samples": 4, "kimg": 7.2, "tick_kimg": 1.0, "grace_period": 6},
    )
    # the previous sweep's answer (here the rates passed through, which needs no Ray), recorded by DVC
    run([str(BIN / "dvc"), "repro", "tune"], root, timeout=300, check=True)
    previous = (root / "tune" / "best.json").read_text()
    lock = (root / "dvc.lock").read_text()
    edit_params(root / "params.yaml", tune={"enabled": True})

    proc = start_repro(root, "tune")
    wait_until(
        lambda: [p for p in root.glob("ray_results/tune-*/*/result.json") if p.stat().st_size],
        1200,
        "a trial's first report",
        proc,
    )
    workers = ray_workers_under(proc.pid)
    assert any("ImplicitFunc" in " ".join(w.cmdline()) for w in workers), [w.cmdline() for w in workers]
    with cpu_hog():
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)  # the stage's own deadline is 20 s after the signal
    assert proc.returncode != 0
    assert "error: tune interrupted; MLflow sweep run" in err, err[-2000:]
    # the stage exits 130; /bin/sh (dash) between dvc and the stage got the Ctrl-C too, and dvc
    # reports the shell's own death by SIGINT (-2) once the stage has ended
    assert re.search(r"exited with (130|-2)$", err, re.MULTILINE), err[-2000:]
    deadline = time.time() + 120
    while alive := [w for w in workers if w.is_running()]:  # the trials end with the stage's local Ray
        assert time.time() < deadline, f"Ray processes left running: {[w.cmdline()[0] for w in alive]}"
        time.sleep(0.5)
    assert not (root / "tune" / "best.json").exists()  # DVC removed it before running the stage
    assert (root / "dvc.lock").read_text() == lock
    # ... and kept it in its cache: checkout brings the previous sweep's answer back
    run([str(BIN / "dvc"), "checkout", "tune"], root, timeout=300, check=True)
    assert (root / "tune" / "best.json").read_text() == previous
    status = json.loads(run([str(BIN / "dvc"), "status", "tune", "--json"], root, check=True).stdout)
    assert status == {"tune": [{"changed deps": {"params.yaml": {"tune": "modified"}}}]}, status  # outs intact
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ganflow").experiment_id
    sweeps = client.search_runs([experiment], "tags.`ganflow.stage` = 'tune'")
    assert len(sweeps) == 1
    assert sweeps[0].info.status == "KILLED" and sweeps[0].data.tags["ganflow.failure"] == "interrupted"
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
    assert trials and all(t.info.status != "RUNNING" for t in trials), [t.info.status for t in trials]
