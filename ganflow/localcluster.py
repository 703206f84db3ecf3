"""A cluster on one machine to try the cluster path: a Ray head and an MLflow server, both
listening on 127.0.0.1, as background processes (`make cluster-up` / `make cluster-down`).

State lives in <project>/.cluster/: cluster.json (pids, addresses), the servers' logs, the MLflow
server's SQLite store and artifacts (kept by `down`: runs are not lost), and `storage/`, the
shared storage the stages' Ray jobs checkpoint to and exchange files through.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ganflow.errors import GanflowError

STATE_DIR = ".cluster"


class ClusterError(GanflowError):
    """The local cluster could not be started or stopped."""


@dataclass
class LocalCluster:
    root: str
    ray_pid: int
    mlflow_pid: int
    address: str  # Ray job server (dashboard)
    gcs_port: int
    tracking_uri: str
    storage_path: str
    # when each process started (/proc start time): a pid alone may belong to another process
    # by the time `down` runs (after a reboot, or once the server died and the pid was reused)
    ray_started: str | None = None
    mlflow_started: str | None = None

    @property
    def state_dir(self) -> Path:
        return Path(self.root) / STATE_DIR

    def params(self) -> dict[str, dict[str, str]]:
        """The params.yaml entries that point the stages at this cluster."""
        return {
            "cluster": {"address": self.address, "storage_path": self.storage_path},
            "tracking": {"uri": self.tracking_uri},
        }


def tool(name: str) -> str:
    """The tool next to this Python (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


# How long `up` waits for a live MLflow server or Ray head to answer (a process that exits ends
# the wait at once). On a 2-core machine loaded with two test workers and a training, an MLflow
# server first answered after 128 s.
STARTUP_WAIT_S = 300.0


def _wait(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise ClusterError(
                f"{what} exited with status {proc.returncode}: {' '.join(tail) or 'no output'} (log: {log})"
            )
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the error
            pass
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s (log: {log})")


def _spawn(
    command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    with open(log, "ab") as out:
        # a session of its own: `down` stops the whole process group, and a Ctrl-C in the
        # terminal that started it does not reach it
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )


def start_mlflow_server(
    backend_uri: str,
    port: int,
    log: Path,
    artifact_args: list[str],
    timeout: float = STARTUP_WAIT_S,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:``port`` in a process group of its own; returns once /health
    answers. ``artifact_args``: e.g. ["--artifacts-destination", path] or ["--default-artifact-root", uri]."""
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(
        [
            tool("mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            *artifact_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log,
        env,
        cwd,
    )
    try:
        _wait(
            lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
            f"mlflow server on {url}",
            timeout,
            proc,
            log,
        )
    except BaseException:
        _stop(proc.pid)
        raise
    return proc


# `ray start --block` and its gcs_server/raylet take ~35 s to go on SIGTERM once a job has run
# (measured); `ray stop` itself allows 16 s before SIGKILL. The head keeps nothing on disk that
# a SIGKILL could corrupt (the MLflow server, which does, is stopped on its own).
RAY_GRACE_S = 8.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM to the process group ``pid`` leads; SIGKILL what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10.0  # a SIGKILLed group is gone once the kernel has torn it down
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)


def read_state(root: Path) -> LocalCluster | None:
    path = Path(root) / STATE_DIR / "cluster.json"
    if not path.exists():
        return None
    return LocalCluster(**json.loads(path.read_text()))


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc), None when
    there is no such process or no /proc: with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def ours(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is still the process `up` started (its group alive, same start time)."""
    if not _alive(pid):
        return False
    return started is None or _started(pid) == started  # a state file from before start times: trust the pid


def up(
    root: Path,
    ray_port: int = 6379,
    dashboard_port: int = 8265,
    mlflow_port: int = 5001,
    num_cpus: int | None = None,
    timeout: float = STARTUP_WAIT_S,
) -> LocalCluster:
    """Start the head and the MLflow server; returns what is running (idempotent)."""
    root = Path(root).resolve()
    state = read_state(root)
    if state is not None and ours(state.ray_pid, state.ray_started) and ours(state.mlflow_pid, state.mlflow_started):
        return state
    if state is not None:
        down(root)
    state_dir = root / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    storage = state_dir / "storage"
    storage.mkdir(exist_ok=True)
    tracking = f"http://127.0.0.1:{mlflow_port}"
    address = f"http://127.0.0.1:{dashboard_port}"

    # the MLflow server: SQLite store, artifacts proxied by the server (jobs upload through it)
    db = f"sqlite:///{state_dir / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(db).search_experiments()  # creates the schema before the server's workers race to

    # the Ray head: dashboard and job server on loopback; token auth (Ray's default) stays on.
    # It starts while the MLflow server does.
    ray_log = state_dir / "ray.log"
    # No fixed port besides the three named: Ray's defaults collide with any other Ray on the
    # machine (a `make run`, a notebook's ray.init, a second project's head). The job agent's HTTP
    # port (default 52365) goes to the OS: an agent that cannot bind stays up without HTTP, and
    # every job submission is refused with "No available agent". The Ray Client server (default
    # 10001; ganflow never uses ray://, and `ray start` cannot leave it out) takes a port free now:
    # a taken one kills the whole head.
    command = [
        tool("ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(ray_port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--dashboard-agent-listen-port",
        "0",
        "--ray-client-server-port",
        str(free_port()),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    auth_mode = os.environ.get("RAY_AUTH_MODE", "token")
    if auth_mode == "token":
        ensure_auth_token(timeout)
    ray_proc = _spawn(command, ray_log, env={"RAY_AUTH_MODE": auth_mode, "RAY_worker_niceness": "0"})
    try:
        mlflow_proc = start_mlflow_server(
            db,
            mlflow_port,
            state_dir / "mlflow.log",
            ["--artifacts-destination", str(state_dir / "mlartifacts")],
            timeout,
        )
        try:
            _wait(lambda: _job_server_ready(address), f"Ray head (job server {address})", timeout, ray_proc, ray_log)
        except BaseException:
            _stop(mlflow_proc.pid)
            raise
    except BaseException:
        _stop(ray_proc.pid, RAY_GRACE_S)
        raise
    state = LocalCluster(
        str(root),
        ray_proc.pid,
        mlflow_proc.pid,
        address,
        ray_port,
        tracking,
        str(storage),
        _started(ray_proc.pid),
        _started(mlflow_proc.pid),
    )
    (state_dir / "cluster.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    return state


def ensure_auth_token(timeout: float = STARTUP_WAIT_S) -> None:
    """`ray start` refuses to start without a token (unlike ray.init, it never makes one): on a
    machine where no local Ray ever ran, ~/.ray/auth_token does not exist yet."""
    subprocess.run(
        [tool("ray"), "get-auth-token", "--generate"],
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        check=True,
        timeout=timeout,
    )


def _job_server_ready(address: str) -> bool:
    from ganflow.jobs import job_client

    job_client(address).list_jobs()
    return True


def down(root: Path) -> LocalCluster | None:
    """Stop what `up` started (the stores stay); returns what was stopped, or None."""
    root = Path(root).resolve()
    state = read_state(root)
    if state is None:
        return None
    for what, pid, started, grace in (
        ("Ray head", state.ray_pid, state.ray_started, RAY_GRACE_S),
        ("MLflow server", state.mlflow_pid, state.mlflow_started, 30.0),
    ):
        if ours(pid, started):
            _stop(pid, grace)
        elif _alive(pid):  # the pid now names another process: never signal it
            print(
                f"cluster down: pid {pid} is no longer the {what} this project started; left it alone", file=sys.stderr
            )
    # the head's address file, which `ray.init()` and `ray status` would otherwise try to join
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        if current.read_text().strip().endswith(f":{state.gcs_port}"):
            current.unlink()
    except OSError:
        pass
    (root / STATE_DIR / "cluster.json").unlink(missing_ok=True)
    return state


def describe(state: LocalCluster) -> str:
    import yaml

    lines = [
        f"Ray head: job server and dashboard {state.address}, GCS port {state.gcs_port} (pid {state.ray_pid})",
        f"MLflow server: {state.tracking_uri} (pid {state.mlflow_pid}); UI at the same address",
        f"shared storage: {state.storage_path}",
        "To run the prepare, tune and train stages as Ray jobs on it, set in params.yaml:",
        "",
        *("  " + line for line in yaml.safe_dump(state.params(), sort_keys=False).splitlines()),
        "",
        "Job clients need the cluster's token: RAY_AUTH_MODE=token, and the token in ~/.ray/auth_token",
        "(written by the head) or RAY_AUTH_TOKEN.",
    ]
    return "\n".join(lines)
