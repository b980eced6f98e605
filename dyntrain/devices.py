"""Which torch device a process runs on: the one rule behind ``run.device`` and every ``--device``.

``"auto"`` is CUDA when torch sees a GPU and the CPU otherwise; ``"cuda"`` without an index takes
``index`` (modulo the GPU count: a local rank) or the current CUDA device; anything else
(``"cpu"``, ``"cuda:1"``) is taken as written. Asking for CUDA on a machine without one is an error
naming the setting that asked.
"""
from __future__ import annotations

from typing import Optional

import torch


def choose_device(want: str = "auto", index: Optional[int] = None, *, setting: str = "--device",
                  error: type[BaseException] = ValueError) -> torch.device:
    """The device for ``want`` ("auto", "cpu", "cuda", "cuda:N").

    Args:
        want: the requested device.
        index: GPU for a bare "cuda" (taken modulo the GPU count, e.g. the local rank); None = the
            current CUDA device.
        setting: the option or config key that asked, for the error message.
        error: exception class raised when CUDA is asked for but absent (ConfigError, SystemExit...).
    """
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{setting}: '{want}' requested but torch sees no CUDA device")
        if want == "cuda":
            gpu = torch.cuda.current_device() if index is None else index % torch.cuda.device_count()
            return torch.device("cuda", gpu)
    return torch.device(want)
