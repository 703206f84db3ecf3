"""Joining or starting Ray, and sizing a training's workers to the cluster it joined.

No torch here: `ganflow submit`, `push` and `pull` read RAY_ENV_DEFAULTS without paying for it.
"""

from __future__ import annotations

import os

from ganflow.config import Config
from ganflow.errors import TrainingError, first_line

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


def set_ray_env() -> None:
    """RAY_ENV_DEFAULTS into this process's environment (a variable already set wins): read by
    Ray Train here and by every raylet started from here (a local Ray, a simulated cluster)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def on_ray_cluster() -> bool:
    """True when this process is to work on a Ray cluster: RAY_ADDRESS names one (a Ray job's
    driver always has it). An http(s) RAY_ADDRESS is a job server's, for `ray job` commands."""
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(address) and not address.startswith(("http://", "https://"))


_OWN_RAY = {"local": False}  # whether init_ray started this process's own one-node Ray


def own_local_ray() -> bool:
    """True when this process runs on a local Ray that init_ray started: one node, this one, and
    nothing can join it (a cluster, even of one node now, may get more)."""
    import ray

    return _OWN_RAY["local"] and ray.is_initialized()


def init_ray() -> None:
    """Join RAY_ADDRESS (set inside a Ray job, or by hand on a cluster node), or start a local
    Ray sized to this machine. (cluster.address is the job server the stages are submitted to:
    see ganflow.jobs.)"""
    import ray

    set_ray_env()
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
            # `ray start` head, or the stale address file of one that is gone). No dashboard: a
            # stage's own Ray serves no jobs, and the dashboard's processes held a quarter of the
            # train stage's memory and competed for its cores (benchmarks/README.md, scale.py)
            ray.init(address="local", num_cpus=os.cpu_count(), logging_level="WARNING", include_dashboard=False)
            _OWN_RAY["local"] = True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TrainingError(
            f"cluster.address: cannot connect to Ray at {address or 'local'}: {first_line(exc)}"
        ) from None
    except Exception as exc:
        if address:
            raise
        raise TrainingError(
            f"the stage's local Ray did not start ({first_line(exc)}); on a busy machine, "
            "run the stage again when it is less loaded"
        ) from None


def cpus_for_workers(cfg: Config, node_cpus: list[float]) -> float:
    """cluster.cpus_per_worker, with auto resolved for a training on nodes of ``node_cpus`` CPUs:
    the CPUs of the cluster shared by the workers, at most one node's, at least 1."""
    if cfg.cluster.cpus_per_worker != "auto":
        return float(cfg.cluster.cpus_per_worker)
    if not node_cpus:
        return 1.0
    return float(max(1, min(int(max(node_cpus)), int(sum(node_cpus)) // cfg.cluster.num_workers)))


def worker_threads(cpus_per_worker: float) -> int:
    """Torch compute threads for a worker that holds ``cpus_per_worker`` CPUs: one per CPU, but
    at most OMP_NUM_THREADS where the environment sets it. Ray sets it to the worker's CPUs only
    when it is unset, so a value found here was chosen by whoever started Ray (a machine shared
    with other work, the test suite): more threads than cores each wait on the slowest one, and a
    2-thread step beside one busy loop per core ran 9x slower than idle."""
    threads = max(1, int(cpus_per_worker))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def with_resolved_cpus(cfg: Config) -> Config:
    """A copy of ``cfg`` whose cluster.cpus_per_worker is a number (auto sized on the joined Ray)."""
    import ray

    if cfg.cluster.cpus_per_worker != "auto":
        return cfg
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    out = cfg.model_copy(deep=True)
    out.cluster.cpus_per_worker = cpus_for_workers(cfg, nodes)
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
