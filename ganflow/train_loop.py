"""The per-worker training loop: one GAN update per batch, run by every Ray Train worker.

Per batch: the D step on fake.detach() (G's gradients untouched), then, every train.d_steps
batches, the G step; an EMA copy of G follows every G step. Every epoch ends with one
``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint.
Side effects (MLflow, sample grids) happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganflow.artifacts import CHECKPOINT_META, CHECKPOINT_STATE
from ganflow.augment import AdaptiveP, Augment, augmenter
from ganflow.config import Config, policy_of
from ganflow.encoder import encode
from ganflow.errors import GanflowError, first_line
from ganflow.evaluation import Reference, codes_for, load_reference
from ganflow.losses import LOSSES, r1_penalty
from ganflow.models import (
    build_discriminator,
    build_generator,
    class_grid_codes,
    one_hot,
    recompute_batchnorm,
)

DIAGNOSTICS = ("loss_d", "loss_g", "d_real", "d_fake", "rt")
EVAL_METRICS = ("fd_domain", "kid", "kid_std", "fd_recent")
# per-epoch speed: differ between identical runs, so never part of a reproducible result
TIMINGS = ("imgs_per_sec", "epoch_s")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (sample, evaluate and export through this)."""
    return model.module if hasattr(model, "module") else model


def noise_seed(seed: int, rank: int, epoch: int) -> int:
    """Noise seed per (run seed, rank, epoch): ranks draw different z, and a resumed epoch
    draws exactly the z it drew the first time."""
    return int(np.random.SeedSequence([seed, rank, epoch, 1]).generate_state(1)[0])


def fixed_noise(cfg: Config, n: int = 64, num_classes: int = 0) -> torch.Tensor:
    """The same G inputs every epoch, so sample grids show progress, not new draws; a
    conditional G's grid has one row of 8 per class."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    if num_classes:
        return class_grid_codes(cfg.model.latent_dim, num_classes, 8, g)
    return torch.randn(n, cfg.model.latent_dim, generator=g)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for this device, or None for full precision.

    CUDA: auto = bf16 where the GPU has it, else fp16 (with a gradient scaler). CPU: auto = bf16
    where the CPU computes it natively (AVX512-BF16 or AMX), else full precision; bf16 forces it."""
    if cfg.train.amp == "off":
        return None
    if device.type == "cuda":
        if cfg.train.amp == "fp16":
            return torch.float16
        if cfg.train.amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if cfg.train.amp == "fp16":
            return torch.float16
        if cfg.train.amp == "bf16" or cpu_has_bf16():
            return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively; without it, bf16 autocast is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass
class GanState:
    """Everything one worker trains; g and d may be DDP-wrapped, ema_g never is."""

    g: nn.Module
    d: nn.Module
    ema_g: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = full precision
    augment: Augment | None = None  # applied to every D input, real and generated (train.augment)
    ada: AdaptiveP | None = None  # train.augment auto: the controller of the augmentation's probability
    prior: list[float] | None = None  # a conditional G's class frequencies (train split); None = unconditional
    epoch: int = 0  # the next epoch to run
    step: int = 0  # batches done (D steps)
    g_steps: int = 0
    starts: int = 1  # how many times the worker group started on this run (1 + restarts/resumes)
    best_fd: float = float("inf")  # the best in-training fd_domain so far, and where
    best_epoch: int = 0
    best_ema_g: dict[str, torch.Tensor] | None = None  # the EMA generator of best_epoch (CPU)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished tick
    lecam_ema: torch.Tensor | None = None  # train.lecam > 0: EMAs of D's mean real and fake logits

    @property
    def augment_p(self) -> float:
        """The probability each augmentation is applied with: ADA's p, 1 for diffaugment."""
        return self.ada.p if self.ada is not None else (1.0 if self.augment is not None else 0.0)


