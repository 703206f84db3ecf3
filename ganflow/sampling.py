"""The exported generator: writing it, loading it (path, runs:/ or models:/ URI), drawing samples.

``models/generator/`` holds ``generator.safetensors`` (the EMA generator's weights) and
``generator.json`` (what builds the network, plus the resolved config and the run it came
from). Loading builds the network from the JSON and reads the weights with safetensors:
nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ganflow.atomic import atomic_dir, file_sha256, write_bytes
from ganflow.errors import GanflowError, first_line
from ganflow.models import Generator

WEIGHTS = "generator.safetensors"
SPEC = "generator.json"
WEIGHTS_SHA256 = "weights_sha256"  # the key in SPEC holding the sha256 of WEIGHTS


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid if c != 1 else grid[:, :, 0]


def generator_spec(g: Generator) -> dict[str, int]:
    return {"latent_dim": g.latent_dim, "channels": g.channels, "image_size": g.image_size, "g_width": g.width}


def export_generator(weights: dict[str, torch.Tensor], spec: dict[str, Any], out: Path) -> None:
    """Write the generator directory atomically (temporary sibling, then rename). The spec
    records the sha256 of the weights file, checked on every load."""
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        spec = {**spec, WEIGHTS_SHA256: file_sha256(tmp / WEIGHTS)}
        write_bytes(tmp / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())


def load_generator_dir(path: Path) -> Generator:
    """Build the EMA generator from an exported directory (safetensors: no unpickling)."""
    path = Path(path)
    if not (path / SPEC).is_file() or not (path / WEIGHTS).is_file():
        raise GanflowError(f"{path}: not an exported generator (needs {SPEC} and {WEIGHTS})")
    spec = json.loads((path / SPEC).read_text())
    # a generator exported before the hash was recorded loads unchecked
    expected = spec.get(WEIGHTS_SHA256)
    if expected is not None and file_sha256(path / WEIGHTS) != expected:
        raise GanflowError(
            f"{path / WEIGHTS}: refused: its sha256 does not match {WEIGHTS_SHA256} in {SPEC} "
            "(changed or damaged since export); export it again with `dvc repro train`"
        )
    g = Generator(spec["latent_dim"], spec["channels"], spec["image_size"], spec["g_width"])
    g.load_state_dict(load_file(str(path / WEIGHTS)))
    return g.eval()


def load_sampler(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """(z (N, latent) float32 -> images (N, C, H, W) in [-1, 1], latent_dim) for a generator
    directory, a ``runs:/RUN_ID/generator`` URI or a ``models:/NAME@ALIAS`` URI."""
    if "://" not in model and ":/" not in model:
        g = load_generator_dir(Path(model))

        def run_local(z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return g(torch.from_numpy(z)).numpy()

        return run_local, g.latent_dim

    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from ganflow.tracking import check_reachable

    uri = mlflow.get_registry_uri() if model.startswith("models:") else mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store here, with log lines, before saying the model is missing
        raise GanflowError(f"--model {model}: cannot load (no MLflow store at {uri})")
    try:
        check_reachable(uri)  # a dead server fails now, not after MLflow's minutes of retries
    except GanflowError as exc:
        raise GanflowError(f"--model {model}: cannot load ({exc})") from None
    try:
        with _no_pickle():
            pyfunc = mlflow.pyfunc.load_model(model)
    except (MlflowException, OSError) as exc:
        raise GanflowError(f"--model {model}: cannot load ({first_line(exc)})") from None
    latent_dim = pyfunc.metadata.get_input_schema().inputs[0].shape[-1]
    return (lambda z: np.asarray(pyfunc.predict(z))), int(latent_dim)


@contextlib.contextmanager
def _no_pickle() -> Iterator[None]:
    """MLflow loads a PyTorch model by unpickling unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    is false (its default is true): with it false, only a pickle-free ``pt2`` archive (what
    ganflow logs) loads, and a pickled or tampered model is refused before it can run code."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def sample(model: str, n: int, seed: int, batch: int = 256) -> np.ndarray:
    """n images from ``model`` as uint8 (n, H, W, C), reproducible for a seed."""
    run, latent_dim = load_sampler(model)
    z = np.random.default_rng(seed).standard_normal((n, latent_dim)).astype(np.float32)
    # a progress bar when it takes more than one batch, on a terminal only (disable=None)
    with tqdm(total=n, desc="sample", unit="img", disable=None if n > batch else True, file=sys.stderr) as bar:
        chunks = []
        for i in range(0, n, batch):
            chunks.append(to_uint8(torch.from_numpy(run(z[i : i + batch]))))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)
