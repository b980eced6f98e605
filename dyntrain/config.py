"""One typed config tree for pre-training, fine-tuning and evaluation.

Precedence: dataclass defaults < YAML file < dotted command-line overrides (``optim.lr=3e-4``),
each override's value parsed as YAML. Unknown keys and wrong types raise ``ConfigError`` naming the
dotted key. The resolved tree round-trips through ``to_dict`` / ``from_dict`` and is saved with the
run and with every checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or range."""


# --------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Args:
    name: run name shown in MLflow and the progress lines.
    seed: seeds the variant draw, the data order and the model init.
    max_steps: optimizer steps to train (global iterations).
    log_every: steps between progress lines / metric logs.
    device: "auto" (CUDA when present), "cuda" or "cpu".
    deterministic: ask torch for deterministic kernels (exact-resume tests).
    """
    name: str = "dynet-pretrain"
    seed: int = 0
    max_steps: int = 1_000_000
    log_every: int = 50
    device: Literal["auto", "cuda", "cpu"] = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        _positive("run.max_steps", self.max_steps)
        _positive("run.log_every", self.log_every)


@dataclass
class ModelConfig:
    """DyNet hyper-parameters (see dynet.DyNetConfig); defaults are the paper's."""
    dim: int = 48
    heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ffn_expansion: float = 2.66
    num_refinement: int = 4
    prompt_len: int = 5
    prompt_dims: list[int] = field(default_factory=lambda: [64, 128, 320])
    prompt_sizes: list[int] = field(default_factory=lambda: [64, 32, 16])
    variants: dict[str, list[int]] = field(
        default_factory=lambda: {"S": [2, 3, 3, 4], "L": [4, 6, 6, 8]})
    activation_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _positive("model.dim", self.dim)
        if not self.variants:
            raise ConfigError("model.variants: at least one variant is needed")
        for name, reuse in self.variants.items():
            if len(reuse) != 4 or any(int(f) < 1 for f in reuse):
                raise ConfigError(
                    f"model.variants.{name}: expected four positive reuse frequencies, got {reuse}")


@dataclass
class DataConfig:
    """Args:
    source: "shards" (pre-training WebDataset shards through DALI), "paired" (fine-tuning folders
        under ``root``) or "paired_shards" (paired WebDataset shards through DALI).
    train_urls: shard URLs: local paths, globs, brace patterns or s3:// URLs.
    crop_size: random crop side.
    micro_batch_size: samples per rank per forward pass.
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
    tasks: fine-tuning task -> repetition factor in the mixed stream (0 drops the task).
    sigmas: Gaussian noise levels (8-bit units) for the denoising task.
    """
    source: Literal["shards", "paired", "paired_shards"] = "shards"
    train_urls: list[str] = field(default_factory=list)
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

    def __post_init__(self) -> None:
        _positive("data.crop_size", self.crop_size)
        _positive("data.micro_batch_size", self.micro_batch_size)
        for key in ("degrade_frac", "mask_frac"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{key}: must lie in [0, 1], got {v}")
        if self.degrade_frac + self.mask_frac > 1.0:
            raise ConfigError("data.degrade_frac + data.mask_frac must not exceed 1 (regions are disjoint)")
        unknown = set(self.degradations) - {"jpeg", "gaussian", "random"}
        if unknown:
            raise ConfigError(f"data.degradations: unknown kinds {sorted(unknown)}")
        for key in ("jpeg_quality", "gaussian_sigma", "random_noise"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"data.{key}: expected [low, high], got {lo_hi}")


@dataclass
class ScheduleConfig:
    """Args:
    mode: "dynamic" draws a variant every iteration; "fixed" always trains ``fixed_variant``
        (the separate-training baselines the paper compares against).
    variant_probs: variant name -> probability (normalised); every name must be in model.variants.
    verify_every: every N steps all ranks all-gather their draw and fail fast on disagreement (0 = off).
    verify_timeout_s: seconds the check waits for every rank before failing (it never hangs).
    """
    mode: Literal["dynamic", "fixed"] = "dynamic"
    variant_probs: dict[str, float] = field(default_factory=lambda: {"S": 0.5, "L": 0.5})
    fixed_variant: str = "L"
    verify_every: int = 0
    verify_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.variant_probs.values()) or sum(self.variant_probs.values()) <= 0:
            raise ConfigError(f"schedule.variant_probs: need non-negative weights with a positive sum, "
                              f"got {self.variant_probs}")
        if self.verify_every < 0:
            raise ConfigError(f"schedule.verify_every: must be >= 0, got {self.verify_every}")
        if self.verify_timeout_s <= 0:
            raise ConfigError(f"schedule.verify_timeout_s: must be positive, got {self.verify_timeout_s}")


