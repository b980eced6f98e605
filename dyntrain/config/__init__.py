"""One typed config tree for pre-training, fine-tuning and evaluation.

Precedence: dataclass defaults < YAML file < dotted command-line overrides (``optim.lr=3e-4``),
each override's value parsed as YAML. Unknown keys and wrong types raise ``ConfigError`` naming the
dotted key. The resolved tree round-trips through ``to_dict`` / ``from_dict`` and is saved with the
run and with every checkpoint.

Modules: ``typed`` (type-checked building, ``ConfigError``), ``model`` (the ``model`` section =
``dynet.DyNetConfig``'s fields + runtime switches, and ``dynet_config_from_dict``), ``sections``
(the other sections), ``tree`` (``Config``), ``loading`` (YAML, overrides, command lines).
"""
from dyntrain.config.loading import (add_config_arguments, apply_override, config_from_args, load_config,
                                     training_command, training_config)
from dyntrain.config.model import (ARCHITECTURE_FIELDS, PARAMETER_FIELDS, RUNTIME_FIELDS, ModelConfig,
                                   ModelRuntime, dynet_config_from_dict)
from dyntrain.config.schedule import CostAwareConfig, DistillConfig, ScheduleConfig, TaskScheduleConfig
from dyntrain.config.sections import (CheckpointConfig, DataConfig, DeepSpeedConfig, EvalConfig, InitConfig,
                                      OptimConfig, RunConfig, TrackingConfig)
from dyntrain.config.tree import Config
from dyntrain.config.typed import ConfigError


__all__ = [
    "ARCHITECTURE_FIELDS", "PARAMETER_FIELDS", "RUNTIME_FIELDS", "CheckpointConfig", "Config", "ConfigError",
    "DataConfig", "DeepSpeedConfig", "EvalConfig", "InitConfig", "ModelConfig", "ModelRuntime",
    "OptimConfig", "RunConfig", "ScheduleConfig", "TaskScheduleConfig", "DistillConfig", "CostAwareConfig",
    "TrackingConfig", "add_config_arguments",
    "apply_override", "config_from_args", "dynet_config_from_dict", "load_config", "training_command", "training_config",
]
