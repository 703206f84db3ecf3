"""Ctrl-C and SIGTERM end a stage within seconds, whatever the libraries underneath do with them.

The stages spend their time inside Ray (``Tuner.fit``, ``TorchTrainer.fit``, a job's log stream):
a Python signal handler only runs when the main thread gets back to Python code, and a library
that catches ``KeyboardInterrupt`` in the wrong place, or a shutdown that waits on a busy cluster,
can keep the stage going long after the user pressed Ctrl-C. So ``stop_on_signals`` does two
things while the work runs:

- the usual path: the first SIGINT or SIGTERM raises ``KeyboardInterrupt`` in the main thread; the
  caller cleans up (marks its MLflow runs KILLED, stops its Ray job) and raises ``Interrupted``;
- a deadline that does not depend on the main thread: the signal is also written to a pipe
  (``signal.set_wakeup_fd``, done by the interpreter's C-level handler the moment the signal
  arrives), and a watcher thread reading it gives the usual path ``STOP_DEADLINE_S`` seconds. If
  the process is still alive then, or on a second Ctrl-C, the watcher runs the caller's
  ``on_deadline`` clean-up itself, prints the one-line error and ends the process with exit status
  130. Ray's local processes share the driver's fate (the kernel ends them with it); on a
  cluster, the job's actors and placement groups go with its driver.

A SIGINT that the process inherited as ignored (``nohup``, a background job of a script) stays
ignored, as the shell intended; SIGTERM still stops it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from ganflow.errors import GanflowError

STOP_DEADLINE_S = float(os.environ.get("GANFLOW_STOP_DEADLINE_S", "20"))
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT


class Interrupted(GanflowError):
    """Stopped by Ctrl-C or SIGTERM (exit status 130, as a shell reports SIGINT)."""

    exit_code = EXIT_INTERRUPTED


@contextlib.contextmanager
def stop_on_signals(
    what: str, on_deadline: Callable[[], object] | None = None, deadline_s: float | None = None
) -> Iterator[Callable[[], None]]:
    """Run the body with SIGINT/SIGTERM raising ``KeyboardInterrupt`` once, and a hard deadline.

    Yields ``quiet()``: the caller's clean-up calls it first, so that a second signal cannot cut
    the clean-up short (it ends the process through the deadline path instead). ``what`` names the
    work in the deadline's error line; ``on_deadline`` is the clean-up the watcher runs itself when
    the deadline passes (best effort, bounded, errors ignored). Outside the main thread the body
    just runs (signals are delivered to the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    deadline_s = STOP_DEADLINE_S if deadline_s is None else deadline_s
    state = {"quiet": False, "body_done": False}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def interrupt(signum, frame):
        if state["quiet"]:
            return
        state["quiet"] = True
        raise KeyboardInterrupt

    def quiet() -> None:
        state["quiet"] = True

    previous_term = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(
        target=_watch,
        args=(read_fd, what, on_deadline, deadline_s, state),
        daemon=True,
        name="ganflow-stop-deadline",
    )
    watcher.start()
    signalled = False
    try:
        yield quiet
    finally:
        state["body_done"] = True
        signalled = state["quiet"]
        signal.set_wakeup_fd(previous_fd)
        if signalled:
            # the process is on its way out (the caller raises Interrupted): later signals (dvc's
            # death can be reported twice) must not cut its clean-up or its error line short, and
            # the watcher stays armed in case the exit itself hangs (Ray's shutdown at exit)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if previous_int is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)
        os.close(write_fd)  # the watcher reads end-of-file: it returns, or keeps its deadline


def _watch(read_fd: int, what: str, on_deadline: Callable[[], object] | None, deadline_s: float, state: dict) -> None:
    stops = (signal.SIGINT, signal.SIGTERM)
    first_at: float | None = None
    open_pipe = True
    try:
        while True:
            if first_at is None:
                if not open_pipe:
                    return  # the body ended without a signal
                timeout = None
            else:
                timeout = first_at + deadline_s - time.monotonic()
                if timeout <= 0:
                    break
            if open_pipe:
                ready, _, _ = select.select([read_fd], [], [], timeout)
            else:
                time.sleep(timeout or 0)
                ready = []
            if not ready:
                continue
            data = os.read(read_fd, 64)
            if not data:
                open_pipe = False
                continue
            for signum in data:
                if signum not in stops:
                    continue
                if first_at is None:
                    first_at = time.monotonic()
                elif signum == signal.SIGINT:  # Ctrl-C twice: no more waiting
                    _hard_stop(what, on_deadline, state, reason="a second Ctrl-C")
    finally:
        with contextlib.suppress(OSError):
            os.close(read_fd)
    _hard_stop(what, on_deadline, state, reason=f"{deadline_s:g} s after the signal")


def _hard_stop(what: str, on_deadline: Callable[[], object] | None, state: dict, reason: str) -> None:
    """End the process now: the caller's clean-up (bounded), one line, exit 130."""
    if not state["body_done"] and on_deadline is not None:
        worker = threading.Thread(target=_best_effort, args=(on_deadline,), daemon=True)
        worker.start()
        worker.join(timeout=10.0)
    if not state["body_done"]:  # otherwise the caller has printed its own line already
        sys.stderr.write(f"error: {what} interrupted and still running {reason}: ended it\n")
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def _best_effort(fn: Callable[[], object]) -> None:
    with contextlib.suppress(BaseException):
        fn()
