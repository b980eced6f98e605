"""Loading a ``Config``: defaults < YAML file < dotted command-line overrides, and the config part
of every entry point's command line."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import yaml

from dyntrain.config.tree import Config
from dyntrain.config.typed import ConfigError
from dyntrain.redaction import mlflow_uri


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides`` ("dotted.key=value", value parsed as YAML).
    Credentials in ``tracking.uri`` go to MLflow's environment variables and leave the URI
    (``dyntrain.redaction.mlflow_uri``)."""
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
    cfg = Config.from_dict(data)
    cfg.tracking.uri = mlflow_uri(cfg.tracking.uri)
    return cfg


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


# ----------------------------------------------------------------------------- command lines
def add_config_arguments(parser: Any, config_help: str = "YAML config") -> None:
    """The config part of every entry point: ``--config FILE`` and trailing dotted overrides."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as YAML)")


def config_from_args(args: Any) -> Config:
    """Load ``args.config`` + ``args.overrides``; a bad config raises ``ConfigError`` naming the key
    or file (``dyntrain.errors.cli_main`` prints it as one line, exit status 2)."""
    return load_config(args.config, args.overrides)


def training_config(argv: Optional[list[str]], description: Optional[str],
                    config_help: str = "YAML config") -> Config:
    """The config of a training entry point's command line (``training_command``)."""
    return training_command(argv, description, config_help)[0]


def training_command(argv: Optional[list[str]], description: Optional[str],
                     config_help: str = "YAML config") -> tuple[Config, Optional[int]]:
    """The command line of a training entry point (pre-training, fine-tuning): ``--config``, dotted
    overrides, ``--dry-run --world-size N`` and the ``--local_rank`` the deepspeed launcher appends.
    Returns (config, N for a dry run else None); a bad one raises ``ConfigError``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arguments(parser, config_help)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the batch plan, the pre-flight and (last line) the DeepSpeed JSON; "
                             "no GPU, no process group, no training")
    parser.add_argument("--world-size", type=int, default=None,
                        help="the number of processes (GPUs) the dry run plans for (default 1)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size: only with --dry-run (a real job takes the launcher's world size)")
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {args.world_size}")
    return config_from_args(args), ((args.world_size or 1) if args.dry_run else None)
