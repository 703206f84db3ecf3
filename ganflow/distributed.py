"""The training driver: starts or joins Ray, runs the TorchTrainer, tracks and exports the result.

Resume: the Ray Train run is named from the training params, so running the same training
again (``dvc repro`` after a crash or Ctrl-C) finds the run in ``cluster.storage_path`` and
Ray restarts the workers from its latest checkpoint; the MLflow run id travels in the
checkpoint, so logging continues in the same run. A finished training is not resumed: it
trains again (same params and seed, same result on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ganflow.atomic import check_storage_writable, named_sha256
from ganflow.budget import schedule_of
from ganflow.config import Config
from ganflow.data import class_prior, read_manifest
from ganflow.errors import GanflowError, TrainingError, first_line
from ganflow.evaluation import load_reference
from ganflow.export import TrainSummary, export, log_model
from ganflow.ingest import data_config, shards_root, shipped_files, train_dataset, with_resolved_ingest
from ganflow.interrupts import Interrupted, stop_on_signals
from ganflow.raycluster import check_resources, init_ray, own_local_ray, scaling_config, with_resolved_cpus
from ganflow.storage import delete_run, latest_checkpoint_meta, run_name, stale_runs, storage_path
from ganflow.tracking import connect, provenance, start_training_run, tracking_uri
from ganflow.train_loop import SHIPPED_INPUTS, train_loop_per_worker


def input_files(cfg: Config, ingest: str = "local") -> dict[str, bytes]:
    """What a worker on a node that does not see this process's files gets: the prepared data
    (with the ray_data ingest its small files only: the images stream from storage) and the
    encoder, by their path under paths.prepared / paths.encoder."""
    files: dict[str, bytes] = {}
    for name, wanted in shipped_files(ingest).items():
        assert name in SHIPPED_INPUTS
        folder = getattr(cfg.paths, name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if wanted is None or path.name in wanted:
                files[f"{name}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    return files


def ship_inputs(cfg: Config, ingest: str = "local") -> dict[str, Any]:
    """input_files, put into Ray's object store once (see train_loop.materialize_inputs)."""
    import ray

    files = input_files(cfg, ingest)
    return {"node_id": ray.get_runtime_context().get_node_id(), "key": named_sha256(files)[:16], "files": ray.put(files)}


def worker_inputs(cfg: Config, ingest: str | None = None) -> dict[str, Any] | None:
    """ship_inputs where a worker may run on another node. None on the stage's own local Ray:
    its workers all read the project's files in place, and the object store never holds a copy
    of the data set (which cost the driver and the object store its size in memory each)."""
    return None if own_local_ray() else ship_inputs(cfg, ingest or cfg.data.ingest)


def check_trainable(cfg: Config) -> int:
    """Refuse a training that cannot run, before any worker starts. Returns the dataset size."""
    manifest = read_manifest(cfg.paths.prepared)
    count = manifest["split"]["train"]  # the GAN trains on the train split only
    class_prior(cfg)  # model.conditional: true on unlabelled data is refused here
    load_reference(cfg)  # the encoder the in-training evaluation needs, for this data shape
    try:
        schedule_of(cfg.train, count, cfg.cluster.num_workers)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return count


def without_cleaner(callbacks: list) -> list:
    """Ray Train's default controller callbacks less its placement-group cleaner (for a training
    on a Ray that ganflow owns whole: the stage's own local Ray, see raycluster.own_local_ray).

    The cleaner (Ray 2.60: PlacementGroupCleanerCallback, always added by
    DataParallelTrainer._create_default_callbacks) is a detached actor that asks Ray's state API
    every second whether the Train controller is alive, and removes the run's placement group,
    killing its healthy workers, on the first answer that is not "alive". An empty answer counts
    as dead (ray-project/ray#65447's review; registration races in #62753), and on a loaded
    machine such answers come: a default `make run` beside the test suite lost its worker twice
    this way. The cleaner is there for a controller that dies without cleaning up on a shared
    cluster; on the stage's own local Ray nothing outlives the stage's process, whose exit takes
    the placement group with it, so there it only adds a way to die. On a cluster ganflow joins it
    is kept, and its warnings stay in the stage's log; a sweep's multi-worker trials keep it too
    (Tune ends a trial by killing its controller, and the cleaner frees the trial's placement group). tests/test_training.py fails if Ray moves
    or renames what this relies on."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


RESTARTS_TAG = "ganflow.worker_restarts"  # the run's worker-group failures, one cause per line


def restart_recorder(tracking: str, run_id: str):
    """A Ray Train callback, run in the Train controller, that records every worker-group failure
    (each one a restart while train.max_failures lasts) in the MLflow run: metric
    ``worker_restarts`` and tag RESTARTS_TAG with one line per failure, rank and cause. A failure
    to record is never the run's failure."""
    from ray.train import UserCallback

    class RestartRecorder(UserCallback):
        def __init__(self) -> None:
            self.causes: list[str] = []

        def after_exception(self, run_context, worker_exceptions) -> None:
            for rank, error in sorted(worker_exceptions.items()):
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                cause = f"rank {rank}: {type(error).__name__}: {next((x for x in lines if 'exit detail' in x), lines[-1] if lines else '')}"
                self.causes.append(cause[:300])
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking)
                client.log_metric(run_id, "worker_restarts", len(self.causes))
                client.set_tag(run_id, RESTARTS_TAG, "\n".join(self.causes)[-4000:])
            except Exception:  # noqa: BLE001 - the store may be away; the run goes on
                pass

    return RestartRecorder()


