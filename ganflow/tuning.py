"""The learning-rate search: a Ray Tune sweep over (lr_g, lr_d), one TorchTrainer per trial.

Train V2 pattern: Tune runs a small driver function per trial, which starts a TorchTrainer
(itself multi-worker DDP if cluster.num_workers > 1) whose rank 0 reports fd_domain every
tick (tune.tick_kimg); TuneReportCallback forwards those reports to Tune, and the scheduler stops
bad trials early: synchronous successive halving by default (every trial waits at a rung until
all have reached it, so the pick never depends on which trial reported first), ASHA for
multi-worker trials, or population-based training.

What a trial scores is ``fd_recent``, the mean of its last two evaluations (one evaluation is
noisy, and the minimum over ticks rewards a lucky one) of fd_class for a conditional G (the FD
per class, which sees samples of the wrong class), else of fd_domain; the pick is made
among the trials that ran the most ticks: rates that hold, not rates that flashed once. The
train rates' trial (the anchor) is never cut, and the pick replaces it only on evidence
(``pick``): successive halving alone takes its last survivor unseen after the last rung. Each
trial trains with its own seed, derived from tune.seed, so no rate wins by one seed's luck.
MLflow: one parent run per sweep, a nested child run per trial, created with the experiment
that the driver made once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
import zlib
from typing import Any

import numpy as np

from ganflow.artifacts import Best
from ganflow.atomic import check_storage_writable
from ganflow.budget import schedule_of
from ganflow.checkpoints import delete_run, storage_path
from ganflow.config import Config
from ganflow.errors import TrainingError, TuneError, first_line
from ganflow.ingest import worker_inputs
from ganflow.interrupts import Interrupted, stop_on_signals
from ganflow.raycluster import check_resources, init_ray, scaling_config
from ganflow.raytrain import (
    check_trainable,
    fit,
    release_orphaned_placement_groups,
    release_placement_groups_after_sweep,
)
from ganflow.tracking import (
    STOPPED_EARLY,
    connect,
    params_hash,
    provenance,
    start_sweep_run,
    start_training_run,
    tracking_uri,
)
from ganflow.train_loop import TrialSession, objective_key, run_loop

# a trial's own driver function needs (almost) nothing: the workers hold the CPUs/GPUs. A
# non-empty bundle is required; a tiny CPU share would keep two 1-CPU trials off a 2-CPU box.
TRIAL_DRIVER_RESOURCES = {"memory": 64 * 1024 * 1024}
# what every trial reports and the sweep minimises (train_loop: the mean of the last two ticks)
OBJECTIVE = "fd_recent"


def trains_in_trial(cfg: Config) -> bool:
    """A single-worker trial runs the training loop in the trial's own process (no DDP to set
    up): one Ray actor per trial instead of a TorchTrainer's five. Measured with
    benchmarks/cpu_share.py: see its README section."""
    return cfg.cluster.num_workers == 1


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves per trial: the worker's CPUs (and GPU) when the trial trains itself,
    else a driver's memory only (its TorchTrainer reserves the workers)."""
    if not trains_in_trial(cfg):
        return TRIAL_DRIVER_RESOURCES
    return {"cpu": float(cfg.cluster.cpus_per_worker), "gpu": 1.0 if cfg.cluster.use_gpu else 0.0}


def trial_config(cfg: Config) -> Config:
    """The config each trial trains with: tune.kimg, and fd_domain every tune.tick_kimg (ASHA's signal)."""
    trial = cfg.model_copy(deep=True)
    trial.train.kimg, trial.train.epochs, trial.train.tick_kimg = cfg.tune.kimg, None, cfg.tune.tick_kimg
    trial.eval.every = 1
    trial.train.checkpoint_every = 1  # PBT copies the latest checkpoint of a better member
    if trial.cluster.cpus_per_worker == "auto":  # one CPU per worker: trials run side by side
        trial.cluster.cpus_per_worker = 1.0
    return trial


