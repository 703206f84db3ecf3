"""Training for real: the train stage in a subprocess on a local Ray, tracked in a local MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ganflow.artifacts import write_best
from ganflow.config import load_config
from ganflow.data import prepare
from ganflow.encoder import fit_encoder
from ganflow.tuning import run_sweep
from tests.conftest import BIN, REPO, checkpoint_registered, run, wait_until

pytestmark = pytest.mark.slow
TRAIN = str(REPO / "pipelines" / "train.py")


def make_project(root: Path, **sections) -> Path:
    """A params file for a tiny training at ``root``, and its prepared digits."""
    values = {
        "data": {"image_size": 16},
        "model": {"latent_dim": 16, "g_width": 16, "d_width": 16},
        "train": {"epochs": 2, "tick_kimg": 1.0, "batch_size": 64, "max_failures": 1},
        "eval": {"num_samples": 200, "encoder_epochs": 2, "kid_subsets": 5, "kid_subset_size": 100},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    cfg = load_config(params)
    prepare(cfg)
    fit_encoder(cfg)
    # what the tune stage writes when it passes train.lr_* through (the tune tests overwrite it)
    write_best(cfg, run_sweep(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"enabled": False})})))
    return params


def mlflow_client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def only_run(root: Path):
    client = mlflow_client(root)
    runs = client.search_runs([client.get_experiment_by_name("ganflow").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def final_meta(root: Path) -> dict:
    (run_dir,) = (root / "ray_results").glob("train-*")
    newest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    return json.loads((newest / "meta.json").read_text())


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 900) -> None:
    wait_until(lambda: checkpoint_registered(root / "ray_results"), timeout, "a registered checkpoint", proc)


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes under this test (its own simulated cluster's)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def start_training(params: Path, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env_vars}
    return subprocess.Popen(
        [sys.executable, TRAIN, "--params", str(params)],
        cwd=params.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_nodes(client: MlflowClient, run_id: str) -> list[dict]:
    return json.loads(client.get_run(run_id).data.tags["ganflow.workers"])


def test_two_workers_on_two_nodes_ddp_tracked_exported_and_sampled(tmp_path, two_nodes):
    """The conditional, augmented recipe (the one with the most per-rank state: class embeddings,
    conditional BatchNorm, D's projection, random augmentation per rank, mode-seeking pairs drawn
    within each rank's share) trained with DDP."""
    cluster, node = two_nodes
    root = tmp_path / "p"
    params = make_project(
        root,
        cluster={"num_workers": 2},
        model={"latent_dim": 16, "g_width": 16, "d_width": 16, "conditional": "auto"},
        train={"epochs": 2, "batch_size": 64, "max_failures": 1, "augment": "diffaugment", "mode_seeking": 0.3},
    )
    proc = start_training(params, RAY_ADDRESS=cluster.address)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-3000:]
    assert "kimg (2 epochs)" in out

    # one worker per node (1 CPU each); the images streamed through Ray Data (data.ingest auto on
    # two nodes) from a copy of the shards on the training's storage, which both nodes read; the
    # worker away from the driver got the small files (manifest, labels, split, encoder) through
    # the object store, and the ranks stayed in sync
    client, r = only_run(root)
    assert r.data.tags["ganflow.ingest"] == "ray_data"
    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    staged = root / "ray_results" / "datasets" / manifest["images_sha256"][:16]
    assert [
        (staged / s["file"]).read_bytes() == (root / "data" / "prepared" / s["file"]).read_bytes()
        for s in manifest["shards"]
    ] == [True]
    placement = sorted(worker_nodes(client, r.info.run_id), key=lambda w: w["rank"])
    assert {w["node"] for w in placement} == {cluster.head_node.node_id, node.node_id}
    assert {w["node"]: w["inputs"] for w in placement} == {cluster.head_node.node_id: "local", node.node_id: "shipped"}
    assert [m.value for m in client.get_metric_history(r.info.run_id, "epoch_rank_param_spread")] == [0.0, 0.0]

    # DDP: the global batch of 64 is split 32 + 32, and the ranks hold identical weights
    meta = final_meta(root)
    assert (meta["world_size"], meta["per_rank_batch"]) == (2, 32)
    assert meta["batchnorm"] == "per-rank"  # CPU ranks: torch has no SyncBatchNorm for them
    train_images = json.loads((root / "data" / "prepared" / "manifest.json").read_text())["split"]["train"]
    assert meta["step"] == 2 * (train_images // 2 // 32)  # the train split only
    assert [row["rank_param_spread"] for row in meta["history"]] == [0.0, 0.0]

    # the exported generator is the EMA generator of the epoch with the best in-training fd_domain
    spec = json.loads((root / "models" / "generator" / "generator.json").read_text())
    assert spec["epoch"] == 2 and spec["config"]["cluster"]["num_workers"] == 2
    fds = [row["fd_domain"] for row in meta["history"]]
    assert spec["best_epoch"] == 1 + int(np.argmin(fds)) and spec["fd_domain"] == min(fds)
    from safetensors.torch import load_file

    exported = load_file(str(root / "models" / "generator" / "generator.safetensors"))
    newest = sorted(p for p in (root / "ray_results").glob("train-*/checkpoint_*") if p.is_dir())[-1]
    state = torch.load(newest / "state.pt", weights_only=True)
    statistics = [k for k in exported if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(exported[k], state["best_ema_g"][k]) for k in exported if k not in statistics)
    # its BatchNorm statistics are the exported weights' own (recomputed for them), not the live G's
    from ganflow.models import recompute_batchnorm
    from ganflow.sampling import load_generator_dir

    g = load_generator_dir(root / "models" / "generator")
    assert g.num_classes == spec["num_classes"] == 10 and spec["class_names"] == [str(i) for i in range(10)]
    assert sum(spec["class_prior"]) == pytest.approx(1.0)
    recompute_batchnorm(g, seed=0, prior=spec["class_prior"])  # train.seed
    own = g.state_dict()
    assert all(torch.allclose(exported[k].float(), own[k].float(), atol=1e-4) for k in statistics)
    assert not all(
        torch.allclose(exported[k].float(), state["g"][k].float(), atol=1e-3) for k in statistics if "running" in k
    )
    train_json = json.loads((root / "metrics" / "train.json").read_text())
    assert train_json["epochs"] == 2 and train_json["best_fd_domain"] == min(fds)
    assert train_json["worker_restarts"] == 0 and train_json["worker_restart_causes"] == []
    assert (root / "plots" / "train.csv").read_text().splitlines()[
        0
    ] == "epoch,kimg,loss_d,loss_g,d_real,d_fake,rt,augment_p,fd_domain,kid"

    # the MLflow run: params, per-step diagnostics, sample grids, tags, the model
    client, r = only_run(root)
    run_id = r.info.run_id
    assert r.info.status == "FINISHED" and spec["mlflow_run_id"] == run_id
    assert r.data.params["train.lr_g"] == "0.0005" and r.data.params["lr_d"] == "0.0005"
    assert r.data.params["cluster.num_workers"] == "2"
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "imgs_per_sec"):
        assert len(steps(client, run_id, key)) >= 2, key
    assert steps(client, run_id, "epoch") == [1, 2]
    assert steps(client, run_id, "fd_domain") == [1, 2] and steps(client, run_id, "kid") == [1, 2]
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [1, 2]
    assert {"git_commit", "data_hash", "params_hash", "ganflow.stage"} <= set(r.data.tags)

    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    code = torch.cat([torch.randn(4, 16), torch.eye(10)[[0, 3, 5, 9]]], dim=1)  # z, then the one-hot class
    out = model(code)
    assert tuple(out.shape) == (4, 1, 16, 16) and out.abs().max() <= 1
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator")
    schema = pyfunc.metadata.get_input_schema().inputs[0]
    assert schema.shape == (-1, 26)  # 16 latent + 10 classes
    assert pyfunc.metadata.metadata["num_classes"] == 10 and pyfunc.metadata.metadata["latent_dim"] == 16
    assert np.asarray(pyfunc.predict(code.numpy())).shape == (4, 1, 16, 16)

    # ganflow sample: on the directory, the runs:/ URI and a registry alias: same seed, same images
    version = mlflow.register_model(f"runs:/{run_id}/generator", "test-generator").version
    client.set_registered_model_alias("test-generator", "champion", version)
    refs = ["models/generator", f"runs:/{run_id}/generator", "models:/test-generator@champion"]
    for i, model_ref in enumerate(refs):
        proc = run(
            [
                "ganflow",
                "sample",
                "--model",
                model_ref,
                "-n",
                "5",
                "--seed",
                "3",
                "--out",
                f"s{i}.npz",
                "--grid",
                f"s{i}.png",
                "--params",
                str(params),
            ],
            cwd=root,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b, c = (np.load(root / f"s{i}.npz")["images"] for i in range(3))
    assert a.shape == (5, 16, 16, 1) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # eager vs exported graph: rounding only
    assert np.array_equal(b, c)
    # --class: the same z drawn for another class gives other images, from the directory and the registry alike
    drawn = {}
    for model_ref, label in ((refs[0], "7"), (refs[2], "7"), (refs[0], "1")):
        out_file = f"c{len(drawn)}.npz"
        proc = run(
            [
                "ganflow",
                "sample",
                "--model",
                model_ref,
                "-n",
                "6",
                "--class",
                label,
                "--out",
                out_file,
                "--params",
                str(params),
            ],
            cwd=root,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        drawn[(model_ref, label)] = np.load(root / out_file)["images"].astype(int)
    assert np.abs(drawn[(refs[0], "7")] - drawn[(refs[2], "7")]).max() <= 1
    assert (drawn[(refs[0], "7")] != drawn[(refs[0], "1")]).any()  # same eager G, same z: only the class differs
    missing = run(
        [
            "ganflow",
            "sample",
            "--model",
            "models:/no-such-model@champion",
            "-n",
            "2",
            "--out",
            "x.npz",
            "--params",
            str(params),
        ],
        cwd=root,
    )
    assert missing.returncode == 1 and "error: --model models:/no-such-model@champion: cannot load" in missing.stderr
    assert (root / "s0.png").stat().st_size > 0


def newest_meta(root: Path) -> dict | None:
    """meta.json of the newest checkpoint Ray Train's controller has registered, or None."""
    if not checkpoint_registered(root / "ray_results"):
        return None
    try:
        return final_meta(root)
    except (OSError, ValueError):
        return None  # being written


@pytest.mark.timeout(3600)  # a loaded 2-core machine ran 6 epochs in more than 400 s
def test_killed_worker_then_lost_node_the_run_resumes_each_time(tmp_path, two_nodes):
    """Two faults in one DDP run, one Ray start (each was a test of its own, and a Ray start each):
    a worker process killed (Ray Train restarts the group from the last checkpoint, within
    train.max_failures), then the node holding a rank removed (the run waits for capacity instead
    of failing, and resumes when a node comes back). Every epoch is logged once, in one MLflow run."""
    cluster, node = two_nodes
    root = tmp_path / "p"
    params = make_project(
        root,
        data={"image_size": 32},
        model={"latent_dim": 32, "g_width": 32, "d_width": 32},
        train={"epochs": 6, "max_failures": 2},
        cluster={"num_workers": 2},
    )
    proc = start_training(params, RAY_ADDRESS=cluster.address)

    # 1. a worker killed: the group restarts from the registered checkpoint
    wait_for_checkpoint(root, proc)
    killed_at = final_meta(root)["epoch"]
    workers = train_workers()
    assert len(workers) == 2, workers
    workers[0].kill()
    # a restarted group first checkpoints the epoch it resumed at
    wait_until(lambda: (newest_meta(root) or {}).get("starts") == 2, 900, "a checkpoint of the restarted group", proc)
    lost_at = final_meta(root)["epoch"]

    # 2. the node holding rank 1 goes away: Ray Train tears the whole worker group down (rank 0
    # on the head too), and the run, short of a CPU for rank 1, waits for capacity
    cluster.remove_node(node)
    wait_until(lambda: not train_workers(), 600, "the worker group to be torn down", proc)
    assert proc.poll() is None
    replacement = cluster.add_node(num_cpus=1)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-3000:]

    meta = final_meta(root)
    assert meta["epoch"] == 6 and meta["starts"] == 3
    assert 1 <= killed_at <= lost_at < 6
    train_json = json.loads((root / "metrics" / "train.json").read_text())
    assert train_json["worker_restarts"] >= 1 and train_json["worker_restart_causes"][0].startswith("rank ")
    assert "worker restarted from its last checkpoint after: rank " in out
    client, r = only_run(root)  # the same MLflow run throughout, each epoch logged once
    assert r.info.status == "FINISHED" and r.data.metrics["worker_restarts"] == train_json["worker_restarts"]
    assert steps(client, r.info.run_id, "epoch") == list(range(1, 7))
    assert steps(client, r.info.run_id, "loss_d") == list(range(1, meta["step"] + 1))
    assert {w["node"] for w in worker_nodes(client, r.info.run_id)} == {cluster.head_node.node_id, replacement.node_id}


def test_divergence_fails_the_run_and_keeps_the_last_checkpoint(tmp_path):
    root = tmp_path / "p"
    params = make_project(root, train={"epochs": 3, "lr_g": 1e30, "lr_d": 1e30})
    proc = run([sys.executable, TRAIN, "--params", str(params)], cwd=root, timeout=400)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training diverged: non-finite loss in epoch 1" in lines[0]
    client, r = only_run(root)
    assert r.info.status == "FAILED" and "non-finite" in r.data.tags["ganflow.failure"]
    assert not (root / "models" / "generator").exists()


def test_more_workers_than_the_machine_has_fail_fast(tmp_path):
    root = tmp_path / "p"
    params = make_project(root, cluster={"num_workers": 64}, train={"batch_size": 64})
    proc = run([sys.executable, TRAIN, "--params", str(params)], cwd=root, timeout=300)
    assert proc.returncode == 1
    assert "cluster: 64 workers x (1 CPU) do not fit on this Ray cluster" in proc.stderr
    assert "TrainController" not in proc.stderr  # refused before Ray Train waits for the CPUs
    gpu = make_project(tmp_path / "g", cluster={"use_gpu": True})
    proc = run([sys.executable, TRAIN, "--params", str(gpu)], cwd=gpu.parent, timeout=120)
    assert proc.returncode == 1 and "set cluster.use_gpu: false" in proc.stderr