@dataclass
class OptimConfig:
    """Args:
    name: "adam" or "adamw".
    lr_schedule: "constant", "cosine" (linear warm-up then cosine to min_lr) or "linear".
    warmup_steps: linear warm-up length in optimizer steps.
    total_steps: schedule length; None = run.max_steps.
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
    """
    dir: Optional[str] = "runs/checkpoints"
    every: int = 1000
    keep: int = 3
    milestone_every: int = 0
    resume: str = "auto"

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class TrackingConfig:
    """Args:
    uri: MLflow tracking URI (sqlite:///mlflow.db, http://host:5000, ...).
    experiment: MLflow experiment name.
    enabled: False turns MLflow off (progress lines still print).
    system_metrics: log MLflow system metrics (CPU/GPU utilisation) when available.
    system_metrics_interval_s: seconds between system-metric samples (MLflow's default is 10).
    artifact_location: artifact root of a newly created experiment (None = next to a sqlite
        database, or the server's default).
    """
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "dynet-pretrain"
    enabled: bool = True
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    artifact_location: Optional[str] = None

    def __post_init__(self) -> None:
        if self.system_metrics_interval_s <= 0:
            raise ConfigError(f"tracking.system_metrics_interval_s: must be positive, "
                              f"got {self.system_metrics_interval_s}")


@dataclass
class DeepSpeedConfig:
    """Args:
    zero_stage: ZeRO stage 0-3.
    bf16: true/false, or "auto" = on when training on a GPU with bf16 support.
    gradient_accumulation_steps: micro-batches per optimizer step (all with one variant).
    offload_optimizer: ZeRO-Offload of optimizer states to CPU (stage >= 1).
    global_batch_size: samples per optimizer step over all ranks; when set, the gradient
        accumulation is derived from it (global / (micro-batch x world size)) at launch, and
        gradient_accumulation_steps must stay 1. None = micro-batch x accumulation x world size.
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
        _positive("deepspeed.gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.global_batch_size is not None:
            _positive("deepspeed.global_batch_size", self.global_batch_size)
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
    sets: test-set name -> folder (bsd68, rain100l, sots); layouts as in dyntrain.evaluate.
    every: evaluate every N steps during fine-tuning (0 = only when asked).
    variants: which variants to evaluate ("all" = every entry of model.variants).
    max_images: limit per set (0 = all).
    """
    sets: dict[str, str] = field(default_factory=dict)
    every: int = 0
    variants: list[str] = field(default_factory=lambda: ["all"])
    max_images: int = 0
    noise_seed: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        names = set(self.model.variants)
        for key in self.schedule.variant_probs:
            if key not in names:
                raise ConfigError(f"schedule.variant_probs.{key}: no such variant in model.variants "
                                  f"({sorted(names)})")
        if self.schedule.mode == "fixed" and self.schedule.fixed_variant not in names:
            raise ConfigError(f"schedule.fixed_variant: {self.schedule.fixed_variant!r} is not in "
                              f"model.variants ({sorted(names)})")

    # ----------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _build(cls, data, "")

    def flatten(self) -> dict[str, Any]:
        """Dotted key -> leaf value (lists and dicts of leaves stay whole), for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and prefix.count(".") < 1:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# ------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides`` ("dotted.key=value", value parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    for item in overrides:
        apply_override(data, item)
    return Config.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one "dotted.key=value" override to a nested dict in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _build(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (dataclasses recursively)."""
    label = key or "<config>"
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            where = f"{key}." if key else ""
            raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(known))})")
        kwargs = {name: _build(hints[name], v, f"{key}.{name}" if key else name)
                  for name, v in value.items()}
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{label}: {exc}") from None

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _build(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{label}: {value!r} matches none of {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{label}: expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{label}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        return [_build(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_build(kt, k, f"{key}.{k}"): _build(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{label}: unsupported type {tp}")  # pragma: no cover - schema bug


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value}")


# ----------------------------------------------------------------------------- command lines
def add_config_arguments(parser: Any, config_help: str = "YAML config") -> None:
    """The config part of every entry point: ``--config FILE`` and trailing dotted overrides."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as YAML)")


def config_from_args(args: Any) -> Optional[Config]:
    """Load ``args.config`` + ``args.overrides``; on a bad config print the one error naming the
    key or file to stderr and return None (the caller exits with status 2)."""
    import sys

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None