def trainer_class(owns_ray: bool) -> type:
    """ray.train.torch.TorchTrainer, without the placement-group cleaner when ``owns_ray``."""
    from ray.train.torch import TorchTrainer

    if not owns_ray:
        return TorchTrainer

    class OwnRayTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return without_cleaner(super()._create_default_callbacks())

    return OwnRayTrainer


def fit(cfg: Config, config: dict[str, Any], name: str, callbacks: list | None = None,
        datasets: dict[str, Any] | None = None, owns_ray: bool | None = None):
    """Run one TorchTrainer; worker failures become a one-line TrainingError. ``datasets``:
    Ray Data datasets to split across the workers (the ray_data ingest). ``owns_ray``: whether
    the stage runs on a Ray of its own (default: own_local_ray() in this process; a sweep's trial
    is told by its driver)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    trainer = trainer_class(own_local_ray() if owns_ray is None else owns_ray)(
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
        **({"datasets": datasets, "dataset_config": data_config()} if datasets else {}),
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


def run_training(cfg: Config, lr_g: float, lr_d: float) -> TrainSummary:
    """Train, export the EMA generator to paths.generator, log everything to one MLflow run."""
    planned = schedule_of(cfg.train, check_trainable(cfg), cfg.cluster.num_workers)
    check_storage_writable(cfg)
    client, experiment_id = connect(cfg)  # fails here, before Ray starts, if MLflow is unreachable
    init_ray()
    cfg = with_resolved_ingest(with_resolved_cpus(cfg))
    check_resources(cfg)

    name = run_name(cfg, lr_g, lr_d)
    storage = storage_path(cfg)
    previous = latest_checkpoint_meta(storage, name)
    resumed_from = 0
    run_id = None
    if previous is not None:
        meta = previous[1]
        if meta["epoch"] >= planned.epochs:  # finished before with as large a budget: train again
            delete_run(storage, name)
        else:
            run_id, resumed_from = meta["run_id"], meta["epoch"]
            client.update_run(run_id, status="RUNNING")
            print(f"resuming {name} from epoch {resumed_from} (MLflow run {run_id})", flush=True)
    else:
        for stale, epoch in stale_runs(storage, name):
            if epoch >= planned.epochs:
                continue  # finished: nothing to resume either way
            print(f"not resuming {stale} (checkpoint of epoch {epoch}, kept in {storage}): the training code or "
                  f"the encoder changed since; starting {name}", flush=True)
    if run_id is None:
        tags = {"ganflow.stage": "train", "ganflow.ray_run": name, "ganflow.ingest": cfg.data.ingest,
                **provenance(cfg, "train")}
        run_id = start_training_run(client, experiment_id, cfg, lr_g, lr_d, tags)

    config = {
        "cfg": cfg.to_dict(),
        "root": str(cfg.root),
        "lr_g": lr_g,
        "lr_d": lr_d,
        "run_id": run_id,
        "tracking_uri": tracking_uri(cfg),
        "inputs": worker_inputs(cfg),
        "ingest": cfg.data.ingest,
    }
    datasets = {"train": train_dataset(cfg, shards_root(cfg))} if cfg.data.ingest == "ray_data" else None
    def mark_killed() -> None:
        client.set_tag(run_id, "ganflow.failure", "interrupted")
        client.set_terminated(run_id, status="KILLED")

    client.set_tag(run_id, RESTARTS_TAG, "")  # this stage run's restarts only (a resumed run had its own)
    with stop_on_signals(f"training (MLflow run {run_id})", on_deadline=mark_killed) as quiet:
        try:
            result = fit(cfg, config, name, callbacks=[restart_recorder(tracking_uri(cfg), run_id)], datasets=datasets)
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
        recorded = client.get_run(run_id).data.tags.get(RESTARTS_TAG, "")
        summary = export(cfg, Path(directory), run_id, lr_g, lr_d, resumed_from,
                         restarts=[line for line in recorded.splitlines() if line])
    log_model(cfg, run_id)
    client.set_terminated(run_id, status="FINISHED")
    return summary
