"""The train stage's driver: starts or joins Ray, runs the TorchTrainer, tracks and exports the result.

Resume: the Ray Train run is named from the training params, so running the same training
again (``dvc repro`` after a crash or Ctrl-C) finds the run in ``cluster.storage_path`` and
Ray restarts the workers from its latest checkpoint; the MLflow run id travels in the
checkpoint, so logging continues in the same run. A finished training is not resumed: it
trains again (same params and seed, same result on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from ganflow.atomic import check_storage_writable
from ganflow.budget import schedule_of
from ganflow.checkpoints import delete_run, latest_checkpoint_meta, run_name, stale_runs, storage_path
from ganflow.config import Config
from ganflow.errors import GanflowError, TrainingError
from ganflow.export import TrainSummary, export, log_model
from ganflow.ingest import shards_root, train_dataset, with_resolved_ingest, worker_inputs
from ganflow.interrupts import Interrupted, stop_on_signals
from ganflow.raycluster import check_resources, init_ray, with_resolved_cpus
from ganflow.raytrain import RESTARTS_TAG, check_trainable, fit, restart_recorder
from ganflow.tracking import connect, provenance, start_training_run, tracking_uri


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
            print(
                f"not resuming {stale} (checkpoint of epoch {epoch}, kept in {storage}): the training code or "
                f"the encoder changed since; starting {name}",
                flush=True,
            )
    if run_id is None:
        tags = {
            "ganflow.stage": "train",
            "ganflow.ray_run": name,
            "ganflow.ingest": cfg.data.ingest,
            **provenance(cfg, "train"),
        }
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
    if outcome.get("workers"):  # rank, node, input source and torch threads of each worker (the last attempt's)
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
        summary = export(
            cfg,
            Path(directory),
            run_id,
            lr_g,
            lr_d,
            resumed_from,
            restarts=[line for line in recorded.splitlines() if line],
        )
    log_model(cfg, run_id)
    client.set_terminated(run_id, status="FINISHED")
    return summary
