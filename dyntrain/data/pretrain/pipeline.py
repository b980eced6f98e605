"""The DALI pre-training loader: WebDataset shards (local or s3://) -> (degraded+masked input, clean
target) crops on the training device.

Per rank, one DALI pipeline:

    fn.readers.webdataset   shard_id = rank, num_shards = world size (or the rank's window of shards as
                            one reader: window.py), stick_to_shard, random_shuffle with a buffer of
                            data.shuffle_buffer samples seeded by (run.seed, rank), pad_last_batch = False
    fn.decoders.image_crop  "mixed" (nvJPEG) when the training device is a GPU, "cpu" otherwise
                            (same code); decodes only the random data.crop_size window
    degradation             per sample, by its kind (a DALI conditional): jpeg_compression_distortion,
                            noise.gaussian or noise.salt_and_pepper at the sample's level; kinds and
                            levels come from an external source, a pure function of (run.seed,
                            rank, batch index)

and then, on the training device, ``dyntrain.data.pretrain.degrade.compose`` picks the degraded and masked
block regions (vectorised torch, seeded by (run.seed, rank, batch index)) and blends.

Batches are dicts (the loader contract): ``input`` and ``target`` float32 (B, 3, S, S) in [0, 1],
``mask`` float32 (B, 1, S, S) = 1 where the input was altered, ``keys`` the B sample keys.

Epochs. The stream is infinite: when a rank's reader reaches the end of its share it starts the
share again (``stick_to_shard=True``: a rank always reads the same 1/world_size of the samples, so
ranks never see the same sample) and keeps filling the current batch from the next epoch -
batches always hold ``micro_batch_size`` samples, nothing is padded or dropped, an epoch boundary
may fall inside a batch. ``stats()["epoch"]`` is samples read by this rank // its share.

Exact resume. ``state_dict()`` holds the DALI checkpoint taken after the last batch handed out
(reader position, shuffle buffer, the RNG of the crop windows) and the batch counter; the degradation
is a pure function of the batch counter, so ``load_state_dict`` reproduces the next batches exactly.

A batch that fails: see ``recovery`` (a transient storage error is retried for up to ``io_retry_s``
with nothing skipped; a corrupt image is left out, counted and named).

Hooks for loaders built on this reader (``synthetic_shards``): ``_params`` / ``_param_types`` (the
per-sample external-source arrays), ``_degrade_graph`` (the DALI degradation) and ``_emit`` (the
batch from the uint8 crops and their DALI degradation).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from dyntrain.config.plan import batch_plan
from dyntrain.data.loader import LoaderBase
from dyntrain.data.pretrain.dali_torch import dali_to_torch
from dyntrain.data.pretrain.degrade import DegradeSpec, batch_params, compose
from dyntrain.data.pretrain.recovery import CorruptRecovery
from dyntrain.data.pretrain.window import read_ahead, resolve_shards
from dyntrain.data.shards.samples import (IMAGE_COMPONENTS, ShardSamples, parse_source_info, share_size,
                                          short_error)
from dyntrain.data.storage import retry
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.errors import ConfigError
from dyntrain.logs import get_logger
from dyntrain.seeds import seed32


log = get_logger(__name__)

READER = "Reader"


class DaliPretrainLoader(CorruptRecovery, LoaderBase):
    """Infinite iterator of pre-training batches for one rank (see the module docstring)."""

    kind = "dali_pretrain"

    def __init__(self, urls: Sequence[str] | str, spec: DegradeSpec, batch_size: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 seed: int = 0, num_threads: int = 4, prefetch: int = 2,
                 shuffle_buffer: int = 1024, decode: str = "auto", io_retry_s: float = 180.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.spec, self.batch_size = spec, int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.device = torch.device(device)
        self.num_threads, self.prefetch = max(1, int(num_threads)), max(1, int(prefetch))
        self.shuffle_buffer, self.io_retry_s = int(shuffle_buffer), float(io_retry_s)
        if decode == "auto":
            decode = "mixed" if self.device.type == "cuda" else "cpu"
        if decode == "mixed" and not torch.cuda.is_available():
            raise DataSourceError("data.decode=mixed needs a CUDA GPU; none is visible "
                                  "(use decode: auto or cpu)")
        if decode not in ("mixed", "cpu"):
            raise ValueError(f"decode must be auto, mixed or cpu, got {decode!r}")
        self.decode = decode
        self.device_id: Optional[int] = None
        if decode == "mixed":
            self.device_id = self.device.index if self.device.type == "cuda" and \
                self.device.index is not None else torch.cuda.current_device()

        # many shards under a manifest: a window of real shards ahead of the reader (window.py)
        ahead = read_ahead(self.shuffle_buffer, self.prefetch, self.batch_size)
        self._window, self.shards, self.indices = resolve_shards(urls, rank, world_size, ahead, self.batch_size)

        self.iteration = 0        # DALI iterations consumed (the degradation's batch index)
        self.batches = 0          # batches handed out
        self.samples = 0
        self.corrupt_skipped = 0
        self.corrupt_keys: list[str] = []
        self.recoveries = 0
        self.io_retries = 0       # batch replays after a transient storage error (recovery)
        self._skip: dict[int, tuple[int, ...]] = {}   # iteration -> slots not to decode
        self._samples = ShardSamples(self.indices is not None, self.device_id, decode == "mixed")
        self._check_patch_size()
        window = self._window  # DALI sees only its window: the split is the manifest's, not DALI's count
        if window is None:
            self._reopen(None, self.shards[0])  # retried through an S3 outage (recovery)
        self.total_samples = window.total if window else int(self._pipe.reader_meta(READER)["epoch_size"])
        self.share = share_size(self.total_samples, self.rank, self.world_size)
        if self.share < 1:
            raise DataSourceError(f"rank {rank}: no samples in its share ({self.total_samples} "
                                  f"samples in {len(self.shards)} shards for {world_size} ranks)")
        if window is not None:
            self._reopen(None, self.shards[0])
        self._ckpt = self._pipe.checkpoint()

    def _check_patch_size(self) -> None:
        """The crop must fit in the stored patches (DALI's ROI decoder cannot pad): look at the
        first sample of the first shard (one small read)."""
        if self.indices is None:
            return
        url = self.shards[0]
        first = self._samples.first_image_size(url)
        if first is not None and min(first[1:]) < self.spec.crop_size:
            key, w, h = first
            raise DataSourceError(
                f"{url}: sample {key} is {w}x{h}, smaller than data.crop_size "
                f"{self.spec.crop_size}; build the shards with a larger --patch-size or lower "
                f"data.crop_size")

    # ------------------------------------------------------------------------------ pipeline
    def _callback(self, info) -> tuple[np.ndarray, ...]:
        """External source, per iteration: skip decoding?, then ``_params`` of the iteration."""
        it = int(info.iteration)
        skip = np.zeros(self.batch_size, dtype=bool)
        skip[list(self._skip.get(it, ()))] = True
        return (skip, *self._params(it))

    def _params(self, it: int) -> tuple[np.ndarray, ...]:
        """Hook: per-sample arrays the degradation graph needs (here the kind flags and levels)."""
        p = batch_params(self.spec, self.seed, self.rank, it, self.batch_size)
        return (p["is_jpeg"], p["is_gaussian"], p["jpeg_quality"], p["sigma"], p["sp_frac"])

    def _param_types(self, types) -> list:
        """Hook: the DALI dtypes of ``_params``'s arrays."""
        return [types.BOOL, types.BOOL, types.INT32, types.FLOAT, types.FLOAT]

    def _degrade_graph(self, crop, is_jpeg, is_gaussian, quality, sigma, sp_frac):
        """Hook: the DALI graph of the degraded crop (traced with conditionals enabled)."""
        # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
        from nvidia.dali import fn

        if is_jpeg:
            degraded = fn.jpeg_compression_distortion(crop, quality=quality)
        elif is_gaussian:
            degraded = fn.noise.gaussian(crop, stddev=sigma)
        else:
            degraded = fn.noise.salt_and_pepper(crop, prob=sp_frac, per_channel=False)
        return degraded

    def _build(self, checkpoint: Optional[bytes | str]):
        # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
        from nvidia.dali import fn, pipeline_def, types

        S = self.spec.crop_size
        mixed = self.decode == "mixed"
        where = (self._window.reader_args() if self._window is not None else  # one reader of the window
                 dict(paths=self.shards, index_paths=self.indices, shard_id=self.rank,
                      num_shards=self.world_size))
        blank = np.zeros((S, S, 3), dtype=np.uint8)

        @pipeline_def(enable_conditionals=True)
        def pretrain_pipeline():
            encoded, meta = fn.readers.webdataset(
                **where, ext=[";".join(IMAGE_COMPONENTS), "json"], missing_component_behavior="skip",
                name=READER, stick_to_shard=True, pad_last_batch=False, random_shuffle=self.shuffle_buffer > 0,
                initial_fill=max(1, self.shuffle_buffer),
                seed=seed32(self.seed, self.rank, 0x5EAD))
            dtypes = [types.BOOL, *self._param_types(types)]
            skip, *params = fn.external_source(source=self._callback, num_outputs=len(dtypes),
                                               batch=True, batch_info=True, dtype=dtypes)
            pos_x = fn.random.uniform(range=[0.0, 1.0])
            pos_y = fn.random.uniform(range=[0.0, 1.0])
            if skip:  # decoder switched off for this sample (corrupt-sample recovery)
                crop = fn.reshape(types.Constant(blank, device="gpu" if mixed else "cpu"),
                                  layout="HWC")
            else:
                crop = fn.decoders.image_crop(encoded, device="mixed" if mixed else "cpu",
                                              output_type=types.RGB, crop=(S, S),
                                              crop_pos_x=pos_x, crop_pos_y=pos_y)
            return crop, self._degrade_graph(crop, *params), meta

        pipe = pretrain_pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                                 device_id=self.device_id,
                                 seed=seed32(self.seed, self.rank, 0xC409),
                                 prefetch_queue_depth=self.prefetch, enable_checkpointing=True,
                                 checkpoint=checkpoint)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise DataSourceError(f"rank {self.rank}: DALI cannot open the shards "
                                  f"({len(self.shards)} shard(s), first {self.shards[0]}):\n"
                                  f"{short_error(exc)}") from exc
        return pipe

    def _sample_decodes(self, url: str, key: str) -> bool:
        if self._window is not None:  # a placeholder's empty image is what failed: our error
            self._window.check(url)
        return self._samples.decodes(url, key)

    def _shard_names(self) -> str:
        more = f" and {len(self.shards) - 1} more" if len(self.shards) > 1 else ""
        return f"shards {self.shards[0]}{more}"

    def _rebuild(self, checkpoint) -> None:
        self._pipe = None
        self._pipe = self._build(checkpoint)

    # ------------------------------------------------------------------------------ batches
    def __iter__(self) -> "DaliPretrainLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            it = self.iteration
            if self._window is not None and self._window.reach((it + 1) * self.batch_size):
                self._reopen(self._ckpt, self.shards[0])
            (crop, jpeg, meta), bad = self._run_batch(it)
            self.iteration += 1
            self._ckpt = self._pipe.checkpoint()
            self._skip.pop(it, None)
            keys = [parse_source_info(meta[i].source_info())[1] for i in range(self.batch_size)]
            if bad:
                self.corrupt_skipped += len(bad)
                self.corrupt_keys = (self.corrupt_keys + [keys[i] for i in bad])[-100:]
                log.warning("rank %d: skipped %d corrupt sample(s) in batch %d: %s", self.rank,
                            len(bad), it, ", ".join(keys[i] for i in bad))
                if len(bad) == self.batch_size:
                    continue  # nothing usable in this batch: take the next one
            if self.device.type == "cpu":
                # torch's intra-op threads would fight DALI's threads for the same cores (on a
                # busy 2-core machine the degradation ran 10x slower with 2 threads than with 1)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    return self._finish(crop, jpeg, keys, bad, it)
                finally:
                    torch.set_num_threads(threads)
            return self._finish(crop, jpeg, keys, bad, it)

    def _finish(self, crop, degraded, keys: list[str], bad: tuple[int, ...],
                it: int) -> dict[str, Any]:
        B = self.batch_size
        order = list(range(B))
        if bad:  # fill the slots of corrupt samples with copies of good ones of this batch
            good = [i for i in range(B) if i not in bad]
            for j, slot in enumerate(bad):
                order[slot] = good[j % len(good)]
            keys = [keys[i] for i in order]
        non_blocking = self.device.type == "cuda"

        def nchw(tl) -> torch.Tensor:  # uint8 (B, 3, S, S) on the training device
            x = dali_to_torch(tl, self.device)
            if bad:
                x = x[torch.as_tensor(order, device=x.device)]
            return x.to(self.device, non_blocking=non_blocking).permute(0, 3, 1, 2).contiguous()
        return self._emit(nchw(crop), nchw(degraded), keys, it)

    def _emit(self, crop: torch.Tensor, degraded: torch.Tensor, keys: list[str],
              it: int) -> dict[str, Any]:
        """Hook: the batch of iteration ``it`` from the uint8 (B, 3, S, S) crops and their DALI
        degradation (corrupt slots already refilled)."""
        B = self.batch_size
        region_seed = batch_params(self.spec, self.seed, self.rank, it, B)["region_seed"]
        inp, target, mask = compose(crop, degraded, region_seed, self.spec)
        self.batches += 1
        self.samples += B
        return {"input": inp, "target": target, "mask": mask, "keys": keys}

    # ------------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "shards": list(self.shards), "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "spec": repr(self.spec),
                "decode": self.decode}

    def state_dict(self) -> dict[str, Any]:
        """This rank's reader state after the last batch handed out (picklable)."""
        return {**self._identity(), "checkpoint": self._ckpt, "iteration": self.iteration,
                "batches": self.batches, "samples": self.samples,
                "corrupt_skipped": self.corrupt_skipped, "corrupt_keys": list(self.corrupt_keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuses a state from another setup."""
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                old = state.get(key)
                what = (f"{len(old)} shards, first {old[0]}" if key == "shards" and old else old)
                now = (f"{len(value)} shards, first {value[0]}" if key == "shards" else value)
                raise DataSourceError(f"rank {self.rank}: the saved data-loader state cannot be "
                                      f"resumed exactly: {key} was {what!r}, now {now!r}")
        self._skip.clear()
        if self._window is not None:  # DALI replays the epoch up to the saved position
            self._window.reach((int(state["iteration"]) + 1) * self.batch_size)
        self._reopen(state["checkpoint"], self.shards[0])
        self._ckpt = state["checkpoint"]
        self.iteration = int(state["iteration"])
        self.batches = int(state["batches"])
        self.samples = int(state["samples"])
        self.corrupt_skipped = int(state["corrupt_skipped"])
        self.corrupt_keys = list(state.get("corrupt_keys", []))

    def stats(self) -> dict[str, Any]:
        read = self.iteration * self.batch_size
        return {"samples": self.samples, "corrupt_skipped": self.corrupt_skipped,
                "epoch": read // self.share, "batches": self.batches,
                "iteration": self.iteration, "share": self.share,
                "total_samples": self.total_samples, "recoveries": self.recoveries,
                "io_retries": self.io_retries,
                "corrupt_keys": list(self.corrupt_keys)}

    def close(self) -> None:
        self._pipe = None
        self._samples.close()
        if self._window is not None:
            self._window.close()


def build_pretrain_loader(cfg, rank: int, world_size: int, device) -> DaliPretrainLoader:
    """The pre-training loader of ``cfg.data`` (source "shards") for one data rank, at the batch plan's micro-batch."""
    data = batch_plan(cfg, world_size).apply(cfg).data
    if data.source != "shards":
        raise ConfigError(f"data.source: pre-training reads 'shards', got {data.source!r}")
    if not data.train_urls:
        raise ConfigError("data.train_urls: no shards given")
    retry.set_bound(data.io_retry_s)  # the S3 reads outside DALI (listings, indices, single samples)
    try:
        spec = DegradeSpec.from_config(data)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    return DaliPretrainLoader(data.train_urls, spec, data.micro_batch_size, rank=rank,
                              world_size=world_size, device=device, seed=cfg.run.seed,
                              num_threads=data.num_threads, prefetch=data.prefetch,
                              shuffle_buffer=data.shuffle_buffer, decode=data.decode,
                              io_retry_s=data.io_retry_s)
