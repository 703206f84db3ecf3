"""The cluster path for real: a Ray head (`ray start --head`) and an `mlflow server`, both on
127.0.0.1, started by `ganflow cluster up` (what `make cluster-up` runs); the train stage
submitted with `ray job submit`, and by `dvc repro` itself when cluster.address is set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ganflow import localcluster
from tests.conftest import BIN, copy_project, edit_params, run

pytestmark = pytest.mark.slow

TINY = {
    "data": {"image_size": 16},
    "model": {"latent_dim": 16, "g_width": 16, "d_width": 16},
    "train": {"epochs": 2, "tick_kimg": 1.0, "batch_size": 64, "max_failures": 0},
    "eval": {"num_samples": 200, "encoder_epochs": 2, "kid_subsets": 5, "kid_subset_size": 100},
    "tune": {"enabled": False},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local head + MLflow server for the module, as `ganflow cluster up` starts them, on a
    machine where another Ray already holds Ray's default agent and client ports: every test that
    submits a job then also checks the head did not take them (its job agent would have no HTTP)."""
    root = tmp_path_factory.mktemp("cluster")
    free_port = localcluster.free_port
    held = hold_ports(DEFAULT_RAY_PORTS)
    state = None
    try:
        proc = run(
            [
                str(BIN / "ganflow"),
                "cluster",
                "up",
                "--root",
                str(root),
                "--ray-port",
                str(free_port()),
                "--dashboard-port",
                str(free_port()),
                "--mlflow-port",
                str(free_port()),
                "--num-cpus",
                "2",
            ],
            root,
            timeout=900,  # cluster up waits up to STARTUP_WAIT_S for each of its two processes
        )
        assert proc.returncode == 0, proc.stderr
        state = localcluster.read_state(root)
        yield state
    finally:
        for sock in held:
            sock.close()
        down = run([str(BIN / "ganflow"), "cluster", "down", "--root", str(root)], root, timeout=120)
        assert down.returncode == 0, down.stderr
        if state is not None:
            assert not localcluster._alive(state.ray_pid) and not localcluster._alive(state.mlflow_pid)


# Ray's fixed defaults for the dashboard agent's HTTP server and the Ray Client server
DEFAULT_RAY_PORTS = (52365, 10001)


def hold_ports(ports) -> list[socket.socket]:
    """Listen on each port that is free now (one that is taken is already held by someone else)."""
    held = []
    for port in ports:
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen()
            held.append(sock)
        except OSError:
            sock.close()
    return held


def cluster_project(tmp_path: Path, state, **extra) -> Path:
    root = copy_project(tmp_path / "project")
    sections = {k: dict(v) for k, v in TINY.items()}
    for key, values in {**state.params(), **extra}.items():
        sections.setdefault(key, {}).update(values)
    edit_params(root / "params.yaml", **sections)
    return root


def job_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


def train_runs(state) -> list:
    client = MlflowClient(state.tracking_uri)
    experiment = client.get_experiment_by_name("ganflow")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`ganflow.stage` = 'train'")


def test_local_cluster_listens_on_loopback_with_token_auth(cluster):
    import urllib.error
    import urllib.request

    for url in (cluster.address, cluster.tracking_uri):
        assert url.startswith("http://127.0.0.1:")
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    for url in (cluster.address, cluster.tracking_uri):
        port = url.rsplit(":", 1)[1]
        binds = [line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")]
        assert not listening or binds and all(b.startswith("127.0.0.1:") for b in binds), (port, binds)
    # token auth is on: the job API refuses a request without the token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    # ...and answers one that carries it (what ganflow's job client sends)
    status = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", cluster.address],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr[-2000:]


def test_train_stage_submitted_with_ray_job_submit(cluster, tmp_path):
    root = cluster_project(tmp_path, cluster)
    for stage in ("prepare", "encoder", "tune"):  # the light stages run here; tune passes train.lr_* through
        run([str(BIN / "python"), f"pipelines/{stage}.py", "--params", "params.yaml"], root, check=True)
    before = {r.info.run_id for r in train_runs(cluster)}

    run([str(BIN / "ganflow"), "push", "train"], root, check=True)
    submission = f"test-train-{os.getpid()}"
    proc = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.address,
            "--submission-id",
            submission,
            "--working-dir",
            ".",
            "--",
            "python",
            "pipelines/train.py",
            "--params",
            "params.yaml",
        ],
        cwd=root,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", cluster.address, submission],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{submission}' succeeded" in status.stdout, status.stdout + status.stderr
    assert not (root / "models" / "generator").exists()  # the job ran in its own copy

    pulled = run([str(BIN / "ganflow"), "pull", "train"], root, check=True)
    assert submission in pulled.stdout
    spec = json.loads((root / "models" / "generator" / "generator.json").read_text())
    assert (root / "models" / "generator" / "generator.safetensors").stat().st_size > 0
    assert json.loads((root / "metrics" / "train.json").read_text())["epochs"] == 2
    assert (root / "plots" / "train.csv").read_text().count("\n") == 3

    # the run is on the MLflow server: params, per-epoch metrics, the model
    new = [r for r in train_runs(cluster) if r.info.run_id not in before]
    assert len(new) == 1
    run_ = new[0]
    assert run_.info.status == "FINISHED" and run_.info.run_id == spec["mlflow_run_id"]
    assert float(run_.data.params["lr_g"]) == pytest.approx(5e-4)  # train.lr_g: the sweep is off
    client = MlflowClient(cluster.tracking_uri)
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "fd_domain")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"generator_files"}
    models = client.search_logged_models(
        experiment_ids=[run_.info.experiment_id], filter_string=f"source_run_id = '{run_.info.run_id}'"
    )
    assert [m.name for m in models] == ["generator"]


