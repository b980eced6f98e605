"""MiO test sets: every clean image degraded by every task at the In-Dis and/or Out-Dis setting.

Layout written by ``launch/make_testsets.py`` and read by the evaluation (``eval.sets: {mio: DIR}``):

    DIR/<preset>/<task>/lq/<name>.png    degraded image (preset "in" or "out")
    DIR/<preset>/<task>/gt/<name>.png    the clean image
    DIR/manifest.json                    seed, presets, tasks, every image's parameters and whether
                                         haze used a depth map or the proxy

The parameters of image ``name`` are a pure function of (seed, crc32(name), task, preset), so the
same inputs and seed give the same images on any machine and adding images changes no other image.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dyntrain.data.finetune.degradations import PRESETS, TABLE, DegradationError, check_tasks, degrade
from dyntrain.data.finetune.degradations.depth import clean_images, load_depth
from dyntrain.data.finetune.degradations.registry import check_preset, sample_params
from dyntrain.images import read_image
from dyntrain.logs import get_logger


log = get_logger(__name__)


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")


def make_testsets(src: str | Path, out: str | Path, presets: Sequence[str] = PRESETS,
                  tasks: Optional[Sequence[str]] = None, seed: int = 0) -> dict:
    """Write the MiO test sets of the clean images under ``src`` into ``out``; returns the manifest."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DegradationError(f"--src: folder {src} does not exist")
    tasks = check_tasks(list(tasks or TABLE), "--tasks")
    presets = [check_preset(p, "--preset") for p in presets]
    images = clean_images(src)
    if not images:
        raise DegradationError(f"--src: no images under {src}")
    entries, proxy = [], 0
    for path, depth_path in images:
        name = path.relative_to(src).with_suffix("").as_posix()
        clean = read_image(path)
        x = torch.from_numpy(clean.copy()).permute(2, 0, 1).unsqueeze(0).float()
        depth = None
        if depth_path is not None:
            depth = torch.from_numpy(load_depth(depth_path, *clean.shape[:2]))[None, None]
        for preset in presets:
            for task in tasks:
                params = sample_params(task, preset, seed, zlib.crc32(name.encode()))
                lq = degrade(x, [task], [params], depth)[0].permute(1, 2, 0).to(torch.uint8).numpy()
                _png(out / preset / task / "lq" / f"{name}.png", lq)
                _png(out / preset / task / "gt" / f"{name}.png", clean)
                used = "file" if depth_path is not None else "proxy"
                proxy += int(TABLE[task].uses_depth and depth_path is None)
                entries.append({"preset": preset, "task": task, "name": name, "params": params,
                                **({"depth": used} if TABLE[task].uses_depth else {})})
    manifest = {"seed": seed, "presets": presets, "tasks": tasks, "clean_images": len(images),
                "depth_proxy": proxy, "images": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info(f"MiO test sets: {len(images)} clean images x {len(tasks)} tasks x {len(presets)} presets "
             f"-> {out} ({proxy} haze images used the depth proxy)")
    return manifest


def mio_task(preset: str, task: str) -> str:
    """The evaluation's task name for a MiO set: ``mio_<preset>_<task>``."""
    return f"mio_{preset}_{task}"


def mio_folders(folder: Path) -> list[tuple[str, str, Path]]:
    """(preset, task, folder) of every MiO set under ``folder``, in preset then table order; raises
    naming the folder for an unknown preset or task."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        check_preset(sub.name, f"eval.sets.mio: {sub}")
        for task_dir in sorted(p for p in sub.iterdir() if p.is_dir()):
            check_tasks([task_dir.name], f"eval.sets.mio: {task_dir}")
    for preset in PRESETS:
        for task in TABLE:
            if (folder / preset / task / "lq").is_dir():
                found.append((preset, task, folder / preset / task))
    return found
