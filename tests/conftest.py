"""Shared fixtures: a copy of the project to run stages in, and tiny params files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, ganflow, python


def run(
    cmd: list[str], cwd: Path, timeout: float = 300, check: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH (in ``env``, default this process's
    environment); output captured as text."""
    env = {**(env or os.environ), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tracked_files() -> list[str]:
    """The files a clone would have: tracked plus untracked-but-not-ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line and (REPO / line).is_file()]


def copy_project(dest: Path) -> Path:
    """A fresh copy of the project at ``dest`` as a git + DVC repo, with its own outputs and stores."""
    for rel in tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    (dest / "data" / "raw").mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], dest, check=True)
    run(["git", "add", "-A"], dest, check=True)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "copy"], dest, check=True)
    return dest


# The smallest config that trains: 16 px digits, 8-wide networks, batches of 8. Tests that need
# more say what they change (tiny_cfg(root, train={"loss": "hinge"})).
TINY = {
    "data": {"image_size": 16},
    "model": {"latent_dim": 8, "g_width": 8, "d_width": 8},
    "train": {"batch_size": 8},
}


def tiny_cfg(root: Path, **sections: dict):
    """TINY with each section's keys updated by ``sections``, its paths resolved under ``root``."""
    from ganflow.config import from_dict, resolve_paths

    values = {name: dict(keys) for name, keys in TINY.items()}
    for name, keys in sections.items():
        values.setdefault(name, {}).update(keys)
    return resolve_paths(from_dict(values), root)


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.2):
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds (a
    bound for a hang, never a speed target), or at once if ``proc`` has exited meanwhile."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"exited {proc.returncode} before {what}:\n{(out or '')[-2000:]}\n{(err or '')[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def checkpoint_registered(results: Path) -> bool:
    """Ray Train's controller has recorded the newest checkpoint under ``results`` (a stage's
    ray_results/) in its snapshot: a worker restarted from now on resumes from it."""
    import json

    for snapshot in results.glob("train-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            continue  # being written
        on_disk = sorted(p.name for p in snapshot.parent.glob("checkpoint_*") if p.is_dir())
        if on_disk and latest.get("checkpoint_dir_name") == on_disk[-1]:
            return True
    return False


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def edit_params(params_file: Path, **sections: dict) -> None:
    """Update keys of a params file in place: edit_params(p, train={"epochs": 1})."""
    data = yaml.safe_load(params_file.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))


# What a test of the fast tier (make test-fast) must not start; each needs the named mark.
STARTS = {
    "ray": (("ray", "start"), ("gcs_server",), ("raylet",)),
    "server": (("mlflow", "server"), ("mlflow", "ui"), ("ganflow", "ui"), ("ganflow", "cluster"), ("chromium",)),
    "slow": (("dvc", "repro"), ("make", "run")),
}


def _starts(argv: list[str]) -> str | None:
    """The mark a command line needs, if it starts something the fast tier must not."""
    names = [Path(str(a)).name for a in argv]
    for mark, patterns in STARTS.items():
        for pattern in patterns:
            if all(any(n == p or n.startswith(p + "-") for n in names) for p in pattern):
                return mark
    return None


@pytest.fixture(autouse=True)
def fast_tier_guard(request, monkeypatch):
    """In the fast tier (GANFLOW_TEST_TIER=fast, set by make test-fast) a test that starts Ray,
    a server, a browser or a DVC pipeline fails, naming the mark it lacks: the marks stay true to
    what each test starts."""
    if os.environ.get("GANFLOW_TEST_TIER") != "fast":
        yield
        return
    import ray

    def no_ray(*args, **kwargs):
        pytest.fail(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray", pytrace=False)

    monkeypatch.setattr(ray, "init", no_ray)
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        argv = args.split() if isinstance(args, str) else list(args)
        mark = _starts(argv)
        if mark:
            pytest.fail(
                f"{request.node.nodeid} runs {' '.join(map(str, argv))[:80]}: mark it @pytest.mark.{mark}",
                pytrace=False,
            )
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch):
    """No test leaks a tracking store or cluster address into the next (mlflow.set_tracking_uri
    exports MLFLOW_TRACKING_URI to child processes)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    yield
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)
    # mlflow.set_tracking_uri / set_registry_uri also set module globals in this process
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None


# fixtures that start something: a test using one carries its mark
FIXTURE_MARKS = {
    "two_nodes": "ray",
    "local_ray": "ray",
    "server": "server",
    "browser": "server",
    "page": "server",
    "server_root": "server",
}


def pytest_configure(config):
    """One compute thread per process under test (the stages it starts inherit
    OMP_NUM_THREADS). With torch's default of a thread per core, every parallel region waits for
    its slowest thread: beside a busy loop per core, a tiny GAN step ran 9x slower with 2 threads
    than idle, and 1.7x slower with 1 (2 cores; idle, 1 thread costs 10 %)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# make test's first phase hands whole files to two workers (--dist loadfile), in collection order
# (--no-loadscope-reorder: xdist would otherwise start with the files of most tests, the quick
# ones, and leave a worker alone with a 4-minute file at the end). So the longest files go first:
# these, by their summed --durations=0 on an idle 2-core machine (docs/RUNS.md), then the rest in
# their usual order; tests/test_layering.py checks that each name is a file.
LONGEST_FIRST = (
    "test_benchmarks.py",  # 420 s
    "test_pipeline.py",  # 287 s
    "test_training.py",  # 264 s
    "test_tune_registry.py",  # 253 s
    "test_interrupts.py",  # 160 s
    "test_reproducibility.py",  # 93 s
    "test_registry.py",  # 67 s
    "test_job_agent.py",  # 66 s
    "test_data.py",  # 53 s
    "test_ui.py",  # 44 s
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST). Tests using a fixture that starts Ray or a server
    are marked so (make test-fast leaves them out). GPU tests run where CUDA is; elsewhere they are
    reported as skipped, never as passed."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays
    for item in items:
        for name in set(getattr(item, "fixturenames", ())) & set(FIXTURE_MARKS):
            item.add_marker(FIXTURE_MARKS[name])
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def use_ray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """ganflow's Ray settings (RAY_ENV_DEFAULTS) in this process's environment until the test ends,
    for a Ray the test starts itself: the raylets read them (above all RAY_worker_niceness 0)."""
    from ganflow.raycluster import RAY_ENV_DEFAULTS

    for key, value in RAY_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def two_nodes(monkeypatch):
    """A Ray cluster of two simulated nodes on this machine, 1 CPU each: the head (where a
    stage's driver attaches, as a Ray job's driver does) and one worker node. Its raylets read ganflow's Ray settings as a
    stage's local Ray does (above all RAY_worker_niceness 0: at Ray's default nice 15 the
    training workers got a few % of a core next to a busy loop)."""
    from ray.cluster_utils import Cluster

    use_ray_settings(monkeypatch)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, node
    finally:
        cluster.shutdown()
