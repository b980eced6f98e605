"""Paired WebDataset shards for fine-tuning (``data.source: paired_shards``).

``pack_paired_shards`` (``python -m dyntrain.data.finetune.paired pack --root DIR --out DIR_OR_S3``) packs the
task folders of ``dyntrain.data.finetune.base`` into per-task shards with DALI indices and a manifest;
``PairedShardLoader`` reads them back through DALI as the same kind of stream as the folder loader
(paired crop, flip/rotation and denoising noise; exact resume from a DALI checkpoint).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dyntrain.data.finetune.base import TASKS, PairedDataError, PairedLoaderBase, PairEntry, scan_tasks
from dyntrain.data.pretrain.dali_torch import dali_to_torch
from dyntrain.data.pretrain.recovery import CorruptRecovery
from dyntrain.data.shards.samples import ShardSamples, share_size
from dyntrain.data.shards.wds import write_tar
from dyntrain.data.storage import retry, s3
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.storage.urls import index_url
from dyntrain.logs import get_logger
from dyntrain.progress import progress_bar
from dyntrain.seeds import mix_seed


log = get_logger(__name__)

PAIRED_MANIFEST = "manifest.json"
PAIRED_FORMAT = "dyntrain-paired-shards/1"
PAIRED_EXTS = ("png", "jpg")


def _encoded(path: str) -> tuple[bytes, str]:
    """The file's own bytes when it is a PNG/JPEG that decodes, else a PNG re-encoding; (bytes, ext)."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as img:
        fmt = img.format
        img.load()
        if fmt in ("PNG", "JPEG") and img.mode == "RGB":
            return raw, "png" if fmt == "PNG" else "jpg"
        rgb = img.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _pair_sample(key: str, entry: PairEntry, root: Path) -> tuple[str, tuple[tuple[str, bytes], ...]]:
    """One packed sample: ``input.<ext>``, ``target.<ext>`` and ``json`` components."""
    try:
        inp, inp_ext = _encoded(entry.input_path)
        same = entry.target_path == entry.input_path
        tgt, tgt_ext = (inp, inp_ext) if same else _encoded(entry.target_path)
    except OSError as exc:
        raise PairedDataError(f"pack: cannot read {entry.input_path} / {entry.target_path}: {exc}") from exc
    task = entry.task
    meta = {"task": task, "key": entry.key if task != "denoise" else entry.key.rsplit("/s", 1)[0],
            "input": _rel(entry.input_path, root), "target": _rel(entry.target_path, root)}
    return key, ((f"input.{inp_ext}", inp), (f"target.{tgt_ext}", tgt),
                 ("json", json.dumps(meta, sort_keys=True).encode()))


def pack_paired_shards(root: str | Path, out: str, tasks: Sequence[str] = TASKS, shard_samples: int = 500,
                       printer: Optional[Callable[[str], None]] = None,
                       progress: bool = True) -> dict[str, Any]:
    """Pack the task folders under ``root`` into paired WebDataset shards in ``out`` (folder or s3://).

    One sample per pair: ``<key>.input.png|jpg`` (degraded; for denoising the clean image — noise is
    added at training time), ``<key>.target.png|jpg`` (clean) and ``<key>.json`` (task, original key,
    source files). PNG/JPEG files are stored as they are (after checking they decode), other formats
    as PNG. Shards are per task (``<task>-000000.tar`` + DALI index ``.idx``), so the loader can apply
    ``data.tasks`` repetition by listing a task's shards several times; ``manifest.json`` (written
    last) lists the shards and counts. Repetition is not applied here.

    Progress is a bar on a terminal (``progress``); one summary line goes to ``printer`` (default:
    this module's log) at the end.
    """
    root = Path(root)
    per_task = scan_tasks(root, {t: 1 for t in tasks}, sigmas=[0])
    output = ShardOutput(out)
    manifest: dict[str, Any] = {"format": PAIRED_FORMAT, "root": str(root), "tasks": {}}
    with progress_bar(sum(len(e) for e in per_task.values()), "pack", "pair", progress) as bar:
        try:
            for task, entries in per_task.items():
                shards: list[dict[str, Any]] = []
                for start in range(0, len(entries), shard_samples):
                    samples = []
                    for n, entry in enumerate(entries[start:start + shard_samples], start):
                        samples.append(_pair_sample(f"{task}_{n:07d}", entry, root))
                        bar.update(1)
                    name = f"{task}-{start // shard_samples:06d}"
                    staged = output.staging(f"{name}.tar")
                    written = write_tar(staged, samples)
                    output.publish(staged, f"{name}.tar")
                    output.write_text(f"{name}.idx", written.index)
                    shards.append({"name": f"{name}.tar", "samples": len(samples), "bytes": written.size})
                manifest["tasks"][task] = {"samples": len(entries), "shards": shards}
            output.write_text(PAIRED_MANIFEST, json.dumps(manifest, indent=1))
        finally:
            output.close()
    counts = ", ".join(f"{t} {v['samples']} pairs in {len(v['shards'])} shards"
                       for t, v in manifest["tasks"].items())
    (printer or log.info)(f"pack: wrote {counts} to {output.url}")
    return manifest


