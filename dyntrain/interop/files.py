"""Reference checkpoint files, read and written; and the one reader the entry points use.

Read: a Lightning checkpoint (``state_dict`` with the ``net.`` prefix, as the authors' release
``all_in_one_model.ckpt``), a bare state_dict (``.pth``/``.pt``, with or without ``module.`` or
``net.``), or a safetensors file in the reference layout. The layout is recognised by the names
inside, never by the file name. Loading is ``torch.load(weights_only=True)``; a file that needs
more is refused with one line saying how to proceed (``trust=True``, ``--trust``).

Write: ``form="lightning"`` gives what the authors' ``DyNetModel.load_from_checkpoint`` needs (the
``net.``-prefixed ``state_dict`` and ``pytorch-lightning_version``; no Lightning import here), and
``form="state_dict"`` a bare state_dict for ``DyNet_large(decoder=True).load_state_dict``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dyntrain.checkpoint.weights import (checkpoint_info, consolidated_weights, is_safetensors,
                                         load_torch_file, load_weights, save_weights, weights_from_object)
from dyntrain.config import dynet_config_from_dict
from dyntrain.interop.convert import (Imported, ReferenceFormatError, from_reference, looks_like_reference,
                                      strip_prefixes, to_reference)
from dyntrain.interop.names import architecture_differences
from dyntrain.logs import get_logger


log = get_logger(__name__)

# the Lightning release the authors' code pins; its loader reads this key before anything else
LIGHTNING_VERSION = "2.0.6"
FORMS = ("lightning", "state_dict")


def _load(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], dict[str, Any]]:
    """(state_dict, stored model config or None, facts from the file: ``step`` (dyntrain's own),
    ``global_step``, ``epoch`` (a Lightning checkpoint's)), reading the file once."""
    if path.is_dir():
        state, model_cfg, info = consolidated_weights(path)
        return state, model_cfg, {"step": info.get("step")}
    if is_safetensors(path):
        state, model_cfg = load_weights(path)
        return state, model_cfg, {"step": checkpoint_info(path).get("step")}  # the header only
    obj = load_torch_file(path, trust=trust)
    state, model_cfg = weights_from_object(obj, path)
    facts = {k: obj[k] for k in ("global_step", "epoch") if isinstance(obj, dict) and isinstance(obj.get(k), int)}
    if isinstance(obj, dict) and isinstance(obj.get("info"), dict):
        facts["step"] = obj["info"].get("step")
    return state, model_cfg, facts


def read_reference(path: str | Path, trust: bool = False) -> tuple[Imported, dict[str, Any]]:
    """The converted reference file at ``path`` and the file's own facts (``global_step``...)."""
    path = Path(path)
    if not path.exists():
        raise ReferenceFormatError(f"reference checkpoint {path} does not exist")
    state, model_cfg, facts = _load(path, trust)
    stripped, _ = strip_prefixes(state)
    if model_cfg is not None or not looks_like_reference(stripped):
        raise ReferenceFormatError(f"{path} is not in the reference layout (no 'encoder_level1.norm1.body.weight' "
                                   "or 'patch_embed.proj.weight'); dyntrain's own files need no conversion")
    return from_reference(state, source=str(path)), facts


def read_weights(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """``(state_dict, model config dict)`` of any file the entry points accept: dyntrain's checkpoint
    folders and exports (as ``dyntrain.checkpoint.weights.load_weights``) or a reference-layout file,
    converted on the fly (its architecture read off its shapes)."""
    return _read(Path(path), trust)[:2]


def _read(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], dict[str, Any]]:
    """``read_weights`` plus the file's facts (``_load``)."""
    state, model_cfg, facts = _load(path, trust) if path.exists() else (*load_weights(path), {})
    if model_cfg is None and looks_like_reference(strip_prefixes(state)[0]):
        imported = from_reference(state, source=str(path))
        log.info(f"{path}: the authors' reference layout, converted ({imported.dropped_note()})")
        return imported.state_dict, imported.config.to_dict(), facts
    return state, model_cfg, facts


def import_reference(src: str | Path, out: str | Path, trust: bool = False) -> tuple[Path, Imported]:
    """Convert a reference file to dyntrain's weights file (``.safetensors`` or ``.pt``) carrying the
    model config, so every entry point takes it as one of dyntrain's own exports."""
    imported, facts = read_reference(src, trust=trust)
    differences = architecture_differences(imported.config)
    if differences:
        log.warning(f"{src}: not the architecture of the authors' release ({'; '.join(differences)}); "
                    "converted as the shapes say")
    info = {"source": "reference", "converted_from": os.path.basename(str(src)),
            "dropped_unused": sorted(imported.dropped), "step": facts.get("global_step")}
    path = save_weights(out, imported.state_dict, imported.config.to_dict(),
                        {k: v for k, v in info.items() if v is not None})
    return path, imported


def export_reference(src: str | Path, out: str | Path, form: Optional[str] = None) -> Path:
    """Write dyntrain weights (checkpoint folder or export) at ``src`` in the reference layout.

    ``form`` defaults by the output name: ``.ckpt`` is a Lightning checkpoint, anything else a bare
    state_dict."""
    out = Path(out)
    form = form or ("lightning" if out.suffix == ".ckpt" else "state_dict")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    state, model_cfg, facts = _read(Path(src), False)
    if model_cfg is None:
        raise ReferenceFormatError(f"{src} carries no model config; export it with launch/export.py first")
    config = dynet_config_from_dict(model_cfg, where=f"{src}: model")
    differences = architecture_differences(config)
    if differences:
        log.warning(f"{src}: the authors' code builds another architecture ({'; '.join(differences)}); "
                    "the names are theirs but their classes cannot load these shapes")
    reference = to_reference(state, config, source=str(src))
    step = int(facts.get("step") or facts.get("global_step") or 0)  # a plain state_dict records none
    write_reference(out, reference, form, step=step)
    return out


def write_reference(path: str | Path, reference: Mapping[str, torch.Tensor], form: str = "lightning",
                    step: int = 0) -> Path:
    """Write a reference-layout state_dict as a Lightning checkpoint or a bare state_dict, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in reference.items()}
    if form == "lightning":
        obj: Any = {"state_dict": {f"net.{k}": v for k, v in tensors.items()},
                    "pytorch-lightning_version": LIGHTNING_VERSION, "epoch": 0, "global_step": int(step)}
    else:
        obj = tensors
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