def max_concurrent(cfg: Config) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's resources hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    import ray

    per_worker = scaling_config(cfg).resources_per_worker
    total = ray.cluster_resources()
    fits = min(int(total.get(k, 0.0) // (v * cfg.cluster.num_workers)) for k, v in per_worker.items() if v > 0)
    return max(1, fits)


def search_algorithm(cfg: Config, concurrent: int):
    """Random search (seeded) by default; Optuna's TPE when tune.search: optuna. Either runs at
    most ``concurrent`` trials at once (a BasicVariantGenerator passed in explicitly ignores
    TuneConfig.max_concurrent_trials: it must be told itself). Under sha every trial is created at
    once: a searcher's limit counts paused trials as running, and the first rung would be judged
    among the trials it let start; the scheduler applies the limit instead (synchronous_halving)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.sweep_scheduler == "sha":
        concurrent = max(concurrent, cfg.tune.trials)
    first = cfg.sweep_first_trial  # tried before any sampled pair, and counted in num_samples
    if cfg.tune.search == "grid":  # the space's grid_search values, every pair once
        return BasicVariantGenerator(points_to_evaluate=first, random_state=cfg.tune.seed, max_concurrent=concurrent)
    if cfg.tune.search == "random":  # every trial's pair given: the generator samples nothing itself
        points = first + sampled_pairs(cfg, cfg.tune.trials - len(first))
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrent)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise TuneError("tune.search: optuna needs the optuna package: pip install 'ganflow[optuna]'") from None
    return ConcurrencyLimiter(
        OptunaSearch(
            space=_optuna_space(cfg),
            metric=OBJECTIVE,  # given a space, OptunaSearch fixes its study's direction at once
            mode="min",
            points_to_evaluate=first or None,
            seed=cfg.tune.seed,
        ),
        max_concurrent=concurrent,
    )


def sampled_pairs(cfg: Config, n: int) -> list[dict[str, float]]:
    """n (lr_g, lr_d) pairs, each rate log-uniform over its range, drawn (lr_g, then lr_d) from
    numpy's generator seeded with tune.seed, as Tune's random search draws them; a pair with
    lr_g > tune.lr_g_over_d_max x lr_d is skipped, so the pairs within the bound are the ones Tune
    would have drawn, in its order."""
    t = cfg.tune
    rng = np.random.default_rng(t.seed)
    ratio = math.inf if t.lr_g_over_d_max is None else t.lr_g_over_d_max
    pairs: list[dict[str, float]] = []
    for _ in range(100_000):  # the config's validator keeps a part of the square within the bound
        if len(pairs) == n:
            return pairs
        lr_g = float(np.exp(rng.uniform(np.log(t.lr_g_min), np.log(t.lr_g_max))))
        lr_d = float(np.exp(rng.uniform(np.log(t.lr_d_min), np.log(t.lr_d_max))))
        if lr_g <= ratio * lr_d:
            pairs.append({"lr_g": lr_g, "lr_d": lr_d})
    raise TuneError(f"tune.lr_g_over_d_max={ratio:g} leaves too little of the rate ranges to sample {n} pairs from")


def within_ratio(cfg: Config, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with lr_g lowered (or, at lr_g_min, lr_d raised) to lr_g <= tune.lr_g_over_d_max
    x lr_d: PBT's explore step perturbs or resamples each rate on its own."""
    t, ratio = cfg.tune, cfg.tune.lr_g_over_d_max
    if ratio is None or config["lr_g"] <= ratio * config["lr_d"]:
        return config
    lr_g = max(t.lr_g_min, ratio * config["lr_d"])
    return {**config, "lr_g": lr_g, "lr_d": max(config["lr_d"], lr_g / ratio)}


def _optuna_space(cfg: Config):
    """TPE's define-by-run space: lr_d, then lr_g up to tune.lr_g_over_d_max x lr_d (lr_d starts
    where some lr_g in range lies within the bound). A partial of a module-level function: Tune
    pickles the searcher."""
    t = cfg.tune
    return functools.partial(_suggest_rates, t.lr_g_min, t.lr_g_max, t.lr_d_min, t.lr_d_max, t.lr_g_over_d_max)


def _suggest_rates(
    lr_g_min: float, lr_g_max: float, lr_d_min: float, lr_d_max: float, ratio: float | None, trial: Any
) -> None:
    if ratio is not None:
        lr_d_min = max(lr_d_min, lr_g_min / ratio)
    lr_d = trial.suggest_float("lr_d", lr_d_min, lr_d_max, log=True)
    trial.suggest_float("lr_g", lr_g_min, lr_g_max if ratio is None else min(lr_g_max, ratio * lr_d), log=True)


def _orphan_sweeper(every_s: float = 2.0):
    """A Tune callback running release_orphaned_placement_groups at most every ``every_s``."""
    from ray.tune import Callback

    class OrphanSweeper(Callback):
        def __init__(self):
            self.next_at = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() >= self.next_at:
                self.next_at = time.monotonic() + every_s
                release_orphaned_placement_groups()

    return OrphanSweeper()


def trial_seed(tune_seed: int, trial: int | None, lr_g: float, lr_d: float) -> int:
    """train.seed of one trial: derived from tune.seed and the trial's number (random search), or
    its rates (searchers whose trial ids are random), so a rerun gives every trial the same seed."""
    key = [tune_seed, trial] if trial is not None else [tune_seed, zlib.crc32(f"{lr_g!r} {lr_d!r}".encode())]
    return int(np.random.SeedSequence(key).generate_state(1)[0]) % 2**31


def sweep_name(cfg: Config) -> str:
    key = json.dumps({"tune": cfg.tune.model_dump(mode="json"), "params": params_hash(cfg)}, sort_keys=True)
    return "tune-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def trial_number(trial_id: str) -> int | None:
    """1, 2, ... from the trial ids of random search ("a1b2c_00000" is the first trial); None for
    other searchers, whose ids are random (the run is then named without a number)."""
    prefix, _, counter = trial_id.rpartition("_")
    return int(counter) + 1 if prefix and len(counter) == 5 and counter.isdigit() else None


def _trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    root: str,
    parent_run_id: str,
    experiment_id: str,
    uri: str,
    sweep: str,
    provenance_tags: dict[str, str],
    inputs: dict[str, Any] | None = None,
) -> None:
    """One trial, run by Tune: a child MLflow run, and the training loop run here (a single
    worker) or by one TorchTrainer fit (DDP over cluster.num_workers)."""
    import ray.tune
    from mlflow.tracking import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from ganflow.config import config_from_dict

    cfg = config_from_dict(base, root)
    context = ray.tune.get_context()
    lr_g, lr_d = float(config["lr_g"]), float(config["lr_d"])
    cfg.train.seed = trial_seed(cfg.tune.seed, trial_number(context.get_trial_id()), lr_g, lr_d)
    base = cfg.to_dict()
    client = MlflowClient(uri)
    tags = {
        "mlflow.parentRunId": parent_run_id,  # nests the trial under the sweep in the UI
        "ganflow.stage": "tune-trial",
        "ganflow.trial_id": context.get_trial_id(),
        "sweep_id": parent_run_id,
        **provenance_tags,  # computed in the driver: a trial may run where the git checkout is not
    }
    run_id = _member_run(client, experiment_id, parent_run_id, context.get_trial_id()) or start_training_run(
        client, experiment_id, cfg, lr_g, lr_d, tags, trial=trial_number(context.get_trial_id())
    )
    train_config = {
        "cfg": base,
        "root": root,
        "lr_g": lr_g,
        "lr_d": lr_d,
        "run_id": run_id,
        "tracking_uri": uri,
        "inputs": inputs,
    }
    try:
        if trains_in_trial(cfg):
            # sha pauses a trial at a rung and pbt restarts it from another's: both resume from a checkpoint
            session = TrialSession(cfg.cluster.use_gpu, checkpoints=cfg.sweep_scheduler in ("pbt", "sha"))
            outcome = run_loop(train_config, session)  # torch threads: cpus_per_worker
        else:
            result = fit(
                cfg,
                train_config,
                f"{sweep}/{context.get_trial_name()}",
                callbacks=[TuneReportCallback()],
                owns_ray=False,
            )  # Tune kills a trial's controller: its cleaner frees the placement group
            outcome = result.return_value or {}
    except Exception as exc:  # noqa: BLE001 - any failure of a trial becomes its TrainingError
        failure = (
            exc
            if isinstance(exc, TrainingError)
            else TrainingError(f"training failed: {type(exc).__name__}: {first_line(exc)}")
        )
        client.set_tag(run_id, "ganflow.failure", str(failure))
        client.set_terminated(run_id, status="FAILED")
        raise failure from None
    diverged = outcome.get("diverged")
    if diverged:
        client.set_tag(run_id, "ganflow.failure", diverged)
    client.set_tag(run_id, "ganflow.trial_status", "diverged" if diverged else "finished")
    client.set_terminated(run_id, status="FAILED" if diverged else "FINISHED")


def _member_run(client: Any, experiment_id: str, parent: str, trial_id: str) -> str | None:
    """The MLflow run this trial already has: PBT restarts a member (from a better member's
    checkpoint, with new rates) in a new or reused process, and the member keeps one run, whose lr_g/lr_d
    metrics are then its schedule. None for a trial's first start."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`ganflow.trial_id` = '{trial_id}'",
        max_results=1,
    )
    if not found:
        return None
    run_id = found[0].info.run_id
    client.update_run(run_id, status="RUNNING")  # Tune paused it: its run may have been closed
    return run_id


def search_space(cfg: Config) -> dict[str, Any]:
    """(lr_g, lr_d): log-uniform over tune.lr_*_min..max, or tune.grid_points log-spaced values each."""
    from ray import tune

    space: dict[str, Any] = {}
    if cfg.tune.search == "optuna":  # its own define-by-run space (_optuna_space)
        return space
    for name in ("lr_g", "lr_d"):
        lo, hi = getattr(cfg.tune, f"{name}_min"), getattr(cfg.tune, f"{name}_max")
        if cfg.tune.search == "grid":
            space[name] = tune.grid_search([float(v) for v in np.geomspace(lo, hi, cfg.tune.grid_points)])
        else:
            space[name] = tune.loguniform(lo, hi)
    return space


def rungs(grace_period: int, reduction_factor: int, ticks: int) -> list[int]:
    """The ticks at which successive halving compares trials: grace_period x reduction_factor^k
    below ``ticks``; the survivors of the last one run to ``ticks``."""
    out, r = [], min(grace_period, ticks)
    while r < ticks:
        out.append(r)
        r *= reduction_factor
    return out


def anchor_of(cfg: Config) -> dict[str, float] | None:
    """The anchor's rates: the sweep's first trial (train.lr_*, Config.sweep_first_trial), or None."""
    return (cfg.sweep_first_trial or [None])[0]


def is_anchor(config: dict[str, Any], anchor: dict[str, float] | None) -> bool:
    """Whether a trial's config holds the anchor's rates (the sweep's first trial, train.lr_*)."""
    return anchor is not None and all(float(config.get(k, math.nan)) == v for k, v in anchor.items())


def synchronous_halving(
    trials: int,
    grace_period: int,
    reduction_factor: int,
    ticks: int,
    metric: str,
    concurrent: int | None = None,
    anchor: dict[str, float] | None = None,
):
    """Successive halving in one bracket of every trial: each trial runs to a rung and is paused
    there until every live trial has reached it; then the best ceil(n / reduction_factor) by
    ``metric`` (lower is better) go on and the rest are stopped. Ray's HyperBandScheduler with its
    bracket sizes fixed to this sweep (its own sizes depend on max_t alone: 6 trials would be
    judged as a bracket of 9). A report without the metric (a diverged trial) ranks last. At most
    ``concurrent`` trials run at once (None: as many as the resources hold). The trial of the
    ``anchor`` rates is never cut: it runs to the end beside the survivors, so the pick is
    compared with it at the same budget (summarise)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import HyperBandScheduler

    halvings = len(rungs(grace_period, reduction_factor, ticks))

    class SynchronousHalving(HyperBandScheduler):
        def __init__(self) -> None:
            # metric and mode come from the TuneConfig (Tune refuses them twice)
            super().__init__(time_attr="training_iteration", max_t=ticks, reduction_factor=reduction_factor)
            self._s_max_1 = halvings + 1  # one bracket, s = halvings: the last of a band of s_max_1
            self._get_n0 = lambda s: trials if s == halvings else 0
            # the first rung; HyperBand's bracket multiplies it by reduction_factor per halving
            # and caps it at max_t, so the survivors of the last rung run to ``ticks``
            self._get_r0 = lambda s: min(grace_period, ticks) if s == halvings else 0

        def _create_bracket(self, s):
            bracket = super()._create_bracket(s)
            halve = bracket.successive_halving

            def keeping_the_anchor(metric_: str, metric_op: float):
                good, bad = halve(metric_, metric_op)
                kept = [t for t in bad if is_anchor(t.config, anchor)]
                return good + kept, [t for t in bad if t not in kept]

            bracket.successive_halving = keeping_the_anchor
            return bracket

        def on_trial_add(self, tune_controller, trial) -> None:
            if self._state["bracket"] is None:  # the one bracket, whatever HyperBand's band order
                self._state["bracket"] = self._create_bracket(halvings)
                self._hyperbands[0].append(self._state["bracket"])
            self._state["bracket"].add_trial(trial)
            self._trial_info[trial] = self._state["bracket"], 0

        def choose_trial_to_run(self, tune_controller):
            running = [t for t in self._trial_info if t.status == Trial.RUNNING]
            if concurrent and len(running) >= concurrent:
                return None
            return super().choose_trial_to_run(tune_controller)

        def on_trial_result(self, tune_controller, trial, result):
            if not isinstance(result.get(metric), (int, float)) or math.isnan(result[metric]):
                result = {**result, metric: math.inf}
            return super().on_trial_result(tune_controller, trial, result)

    return SynchronousHalving()


def scheduler_of(cfg: Config, ticks: int):
    """sha or ASHA (stop the worst trials at rungs of grace_period * reduction_factor^k ticks;
    sha waits for every trial at each rung, ASHA judges a trial against those that reached it
    earlier) or population-based training: every pbt_interval ticks the bottom quarter of the
    members load a top-quarter member's checkpoint and continue with its rates perturbed (x0.8 or
    x1.2, or resampled from the range), re-applied to both optimizers by load_checkpoint."""
    from ray import tune

    anchor = anchor_of(cfg)
    if cfg.sweep_scheduler == "sha":
        return synchronous_halving(
            cfg.tune.trials,
            cfg.tune.grace_period,
            cfg.tune.reduction_factor,
            ticks,
            OBJECTIVE,
            cfg.tune.max_concurrent_trials,
            anchor=anchor,
        )
    if cfg.sweep_scheduler == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration",  # one iteration = one report = one tick
            perturbation_interval=min(cfg.tune.pbt_interval, ticks),
            hyperparam_mutations={
                "lr_g": tune.loguniform(cfg.tune.lr_g_min, cfg.tune.lr_g_max),
                "lr_d": tune.loguniform(cfg.tune.lr_d_min, cfg.tune.lr_d_max),
            },
            custom_explore_fn=functools.partial(within_ratio, cfg),
            quantile_fraction=0.25,
            resample_probability=0.25,
            synch=True,  # members are compared at the same tick, not one ahead of another
        )

    class AnchoredASHA(tune.schedulers.ASHAScheduler):
        """ASHA that records the anchor's results at its rungs but never stops it."""

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            stopped = action == tune.schedulers.TrialScheduler.STOP
            if stopped and is_anchor(trial.config, anchor) and result.get(self._time_attr, ticks) < ticks:
                self._num_stopped -= 1
                return tune.schedulers.TrialScheduler.CONTINUE
            return action

    return AnchoredASHA(
        time_attr="training_iteration",
        max_t=ticks,  # one iteration = one report = one tick
        grace_period=min(cfg.tune.grace_period, ticks),
        reduction_factor=cfg.tune.reduction_factor,
    )


def run_sweep(cfg: Config) -> Best:
    """Search (lr_g, lr_d), or pass train.lr_* through when tune.enabled is false."""
    if not cfg.tune.enabled:
        return Best(cfg.train.lr_g, cfg.train.lr_d, None, None, None, 0, 0, 0, tuned=False)
    import ray.tune
    from ray import tune

    trial_cfg = trial_config(cfg)
    ticks = len(schedule_of(trial_cfg.train, check_trainable(trial_cfg), trial_cfg.cluster.num_workers).ticks)
    check_storage_writable(cfg)
    client, experiment_id = connect(cfg)  # the experiment exists before any trial logs
    init_ray()
    check_resources(trial_cfg)
    concurrent = max_concurrent(trial_cfg)
    search = search_algorithm(cfg, concurrent)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # divergence reports have no fd
    # Tune's console output: its newer reporter ignores verbose=0 (a config box, a TensorBoard
    # hint); the classic one honours it. The sweep's outcome is printed by the stage instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own Ctrl-C handler ends the sweep early and returns normally: the stage would then
    # write tune/best.json from a partial sweep and DVC would record it. Without it, Ctrl-C
    # raises KeyboardInterrupt here and the stage fails.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # sha and pbt trials checkpoint every tick, by design: Tune's warning that frequent
    # checkpoints force frequent experiment snapshots is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    name = sweep_name(cfg)
    storage = storage_path(cfg)
    delete_run(storage, name)  # a sweep always starts fresh; DVC decides when it reruns
    parent = start_sweep_run(client, experiment_id, cfg, {"ganflow.stage": "tune", **provenance(cfg, "tune")})
    trainable = tune.with_parameters(
        _trial,
        base=trial_cfg.to_dict(),
        root=str(cfg.root),
        parent_run_id=parent,
        experiment_id=experiment_id,
        uri=tracking_uri(cfg),
        sweep=name,
        provenance_tags=provenance(trial_cfg, "tune"),
        inputs=worker_inputs(cfg, "local"),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(trial_cfg)),
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="min",
            num_samples=1 if cfg.tune.search == "grid" else cfg.tune.num_samples,  # a grid: each pair once
            scheduler=scheduler_of(cfg, ticks),
            search_alg=search,
            # a trial's process is kept for the next trial (and for a paused one's resumption):
            # a new one costs a process start and imports of torch and Ray; on 2 cores the
            # digits' sweep took 189 s with, 217 s without, the same pick (docs/RUNS.md)
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            callbacks=[_orphan_sweeper()],
            # a trial at its last tick is done before the scheduler sees its report: else PBT
            # would exploit a finished member and restart it for nothing
            stop={"training_iteration": ticks},
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),  # PBT's: the latest is what it copies
        ),
    )
    with stop_on_signals(
        f"tune (MLflow sweep run {parent})", on_deadline=lambda: _mark_interrupted(client, parent)
    ) as quiet:
        try:
            results = tuner.fit()
        except (KeyboardInterrupt, SystemExit):
            quiet()
            _mark_interrupted(client, parent)
            raise Interrupted(
                f"tune interrupted; MLflow sweep run {parent} marked KILLED; nothing written, "
                "the same command runs the sweep again"
            ) from None
    release_placement_groups_after_sweep()
    ended = results.num_terminated + results.num_errors
    if len(results) < cfg.tune.trials or ended < len(results):  # stopped from outside (e.g. SIGUSR1)
        _mark_interrupted(client, parent)
        raise Interrupted(
            f"tune: the sweep ended early ({ended} of {cfg.tune.trials} trials ended); "
            f"MLflow sweep run {parent} marked KILLED; nothing written"
        )
    best = summarise(cfg, client, parent, results, ticks)
    if results.num_errors:  # a pick from the trials that happened to survive is not a sweep's answer
        first = next(str(r.error).strip().splitlines()[-1] for r in results if r.error is not None)
        client.set_tag(parent, "ganflow.failure", f"{results.num_errors} trials failed")
        client.set_terminated(parent, status="FAILED")
        raise TuneError(
            f"tune: {results.num_errors} of {len(results)} trials failed ({first[:300]}); nothing "
            f"written, see MLflow sweep run {parent}"
        )
    client.set_terminated(parent, status="FINISHED" if best.fd_domain is not None else "FAILED")
    if best.fd_domain is None:
        raise TuneError(f"tune: no trial of {best.trials} produced an fd_domain (see MLflow run {parent})")
    return best


