"""The config sections other than ``model`` (``model.py``) and ``schedule`` (``schedule.py``): run, data, optim,
checkpoint, tracking, deepspeed, init and eval. Each validates its own values in ``__post_init__``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from dyntrain.config.typed import ConfigError, positive


# The names of ``data.source: synthetic``'s degradations and presets; their functions and parameter
# ranges are ``dyntrain.data.finetune.degradations.TABLE``, which must name exactly these.
SYNTHETIC_TASKS = ("sr", "blur", "noise", "jpeg", "rain", "haze", "lowlight")
PRESETS = ("in", "out")


# --------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Args:
    name: run name shown in MLflow and the progress lines.
    seed: seeds the variant draw, the data order and the model init.
    max_steps: optimizer steps to train (global iterations) at the configured global batch
        (``deepspeed.global_batch_size``); the budget is the samples they take, kept when the
        batch plan grows the batch (``dyntrain.config.plan``).
    max_samples: the budget in samples instead (None = max_steps x the configured global batch).
    log_every: steps between progress lines / metric logs.
    device: "auto" (CUDA when present), "cuda" or "cpu".
    deterministic: ask torch for deterministic kernels (exact-resume tests).
    """
    name: str = "dynet-pretrain"
    seed: int = 0
    max_steps: int = 1_000_000
    max_samples: Optional[int] = None
    log_every: int = 50
    device: Literal["auto", "cuda", "cpu"] = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive("run.max_steps", self.max_steps)
        if self.max_samples is not None:
            positive("run.max_samples", self.max_samples)
        positive("run.log_every", self.log_every)


