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

from ganflow.artifacts import CHECKPOINT_META, ENCODER_WEIGHTS, REFERENCE, prepared_hash
from ganflow.atomic import named_sha256
from ganflow.config import TRAIN_RUN_ONLY_KEYS, Config
from ganflow.filesystems import storage_fs


def storage_path(cfg: Config) -> str:
    return cfg.cluster.storage_path or str(cfg.paths.ray_results)


# the data.* keys a training's batches depend on (the train stage's DVC params list them; the
# sweep's trials always read locally: data.ingest does not shape a sweep)
RUN_DATA_KEYS = ("hflip", "loader_workers", "ingest")

# what every Ray Train worker runs: the code a checkpoint's numbers depend on is this module and
# everything it imports (ganflow.closure), so a change to any of them starts a new run
TRAINING_ENTRY = "train_loop.py"


def training_code(package: Path | None = None) -> list[str]:
    """The file names in ``package`` (default ganflow's own folder) of TRAINING_ENTRY and its
    import closure, sorted: derived from the code, never a list kept by hand."""
    from ganflow.closure import import_closure

    package = package or Path(__file__).parent
    return sorted({TRAINING_ENTRY} | {Path(rel).name for rel in import_closure(package / TRAINING_ENTRY, package)})


def code_and_encoder_hash(cfg: Config, package: Path | None = None) -> str:
    """Hash of the training code (``training_code(package)``) and of the encoder (its weights and
    held-out reference statistics: what best_fd is measured with)."""
    package = package or Path(__file__).parent
    entries = {f"code/{name}": (package / name).read_bytes() for name in training_code(package)}
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
    key["train"] = {
        k: v for k, v in key["train"].items() if k not in ("kimg", "epochs") and k not in TRAIN_RUN_ONLY_KEYS
    }
    key["data"] = {k: values["data"][k] for k in RUN_DATA_KEYS}
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
        info.path
        for info in fs.get_file_info(selector)
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
