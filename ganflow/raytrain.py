"""Ray Train plumbing shared by the train stage and the sweep, and the Ray internals ganflow leans on.

What both drivers need to start a TorchTrainer (the inputs shipped to workers on other nodes,
the refusal of a training that cannot run, ``fit`` with its one-line errors) and the two places
where ganflow works around Ray Train's placement-group handling: no cleaner on a Ray that
ganflow owns whole (``without_cleaner``), and a sweep that frees the placement groups of
trials Tune ended (``release_orphaned_placement_groups``). Both use Ray's private API; the
tests in tests/test_placement_cleaner.py and tests/test_tune_registry.py fail when it moves.
"""

from __future__ import annotations

import time
from typing import Any

from ganflow.artifacts import class_prior, read_manifest
from ganflow.budget import schedule_of
from ganflow.checkpoints import storage_path
from ganflow.config import Config
from ganflow.errors import TrainingError, first_line
from ganflow.evaluation import load_reference
from ganflow.ingest import data_config
from ganflow.raycluster import own_local_ray, scaling_config
from ganflow.train_loop import train_loop_per_worker


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


def fit(
    cfg: Config,
    config: dict[str, Any],
    name: str,
    callbacks: list | None = None,
    datasets: dict[str, Any] | None = None,
    owns_ray: bool | None = None,
):
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


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead. Returns how many.

    Tune ends a Train-V2 trial by killing its driver, and with it the trial's TrainController;
    the worker group's placement group was created by that controller (not detached), so Ray
    keeps it until the whole job ends. Ray Train's detached PlacementGroupCleaner is meant to
    remove it, but on a loaded machine its State-API call timed out ("Timed out while waiting
    for GCS"), the cleaner died, the trial's CPU stayed reserved, and every later trial waited
    out the worker-group start timeout and failed (6 of 8 trials of a default sweep). The sweep's
    driver holds a GCS connection already, so it sweeps them itself. Placement groups created by
    a driver (Tune's own, per trial) have no creating actor and are never touched.
    """
    return _release_dead(_actor_placement_groups())


def _release_dead(groups: list[tuple[bytes, bool]]) -> int:
    """Remove the groups of ``groups`` whose creating actor is dead; how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    released = 0
    for pg_id, creator_dead in groups:
        if not creator_dead:
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
            released += 1
        except Exception:  # noqa: BLE001 - removed meanwhile (by Ray's cleaner): nothing to do
            pass
    return released


def _actor_placement_groups() -> list[tuple[bytes, bool]]:
    """(id, creating actor dead?) of this job's live, non-detached placement groups made by an actor."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (
            pg.state == gcs_pb2.PlacementGroupTableData.REMOVED
            or pg.is_detached
            or ray.ActorID(pg.creator_actor_id).is_nil()
            or pg.creator_job_id.hex() != job
        ):
            continue
        found.append((pg.placement_group_id, bool(pg.creator_actor_dead)))
    return found


def release_placement_groups_after_sweep(timeout_s: float = 60.0) -> None:
    """After Tuner.fit: wait for the last trials' controllers to die and release their groups, so
    that whatever this process runs next on the same Ray (a training) gets their CPUs."""
    deadline = time.monotonic() + timeout_s
    while True:
        groups = _actor_placement_groups()  # one read of the table per round
        _release_dead(groups)
        if all(dead for _, dead in groups) or time.monotonic() > deadline:
            return  # each group released now, or its controller still alive past the deadline
        time.sleep(0.5)
