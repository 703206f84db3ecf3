"""A training checkpoint on disk: the tensors (state.pt, plain tensors only, loaded without
unpickling code) and meta.json (tick, MLflow run id, history, best fd, ADA's p), written by rank 0
and read back on resume; ganflow.export reads the best one for the generator it exports.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from ganflow.artifacts import CHECKPOINT_META, CHECKPOINT_STATE
from ganflow.config import Config
from ganflow.errors import GanflowError, first_line
from ganflow.gan_step import GanState, unwrap


def save_checkpoint(state: GanState, cfg: Config, directory: Path, meta: dict[str, Any]) -> None:
    """The whole training state: networks, EMA, optimizers, scalers, counters, RNG, config."""
    tensors = {
        "g": unwrap(state.g).state_dict(),
        "d": unwrap(state.d).state_dict(),
        "ema_g": state.ema_g.state_dict(),
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "scaler_g": state.scaler_g.state_dict(),
        "scaler_d": state.scaler_d.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if state.best_ema_g is not None:
        tensors["best_ema_g"] = state.best_ema_g
    if state.lecam_ema is not None:
        tensors["lecam_ema"] = state.lecam_ema
    torch.save(tensors, directory / CHECKPOINT_STATE)
    meta = {
        **meta,
        "epoch": state.epoch,
        "step": state.step,
        "g_steps": state.g_steps,
        "starts": state.starts,
        "best_fd": state.best_fd if math.isfinite(state.best_fd) else None,
        "best_epoch": state.best_epoch,
        "ada": state.ada.state_dict() if state.ada is not None else None,
        "history": state.history,
        "config": cfg.to_dict(),
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CHECKPOINT_META).read_text())


class CheckpointError(GanflowError):
    """A checkpoint file that cannot be loaded safely."""


def load_state_file(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The tensors of a checkpoint's state.pt. weights_only: tensors and plain containers only;
    a file holding anything else (a pickled object whose loading would run code) is refused."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for a disallowed object
        # torch's first line only advises weights_only=False; the reason is a later line
        lines = [line.strip() for line in str(exc).splitlines()[1:]]
        skip = ("Please file", "Check the documentation")
        reason = next((line for line in lines if line and not line.startswith(skip)), "disallowed content")
        raise CheckpointError(f"{path}: refused: not a plain tensor checkpoint ({reason[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:  # truncated, corrupt, missing
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(exc)[:200]})") from None


def load_checkpoint(state: GanState, cfg: Config, directory: Path, lr_g: float, lr_d: float) -> dict:
    """Restore ``state`` (unwrapped modules) from a checkpoint directory; returns its meta."""
    tensors = load_state_file(Path(directory) / CHECKPOINT_STATE, state.device)
    unwrap(state.g).load_state_dict(tensors["g"])
    unwrap(state.d).load_state_dict(tensors["d"])
    state.ema_g.load_state_dict(tensors["ema_g"])
    state.opt_g.load_state_dict(tensors["opt_g"])
    state.opt_d.load_state_dict(tensors["opt_d"])
    state.scaler_g.load_state_dict(tensors["scaler_g"])
    state.scaler_d.load_state_dict(tensors["scaler_d"])
    torch.set_rng_state(tensors["torch_rng"].cpu())
    # the config decides the learning rates, not the optimizer state that was saved
    for opt, lr in ((state.opt_g, lr_g), (state.opt_d, lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr
    meta = read_checkpoint_meta(directory)
    state.epoch, state.step, state.g_steps = meta["epoch"], meta["step"], meta["g_steps"]
    state.starts = meta["starts"] + 1
    state.best_fd = meta["best_fd"] if meta["best_fd"] is not None else float("inf")
    state.best_epoch = meta["best_epoch"]
    state.best_ema_g = tensors.get("best_ema_g")
    state.history = meta["history"]
    if state.ada is not None and meta.get("ada"):  # (a checkpoint of augment none/diffaugment: p from 0)
        state.ada.load_state_dict(meta["ada"])
    if state.lecam_ema is not None and "lecam_ema" in tensors:
        state.lecam_ema.copy_(tensors["lecam_ema"])
    return meta