def _mark_interrupted(client: Any, parent: str) -> None:
    """The sweep run and its trial runs still RUNNING: KILLED, tag ganflow.failure = interrupted."""
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
    )
    for run_id in [r.info.run_id for r in children] + [parent]:
        client.set_tag(run_id, "ganflow.failure", "interrupted")
        client.set_terminated(run_id, status="KILLED")


def summarise(cfg: Config, client: Any, parent: str, results: Any, ticks: int) -> Best:
    """The pick: among the trials that ran the most ticks (of ``ticks``), the lowest fd_recent at
    the last, unless it does not beat the train rates' trial by tune.pick_margin (``pick``);
    child-run statuses; the parent's record and plot."""
    anchor = anchor_of(cfg)
    trials = []
    for result in results:
        frame = result.metrics_dataframe
        fds = list(frame["fd_domain"]) if frame is not None and "fd_domain" in frame else []
        # the loop's fd_recent: the mean of the last two evaluations of the weights' whole lineage
        # (a PBT member's table lacks the ticks before its last restart)
        recent = (result.metrics or {}).get(OBJECTIVE)
        finite = bool(fds) and math.isfinite(fds[-1]) and recent is not None and math.isfinite(recent)
        # a trial whose process died before its first report has no recorded config
        config = result.config or {}
        key = objective_key(result.metrics or {})
        schedule = (
            [[float(g), float(d)] for g, d in zip(frame["lr_g"], frame["lr_d"])]
            if frame is not None and "lr_g" in frame
            else []
        )
        trials.append(
            {
                "lr_g": float(config["lr_g"]) if "lr_g" in config else None,
                "lr_d": float(config["lr_d"]) if "lr_d" in config else None,
                "fd": float(recent) if finite else None,
                "fd_history": fds,  # this process's reports
                "objective": key,  # what fd_recent averaged
                "objective_history": [float(v) for v in frame[key]] if frame is not None and key in frame else [],
                "epoch": _ticks_reached(result) if fds else None,
                "epochs": _ticks_reached(result),
                "error": str(result.error).splitlines()[0] if result.error else None,
                # the rates of each report: constant under ASHA, PBT's schedule for its members
                "lr_schedule": schedule,
                # the train rates' trial, kept at those rates to the end: what the pick must beat
                "anchor": is_anchor(config, anchor)
                and all(is_anchor({"lr_g": g, "lr_d": d}, anchor) for g, d in schedule),
            }
        )
    stopped = _close_trial_runs(cfg, client, parent, results, ticks)
    best = pick(trials, cfg.tune.pick_margin)
    summary = Best(
        lr_g=best["lr_g"] if best else cfg.train.lr_g,
        lr_d=best["lr_d"] if best else cfg.train.lr_d,
        fd_domain=best["fd"] if best else None,
        epoch=best["epoch"] if best else None,
        sweep_run_id=parent,
        trials=len(trials),
        trial_ticks=sum(t["epochs"] for t in trials),
        stopped_early=stopped,
        tuned=True,
        objective="fd_class" if any(t["objective"] == "fd_class" for t in trials) else "fd_domain",
    )
    client.log_param(parent, "best_lr_g", repr(summary.lr_g))
    client.log_param(parent, "best_lr_d", repr(summary.lr_d))
    if summary.fd_domain is not None:
        client.log_metric(parent, "best_fd_domain", summary.fd_domain)
    client.log_metric(parent, "trial_ticks", summary.trial_ticks)
    client.log_metric(parent, "trials_stopped_early", stopped)
    client.log_image(parent, _sweep_plot(trials), artifact_file="sweep_fd_domain.png")
    client.log_text(parent, json.dumps(trials, default=str, indent=2), "trials.json")
    return summary


