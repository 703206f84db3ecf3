"""The exported generator: writing it, loading it (path, runs:/ or models:/ URI), drawing samples.

``models/generator/`` holds ``generator.safetensors`` (the EMA generator's weights) and
``generator.json`` (what builds the network, plus the resolved config and the run it came
from). Loading builds the network from the JSON and reads the weights with safetensors:
nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ganflow.artifacts import GENERATOR_SPEC as SPEC
from ganflow.artifacts import GENERATOR_WEIGHTS as WEIGHTS
from ganflow.artifacts import WEIGHTS_SHA256
from ganflow.atomic import atomic_dir, file_sha256, write_bytes
from ganflow.errors import GanflowError, first_line
from ganflow.images import to_uint8
from ganflow.models import GENERATORS, allocate, one_hot


def generator_meta(path: Path) -> dict[str, Any]:
    """What a sampler needs besides the weights: latent_dim, num_classes (0: unconditional) and,
    for a conditional G, its class names and their training frequencies."""
    spec = json.loads((Path(path) / SPEC).read_text())
    return {
        "latent_dim": int(spec["latent_dim"]),
        "num_classes": int(spec.get("num_classes") or 0),
        "class_names": spec.get("class_names"),
        "class_prior": spec.get("class_prior"),
    }


def export_generator(weights: dict[str, torch.Tensor], spec: dict[str, Any], out: Path) -> None:
    """Write the generator directory atomically (temporary sibling, then rename). The spec
    records the sha256 of the weights file, checked on every load."""
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        spec = {**spec, WEIGHTS_SHA256: file_sha256(tmp / WEIGHTS)}
        write_bytes(tmp / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())


def load_generator_dir(path: Path) -> torch.nn.Module:
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
    arch = spec.get("arch", "dcgan")  # exported before model.arch existed: DCGAN
    if arch not in GENERATORS:
        raise GanflowError(f"{path / SPEC}: unknown arch {arch!r} (known: {', '.join(GENERATORS)})")
    g = GENERATORS[arch](
        spec["latent_dim"], spec["channels"], spec["image_size"], spec["g_width"], int(spec.get("num_classes") or 0)
    )
    try:
        g.load_state_dict(load_file(str(path / WEIGHTS)))
    except RuntimeError as exc:  # shapes or keys of another version of the architecture
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(exc)  # the first mismatch, after torch's heading
        raise GanflowError(
            f"{path / WEIGHTS}: its weights do not fit this version's {arch} generator ({detail}); a "
            "class-conditional DCGAN G exported before its first layer took the class cannot load: export it "
            "again with `dvc repro train`"
        ) from None
    return g.eval()


@dataclass
class Sampler:
    """A loaded generator: ``run(code)`` maps G inputs (N, latent_dim + num_classes) float32 to
    images (N, C, H, W) in [-1, 1]; a conditional G's classes are named, with their frequencies."""

    run: Callable[[np.ndarray], np.ndarray]
    latent_dim: int
    num_classes: int = 0
    class_names: list[str] | None = None
    class_prior: list[float] | None = None

    def class_index(self, name: str) -> int:
        """The index of class ``name`` (its name, or its index as a number)."""
        if not self.num_classes:
            raise GanflowError(
                "--class: this generator is not class-conditional (trained with model.conditional "
                "false or on unlabelled data)"
            )
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        if name in names:
            return names.index(name)
        if name.isdigit() and int(name) < self.num_classes:
            return int(name)
        raise GanflowError(f"--class: {name!r} is not one of this generator's classes ({', '.join(names)})")

    def codes(self, n: int, seed: int, class_index: int | None = None) -> np.ndarray:
        """n inputs: z from ``seed``; for a conditional G, all of ``class_index``, or (None) the
        classes at their training frequencies, sorted by class."""
        z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, self.latent_dim)).astype(np.float32))
        if not self.num_classes:
            return z.numpy()
        if class_index is None:
            classes = allocate(self.class_prior or [1.0] * self.num_classes, n)
        else:
            classes = torch.full((n,), class_index)
        return torch.cat([z, one_hot(classes, self.num_classes)], dim=1).numpy()


def load_sampler(model: str) -> Sampler:
    """The generator of a directory, a ``runs:/RUN_ID/generator`` URI or a ``models:/NAME@ALIAS`` URI."""
    if "://" not in model and ":/" not in model:
        g = load_generator_dir(Path(model))
        meta = generator_meta(Path(model))

        def run_local(code: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return g(torch.from_numpy(code)).numpy()

        return Sampler(run_local, g.latent_dim, g.num_classes, meta["class_names"], meta["class_prior"])

    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from ganflow.endpoints import check_reachable

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
    width = int(pyfunc.metadata.get_input_schema().inputs[0].shape[-1])
    meta = pyfunc.metadata.metadata or {}  # models logged before conditional G: no metadata, unconditional
    latent_dim = int(meta.get("latent_dim", width))
    return Sampler(
        lambda code: np.asarray(pyfunc.predict(code)),
        latent_dim,
        int(meta.get("num_classes") or 0),
        meta.get("class_names"),
        meta.get("class_prior"),
    )


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


def sample(model: str, n: int, seed: int, batch: int = 256, class_name: str | None = None) -> np.ndarray:
    """n images from ``model`` as uint8 (n, H, W, C), reproducible for a seed. A conditional G
    draws all of ``class_name``, or its classes at their training frequencies (sorted by class)."""
    sampler = load_sampler(model)
    index = sampler.class_index(class_name) if class_name is not None else None
    code = sampler.codes(n, seed, index)
    # a progress bar when it takes more than one batch, on a terminal only (disable=None)
    with tqdm(total=n, desc="sample", unit="img", disable=None if n > batch else True, file=sys.stderr) as bar:
        chunks = []
        for i in range(0, n, batch):
            chunks.append(to_uint8(torch.from_numpy(sampler.run(code[i : i + batch]))))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)
