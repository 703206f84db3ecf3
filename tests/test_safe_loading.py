"""Safe loading: no file ganflow reads can run code, and damaged weights are refused.

Weights are read with safetensors or ``torch.load(weights_only=True)``; MLflow models load with
pickle deserialization off (only a pickle-free pt2 archive loads). A source scan keeps it so.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ganflow.artifacts import CHECKPOINT_STATE
from ganflow.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from ganflow.errors import GanflowError
from ganflow.gan_step import build_state
from ganflow.models import Generator
from ganflow.sampling import SPEC, WEIGHTS, WEIGHTS_SHA256, export_generator, load_generator_dir, load_sampler
from tests.conftest import REPO, tiny_cfg


class RunsCode:
    """An object whose unpickling runs a command: creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path)
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    directory = tmp_path / "ck"
    directory.mkdir()
    save_checkpoint(state, cfg, directory, {"run_id": "abc"})
    return cfg, directory


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_checkpoint_that_would_run_code_is_refused(checkpoint, tmp_path, writer):
    cfg, directory = checkpoint
    marker = tmp_path / "pwned"
    payload = {"g": RunsCode(marker)}
    if writer == "pickle":
        (directory / CHECKPOINT_STATE).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, directory / CHECKPOINT_STATE)
    state = build_state(cfg, torch.device("cpu"), 1e-3, 1e-3)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(state, cfg, directory, 1e-3, 1e-3)
    message = str(info.value)
    assert message.startswith(f"{directory / CHECKPOINT_STATE}: refused: not a plain tensor checkpoint (")
    assert "\n" not in message
    assert not marker.exists()


def test_truncated_checkpoint_is_an_error_naming_the_file(checkpoint):
    cfg, directory = checkpoint
    path = directory / CHECKPOINT_STATE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"state\.pt: unreadable checkpoint \("):
        load_checkpoint(build_state(cfg, torch.device("cpu"), 1e-3, 1e-3), cfg, directory, 1e-3, 1e-3)


# ------------------------------------------------------------------------------ exported generator


def generator_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Generator(8, 1, 16, 8).state_dict()


SPEC_VALUES = {"latent_dim": 8, "channels": 1, "image_size": 16, "g_width": 8}


def test_export_records_the_weights_hash_and_load_checks_it(tmp_path):
    out = tmp_path / "generator"
    export_generator(generator_weights(0), SPEC_VALUES, out)
    spec = json.loads((out / SPEC).read_text())
    assert spec[WEIGHTS_SHA256] == hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    g = load_generator_dir(out)
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), generator_weights(0).values()))


@pytest.mark.parametrize("tamper", ["flipped byte", "another generator", "header"])
def test_tampered_generator_weights_are_refused(tmp_path, tamper):
    out = tmp_path / "generator"
    export_generator(generator_weights(0), SPEC_VALUES, out)
    path = out / WEIGHTS
    data = bytearray(path.read_bytes())
    if tamper == "flipped byte":  # in the tensor data: still a valid safetensors file
        data[-10] ^= 0x01
        path.write_bytes(bytes(data))
    elif tamper == "another generator":  # a valid file of the right shapes, other values
        other = tmp_path / "other"
        export_generator(generator_weights(1), SPEC_VALUES, other)
        path.write_bytes((other / WEIGHTS).read_bytes())
    else:
        data[8:12] = b"\xff\xff\xff\xff"
        path.write_bytes(bytes(data))
    with pytest.raises(GanflowError) as info:
        load_generator_dir(out)
    assert str(info.value) == (
        f"{path}: refused: its sha256 does not match {WEIGHTS_SHA256} in {SPEC} (changed or damaged "
        "since export); export it again with `dvc repro train`"
    )
    with pytest.raises(GanflowError, match="refused: its sha256"):  # the sampling entry point too
        load_sampler(str(out))


def test_generator_exported_before_the_hash_still_loads(tmp_path):
    out = tmp_path / "generator"
    export_generator(generator_weights(0), SPEC_VALUES, out)
    spec = json.loads((out / SPEC).read_text())
    del spec[WEIGHTS_SHA256]
    (out / SPEC).write_text(json.dumps(spec))
    assert isinstance(load_generator_dir(out), Generator)


# ---------------------------------------------------------------------------------- MLflow models


