"""Sample quality of the pipeline's generator against a plain DCGAN, in the domain encoder's space.

    make run && .venv/bin/python benchmarks/quality.py [--params params.yaml]

Evaluates ``models/generator`` (what `make run` produced: the EMA generator of the best epoch)
exactly as the evaluate stage does, then trains a plain DCGAN for the same number of epochs with
the usual fixed learning rates (2e-4 for both) and scores its last-epoch generator (no EMA, no
best-epoch selection) the same way. Prints both next to the real-vs-real floor, and checks the
goal for the default pipeline: fd_domain <= 3x its floor, all classes present, each within
+-50% of its real frequency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from ganflow.config import load_config
from ganflow.distributed import latest_checkpoint_meta, run_name, run_training, storage_path
from ganflow.evaluation import evaluate_generator, load_reference
from ganflow.models import build_generator
from ganflow.sampling import load_generator_dir

ROWS = ["fd_domain", "fd_domain_over_floor", "kid", "precision", "recall", "classes_covered", "class_kl",
        "class_max_rel_dev", "is_domain"]


def score(cfg, generator: torch.nn.Module) -> dict:
    generator.eval()

    def sample(z):
        with torch.no_grad():
            return generator(z)

    return evaluate_generator(cfg, sample)[0]


def plain_dcgan(cfg, workdir: Path) -> torch.nn.Module:
    """Train with lr 2e-4 for both networks; return the last epoch's raw generator."""
    plain = cfg.model_copy(deep=True)
    for name in ("generator", "metrics", "plots", "ray_results", "mlflow_db", "mlflow_artifacts"):
        setattr(plain.paths, name, workdir / name)
    plain.tracking.uri = None
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_training(plain, 2e-4, 2e-4)
    path, _ = latest_checkpoint_meta(storage_path(plain), run_name(plain, 2e-4, 2e-4))
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    g = build_generator(plain)
    g.load_state_dict(state["g"])
    return g


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if not (cfg.paths.generator / "generator.json").is_file():
        print(f"error: {cfg.paths.generator}: no generator; run `make run` first", file=sys.stderr)
        return 1
    ours = score(cfg, load_generator_dir(cfg.paths.generator))
    with tempfile.TemporaryDirectory() as tmp:
        baseline = score(cfg, plain_dcgan(cfg, Path(tmp)))
    floors = load_reference(cfg).floors

    print(f"\n{cfg.train.epochs} epochs, {cfg.data.image_size}px, evaluated on {ours['sample_size']} samples")
    print(f"{'metric':22s} {'ganflow':>10s} {'plain DCGAN':>12s} {'real floor':>11s}")
    for key in ROWS:
        if key in ours:
            floor = floors.get(key)
            floor_text = f"{floor:11.4g}" if floor is not None else f"{'':11s}"
            print(f"{key:22s} {ours[key]:10.4g} {baseline[key]:12.4g} {floor_text}")
    if "class_freq" in ours:
        ref = load_reference(cfg)
        print("class frequencies (real / ganflow / plain):")
        for i, name in enumerate(ref.class_names):
            print(f"  {name:>6s}  {ref.class_freq[i]:.3f} / {ours['class_freq'][name]:.3f} / "
                  f"{baseline['class_freq'][name]:.3f}")
    goal_fd = ours["fd_domain_over_floor"] <= 3.0
    goal_classes = "class_max_rel_dev" not in ours or (
        ours["classes_covered"] == len(ours["class_freq"]) and ours["class_max_rel_dev"] <= 0.5
    )
    print(f"goal fd_domain <= 3x floor: {'met' if goal_fd else 'NOT met'}; "
          f"all classes within +-50%: {'met' if goal_classes else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
