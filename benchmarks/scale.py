"""Large image folders: parallel preparation against a single-process loop, and memory that does
not grow with the data set, in preparing and in reading an epoch for training.

    .venv/bin/python benchmarks/scale.py [--sizes 10000,50000] [--image-size 64] [--smoke]

For each size, generates a folder of that many seeded RGB PNGs (image-size px, in two class
folders, with a few unreadable files among them) and runs the prepare stage's code on it twice in
fresh processes: with data.prepare_workers: auto (the stage and one more process per other core) and with 0 (a
single-process decode loop, the baseline). Prints per size and mode: prepare images/s, the ratio
parallel / single, and the peak resident memory of the stage's process tree (the stage plus its
decoding processes, sampled every 20 ms). Both modes write the same bytes (checked here too).
Then it reads one training epoch of the prepared train split (batches of 64, as the train stage's
worker gets them, float tensors) in a fresh process per ingest: ``local`` (the DataLoader over the
shards) and ``ray_data`` (streamed through Ray Data from a local Ray the process starts, raylet and
read workers included in the process tree), and prints images/s (of the second epoch, and of the first, which pays the start-up) and peak RSS
of each.
Last, the whole train stage (pipelines/train.py: a local Ray, one worker with every core, MLflow,
checkpoints, export) for one epoch of each size, narrow networks (widths 16: the data path is what
is measured, not the model), after fitting a 1-epoch encoder there (not measured): its wall time
and the peak RSS of its process tree (the stage, the raylet and GCS it starts, the Ray workers), with
the stage, Ray's workers and Ray's system processes' shares of that peak.
--smoke: 300 and 600 images of 16 px, Ray Data and the train stage at 600 only (checks the script
runs, not the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

STAGE = """
import json, sys, time
from ganflow.config import load_config
from ganflow.data import prepare
cfg = load_config(sys.argv[1])
started = time.perf_counter()
summary = prepare(cfg)
print(json.dumps({"seconds": time.perf_counter() - started, "count": summary.count}))
"""


INGEST = """
import json, sys, time
import torch
from ganflow.config import load_config
cfg, mode = load_config(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
if mode == "local":
    from ganflow.train_loop import local_batches
    batches = local_batches(cfg, 0, 1, 64, torch.device("cpu"))
else:
    import ray
    from ganflow.ingest import StreamedBatches, shards_root, train_dataset
    from ganflow.raycluster import set_ray_env
    set_ray_env()  # as a stage's own Ray: workers at normal priority
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ds = train_dataset(cfg, shards_root(cfg))
    ds.context.execution_options.preserve_order = True
    (shard,) = ds.streaming_split(1, equal=True)
    batches = StreamedBatches(shard, 0, 0, 64, None).epoch
seconds, total = [], 0.0
for epoch in range(2):  # the first pays Ray Data's start-up; the second is the steady state
    started, images = time.perf_counter(), 0
    for x, y in batches(epoch):
        images += len(x)
        total += float(x[:, :, 0, 0].sum())  # touch the batch
    seconds.append(time.perf_counter() - started)
print(json.dumps({"seconds": seconds[1], "first": seconds[0], "count": images}))
"""


def make_folder(root: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` PNGs of ``size`` px: smooth random colour fields (compressible like photos,
    unlike noise), alternating between two class folders; every 500th file is unreadable."""
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    coarse = max(2, size // 8)
    for i in range(count):
        path = root / ("a", "b")[i % 2] / f"{i:06d}.png"
        if i % 500 == 499:
            path.write_bytes(b"\x89PNG truncated")
            continue
        small = rng.integers(0, 256, (coarse, coarse, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path)


def process_kind(proc: psutil.Process, top: int) -> str:
    """Which part of a stage's process tree ``proc`` is: the stage, a Ray worker, Ray's system."""
    if proc.pid == top:
        return "stage"
    name = proc.name()
    if name.startswith("ray::"):
        return "ray workers"
    if name in ("raylet", "gcs_server") or "/ray/" in " ".join(proc.cmdline()[:3]):
        return "ray system"
    return "other"  # the decoding processes of prepare


def run_stage(params: Path, code: str = STAGE, *args: str) -> tuple[dict, float, dict[str, float]]:
    """Run ``code`` in a fresh process; (its report, peak RSS in MiB of its process tree, that
    peak's MiB by process_kind)."""
    proc = subprocess.Popen([sys.executable, "-c", code, str(params), *args], stdout=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    peak, parts = 0, {}
    while proc.poll() is None:
        try:
            now: dict[str, int] = {}
            for p in [top, *top.children(recursive=True)]:
                try:
                    kind = process_kind(p, top.pid)
                    now[kind] = now.get(kind, 0) + p.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    pass
            if sum(now.values()) > peak:
                peak, parts = sum(now.values()), now
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args) or 'prepare'} failed (exit {proc.returncode}) on {params}")
    # the report is the last line that is one (Ray may print after it)
    report = next(line for line in reversed(out.strip().splitlines()) if line.startswith('{"seconds"'))
    return json.loads(report), peak / 2**20, {k: v / 2**20 for k, v in parts.items()}


def train_stage(root: Path) -> tuple[float, float, dict[str, float]]:
    """Fit a 1-epoch encoder in the prepared project ``root`` (not measured), then run one epoch
    of the train stage there: (wall seconds, peak RSS MiB of its process tree, by process kind)."""
    params = root / "params.yaml"
    params.write_text(
        params.read_text()
        + (
            "model:\n  g_width: 16\n  d_width: 16\n"
            "train:\n  epochs: 1\n  batch_size: 64\n"
            "tune:\n  enabled: false\n"
            "eval:\n  encoder_epochs: 1\n  feature_dim: 16\n  num_samples: 200\n  kid_subsets: 5\n  kid_subset_size: 100\n"
            "cluster:\n  num_workers: 1\n"
        )
    )
    repo = Path(__file__).resolve().parents[1]
    encoder = subprocess.run(
        [sys.executable, str(repo / "pipelines" / "encoder.py"), "--params", str(params)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if encoder.returncode != 0:
        raise SystemExit(f"encoder fit failed on {root}: {encoder.stderr.strip()[-500:]}")
    (root / "tune").mkdir(exist_ok=True)
    (root / "tune" / "best.json").write_text('{"lr_g": 0.0002, "lr_d": 0.0002}\n')  # what tune writes when off
    report, peak, parts = run_stage(params, TRAIN, str(repo / "pipelines" / "train.py"))
    if report.get("rc"):
        raise SystemExit(f"train stage failed on {root} (exit {report['rc']})")
    return report["seconds"], peak, parts


TRAIN = """
import json, runpy, sys, time
params, script = sys.argv[1], sys.argv[2]
sys.argv = [script, "--params", params]
started = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
    rc = 0
except SystemExit as exc:  # the stage's own exit
    rc = exc.code if isinstance(exc.code, int) else 1
print(json.dumps({"seconds": time.perf_counter() - started, "rc": rc}), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    sizes = [300, 600] if args.smoke else [int(s) for s in args.sizes.split(",")]
    image_size = 16 if args.smoke else args.image_size
    rows, reads, trains = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for count in sizes:
            folder = Path(tmp) / f"images-{count}"
            started = time.perf_counter()
            make_folder(folder, count, image_size)
            print(f"{count} images generated in {time.perf_counter() - started:.0f} s", flush=True)
            outputs = {}
            for mode in ("auto", 0):
                root = Path(tmp) / f"p-{count}-{mode}"
                root.mkdir()
                params = root / "params.yaml"
                params.write_text(
                    f"data:\n  source: folder\n  path: {folder}\n  image_size: {image_size}\n  channels: 3\n"
                    f"  prepare_workers: {mode}\n"
                )
                report, peak, _ = run_stage(params)
                rows.append((count, mode, report["count"], report["count"] / report["seconds"], peak))
                prepared = root / "data" / "prepared"
                outputs[mode] = {p.name: p.read_bytes() for p in sorted(prepared.iterdir())}
            if outputs["auto"] != outputs[0]:
                print(f"error: {count} images: the parallel and single-process outputs differ", file=sys.stderr)
                return 1
            # --smoke: Ray Data at the last size only (each read starts a local Ray)
            for mode in ("local", "ray_data") if not args.smoke or count == sizes[-1] else ("local",):
                report, peak, _ = run_stage(Path(tmp) / f"p-{count}-auto" / "params.yaml", INGEST, mode)
                reads.append(
                    (
                        count,
                        mode,
                        report["count"],
                        report["count"] / report["seconds"],
                        peak,
                        report["count"] / report["first"],
                    )
                )
            if not args.smoke or count == sizes[-1]:
                seconds, peak, parts = train_stage(Path(tmp) / f"p-{count}-auto")
                trains.append((count, seconds, peak, parts))

    print(f"\n{image_size} px RGB PNGs, {os.cpu_count()} CPUs; prepare = decode, resize, split, write")
    print(f"{'images':>7s} {'mode':24s} {'img/s':>8s} {'x single':>8s} {'peak RSS MiB':>12s}")
    for count, mode, _kept, rate, peak in rows:
        single = next(r[3] for r in rows if r[0] == count and r[1] == 0)
        name = "parallel (auto)" if mode == "auto" else "single process"
        print(f"{count:7d} {name:24s} {rate:8.0f} {rate / single:8.2f} {peak:12.0f}")
    for mode in ("auto", 0):
        peaks = [r[4] for r in rows if r[1] == mode]
        print(
            f"peak RSS growth {sizes[0]} -> {sizes[-1]} images, {'parallel' if mode == 'auto' else 'single'}: "
            f"{peaks[-1] / peaks[0] - 1:+.0%}"
        )
    print(
        "\ntwo training epochs of the train split, batches of 64 (float tensors), one reader;"
        " img/s of the second epoch (the first: with start-up)"
    )
    print(f"{'images':>7s} {'ingest':24s} {'img/s':>8s} {'x local':>8s} {'1st epoch':>9s} {'peak RSS MiB':>12s}")
    for count, mode, _kept, rate, peak, first in reads:
        local = next(r[3] for r in reads if r[0] == count and r[1] == "local")
        print(f"{count:7d} {mode:24s} {rate:8.0f} {rate / local:8.2f} {first:9.0f} {peak:12.0f}")
    for mode in ("local", "ray_data"):
        peaks = [r[4] for r in reads if r[1] == mode]
        if len(peaks) < 2:
            continue
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} images, {mode} epoch: {peaks[-1] / peaks[0] - 1:+.0%}")
    print(
        "\nthe train stage, one epoch (local Ray, 1 worker with every core, widths 16; wall includes"
        " Ray's start-up, evaluation, export)"
    )
    kinds = ("stage", "ray workers", "ray system", "other")
    print(f"{'images':>7s} {'wall s':>8s} {'peak RSS MiB':>12s}   at the peak, MiB: " + " / ".join(kinds))
    for count, seconds, peak, parts in trains:
        print(f"{count:7d} {seconds:8.1f} {peak:12.0f}   " + " / ".join(f"{parts.get(k, 0):.0f}" for k in kinds))
    if len(trains) > 1:
        print(
            f"peak RSS growth {trains[0][0]} -> {trains[-1][0]} images, train stage: "
            f"{trains[-1][2] / trains[0][2] - 1:+.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
