"""Reading checkpoint files without running their code: ``torch.load(weights_only=True)`` with the
few Python objects a checkpoint written by dyntrain holds besides tensors.

Those are numpy's RNG state (an ``ndarray`` of ``uint32``, in every rank's saved state) and, in
DeepSpeed's optimizer files, its loss scaler, ZeRO stage enum and fragment addresses
(``SAFE_GLOBALS``). Anything else in a file (a pickled function, a class of another package) is
refused with one error naming the file and the object; ``trust=True`` (``--trust`` on the command
line) is the only way to unpickle such a file, for files you wrote or trust, because unpickling can
run arbitrary code.

``safe_load`` is every read of weights or checkpoint state in dyntrain. DeepSpeed's own
``engine.load_checkpoint`` calls ``torch.load(weights_only=False)`` itself; ``check_tag_files``
vets a tag folder's files first without unpickling them (``torch.serialization``'s scan of the
globals a file names), and the resume reads the model and optimizer files through ``safe_load``
too (``SafeCheckpointEngine``).
"""
from __future__ import annotations

import contextlib
import pickle
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dyntrain.checkpoint.layout import CheckpointError

try:
    from numpy._core.multiarray import _reconstruct  # numpy 2
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct


_NUMPY = ("numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType")
_DEEPSPEED = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
              "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
              "deepspeed.runtime.zero.config.ZeroStageEnum",
              "deepspeed.utils.tensor_fragment.fragment_address")
SAFE_GLOBALS = frozenset(("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
                         + _NUMPY + _DEEPSPEED)
TRUST_HINT = ("pass --trust only if you trust the file: unpickling a checkpoint can run any code "
              "written into it")


def _numpy_objects() -> list[Any]:
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _deepspeed_objects() -> list[Any]:
    """DeepSpeed's classes in its optimizer files (only where deepspeed is installed and loaded)."""
    if "deepspeed" not in sys.modules:
        return []
    # lazy: deepspeed is slow to import and unused by inference; imported already where it is used
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def allowed_globals() -> Iterator[None]:
    """``torch.load(weights_only=True)`` accepts ``SAFE_GLOBALS`` inside this block."""
    with torch.serialization.safe_globals(_numpy_objects() + _deepspeed_objects()):
        yield


def safe_load(path: str | Path, trust: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True`` and ``SAFE_GLOBALS``; ``trust`` unpickles
    (see the module docstring). Errors name the file."""
    path = Path(path)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with allowed_globals():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds Python objects beyond tensors and the few a checkpoint may hold "
                              f"({', '.join(unsafe_globals(path)) or _first_line(exc)}): refused without "
                              f"unpickling it; {TRUST_HINT}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch file: {_first_line(exc)}") from exc


def unsafe_globals(path: str | Path) -> list[str]:
    """The objects ``path`` would import when unpickled, beyond torch's and ``SAFE_GLOBALS`` (read
    from the pickle's opcodes: nothing is run)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - not a torch zip file: reported by the load itself
        return [f"unreadable: {_first_line(exc)}"]
    return sorted(set(found) - SAFE_GLOBALS)


def check_tag_files(tag_dir: Path) -> None:
    """Refuse a checkpoint tag folder one of whose ``.pt`` files (universal ones included) names an
    object beyond ``SAFE_GLOBALS``, before DeepSpeed unpickles it."""
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        bad = unsafe_globals(path)
        if bad:
            raise CheckpointError(f"{path} holds Python objects beyond tensors and the few a checkpoint may "
                                  f"hold ({', '.join(bad)}): not reading from it: a checkpoint written by "
                                  f"dyntrain holds none, and unpickling can run any code written into it")


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through ``safe_load`` (every other call passes
    through); ``CheckpointManager`` puts it on the engine for the time of a resume."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
