"""DVC stage `evaluate`: score paths.generator against the real data in the encoder's feature
space; write metrics/eval.json (each metric, its real-vs-real floor, fd_domain / floor), a sample
grid and the class-frequency table, and log them to the training's MLflow run.

    python pipelines/evaluate.py [--params params.yaml]
"""

from __future__ import annotations

import csv
import io
import json
import sys

import torch

from ganflow.atomic import write_file
from ganflow.stage import stage_main
from ganflow.config import Config
from ganflow.evaluation import evaluate_generator, load_reference
from ganflow.models import class_grid_codes
from ganflow.sampling import load_generator_dir, make_grid, to_uint8
from ganflow.tracking import log_evaluation


def stage(cfg: Config) -> None:
    generator = load_generator_dir(cfg.paths.generator)

    def sample(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return generator(z)

    reference = load_reference(cfg)  # loaded once: scores the samples and names the classes
    metrics, images = evaluate_generator(cfg, sample, reference)
    write_file(cfg.paths.metrics / "eval.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    from PIL import Image

    grid = io.BytesIO()
    if generator.num_classes:  # a row of 8 per class, row k = class k
        codes = class_grid_codes(generator.latent_dim, generator.num_classes, 8,
                                 torch.Generator().manual_seed(cfg.eval.seed + 1))
        picture = make_grid(to_uint8(sample(codes)), cols=8)
    else:
        picture = make_grid(images[:64])
    Image.fromarray(picture).save(grid, format="PNG")
    write_file(cfg.paths.plots / "samples.png", grid.getvalue())
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "real", "generated", "fd_over_floor"])
    for i, name in enumerate(reference.class_names):
        ratio = metrics["class_fd_over_floor"][name]
        writer.writerow([name, float(reference.class_freq[i]), metrics["class_freq"][name],
                         "" if ratio is None else ratio])
    write_file(cfg.paths.plots / "eval_classes.csv", table.getvalue())

    run_id = json.loads((cfg.paths.generator / "generator.json").read_text()).get("mlflow_run_id")
    logged = log_evaluation(cfg, run_id, metrics, cfg.paths.plots / "samples.png")
    classes = (
        f", {metrics['classes_covered']}/{len(reference.class_names)} classes (TV {metrics['class_tv']:.3f}, "
        f"KL {metrics['class_kl']:.3f}, reverse KL {metrics['class_kl_reverse']:.3f})"
        if "classes_covered" in metrics else ""
    )
    if "class_match" in metrics:  # a conditional G: how often it draws the class it is asked for
        classes += f"; drawn as asked {metrics['class_match']:.2f} (floor {metrics.get('floor_class_match', float('nan')):.2f})"
    copying = "FLAGGED: copies training images" if metrics["copying_flagged"] else "not flagged"
    print(
        f"held-out fd_domain {metrics['fd_domain']:.3f} = {metrics['fd_domain_over_floor']:.2f}x its real-vs-real "
        f"floor ({metrics['floor_fd_domain']:.3f}, {metrics['sample_size']} held-out images); KID {metrics['kid']:.4f}; "
        f"precision {metrics['precision']:.2f}, recall {metrics['recall']:.2f}{classes}; data copying C_T "
        f"{metrics['copying_ct']:.2f} ({copying}) -> {cfg.paths.metrics / 'eval.json'}"
        + (f"; logged to MLflow run {run_id}" if logged else "")
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())
