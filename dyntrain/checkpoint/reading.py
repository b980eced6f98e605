"""Reading a checkpoint without an engine: which tag folder a path means, and its client state.

Exporting the weights of a checkpoint (consolidated fp32, ``.pt`` or ``.safetensors``) and loading
them back is ``dyntrain.checkpoint.weights``.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Optional

from dyntrain.checkpoint.layout import STATE_KEY, CheckpointError, list_checkpoints, newest_complete
from dyntrain.checkpoint.unpickle import safe_load


def resolve_tag_dir(path: str | Path, tag: Optional[str] = None) -> Path:
    """The tag folder meant by ``path``: a tag folder itself, or a checkpoint directory (then
    ``tag``, or its newest complete tag)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    if tag is not None:
        path = path / tag
        if not path.is_dir():
            raise CheckpointError(f"checkpoint tag folder {path} does not exist")
    if glob.glob(str(path / "*_model_states.pt")):
        return path
    info = newest_complete(path)
    if info is None:
        found = [i.tag for i in list_checkpoints(path)]
        raise CheckpointError(f"{path} holds no complete checkpoint (tags found: {found or 'none'})")
    return info.path


def model_states_file(tag_dir: Path) -> Path:
    """The DeepSpeed ``*_model_states.pt`` file of a tag folder (weights and client state)."""
    files = sorted(glob.glob(str(tag_dir / "mp_rank_*_model_states.pt")))
    files = files or sorted(glob.glob(str(tag_dir / "zero_pp_rank_0_mp_rank_*_model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed *_model_states.pt file")
    return Path(files[0])


def read_client_state(path: str | Path, tag: Optional[str] = None) -> dict[str, Any]:
    """The dyntrain client state of a checkpoint (step, world size, client dict, rank states)
    without building an engine."""
    tag_dir = resolve_tag_dir(path, tag)
    sd = safe_load(model_states_file(tag_dir))
    ours = sd.get(STATE_KEY)
    if ours is None:
        raise CheckpointError(f"{tag_dir} holds no dyntrain client state")
    return ours
