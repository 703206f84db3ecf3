"""The tune stage (Ray Tune + ASHA over a TorchTrainer per trial, nested MLflow runs), the train
stage using its result, and the registry's promotion rule."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from ganflow.config import load_config
from ganflow.registry import register
from ganflow.tuning import objective_noise
from tests.conftest import REPO, run
from tests.test_training import make_project, mlflow_client

# limits sized for a loaded 2-core machine: with a busy loop per core the 4-trial sweep outlasted 600 s
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
TUNE = {
    "num_samples": 4,
    "kimg": 3.6,
    "tick_kimg": 1.0,
    "grace_period": 1,
    "reduction_factor": 2,
    "seed": 2,
    "lr_g_min": 1e-5,
    "lr_g_max": 1e-2,
    "lr_d_min": 1e-5,
    "lr_d_max": 1e-2,
}
# trial 1 trains train.lr_g/lr_d (tune.include_train_rates), then seed 2 draws (lr_g, lr_d) = (6.1e-5,
# 7.9e-5), (2.8e-3, 1.9e-5), (6.3e-4, 1.5e-3). The default scheduler (sha) keeps 2 of the 4 at tick 1
# and 1 of those 2 at tick 2, and trial 1 (the anchor) to the end whatever its rank


def stage(name: str, params, timeout: float = 1800):
    proc = run(
        [sys.executable, str(REPO / "pipelines" / f"{name}.py"), "--params", str(params)],
        cwd=params.parent,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """prepare + encoder, then tune -> train -> evaluate -> register, once for the module."""
    root = tmp_path_factory.mktemp("tune") / "p"
    params = make_project(root, tune=TUNE, train={"epochs": 1})
    procs = {name: stage(name, params) for name in ("tune", "train", "evaluate", "register")}
    outputs = {name: proc.stdout for name, proc in procs.items()}
    outputs["tune console"] = procs["tune"].stdout + procs["tune"].stderr
    return root, params, outputs


def test_sweep_stops_trials_early_and_nests_them_in_mlflow(swept):
    root, params, outputs = swept
    best = json.loads((root / "tune" / "best.json").read_text())
    assert best["tuned"] is True and best["trials"] == 4
    assert TUNE["lr_g_min"] <= best["lr_g"] <= TUNE["lr_g_max"] and TUNE["lr_d_min"] <= best["lr_d"] <= TUNE["lr_d_max"]
    assert best["epoch"] == 3 and np.isfinite(best["fd_domain"])  # 3 ticks of 1.2 kimg each at most
    # Tune ends each trial by killing its Train controller; Ray's warning about it is silenced
    assert "best of 4 trials" in outputs["tune console"]
    assert "is dead. Cleaning up placement group" not in outputs["tune console"]

    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("ganflow").experiment_id
    parent = client.get_run(best["sweep_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ganflow.stage"] == "tune"
    assert float(parent.data.params["best_lr_g"]) == best["lr_g"]
    assert parent.data.metrics["best_fd_domain"] == pytest.approx(best["fd_domain"])
    assert "sweep_fd_domain.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    statuses = {c.data.tags.get("ganflow.trial_status") for c in children}
    assert statuses == {"stopped early (sha)", "finished"}
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        assert {"lr_g", "lr_d"} <= set(child.data.params)
        fd_steps = [m.step for m in client.get_metric_history(child.info.run_id, "fd_domain")]
        assert fd_steps == list(range(1, len(fd_steps) + 1)) and fd_steps  # every epoch it ran, once
    history = {
        c.info.run_id: [
            m.value for m in sorted(client.get_metric_history(c.info.run_id, "fd_domain"), key=lambda m: m.step)
        ]
        for c in children
    }
    # the first trial trained the rates a training without a sweep uses (the anchor); the others were drawn
    train = load_config(params).train
    (anchor,) = [c for c in children if c.data.tags["mlflow.runName"].startswith("trial 1 ")]
    assert (float(anchor.data.params["lr_g"]), float(anchor.data.params["lr_d"])) == (train.lr_g, train.lr_d)
    assert all(float(c.data.params["lr_g"]) != train.lr_g for c in children if c is not anchor)
    # synchronous halving: the survivors of a rung are the best there, whichever reported first
    # (fd_recent: the mean of the last two fd_domain); the anchor is never cut
    others = [c for c in children if c is not anchor]
    ticks = {c.info.run_id: len(history[c.info.run_id]) for c in children}
    assert ticks[anchor.info.run_id] == 3
    by_tick1 = sorted(children, key=lambda c: history[c.info.run_id][0])
    passed = by_tick1[:2]
    assert {c.info.run_id for c in others if ticks[c.info.run_id] >= 2} == {
        c.info.run_id for c in passed if c in others
    }
    survivor = min({*passed, anchor}, key=lambda c: np.mean(history[c.info.run_id][:2]))  # may be the anchor
    assert {c.info.run_id for c in children if ticks[c.info.run_id] == 3} == {anchor.info.run_id, survivor.info.run_id}
    assert best["stopped_early"] == sum(t < 3 for t in ticks.values()) and best["trial_ticks"] == sum(ticks.values())
    # the answer: the survivor only if its fd_recent beats the anchor's by more than the noise
    # of the difference (tune.pick_margin 1), else the anchor
    recent = {c.info.run_id: float(np.mean(history[c.info.run_id][-2:])) for c in children}
    noise = np.hypot(objective_noise(history[anchor.info.run_id]), objective_noise(history[survivor.info.run_id]))
    beats = recent[anchor.info.run_id] - recent[survivor.info.run_id] > noise / np.sqrt(2)
    best_child = survivor if beats else anchor
    assert float(best_child.data.params["lr_g"]) == best["lr_g"]
    assert best["fd_domain"] == pytest.approx(recent[best_child.info.run_id])
    # every trial trained with its own seed, derived from tune.seed
    seeds = {c.data.params["train.seed"] for c in children}
    assert len(seeds) == 4
    # trials run in reused processes: 4 trials and at least 2 resumptions (anchor and survivor)
    # are 6 starts; a new process for each would show 6 pids
    pids = {
        json.loads(line)["pid"]
        for result in (root / "ray_results").glob("tune-*/*/result.json")
        for line in result.read_text().splitlines()
        if line.strip()
    }
    assert 1 <= len(pids) <= len(children)


def test_train_used_the_tuned_learning_rates(swept):
    root, params, outputs = swept
    best = json.loads((root / "tune" / "best.json").read_text())
    spec = json.loads((root / "models" / "generator" / "generator.json").read_text())
    run = mlflow_client(root).get_run(spec["mlflow_run_id"])
    assert run.data.tags["ganflow.stage"] == "train"
    assert float(run.data.params["lr_g"]) == best["lr_g"] and float(run.data.params["lr_d"]) == best["lr_d"]


def test_population_based_training_copies_the_better_member_and_perturbs_its_rates(tmp_path):
    """tune.scheduler: pbt with two members: at every tick the worse one loads the better one's
    checkpoint and goes on with perturbed rates; both train the whole budget, each member keeps
    one MLflow run whose lr_g/lr_d metrics are its schedule, and best.json holds the best
    member's last rates."""
    # two ticks: the exploit after the first, the second trained with the perturbed rates
    pbt = {**TUNE, "num_samples": 2, "kimg": 2.4, "scheduler": "pbt", "pbt_interval": 1, "lr_g_min": 1e-4}
    params = make_project(tmp_path / "p", tune=pbt, train={"epochs": 1})
    out = stage("tune", params)
    console = out.stdout + out.stderr
    assert "resuming from the checkpoint of epoch" in console, console[-3000:]  # a member took another's weights
    best = json.loads((tmp_path / "p" / "tune" / "best.json").read_text())
    assert best["trials"] == 2 and best["stopped_early"] == 0 and best["epoch"] == 2  # every member: every tick

    client = mlflow_client(tmp_path / "p")
    experiment = client.get_experiment_by_name("ganflow").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{best['sweep_run_id']}'")
    assert len(children) == 2  # a restarted member writes on in its own run
    schedules = {}
    for child in children:
        assert child.info.status == "FINISHED"
        lr_g = sorted(client.get_metric_history(child.info.run_id, "lr_g"), key=lambda m: (m.step, m.timestamp))
        assert sorted({m.step for m in lr_g}) == [1, 2]
        schedules[child.info.run_id] = [m.value for m in lr_g]
    # the worse member went on with rates other than its first
    assert any(len(set(s)) > 1 for s in schedules.values()), schedules
    picked = [c for c in children if schedules[c.info.run_id][-1] == pytest.approx(best["lr_g"])]
    assert picked, (best, schedules)


