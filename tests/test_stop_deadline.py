"""Ctrl-C ends a stage even when the code it is in swallows the interrupt (ganflow.interrupts).

Each case runs a small program in its own session, SIGINT restored to its default as in a
terminal, and signals it the way a terminal or `kill` does. No Ray: the point is what happens when
the library under the stage misbehaves, which these programs do on purpose."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ganflow.stage import run_main
    from ganflow.interrupts import Interrupted, stop_on_signals

    out = Path(sys.argv[1])
    mode, deadline = sys.argv[2], float(sys.argv[3])

    def work():
        with stop_on_signals("the work", on_deadline=lambda: (out / "cleaned").write_text("by the watcher"),
                             deadline_s=deadline) as quiet:
            (out / "started").write_text("")
            try:
                while True:
                    if mode == "swallow":  # a library that catches KeyboardInterrupt and goes on
                        try:
                            time.sleep(0.05)
                        except KeyboardInterrupt:
                            (out / "swallowed").write_text("")
                    else:
                        time.sleep(0.05)
            except KeyboardInterrupt:
                quiet()
                (out / "cleaned").write_text("by the caller")
                raise Interrupted("the work interrupted; cleaned up") from None

    sys.exit(run_main(work))
""")


def start(tmp_path: Path, mode: str, deadline: float, sigint=signal.SIG_DFL) -> subprocess.Popen:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), mode, str(deadline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),  # a terminal's default, or nohup's ignore
    )
    limit = time.time() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < limit, "the program did not start"
        time.sleep(0.05)
    return proc


def test_ctrl_c_takes_the_usual_path_when_nothing_swallows_it(tmp_path: Path):
    proc = start(tmp_path, "plain", deadline=600)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "error: the work interrupted; cleaned up"
    assert (tmp_path / "cleaned").read_text() == "by the caller"


def test_ctrl_c_swallowed_by_a_library_still_ends_the_process_at_the_deadline(tmp_path: Path):
    proc = start(tmp_path, "swallow", deadline=1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert (tmp_path / "swallowed").exists()  # the usual path really was defeated
    assert proc.returncode == 130, err
    assert err.strip() == "error: the work interrupted and still running 1 s after the signal: ended it"
    assert (tmp_path / "cleaned").read_text() == "by the watcher"


def test_a_second_ctrl_c_ends_it_at_once(tmp_path: Path):
    proc = start(tmp_path, "swallow", deadline=3600)  # only the second Ctrl-C can end it in time
    os.killpg(proc.pid, signal.SIGINT)
    limit = time.time() + 120
    while not (tmp_path / "swallowed").exists():
        assert time.time() < limit and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "still running a second Ctrl-C: ended it" in err
    assert (tmp_path / "cleaned").read_text() == "by the watcher"


def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops(tmp_path: Path):
    proc = start(tmp_path, "plain", deadline=600, sigint=signal.SIG_IGN)  # e.g. `nohup ... &`
    os.killpg(proc.pid, signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)  # (a bound on a non-event: the signal is ignored, nothing can arrive)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "error: the work interrupted; cleaned up"
