"""Consolidated model weights: export from a DeepSpeed checkpoint, write and read weights files.

``consolidated_weights`` rebuilds the full fp32 weights from a checkpoint of any ZeRO stage
(DeepSpeed's ``zero_to_fp32`` helpers); ``save_weights`` writes them as ``.pt`` or
``.safetensors`` (format written here: the fixed stack has no safetensors package) and
``load_weights`` reads any of the three forms (checkpoint folder, ``.safetensors``, ``.pt``) back as
``(state_dict, model_config_dict)``. ``checkpoint_info`` says which run and step a checkpoint folder
or a weights file comes from. Finding and reading checkpoint folders is ``dyntrain.checkpoint``.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import STATE_KEY, CheckpointError, model_states_file, read_client_state, resolve_tag_dir

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
    sd = torch.load(model_file, map_location="cpu", weights_only=False)
    ours = sd.get(STATE_KEY) or {}
    client = ours.get("client") or {}
    if glob.glob(str(tag_dir / "*_optim_states.pt")):
        # partitioned fp32 master weights (ZeRO 1-3, or the bf16 optimizer): stitch them together
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
            write_safetensors(tmp, tensors, meta)
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
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        model_cfg = json.loads(meta["model_config"]) if meta.get("model_config") else None
        return tensors, model_cfg
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a torch weights file: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], obj.get("model_config")
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise CheckpointError(f"{path} holds neither a state_dict nor dyntrain weights")


def _weights_meta(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        _, meta = read_safetensors(path, header_only=True)
        return json.loads(meta.get("info") or "{}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return dict(obj.get("info") or {}) if isinstance(obj, dict) else {}


# ----------------------------------------------------------------------- safetensors format
# A file is: 8 bytes little-endian u64 N | N bytes JSON header (space padded) | tensor bytes.
# Header: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
# "data_offsets": [begin, end]}} with offsets relative to the start of the tensor bytes.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if sys.byteorder != "little":  # pragma: no cover - every machine we train on is little-endian
        raise CheckpointError("writing safetensors needs a little-endian machine")
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``tensors`` (names sorted) in the safetensors format."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype} has no safetensors code")
        data = _tensor_bytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: str | Path, header_only: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (also files other tools wrote)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: safetensors header is not JSON: {exc}") from None
        meta = header.pop("__metadata__", None) or {}
        if header_only:
            return {}, meta
        body = f.read()
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in header.items():
        dtype = _ST_TORCH.get(spec.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {spec.get('dtype')}")
        begin, end = spec["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise CheckpointError(f"{path}: tensor {name} lies outside the file ({begin}..{end})")
        shape = list(spec["shape"])
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8).view(dtype)
        if flat.numel() != _numel(shape):
            raise CheckpointError(f"{path}: tensor {name} has {flat.numel()} values for shape {shape}")
        tensors[name] = flat.reshape(shape)
    return tensors, meta


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