def test_disabled_tune_passes_the_configured_rates_through(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("tune:\n  enabled: false\ntrain:\n  lr_g: 3.0e-4\n  lr_d: 1.0e-4\n")
    out = stage("tune", params).stdout
    assert "tune.enabled is false" in out
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert (best["lr_g"], best["lr_d"], best["tuned"]) == (3e-4, 1e-4, False)


def reregister(cfg, fd_domain: float, weight_noise: float, copying: bool = False):
    """Stand-in for another training: new weights (a new version) and its evaluation."""
    path = cfg.paths.generator / "generator.safetensors"
    weights = load_file(str(path))
    key = sorted(weights)[0]
    weights[key] = weights[key] + weight_noise
    save_file(weights, str(path))
    metrics = json.loads((cfg.paths.metrics / "eval.json").read_text())
    metrics["validation"]["fd_domain"] = fd_domain
    metrics["validation"]["fd_domain_sd"] = 0.0
    metrics["copying_flagged"] = float(copying)
    (cfg.paths.metrics / "eval.json").write_text(json.dumps(metrics))
    return register(cfg)


def test_registry_promotion_rule_and_idempotence(swept, tmp_path):
    root, params, outputs = swept
    first = json.loads((root / "registry" / "model_version.json").read_text())
    assert first["version"] == 1 and first["promoted"] and first["aliases"] == ["challenger", "champion"]
    assert "promoted to champion" in outputs["register"]

    # work on a copy so the module's other tests see the original outputs
    copy = tmp_path / "p"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("ray_results"))
    cfg = load_config(copy / "params.yaml")
    client = mlflow_client(copy)

    again = register(cfg)  # the same generator: no second version
    assert again["version"] == 1 and not again["created"]
    assert len(client.search_model_versions("name='ganflow-generator'")) == 1

    worse = reregister(cfg, fd_domain=first["validation_fd_domain"] * 2, weight_noise=0.01)
    assert worse["version"] == 2 and not worse["promoted"] and worse["aliases"] == ["challenger"]
    assert str(client.get_model_version_by_alias("ganflow-generator", "champion").version) == "1"

    assert first["validation_fd_domain_sd"] < first["validation_fd_domain"] / 2  # so that / 2 is beyond noise
    better = reregister(cfg, fd_domain=first["validation_fd_domain"] / 2, weight_noise=0.02)
    assert better["version"] == 3 and better["promoted"]
    assert better["aliases"] == ["challenger", "champion"]
    assert first["copying_flagged"] is False  # the real trained generator is not flagged
    # a generator the data-copying test flags never becomes champion, however low its fd_domain
    copier = reregister(cfg, fd_domain=first["validation_fd_domain"] / 10, weight_noise=0.03, copying=True)
    assert copier["version"] == 4 and not copier["promoted"] and copier["copying_flagged"]
    assert str(client.get_model_version_by_alias("ganflow-generator", "champion").version) == "3"
    version = client.get_model_version("ganflow-generator", "3")
    assert {
        "fd_domain",
        "fd_domain_sd",
        "validation_fd_domain",
        "validation_fd_domain_sd",
        "data_hash",
        "params_hash",
        "git_commit",
        "generator_sha256",
    } <= set(version.tags)
    assert "fd_domain" in version.description

    proc = run(
        [
            "ganflow",
            "sample",
            "--model",
            "models:/ganflow-generator@champion",
            "-n",
            "3",
            "--out",
            "champ.npz",
            "--params",
            str(copy / "params.yaml"),
        ],
        cwd=copy,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(copy / "champ.npz")["images"].shape == (3, 16, 16, 1)


def test_placement_groups_of_dead_trial_controllers_are_released():
    """What a killed trial leaves behind when Ray Train's own cleaner fails (seen under load): a
    placement group whose creating actor is dead, holding its CPU until the job ends. The sweep
    releases exactly those; the driver's own and a live actor's stay."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from ganflow.raycluster import init_ray
    from ganflow.tuning import release_orphaned_placement_groups

    assert not ray.is_initialized()
    init_ray()  # the local Ray a stage starts
    try:

        @ray.remote(num_cpus=0)
        class Controller:  # stands in for a trial's TrainController
            def reserve(self) -> str:
                pg = placement_group([{"CPU": 0.5}])
                ray.get(pg.ready())
                return pg.id.hex()

            def niceness(self) -> int:
                import os

                return os.nice(0)

        dying, living = Controller.remote(), Controller.remote()
        # Ray's default runs workers at nice 15: next to any busy process they starved (4 % of a core)
        assert ray.get(living.niceness.remote()) == 0
        orphan, kept = ray.get(dying.reserve.remote()), ray.get(living.reserve.remote())
        own = placement_group([{"CPU": 0.5}])
        ray.get(own.ready())
        ray.kill(dying)

        def state(pg_id: str) -> str:
            return placement_group_table()[pg_id]["state"]

        deadline = time.time() + 120
        while state(orphan) != "REMOVED":
            assert state(orphan) == "CREATED"  # Ray alone keeps it while the job lives
            release_orphaned_placement_groups()
            assert time.time() < deadline, "the dead controller's placement group was never released"
            time.sleep(0.2)
        assert state(kept) == "CREATED" and state(own.id.hex()) == "CREATED"
        assert release_orphaned_placement_groups() == 0
    finally:
        ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sweep_with_failed_trials_fails_and_writes_nothing(tmp_path, workers):
    """A trial that dies mid-training fails the stage: the best of whatever trials survived is
    not the sweep's answer. Both kinds of trial: one worker (the trial's own process runs the
    loop: it is killed) and two (a TorchTrainer per trial, train.max_failures 0: its Ray Train
    workers are killed). Every such process seen under the stage is killed, so at least one trial
    fails whatever the machine's speed (a 1 ms worker-start timeout, used before, was met by a
    fast machine)."""
    import subprocess

    import psutil

    target = "ray::ImplicitFunc" if workers == 1 else "ray::RayTrainWorker"
    params = make_project(
        tmp_path / "p",
        tune={**TUNE, "num_samples": 2, "kimg": 2.4},
        train={"max_failures": 0},
        cluster={"num_workers": workers},
    )
    (tmp_path / "p" / "tune" / "best.json").unlink()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "tune.py"), "--params", str(params)],
        cwd=params.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = 0
    try:
        while proc.poll() is None:  # the stage's own Ray runs under it: its workers are its descendants
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for worker in tree:
                try:
                    if target in " ".join(worker.cmdline()):
                        worker.kill()
                        killed += 1
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        out, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed >= 1, f"no {target} process was ever seen under the tune stage"
    assert proc.returncode != 0, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # a trial whose worker finished its 2 epochs before it was seen survives; one failed trial is enough
    assert len(errors) == 1 and re.search(r"tune: [12] of 2 trials failed", errors[0]), err[-2000:]
    assert "nothing written" in errors[0], err[-2000:]
    assert not (tmp_path / "p" / "tune" / "best.json").exists()
    client = mlflow_client(tmp_path / "p")
    sweep = client.search_runs(
        [client.get_experiment_by_name("ganflow").experiment_id], "tags.`ganflow.stage` = 'tune'"
    )
    assert [r.info.status for r in sweep] == ["FAILED"]


@pytest.mark.parametrize(
    "trials",
    [
        [],
        [{"lr_g": None, "lr_d": None, "fd": None}],  # failed before its rates were recorded
        [{"lr_g": 1e-3, "lr_d": 2e-4, "fd": None}, {"lr_g": 5e-4, "lr_d": 5e-4, "fd": 3.2}],
    ],
    ids=["no trial", "no rates", "scored and failed"],
)
def test_the_sweep_plot_is_drawn_whatever_the_trials_reported(trials):
    """A sweep whose trials all failed early must still end in its one-line error, not in a plot
    that cannot put nothing on log axes (seen under load: matplotlib's ValueError)."""
    from ganflow.tuning import _sweep_plot

    image = _sweep_plot(trials)
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
