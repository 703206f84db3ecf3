"""What the stages hand each other, by name and format, without torch.

Every file name a stage writes for another (the prepared dataset, the encoder, the generator
directory, a training checkpoint, the sweep's result), the readers of the prepared dataset's
manifest, and the format of ``tune/best.json``. Light on purpose: the tracking, registry and
resume-key code read a manifest or a file name through this module, not through the modules
that build those files (which import torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ganflow.atomic import write_file
from ganflow.errors import DataError, TuneError

if TYPE_CHECKING:
    from ganflow.config import Config

# the prepared dataset (paths.prepared), written by ganflow.data.prepare
FORMAT = "ganflow-prepared/4"  # /2: the held-out split; /3: image shards; /4: validation and test
MANIFEST = "manifest.json"
SHARD_NAME = "images-{:05d}.npy"
LABELS = "labels.npy"
SPLIT = "split.npy"
TRAIN, VALIDATION, TEST = 0, 1, 2  # the values in SPLIT
PARTS = {"all": None, "train": TRAIN, "validation": VALIDATION, "test": TEST}

# the evaluation encoder (paths.encoder), written by ganflow.encoder.fit_encoder
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_SPEC = "encoder.json"
REFERENCE = "reference.safetensors"  # validation and train features, the copy detector's cells

# the exported generator (paths.generator, and the MLflow model), written by ganflow.sampling
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_SPEC = "generator.json"
WEIGHTS_SHA256 = "weights_sha256"  # the key in GENERATOR_SPEC holding the sha256 of GENERATOR_WEIGHTS

# a training checkpoint folder (Ray Train's storage), written by ganflow.train_loop
CHECKPOINT_META = "meta.json"  # epoch, run_id, history, best_fd...
CHECKPOINT_STATE = "state.pt"  # the tensors: networks, EMA, optimizers, RNG


def read_manifest(path: Path) -> dict[str, Any]:
    """The prepared dataset's manifest.json, checked to be of this code's FORMAT."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{path}: no prepared dataset here (missing {MANIFEST}); run `dvc repro prepare`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def prepared_hash(path: Path) -> str:
    """The sha256 of the prepared images (from their manifest): the one data hash of ganflow,
    in run tags, resume keys, the encoder's reference and registry versions."""
    return read_manifest(path)["images_sha256"]


def class_prior(cfg: Config) -> tuple[list[str], list[float]] | None:
    """(class names, their frequencies in the train split) for a conditional G, None for an
    unconditional one (model.conditional false, or auto on unlabelled data)."""
    manifest = read_manifest(cfg.paths.prepared)
    if cfg.model.conditional is False:
        return None
    if not manifest["labelled"]:
        if cfg.model.conditional is True:
            raise DataError(
                f"model.conditional: true needs labelled data, and {cfg.paths.prepared} has no labels "
                "(set it to auto or false)"
            )
        return None
    names = manifest["class_names"]
    counts = [manifest["split"]["train_class_counts"][n] for n in names]
    return names, [c / sum(counts) for c in counts]


@dataclass
class Best:
    """tune/best.json: the rates the train stage uses, and how the sweep found them."""

    lr_g: float
    lr_d: float
    fd_domain: float | None  # the pick's score: fd_recent at its last tick (mean of its last two `objective`)
    epoch: int | None  # the tick that score was reached at (the trial's last)
    sweep_run_id: str | None
    trials: int
    trial_ticks: int  # the reports (ticks of tune.tick_kimg) all trials made together
    stopped_early: int
    tuned: bool
    objective: str | None = None  # what fd_recent averages: fd_class (a conditional G) or fd_domain

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_best(cfg: Config, best: Best) -> None:
    write_file(cfg.paths.tune_best, json.dumps(best.to_dict(), indent=2, sort_keys=True) + "\n")


def read_best(cfg: Config) -> tuple[float, float]:
    """The learning rates the train stage uses: tune/best.json, written by the tune stage."""
    path = cfg.paths.tune_best
    if not path.is_file():
        raise TuneError(f"{path}: no tune result; run `dvc repro tune` (or set tune.enabled: false and rerun it)")
    values = json.loads(path.read_text())
    return float(values["lr_g"]), float(values["lr_d"])