def read_paired_manifest(base: str) -> dict[str, Any]:
    """The manifest.json of a packed paired-shard folder or s3:// prefix."""
    url = s3.join_url(base.rstrip("/"), PAIRED_MANIFEST) if s3.is_s3(base) else str(Path(base) / PAIRED_MANIFEST)
    try:
        text = s3.read_bytes(url).decode() if s3.is_s3(url) else Path(url).read_text()
    except (OSError, s3.DataSourceError) as exc:
        raise PairedDataError(f"paired shards: cannot read {url} ({exc}); pack the task folders first with "
                              f"python -m dyntrain.data.finetune.paired pack --root DIR --out {base}") from exc
    manifest = json.loads(text)
    if manifest.get("format") != PAIRED_FORMAT:
        raise PairedDataError(f"paired shards: {url} is not a {PAIRED_FORMAT} manifest")
    return manifest


def paired_shard_list(base: str, manifest: dict[str, Any], tasks: dict[str, int],
                      sigmas: Sequence[float], seed: int = 0) -> tuple[list[str], int]:
    """Shard URLs with each task's shards listed ``repetition`` times (denoising also once per sigma,
    matching the folder source's one entry per (image, sigma)), in an order shuffled by ``seed`` (the
    same on every rank) so that every rank's contiguous part of the list mixes the tasks; returns
    (urls, samples per epoch)."""
    urls: list[str] = []
    total = 0
    for task in TASKS:
        rep = int(tasks.get(task, 0)) * (len(sigmas) if task == "denoise" else 1)
        if rep <= 0:
            continue
        if task not in manifest["tasks"]:
            raise PairedDataError(f"data.tasks.{task}: the packed shards at {base} hold no {task} pairs "
                                  f"(packed: {sorted(manifest['tasks'])})")
        info = manifest["tasks"][task]
        names = [sh["name"] for sh in info["shards"]]
        join = (lambda n: s3.join_url(base.rstrip("/"), n)) if s3.is_s3(base) else (lambda n: str(Path(base) / n))
        urls += [join(n) for n in names] * rep
        total += info["samples"] * rep
    if not urls:
        raise PairedDataError(f"data.tasks: no task has a positive repetition factor ({tasks})")
    order = np.random.default_rng([seed, 0x5A4D]).permutation(len(urls))
    return [urls[i] for i in order], total


