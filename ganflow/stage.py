"""What every DVC stage entry point (pipelines/*.py) shares: ``--params``, one-line errors and
exit codes, stopping with a dying ``dvc repro``. Kept apart from cli.py, which reaches every
module: a stage's import closure (its DVC dependencies) is what it uses, not the whole CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ganflow.config import DEFAULT_PARAMS, Config, load_config
from ganflow.errors import GanflowError


def run_main(fn: Callable[[], int | None]) -> int:
    """Run an entry point; a user error becomes one line on stderr and a non-zero exit code."""
    try:
        return fn() or 0
    except GanflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _proc_stat(pid: int) -> tuple[str, int]:
    """(command name, parent pid) of a process, from /proc (Linux)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    name_end = text.rindex(")")  # the name may itself hold spaces and parentheses
    return text[text.index("(") + 1 : name_end], int(text[name_end + 2 :].split()[1])


def stop_with_dvc() -> None:
    """Under `dvc repro` (Linux): stop like on Ctrl-C when dvc dies. dvc dies on SIGTERM without
    passing it on, and the stage would go on unseen, its MLflow run RUNNING. dvc runs a stage
    through ``$SHELL -c`` (``/bin/sh`` when SHELL is unset): bash and zsh exec the command, so dvc
    is our parent and the kernel sends us SIGTERM when it dies (PR_SET_PDEATHSIG); dash stays in
    between, so a watcher thread sees the shell re-parented and sends us SIGTERM itself. Training
    turns SIGTERM into a KILLED run; the next `dvc repro` resumes from the checkpoint.

    Only under dvc (DVC_STAGE set): a stage started by hand, or with ``nohup``, outlives its shell.
    """
    if not sys.platform.startswith("linux") or "DVC_STAGE" not in os.environ:
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:  # the parent was gone before the call
        os.kill(os.getpid(), signal.SIGTERM)
        return
    try:
        name, grandparent = _proc_stat(parent)
    except (OSError, ValueError, IndexError):
        return
    if name in SHELLS and grandparent > 1:
        import threading

        threading.Thread(
            target=_watch_shell_parent, args=(parent, grandparent), daemon=True, name="ganflow-stop-with-dvc"
        ).start()


def _watch_shell_parent(shell: int, caller: int, every: float = 0.5) -> None:
    """SIGTERM to this process once ``caller`` (dvc), the parent of our parent ``shell``, is gone."""
    import signal
    import time

    while True:
        time.sleep(every)
        try:
            alive = _proc_stat(shell)[1] == caller  # a shell whose parent died is re-parented
        except (OSError, ValueError, IndexError):
            alive = False  # the shell is gone too (PR_SET_PDEATHSIG has fired as well)
        if not alive:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def stage_main(doc: str, stage: Callable[[Config], None], argv: Sequence[str] | None = None) -> int:
    """The whole ``main()`` of a pipelines/ entry point: ``--params``, load, run, one-line errors."""
    stop_with_dvc()
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    return run_main(lambda: stage(load_config(args.params)))
