"""Soak: fresh default `make run`s in a row on a loaded machine, and what each lost to restarts.

    python3 benchmarks/soak.py [--runs 3] [--repo REPO] [--workdir /tmp/ganflow-soak]
                               [--hogs N] [--no-suite] [--idle-eval FILE] [--idle-run]
    python3 benchmarks/soak.py --smoke

Each run is `make run` in a fresh `git clone` of --repo (its own .venv, data, MLflow store and
local Ray: exactly the README's first command). Beside the runs, for as long as they last:
  - a busy loop (`yes > /dev/null`) per core (--hogs, default the core count);
  - the full test suite, `make test` in a fresh clone of its own (the README's second command),
    started again whenever it ends, so that every run has it beside it.
--idle-run first does one `make run` with nothing beside it, the reference; --idle-eval FILE
names the eval.json of an earlier idle run instead.

Per run it prints: exit status, wall time, worker restarts and their causes (metrics/train.json's
`worker_restarts`/`worker_restart_causes`, which the train stage also logs to MLflow), the lines
of the run's log that name Ray's placement-group cleaner or a worker-group failure, and the test
split's fd_domain / real baseline (mean ± sd over latent draws) next to the idle run's. Each
suite pass prints its pytest summary line. The figures go to WORKDIR/soak.json as well.

Uses only the standard library: run it with any python3; the clones install what they need.
--smoke: a fake `make run` (a tiny script) instead of the pipeline, one run, one hog, no suite:
checks the script's own logic in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# Log lines that say a worker group was lost or Ray's cleaner acted (ganflow's restart recorder
# names the cause in metrics/train.json; these are the raw traces in the stage's output).
TRACES = re.compile(
    r"PlacementGroupCleaner|placement group.*(removed|cleaned)|WorkerGroupError|"
    r"worker group .*(failed|died)|restarting the worker group|ActorDiedError",
    re.IGNORECASE,
)


def clone(repo: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)


def make(target: str, cwd: Path, log: Path, extra: list[str] | None = None) -> tuple[int, float]:
    """`make TARGET` in ``cwd``, its output into ``log``; (exit status, wall seconds)."""
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.call(["make", target, *(extra or [])], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - start


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_once(name: str, repo: Path, workdir: Path, smoke: bool) -> dict:
    """One fresh clone and `make run`; what it cost and what it lost."""
    root = workdir / name
    clone(repo, root)
    log = workdir / f"{name}.log"
    if smoke:  # stands in for the pipeline: writes the two files the report reads
        (root / "Makefile").write_text(
            '.venv/.ganflow-run:\n\ttrue\nrun:\n\t@mkdir -p metrics && echo \'{"worker_restarts": 0, "worker_restart_causes": []}\' '
            '> metrics/train.json && echo \'{"fd_domain_over_real": 1.0, "fd_domain_over_real_sd": 0.1}\' '
            "> metrics/eval.json && echo '(PlacementGroupCleaner pid=1) a line the report must find'\n"
        )
    install_rc, install_s = make(".venv/.ganflow-run", root, workdir / f"{name}-install.log")  # the venv, untimed below
    rc, wall = make("run", root, log) if install_rc == 0 else (install_rc, 0.0)
    train, evaluation = read_json(root / "metrics" / "train.json"), read_json(root / "metrics" / "eval.json")
    traces = [line.strip()[:200] for line in log.read_text(errors="replace").splitlines() if TRACES.search(line)]
    return {
        "run": name,
        "rc": rc,
        "install_s": round(install_s, 1),
        "wall_s": round(wall, 1),
        "worker_restarts": train.get("worker_restarts"),
        "causes": train.get("worker_restart_causes", []),
        "log_traces": traces[:20],
        "over_real": evaluation.get("fd_domain_over_real"),
        "over_real_sd": evaluation.get("fd_domain_over_real_sd"),
        "log": str(log),
    }


class Suite(threading.Thread):
    """`make test` in its own fresh clone, again and again until told to stop."""

    def __init__(self, repo: Path, workdir: Path):
        super().__init__(daemon=True)
        self.root, self.workdir, self.passes = workdir / "suite", workdir, []
        clone(repo, self.root)
        self.stopping, self.proc = threading.Event(), None

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            log = self.workdir / f"suite-{n}.log"
            start = time.monotonic()
            with log.open("w") as out:
                self.proc = subprocess.Popen(
                    ["make", "test"], cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                rc = self.proc.wait()
            text = log.read_text(errors="replace").strip().splitlines()
            summary = next((line for line in reversed(text) if re.search(r"\b(passed|failed|error)", line)), "")
            done = {
                "pass": n,
                "rc": rc,
                "wall_s": round(time.monotonic() - start, 1),
                "summary": summary.strip("= "),
                "complete": not self.stopping.is_set(),
            }
            self.passes.append(done)
            print(
                f"suite pass {n}: exit {rc}, {done['wall_s'] / 60:.1f} min: {done['summary']}"
                + ("" if done["complete"] else " (stopped: the runs had ended)"),
                flush=True,
            )

    def stop(self) -> None:
        self.stopping.set()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
        self.join(timeout=120)


def fmt(result: dict, idle: dict | None) -> str:
    ratio = "-" if result["over_real"] is None else f"{result['over_real']:.2f} ± {result['over_real_sd'] or 0:.2f}"
    if idle and idle.get("fd_domain_over_real") is not None and result["over_real"] is not None:
        gap = abs(result["over_real"] - idle["fd_domain_over_real"])
        spread = (result["over_real_sd"] or 0) + (idle.get("fd_domain_over_real_sd") or 0)
        ratio += f" (idle {idle['fd_domain_over_real']:.2f}: {'within' if gap <= spread else 'outside'} the spreads)"
    causes = "; ".join(result["causes"]) or "-"
    return (
        f"{result['run']}: exit {result['rc']}, {result['wall_s'] / 60:.1f} min, worker restarts "
        f"{result['worker_restarts']} ({causes}), cleaner/worker-group lines in the log {len(result['log_traces'])}, "
        f"test fd_domain / real {ratio}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--workdir", type=Path, help="default /tmp/ganflow-soak (--smoke: ./soak-smoke)")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-suite", action="store_true")
    parser.add_argument("--idle-eval", type=Path, help="eval.json of an idle run to compare with")
    parser.add_argument("--idle-run", action="store_true", help="first one make run with nothing beside it")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.hogs, args.no_suite, args.idle_run = 1, 1, True, False
        args.workdir = args.workdir or Path.cwd() / "soak-smoke"
    args.workdir = args.workdir or Path("/tmp/ganflow-soak")
    if args.runs < 1 or args.hogs < 0:
        print("error: --runs must be >= 1 and --hogs >= 0", file=sys.stderr)
        return 2
    if not (args.repo / ".git").exists():
        print(f"error: --repo {args.repo} is not a git repository", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"soak of {args.repo} at {commit}: {args.runs} fresh make runs beside "
        f"{'no suite' if args.no_suite else 'the test suite (make test, looped)'} and {args.hogs} busy loop(s); "
        f"in {args.workdir}",
        flush=True,
    )

    idle = read_json(args.idle_eval) if args.idle_eval else None
    report: dict = {"commit": commit, "hogs": args.hogs, "runs": [], "suite": []}
    if args.idle_run:
        first = run_once("idle", args.repo, args.workdir, args.smoke)
        print(fmt(first, None) + "  [idle reference]", flush=True)
        report["idle"] = first
        idle = read_json(args.workdir / "idle" / "metrics" / "eval.json")

    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs)]
    suite = None if args.no_suite else Suite(args.repo, args.workdir)
    try:
        if suite:
            suite.start()
        for i in range(1, args.runs + 1):
            result = run_once(f"run-{i}", args.repo, args.workdir, args.smoke)
            report["runs"].append(result)
            print(fmt(result, idle), flush=True)
            for line in result["log_traces"]:
                print(f"    log: {line}", flush=True)
    finally:
        if suite:
            suite.stop()
            report["suite"] = suite.passes
        for hog in hogs:
            hog.kill()
            hog.wait()
    (args.workdir / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    restarts = sum(r["worker_restarts"] or 0 for r in report["runs"])
    failed = [r["run"] for r in report["runs"] if r["rc"] != 0]
    print(
        f"{len(report['runs'])} loaded runs: {restarts} worker restart(s) in all; "
        f"{'all exited 0' if not failed else 'failed: ' + ', '.join(failed)} -> {args.workdir / 'soak.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
