"""The one typed config of ganflow, loaded from params.yaml.

Every section is a pydantic model that forbids unknown keys; defaults live here and only
here (code never does ``cfg.get(key, default)``). Loading a bad file raises ``ConfigError``
whose single line names the file, the dotted key and the reason, e.g.
``params.yaml: train.lr_g: must be > 0``.

Paths under ``paths:`` are relative to the directory of the params file; ``load_config``
makes them absolute, because Ray workers and Ray jobs run in other working directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from ganflow.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    # validate_assignment: overrides applied after loading are checked too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    """Where each artifact lives, relative to the params file (made absolute on load)."""

    prepared: Path = Path("data/prepared")
    encoder: Path = Path("models/encoder")
    tune_best: Path = Path("tune/best.json")
    generator: Path = Path("models/generator")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    registry: Path = Path("registry/model_version.json")
    mlflow_db: Path = Path("mlflow.db")
    mlflow_artifacts: Path = Path("mlartifacts")
    ray_results: Path = Path("ray_results")


class DataConfig(Section):
    """The source of real images and how they are brought to the training shape."""

    # digits: scikit-learn's bundled 8x8 digits; folder: an image folder; npz: arrays in a .npz file
    source: Literal["digits", "folder", "npz"] = "digits"
    # the image folder (source=folder) or .npz file (source=npz); relative to the params file.
    # A DVC dependency of the prepare stage, so it must exist (data/raw ships empty).
    path: Path = Path("data/raw")
    image_size: int = 32
    channels: Literal[1, 3] = 1
    # how a non-square image reaches image_size x image_size:
    # crop = scale the short side, centre-crop; pad = scale the long side, pad with black;
    # stretch = resize both sides (changes the aspect ratio)
    resize: Literal["crop", "pad", "stretch"] = "crop"
    # fail the prepare stage when more than this fraction of the image files cannot be read
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    # images larger than this many pixels are skipped (decompression-bomb guard)
    max_image_pixels: int = Field(50_000_000, gt=0)
    # shares of each class (of all images when unlabelled) held out from training, made once by
    # the prepare stage: validation chooses (best epoch, sweep, champion), test only reports
    # (the evaluate stage is its one reader)
    validation_fraction: float = Field(0.15, gt=0.0, le=0.4)
    test_fraction: float = Field(0.15, gt=0.0, le=0.4)
    # the prepared images are written in shards of at most this many MiB: what preparing holds
    # in memory, and the unit a streaming reader reads
    shard_mb: float = Field(64.0, gt=0.0)
    # training-time augmentation; whatever is applied to the real images is learnt by G
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    # DataLoader worker processes per training worker (0 = load in the training process)
    loader_workers: int = Field(0, ge=0)
    # how training workers get the images: local = each reads the prepared shards (a DataLoader);
    # ray_data = streamed from storage through Ray Data, split across the workers;
    # auto = ray_data when the Ray cluster has more than one node (see ganflow/ingest.py)
    ingest: Literal["auto", "local", "ray_data"] = "auto"
    # processes that decode, resize and write an image folder's shards in the prepare stage beside
    # the stage's own process, which does too: auto = one per core but the stage's, 0 = the stage
    # alone (the output is byte-identical either way)
    prepare_workers: Literal["auto"] | int = "auto"

    @field_validator("prepare_workers")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v != "auto" and v < 0:
            raise ValueError("must be auto or >= 0")
        return v

    @model_validator(mode="after")
    def _train_keeps_half(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction > 0.5:
            raise ValueError("validation_fraction + test_fraction must be at most 0.5: the GAN trains on the rest")
        return self

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v > 128 or v & (v - 1):
            raise ValueError("must be a power of two from 16 to 128")
        return v


# model.g_width/d_width: auto = this / data.image_size, capped at AUTO_WIDTH_MAX (64 at 16 and 32
# px, 32 at 64 px, 16 at 128 px)
AUTO_WIDTH_BUDGET = 2048
AUTO_WIDTH_MAX = 64
# train.mode_seeking: auto = this for a conditional G (it keeps a class's samples apart: recall
# 0.84-0.85 on the digits against 0.61-0.77 without) and 0 for an unconditional one, which has
# no class term to pull its samples together (benchmarks/README.md, "Mode seeking off")
MODE_SEEKING_AUTO = 0.5


class ModelConfig(Section):
    """The generator and discriminator: DCGAN-style, or residual (SNGAN/BigGAN-style blocks)."""

    arch: Literal["dcgan", "resnet"] = "dcgan"

    latent_dim: int = Field(64, gt=0)
    # channels of G's last hidden layer (doubling per upsampling towards 4x4) and of D's first
    # layer (doubling per downsampling); auto: AUTO_WIDTH_BUDGET / data.image_size, at most 64, so
    # the 4x4 layers have 256 channels at every size and a 64 px net costs ~2x a 32 px one, not 6x
    g_width: Literal["auto"] | int = "auto"
    d_width: Literal["auto"] | int = "auto"
    spectral_norm: bool = False  # on D; BatchNorm is dropped from D when it is on
    # class-conditional G (conditional BatchNorm) and projection D: true needs labelled data,
    # auto = conditional when the prepared data has labels
    conditional: Literal["auto"] | bool = False

    @field_validator("g_width", "d_width", mode="before")
    @classmethod
    def _width(cls, v: Any) -> Any:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"must be auto or a whole number > 0, got {v!r}")
        return v


# train.* keys that say how a training runs, not what it computes: neither DVC (dvc.yaml) nor the
# resume key (storage.run_name) reruns or restarts a training for them
TRAIN_RUN_ONLY_KEYS = ("checkpoint_every", "max_failures")


class TrainConfig(Section):
    # the budget: thousands of real images shown to D (ganflow/budget.py), whatever the data's
    # size; epochs, when set, is the old unit and overrides it
    kimg: float = Field(75.0, gt=0.0)
    epochs: int | None = Field(None, gt=0)
    # evaluation (every eval.every ticks), the sample grid, the report to Ray (and a checkpoint
    # every checkpoint_every ticks) happen at the end of the first epoch after each tick_kimg
    tick_kimg: float = Field(2.5, gt=0.0)
    batch_size: int = Field(64, gt=0)  # global batch, split across cluster.num_workers
    lr_g: float = Field(5e-4, gt=0.0)
    lr_d: float = Field(5e-4, gt=0.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    loss: Literal["bce", "hinge"] = "bce"
    d_steps: int = Field(1, ge=1)  # D updates per G update
    # the exported G is the EMA G of the tick with the lowest validation fd_domain among the ticks
    # from this fraction of the budget on: on 15 validation images the first tick's blurred noise
    # once scored lowest (fd 4.8 against 7.7 for faces at the end)
    export_from: float = Field(0.5, ge=0.0, le=1.0)
    # the EMA G's decay per G step, reached after a warm-up (gan_step.ema_decay_at)
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    # lazy R1 gradient penalty on real images: gamma/2 * E||grad D(x)||^2 every r1_every D steps
    # (scaled by r1_every, so the average strength does not depend on it); 0 = off
    r1_gamma: float = Field(0.0, ge=0.0)
    r1_every: int = Field(16, ge=1)
    # mode-seeking term on G (Mao et al. 2019): the fakes come in pairs of one class and two
    # codes, and G's loss adds mode_seeking / (|G(z1)-G(z2)| / |z1-z2|), penalising pairs drawn
    # alike; for a conditional G, whose class term pulls samples to the class prototype. 0 = off;
    # auto = MODE_SEEKING_AUTO for a conditional G, 0 for an unconditional one (mode_seeking_weight)
    mode_seeking: Literal["auto"] | Annotated[float, Field(ge=0.0)] = 0.0
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=1)  # ticks
    max_failures: int = Field(2, ge=0)  # worker-group restarts Ray may make
    # mixed precision: auto = on GPU bf16 where supported, else fp16 with a grad scaler; on CPU bf16
    # where the CPU computes it natively (AVX512-BF16, AMX), else float32
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # differentiable augmentation of every image D sees, real and generated (ganflow/augment.py):
    # auto = adaptive (ADA): each op applied with a probability p that D's over-fitting drives,
    # 0 where D does not over-fit; diffaugment = always (p = 1); none = never
    augment: Literal["none", "diffaugment", "auto"] = "auto"
    ada_target: float = Field(0.6, gt=0.0, lt=1.0)  # the target of r_t = E[sign(D(real))]
    ada_kimg: float = Field(10.0, gt=0.0)  # p can move from 0 to 1 in this many kimg
    ada_interval: int = Field(4, ge=1)  # D steps between adjustments of p
    augment_policy: str = "auto"  # auto, or a comma-separated list of translation, cutout, color
    augment_translation: float = Field(0.125, ge=0.0, le=0.5)  # largest shift, fraction of the side
    augment_cutout: float = Field(0.5, ge=0.0, le=1.0)  # side of the cut square, fraction of the side
    # LeCam regularisation of D (Tseng et al. 2021): weight x (relu(D(x) - ema fake)^2 +
    # relu(ema real - D(G(z)))^2), the EMAs of D's mean outputs with decay lecam_decay; 0 = off
    lecam: float = Field(0.0, ge=0.0)
    lecam_decay: float = Field(0.99, ge=0.0, lt=1.0)
    # balanced consistency regularisation of D (bCR, Zhao et al. 2021): weight x the mean squared
    # change of D's logit when what D saw, real and generated alike, is shifted by up to
    # augment_translation; 10 in the paper; 0 = off
    consistency: float = Field(0.0, ge=0.0)

    @field_validator("augment_policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        policy_of(v, channels=1)  # raises ValueError with the known names
        return v


AUGMENT_OPERATIONS = ("translation", "cutout", "color")  # what ganflow.augment implements


def shift_pixels(side: int, ratio: float) -> int:
    """The largest shift of train.augment_translation ``ratio`` on a ``side``-pixel image, in whole
    pixels (ganflow.augment.translate shifts by up to this)."""
    return int(side * ratio + 0.5)


def policy_of(policy: str, channels: int) -> tuple[str, ...]:
    """The operations a policy string names, in a fixed order; raises ValueError on a bad name."""
    if policy == "auto":
        return ("translation", "cutout", "color") if channels == 3 else ("translation", "cutout")
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in AUGMENT_OPERATIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown augmentation {', '.join(unknown) or '(empty)'}; use auto or a comma-separated "
            f"list of {', '.join(AUGMENT_OPERATIONS)}"
        )
    return names


class TuneConfig(Section):
    enabled: bool = True
    # The defaults come from benchmarks/tune_efficiency.py: across 1e-5..1e-2 a trial of 2.5 kimg
    # ranks rates as the full budget does (Spearman 0.87), but among the good rates only from
    # ~20 kimg on (0.8); so the rungs cut at 2.5 and 7.5 kimg and the finalist runs 25
    num_samples: int = Field(7, gt=0)
    # The first trial trains train.lr_g/lr_d, the rates a training without a sweep uses, when they
    # lie in both ranges (random and optuna search; counted in num_samples): six random pairs over
    # three decades often hold no pair near a set's best, and the sweep's pick then has to beat
    # the rates the project would have used anyway.
    include_train_rates: bool = True
    # That first trial (the anchor) is never stopped early, and another trial is picked only if
    # its objective beats the anchor's by more than pick_margin x the noise of their difference
    # (tuning.pick). 0: the lowest objective wins.
    pick_margin: float = Field(1.0, ge=0.0)
    kimg: float = Field(25.0, gt=0.0)  # each trial's budget, thousands of images shown (as train.kimg)
    tick_kimg: float = Field(2.5, gt=0.0)  # a trial reports (ASHA's signal) every this many kimg
    lr_g_min: float = Field(1e-5, gt=0.0)
    lr_g_max: float = Field(1e-2, gt=0.0)
    lr_d_min: float = Field(1e-5, gt=0.0)
    lr_d_max: float = Field(1e-2, gt=0.0)
    # Sampled pairs (random, optuna, pbt's explore) keep lr_g <= this x lr_d; None: no bound. A D
    # much slower than G lets G pass off noise-covered blobs that the sweep's objective rated
    # above the train rates' samples (lr_g / lr_d of 17x-275x on 100-image sets); no pair of 4.4x
    # or less did so. A grid keeps every pair.
    lr_g_over_d_max: float | None = Field(5.0, gt=0.0)
    # random | optuna (TPE) | grid: tune.grid_points log-spaced rates per optimizer, every pair once
    search: Literal["random", "optuna", "grid"] = "random"
    grid_points: int = Field(3, ge=2)
    # sha: synchronous successive halving: every trial runs to a rung (grace_period x
    # reduction_factor^k ticks) and waits there, paused, until all have; the best 1/reduction_factor
    # go on. Its pick depends on the rates and seeds only, never on which trial reported first
    # (one-worker trials: a paused trial resumes from its checkpoint).
    # asha: asynchronous, a trial is cut against the trials that reached its rung before it: no
    # waiting, but the pick can change with the timing (multi-worker trials).
    # pbt: population-based training, every member trains tune.kimg while the worst copy the
    # best's weights and perturb their rates every pbt_interval ticks (one-worker trials).
    # auto: sha for one-worker trials, asha for multi-worker ones.
    scheduler: Literal["auto", "sha", "asha", "pbt"] = "auto"
    pbt_interval: int = Field(2, ge=1)  # ticks between PBT's exploit/explore steps
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: derived from the cluster
    grace_period: int = Field(1, ge=1)  # ticks a trial runs before sha/asha may stop it
    reduction_factor: int = Field(3, ge=2)  # rungs at grace_period x reduction_factor^k ticks
    seed: int = Field(0, ge=0)

    @property
    def trials(self) -> int:
        """How many trials a sweep runs: every grid pair, else num_samples."""
        return self.grid_points**2 if self.search == "grid" else self.num_samples

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        if self.scheduler == "pbt" and self.search == "optuna":
            raise _FieldError("search", "pbt explores the rates itself: use random or grid with it")
        for name in ("lr_g", "lr_d"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo >= hi:
                raise _FieldError(f"{name}_max", f"must be > {name}_min ({lo:g})")
        ratio = self.lr_g_over_d_max
        if ratio is not None and self.lr_g_min >= ratio * self.lr_d_max:
            raise _FieldError(
                "lr_g_over_d_max",
                f"leaves no pair to sample: lr_g_min ({self.lr_g_min:g}) must be below "
                f"{ratio:g} x lr_d_max ({self.lr_d_max:g})",
            )
        return self


class ClusterConfig(Section):
    # The Ray cluster's job server (dashboard), e.g. http://127.0.0.1:8265: the tune and train
    # stages are then submitted there as Ray jobs. None: run in-process, joining RAY_ADDRESS
    # if set, else a local Ray started by the stage.
    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # auto: a training's workers share the cluster's CPUs (all of this machine's for one worker),
    # a sweep's trials take one each so that they run side by side; torch uses as many threads
    cpus_per_worker: Literal["auto"] | Annotated[float, Field(gt=0.0)] = "auto"
    # None: paths.ray_results (local). A shared path or s3://, gs:// URI on real clusters.
    storage_path: str | None = None

    @field_validator("address")
    @classmethod
    def _job_server(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be the Ray job server's URL, e.g. http://127.0.0.1:8265 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _shared_storage(self) -> ClusterConfig:
        if self.address and not self.storage_path:
            raise _FieldError(
                "storage_path",
                "must be set when cluster.address is: shared storage every node sees "
                "(a shared path, or an s3:// / gs:// URI) for checkpoints and stage files",
            )
        return self


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI if set, else sqlite:///<abs paths.mlflow_db>
    uri: str | None = None
    experiment: str = "ganflow"


class RegistryConfig(Section):
    model_name: str = "ganflow-generator"


class EvalConfig(Section):
    every: int = Field(1, ge=1)  # ticks (train.tick_kimg) between in-training evaluations
    # at most this many generated samples per draw (a draw is as large as the real baseline's,
    # a multiple of the reference split's class counts that the train split can match)
    num_samples: int = Field(1000, ge=10)
    # latent draws of the generator, and train-image draws of the real baseline, that every
    # reported figure is the mean and sd of
    draws: int = Field(10, ge=2)
    # latent draws that each in-training evaluation averages (the exported tick and the sweep's
    # objective): one draw of a small validation split moves fd_domain by its own noise
    tick_draws: int = Field(3, ge=1)
    # and at least this many samples in all: a 100-image set's validation draw is 30 samples, and
    # 3 of them left its score (the sweep's objective, the exported tick) at the mercy of the draw
    tick_samples: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)  # the encoder's init, the real-baseline draws, the KID subsets
    encoder_epochs: int = Field(25, gt=0)
    feature_dim: int = Field(64, gt=0)  # keep well below num_samples: a covariance is estimated
    kid_subsets: int = Field(50, gt=0)
    kid_subset_size: int = Field(500, ge=2)
    pr_k: int = Field(3, gt=0)  # k of the k-NN manifolds for precision/recall
    # a local TorchScript Inception feature extractor ((N, 3, 299, 299) in [0, 255] -> (N, D));
    # None = no Inception FID (nothing is ever downloaded)
    inception_weights: Path | None = None


class Config(Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    eval: EvalConfig = EvalConfig()

    # the directory relative paths were resolved against (the params file's directory)
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    # the params file it was loaded from (None when built from a dict)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def source(self) -> Path:
        return self._source or self._root / DEFAULT_PARAMS

    def relative(self, path: Path) -> str:
        """``path`` relative to the project root when inside it (for outputs that must not
        depend on where the project is checked out), else absolute."""
        try:
            return path.relative_to(self._root).as_posix()
        except ValueError:
            return path.as_posix()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.train.batch_size % self.cluster.num_workers:
            raise _FieldError(
                "train.batch_size",
                f"must be divisible by cluster.num_workers ({self.cluster.num_workers})",
            )
        if self.train.consistency > 0 and shift_pixels(self.data.image_size, self.train.augment_translation) == 0:
            raise _FieldError(  # translate() would return the image as it is: a penalty of 0, at a cost
                "train.consistency",
                f"needs a shift of at least 1 px, and train.augment_translation {self.train.augment_translation:g} "
                f"x data.image_size {self.data.image_size} rounds to 0",
            )
        if self.tune.enabled and self.tune.scheduler in ("pbt", "sha") and self.cluster.num_workers > 1:
            # a multi-worker trial is a TorchTrainer, whose checkpoints Train V2 keeps from Tune
            raise _FieldError(
                "tune.scheduler",
                f"{self.tune.scheduler} needs one-worker trials (cluster.num_workers: 1); use asha "
                "(or auto) with several workers",
            )
        return self

    @property
    def sweep_scheduler(self) -> str:
        """tune.scheduler resolved: auto is sha for one-worker trials, asha for multi-worker ones."""
        if self.tune.scheduler != "auto":
            return self.tune.scheduler
        return "sha" if self.cluster.num_workers == 1 else "asha"

    @property
    def sweep_first_trial(self) -> list[dict[str, float]]:
        """[train.lr_g/lr_d as the sweep's first trial] when tune.include_train_rates and both lie
        in the sweep's ranges (a grid has its own points): the pick must then beat the rates a
        training without a sweep uses. Else []."""
        t, lr_g, lr_d = self.tune, self.train.lr_g, self.train.lr_d
        inside = t.lr_g_min <= lr_g <= t.lr_g_max and t.lr_d_min <= lr_d <= t.lr_d_max
        return [{"lr_g": lr_g, "lr_d": lr_d}] if t.include_train_rates and t.search != "grid" and inside else []

    @property
    def net_widths(self) -> tuple[int, int]:
        """(G's, D's) width, model.g_width/d_width resolved: auto is AUTO_WIDTH_BUDGET /
        data.image_size, at most AUTO_WIDTH_MAX."""
        auto = min(AUTO_WIDTH_MAX, max(1, AUTO_WIDTH_BUDGET // self.data.image_size))
        g, d = self.model.g_width, self.model.d_width
        return (auto if g == "auto" else g, auto if d == "auto" else d)

    def mode_seeking_weight(self, conditional: bool) -> float:
        """train.mode_seeking resolved for a conditional or an unconditional G: auto is
        MODE_SEEKING_AUTO for a conditional G, 0 for an unconditional one."""
        weight = self.train.mode_seeking
        if weight == "auto":
            return MODE_SEEKING_AUTO if conditional else 0.0
        return float(weight)

    def resolved_params(self, conditional: bool) -> dict[str, str]:
        """What the params' auto values became for one G (conditional or not), as MLflow params
        beside the params as written: resolved.model.conditional, .g_width, .d_width,
        resolved.train.mode_seeking, .augment_policy."""
        g_width, d_width = self.net_widths
        return {
            "resolved.model.conditional": str(conditional),
            "resolved.model.g_width": str(g_width),
            "resolved.model.d_width": str(d_width),
            "resolved.train.mode_seeking": str(self.mode_seeking_weight(conditional)),
            "resolved.train.augment_policy": (
                "none"  # nothing is augmented, whatever the policy says
                if self.train.augment == "none"
                else ",".join(policy_of(self.train.augment_policy, self.data.channels))
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready values (paths as strings)."""
        return self.model_dump(mode="json")


class _FieldError(ValueError):
    """Raised in a model validator to blame a specific (dotted, relative) key."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key
        self.reason = reason


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# pydantic error type -> our wording; anything else falls back to pydantic's message.
_REASONS = {
    "extra_forbidden": lambda e: "unknown key",
    "missing": lambda e: "required key is missing",
    "greater_than": lambda e: f"must be > {_num(e['ctx']['gt'])}",
    "greater_than_equal": lambda e: f"must be >= {_num(e['ctx']['ge'])}",
    "less_than": lambda e: f"must be < {_num(e['ctx']['lt'])}",
    "less_than_equal": lambda e: f"must be <= {_num(e['ctx']['le'])}",
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}, got {e['input']!r}",
    "int_parsing": lambda e: f"must be an integer, got {e['input']!r}",
    "int_from_float": lambda e: f"must be an integer, got {e['input']!r}",
    "int_type": lambda e: f"must be an integer, got {e['input']!r}",
    "float_parsing": lambda e: f"must be a number, got {e['input']!r}",
    "float_type": lambda e: f"must be a number, got {e['input']!r}",
    "bool_parsing": lambda e: f"must be true or false, got {e['input']!r}",
    "bool_type": lambda e: f"must be true or false, got {e['input']!r}",
    "string_type": lambda e: f"must be a string, got {e['input']!r}",
    "model_type": lambda e: f"must be a mapping of keys, got {e['input']!r}",
    "model_attributes_type": lambda e: f"must be a mapping of keys, got {e['input']!r}",
    "path_type": lambda e: f"must be a path, got {e['input']!r}",
}


def _describe(error: ErrorDetails) -> tuple[str, str]:
    """(dotted key, reason) for one pydantic error."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    ctx = error.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, _FieldError):
        key = ".".join([*loc, original.key]) if loc else original.key
        return key, original.reason
    if error["type"] == "value_error" and original is not None:
        return key, str(original)
    reason = _REASONS.get(error["type"])
    return key, reason(error) if reason else error["msg"]


def from_dict(raw: Any, source: str = DEFAULT_PARAMS) -> Config:
    """Validate a parsed params mapping; ``source`` only names it in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        key, reason = _describe(exc.errors()[0])
        where = f"{key}: " if key else ""
        extra = len(exc.errors()) - 1
        more = f" (and {extra} more error{'s' if extra > 1 else ''})" if extra else ""
        raise ConfigError(f"{source}: {where}{reason}{more}") from None


def resolve_paths(cfg: Config, root: Path) -> Config:
    """Make every relative path in ``cfg`` absolute against ``root``."""
    root = root.resolve()

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (root / p)

    paths = {name: absolute(getattr(cfg.paths, name)) for name in PathsConfig.model_fields}
    cfg = cfg.model_copy(deep=True)
    cfg.paths = PathsConfig(**paths)
    cfg.data.path = absolute(cfg.data.path)
    if cfg.eval.inception_weights is not None:
        cfg.eval.inception_weights = absolute(cfg.eval.inception_weights)
    cfg._root = root
    return cfg


def config_from_dict(values: dict[str, Any], root: str | Path) -> Config:
    """Rebuild a resolved config (``Config.to_dict()`` output) in another process, e.g. a Ray worker."""
    cfg = from_dict(values, "config")
    cfg._root = Path(root)
    return cfg


def load_config(path: str | Path = DEFAULT_PARAMS) -> Config:
    """Load, validate and resolve a params file. Raises ConfigError with one readable line."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{name}: {where}invalid YAML: {problem}") from None
    cfg = resolve_paths(from_dict(raw, name), path.parent)
    cfg._source = path.resolve()
    return cfg
