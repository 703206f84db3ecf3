"""What a person sees of the tracked runs without a browser: names, descriptions, provenance
tags, and `ganflow runs`. The store is written without Ray, by ganflow's own tracking calls
(tests/test_ui.py: build_store)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ganflow.artifacts import read_manifest
from ganflow.cli import main
from ganflow.tracking import NOTE_TAG, SAMPLES_KEY, lr_text, tracking_uri
from ganflow.tuning import trial_number
from tests.test_ui import build_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("runs") / "project")


def runs_by_name(store) -> dict:
    client = MlflowClient(tracking_uri(store["cfg"]))
    return {r.info.run_name: r for r in client.search_runs([store["experiment_id"]])}


def test_names_for_people():
    assert [lr_text(x) for x in (3.2e-4, 1.1e-4, 1e-3, 2e-4, 0.0123)] == [
        "3.2e-4",
        "1.1e-4",
        "1.0e-3",
        "2.0e-4",
        "1.2e-2",
    ]
    assert [trial_number(t) for t in ("a1b2c_00000", "a1b2c_00011", "3f9e1c2a", "12345678")] == [1, 12, None, None]


def test_runs_are_named_described_and_tagged(store):
    runs = runs_by_name(store)
    assert set(runs) == {
        "train lr_g=3.2e-4 lr_d=1.1e-4",
        "train lr_g=1.0e-3 lr_d=2.5e-4",
        "tune 2 trials",
        "trial 1 lr_g=5.0e-4 lr_d=2.0e-4",
        "trial 2 lr_g=2.0e-3 lr_d=6.0e-5",
    }
    train, sweep = runs["train lr_g=3.2e-4 lr_d=1.1e-4"], runs["tune 2 trials"]
    trials = [runs["trial 1 lr_g=5.0e-4 lr_d=2.0e-4"], runs["trial 2 lr_g=2.0e-3 lr_d=6.0e-5"]]
    for run in (train, sweep, *trials):
        tags = run.data.tags
        assert {"git_commit", "dvc_stage", "data_hash", "params_hash", "ganflow.stage", NOTE_TAG} <= set(tags)
        assert tags["data_hash"] == read_manifest(store["cfg"].paths.prepared)["images_sha256"]
        assert "1797 images of 16x16x1" in tags[NOTE_TAG]
    assert train.data.tags["dvc_stage"] == "train" and "sweep_id" not in train.data.tags
    assert train.data.tags[NOTE_TAG].startswith(
        "GAN training with lr_g=3.2e-4 lr_d=1.1e-4: 3 epochs, 2 Ray Train worker(s)"
    )
    assert sweep.data.tags["sweep_id"] == sweep.info.run_id and sweep.data.tags["dvc_stage"] == "tune"
    assert sweep.data.tags[NOTE_TAG].startswith("Learning-rate sweep: 2 trials (random search")
    for trial in trials:
        assert trial.data.tags["sweep_id"] == trial.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        assert trial.data.tags["dvc_stage"] == "tune" and trial.data.tags[NOTE_TAG].startswith("Trial ")
        assert (trial.data.params["lr_g"], trial.data.params["lr_d"]) != (
            train.data.params["lr_g"],
            train.data.params["lr_d"],
        )
    # beside the params as written (auto), what they resolved to for these 16 px grey digits
    for run in (train, *trials):
        params = run.data.params
        assert params["model.g_width"] == params["train.augment_policy"] == "auto"
        assert params["resolved.model.g_width"] == params["resolved.model.d_width"] == "64"
        assert params["resolved.train.augment_policy"] == "translation,cutout"
        assert params["resolved.model.conditional"] == "False" and params["resolved.train.mode_seeking"] == "0.0"
    # one data set, one commit; the trials ran with another config (tune.epochs) than the training
    assert len({r.data.tags["data_hash"] for r in (train, sweep, *trials)}) == 1
    assert trials[0].data.tags["params_hash"] != train.data.tags["params_hash"]
    # the same metric names in trainings and trials, and the grids under one image key
    assert set(trials[0].data.metrics) == set(train.data.metrics) >= {"fd_domain", "kid", "loss_d", "loss_g", "epoch"}
    client = MlflowClient(tracking_uri(store["cfg"]))
    for run in (train, *trials):
        images = [a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "images")]
        assert images and all(name.startswith(f"{SAMPLES_KEY}+step+") for name in images)


def test_ganflow_runs_prints_trainings_and_sweeps(store, capsys):
    assert main(["runs", "--params", str(store["params"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "stage", "status", "lr_g"]
    assert len(lines) == 4  # header, the sweep (newest), the two trainings
    assert lines[1].startswith("tune 2 trials") and "tune" in lines[1].split()
    assert lines[1].split()[5:8] == ["5.0e-4", "2.0e-4", "17.25"]  # the best trial's rates and fd_domain
    assert lines[1].endswith("2 trials, 1 stopped early; best: trial 1 (" + store["trials"][0][:8] + ")")
    assert lines[2].startswith("train lr_g=1.0e-3 lr_d=2.5e-4")
    assert lines[2].split()[3:9] == ["train", "FINISHED", "1.0e-3", "2.5e-4", "9.125", "3"]
    assert lines[3].startswith("train lr_g=3.2e-4 lr_d=1.1e-4") and store["trainings"][0][:8] in lines[3]
    assert " 12.75 " in lines[3]  # the best epoch's fd_domain

    assert main(["runs", "--params", str(store["params"]), "--trials", "-n", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines[1:]] == ["tune 2 trials", "", ""]
    assert lines[2].startswith("  trial 1 lr_g=5.0e-4 lr_d=2.0e-4") and " KILLED " in lines[3]


def test_ganflow_runs_fails_in_one_line_without_a_store(store, tmp_path, capsys):
    missing = tmp_path / "none.db"
    assert main(["runs", "--tracking-uri", f"sqlite:///{missing}", "--experiment", "ganflow"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no MLflow store at {missing}") and "\n" not in err
    assert not missing.exists()  # listing never creates a store

    assert main(["runs", "--params", str(store["params"]), "--experiment", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no experiment named 'nope'" in err and "ganflow" in err and "\n" not in err
    assert main(["runs", "--params", str(store["params"]), "-n", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --limit: must be > 0, got 0"
