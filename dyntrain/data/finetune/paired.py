"""Paired (degraded, clean) data for all-in-one fine-tuning: the folder loader, the loader factory
and the command line (``python -m dyntrain.data.finetune.paired demo|pack``).

Task folders and pairing rules: ``dyntrain.data.finetune.base``.

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
by ``pack_paired_shards`` (``python -m dyntrain.data.finetune.paired pack --root DIR --out DIR_OR_S3``) through
DALI (both in ``dyntrain.data.finetune.paired_shards``). ``build_finetune_loader`` picks one of them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from dyntrain.config.plan import batch_plan
from dyntrain.data.finetune.base import (TASKS, PairedDataError, PairedLoaderBase, PairEntry, collate_pairs,
                                         mix, random_pair_crop, scan_tasks)
from dyntrain.data.finetune.curriculum_loader import CurriculumPairedLoader
from dyntrain.data.finetune.paired_shards import PairedShardLoader, pack_paired_shards
from dyntrain.data.finetune.synthetic_pairs import build_synthetic_loader
from dyntrain.data.finetune.tasks import task_curriculum
from dyntrain.data.synthetic import make_demo_data
from dyntrain.errors import ConfigError, cli_main
from dyntrain.images import read_image
from dyntrain.logs import get_logger, setup_logging


log = get_logger(__name__)


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
                inp = read_image(entry.input_path)
                tgt = inp if entry.target_path == entry.input_path else read_image(entry.target_path)
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


class _BatchPositions(torch.utils.data.Sampler):
    """Infinite batch sampler: [start*B, ..., start*B + B-1], then the next batch, ..."""

    def __init__(self, start_batch: int, batch_size: int) -> None:
        self.start_batch, self.batch_size = start_batch, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            yield list(range(b * self.batch_size, (b + 1) * self.batch_size))
            b += 1

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
            num_workers=self.num_workers, collate_fn=collate_pairs,
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
        if it is not None and self.num_workers > 0:  # a multi-process iterator: stop its workers now
            it._shutdown_workers()


# ------------------------------------------------------------------------------------ factory
def build_finetune_loader(cfg, rank: int, world_size: int, device) -> PairedLoaderBase:
    """The fine-tuning loader for ``cfg.data.source`` ("paired" folders or "paired_shards") for one data
    rank of ``world_size``, at the micro-batch and accumulation of the batch plan (``dyntrain.config.plan``)."""
    cfg = batch_plan(cfg, world_size).apply(cfg)
    data = cfg.data
    if data.source == "paired":
        per_task = scan_tasks(data.root, data.tasks, data.sigmas)
        curriculum = task_curriculum(cfg)
        if curriculum is not None:  # sequential: the curriculum draws each sample's task
            accum = cfg.gradient_accumulation(world_size)
            return CurriculumPairedLoader(per_task, curriculum, data.crop_size,
                                          data.micro_batch_size, cfg.run.seed, rank, world_size, accum, device)
        entries = mix(per_task, data.tasks)
        log.info("paired data: %s entries per epoch (%s)", len(entries),
                 ", ".join(f"{k} {len(v)} x{data.tasks[k]}" for k, v in per_task.items()))
        return PairedFolderLoader(entries, data.crop_size, data.micro_batch_size, cfg.run.seed, rank,
                                  world_size, device, num_workers=data.num_threads, prefetch=data.prefetch)
    if data.source == "paired_shards":
        return PairedShardLoader(cfg, rank, world_size, device)  # DALI is imported only when used
    if data.source == "synthetic":
        return build_synthetic_loader(cfg, rank, world_size, device)
    raise ConfigError(f"data.source: fine-tuning reads 'paired', 'paired_shards' or 'synthetic', got {data.source!r}")


# ----------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyntrain.data.finetune.paired",
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
    setup_logging(stream=sys.stderr)  # stdout holds the values to copy
    if args.command == "pack":
        manifest = pack_paired_shards(args.root, args.out, args.tasks, args.shard_samples)
        counts = ", ".join(f"{t} {v['samples']}" for t, v in manifest["tasks"].items())
        print(f"packed {counts} pairs; use data.source=paired_shards data.train_urls=[{args.out}]")
    elif args.command == "demo":
        sets = make_demo_data(args.out, args.train_images, args.test_images, args.height, args.width, args.seed)
        print(f"data.root={Path(args.out) / 'train'}")
        print("eval.sets=" + json.dumps(sets))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
