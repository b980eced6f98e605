"""Paired (degraded, clean) data for all-in-one fine-tuning: denoising, deraining, dehazing.

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

Each sample gets one random crop of ``data.crop_size`` (at the same place in input and target) and one
of the 8 flips/rotations of the square, applied to both images. Images smaller than the crop are
reflect-padded first.

Determinism: epoch e's order is a permutation seeded by (seed, e); rank r of w reads every w-th
entry of it (the tail that does not divide evenly is dropped), and a rank's stream is its epochs back
to back, cut into batches. A sample's crop/flip is seeded by (seed, e, position in the permutation)
and the denoising noise of batch b by (seed, rank, b), so a loader restored with ``load_state_dict``
produces exactly the batches an uninterrupted run would have.

Two sources serve the same stream: ``data.source: paired`` reads the folders with a torch DataLoader
(``PairedFolderLoader``, here), ``data.source: paired_shards`` reads paired WebDataset shards written
by ``pack_paired_shards`` (``python -m dyntrain.data.paired pack --root DIR --out DIR_OR_S3``) through
DALI (both in ``dyntrain.data.paired_shards``). ``build_finetune_loader`` picks one of them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

TASKS = ("denoise", "derain", "dehaze")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class PairedDataError(ValueError):
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


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


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


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence does the mixing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               & np.uint64(0x7FFFFFFFFFFFFFFF))


# -------------------------------------------------------------------------------- the stream
class RankStream:
    """Which entry, and with which augmentation seed, sits at position p of one rank's stream."""

    def __init__(self, num_entries: int, seed: int, rank: int, world_size: int) -> None:
        if num_entries < world_size:
            raise PairedDataError(f"paired data: {num_entries} entries cannot feed {world_size} ranks")
        self.num_entries, self.seed, self.rank, self.world_size = num_entries, seed, rank, world_size
        self.per_rank = num_entries // world_size
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_entries)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, slot in the epoch's permutation, entry index) of stream position ``position``."""
        epoch, j = divmod(position, self.per_rank)
        slot = self.rank + j * self.world_size
        return epoch, slot, int(self.permutation(epoch)[slot])


def _load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class _FolderDataset(torch.utils.data.Dataset):
    """Map-style view of one rank's infinite stream: index = stream position."""

    max_substitutes = 16

    def __init__(self, entries: list[PairEntry], crop: int, stream: RankStream) -> None:
        self.entries, self.crop, self.stream = entries, crop, stream

    def __len__(self) -> int:  # nominal; the batch sampler decides what is read
        return self.stream.per_rank

    def __getitem__(self, position: int) -> dict[str, Any]:
        epoch, slot, index = self.stream.locate(position)
        skipped = 0
        # A file that cannot be read is counted and replaced, deterministically, by the next entry
        # of the epoch's permutation.
        while True:
            entry = self.entries[index]
            try:
                inp = _load_rgb(entry.input_path)
                tgt = inp if entry.target_path == entry.input_path else _load_rgb(entry.target_path)
                break
            except (OSError, ValueError) as exc:
                skipped += 1
                log.warning("paired data: skipping unreadable pair %s (%s): %s", entry.key,
                            entry.input_path, exc)
                if skipped > self.max_substitutes:
                    raise PairedDataError(f"paired data: {skipped} unreadable files in a row, last "
                                          f"{entry.input_path}") from exc
                index = int(self.stream.permutation(epoch)[(slot + skipped) % self.stream.num_entries])
        rng = np.random.default_rng([self.stream.seed, epoch, slot, 0xC80])
        inp, tgt = random_pair_crop(inp, tgt, self.crop, rng, what=entry.key)
        return {"input": torch.from_numpy(inp).permute(2, 0, 1), "target": torch.from_numpy(tgt).permute(2, 0, 1),
                "sigma": entry.sigma, "key": entry.key, "task": entry.task, "epoch": epoch,
                "skipped": skipped}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"input": torch.stack([it["input"] for it in items]),
            "target": torch.stack([it["target"] for it in items]),
            "sigma": torch.tensor([it["sigma"] for it in items], dtype=torch.float32),
            "keys": [it["key"] for it in items], "tasks": [it["task"] for it in items],
            "epoch": max(it["epoch"] for it in items), "skipped": sum(it["skipped"] for it in items)}


class _BatchPositions(torch.utils.data.Sampler):
    """Infinite batch sampler: [start*B, ..., start*B + B-1], then the next batch, ..."""

    def __init__(self, start_batch: int, batch_size: int) -> None:
        self.start_batch, self.batch_size = start_batch, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            yield list(range(b * self.batch_size, (b + 1) * self.batch_size))
            b += 1


class PairedLoaderBase:
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


class PairedFolderLoader(PairedLoaderBase):
    """Fine-tuning loader over the task folders (torch DataLoader, ``data.num_threads`` workers)."""

    kind = "paired_folders"

    def __init__(self, entries: list[PairEntry], crop_size: int, batch_size: int, seed: int, rank: int,
                 world_size: int, device: torch.device | str = "cpu", num_workers: int = 0,
                 prefetch: int = 2) -> None:
        super().__init__(seed, rank, world_size, batch_size, torch.device(device), len(entries))
        self.stream = RankStream(len(entries), seed, rank, world_size)
        self.dataset = _FolderDataset(entries, crop_size, self.stream)
        self.num_workers, self.prefetch = num_workers, prefetch
        self._iter: Optional[Iterator] = None

    def _start(self) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchPositions(self.batches, self.batch_size),
            num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if self.num_workers > 0 else None,
            persistent_workers=False)
        self._iter = iter(loader)

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        assert self._iter is not None
        return self._finish(next(self._iter))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.close()
        self._restore_counters(state)

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


