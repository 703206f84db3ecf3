"""Where the CPU goes while the pipeline runs: training workers against Ray's control actors.

    .venv/bin/python benchmarks/cpu_share.py [--interval 0.5] [-- COMMAND ...]   (default: dvc repro -f)
    .venv/bin/python benchmarks/cpu_share.py --smoke

Runs COMMAND in the current directory and samples it and every process under it with psutil
(CPU time since the previous sample; Ray's processes of a local Ray descend from the stage that
started it), classified by process title:
  training workers   ray::RayTrainWorker (the GAN loop of a TorchTrainer: the train stage's DDP
                     ranks, and the sweep's trials when they have several workers)
  trials             ray::ImplicitFunc (a Tune trial: the GAN loop itself when the trial has one
                     worker, ganflow's default; a TorchTrainer's driver otherwise)
  Ray control actors the other ray:: actors (TrainController, SynchronizationActor,
                     PlacementGroupCleaner, DatasetManager, autoscaling coordinator, queues, idle
                     workers)
  Ray system         gcs_server, raylet, dashboard, agents, log monitor
  stage drivers      the pipelines/*.py processes and dvc
  other              everything else under COMMAND (make, shells, ...)
A process's CPU in its last sampling interval before it exits is not counted (at most
--interval seconds each). Prints each class's CPU seconds and share, and the training workers' share of all the CPU the
run used (the figure to raise; trials count as training, as their process runs the loop when
single-worker). --smoke: samples a 2-second busy loop instead (checks the script
runs and classifies).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict

import psutil

CLASSES = ("training workers", "trials", "Ray control actors", "Ray system", "stage drivers", "other")
RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor.py", "runtime_env")


def classify(name: str, cmdline: list[str]) -> str:
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::RayTrainWorker"):
        return "training workers"
    if title.startswith("ray::ImplicitFunc"):
        return "trials"
    if title.startswith("ray::"):
        return "Ray control actors"
    text = " ".join(cmdline) or name
    if any(key in text for key in RAY_SYSTEM) and "ray" in text:
        return "Ray system"
    if "pipelines/" in text or "dvc" in name or (cmdline[1:2] and cmdline[1].endswith("/dvc")):
        return "stage drivers"
    return "other"


def cpu_times(root: int) -> dict[int, tuple[str, float]]:
    """(class, CPU seconds so far) of ``root`` and every process under it."""
    out = {}
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                out[proc.pid] = (classify(proc.name(), proc.cmdline()), times.user + times.system)
        except psutil.Error:
            continue
    return out


def measure(command: list[str], interval: float) -> tuple[dict[str, float], float, int]:
    """Run ``command``; CPU seconds per class while it ran, its wall time, its exit status."""
    seen: dict[int, tuple[str, float]] = {}
    totals: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    while True:
        time.sleep(interval)
        now = cpu_times(proc.pid)  # empty once the command has been reaped
        done = proc.poll() is not None
        for pid, (cls, used) in now.items():
            before = seen.get(pid)
            # a new process counts from 0; a reused pid with less CPU than before is a new one
            delta = used - before[1] if before is not None and used >= before[1] else used
            totals[cls] += delta
        seen.update(now)
        if done:
            break
    return dict(totals), time.perf_counter() - started, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    parser.add_argument("command", nargs="*", help="default: dvc repro -f")
    args = parser.parse_args()
    if args.smoke:
        command = [
            sys.executable,
            "-c",
            "import time; t = time.time(); [0 for _ in iter(lambda: time.time() - t < 2, False)]",
        ]
    else:
        command = args.command or [os.path.join(os.path.dirname(sys.executable), "dvc"), "repro", "-f"]
    totals, wall, status = measure(command, args.interval)
    used = sum(totals.values())
    print(
        f"\n{' '.join(command)[:100]}: exit {status}, {wall:.0f} s wall, {used:.0f} CPU s on "
        f"{os.cpu_count()} CPUs ({used / wall / (os.cpu_count() or 1):.0%} of the machine)"
    )
    print(f"{'class':20s} {'CPU s':>8s} {'share':>6s}")
    for cls in CLASSES:
        print(f"{cls:20s} {totals.get(cls, 0.0):8.1f} {totals.get(cls, 0.0) / max(used, 1e-9):6.1%}")
    ray_side = sum(totals.get(c, 0.0) for c in ("Ray control actors", "Ray system"))
    training = totals.get("training workers", 0.0) + totals.get("trials", 0.0)
    if training > 0:
        print(
            f"training (workers and trials) share of the CPU used: {training / used:.1%}; Ray's control "
            f"actors and system per training CPU second: {ray_side / training:.3f}"
        )
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