def objective_noise(history: list[float], last: int = 5) -> float:
    """The sd of one evaluation of the objective about its trend, from the last ``last``
    evaluations: the sd of their successive differences over sqrt(2), so that a steady
    improvement (a constant difference) does not count as noise. nan with fewer than 3 finite
    evaluations."""
    values = [v for v in history[-last:] if math.isfinite(v)]
    if len(values) < 3:
        return math.nan
    return float(np.std(np.diff(values), ddof=1) / math.sqrt(2.0))


def pick(trials: list[dict[str, Any]], margin: float) -> dict[str, Any] | None:
    """The sweep's pick among the trials (summarise's rows) that ran the most ticks: the lowest
    fd_recent; but where the anchor (the train rates, kept to the end by the scheduler) is among
    them, another trial is picked only if it is lower than the anchor's by more than ``margin``
    times the noise of that difference. fd_recent is a mean of two evaluations, so that noise is
    sqrt((s_anchor^2 + s_other^2) / 2), with s from objective_noise; where it is unknown (too few
    evaluations) the plain values are compared. A sweep thus moves away from the rates a training
    without one would use only on evidence. On faces-100 (seed 1) successive halving let one trial
    past its last rung, at a D rate of 1.2e-5, and picked it though its validation FD then rose
    8-fold; it trained to 2.12x the real baseline, where the train rates trained to 1.03x."""
    scored = [t for t in trials if t["fd"] is not None]
    if not scored:
        return None
    longest = max(t["epochs"] for t in scored)
    finalists = [t for t in scored if t["epochs"] == longest]
    best = min(finalists, key=lambda t: t["fd"])
    anchor = next((t for t in finalists if t.get("anchor")), None)
    if anchor is None or best is anchor:
        return best
    noise = math.sqrt(
        (
            objective_noise(anchor.get("objective_history", [])) ** 2
            + objective_noise(best.get("objective_history", [])) ** 2
        )
        / 2.0
    )
    needed = margin * noise if math.isfinite(noise) else 0.0
    return best if anchor["fd"] - best["fd"] > needed else anchor


