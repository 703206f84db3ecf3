"""The batch size of an evaluation's inference: G and the encoder over one tick's latent draws.

    .venv/bin/python benchmarks/inference_batch.py [--params params.yaml] [--reps 7] [--smoke]

Each in-training evaluation (ganflow.train_loop.evaluate_ema) runs G and the encoder over
eval.tick_samples or more samples; the evaluate stage over eval.draws draws. This times that
inference, G then the encoder as the loop does, for the two shapes the defaults meet: the digits
(32 px, 10 classes, draws of 538, 3 of them) and a 100-image RGB folder at 64 px (draws of 30, 17
of them), in batches of "one draw" (each draw one call of at most 500, as before
encoder.INFERENCE_BATCH), 64, 128, 256 and 500. Networks of the params' architecture at their
initial weights (the time does not depend on the weights), float32, torch's default threads.
Prints the median over --reps of each batch's seconds, and each against INFERENCE_BATCH.
--smoke: 16 px, small draws, 1 rep (checks the script runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ganflow.config import load_config
from ganflow.encoder import INFERENCE_BATCH, Encoder, encode
from ganflow.models import build_generator, one_hot
from ganflow.recipes import with_params

# (name, image size, channels, classes, samples per draw, draws)
SHAPES = [
    ("digits, 32 px, conditional", 32, 1, 10, 538, 3),
    ("100 images, 64 px RGB", 64, 3, 0, 30, 17),
]


def inputs(latent_dim: int, classes: int, count: int) -> torch.Tensor:
    z = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(0))
    return torch.cat([z, one_hot(torch.arange(count) % classes, classes)], dim=1) if classes else z


def seconds(g: torch.nn.Module, encoder: Encoder, chunks: list[torch.Tensor]) -> float:
    """One evaluation's inference: G, then the encoder, on each chunk of codes."""
    started = time.perf_counter()
    for chunk in chunks:
        with torch.no_grad():
            images = g(chunk).float()
        encode(encoder, images, len(chunk))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    base = load_config(args.params)
    shapes = [(f"{name} (smoke: 16 px)", 16, c, k, max(4, n // 10), d) for name, _, c, k, n, d in SHAPES]
    shapes, reps = (shapes, 1) if args.smoke else (SHAPES, args.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; median of {reps} rep(s)")
    print(f"{'shape':42s} {'batch':>9s} {'s/eval':>8s} {'img/s':>8s}  vs {INFERENCE_BATCH}")
    for name, size, channels, classes, per_draw, draws in shapes:
        cfg = with_params(base, {"data.image_size": size, "data.channels": channels})
        g = build_generator(cfg, classes).eval()
        encoder = Encoder(channels, size, cfg.eval.feature_dim, classes).eval()
        codes = inputs(cfg.model.latent_dim, classes, per_draw * draws)
        # before INFERENCE_BATCH: each draw on its own, in chunks of at most 500
        batches = {"one draw": [c for draw in codes.split(per_draw) for c in draw.split(500)]}
        batches |= {str(b): list(codes.split(b)) for b in (64, 128, 256, 500)}
        seconds(g, encoder, batches[str(INFERENCE_BATCH)])  # warm-up
        times: dict[str, list[float]] = {label: [] for label in batches}
        for _ in range(reps):  # interleaved, so a slow spell of the machine hits every batch alike
            for label, chunks in batches.items():
                times[label].append(seconds(g, encoder, chunks))
        reference = statistics.median(times[str(INFERENCE_BATCH)])
        for label, values in times.items():
            median = statistics.median(values)
            print(f"{name:42s} {label:>9s} {median:8.3f} {len(codes) / median:8.0f}  {median / reference:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
