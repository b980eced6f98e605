"""``Config``: the whole tree (one dataclass per section), its cross-section checks and its
conversions (dict, flat dotted keys for MLflow, YAML)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dyntrain.config.model import ModelConfig
from dyntrain.config.plan import batch_plan
from dyntrain.config.schedule import ScheduleConfig
from dyntrain.config.sections import (CheckpointConfig, DataConfig, DeepSpeedConfig, EvalConfig, InitConfig,
                                      OptimConfig, RunConfig, TrackingConfig)
from dyntrain.config.typed import ConfigError, build
from dyntrain.redaction import redact_config


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
        sch = self.schedule
        for section, keys in (("variant_probs", sch.probs_given), ("loss_weights", sch.loss_weights)):
            for key in keys:
                if key not in names:
                    raise ConfigError(f"schedule.{section}.{key}: no such variant in model.variants "
                                      f"({sorted(names)})")
        teacher = sch.distill.teacher
        if teacher is not None:
            if teacher not in names:
                raise ConfigError(f"schedule.distill.teacher: {teacher!r} is not in model.variants "
                                  f"({sorted(names)})")
            if sch.mode == "fixed":
                raise ConfigError("schedule.distill.teacher: distillation needs schedule.mode dynamic "
                                  "or sandwich (a fixed-variant run has no student)")
            if sch.mode == "sandwich" and sch.probs_given.get(teacher, 0.0) <= 0:
                raise ConfigError(f"schedule.distill.teacher: {teacher!r} does not run in this sandwich "
                                  f"(its schedule.variant_probs entry is 0 or missing)")
        if self.schedule.mode == "fixed" and self.schedule.fixed_variant not in names:
            raise ConfigError(f"schedule.fixed_variant: {self.schedule.fixed_variant!r} is not in "
                              f"model.variants ({sorted(names)})")

    def gradient_accumulation(self, world_size: int, data_ranks: Optional[int] = None) -> int:
        """Micro-batches per optimizer step on each rank, from the batch plan
        (``dyntrain.config.plan.batch_plan``, where the global batch is derived); a rank that hosts
        several data ranks (``data.logical_ranks``) takes each one's micro-batches in turn."""
        return batch_plan(self, world_size, data_ranks).accumulation

    # ----------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """``to_dict`` with credentials redacted (``dyntrain.redaction``): what a checkpoint, an
        artifact or a log line may hold."""
        return redact_config(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return build(cls, data, "")

    def flatten(self) -> dict[str, Any]:
        """Dotted key -> leaf value (lists and dicts of leaves stay whole), for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and prefix.count(".") < 1:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.public_dict())
        return out

    def to_yaml(self) -> str:
        """The config as YAML, credentials redacted (the ``config.yaml`` artifact, ``save``)."""
        return yaml.safe_dump(self.public_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())