def _ticks_reached(result: Any) -> int:
    """How many ticks a trial reported, its lineage's included: a PBT member restarted from
    another's checkpoint goes on counting from there, while its metrics table keeps only the
    rows of its own process."""
    iteration = (result.metrics or {}).get("training_iteration")
    if iteration is not None:
        return int(iteration)
    return 0 if result.metrics_dataframe is None else len(result.metrics_dataframe)


def _close_trial_runs(cfg: Config, client: Any, parent: str, results: Any, ticks: int) -> int:
    """Trials that Tune ended were killed mid-fit, leaving their runs RUNNING: mark those the
    scheduler stopped early KILLED (tag ganflow.trial_status = "stopped early (sha)" or "(asha)"),
    those that ran every tick FINISHED. Returns how many were stopped early."""
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    stopped = 0
    for result in results:
        # Tune names a trial's directory after its trial id, which the child run carries as a tag
        run = next(
            (r for r in children if result.path and r.data.tags.get("ganflow.trial_id", "?") in result.path), None
        )
        if run is None or run.info.status != "RUNNING":
            continue
        epochs = _ticks_reached(result)
        if result.error is not None:
            status, note = "FAILED", "error"
        elif epochs < ticks:
            status, note = "KILLED", f"{STOPPED_EARLY} ({cfg.sweep_scheduler})"
            stopped += 1
        else:  # Tune ends a trial at its last report, before its fit() returns
            status, note = "FINISHED", "finished"
        client.set_tag(run.info.run_id, "ganflow.trial_status", note)
        client.set_terminated(run.info.run_id, status=status)
    return stopped


def _sweep_plot(trials: list[dict[str, Any]]):
    """fd_recent over (lr_g, lr_d): one dot per trial, log axes, colour = its last fd_recent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    scored = [t for t in trials if t["fd"] is not None]
    if scored:
        dots = ax.scatter(
            [t["lr_g"] for t in scored],
            [t["lr_d"] for t in scored],
            c=[t["fd"] for t in scored],
            cmap="viridis_r",
            s=60,
        )
        fig.colorbar(dots, label="fd_recent (the objective's mean over the last two ticks)")
    unscored = [t for t in trials if t["fd"] is None and t["lr_g"] is not None]
    ax.scatter([t["lr_g"] for t in unscored], [t["lr_d"] for t in unscored], marker="x", c="red")
    ax.set(xlabel="lr_g", ylabel="lr_d", title="sweep: fd_domain per trial")
    if scored or unscored:
        ax.set(xscale="log", yscale="log")
    else:  # every trial failed before its rates were recorded: log axes over no data cannot be drawn
        ax.text(0.5, 0.5, "no trial reported", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buf).convert("RGB"))