def test_dvc_repro_submits_train_as_a_ray_job(cluster, tmp_path):
    root = cluster_project(tmp_path, cluster, train={**TINY["train"], "batch_size": 4096})
    # a job that fails: the stage fails with the job's own one-line reason, nothing is pulled
    failed = run([str(BIN / "dvc"), "repro", "train"], root, timeout=600)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "submitted Ray job ganflow-train-" in output
    assert "submitted Ray job ganflow-prepare-" in output  # the stages before it ran on the cluster too
    error = [line for line in failed.stderr.splitlines() if line.startswith("error: train: Ray job")]
    assert error and "FAILED" in error[0] and "train.batch_size" in error[0], output[-3000:]
    assert not (root / "models" / "generator").exists()

    edit_params(root / "params.yaml", train={"batch_size": 64})
    before = {r.info.run_id for r in train_runs(cluster)}
    # dvc killed by SIGTERM once the job is submitted: the stage stops the job, not orphans it
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "train"],
        cwd=root,
        env={**job_env(), "SHELL": "/bin/sh"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    submitted = None
    for line in proc.stdout:
        if "submitted Ray job " in line:
            submitted = line.split("submitted Ray job ", 1)[1].split()[0]
            break
    assert submitted, "no job submitted"
    exchange = Path(cluster.storage_path) / "exchange" / "ganflow"
    assert (exchange / submitted / "data" / "prepared" / "manifest.json").is_file()  # its own folder
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    deadline = time.time() + 90
    while True:
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", submitted, "--address", cluster.address],
            env=job_env(),
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        if "stopped" in status.lower() or time.time() > deadline:
            break
        time.sleep(1)
    assert "was stopped" in status, (status, rest[-2000:])  # `ray job status` of a STOPPED job
    assert f"error: train: interrupted; stopped Ray job {submitted}" in rest, rest[-2000:]
    assert not (root / "models" / "generator").exists()

    done = run([str(BIN / "dvc"), "repro", "train"], root, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "SUCCEEDED; outputs pulled into the workspace" in done.stdout
    assert "epoch 2/2" in done.stdout  # the job's log was streamed
    assert (root / "models" / "generator" / "generator.safetensors").exists()
    status = run([str(BIN / "dvc"), "status", "train"], root, check=True)
    assert "changed" not in status.stdout, status.stdout  # DVC tracks the pulled outputs as usual
    # each submission exchanged its files through a folder of its own, removed once pulled
    assert not [p.name for p in exchange.glob("ganflow-train-*")], list(exchange.iterdir())
    # the run that finished made the generator; the stopped job's own run, if it got to start one
    # before the stop (and before a first checkpoint it could be resumed from), is KILLED
    new = [r for r in train_runs(cluster) if r.info.run_id not in before]
    finished = [r for r in new if r.info.status == "FINISHED"]
    assert len(finished) == 1, [(r.info.status, r.data.tags.get("ganflow.failure")) for r in new]
    assert all(
        r.info.status == "KILLED" and r.data.tags.get("ganflow.failure") == "interrupted"
        for r in new
        if r not in finished
    ), [(r.info.status, r.data.tags.get("ganflow.failure")) for r in new]
    spec = json.loads((root / "models" / "generator" / "generator.json").read_text())
    assert spec["mlflow_run_id"] == finished[0].info.run_id


def test_dvc_repro_submits_prepare_as_a_ray_job_that_decodes_with_ray_tasks(cluster, tmp_path):
    """cluster.address set: the prepare stage is a Ray job too. Its driver decodes the folder
    (at a path the cluster sees) with Ray tasks, and the prepared data set comes back into the
    workspace, byte for byte what a prepare on this machine writes."""
    import numpy as np
    from PIL import Image

    from ganflow.config import from_dict, resolve_paths
    from ganflow.data import prepare

    images = tmp_path / "images"  # outside the project: storage the cluster's nodes see
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = images / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (images / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    data = {
        "source": "folder",
        "path": str(images),
        "image_size": 16,
        "channels": 3,
        "shard_mb": 8 * 16 * 16 * 3 / 2**20,
    }  # 8 images per shard: 6 shard ranges
    root = cluster_project(tmp_path, cluster, data=data)
    done = run([str(BIN / "dvc"), "repro", "prepare"], root, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "submitted Ray job ganflow-prepare-" in output
    assert "prepare: decoded 6 shards with Ray tasks on 1 node(s) of the cluster" in output  # the job's log
    assert "SUCCEEDED; outputs pulled into the workspace" in output

    here = prepare(resolve_paths(from_dict({"data": data}), tmp_path / "here")).path
    pulled = root / "data" / "prepared"
    assert {p.name: p.read_bytes() for p in pulled.iterdir()} == {p.name: p.read_bytes() for p in here.iterdir()}
    assert json.loads((pulled / "manifest.json").read_text())["skipped"] == [
        {"file": "b/broken.png", "reason": "not a readable image"}
    ]
    status = run([str(BIN / "dvc"), "status", "prepare"], root, check=True)
    assert "changed" not in status.stdout, status.stdout
