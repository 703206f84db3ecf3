"""The per-worker training loop, run by every Ray Train worker (and by a sweep's one-worker trials).

It reads its batches, runs ganflow.gan_step's update on each, and ends every tick (train.tick_kimg)
with one ``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint
(ganflow.checkpoint_io). Side effects (MLflow, sample grids) happen on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ganflow.checkpoint_io import load_checkpoint, save_checkpoint
from ganflow.config import Config
from ganflow.encoder import INFERENCE_BATCH, encode
from ganflow.evaluation import Reference, codes_for, load_reference
from ganflow.gan_step import DIAGNOSTICS, GanState, build_state, fixed_noise, gan_step, noise_seed, unwrap
from ganflow.ingest import materialize_inputs
from ganflow.models import (
    recompute_batchnorm,
)
from ganflow.raycluster import worker_threads

EVAL_METRICS = ("fd_domain", "kid", "kid_std", "fd_class", "fd_recent")
# per-epoch speed: differ between identical runs, so never part of a reproducible result
TIMINGS = ("imgs_per_sec", "epoch_s")


class RayTrainSession:
    """The loop inside a Ray Train worker: a DDP rank, resumed from and reporting checkpoints."""

    checkpoints = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def prepare(self, model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs or None)

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class TrialSession:
    """The loop run by a Ray Tune trial itself (a sweep's single-worker trials): one process, no
    DDP, metrics straight to Tune. Saves each trial a TorchTrainer: its controller,
    synchronisation and placement-group actors, and a worker process that imports torch again.
    Checkpoints only under population-based training (``checkpoints``), which restarts a trial
    from another's checkpoint with new rates; ASHA's trials keep nothing but their rates."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool, checkpoints: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray gave this trial its GPU
        self.checkpoints = checkpoints

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint() if self.checkpoints else None

    def prepare(self, model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        return model  # build_state put it on self.device; one process: nothing to wrap

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory) if directory else None)


