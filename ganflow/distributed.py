"""The training driver: starts or joins Ray, runs the TorchTrainer, tracks and exports the result.

Resume: the Ray Train run is named from the training params, so running the same training
again (``dvc repro`` after a crash or Ctrl-C) finds the run in ``cluster.storage_path`` and
Ray restarts the workers from its latest checkpoint; the MLflow run id travels in the
checkpoint, so logging continues in the same run. A finished training is not resumed: it
trains again (same params and seed, same result on CPU).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganflow.atomic import check_storage_writable, file_sha256, write_file
from ganflow.config import Config
from ganflow.data import class_prior, read_manifest
from ganflow.errors import GanflowError, first_line
from ganflow.evaluation import load_reference
from ganflow.interrupts import Interrupted, stop_on_signals
from ganflow.models import build_generator, recompute_batchnorm
from ganflow.sampling import export_generator
from ganflow.tracking import connect, provenance, start_training_run, tracking_uri
from ganflow.train_loop import (
    CHECKPOINT_META,
    CHECKPOINT_STATE,
    SHIPPED_INPUTS,
    load_state_file,
    read_checkpoint_meta,
    train_loop_per_worker,
)

# Ray Train settings ganflow changes from Ray's defaults (an environment variable wins).
RAY_ENV_DEFAULTS = {
    # the controller polls worker reports this often: a worker that dies right after a
    # report loses at most about one poll of checkpoints (default 2 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker print shows twice
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # an error line per fit on clusters without preemption
    # how long a worker group may wait for its resources. check_resources() has already refused
    # what can never fit; what remains is waiting for other trials to free theirs, or slow
    # process start-up on a loaded machine (60 s, Ray's default, was seen to run out)
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Ray starts its worker processes at nice 15, and the training workers are among them: next
    # to two busy loops at the normal priority a RayTrainWorker got about 4 % of a core, and a
    # 6-epoch test ran for over 10 minutes. The training is the job: normal priority (read by the
    # raylet a stage starts; `ganflow cluster up` passes it to `ray start`)
    "RAY_worker_niceness": "0",
}


class TrainingError(GanflowError):
    """Training could not run or did not finish."""


def init_ray(cfg: Config) -> None:
    """Join RAY_ADDRESS (set inside a Ray job, or by hand on a cluster node), or start a local
    Ray sized to this machine. (cluster.address is the job server the stages are submitted to:
    see ganflow.jobs.)"""
    import ray

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    import logging

    # a local Ray turns token auth on and says so at every start; ganflow's own docs say it once
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            # "local": a new Ray of this process's own, never one found on the machine (a
            # `ray start` head, or the stale address file of one that is gone)
            ray.init(address="local", num_cpus=os.cpu_count(), logging_level="WARNING",
                     runtime_env={"worker_process_setup_hook": "ganflow.distributed.quiet_ray_workers"})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"cluster.address: cannot connect to Ray at {address or 'local'}: {first_line(exc)}") from None


def quiet_ray_workers() -> None:
    """Run in each worker process of a local Ray: Tune ends every trial at its last report by
    killing the trial's Train controller, and Ray's placement-group cleaner then warns, once per
    trial, that the controller "is dead". The sweep's own summary says how each trial ended."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def cpus_for_workers(cfg: Config, node_cpus: list[float]) -> float:
    """cluster.cpus_per_worker, with auto resolved for a training on nodes of ``node_cpus`` CPUs:
    the CPUs of the cluster shared by the workers, at most one node's, at least 1."""
    if cfg.cluster.cpus_per_worker != "auto":
        return float(cfg.cluster.cpus_per_worker)
    if not node_cpus:
        return 1.0
    return float(max(1, min(int(max(node_cpus)), int(sum(node_cpus)) // cfg.cluster.num_workers)))


def with_resolved_cpus(cfg: Config) -> Config:
    """A copy of ``cfg`` whose cluster.cpus_per_worker is a number (auto sized on the joined Ray)."""
    import ray

    if cfg.cluster.cpus_per_worker != "auto":
        return cfg
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    out = cfg.model_copy(deep=True)
    out.cluster.cpus_per_worker = cpus_for_workers(cfg, nodes)
    out._root, out._source = cfg._root, cfg._source
    return out


def scaling_config(cfg: Config):
    from ray.train import ScalingConfig

    per_worker: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        per_worker["GPU"] = 1.0
    return ScalingConfig(
        num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu, resources_per_worker=per_worker
    )


def check_resources(cfg: Config) -> None:
    """Fail now, not after a hang, when the cluster can never place the workers."""
    import ray

    per_worker = scaling_config(cfg).resources_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in per_worker}
    fits_per_node = [min(int(n.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0) for n in nodes]
    if sum(fits_per_node) < cfg.cluster.num_workers:
        wanted = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
        have = ", ".join(f"{v:g} {k}" for k, v in total.items())
        raise TrainingError(
            f"cluster: {cfg.cluster.num_workers} workers x ({wanted}) do not fit on this Ray cluster "
            f"({len(nodes)} node(s), {have} in all): lower cluster.num_workers / cluster.cpus_per_worker"
            + (" or set cluster.use_gpu: false" if cfg.cluster.use_gpu and total.get("GPU", 0) == 0 else "")
        )


def storage_path(cfg: Config) -> str:
    return cfg.cluster.storage_path or str(cfg.paths.ray_results)


# the code a checkpoint's numbers depend on: a change to any of these starts a new run
TRAINING_CODE = ("train_loop.py", "models.py", "losses.py", "augment.py", "data.py", "evaluation.py", "config.py")


def code_and_encoder_hash(cfg: Config, package: Path | None = None) -> str:
    """Hash of the training code (TRAINING_CODE in ``package``, default ganflow's own folder) and
    of the encoder (its weights and held-out reference statistics: what best_fd is measured with)."""
    from ganflow.evaluation import REFERENCE
    from ganflow.evaluation import WEIGHTS as ENCODER_WEIGHTS

    package = package or Path(__file__).parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode() + b"\0" + hashlib.sha256((package / name).read_bytes()).digest())
    for name in (ENCODER_WEIGHTS, REFERENCE):
        path = cfg.paths.encoder / name
        digest.update(name.encode() + b"\0" + (file_sha256(path).encode() if path.is_file() else b"missing"))
    return digest.hexdigest()[:8]


def run_name(cfg: Config, lr_g: float, lr_d: float, package: Path | None = None) -> str:
    """The Ray run's name, ``train-<params>-<code and encoder>``: the same training params, code
    and encoder give the same name (that is how resume works). A checkpoint written by other code,
    or whose best_fd another encoder measured, is never resumed (see stale_runs)."""
    values = cfg.to_dict()
    # epochs is left out: raising train.epochs continues a finished run instead of starting over
    key = {s: values[s] for s in ("model", "train")}
    key["train"] = {k: v for k, v in key["train"].items() if k != "epochs"}
    key["data"] = {k: values["data"][k] for k in ("hflip", "loader_workers")}
    key["data_hash"] = _prepared_hash(cfg)
    key.update(num_workers=cfg.cluster.num_workers, lr_g=lr_g, lr_d=lr_d)
    params = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"train-{params}-{code_and_encoder_hash(cfg, package)}"


def stale_runs(storage: str, name: str) -> list[tuple[str, int]]:
    """(name, epoch) of the unfinished runs with the same training params as ``name`` but other
    code or another encoder: kept in storage, not resumed."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    prefix = name.rsplit("-", 1)[0] + "-"
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(prefix) and info.base_name != name:
            latest = latest_checkpoint_meta(storage, info.base_name)
            if latest is not None:
                found.append((info.base_name, int(latest[1]["epoch"])))
    return sorted(found)


def _prepared_hash(cfg: Config) -> str:
    return read_manifest(cfg.paths.prepared)["files"]["images.npy"]


def storage_fs(storage: str):
    """(pyarrow filesystem, base path) for a local path or a URI such as s3://bucket/prefix."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())


def latest_checkpoint_meta(storage: str, name: str) -> tuple[str, dict[str, Any]] | None:
    """(path, meta) of the newest complete checkpoint of run ``name`` in ``storage``, or None."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    selector = pyarrow.fs.FileSelector(f"{base}/{name}", allow_not_found=True)
    found = sorted(
        info.path for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    for path in reversed(found):
        try:
            with fs.open_input_stream(f"{path}/{CHECKPOINT_META}") as stream:
                return path, json.loads(stream.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            continue  # an incomplete upload: try the one before
    return None


def delete_run(storage: str, name: str) -> None:
    """Remove run ``name`` from storage, if it is there."""
    import pyarrow.fs

    fs, base = storage_fs(storage)
    if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(f"{base}/{name}")


def ship_inputs(cfg: Config) -> dict[str, Any]:
    """The prepared data and the encoder, put into Ray's object store once, for workers on
    nodes that do not see this process's files (see train_loop.materialize_inputs)."""
    import ray

    files: dict[str, bytes] = {}
    for name in SHIPPED_INPUTS:
        folder = getattr(cfg.paths, name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files[f"{name}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode() + b"\0" + hashlib.sha256(files[key]).digest())
    return {"node_id": ray.get_runtime_context().get_node_id(), "key": digest.hexdigest()[:16], "files": ray.put(files)}


def check_trainable(cfg: Config) -> int:
    """Refuse a training that cannot run, before any worker starts. Returns the dataset size."""
    manifest = read_manifest(cfg.paths.prepared)
    count = manifest["split"]["train"]  # the GAN trains on the train split only
    class_prior(cfg)  # model.conditional: true on unlabelled data is refused here
    load_reference(cfg)  # the encoder the in-training evaluation needs, for this data shape
    per_rank = cfg.train.batch_size // cfg.cluster.num_workers
    if count // cfg.cluster.num_workers < per_rank:
        raise TrainingError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the prepared dataset allows "
            f"({count} training images over {cfg.cluster.num_workers} worker(s))"
        )
    return count


def fit(cfg: Config, config: dict[str, Any], name: str, callbacks: list | None = None):
    """Run one TorchTrainer; worker failures become a one-line TrainingError."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(cfg),
            # controller_failure_limit=0: a placement that never succeeds raises instead of retrying forever
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
    )
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exc:
        rank, error = sorted(exc.worker_failures.items())[0]
        message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise TrainingError(f"training failed on rank {rank}: {type(error).__name__}: {message}") from None
    except ray.train.TrainingFailedError as exc:
        cause = getattr(exc, "controller_failure", exc)
        raise TrainingError(f"training failed: {first_line(cause)}") from None


@dataclass
class TrainSummary:
    run_id: str
    epochs: int
    final: dict[str, float]
    history: list[dict[str, float]]
    lr_g: float
    lr_d: float
    resumed_from_epoch: int
    best_epoch: int
    best_fd: float | None


def run_training(cfg: Config, lr_g: float, lr_d: float) -> TrainSummary:
    """Train, export the EMA generator to paths.generator, log everything to one MLflow run."""
    check_trainable(cfg)
    check_storage_writable(cfg)
    client, experiment_id = connect(cfg)  # fails here, before Ray starts, if MLflow is unreachable
    init_ray(cfg)
    cfg = with_resolved_cpus(cfg)
    check_resources(cfg)

    name = run_name(cfg, lr_g, lr_d)
    storage = storage_path(cfg)
    previous = latest_checkpoint_meta(storage, name)
    resumed_from = 0
    run_id = None
    if previous is not None:
        meta = previous[1]
        if meta["epoch"] >= cfg.train.epochs:  # finished before with as many epochs: train again
            delete_run(storage, name)
        else:
            run_id, resumed_from = meta["run_id"], meta["epoch"]
            client.update_run(run_id, status="RUNNING")
            print(f"resuming {name} from epoch {resumed_from} (MLflow run {run_id})", flush=True)
    else:
        for stale, epoch in stale_runs(storage, name):
            if epoch >= cfg.train.epochs:
                continue  # finished: nothing to resume either way
            print(f"not resuming {stale} (checkpoint of epoch {epoch}, kept in {storage}): the training code or "
                  f"the encoder changed since; starting {name}", flush=True)
    if run_id is None:
        tags = {"ganflow.stage": "train", "ganflow.ray_run": name, **provenance(cfg, "train")}
        run_id = start_training_run(client, experiment_id, cfg, lr_g, lr_d, tags)

    config = {
        "cfg": cfg.to_dict(),
        "root": str(cfg.root),
        "lr_g": lr_g,
        "lr_d": lr_d,
        "run_id": run_id,
        "tracking_uri": tracking_uri(cfg),
        "inputs": ship_inputs(cfg),
    }
    def mark_killed() -> None:
        client.set_tag(run_id, "ganflow.failure", "interrupted")
        client.set_terminated(run_id, status="KILLED")

    with stop_on_signals(f"training (MLflow run {run_id})", on_deadline=mark_killed) as quiet:
        try:
            result = fit(cfg, config, name)
        except (KeyboardInterrupt, SystemExit):
            # Ctrl-C (Ray's handler aborts the run and exits) or SIGTERM: the run is not left RUNNING
            quiet()
            mark_killed()
            raise Interrupted(
                f"training interrupted; MLflow run {run_id} marked KILLED; the same command resumes "
                f"from the last checkpoint in {storage}/{name}"
            ) from None
        except GanflowError as exc:
            quiet()
            client.set_tag(run_id, "ganflow.failure", str(exc))
            client.set_terminated(run_id, status="FAILED")
            raise

    outcome = result.return_value or {}
    if outcome.get("workers"):  # rank, node and input source of each worker (the last attempt's)
        client.set_tag(run_id, "ganflow.workers", json.dumps(outcome["workers"], sort_keys=True))
    if outcome.get("diverged"):
        reason = outcome["diverged"]
        client.set_tag(run_id, "ganflow.failure", reason)
        client.set_terminated(run_id, status="FAILED")
        last = latest_checkpoint_meta(storage, name)
        kept = f"; last good checkpoint: {last[0]} (epoch {last[1]['epoch']})" if last else ""
        raise TrainingError(f"training diverged: {reason}: lower train.lr_g / train.lr_d{kept}")

    with result.checkpoint.as_directory() as directory:
        summary = export(cfg, Path(directory), run_id, lr_g, lr_d, resumed_from)
    log_model(cfg, run_id)
    client.set_terminated(run_id, status="FINISHED")
    return summary


def export(cfg: Config, checkpoint: Path, run_id: str, lr_g: float, lr_d: float, resumed_from: int) -> TrainSummary:
    """Checkpoint -> paths.generator (EMA generator), metrics/train.json, plots/train.csv."""
    meta = read_checkpoint_meta(checkpoint)
    tensors = load_state_file(checkpoint / CHECKPOINT_STATE)
    spec = {
        "latent_dim": cfg.model.latent_dim,
        "channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "g_width": cfg.model.g_width,
        "arch": cfg.model.arch,
        # a conditional G's input is z followed by a one-hot class: its classes and their frequencies
        "num_classes": len(meta.get("class_prior") or []),
        "class_names": meta.get("class_names"),
        "class_prior": meta.get("class_prior"),
        "epoch": meta["epoch"],
        "mlflow_run_id": run_id,
        "lr_g": lr_g,
        "lr_d": lr_d,
        "config": meta["config"],
    }
    # the best EMA generator by in-training fd_domain; the last one if no evaluation ran
    best = "best_ema_g" in tensors
    spec.update(best_epoch=meta["best_epoch"] if best else meta["epoch"], fd_domain=meta["best_fd"])
    g = build_generator(cfg, spec["num_classes"])
    g.load_state_dict(tensors["best_ema_g" if best else "ema_g"])
    recompute_batchnorm(g, seed=cfg.train.seed, prior=spec["class_prior"])  # statistics of the exported weights, not of the live G
    export_generator(g.state_dict(), spec, cfg.paths.generator)
    history = meta["history"]
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    deterministic = {k: v for k, v in final.items() if k != "imgs_per_sec"}
    summary = {"epochs": meta["epoch"], "lr_g": lr_g, "lr_d": lr_d, "best_epoch": spec["best_epoch"],
               "best_fd_domain": meta["best_fd"], "last": deterministic}
    write_file(cfg.paths.metrics / "train.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    buf = io.StringIO()
    columns = ["epoch", "loss_d", "loss_g", "d_real", "d_fake", "fd_domain", "kid"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_file(cfg.paths.plots / "train.csv", buf.getvalue())
    return TrainSummary(
        run_id, meta["epoch"], final, history, lr_g, lr_d, resumed_from, spec["best_epoch"], meta["best_fd"]
    )


def log_model(cfg: Config, run_id: str) -> None:
    """The EMA generator as an MLflow model: one float32 input (N, latent_dim [+ num_classes]),
    z followed for a conditional G by a one-hot class, -> images (N, C, H, W) in [-1, 1]. The
    model's metadata says how the input splits (latent_dim, num_classes) and names the classes."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from ganflow.models import draw_codes
    from ganflow.sampling import generator_meta, load_generator_dir

    g = load_generator_dir(cfg.paths.generator)
    meta = generator_meta(cfg.paths.generator)
    # a batch of 2 in the example keeps the exported batch dimension dynamic
    code = draw_codes(2, g.latent_dim, meta["class_prior"], torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = g(torch.from_numpy(code)).numpy()
    # unnamed: MLflow's PyTorch flavour hands a named input to the model as a dict, which it refuses
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, g.code_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]),
    )
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(
            g,
            name="generator",
            signature=signature,
            input_example=code,
            metadata=meta,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy"],
        )
        mlflow.log_artifacts(str(cfg.paths.generator), artifact_path="generator_files")
