"""Scaling: training throughput with 1, 2 (and, on a GPU machine, more) Ray Train workers, on one
node and over two simulated nodes (ray.cluster_utils.Cluster), as ratios to 1 worker.

    .venv/bin/python benchmarks/scaling.py [--epochs 3] [--image-size 32] [--width 64] [--batch-size 64] [--smoke]

Every configuration is the real train stage's driver (ganflow.training.run_training: DDP,
MLflow logging, EMA, checkpoints), each in a fresh process, on the same prepared digits, one
after another on this machine. Images/s is the median over the epochs after the first (the
loop's own measurement, whole global batches). The fixed start-up of fit() is not in it.

On CPU, 1 worker = 1 CPU: more workers only help while there are free cores. With CUDA, the
GPU rows use 1..N GPUs of this machine (use_gpu, one GPU per worker). --smoke: 1 epoch of 16 px,
narrow networks, only the 1-worker-1-node and 2-workers-2-nodes rows (checks the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve()


def write_params(root: Path, args: argparse.Namespace, name: str, workers: int, gpu: bool) -> Path:
    params = root / f"params-{name}.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "paths": {
                    "prepared": str(root / "prepared"),
                    "encoder": str(root / "encoder"),
                    "generator": str(root / f"gen-{name}"),
                    "metrics": str(root / f"metrics-{name}"),
                    "plots": str(root / f"plots-{name}"),
                    "mlflow_db": str(root / "mlflow.db"),
                    "ray_results": str(root / "ray_results"),
                },
                "data": {"image_size": args.image_size},
                "model": {"g_width": args.width, "d_width": args.width},
                "train": {
                    "epochs": args.epochs,
                    "tick_kimg": 0.001,  # every epoch a tick
                    "batch_size": args.batch_size * (workers if args.weak else 1),
                },
                "eval": {
                    "every": 1000,
                    "encoder_epochs": 1,
                    "num_samples": 200,
                    "kid_subsets": 5,
                    "kid_subset_size": 100,
                },
                "cluster": {"num_workers": workers, "cpus_per_worker": 1, "use_gpu": gpu},
            }
        )
    )
    return params


def measure(params: Path) -> None:
    """In a child process: one training, its steady images/s as JSON on the last line."""
    from ganflow.config import load_config
    from ganflow.training import run_training

    cfg = load_config(params)
    summary = run_training(cfg, cfg.train.lr_g, cfg.train.lr_d)
    steady = [row["imgs_per_sec"] for row in summary.history[1:]] or [summary.history[0]["imgs_per_sec"]]
    print(json.dumps({"imgs_per_sec": statistics.median(steady)}))


def run_one(params: Path, address: str | None) -> float:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    proc = subprocess.run(
        [sys.executable, str(HERE), "--measure", str(params)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{params.name}: training failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["imgs_per_sec"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (per worker with --weak)")
    parser.add_argument("--weak", action="store_true", help="weak scaling: the batch grows with the workers")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.image_size, args.width = 1, 16, 8
    if args.measure:
        measure(Path(args.measure))
        return 0

    import torch

    from ganflow.config import load_config
    from ganflow.data import prepare
    from ganflow.encoder import fit_encoder

    gpus = torch.cuda.device_count()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_params(root, args, "base", 1, False)
        prepare(load_config(base))
        fit_encoder(load_config(base))  # the train stage checks for it; evaluation is off (eval.every)

        configs = [("1 worker, 1 node", 1, False, None)]
        if not args.smoke:
            configs.append(("2 workers, 1 node", 2, False, None))
        for n in range(1, (min(gpus, 1) if args.smoke else gpus) + 1):
            configs.append((f"{n} GPU worker(s), 1 node", n, True, None))
        for name, workers, gpu, _ in configs:
            rows.append((name, run_one(write_params(root, args, name.replace(" ", "_"), workers, gpu), None)))

        from ray.cluster_utils import Cluster

        from ganflow.raycluster import set_ray_env

        set_ray_env()  # the simulated nodes' workers at normal priority, as a stage's local Ray
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            if not args.smoke:
                rows.append(("1 worker, 2 nodes", run_one(write_params(root, args, "n2w1", 1, False), cluster.address)))
            rows.append(("2 workers, 2 nodes", run_one(write_params(root, args, "n2w2", 2, False), cluster.address)))
        finally:
            cluster.shutdown()

    baseline = rows[0][1]
    print(
        f"machine: {os.cpu_count()} CPUs, {gpus} GPU(s), torch {torch.__version__}; {args.image_size}px, "
        f"widths {args.width}, batch {args.batch_size}{' per worker' if args.weak else ' global'}, "
        f"{args.epochs} epochs"
    )
    print(f"{'configuration':28s} {'img/s':>9s}  {'vs 1 worker, 1 node':>20s}")
    for name, rate in rows:
        print(f"{name:28s} {rate:9.1f}  {rate / baseline:20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