@dataclass
class DataConfig:
    """Args:
    source: "shards" (pre-training WebDataset shards through DALI), "paired" (fine-tuning folders
        under ``root``), "paired_shards" (paired WebDataset shards through DALI) or "synthetic"
        (clean images of ``clean_urls`` degraded on the fly by the MiOIR tasks of ``tasks``).
    train_urls: shard URLs: local paths, globs, brace patterns or s3:// URLs.
    val_urls: held-out validation shards (same URL forms; ``make_shards --holdout``); with
        ``eval.every`` every variant is validated on a fixed set drawn from them (dyntrain.eval.validation).
    crop_size: random crop side.
    micro_batch_size: the most samples one rank takes per forward pass (a memory cap). With
        ``deepspeed.global_batch_size`` the batch plan derives the micro-batch (<= this) and the
        accumulation per world size (``dyntrain.config.plan``); without it, the micro-batch itself.
    num_threads: DALI CPU threads (or DataLoader workers for "paired") per rank.
    prefetch: batches queued ahead of the trainer.
    shuffle_buffer: samples held by the reader's shuffling buffer (0 disables shuffling).
    decode: "auto" (mixed/nvJPEG on GPU, cpu otherwise), "mixed" or "cpu".
    degrade_frac / mask_frac: fractions of the crop's area degraded and masked.
    degradations: kinds drawn per sample for the degraded region.
    region_block: side of the square blocks that make up degraded and masked regions.
    jpeg_quality, gaussian_sigma, random_noise: [low, high] ranges of the random levels
        (sigma in 8-bit units; random_noise = fraction of salt-and-pepper pixels).
    root: fine-tuning data folder holding Denoise/, Derain/, Dehaze/.
    tasks: fine-tuning task -> repetition factor in the mixed stream (0 drops the task); for
        "synthetic" a MiOIR degradation (sr, blur, noise, jpeg, rain, haze, lowlight) -> weight.
    clean_urls: "synthetic": folders of clean images (a depth map beside an image drives its haze),
        or pre-training shards as in train_urls (.tar paths/globs/braces, s3:// URLs), read by DALI.
    preset: "synthetic": the degradations' parameter ranges, "in" (In-Dis) or "out" (Out-Dis).
    sigmas: Gaussian noise levels (8-bit units) for the denoising task.
    io_retry_s: seconds a transient storage error (S3 connection refused or reset, timeout, HTTP 5xx,
        SlowDown) is retried with backoff while reading shards before the run fails naming the URL;
        nothing is skipped meanwhile. 0 fails at the first such error.
    logical_ranks: data ranks: readers the data is split into, each with its own share, seeds and
        state (``dyntrain.data.logical``). 0 = the world size of the run's first start, which its
        checkpoints keep: a resume on fewer ranks hosts several readers per rank, takes their
        micro-batches in turn as gradient accumulation and trains on exactly the batches of the
        original run. Must be a multiple of the world size, else the data is resharded.
    """
    source: Literal["shards", "paired", "paired_shards", "synthetic"] = "shards"
    train_urls: list[str] = field(default_factory=list)
    val_urls: list[str] = field(default_factory=list)
    crop_size: int = 128
    micro_batch_size: int = 32
    num_threads: int = 4
    prefetch: int = 2
    shuffle_buffer: int = 1024
    decode: Literal["auto", "mixed", "cpu"] = "auto"
    degrade_frac: float = 0.5
    mask_frac: float = 0.3
    degradations: list[str] = field(default_factory=lambda: ["jpeg", "gaussian", "random"])
    region_block: int = 16
    jpeg_quality: list[int] = field(default_factory=lambda: [10, 60])
    gaussian_sigma: list[float] = field(default_factory=lambda: [5.0, 50.0])
    random_noise: list[float] = field(default_factory=lambda: [0.02, 0.2])
    root: Optional[str] = None
    tasks: dict[str, int] = field(default_factory=lambda: {"denoise": 1, "derain": 1, "dehaze": 1})
    sigmas: list[int] = field(default_factory=lambda: [15, 25, 50])
    clean_urls: list[str] = field(default_factory=list)
    preset: str = "in"
    io_retry_s: float = 180.0
    logical_ranks: int = 0

    def __post_init__(self) -> None:
        positive("data.crop_size", self.crop_size)
        positive("data.micro_batch_size", self.micro_batch_size)
        if self.logical_ranks < 0:
            raise ConfigError(f"data.logical_ranks: must be >= 0 (0 = the world size), got {self.logical_ranks}")
        if not 0 <= self.io_retry_s < float("inf"):
            raise ConfigError(f"data.io_retry_s: must be a number of seconds >= 0, got {self.io_retry_s}")
        for key in ("degrade_frac", "mask_frac"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{key}: must lie in [0, 1], got {v}")
        if self.degrade_frac + self.mask_frac > 1.0:
            raise ConfigError("data.degrade_frac + data.mask_frac must not exceed 1 (regions are disjoint)")
        unknown = set(self.degradations) - {"jpeg", "gaussian", "random"}
        if unknown:
            raise ConfigError(f"data.degradations: unknown kinds {sorted(unknown)}")
        if self.source == "synthetic":
            unknown_tasks = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
            if unknown_tasks:
                raise ConfigError(f"data.tasks: unknown tasks {unknown_tasks} (known: {list(SYNTHETIC_TASKS)})")
            if self.preset not in PRESETS:
                raise ConfigError(f"data.preset: unknown preset {self.preset!r} (known: {list(PRESETS)})")
        for key in ("jpeg_quality", "gaussian_sigma", "random_noise"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"data.{key}: expected [low, high], got {lo_hi}")


@dataclass
class OptimConfig:
    """Args:
    name: "adam" or "adamw".
    lr_schedule: "constant", "cosine" (linear warm-up then cosine to min_lr) or "linear".
    warmup_steps: linear warm-up length in optimizer steps.
    total_steps: schedule length; None = run.max_steps.
    lr_scaling: how lr and min_lr follow when the batch plan grows the global batch by k (the
        configured one cannot be split over the data ranks): "linear" (x k), "sqrt" (x sqrt(k), the
        rule for Adam) or "none". Step counts (warm-up, schedule, ...) are divided by k either way.
    grad_clip: max global gradient norm; 0 disables clipping.
    """
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_lr: float = 0.0
    grad_clip: float = 0.0
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")


@dataclass
class CheckpointConfig:
    """Args:
    dir: checkpoint folder on shared storage (None disables checkpoints).
    every: steps between checkpoints (0 = only at the end and on request).
    keep: newest checkpoints kept; older ones are deleted (milestones excepted).
    milestone_every: additionally keep every checkpoint whose step is a multiple of this (0 = none).
    resume: "auto" (newest complete checkpoint in dir, if any), "never", or a tag to load.
    overwrite: a fresh start (resume=never) into a dir that holds checkpoints deletes them first
        (and resuming from a tag deletes the newer tags of the abandoned timeline); when False
        (default) such a start is refused, so two runs' tags never mix.
    """
    dir: Optional[str] = "runs/checkpoints"
    every: int = 1000
    keep: int = 3
    milestone_every: int = 0
    resume: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class TrackingConfig:
    """Args:
    uri: MLflow tracking URI (sqlite:///mlflow.db, http://host:5000, ...). Credentials belong in
        the environment (MLFLOW_TRACKING_USERNAME/PASSWORD); ones given here are moved there when
        the config is loaded and never written anywhere (``dyntrain.redaction``).
    experiment: MLflow experiment name.
    enabled: False turns MLflow off (progress lines still print).
    system_metrics: log MLflow system metrics (CPU/GPU utilisation) when available.
    system_metrics_interval_s: seconds between system-metric samples (MLflow's default is 10).
    artifact_location: artifact root of a newly created experiment (None = next to a sqlite
        database, or the server's default).
    buffer_records: records (metric values, params, tags, texts) kept while the store is
        unreachable; beyond it the oldest metrics are dropped and counted.
    flush_timeout_s: at the end of a run, how long to wait for buffered records to be sent.
    retry_max_s: longest wait between two attempts to reach the store during an outage.
    request_timeout_s, request_retries: MLflow's HTTP time-out and retries per request (set as
        MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES unless those are set already).
    log_model: at the end of a run, rank 0 logs the consolidated weights as an MLflow Model
        (``pyfunc``, ``dyntrain.serving``); "auto" = for a fine-tuning run, not for pre-training.
    register_as: registered-model name the logged model becomes a new version of (None = not registered).
    model_max_mb: a model whose weights are larger is logged as a reference to its checkpoint
        instead of a copy (the model then loads only where the checkpoint is reachable).
    """
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "dynet-pretrain"
    enabled: bool = True
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    artifact_location: Optional[str] = None
    buffer_records: int = 100_000
    flush_timeout_s: float = 30.0
    retry_max_s: float = 30.0
    request_timeout_s: int = 10
    request_retries: int = 0
    log_model: Union[bool, Literal["auto"]] = "auto"
    register_as: Optional[str] = None
    model_max_mb: float = 2048.0

    def __post_init__(self) -> None:
        if self.register_as is not None and not str(self.register_as).strip():
            raise ConfigError("tracking.register_as: a registered-model name, or null")
        for key in ("system_metrics_interval_s", "buffer_records", "retry_max_s", "request_timeout_s",
                    "model_max_mb"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"tracking.{key}: must be positive, got {getattr(self, key)}")
        for key in ("flush_timeout_s", "request_retries"):
            if getattr(self, key) < 0:
                raise ConfigError(f"tracking.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class DeepSpeedConfig:
    """Args:
    zero_stage: ZeRO stage 0-3.
    bf16: true/false, or "auto" = on when training on a GPU with bf16 support.
    gradient_accumulation_steps: micro-batches per optimizer step (all with one variant).
    offload_optimizer: ZeRO-Offload of optimizer states to CPU (stage >= 1).
    global_batch_size: samples per optimizer step over all ranks; when set, the micro-batch and the
        gradient accumulation are derived from it per world size (``dyntrain.config.plan``; grown to the
        smallest that the data ranks split evenly), and gradient_accumulation_steps must stay 1.
        None = data.micro_batch_size x gradient_accumulation_steps x world size (a fixed per-GPU batch).
    """
    zero_stage: int = 2
    bf16: Union[bool, Literal["auto"]] = "auto"
    gradient_accumulation_steps: int = 1
    global_batch_size: Optional[int] = None
    offload_optimizer: bool = False
    overlap_comm: bool = True
    steps_per_print: int = 0

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        positive("deepspeed.gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.global_batch_size is not None:
            positive("deepspeed.global_batch_size", self.global_batch_size)
            if self.gradient_accumulation_steps != 1:
                raise ConfigError("deepspeed.global_batch_size derives the gradient accumulation: leave "
                                  "deepspeed.gradient_accumulation_steps at 1 (or unset the global size)")


@dataclass
class InitConfig:
    """Args:
    checkpoint: a pre-training checkpoint folder or exported weights file to start from (None =
        from scratch, the no-pre-training ablation).
    """
    checkpoint: Optional[str] = None
    strict: bool = True


@dataclass
class EvalConfig:
    """Args:
    sets: test-set name -> folder (bsd68, rain100l, sots); layouts as in dyntrain.eval.evaluate.
    every: evaluate every N steps during fine-tuning, and validate every variant on the fixed
        ``data.val_urls`` set every N steps during pre-training (0 = only at the end / when asked).
    variants: which variants to evaluate ("all" = every entry of model.variants).
    max_images: limit per set (0 = all).
    val_samples: size of the fixed pre-training validation set (crops, capped by the val shards).
    val_batch_size: crops per forward pass during pre-training validation.
    """
    sets: dict[str, str] = field(default_factory=dict)
    every: int = 0
    variants: list[str] = field(default_factory=lambda: ["all"])
    max_images: int = 0
    noise_seed: int = 0
    val_samples: int = 64
    val_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        positive("eval.val_samples", self.val_samples)
        positive("eval.val_batch_size", self.val_batch_size)
