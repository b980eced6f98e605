"""The paired fine-tuning data's common ground: task folders -> (degraded, clean) entries, the
loaders' shared bookkeeping (``PairedLoaderBase``) and the augmentations both loaders apply.

Layouts under ``data.root`` (PromptIR's; sub-folders are searched recursively):

    Denoise/**/*.png|jpg            clean images (BSD400, WED ...); Gaussian noise at every sigma of
                                    ``data.sigmas`` is added on the fly and the result rounded to uint8
    Derain/rainy/**/X               rainy image X, paired with Derain/gt/X (same relative name), or
                                    Derain/gt/norainY when X is rainY (Rain100L's "rain-001.png" ->
                                    "norain-001.png"), or a gt file with X's stem and another extension
    Dehaze/synthetic/**/ID_A_B.jpg  hazy image (RESIDE/OTS: ID, atmospheric light, beta), paired with
                                    Dehaze/original/**/ID.* by the file-name rule "everything before
                                    the first underscore is the clean image's stem"

Every clean denoising image yields one entry per sigma (as PromptIR does); ``data.tasks`` gives each
task's repetition factor in the mixed stream (0 drops it; its folder then need not exist).
Image files are those of ``dyntrain.images.IMAGE_EXTS``.

The two loaders (``paired.PairedFolderLoader``, ``paired_shards.PairedShardLoader``) share
``PairedLoaderBase``: batch counter, denoising noise seeded by (seed, rank, batch), device
transfer, state and stats.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dyntrain.data.loader import LoaderBase
from dyntrain.errors import DyntrainError
from dyntrain.images import IMAGE_EXTS, list_images
from dyntrain.seeds import mix_seed


TASKS = ("denoise", "derain", "dehaze")


class PairedDataError(DyntrainError, ValueError):
    """A fine-tuning folder, file or pairing that is missing or inconsistent."""


# ------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class PairEntry:
    """One (degraded, clean) training pair. For denoising ``input_path == target_path`` (the clean
    image) and ``sigma`` (8-bit units) says how much Gaussian noise to add; other tasks have sigma 0."""
    task: str
    key: str
    input_path: str
    target_path: str
    sigma: float = 0.0


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PairedDataError(f"{what}: folder {path} does not exist")
    return path


def scan_denoise(root: Path, sigmas: Sequence[float]) -> list[PairEntry]:
    folder = _require_dir(root / "Denoise", "denoise task")
    images = list_images(folder)
    if not images:
        raise PairedDataError(f"denoise task: no images under {folder}")
    if not sigmas:
        raise PairedDataError("denoise task: data.sigmas is empty")
    out = []
    for path in images:
        stem = path.relative_to(folder).with_suffix("").as_posix()
        for sigma in sigmas:
            out.append(PairEntry("denoise", f"denoise/{stem}/s{sigma:g}", str(path), str(path), float(sigma)))
    return out


def derain_target(rainy: Path, rainy_dir: Path, gt_dir: Path) -> Path:
    """The clean image for a rainy one (rule in the module docstring); raises if there is none."""
    rel = rainy.relative_to(rainy_dir)
    candidates = [gt_dir / rel]
    if rel.name.startswith("rain"):
        candidates.append(gt_dir / rel.parent / ("no" + rel.name))
    candidates += [gt_dir / rel.with_suffix(ext) for ext in IMAGE_EXTS]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise PairedDataError(f"derain task: no clean image for {rainy} (looked for {candidates[0]}"
                          + (f" and {candidates[1]}" if len(candidates) > 1 else "") + ")")


def scan_derain(root: Path) -> list[PairEntry]:
    rainy_dir = _require_dir(root / "Derain" / "rainy", "derain task")
    gt_dir = _require_dir(root / "Derain" / "gt", "derain task")
    images = list_images(rainy_dir)
    if not images:
        raise PairedDataError(f"derain task: no images under {rainy_dir}")
    return [PairEntry("derain", f"derain/{p.relative_to(rainy_dir).with_suffix('').as_posix()}",
                      str(p), str(derain_target(p, rainy_dir, gt_dir))) for p in images]


def haze_clean_stem(name: str) -> str:
    """SOTS/RESIDE naming rule: "0001_0.8_0.2.jpg" -> "0001" (the text before the first underscore)."""
    return Path(name).stem.split("_", 1)[0]


def scan_dehaze(root: Path) -> list[PairEntry]:
    hazy_dir = _require_dir(root / "Dehaze" / "synthetic", "dehaze task")
    clean_dir = _require_dir(root / "Dehaze" / "original", "dehaze task")
    clean = {}
    for path in list_images(clean_dir):
        clean.setdefault(path.stem, path)
    images = list_images(hazy_dir)
    if not images:
        raise PairedDataError(f"dehaze task: no images under {hazy_dir}")
    out = []
    for path in images:
        stem = haze_clean_stem(path.name)
        if stem not in clean:
            raise PairedDataError(f"dehaze task: no clean image {clean_dir}/{stem}.* for hazy image {path}")
        key = f"dehaze/{path.relative_to(hazy_dir).with_suffix('').as_posix()}"
        out.append(PairEntry("dehaze", key, str(path), str(clean[stem])))
    return out


def scan_tasks(root: str | Path, tasks: dict[str, int], sigmas: Sequence[float]) -> dict[str, list[PairEntry]]:
    """Entries of every task with a positive repetition factor."""
    if root is None:
        raise PairedDataError("data.root is not set (the folder holding Denoise/, Derain/, Dehaze/)")
    root = Path(root)
    if not root.is_dir():
        raise PairedDataError(f"data.root: folder {root} does not exist")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise PairedDataError(f"data.tasks: unknown tasks {sorted(unknown)} (known: {list(TASKS)})")
    scanners = {"denoise": lambda: scan_denoise(root, sigmas), "derain": lambda: scan_derain(root),
                "dehaze": lambda: scan_dehaze(root)}
    out = {name: scanners[name]() for name in TASKS if tasks.get(name, 0) > 0}
    if not out:
        raise PairedDataError(f"data.tasks: no task has a positive repetition factor ({tasks})")
    return out


def mix(per_task: dict[str, list[PairEntry]], tasks: dict[str, int]) -> list[PairEntry]:
    """One epoch's entries: each task's list repeated by its factor, tasks in TASKS order."""
    out: list[PairEntry] = []
    for name in TASKS:
        out += per_task.get(name, []) * int(tasks.get(name, 0))
    return out

# ------------------------------------------------------------------------------- augmentation
def dihedral(img: np.ndarray, op: int) -> np.ndarray:
    """One of the 8 symmetries of the square on an (H, W, C) array: rotate by op % 4 quarter turns,
    then flip left-right when op >= 4."""
    out = np.rot90(img, k=op % 4, axes=(0, 1))
    if op >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def add_noise_uint8(x: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of per-sample ``sigma`` (8-bit units, shape (B,)) added to uint8-valued images
    ``x`` (float, (B, C, H, W) in 0..255), rounded and clipped back to 0..255 (a saved noisy image)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    noisy = (x + noise * sigma.to(x.device, torch.float32).view(-1, 1, 1, 1)).round_().clamp_(0, 255)
    return torch.where(sigma.to(x.device).view(-1, 1, 1, 1) > 0, noisy, x)


# --------------------------------------------------------------------------------- loader base
class PairedLoaderBase(LoaderBase):
    """Shared bookkeeping of the fine-tuning loaders: batch counter, noise, device transfer, stats."""

    kind = "paired"

    def __init__(self, seed: int, rank: int, world_size: int, batch_size: int, device: torch.device,
                 num_entries: int) -> None:
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.device = batch_size, torch.device(device)
        self.num_entries = num_entries
        self.batches = 0  # batches handed out so far
        self.samples = 0
        self.corrupt_skipped = 0
        self.epoch = 0
        self.task_counts = {name: 0 for name in TASKS}

    def __iter__(self) -> "PairedLoaderBase":
        return self

    def _finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        """uint8 crops on the host -> float batches in [0, 1] on the device, noise added."""
        non_blocking = self.device.type == "cuda"
        inp = raw["input"].to(self.device, non_blocking=non_blocking).float()
        tgt = raw["target"].to(self.device, non_blocking=non_blocking).float()
        sigma = raw["sigma"]
        if bool((sigma > 0).any()):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(mix_seed(self.seed, self.rank, self.batches, 0x401))
            inp = add_noise_uint8(inp, sigma, gen)
        self.batches += 1
        self.samples += len(raw["keys"])
        self.corrupt_skipped += int(raw.get("skipped", 0))
        self.epoch = max(self.epoch, int(raw.get("epoch", 0)))
        for task in raw["tasks"]:
            self.task_counts[task] += 1
        return {"input": inp.div_(255.0), "target": tgt.div_(255.0), "keys": list(raw["keys"]),
                "tasks": list(raw["tasks"])}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "batches": self.batches, "samples": self.samples,
                "corrupt_skipped": self.corrupt_skipped, "epoch": self.epoch,
                "task_counts": dict(self.task_counts), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "num_entries": self.num_entries}

    def _check_state(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "world_size", "batch_size", "num_entries"):
            if state.get(key) != mine[key]:
                raise PairedDataError(
                    f"paired loader state cannot be resumed exactly: {key} was {state.get(key)!r}, "
                    f"now {mine[key]!r} (rank {self.rank})")

    def _restore_counters(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self.samples = int(state["samples"])
        self.corrupt_skipped = int(state["corrupt_skipped"])
        self.epoch = int(state["epoch"])
        self.task_counts = {name: int(state["task_counts"].get(name, 0)) for name in TASKS}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "corrupt_skipped": self.corrupt_skipped,
                               "epoch": self.epoch, "batches": self.batches}
        out.update({f"samples_{name}": n for name, n in self.task_counts.items()})
        return out


# --------------------------------------------------------------------------------- crop
def random_pair_crop(inp: np.ndarray, tgt: np.ndarray, size: int, rng: np.random.Generator,
                     what: str = "pair") -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` x ``size`` crop of two (H, W, 3) images, then the same one of the
    8 flips/rotations. Images smaller than ``size`` are reflect-padded (bottom/right) first."""
    if inp.shape != tgt.shape:
        raise PairedDataError(f"{what}: input and target differ in size: {inp.shape} vs {tgt.shape}")
    height, width = inp.shape[:2]
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "symmetric"
        inp = np.pad(inp, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
        tgt = np.pad(tgt, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
        height, width = inp.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    op = int(rng.integers(0, 8))
    return (dihedral(inp[top:top + size, left:left + size], op),
            dihedral(tgt[top:top + size, left:left + size], op))


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch dict from per-pair items (the paired loaders' collate function)."""
    return {"input": torch.stack([it["input"] for it in items]),
            "target": torch.stack([it["target"] for it in items]),
            "sigma": torch.tensor([it["sigma"] for it in items], dtype=torch.float32),
            "keys": [it["key"] for it in items], "tasks": [it["task"] for it in items],
            "epoch": max(it["epoch"] for it in items), "skipped": sum(it["skipped"] for it in items)}