# ------------------------------------------------------------------------------------ factory
def build_finetune_loader(cfg, rank: int, world_size: int, device) -> PairedLoaderBase:
    """The fine-tuning loader for ``cfg.data.source`` ("paired" folders or "paired_shards")."""
    data = cfg.data
    if data.source == "paired":
        per_task = scan_tasks(data.root, data.tasks, data.sigmas)
        entries = mix(per_task, data.tasks)
        log.info("paired data: %s entries per epoch (%s)", len(entries),
                 ", ".join(f"{k} {len(v)} x{data.tasks[k]}" for k, v in per_task.items()))
        return PairedFolderLoader(entries, data.crop_size, data.micro_batch_size, cfg.run.seed, rank,
                                  world_size, device, num_workers=data.num_threads, prefetch=data.prefetch)
    if data.source == "paired_shards":
        from .paired_shards import PairedShardLoader

        return PairedShardLoader(cfg, rank, world_size, device)  # DALI is imported only when used
    from ..config import ConfigError
    raise ConfigError(f"data.source: fine-tuning reads 'paired' or 'paired_shards', got {data.source!r}")


# ------------------------------------------------------------------------------ demo data
def synthetic_rain(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bright slanted streaks (3-8 pixels long) over a clean uint8 image."""
    height, width = clean.shape[:2]
    n = max(4, height * width // 60)
    y, x = rng.integers(0, height, n)[:, None], rng.integers(0, width, n)[:, None]
    length = rng.integers(3, 9, n)[:, None]
    t = np.arange(8)[None, :]
    yy, xx = y + t, x + t // 3  # (n, 8) streak pixels
    keep = (t < length) & (yy < height) & (xx < width)
    streaks = np.zeros((height, width), np.float32)
    streaks[yy[keep], xx[keep]] = 0.5
    out = clean.astype(np.float32) / 255 + streaks[..., None]
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def synthetic_haze(clean: np.ndarray, airlight: float, beta: float) -> np.ndarray:
    """Atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d), depth growing upwards."""
    height, width = clean.shape[:2]
    depth = np.linspace(3.0, 0.5, height, dtype=np.float32)[:, None, None] * np.ones((1, width, 1), np.float32)
    t = np.exp(-beta * depth)
    out = clean.astype(np.float32) / 255 * t + airlight * (1 - t)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(img).save(path)


def make_demo_data(out: str | Path, train_images: int = 6, test_images: int = 3, height: int = 48,
                   width: int = 40, seed: int = 0) -> dict[str, str]:
    """Write small synthetic data in every layout: ``out/train`` (Denoise/, Derain/, Dehaze/ as
    ``data.root``) and ``out/test/{bsd68,rain100l,sots}`` (as ``eval.sets``). Returns the eval.sets map.
    Only for trying the pipeline end to end; it says nothing about real restoration quality."""
    from .synthetic import synthetic_image

    out = Path(out)
    rng = np.random.default_rng(seed)
    train, test = out / "train", out / "test"
    for i in range(train_images):
        n = f"{i + 1:04d}"
        _save(synthetic_image(rng, height, width), train / "Denoise" / f"{n}.png")
        clean = synthetic_image(rng, height, width)
        _save(clean, train / "Derain" / "gt" / f"norain-{i + 1}.png")
        _save(synthetic_rain(clean, rng), train / "Derain" / "rainy" / f"rain-{i + 1}.png")
        clean = synthetic_image(rng, height, width)
        _save(clean, train / "Dehaze" / "original" / f"{n}.jpg")
        for airlight, beta in ((0.8, 0.2), (0.9, 0.6)):
            _save(synthetic_haze(clean, airlight, beta), train / "Dehaze" / "synthetic" / "part1" / f"{n}_{airlight}_{beta}.jpg")
    for i in range(test_images):
        n = f"{i + 1:04d}"
        _save(synthetic_image(rng, height + 8, width + 8), test / "bsd68" / f"test{i + 1:03d}.png")
        clean = synthetic_image(rng, height + 8, width + 8)
        _save(clean, test / "rain100l" / "target" / f"{n}.png")
        _save(synthetic_rain(clean, rng), test / "rain100l" / "input" / f"{n}.png")
        clean = synthetic_image(rng, height + 8, width + 8)
        _save(clean, test / "sots" / "outdoor" / "gt" / f"{n}.png")
        _save(synthetic_haze(clean, 0.8, 0.4), test / "sots" / "outdoor" / "hazy" / f"{n}_0.8_0.4.jpg")
    return {name: str(test / name) for name in ("bsd68", "rain100l", "sots")}


# ----------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyntrain.data.paired",
                                     description="Paired fine-tuning data: generate demo data, pack shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write small generated data in every layout (train + test sets)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--train-images", type=int, default=12)
    demo.add_argument("--test-images", type=int, default=4)
    demo.add_argument("--height", type=int, default=64)
    demo.add_argument("--width", type=int, default=56)
    demo.add_argument("--seed", type=int, default=0)
    pk = sub.add_parser("pack", help="pack the task folders into paired WebDataset shards")
    pk.add_argument("--root", required=True, help="folder holding Denoise/, Derain/, Dehaze/")
    pk.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    pk.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    pk.add_argument("--shard-samples", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "pack":
        from .paired_shards import pack_paired_shards

        manifest = pack_paired_shards(args.root, args.out, args.tasks, args.shard_samples)
        counts = ", ".join(f"{t} {v['samples']}" for t, v in manifest["tasks"].items())
        print(f"packed {counts} pairs; use data.source=paired_shards data.train_urls=[{args.out}]")
    elif args.command == "demo":
        sets = make_demo_data(args.out, args.train_images, args.test_images, args.height, args.width, args.seed)
        print(f"data.root={Path(args.out) / 'train'}")
        print("eval.sets=" + json.dumps(sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
