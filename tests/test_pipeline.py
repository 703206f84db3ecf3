"""The DVC pipeline, run for real with `dvc repro` in a fresh copy of the project."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import edit_params, run
from tests.test_layering import import_closure

pytestmark = pytest.mark.slow


def test_dvc_repro_prepare(project):
    first = run(["dvc", "repro", "prepare"], project, check=True)
    assert "prepared 1797 images (32x32x1, 10 classes)" in first.stdout
    manifest = json.loads((project / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["count"] == 1797
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["outs"][0]["path"] == "data/prepared"

    again = run(["dvc", "repro", "prepare"], project, check=True)
    assert "Stage 'prepare' didn't change, skipping" in again.stdout
    assert "prepared 1797 images" not in again.stdout

    # a param that shapes the data reruns the stage; the output follows it
    edit_params(project / "params.yaml", data={"image_size": 16})
    third = run(["dvc", "repro", "prepare"], project, check=True)
    assert "prepared 1797 images (16x16x1, 10 classes)" in third.stdout
    assert run(["dvc", "status", "prepare"], project, check=True).stdout.strip().endswith("up to date.")


def test_dvc_repro_fails_cleanly_on_bad_params(project):
    run(["dvc", "repro", "prepare"], project, check=True)
    before = (project / "data" / "prepared" / "images-00000.npy").read_bytes()
    edit_params(project / "params.yaml", data={"source": "folder"})  # data/raw holds only .gitkeep
    proc = run(["dvc", "repro", "prepare"], project)
    assert proc.returncode != 0
    assert "error: data.path: folder is empty" in proc.stderr + proc.stdout
    # DVC keeps the last good output in its cache; checkout brings it back unchanged
    run(["dvc", "checkout", "--force", "prepare"], project)
    edit_params(project / "params.yaml", data={"source": "digits"})
    assert run(["dvc", "status", "prepare"], project, check=True).stdout.strip().endswith("up to date.")
    assert (project / "data" / "prepared" / "images-00000.npy").read_bytes() == before


def shapes_folder(root: Path, per_class: int = 150, size: int = 64) -> None:
    """A labelled image folder of 64 px RGB PNGs, seeded: coloured discs and coloured bars on a
    dark background, one subfolder per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for name in ("bars", "discs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 40, 3, dtype=np.uint8)
            colour = rng.integers(90, 256, 3, dtype=np.uint8)
            cy, cx = rng.integers(16, size - 16, 2)
            if name == "discs":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(6, 14) ** 2
            else:
                mask = (abs(yy - cy) <= rng.integers(2, 6)) & (abs(xx - cx) <= rng.integers(10, 16))
            image[mask] = colour
            Image.fromarray(image).save(root / name / f"{i:03d}.png")


@pytest.mark.timeout(3600)  # a loaded 2-core machine took more than 10 min for the first repro
def test_dvc_repro_whole_pipeline(project):
    """`dvc repro` on a tiny params file: every stage runs, writes its outputs, then nothing
    reruns. The data: a generated folder of 64 px RGB images in two classes, trained with the
    residual, class-conditional, spectral-norm/hinge recipe (the digits run in `make run`)."""
    shapes_folder(project / "data" / "raw")
    edit_params(
        project / "params.yaml",
        data={"source": "folder", "image_size": 64, "channels": 3},
        model={
            "arch": "resnet",
            "conditional": "auto",
            "spectral_norm": True,
            "latent_dim": 16,
            "g_width": 8,
            "d_width": 8,
        },
        train={"epochs": 2, "tick_kimg": 0.1, "loss": "hinge", "batch_size": 32},
        eval={
            "num_samples": 200,
            "encoder_epochs": 2,
            "feature_dim": 16,
            "kid_subsets": 5,
            "kid_subset_size": 40,
            "draws": 3,
        },
        tune={"num_samples": 2, "kimg": 0.19, "tick_kimg": 0.1, "grace_period": 1, "max_concurrent_trials": 2},
    )
    first = run(["dvc", "repro"], project, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepared 300 images (64x64x3, 2 classes)" in first.stdout
    stages = ("prepare", "encoder", "tune", "train", "evaluate", "register")
    order = [first.stdout.index(f"Running stage '{s}'") for s in stages]
    assert order == sorted(order)
    assert "kimg (2 epochs)" in first.stdout and "x the real baseline" in first.stdout
    for out in (
        "data/prepared/manifest.json",
        "models/encoder/encoder.safetensors",
        "models/encoder/reference.safetensors",
        "models/generator/generator.safetensors",
        "models/generator/generator.json",
        "metrics/train.json",
        "metrics/encoder.json",
        "metrics/eval.json",
        "plots/train.csv",
        "plots/eval_classes.csv",
        "plots/samples.png",
        "tune/best.json",
        "registry/model_version.json",
    ):
        assert (project / out).is_file(), out
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, check=True).stdout)[""]["data"]
    assert shown["metrics/train.json"]["data"]["epochs"] == 2
    evaluation = shown["metrics/eval.json"]["data"]
    assert evaluation["fd_domain_over_real"] == pytest.approx(evaluation["fd_domain"] / evaluation["real_fd_domain"])
    assert evaluation["split"] == "test" and evaluation["draws"] == 3 and evaluation["fd_domain_sd"] > 0
    assert evaluation["validation"]["fd_domain"] > 0 and evaluation["copying_flagged"] == 0.0
    # a conditional G: the share drawn as the class asked for, next to the classifier's own accuracy
    assert 0.0 <= evaluation["class_match"] <= 1.0 and 0.5 <= evaluation["real_class_match"] <= 1.0
    assert "drawn as asked" in first.stdout
    best = json.loads((project / "tune" / "best.json").read_text())
    spec = json.loads((project / "models" / "generator" / "generator.json").read_text())
    assert (spec["lr_g"], spec["lr_d"]) == (best["lr_g"], best["lr_d"])  # train used the sweep's rates
    registered = json.loads((project / "registry" / "model_version.json").read_text())
    assert registered["version"] == 1 and "champion" in registered["aliases"]
    assert (spec["arch"], spec["num_classes"], spec["class_names"]) == ("resnet", 2, ["bars", "discs"])
    drawn = run(
        [
            "ganflow",
            "sample",
            "--model",
            "models:/ganflow-generator@champion",
            "-n",
            "4",
            "--class",
            "discs",
            "--out",
            "discs.npz",
        ],
        project,
    )
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert np.load(project / "discs.npz")["images"].shape == (4, 64, 64, 3)
    again = run(["dvc", "repro"], project, check=True)
    for name in stages:
        assert f"Stage '{name}' didn't change, skipping" in again.stdout
    assert "Data and pipelines are up to date." in again.stdout

    # an evaluation-only param reruns evaluate and nothing upstream; metrics diff shows it
    run(["git", "add", "-A"], project, check=True)
    run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "run 1"], project, check=True)
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 9, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(project / "inception.pt"))  # stands in for a user's local file
    edit_params(project / "params.yaml", eval={"inception_weights": "inception.pt"})
    third = run(["dvc", "repro"], project, check=True)
    assert "Running stage 'evaluate'" in third.stdout
    assert "Running stage 'train'" not in third.stdout and "Running stage 'encoder'" not in third.stdout
    diff = run(["dvc", "metrics", "diff", "--json"], project, check=True).stdout
    assert "fid_inception" in json.loads(diff)["metrics/eval.json"]
    # metrics and plots are committed with dvc.lock: DVC compares commits, not just the workspace
    run(["git", "add", "-A"], project, check=True)
    run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "run 2"], project, check=True)
    across = json.loads(
        run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json"], project, check=True).stdout
    )["metrics/eval.json"]
    assert across["fid_inception"]["old"] is None and across["fid_inception"]["new"] > 0
    assert across["fd_domain"]["old"] == across["fd_domain"]["new"] == evaluation["fd_domain"]
    revisions = json.loads(run(["dvc", "exp", "show", "--json", "-n", "2"], project, check=True).stdout)
    committed = [r for r in revisions if r["rev"] != "workspace"]
    assert len(committed) == 2 and all(
        r["data"]["metrics"]["metrics/eval.json"]["data"]["split"] == "test" for r in committed
    )
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "HEAD", "--json"], project, check=True).stdout)
    assert plots["data"]["train_losses"][0]["revisions"] == ["HEAD~1", "HEAD"]

    # training longer reruns train, not the sweep (trials run tune.kimg)
    edit_params(project / "params.yaml", train={"epochs": 3})
    stale = json.loads(run(["dvc", "status", "--json"], project, check=True).stdout)
    assert "train" in stale and "tune" not in stale, stale


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_flat_folder_of_100_images_runs_every_stage_and_says_what_its_numbers_mean(project):
    """A user's small set: 100 real images (scikit-learn's digit 3, as PNGs) in one flat folder,
    data.* pointed at it and the budget made tiny (narrow networks, a 2-trial sweep of one tick):
    every stage runs, the augmentation adapts, a model is registered, and evaluate prints what the
    figures mean at 15 test images and which it could not compute."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = project / "data" / "raw"
    for i, image in enumerate(digits.images[digits.target == 3][:100]):
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8)).save(raw / f"{i:03d}.png")
    edit_params(
        project / "params.yaml",
        data={"source": "folder", "image_size": 16},
        model={"latent_dim": 16, "g_width": 16, "d_width": 16},
        train={"kimg": 1.0, "tick_kimg": 0.25},
        eval={"encoder_epochs": 2, "draws": 3},
        tune={"num_samples": 2, "kimg": 0.13, "tick_kimg": 0.13, "grace_period": 1, "max_concurrent_trials": 2},
    )
    out = run(["dvc", "repro"], project, timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prepared 100 images (16x16x1, unlabelled)" in out.stdout, out.stdout[-3000:]
    assert "trained 1.024 kimg (16 epochs)" in out.stdout  # 70 training images: one batch of 64 an epoch
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["kimg"] == pytest.approx(1.024) and 0.0 <= train["last"]["augment_p"] <= 1.0
    # the exported G is the best of the ticks from half the budget on (train.export_from), never an early one
    history = list(csv.DictReader((project / "plots" / "train.csv").open()))
    late = [row for row in history if float(row["kimg"]) >= 0.5 * train["kimg"] - 1e-9]
    assert len(late) < len(history) and train["best_kimg"] >= 0.5 * train["kimg"]
    assert train["best_fd_domain"] == pytest.approx(min(float(row["fd_domain"]) for row in late))
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert evaluation["reference_size"] == 15 and "fd_domain" in evaluation["not_computed"]  # 15 <= feature_dim 64
    assert "reading: " in out.stdout and "only 15 reference images" in out.stdout
    assert evaluation["diversity_over_real"] > 0
    assert "less varied than real images" in out.stdout or "as varied as real images" in out.stdout
    assert json.loads((project / "registry" / "model_version.json").read_text())["version"] == 1


def test_an_edited_module_makes_dvc_rerun_exactly_the_stages_that_import_it(project):
    """Every stage recorded as up to date (outputs stood in by placeholder files: nothing runs),
    then one module edited at a time: `dvc status` names exactly the stages whose import closure
    holds it."""
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            out = next(iter(entry)) if isinstance(entry, dict) else entry
            for key, value in paths.items():
                out = out.replace(f"${{paths.{key}}}", value)
            target = project / out
            if target.suffix:  # a file output
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("placeholder\n")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / "placeholder").write_text("placeholder\n")
    run(["dvc", "commit", "-f", "-q"], project, check=True)
    assert run(["dvc", "status", "--json"], project, check=True).stdout.strip() in ("{}", "")
    closures = {name: import_closure(project / "pipelines" / f"{name}.py") for name in stages}
    for module in ("ganflow/losses.py", "ganflow/registry.py", "ganflow/metrics.py", "ganflow/data.py"):
        original = (project / module).read_text()
        (project / module).write_text(original + "\n# an edit\n")
        changed = set(json.loads(run(["dvc", "status", "--json"], project, check=True).stdout or "{}"))
        (project / module).write_text(original)
        assert changed == {name for name, closure in closures.items() if module in closure}, module
        assert changed  # each module picked is read by some stage