def build_state(
    cfg: Config, device: torch.device, lr_g: float, lr_d: float, prior: list[float] | None = None
) -> GanState:
    """``prior``: the class frequencies of a conditional G (None: unconditional)."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    classes = len(prior) if prior else 0
    g = build_generator(cfg, classes).to(device)
    d = build_discriminator(cfg, classes).to(device)
    ema_g = copy.deepcopy(g).eval().requires_grad_(False)
    betas = (cfg.train.beta1, cfg.train.beta2)
    dtype = amp_dtype(cfg, device)
    fp16 = dtype == torch.float16
    return GanState(
        g=g,
        d=d,
        ema_g=ema_g,
        opt_g=torch.optim.Adam(g.parameters(), lr=lr_g, betas=betas),
        opt_d=torch.optim.Adam(d.parameters(), lr=lr_d, betas=betas),
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
        device=device,
        dtype=dtype,
        augment=(
            augmenter(
                policy_of(cfg.train.augment_policy, cfg.data.channels),
                cfg.train.augment_translation,
                cfg.train.augment_cutout,
            )
            if cfg.train.augment != "none"
            else None
        ),
        ada=ada_controller(cfg),
        prior=list(prior) if prior else None,
        lecam_ema=torch.zeros(2, device=device) if cfg.train.lecam > 0 else None,
    )


def ada_controller(cfg: Config) -> AdaptiveP | None:
    """train.augment auto: p starts at 0 and moves by the images of one adjustment over ada_kimg."""
    if cfg.train.augment != "auto":
        return None
    step = cfg.train.batch_size * cfg.train.ada_interval / (cfg.train.ada_kimg * 1000.0)
    return AdaptiveP(target=cfg.train.ada_target, step=step, interval=cfg.train.ada_interval)


def _autocast(state: GanState):
    if state.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=state.dtype)


EMA_RAMPUP = 0.1  # the EMA's half-life is at most this share of the G steps taken so far


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA decay after ``updates`` G steps. Its half-life (in G steps) ramps up with the run,
    as StyleGAN's EMA half-life ramps with the images shown: at most EMA_RAMPUP x the steps so
    far, so a short run's EMA does not hold on to the random initial weights; ``decay`` itself
    is reached once the run has taken ln(0.5) / ln(decay) / EMA_RAMPUP steps (690 for 0.99)."""
    if decay <= 0.0:
        return 0.0
    half_life = min(math.log(0.5) / math.log(decay), EMA_RAMPUP * updates)
    return 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Average the weights only: the EMA G's BatchNorm statistics are recomputed for its own
    weights (models.recompute_batchnorm) before it is evaluated, sampled or exported."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def gan_step(
    state: GanState,
    cfg: Config,
    real: torch.Tensor,
    z_gen: torch.Generator,
    update_g: bool,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One D update, then (if update_g) one G update. real: (B, C, H, W) in [-1, 1]; labels:
    (B,) their classes, used by a conditional G and D (the fakes are drawn for the same classes,
    so they follow the data's class frequencies).

    Returns detached diagnostics: loss_d, loss_g, d_real, d_fake (mean D probabilities).
    """
    d_loss_fn, g_loss_fn = LOSSES[cfg.train.loss]
    b = real.shape[0]
    z = torch.randn(b, cfg.model.latent_dim, generator=z_gen, device=z_gen.device).to(state.device)
    seeking = cfg.train.mode_seeking > 0 and update_g and b >= 2  # the G step pairs fakes i and i + b//2
    c = c_fake = None
    if state.prior:
        c = c_fake = one_hot(labels, len(state.prior)).to(state.device)  # (B, K)
        if seeking:  # a pair shares its class
            c_fake = c.clone()
            c_fake[b // 2 : 2 * (b // 2)] = c[: b // 2]
        z = torch.cat([z, c_fake], dim=1)
    # D sees every image through the same random augmentation, real and generated, in both steps
    p = state.augment_p
    seen = (lambda x: state.augment(x, z_gen, p)) if state.augment is not None else (lambda x: x)
    judge = (lambda x: state.d(x, c)) if c is not None else state.d  # real images, their classes
    judge_fake = (lambda x: state.d(x, c_fake)) if c is not None else state.d  # fakes, the classes drawn

    # D step: minimise d_loss(D(x), D(G(z))) on fake.detach(), so no gradient reaches G; every
    # train.r1_every steps plus the R1 penalty on the same real images (lazy regularisation)
    r1 = cfg.train.r1_gamma > 0 and state.step % cfg.train.r1_every == 0
    with _autocast(state):
        fake = state.g(z)
        real_seen = seen(real)
        if r1:
            real_seen = real_seen.detach().requires_grad_(True)
        real_logits = judge(real_seen)
        fake_logits = judge_fake(seen(fake.detach()))
        loss_d = d_loss_fn(real_logits.float(), fake_logits.float())  # the diagnostic: without the penalty
        total_d = loss_d
        if state.lecam_ema is not None:
            total_d = total_d + cfg.train.lecam * lecam_penalty(
                real_logits.float(), fake_logits.float(), state.lecam_ema
            )
        if r1:
            total_d = loss_d + 0.5 * cfg.train.r1_gamma * cfg.train.r1_every * r1_penalty(real_logits, real_seen)
    state.opt_d.zero_grad(set_to_none=True)
    state.scaler_d.scale(total_d).backward()
    state.scaler_d.step(state.opt_d)
    state.scaler_d.update()

    if state.lecam_ema is not None:  # after the penalty: it anchors to the outputs of earlier steps
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        state.lecam_ema.lerp_(means, 1.0 - cfg.train.lecam_decay)
    diagnostics = {
        "loss_d": loss_d.detach(),
        "rt": torch.sign(real_logits.detach().float()).mean(),  # ADA's over-fitting heuristic
        "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
        "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
    }
    if not update_g:
        diagnostics["loss_g"] = torch.full_like(diagnostics["loss_d"], float("nan"))
        return diagnostics

    # G step: minimise g_loss(D(G(z))) through D; D's gradients from this pass are thrown
    # away (zeroed before D's next step), and no_sync keeps DDP from all-reducing them
    no_sync = state.d.no_sync() if hasattr(state.d, "no_sync") else contextlib.nullcontext()
    with no_sync:
        with _autocast(state):
            loss_g = g_loss_fn(judge_fake(seen(fake)).float())  # the diagnostic: without the penalty
            total_g = loss_g
            if seeking:
                total_g = loss_g + cfg.train.mode_seeking * mode_seeking_penalty(fake, z[:, : cfg.model.latent_dim])
        state.opt_g.zero_grad(set_to_none=True)
        state.scaler_g.scale(total_g).backward()
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()
    update_ema(state.ema_g, unwrap(state.g), ema_decay_at(cfg.train.ema_decay, state.g_steps))
    state.g_steps += 1
    diagnostics["loss_g"] = loss_g.detach()
    return diagnostics


def lecam_penalty(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """LeCam (Tseng et al. 2021): keeps D's outputs on real images from running away from what it
    said of fakes lately, and the reverse; ``ema`` = (EMA of mean real logit, of mean fake logit)."""
    return F.relu(real_logits - ema[1]).pow(2).mean() + F.relu(ema[0] - fake_logits).pow(2).mean()


def mode_seeking_penalty(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over the pairs (i, i + B//2) of a batch (Mao et
    al. 2019): large when two codes give nearly the same image. A conditional batch pairs equal
    classes (gan_step), so the pairs differ by their codes only."""
    half = fake.shape[0] // 2
    image_gap = (fake[:half] - fake[half : 2 * half]).float().abs().mean()
    code_gap = (z[:half] - z[half : 2 * half]).float().abs().mean()
    return 1.0 / (image_gap / code_gap + eps)


# ------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: GanState, cfg: Config, directory: Path, meta: dict[str, Any]) -> None:
    """The whole training state: networks, EMA, optimizers, scalers, counters, RNG, config."""
    tensors = {
        "g": unwrap(state.g).state_dict(),
        "d": unwrap(state.d).state_dict(),
        "ema_g": state.ema_g.state_dict(),
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "scaler_g": state.scaler_g.state_dict(),
        "scaler_d": state.scaler_d.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if state.best_ema_g is not None:
        tensors["best_ema_g"] = state.best_ema_g
    if state.lecam_ema is not None:
        tensors["lecam_ema"] = state.lecam_ema
    torch.save(tensors, directory / CHECKPOINT_STATE)
    meta = {
        **meta,
        "epoch": state.epoch,
        "step": state.step,
        "g_steps": state.g_steps,
        "starts": state.starts,
        "best_fd": state.best_fd if math.isfinite(state.best_fd) else None,
        "best_epoch": state.best_epoch,
        "ada": state.ada.state_dict() if state.ada is not None else None,
        "history": state.history,
        "config": cfg.to_dict(),
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CHECKPOINT_META).read_text())


class CheckpointError(GanflowError):
    """A checkpoint file that cannot be loaded safely."""


def load_state_file(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The tensors of a checkpoint's state.pt. weights_only: tensors and plain containers only;
    a file holding anything else (a pickled object whose loading would run code) is refused."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for a disallowed object
        # torch's first line only advises weights_only=False; the reason is a later line
        lines = [line.strip() for line in str(exc).splitlines()[1:]]
        skip = ("Please file", "Check the documentation")
        reason = next((line for line in lines if line and not line.startswith(skip)), "disallowed content")
        raise CheckpointError(f"{path}: refused: not a plain tensor checkpoint ({reason[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:  # truncated, corrupt, missing
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(exc)[:200]})") from None


def load_checkpoint(state: GanState, cfg: Config, directory: Path, lr_g: float, lr_d: float) -> dict:
    """Restore ``state`` (unwrapped modules) from a checkpoint directory; returns its meta."""
    tensors = load_state_file(Path(directory) / CHECKPOINT_STATE, state.device)
    unwrap(state.g).load_state_dict(tensors["g"])
    unwrap(state.d).load_state_dict(tensors["d"])
    state.ema_g.load_state_dict(tensors["ema_g"])
    state.opt_g.load_state_dict(tensors["opt_g"])
    state.opt_d.load_state_dict(tensors["opt_d"])
    state.scaler_g.load_state_dict(tensors["scaler_g"])
    state.scaler_d.load_state_dict(tensors["scaler_d"])
    torch.set_rng_state(tensors["torch_rng"].cpu())
    # the config decides the learning rates, not the optimizer state that was saved
    for opt, lr in ((state.opt_g, lr_g), (state.opt_d, lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr
    meta = read_checkpoint_meta(directory)
    state.epoch, state.step, state.g_steps = meta["epoch"], meta["step"], meta["g_steps"]
    state.starts = meta["starts"] + 1
    state.best_fd = meta["best_fd"] if meta["best_fd"] is not None else float("inf")
    state.best_epoch = meta["best_epoch"]
    state.best_ema_g = tensors.get("best_ema_g")
    state.history = meta["history"]
    if state.ada is not None and meta.get("ada"):  # (a checkpoint of augment none/diffaugment: p from 0)
        state.ada.load_state_dict(meta["ada"])
    if state.lecam_ema is not None and "lecam_ema" in tensors:
        state.lecam_ema.copy_(tensors["lecam_ema"])
    return meta


# ------------------------------------------------------------------------------------- the loop


SHIPPED_INPUTS = ("prepared", "encoder")  # paths.* folders every worker reads


def materialize_inputs(cfg: Config, inputs: dict[str, Any] | None) -> Config:
    """On the driver's node, the project's files are read in place. On any other node (which may
    not see them), the copies the driver put into the object store are unpacked once per node
    into a local cache, and the config points there."""
    import ray

    from ganflow.atomic import atomic_dir

    if not inputs or ray.get_runtime_context().get_node_id() == inputs["node_id"]:
        return cfg
    cache = Path(tempfile.gettempdir()) / "ganflow-inputs" / inputs["key"]
    if not cache.is_dir():
        try:
            with atomic_dir(cache) as tmp:
                for rel, payload in ray.get(inputs["files"]).items():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(payload)
        except OSError:  # another worker of this node unpacked it first
            if not cache.is_dir():
                raise
    paths = cfg.paths.model_copy(update={name: cache / name for name in SHIPPED_INPUTS})
    moved = cfg.model_copy(update={"paths": paths})
    return moved


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
    DDP, metrics straight to Tune, and no checkpoints (a sweep always starts fresh and keeps only
    the trials' rates). Saves each trial a TorchTrainer: its controller, synchronisation and
    placement-group actors, and a worker process that imports torch again."""

    checkpoints = False
    rank, world = 0, 1

    def __init__(self, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray gave this trial its GPU

    def get_checkpoint(self):
        return None

    def prepare(self, model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        return model  # build_state put it on self.device; one process: nothing to wrap

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics)


def local_batches(cfg: Config, rank: int, world: int, batch_size: int, device: torch.device):
    """The local ingest: epoch -> this rank's batches of the train split, read from the prepared
    shards by a DataLoader (a DistributedSampler picks the rank's part, reshuffled each epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from ganflow.data import PreparedDataset, TransformSeeder, build_train_transform

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
    from ganflow.data import build_train_transform
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
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))

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
            # the sweep's objective: the mean of the last two evaluations, not one noisy value
            previous = [r["fd_domain"] for r in state.history if "fd_domain" in r][-1:]
            row["fd_recent"] = float(np.mean(previous + [row["fd_domain"]]))
            if row["fd_domain"] < state.best_fd:  # the exported generator is the best, not the last
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
            session.report({**row, "diverged": ""}, ckpt)
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


def evaluate_ema(state: GanState, cfg: Config, reference: Reference) -> dict[str, float]:
    """fd_domain and KID of the EMA generator against the validation split, on one draw of its
    size and class counts, from latent vectors fixed by eval.seed (so epochs are compared on the
    same z)."""
    z = codes_for(
        reference.split, cfg.model.latent_dim, bool(state.prior), torch.Generator().manual_seed(cfg.eval.seed)
    )
    with torch.no_grad():
        images = torch.cat([state.ema_g(chunk.to(state.device)).float().cpu() for chunk in z.split(500)])
    features, _ = encode(reference.encoder, images)
    return reference.quick(features)


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