class PairedShardLoader(CorruptRecovery, PairedLoaderBase):
    """Fine-tuning loader over paired WebDataset shards (``data.source: paired_shards``): a DALI
    pipeline per rank reads (local or s3://) shards, decodes input and target (nvJPEG on a GPU),
    and cuts the same random crop from both; the flip/rotation and the denoising noise follow on the
    device in torch. ``data.train_urls[0]`` is the packed folder or s3:// prefix (its manifest lists
    the shards). Like the pre-training reader, a rank always reads the same share of the samples
    (``stick_to_shard``), shuffled through a buffer of ``data.shuffle_buffer``. The reader state is a
    DALI checkpoint, so resume is exact. A batch that fails is handled as in pre-training
    (``dyntrain.data.pretrain.recovery``): a transient storage error is retried for up to
    ``data.io_retry_s`` with nothing skipped; a pair whose input or target does not decode (a shard
    damaged after ``pack_paired_shards`` checked it) is left out, its slot filled with a copy of a
    good pair of the batch, counted in ``stats()["corrupt_skipped"]`` and named in ``corrupt_keys``.
    The pipeline is opened at the first batch and at the first after ``load_state_dict``; that open
    waits through an outage of the storage in the same way (``CorruptRecovery._reopen``).
    """

    kind = "paired_shards"

    def __init__(self, cfg, rank: int, world_size: int, device) -> None:
        data = cfg.data
        if len(data.train_urls) != 1:
            raise PairedDataError("data.train_urls: give exactly one packed paired-shard folder or s3:// prefix "
                                  f"for data.source=paired_shards, got {data.train_urls}")
        self.base = str(data.train_urls[0])
        self.io_retry_s = float(data.io_retry_s)
        retry.set_bound(self.io_retry_s)  # the S3 reads outside DALI (the manifest, single samples)
        self.manifest = read_paired_manifest(self.base)
        self.urls, total = paired_shard_list(self.base, self.manifest, data.tasks, data.sigmas,
                                               cfg.run.seed)
        self.index = [index_url(u) for u in self.urls]
        super().__init__(cfg.run.seed, rank, world_size, data.micro_batch_size, torch.device(device), total)
        self.crop, self.sigmas = data.crop_size, [float(s) for s in data.sigmas]
        self.num_threads, self.prefetch = max(1, data.num_threads), max(1, data.prefetch)
        self.shuffle_buffer, self.decode = data.shuffle_buffer, data.decode
        self.share = share_size(total, rank, world_size)  # DALI's split of the sample list
        if self.share < 1:
            raise PairedDataError(f"rank {rank}: no paired samples in its share ({total} for {world_size} ranks)")
        self._pipe = None
        self._ckpt: Optional[str] = None       # DALI checkpoint after the last batch handed out
        self.iteration = 0                      # DALI iterations consumed (>= batches)
        self.recoveries = self.io_retries = 0
        self.corrupt_keys: list[str] = []
        self._skip: dict[int, tuple[int, ...]] = {}  # iteration -> slots not to decode
        gpu = self.device.type == "cuda"
        self._samples = ShardSamples(True, (self.device.index or 0) if gpu else None,
                                     self._decode_device() == "mixed")

    def _callback(self, info) -> np.ndarray:
        skip = np.zeros(self.batch_size, dtype=bool)
        skip[list(self._skip.get(int(info.iteration), ()))] = True
        return skip

    def _sample_decodes(self, url: str, key: str) -> bool:
        return self._samples.decodes(url, key, ("input.", "target."))

    def _shard_names(self) -> str:
        return f"paired shards under {self.base}"

    def _rebuild(self, checkpoint: Optional[str]) -> None:
        self._pipe = None
        self._build(checkpoint)

    def _build(self, checkpoint: Optional[str]) -> None:
        # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        decode_device = self._decode_device()
        blank = np.zeros((self.crop, self.crop, 3), dtype=np.uint8)
        exts = ["input." + ";input.".join(PAIRED_EXTS + ("jpeg",)),
                "target." + ";target.".join(PAIRED_EXTS + ("jpeg",)), "json"]

        @pipeline_def(enable_checkpointing=True, enable_conditionals=True)
        def pipeline():
            inp, tgt, meta = fn.readers.webdataset(
                paths=self.urls, index_paths=self.index, ext=exts, shard_id=self.rank,
                num_shards=self.world_size, stick_to_shard=True, pad_last_batch=False,
                random_shuffle=self.shuffle_buffer > 0, initial_fill=max(1, self.shuffle_buffer),
                seed=mix_seed(self.seed, self.rank, 0x5A4D) & 0x7FFFFFFF,
                missing_component_behavior="error", name="paired_reader")
            skip = fn.external_source(source=self._callback, batch=True, batch_info=True, dtype=types.BOOL)
            pos_x = fn.random.uniform(range=[0.0, 1.0])
            pos_y = fn.random.uniform(range=[0.0, 1.0])  # one position for both images
            if skip:  # decoders switched off for this pair (corrupt-sample recovery)
                inp = fn.reshape(types.Constant(blank, device="gpu" if gpu else "cpu"), layout="HWC")
                tgt = fn.reshape(types.Constant(blank, device="gpu" if gpu else "cpu"), layout="HWC")
            else:
                inp = fn.crop(fn.decoders.image(inp, device=decode_device), crop=(self.crop, self.crop),
                              crop_pos_x=pos_x, crop_pos_y=pos_y, out_of_bounds_policy="pad")
                tgt = fn.crop(fn.decoders.image(tgt, device=decode_device), crop=(self.crop, self.crop),
                              crop_pos_x=pos_x, crop_pos_y=pos_y, out_of_bounds_policy="pad")
            return inp, tgt, meta

        device_id = (self.device.index or 0) if gpu else None
        pipe = pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                        seed=mix_seed(self.seed, self.rank, 0xDA11) & 0x7FFFFFFF,
                        prefetch_queue_depth=self.prefetch, checkpoint=checkpoint)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise DataSourceError(f"rank {self.rank}: DALI cannot open the paired shards under {self.base} "
                                  f"({len(set(self.urls))} shard(s), first {self.urls[0]}): {exc}") from exc
        self._pipe = pipe

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._pipe is None:  # the first build, or the rebuild after load_state_dict
                self._reopen(self._ckpt, self.urls[0])  # retried through an S3 outage (recovery)
            it = self.iteration
            (inp, tgt, meta), bad = self._run_batch(it)
            self.iteration += 1
            self._ckpt = self._pipe.checkpoint()
            self._skip.pop(it, None)
            metas = [json.loads(bytes(np.array(meta.at(i))).decode()) for i in range(len(meta))]
            if bad:
                names = [metas[i]["key"] for i in bad]
                self.corrupt_keys = (self.corrupt_keys + names)[-100:]
                log.warning("rank %d: skipped %d corrupt pair(s) in batch %d: %s", self.rank, len(bad), it,
                            ", ".join(names))
                if len(bad) == len(metas):
                    self.corrupt_skipped += len(bad)
                    continue  # nothing usable in this batch: take the next one
            return self._paired_batch(inp, tgt, metas, bad)

    def _paired_batch(self, inp, tgt, metas: list[dict], bad: tuple[int, ...]) -> dict[str, Any]:
        x, y = dali_to_torch(inp, self.device), dali_to_torch(tgt, self.device)  # (B, H, W, 3) uint8
        if bad:  # the slots of corrupt pairs get copies of good pairs of this batch
            good = [i for i in range(len(metas)) if i not in bad]
            order = [good[bad.index(i) % len(good)] if i in bad else i for i in range(len(metas))]
            x, y = x[torch.as_tensor(order)], y[torch.as_tensor(order)]
            metas = [metas[i] for i in order]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(mix_seed(self.seed, self.rank, self.batches, 0xF11))
        ops = torch.randint(0, 8, (len(metas),), generator=gen).tolist()
        pick = torch.randint(0, len(self.sigmas), (len(metas),), generator=gen).tolist()
        x = torch.stack([_dihedral_t(x[i], op) for i, op in enumerate(ops)]).permute(0, 3, 1, 2)
        y = torch.stack([_dihedral_t(y[i], op) for i, op in enumerate(ops)]).permute(0, 3, 1, 2)
        sigma = torch.tensor([self.sigmas[p] if m["task"] == "denoise" else 0.0 for m, p in zip(metas, pick)])
        keys = [m["key"] + (f"/s{self.sigmas[p]:g}" if m["task"] == "denoise" else "") for m, p in zip(metas, pick)]
        raw = {"input": x, "target": y, "sigma": sigma, "keys": keys, "tasks": [m["task"] for m in metas],
               "epoch": (self.iteration * self.batch_size - 1) // self.share, "skipped": len(bad)}
        return self._finish(raw)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dali_checkpoint"] = self._ckpt
        state.update(iteration=self.iteration, corrupt_keys=list(self.corrupt_keys))
        state["urls"] = len(self.urls)
        state["decode_device"] = self._decode_device()
        return state

    def _decode_device(self) -> str:
        return "mixed" if (self.device.type == "cuda" and self.decode in ("auto", "mixed")) else "cpu"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        for key, mine in (("urls", len(self.urls)), ("decode_device", self._decode_device())):
            if state.get(key) != mine:
                raise PairedDataError(f"paired shard loader state cannot be resumed exactly: {key} was "
                                      f"{state.get(key)!r}, now {mine!r} (rank {self.rank})")
        self.close()
        self._restore_counters(state)
        self._ckpt = state.get("dali_checkpoint")
        self.iteration = int(state.get("iteration", self.batches))
        self.corrupt_keys = list(state.get("corrupt_keys", []))
        self._skip.clear()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "corrupt_keys": list(self.corrupt_keys), "recoveries": self.recoveries,
                "io_retries": self.io_retries}

    def close(self) -> None:
        self._pipe = None
        self._samples.close()


def _dihedral_t(img: torch.Tensor, op: int) -> torch.Tensor:
    """``dihedral`` on an (H, W, C) tensor."""
    out = torch.rot90(img, k=op % 4, dims=(0, 1))
    return out.flip(1) if op >= 4 else out