def local_batches(cfg: Config, rank: int, world: int, batch_size: int, device: torch.device):
    """The local ingest: epoch -> this rank's batches of the train split, read from the prepared
    shards by a DataLoader (a DistributedSampler picks the rank's part, reshuffled each epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from ganflow.dataset import PreparedDataset, TransformSeeder, build_train_transform

    dataset = PreparedDataset(cfg.paths.prepared, build_train_transform(cfg.data), part="train")
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    seeder = TransformSeeder(cfg.train.seed, rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.loader_workers,
        worker_init_fn=seeder if cfg.data.loader_workers else None,
        pin_memory=device.type == "cuda",
    )

    def epoch_batches(epoch: int):
        sampler.set_epoch(epoch)
        seeder.start_epoch(epoch, dataset)
        return iter(loader)

    return epoch_batches


def synced_batchnorm(world: int, device: torch.device) -> bool:
    """Whether G's and D's BatchNorm layers normalise over the global batch (SyncBatchNorm) rather
    than each rank's share: on CUDA with several ranks. torch has no SyncBatchNorm for CPU
    tensors, so CPU (gloo) ranks normalise their own share of the batch (train.batch_size /
    num_workers); the weights stay identical either way (DDP all-reduces the gradients), and the
    exported EMA G's statistics are recomputed from its own samples. Converting keeps the
    parameters (the optimizers hold the same tensors) and the state-dict keys (checkpoints and
    exports load across both)."""
    return world > 1 and device.type == "cuda"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of each Ray Train worker. ``config`` is built by ganflow.training and ganflow.tuning."""
    return run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session: RayTrainSession | TrialSession) -> dict[str, Any]:
    """The training loop: resume, train the budget (ganflow.budget), evaluate the EMA G and
    report at each tick."""
    import ray

    from ganflow.artifacts import class_prior, read_manifest
    from ganflow.budget import schedule_of
    from ganflow.config import config_from_dict
    from ganflow.dataset import build_train_transform
    from ganflow.tracking import RunLogger

    _quiet_ray_report_log()
    base_cfg = config_from_dict(config["cfg"], config["root"])
    cfg = materialize_inputs(base_cfg, config.get("inputs"))
    lr_g, lr_d = config["lr_g"], config["lr_d"]
    rank, world = session.rank, session.world
    placement = {
        "rank": rank,
        "node": ray.get_runtime_context().get_node_id(),
        "inputs": "local" if cfg is base_cfg else "shipped",
    }
    device = session.device
    torch.set_num_threads(worker_threads(cfg.cluster.cpus_per_worker))
    placement["threads"] = torch.get_num_threads()

    classes = class_prior(cfg)  # (names, train-split frequencies) for a conditional G, else None
    state = build_state(cfg, device, lr_g, lr_d, classes[1] if classes else None)
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(state, cfg, Path(directory), lr_g, lr_d)
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {state.epoch} (start {state.starts})", flush=True)
    # one DDP per network, never one around both; D's BatchNorm buffers stay per rank
    # (broadcasting them mid-step breaks CUDA DDP with in-place errors)
    workers = _gather_objects(placement, world)  # where each rank runs: recorded in every checkpoint
    batchnorm = "sync" if synced_batchnorm(world, device) else "per-rank"
    if batchnorm == "sync":
        state.g, state.d = (
            nn.SyncBatchNorm.convert_sync_batchnorm(state.g),
            nn.SyncBatchNorm.convert_sync_batchnorm(state.d),
        )
    state.g = session.prepare(state.g)
    state.d = session.prepare(state.d, broadcast_buffers=False)

    # the train split only: validation chooses the epoch, test reports; neither is trained on
    per_rank_batch = cfg.train.batch_size // world
    if config.get("ingest") == "ray_data":  # streamed: Ray Data gives this rank its share
        import ray.train

        from ganflow.ingest import StreamedBatches

        shard = ray.train.get_dataset_shard("train")
        epoch_batches = StreamedBatches(
            shard, cfg.train.seed, rank, per_rank_batch, build_train_transform(cfg.data)
        ).epoch
    else:
        epoch_batches = local_batches(cfg, rank, world, per_rank_batch, device)
    reference = load_reference(cfg) if rank == 0 else None  # the encoder: rank 0 evaluates
    z_gen = torch.Generator(device="cpu")
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    samples_z = fixed_noise(cfg, num_classes=len(state.prior or [])).to(device)

    plan = schedule_of(cfg.train, read_manifest(cfg.paths.prepared)["split"]["train"], world)
    reduce = (lambda v: _mean_over_ranks(v, world, device)) if world > 1 else None
    tick_seconds: list[float] = []  # this process's ticks (evaluation included), for the ETA
    sums = {k: 0.0 for k in DIAGNOSTICS}  # the diagnostics of the tick so far
    counts = {k: 0 for k in DIAGNOSTICS}
    images, train_seconds, tick_started = 0, 0.0, time.perf_counter()
    while state.epoch < plan.epochs:
        epoch = state.epoch
        z_gen.manual_seed(noise_seed(cfg.train.seed, rank, epoch))
        state.g.train()
        state.d.train()
        finite = True
        started = time.perf_counter()
        for i, (real, labels) in enumerate(epoch_batches(epoch)):
            t0 = time.perf_counter()
            real = real.to(device, non_blocking=True)
            diag = gan_step(state, cfg, real, z_gen, update_g=(i + 1) % cfg.train.d_steps == 0, labels=labels)
            values = {k: float(v) for k, v in diag.items()}  # syncs the device once per step
            state.step += 1
            images += real.shape[0] * world
            if state.ada is not None:
                state.ada.observe(values["rt"], reduce)
                values["augment_p"] = state.ada.p
            for k, v in values.items():
                if k in sums and (not math.isnan(v) or k != "loss_g"):
                    finite &= math.isfinite(v)
                    sums[k] += v
                    counts[k] += 1
            if logger is not None:
                values["imgs_per_sec"] = real.shape[0] * world / max(time.perf_counter() - t0, 1e-9)
                logger.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=state.step)
        train_seconds += time.perf_counter() - started

        # every rank learns whether any rank diverged, so all stop at the same report
        finite = _all_ranks_true(finite, world, device)
        if not finite:
            row = {k: sums[k] / max(counts[k], 1) for k in DIAGNOSTICS}
            reason = f"non-finite loss in epoch {epoch + 1} (loss_d={row['loss_d']:.4g}, loss_g={row['loss_g']:.4g})"
            if logger is not None:
                logger.close()  # the finite steps before it, for diagnosis
            session.report({"epoch": epoch + 1, "diverged": reason})
            return {"diverged": reason, "epoch": epoch + 1}  # rank 0's value reaches the driver
        state.epoch = epoch + 1
        tick = plan.tick_index(state.epoch)
        if tick is None:  # between ticks: nothing is evaluated, logged per tick or reported
            continue

        row = {k: sums[k] / max(counts[k], 1) for k in DIAGNOSTICS}
        row.update(epoch=state.epoch, kimg=plan.kimg_at(state.epoch), imgs_per_sec=images / max(train_seconds, 1e-9))
        if state.ada is not None:
            row["augment_p"] = state.ada.p
        sums, counts = {k: 0.0 for k in DIAGNOSTICS}, {k: 0 for k in DIAGNOSTICS}
        images, train_seconds = 0, 0.0
        if world > 1:
            row["rank_param_spread"] = _rank_param_spread(state, world, device)
        last = state.epoch == plan.epochs
        if rank == 0:  # the EMA G is evaluated and sampled with statistics of its own weights
            recompute_batchnorm(state.ema_g, seed=cfg.train.seed, prior=state.prior)
        if reference is not None and (tick % cfg.eval.every == 0 or last):
            row.update(evaluate_ema(state, cfg, reference))
            # the sweep's objective: the mean of the last two evaluations, not one noisy value, of
            # fd_class for a conditional G (it sees a sample of the wrong class), else fd_domain
            key = objective_key(row)
            previous = [r[key] for r in state.history if key in r][-1:]
            row["fd_recent"] = float(np.mean(previous + [row[key]]))
            # the exported generator is the best tick of the budget's last part, not the last one
            if plan.exportable(state.epoch, cfg.train.export_from) and row["fd_domain"] < state.best_fd:
                state.best_fd, state.best_epoch = row["fd_domain"], state.epoch
                state.best_ema_g = {k: v.detach().cpu().clone() for k, v in state.ema_g.state_dict().items()}
        state.history.append(row)
        if logger is not None:
            with torch.no_grad():
                grid = state.ema_g(samples_z)  # (64, C, H, W) in [-1, 1]; EMA G is never DDP-wrapped
            logger.log_grid(grid, step=state.epoch, cols=8 if state.prior else None)  # a row per class
            # per-tick means as epoch_*; the evaluation metrics under their own names (as in tune runs)
            evaluated = {k: row[k] for k in EVAL_METRICS if k in row}
            epoch_means = {f"epoch_{k}": v for k, v in row.items() if k not in evaluated and k != "epoch"}
            logger.log_metrics({**epoch_means, **evaluated}, step=state.epoch)
            logger.log_metrics({"lr_g": lr_g, "lr_d": lr_d}, step=state.epoch)  # PBT changes them between ticks
            logger.log_metrics({"epoch": float(state.epoch)}, step=state.epoch)  # last: marks the tick done
            logger.flush()
            fd = f"  fd_domain {row['fd_domain']:.3f}" if "fd_domain" in row else ""
            ada = f"  p {row['augment_p']:.2f}" if "augment_p" in row else ""
            tick_seconds.append(time.perf_counter() - tick_started)
            eta = (len(plan.ticks) - tick) * sum(tick_seconds[-3:]) / len(tick_seconds[-3:])
            print(
                f"kimg {row['kimg']:.1f}/{plan.kimg:.1f} (epoch {state.epoch}/{plan.epochs})  loss_d {row['loss_d']:.3f}  "
                f"loss_g {row['loss_g']:.3f}  D(x) {row['d_real']:.2f}  D(G(z)) {row['d_fake']:.2f}  "
                f"r_t {row['rt']:.2f}{ada}{fd}  {row['imgs_per_sec']:.0f} img/s  ETA {_clock(eta)}",
                flush=True,
            )

        # the tick's wall time: its steps, the evaluation, the sample grid and the logging (not the checkpoint)
        row["epoch_s"] = time.perf_counter() - tick_started
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and session.checkpoints and (last or tick % cfg.train.checkpoint_every == 0):
                meta = {
                    "run_id": config["run_id"],
                    "lr_g": lr_g,
                    "lr_d": lr_d,
                    "world_size": world,
                    "per_rank_batch": per_rank_batch,
                    "device": str(device),
                    "amp": str(state.dtype),
                    "batchnorm": batchnorm,
                    "workers": workers,
                    "class_names": classes[0] if classes else None,
                    "class_prior": state.prior,
                }
                save_checkpoint(state, cfg, Path(tmp), meta)
                ckpt = tmp
            session.report({**row, "lr_g": lr_g, "lr_d": lr_d, "diverged": ""}, ckpt)
        tick_started = time.perf_counter()
    if logger is not None:
        logger.close()  # last retries of anything the store refused; counted on the run if lost
    return {"diverged": "", "epoch": state.epoch, "workers": workers}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _gather_objects(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def objective_key(row: dict[str, Any]) -> str:
    """What a tick's fd_recent averages: fd_class when the tick has it (a conditional G on
    labelled data), else fd_domain."""
    return "fd_class" if math.isfinite(row.get("fd_class", math.nan)) else "fd_domain"


def tick_draws(cfg: Config, draw_size: int) -> int:
    """How many latent draws an in-training evaluation averages: eval.tick_draws, or as many as
    hold eval.tick_samples samples."""
    return max(cfg.eval.tick_draws, math.ceil(cfg.eval.tick_samples / max(draw_size, 1)))


def evaluate_ema(state: GanState, cfg: Config, reference: Reference) -> dict[str, float]:
    """fd_domain and KID (and fd_class, for a conditional G) of the EMA generator against the
    validation split: the mean over eval.tick_draws latent draws (more when they would hold fewer
    than eval.tick_samples samples), each of the split's size and class counts. The latent
    vectors come from one stream fixed by eval.seed, so every tick is scored on the same vectors,
    and never on those the evaluate stage reports with (seeds eval.seed + 1 on).

    The draws go through G and the encoder together, in batches of INFERENCE_BATCH, whatever the
    split's size: one draw at a time (at most 500 a call) took 1.26x as long for the digits' draws
    of 538, 1.06x for a 100-image set's of 30 at 64 px (benchmarks/inference_batch.py)."""
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    conditional = bool(state.prior)
    asked = np.repeat(np.arange(len(reference.split.draw_counts)), reference.split.draw_counts) if conditional else None
    draws = tick_draws(cfg, reference.split.draw_size)
    z = torch.cat([codes_for(reference.split, cfg.model.latent_dim, conditional, generator) for _ in range(draws)])
    features = []
    for chunk in z.split(INFERENCE_BATCH):  # encoded batch by batch: only the features are kept
        with torch.no_grad():
            images = state.ema_g(chunk.to(state.device)).float().cpu()
        features.append(encode(reference.encoder, images)[0])
    per_draw = np.split(np.concatenate(features), draws)
    scores = [reference.quick(f, asked) for f in per_draw]
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def _quiet_ray_report_log() -> None:
    """Ray Train logs each report at INFO with the whole metrics dict; rank 0's epoch line says it
    better. The logger is named after its module's file, so it is found through the module."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: its logging is left as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _rank_param_spread(state: GanState, world: int, device: torch.device) -> float:
    """Largest difference between ranks of a checksum of G's and D's weights: 0 when DDP
    keeps the ranks in sync, as it must."""
    sums = []
    for net in (unwrap(state.g), unwrap(state.d)):
        flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        sums += [flat.sum(), (flat * weights).sum()]  # position-weighted: a swap shows too
    local = torch.stack(sums).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    return float(torch.stack(gathered).sub(local).abs().max())


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _all_ranks_true(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() == 0.0
