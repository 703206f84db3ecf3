"""The module boundaries, checked statically (nothing runs): each DVC stage's code deps are its
import closure, the stages depend only on what they run, no import cycle, the base modules load
without torch, the resume key covers the code the training runs, and the suite's longest-first
order names its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ganflow.closure import direct_imports
from ganflow.closure import import_closure as package_closure
from ganflow.data import PREPARE_KEYS
from tests.conftest import REPO

STAGES = ("prepare", "encoder", "tune", "train", "evaluate", "register")


def import_closure(script: Path, package: Path | None = None) -> set[str]:
    """``ganflow/<name>.py`` of every module ``script`` imports, transitively (the repo's package
    unless ``package`` names another copy)."""
    return package_closure(script, package or Path(script).resolve().parents[1] / "ganflow")


def modules(script: str) -> set[str]:
    return {rel.removeprefix("ganflow/").removesuffix(".py") for rel in import_closure(REPO / script)}


def test_prepare_stage_lists_exactly_the_keys_that_shape_its_output():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    assert stage["params"] == [f"data.{key}" for key in PREPARE_KEYS]
    assert stage["outs"] == ["${paths.prepared}"]


@pytest.mark.parametrize("stage", ["tune", "train"])
def test_tune_and_train_depend_on_what_shapes_their_result_only(stage):
    """A train.* field added to the config must reach the DVC params of the stages that train (or
    be left out on purpose): all but the run-only keys (checkpointing, failure budget) and, for the
    sweep, the budget (trials run tune.kimg) and the export window (a trial exports nothing); of cluster.*, what shapes the result, not where it runs."""
    from ganflow.checkpoints import RUN_DATA_KEYS
    from ganflow.config import TRAIN_RUN_ONLY_KEYS, ClusterConfig, TrainConfig

    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]
    listed = {p.split(".", 1)[1] for p in params if isinstance(p, str) and p.startswith("train.")}
    assert "train" not in params and "cluster" not in params
    expected = (
        set(TrainConfig.model_fields)
        - set(TRAIN_RUN_ONLY_KEYS)
        - ({"kimg", "epochs", "tick_kimg", "export_from"} if stage == "tune" else set())
    )
    assert listed == expected
    cluster = {p.split(".", 1)[1] for p in params if isinstance(p, str) and p.startswith("cluster.")}
    assert cluster == set(ClusterConfig.model_fields) - {"address", "storage_path"}
    data = {p.split(".", 1)[1] for p in params if isinstance(p, str) and p.startswith("data.")}
    assert data == set(RUN_DATA_KEYS) - ({"ingest"} if stage == "tune" else set())


@pytest.mark.parametrize("name", ["prepare", "encoder", "tune", "train", "evaluate", "register"])
def test_stage_code_deps_are_its_import_closure(name):
    """A stage reruns when, and only when, code it runs changed: its dvc.yaml deps inside
    ganflow/ are exactly the modules its entry point imports, transitively."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    listed = {d for d in stage["deps"] if d.startswith(("ganflow/", "pipelines/"))}
    expected = import_closure(REPO / "pipelines" / f"{name}.py") | {f"pipelines/{name}.py"}
    assert listed == expected, f"missing: {sorted(expected - listed)}; not used: {sorted(listed - expected)}"


def test_the_import_closure_sees_lazy_imports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from ganflow.registry import register\n")
    closure = import_closure(script, REPO / "ganflow")
    # registry's own module-level import, and tracking's import inside a function
    assert {"ganflow/registry.py", "ganflow/tracking.py", "ganflow/images.py"} <= closure
    assert "ganflow/tuning.py" not in closure


# The layering contract: a stage reruns (dvc.yaml's deps are its closure) only for code it runs.
FORBIDDEN = {
    "prepare": {
        "models",
        "train_loop",
        "losses",
        "augment",
        "tracking",
        "evaluation",
        "encoder",
        "sampling",
        "dataset",
    },
    # "data": the sources and the decoding pool of the prepare stage; readers use "dataset"
    "encoder": {"models", "sampling", "train_loop", "tracking", "data", "jobs"},
    "tune": {"export", "training", "registry", "sampling", "data"},
    "train": {"tuning", "registry", "data"},
    "evaluate": {"train_loop", "tuning", "training", "registry", "data"},
    "register": {"models", "train_loop", "tuning", "training", "evaluation", "sampling", "data", "dataset"},
}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_no_code_of_another_stage_it_does_not_run(stage):
    leaked = modules(f"pipelines/{stage}.py") & FORBIDDEN[stage]
    assert not leaked, f"pipelines/{stage}.py reaches {sorted(leaked)}: a change there would rerun {stage}"


# modules imported by every stage, or read for a file name or a JSON: they must not pull in torch
BASE = (
    "errors",
    "config",
    "atomic",
    "artifacts",
    "images",
    "endpoints",
    "closure",
    "budget",
    "checkpoints",
    "filesystems",
    "interrupts",
    "stage",
    "jobs",
    "raycluster",
    "tracking",
    "registry",
    "report",
)


def test_the_base_modules_import_no_torch():
    code = (
        f"import sys; import {', '.join(f'ganflow.{m}' for m in BASE)}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'albumentations', 'cv2'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert json.loads(out) == []


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """For every ganflow module, the ganflow modules it imports itself: at module level (what runs
    at import), or with ``lazy`` inside functions too."""
    package = REPO / "ganflow"
    return {path.stem: direct_imports(path, package, lazy) for path in sorted(package.glob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's members (strongly connected components of more than one module, or a self-import)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_even_through_lazy_imports():
    assert cycles(import_graph(lazy=False)) == []
    assert cycles(import_graph(lazy=True)) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_resume_key_covers_every_module_a_training_worker_imports():
    """The key's code list is the closure of the loop each worker runs; every ganflow module that
    importing the loop loads is in it, and so are the ones it imports inside functions
    (metrics.py, left out of the old hand-kept list, among them)."""
    from ganflow.checkpoints import TRAINING_ENTRY, training_code

    code = set(training_code())
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json, ganflow.train_loop; "
            "print(json.dumps(sorted(m.split('.')[1] for m in sys.modules if m.startswith('ganflow.'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    loaded = {f"{m}.py" for m in json.loads(out)}
    assert loaded <= code, sorted(loaded - code)
    assert {TRAINING_ENTRY, "metrics.py", "models.py", "losses.py", "augment.py", "budget.py", "config.py"} <= code
    assert not {"tuning.py", "registry.py", "cli.py", "training.py", "export.py"} & code  # not run by a worker


def test_the_suite_s_longest_first_order_names_files_of_the_suite():
    """make test's first phase starts the files of conftest.LONGEST_FIRST first: a name there that
    is no test file (renamed, removed) would silently leave its file to the end again."""
    from tests.conftest import LONGEST_FIRST

    here = Path(__file__).parent
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [name for name in LONGEST_FIRST if not (here / name).is_file()]
    assert not missing, missing
