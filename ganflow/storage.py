"""Where Ray Train keeps a training's checkpoints, and how a training finds the run to resume.

A run is named from what determines its result (see run_name); its checkpoints live under
``<cluster.storage_path or paths.ray_results>/<name>``, on local disk or any pyarrow filesystem
(s3://, gs://...; see filesystems.py). No torch at import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ganflow.atomic import named_sha256
from ganflow.config import TRAIN_RUN_ONLY_KEYS, Config
from ganflow.filesystems import storage_fs

CHECKPOINT_META = "meta.json"  # in every checkpoint folder: epoch, run_id, history, best_fd...

def storage_path(cfg: Config) -> str:
    return cfg.cluster.storage_path or str(cfg.paths.ray_results)


# the data.* keys a training's batches depend on (the train stage's DVC params list them; the
# sweep's trials always read locally: data.ingest does not shape a sweep)
RUN_DATA_KEYS = ("hflip", "loader_workers", "ingest")

# the code a checkpoint's numbers depend on: a change to any of these starts a new run
TRAINING_CODE = ("train_loop.py", "budget.py", "models.py", "losses.py", "augment.py", "data.py", "ingest.py", "evaluation.py",
                 "encoder.py", "metrics.py", "copying.py", "config.py")


def code_and_encoder_hash(cfg: Config, package: Path | None = None) -> str:
    """Hash of the training code (TRAINING_CODE in ``package``, default ganflow's own folder) and
    of the encoder (its weights and held-out reference statistics: what best_fd is measured with)."""
    from ganflow.encoder import ENCODER_WEIGHTS, REFERENCE

    package = package or Path(__file__).parent
    entries = {f"code/{name}": (package / name).read_bytes() for name in TRAINING_CODE}
    for name in (ENCODER_WEIGHTS, REFERENCE):
        path = cfg.paths.encoder / name
        entries[f"encoder/{name}"] = path.read_bytes() if path.is_file() else b"missing"
    return named_sha256(entries)[:8]


def run_name(cfg: Config, lr_g: float, lr_d: float, package: Path | None = None) -> str:
    """The Ray run's name, ``train-<params>-<code and encoder>``: the same training params, code
    and encoder give the same name (that is how resume works). A checkpoint written by other code,
    or whose best_fd another encoder measured, is never resumed (see stale_runs)."""
    values = cfg.to_dict()
    # the budget is left out: raising train.kimg (or epochs) continues a finished run instead of
    # starting over
    key = {s: values[s] for s in ("model", "train")}
    key["train"] = {k: v for k, v in key["train"].items() if k not in ("kimg", "epochs") and k not in TRAIN_RUN_ONLY_KEYS}
    key["data"] = {k: values["data"][k] for k in RUN_DATA_KEYS}
    from ganflow.data import prepared_hash  # (imports torch: only the training needs run_name)

    key["data_hash"] = prepared_hash(cfg.paths.prepared)
    key.update(num_workers=cfg.cluster.num_workers, lr_g=lr_g, lr_d=lr_d)
    params = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"train-{params}-{code_and_encoder_hash(cfg, package)}"


def stale_runs(storage: str, name: str) -> list[tuple[str, int]]:
    """(name, epoch) of the unfinished runs with the same training params as ``name`` but other
    code or another encoder: kept in storage, not resumed."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    prefix = name.rsplit("-", 1)[0] + "-"
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(prefix) and info.base_name != name:
            latest = latest_checkpoint_meta(storage, info.base_name)
            if latest is not None:
                found.append((info.base_name, int(latest[1]["epoch"])))
    return sorted(found)


def latest_checkpoint_meta(storage: str, name: str) -> tuple[str, dict[str, Any]] | None:
    """(path, meta) of the newest complete checkpoint of run ``name`` in ``storage``, or None."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    selector = pyarrow.fs.FileSelector(f"{base}/{name}", allow_not_found=True)
    found = sorted(
        info.path for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    for path in reversed(found):
        try:
            with fs.open_input_stream(f"{path}/{CHECKPOINT_META}") as stream:
                return path, json.loads(stream.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            continue  # an incomplete upload: try the one before
    return None


def delete_run(storage: str, name: str) -> None:
    """Remove run ``name`` from storage, if it is there."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(f"{base}/{name}")
