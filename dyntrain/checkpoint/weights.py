"""Consolidated model weights: export from a DeepSpeed checkpoint, write and read weights files.

``consolidated_weights`` rebuilds the full fp32 weights from a checkpoint of any ZeRO stage
(DeepSpeed's ``zero_to_fp32`` helpers) with the model section of the run's config;
``save_weights`` writes them as ``.pt`` or ``.safetensors`` (the ``safetensors`` package) and
``load_weights`` reads any of the three forms (checkpoint folder, ``.safetensors``, ``.pt``) back as
``(state_dict, model_config_dict)``. Whatever form the model dict has (``DyNetConfig.to_dict()``
in new exports, the config's ``model`` section, or the older section of files written before
issue 10), ``dyntrain.config.dynet_config_from_dict`` reads it. ``checkpoint_info`` says which run
and step a checkpoint folder or a weights file comes from. Finding and reading checkpoint folders
is ``dyntrain.checkpoint``.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Optional

import safetensors
import safetensors.torch
import torch

from dyntrain.checkpoint import (STATE_KEY, CheckpointError, model_states_file, read_client_state,
                                 resolve_tag_dir)
from dyntrain.checkpoint.unpickle import check_tag_files, safe_load, unsafe_globals


WEIGHTS_FORMAT = "dyntrain-weights-1"


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint folder or exported weights file says about its run: {"step",
    "mlflow_run_id", "tag", "world_size"} where known."""
    path = Path(path)
    if path.is_dir():
        tag_dir = resolve_tag_dir(path)
        ours = read_client_state(tag_dir)
        client = ours.get("client") or {}
        return {"tag": tag_dir.name, "step": int(ours["step"]), "world_size": ours.get("world_size"),
                "mlflow_run_id": client.get("mlflow_run_id")}
    meta = _weights_meta(path)
    return {k: meta[k] for k in ("tag", "step", "mlflow_run_id") if meta.get(k) is not None}


def consolidated_weights(path: str | Path, tag: Optional[str] = None
                         ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], dict[str, Any]]:
    """Full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage (and with bf16), plus the
    model section of its config and {"tag", "step", "mlflow_run_id"}."""
    tag_dir = resolve_tag_dir(path, tag)
    model_file = model_states_file(tag_dir)
    sd = safe_load(model_file)
    ours = sd.get(STATE_KEY) or {}
    client = ours.get("client") or {}
    if glob.glob(str(tag_dir / "*_optim_states.pt")):
        # partitioned fp32 master weights (ZeRO 1-3, or the bf16 optimizer): stitch them together
        # lazy: deepspeed is slow to import and unused by inference
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_tag_files(tag_dir)  # DeepSpeed's helper unpickles: its files are vetted first

        try:
            weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as exc:
            raise CheckpointError(f"could not consolidate the ZeRO partitions of {tag_dir}: {exc}") from exc
    else:
        module = sd.get("module")
        if module is None:
            raise CheckpointError(f"{model_file} holds no module weights")
        weights = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    model_cfg = (client.get("config") or {}).get("model")
    info = {"tag": tag_dir.name, "step": ours.get("step"), "mlflow_run_id": client.get("mlflow_run_id")}
    return weights, model_cfg, info


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor],
                 model_config: Optional[dict[str, Any]] = None,
                 info: Optional[dict[str, Any]] = None) -> Path:
    """Write one consolidated set of weights: ``.safetensors`` or ``.pt`` (any other suffix).

    ``.pt`` holds {"format", "state_dict", "model_config", "info"}; ``.safetensors`` holds the
    tensors with ``model_config`` and ``info`` as JSON strings in ``__metadata__``. The file
    appears atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        if path.suffix == ".safetensors":
            meta = {"format": WEIGHTS_FORMAT, "model_config": json.dumps(model_config),
                    "info": json.dumps(info or {})}
            # the package refuses tensors that share storage (zero_to_fp32 returns views of one
            # flat buffer): give each its own copy
            safetensors.torch.save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            torch.save({"format": WEIGHTS_FORMAT, "state_dict": tensors, "model_config": model_config,
                        "info": dict(info or {})}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """``(state_dict, model_config_dict or None)`` of an exported ``.safetensors``/``.pt`` file, a
    plain torch state_dict file, or a DeepSpeed checkpoint folder (directory or one tag)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights {path} do not exist")
    if path.is_dir():
        weights, model_cfg, _ = consolidated_weights(path)
        return weights, model_cfg
    if is_safetensors(path):
        tensors, meta = _read_safetensors(path)
        model_cfg = json.loads(meta["model_config"]) if meta.get("model_config") else None
        return tensors, model_cfg
    return weights_from_object(load_torch_file(path), path)


def load_torch_file(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` of a weights file on the CPU, with ``weights_only=True`` unless ``trust``.

    A file that holds Python objects beyond tensors (a Lightning checkpoint with hyper-parameters,
    say) is refused by the safe loader; the error says so and how to proceed."""
    path = Path(path)
    try:
        return safe_load(path, trust=trust)
    except CheckpointError as exc:
        if not unsafe_globals(path):
            raise
        raise CheckpointError(f"{exc}; e.g. convert it once with python launch/convert.py --trust --from "
                              f"reference {path} --out weights.safetensors") from None


CHECKPOINT_ROOTS = "DYNTRAIN_CHECKPOINT_ROOTS"


def referenced_checkpoint(ref_file: str | Path) -> Path:
    """The checkpoint a logged model's ``weights_ref.json`` names, resolved relative to the model's
    folder. A path outside it (an absolute one, or ``..``) is read only from under a folder the user
    allows in ``DYNTRAIN_CHECKPOINT_ROOTS`` (``os.pathsep``-separated): a model from a shared
    registry must not make the host read any file it names."""
    ref_file = Path(ref_file)
    try:
        named = Path(json.loads(ref_file.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ref_file} is not a weights reference ({exc})") from None
    model = ref_file.parent.resolve()
    path = (model / named).resolve()
    roots = [Path(r).resolve() for r in os.environ.get(CHECKPOINT_ROOTS, "").split(os.pathsep) if r]
    if path.is_relative_to(model) or any(path.is_relative_to(r) for r in roots):
        return path
    raise CheckpointError(f"{ref_file} names the checkpoint {named}, outside the model; set "
                          f"{CHECKPOINT_ROOTS} to the folder(s) whose checkpoints a model may name "
                          f"(e.g. your shared checkpoint root) to allow it")


def weights_from_object(obj: Any, path: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """``(state_dict, model_config_dict or None)`` of a loaded torch file: dyntrain's export, a
    checkpoint dict with a ``state_dict`` (Lightning's), or a bare state_dict."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj.get("model_config")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointError(f"{path} holds neither a state_dict nor dyntrain weights")


def is_safetensors(path: str | Path) -> bool:
    """Whether a file is to be read as safetensors: named ``.safetensors`` (so that a broken one is
    reported as such), or in that format by its content (an 8-byte little-endian header length,
    then the JSON header), whatever its name."""
    if Path(path).suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 32)


def _weights_meta(path: Path) -> dict[str, Any]:
    if is_safetensors(path):
        return json.loads(_safetensors_metadata(path).get("info") or "{}")
    obj = safe_load(path)
    return dict(obj.get("info") or {}) if isinstance(obj, dict) else {}


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # the package raises its own error types for broken files
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (ours, the older hand-written ones, or any
    other tool's)."""
    meta = _safetensors_metadata(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu"), meta
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
