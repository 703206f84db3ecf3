"""DVC stage `evaluate`: score paths.generator against the test split (what reports) and the
validation split (what the registry chooses by) in the encoder's feature space, each over
eval.draws latent draws next to a real baseline drawn the same way, plus the copy detector; write
metrics/eval.json, a sample grid and the class-frequency table, and log them to the training's
MLflow run. The only stage that reads the test split.

    python pipelines/evaluate.py [--params params.yaml]
"""

from __future__ import annotations

import csv
import io
import json
import sys

import torch

from ganflow.atomic import write_file
from ganflow.config import Config
from ganflow.evaluation import evaluate_generator, load_reference
from ganflow.images import make_grid, to_uint8
from ganflow.models import class_grid_codes
from ganflow.report import reading, summary_line
from ganflow.sampling import generator_meta, load_generator_dir
from ganflow.stage import stage_main
from ganflow.tracking import log_evaluation


def stage(cfg: Config) -> None:
    generator = load_generator_dir(cfg.paths.generator)

    def sample(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return generator(z)

    reference = load_reference(cfg)  # loaded once: scores the samples and names the classes
    metrics, images = evaluate_generator(cfg, sample, generator_meta(cfg.paths.generator), reference)
    write_file(cfg.paths.metrics / "eval.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    from PIL import Image

    grid = io.BytesIO()
    if generator.num_classes:  # a row of 8 per class, row k = class k
        codes = class_grid_codes(
            generator.latent_dim, generator.num_classes, 8, torch.Generator().manual_seed(cfg.eval.seed + 1)
        )
        picture = make_grid(to_uint8(sample(codes)), cols=8)
    else:
        picture = make_grid(images[:64])
    Image.fromarray(picture).save(grid, format="PNG")
    write_file(cfg.paths.plots / "samples.png", grid.getvalue())
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "real", "generated", "fd_over_real"])
    for i, name in enumerate(reference.class_names):
        ratio = metrics.get("class_fd_over_real", {}).get(name)
        writer.writerow(
            [name, float(reference.class_freq[i]), metrics["class_freq"][name], "" if ratio is None else ratio]
        )
    write_file(cfg.paths.plots / "eval_classes.csv", table.getvalue())

    run_id = json.loads((cfg.paths.generator / "generator.json").read_text()).get("mlflow_run_id")
    logged = log_evaluation(cfg, run_id, metrics, cfg.paths.plots / "samples.png")
    print(
        summary_line(metrics)
        + f" -> {cfg.paths.metrics / 'eval.json'}"
        + (f"; logged to MLflow run {run_id}" if logged else "")
    )
    print(reading(metrics))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())
