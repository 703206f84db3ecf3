"""A stage stops when the `dvc repro` that runs it dies, whichever shell dvc runs it through
(bash execs the command; dash stays in between), and only under dvc: a stage started by hand
outlives the process that started it. No Ray here: the stage is a small Python process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    def stopped(signum, frame):
        (out / "stopped").write_text("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    from ganflow.stage import stop_with_dvc
    stop_with_dvc()
    (out / "pid").write_text(str(os.getpid()))
    time.sleep(120)
""")

# stands in for dvc: runs the stage as `$SHELL -c CMD` (dvc/stage/run.py), then waits
CALLER = textwrap.dedent("""
    import subprocess, sys, time
    shell, cmd = sys.argv[1], sys.argv[2]
    subprocess.Popen([shell, "-c", cmd])
    time.sleep(120)
""")


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def start(tmp_path: Path, shell: str, under_dvc: bool) -> subprocess.Popen:
    (tmp_path / "stage.py").write_text(STAGE)
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    env["PYTHONPATH"] = str(ROOT)
    if under_dvc:
        env["DVC_STAGE"] = "train"
    cmd = f"{sys.executable} {tmp_path / 'stage.py'} {tmp_path}"  # one command, as in dvc.yaml
    caller = subprocess.Popen([sys.executable, "-c", CALLER, shell, cmd], env=env)
    assert wait_for(tmp_path / "pid", 60), "the stage did not start"
    return caller


def stage_alive(tmp_path: Path) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{(tmp_path / 'pid').read_text()}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


SHELLS = [s for s in ("/bin/sh", shutil.which("dash"), shutil.which("bash")) if s]


@pytest.mark.parametrize("shell", sorted(set(SHELLS)))
def test_stage_stops_when_dvc_dies(tmp_path, shell):
    caller = start(tmp_path, shell, under_dvc=True)
    assert not (tmp_path / "stopped").exists()
    caller.kill()  # dvc dies at once on SIGTERM, telling nobody
    caller.wait()
    assert wait_for(tmp_path / "stopped", 10), f"the stage under {shell} went on after dvc died"
    deadline = time.time() + 10
    while stage_alive(tmp_path) and time.time() < deadline:
        time.sleep(0.05)
    assert not stage_alive(tmp_path)


def test_stage_started_by_hand_outlives_its_caller(tmp_path):
    caller = start(tmp_path, "/bin/sh", under_dvc=False)
    try:
        caller.kill()
        caller.wait()
        time.sleep(2)  # four times the watcher's poll interval
        assert not (tmp_path / "stopped").exists()
        assert stage_alive(tmp_path)
    finally:
        if stage_alive(tmp_path):
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