def test_mlflow_model_loads_only_without_pickle(tmp_path, monkeypatch):
    """What ganflow logs (a pt2 archive) loads through `ganflow sample`'s loader; a pickled model,
    or a pt2 archive with a pickle slipped in, is refused before anything is unpickled, even
    where the environment allows pickle (MLflow's default)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("safe", artifact_location=(tmp_path / "artifacts").as_uri())
    g = Generator(8, 1, 16, 8).eval()
    z = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with torch.no_grad():
        out = g(torch.from_numpy(z)).numpy()
    runs = {}
    for fmt in ("pt2", "pickle"):
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.pytorch.log_model(
                g,
                name="generator",
                signature=infer_signature(z, out),
                input_example=z,
                serialization_format=fmt,
                pip_requirements=["torch"],
            )
        runs[fmt] = (run.info.run_id, tmp_path / "artifacts" / "models" / info.model_id / "artifacts")

    sampler = load_sampler(f"runs:/{runs['pt2'][0]}/generator")  # logged without metadata: unconditional
    assert (sampler.latent_dim, sampler.num_classes) == (8, 0) and np.allclose(sampler.run(z), out, atol=1e-5)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"  # restored after the load

    marker = tmp_path / "pwned"
    run_id, artifacts = runs["pickle"]
    torch.save(RunsCode(marker), artifacts / "data" / "model.pth")
    with pytest.raises(GanflowError, match="cannot load \\(Deserializing model using pickle is disallowed"):
        load_sampler(f"runs:/{run_id}/generator")

    # the pt2 archive's sample inputs are a torch.save file that torch.export.load unpickles in full
    run_id, artifacts = runs["pt2"]
    archive = artifacts / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    inputs = next(name for name in members if name.endswith("sample_inputs/model.pt"))
    evil = tmp_path / "evil.pt"
    torch.save(RunsCode(marker), evil)
    members[inputs] = evil.read_bytes()
    with zipfile.ZipFile(archive, "w") as zout:
        for name, content in members.items():
            zout.writestr(name, content)
    with pytest.raises(GanflowError, match="is not a pickle-free payload"):
        load_sampler(f"runs:/{run_id}/generator")
    assert not marker.exists()


# ---------------------------------------------------------------------------------- source scan

SCANNED = sorted([*(REPO / "ganflow").glob("*.py"), *(REPO / "pipelines").glob("*.py")])
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
# (file, function) -> why this loader is acceptable there
ALLOWED = {
    (
        "ganflow/evaluation.py",
        "inception_fid",
        "torch.jit.load",
    ): "a TorchScript file the user names in eval.inception_weights; TorchScript runs no Python",
}


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unsafe_loads(path: Path, text: str | None = None) -> list[str]:
    """Each unsafe load in a source file, as "path:line: what", in line order."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    rel = path.relative_to(REPO).as_posix()
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def enclosing(node: ast.AST) -> list[ast.AST]:
        chain = []
        while node in parents:
            node = parents[node]
            chain.append(node)
        return chain

    def function_of(node: ast.AST) -> str:
        return next((n.name for n in enclosing(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), "")

    def without_pickle(node: ast.AST) -> bool:
        return any(
            isinstance(n, ast.With)
            and any(dotted(getattr(i.context_expr, "func", i.context_expr)) == "_no_pickle" for i in n.items)
            for n in enclosing(node)
        )

    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        # importing pickle for its exception type is fine; a loader imported by name is not
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            names = [a.name for a in node.names if not a.name.endswith("Error")]
            if (root in FORBIDDEN_MODULES and names) or (root == "torch" and "load" in names):
                found.append(f"{where}: from {node.module} import {', '.join(names)}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if (rel, function_of(node), name) in ALLOWED:
            continue
        if name == "torch.load" and keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") not in (None, False):
            found.append(f"{where}: np.load with allow_pickle")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append(f"{where}: {name} (use yaml.safe_load)")
        elif name in ("torch.jit.load", "torch.export.load", "torch.package.PackageImporter"):
            found.append(f"{where}: {name} (unpickles or runs code)")
        elif name.startswith(("mlflow.pyfunc.load", "mlflow.pytorch.load")) and not without_pickle(node):
            found.append(f"{where}: {name} outside `with _no_pickle()`")
        elif name.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where}: {name}")
    return sorted(found, key=lambda hit: int(hit.split(":")[1]))


def test_source_scan_finds_no_unsafe_loading():
    assert len(SCANNED) > 10
    assert [hit for path in SCANNED for hit in unsafe_loads(path)] == []


def test_source_scan_catches_what_it_must():
    text = (
        "import pickle\nfrom pickle import UnpicklingError, loads\n"
        "def f(p):\n"
        "    torch.load(p)\n    torch.load(p, weights_only=False)\n    torch.load(p, weights_only=True)\n"
        "    np.load(p, allow_pickle=True)\n    np.load(p)\n    yaml.load(p)\n    yaml.safe_load(p)\n"
        "    mlflow.pyfunc.load_model(p)\n    pickle.loads(p)\n"
        "    with _no_pickle():\n        mlflow.pyfunc.load_model(p)\n"
    )
    hits = unsafe_loads(REPO / "ganflow" / "probe.py", text)
    assert [h.removeprefix("ganflow/probe.py:") for h in hits] == [
        "2: from pickle import loads",
        "4: torch.load without weights_only=True",
        "5: torch.load without weights_only=True",
        "7: np.load with allow_pickle",
        "9: yaml.load (use yaml.safe_load)",
        "11: mlflow.pyfunc.load_model outside `with _no_pickle()`",
        "12: pickle.loads",
    ]
