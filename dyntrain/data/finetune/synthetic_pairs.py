"""``data.source: synthetic``: MiOIR fine-tuning pairs made on the fly from clean images.

    clean image (a folder of ``data.clean_urls``) -> random ``data.crop_size`` crop -> one task per
    sample (``dyntrain.data.finetune.tasks``) -> its degradation with parameters of ``data.preset`` ->
    (degraded, clean) on the training device

Two forms of ``data.clean_urls`` (``clean_form``): local folders of images (recursive; this module)
or pre-training shards - ``.tar`` paths, globs and braces, ``s3://`` URLs or a shard folder holding
``manifest.json`` - read through the DALI pre-training reader (``synthetic_shards``).

In the folder form, everything a sample gets is a pure function of (seed, step, global sample index): the image
(drawn with replacement), the crop position, the task and the degradation's parameters
(``degradations.draw_params`` keyed by (seed, step, rank, index)). The loader's state is therefore
its batch counter alone, and a resume is exact. Images smaller than the crop are skipped at start-up
and counted (``stats()["small_skipped"]``); haze samples without a depth map beside their image use
the depth proxy and are counted (``stats()["depth_proxy"]``, logged to MLflow by the trainer hook).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from dyntrain.config.plan import batch_plan
from dyntrain.data.finetune.degradations import TABLE, DegradationError, degrade, draw_params
from dyntrain.data.finetune.degradations.depth import clean_images, load_depth
from dyntrain.data.finetune.synthetic_shards import ShardCleanLoader
from dyntrain.data.finetune.tasks import task_curriculum
from dyntrain.data.loader import LoaderBase
from dyntrain.images import read_image
from dyntrain.logs import get_logger
from dyntrain.seeds import mix_seed


log = get_logger(__name__)


def clean_form(urls: list[str]) -> str:
    """"shards" when every entry of ``data.clean_urls`` names shards, "folders" when every one is a
    local folder of images; a mixture or an empty list is an error naming the entries."""
    if not urls:
        raise DegradationError("data.clean_urls: nothing given (data.source=synthetic needs clean "
                               "images: folders, or pre-training shards)")

    def is_shards(url: str) -> bool:
        return url.startswith("s3://") or url.endswith(".tar") or (Path(url) / "manifest.json").is_file()
    shards = [u for u in urls if is_shards(u)]
    if shards and len(shards) != len(urls):
        raise DegradationError(f"data.clean_urls: mixes shards {shards} with folders "
                               f"{[u for u in urls if u not in shards]}; give one form")
    return "shards" if shards else "folders"


def scan_clean(urls: list[str], crop: int) -> tuple[list[tuple[Path, Optional[Path]]], list[str]]:
    """(image, depth) of every clean image at least ``crop`` on each side, and the skipped names."""
    found, small = [], []
    for url in urls:
        if not Path(url).is_dir():
            raise DegradationError(f"data.clean_urls: {url} is not a local folder (nor shards: "
                                   "*.tar, s3://, or a folder with manifest.json)")
        for path, depth in clean_images(url):
            with Image.open(path) as img:
                width, height = img.size
            (found if min(width, height) >= crop else small).append((path, depth))
    if not found:
        raise DegradationError(f"data.clean_urls: no image of at least {crop}x{crop} under {urls} "
                               f"({len(small)} smaller ones skipped)")
    return found, [str(p) for p, _ in small]


class SyntheticPairLoader(LoaderBase):
    """Batches of {"input", "target", "keys", "tasks"} (float in [0, 1] on ``device``)."""

    kind = "synthetic"

    def __init__(self, images: list[tuple[Path, Optional[Path]]], curriculum, preset: str, crop: int,
                 batch_size: int, seed: int, rank: int, world_size: int, accum: int, device,
                 small_skipped: int = 0, cache_images: int = 256) -> None:
        self.images, self.curriculum, self.preset = images, curriculum, preset
        self.crop, self.batch_size, self.seed = crop, batch_size, seed
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.device = torch.device(device)
        self.batches = 0
        self.small_skipped, self.depth_proxy = small_skipped, 0
        self.task_counts = {t: 0 for t in TABLE}
        self._cache: dict[int, tuple[np.ndarray, Optional[np.ndarray]]] = {}
        self._cache_size = cache_images

    def __iter__(self) -> "SyntheticPairLoader":
        return self

    def _image(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if i not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            path, depth_path = self.images[i]
            img = read_image(path)
            depth = load_depth(depth_path, *img.shape[:2]) if depth_path else None
            self._cache[i] = (img, depth)
        return self._cache[i]

    def sample(self, step: int, index: int) -> tuple[str, str, np.ndarray, Optional[np.ndarray]]:
        """(key, task, clean crop (crop, crop, 3) uint8, depth crop or None) of global sample ``index``."""
        rng = np.random.default_rng(mix_seed(self.seed, step, index, 0x5C1))
        i = int(rng.integers(len(self.images)))
        img, depth = self._image(i)
        top = int(rng.integers(img.shape[0] - self.crop + 1))
        left = int(rng.integers(img.shape[1] - self.crop + 1))
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        key = f"{self.images[i][0].name}@{top},{left}"
        return key, self.curriculum.task_at(step, index), img[window], None if depth is None else depth[window]

    def __next__(self) -> dict[str, Any]:
        step, micro = divmod(self.batches, self.accum)
        first = (micro * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(step, first + i) for i in range(self.batch_size)]
        keys, tasks = [s[0] for s in samples], [s[1] for s in samples]
        clean = torch.from_numpy(np.stack([s[2] for s in samples])).to(self.device).permute(0, 3, 1, 2).float()
        depth = torch.full((len(samples), 1, self.crop, self.crop), float("nan"))
        for j, s in enumerate(samples):
            if s[3] is not None:
                depth[j, 0] = torch.from_numpy(s[3])
            elif s[1] == "haze":
                self.depth_proxy += 1
        params = draw_params(tasks, self.preset, self.seed, step, self.rank, first)
        lq = degrade(clean, tasks, params, depth.to(self.device))
        self.batches += 1
        for t in tasks:
            self.task_counts[t] += 1
        return {"input": lq.div_(255.0), "target": clean.div_(255.0), "keys": keys, "tasks": tasks}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "batches": self.batches, "depth_proxy": self.depth_proxy,
                "task_counts": dict(self.task_counts), "describe": self.describe()}

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "accum": self.accum, "images": len(self.images), "preset": self.preset,
                "curriculum": self.curriculum.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("describe") != self.describe():
            raise DegradationError(f"synthetic loader state cannot be resumed exactly (rank {self.rank}): "
                                   f"it was {state.get('describe')}, now {self.describe()}")
        self.batches, self.depth_proxy = int(state["batches"]), int(state["depth_proxy"])
        self.task_counts.update({t: int(n) for t, n in state["task_counts"].items()})

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batches": self.batches, "epoch": 0, "corrupt_skipped": 0,
                               "small_skipped": self.small_skipped, "depth_proxy": self.depth_proxy}
        out.update({f"samples_{t}": n for t, n in self.task_counts.items() if n})
        return out


def build_synthetic_loader(cfg, rank: int, world_size: int, device):
    """The ``data.source: synthetic`` loader of ``cfg`` for this data rank (folder or shards form), at
    the micro-batch and accumulation of the batch plan (``dyntrain.config.plan``)."""

    cfg = batch_plan(cfg, world_size).apply(cfg)
    data, urls = cfg.data, list(cfg.data.clean_urls)
    accum = cfg.gradient_accumulation(world_size)
    curriculum = task_curriculum(cfg)
    if clean_form(urls) == "shards":
        return ShardCleanLoader(urls, curriculum, data.preset, data.crop_size, data.micro_batch_size,
                                cfg.run.seed, rank, world_size, accum, device,
                                num_threads=data.num_threads, prefetch=data.prefetch,
                                shuffle_buffer=data.shuffle_buffer, decode=data.decode)
    images, small = scan_clean(urls, data.crop_size)
    if small and rank == 0:
        log.info(f"synthetic data: {len(small)} images smaller than {data.crop_size} px skipped "
                 f"(first: {small[0]})")
    return SyntheticPairLoader(images, curriculum, data.preset, data.crop_size, data.micro_batch_size,
                               cfg.run.seed, rank, world_size, accum, device, small_skipped=len(small))
