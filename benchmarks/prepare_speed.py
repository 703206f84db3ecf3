"""Prepare's speed alone: the parallel stage against the single-process loop, in alternating
order, with nothing sampling the processes, beside the ceiling of the decode loop itself.

    .venv/bin/python benchmarks/prepare_speed.py [--images 10000] [--rounds 3] [--smoke]

scale.py measures speed and memory in the same runs, polling the process tree every 20 ms: on a
2-core machine that poller takes from the parallel run's cores, not from the single one's, and
the parallel run always went first. Here each round times both modes (prepare() in a fresh
process, data.prepare_workers auto and 0), the first mode alternating between rounds, then the
ceiling: the bare decode loop (ganflow.data._decode_shard, nothing written) over all files in one
process, and over two halves in two processes at once. The folder is scale.make_folder's (seeded
64 px RGB PNGs, a few unreadable). --smoke: 300 images of 16 px, one round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import scale

CEILING = """
import json, sys, time
from ganflow.config import load_config
from ganflow.data import FILES_PER_SHARD, _decode_shard, _folder_files
cfg = load_config(sys.argv[1])
part, parts = int(sys.argv[2]), int(sys.argv[3])
files = _folder_files(cfg.data.path)[part::parts]
started = time.perf_counter()
for a in range(0, len(files), FILES_PER_SHARD):
    _decode_shard(str(cfg.data.path), files[a:a + FILES_PER_SHARD], cfg.data)
print(json.dumps({"seconds": time.perf_counter() - started, "count": len(files)}))
"""


def report(proc: subprocess.Popen | subprocess.CompletedProcess, out: str) -> dict:
    if proc.returncode != 0:
        raise SystemExit(f"a measured process failed (exit {proc.returncode})")
    return json.loads(next(line for line in reversed(out.strip().splitlines()) if line.startswith('{"seconds"')))


def timed(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    return report(proc, proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    count, rounds, size = (300, 1, 16) if args.smoke else (args.images, args.rounds, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        scale.make_folder(folder, count, size)
        params = {}
        for mode in ("auto", 0):
            root = Path(tmp) / f"p-{mode}"
            root.mkdir()
            params[mode] = root / "params.yaml"
            params[mode].write_text(
                f"data:\n  source: folder\n  path: {folder}\n  image_size: {size}\n"
                f"  channels: 3\n  prepare_workers: {mode}\n"
            )
        print(f"{count} images of {size} px; img/s per round")
        print(
            f"{'round':>5s} {'parallel':>9s} {'single':>8s} {'x single':>8s} {'loop 1':>8s} {'loop 2':>8s} {'x loop 1':>8s}"
        )
        for r in range(rounds):
            seconds = {}
            for mode in ("auto", 0) if r % 2 == 0 else (0, "auto"):
                seconds[mode] = timed(scale.STAGE, str(params[mode]))["seconds"]
            one = timed(CEILING, str(params[0]), "0", "1")["seconds"]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", CEILING, str(params[0]), str(k), "2"], stdout=subprocess.PIPE, text=True
                )
                for k in range(2)
            ]
            two = max(report(p, p.communicate()[0])["seconds"] for p in procs)
            print(
                f"{r:5d} {count / seconds['auto']:9.0f} {count / seconds[0]:8.0f} {seconds[0] / seconds['auto']:8.2f} "
                f"{count / one:8.0f} {count / two:8.0f} {one / two:8.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)")
    sys.exit(code)
