"""``data.source: synthetic`` with ``data.clean_urls`` naming pre-training shards (local or s3://):
MiOIR pairs made from the patches of the DALI pre-training reader.

    fn.readers.webdataset -> fn.decoders.image_crop ("mixed" on a GPU, "cpu" otherwise): the
        reader, decoder and random crop of ``pipeline.DaliPretrainLoader`` (same shards syntax,
        sharding by rank, shuffle, corrupt-sample recovery, checkpointable state)
    jpeg samples:   fn.jpeg_compression_distortion at the sample's quality, inside the pipeline
    other tasks:    the batched torch degradations of ``degradations`` on the training device

Determinism. The batch of DALI iteration ``it`` is (step, micro) = divmod(it, accum); sample i of it
has global index ``(micro * world + rank) * batch + i``; its task is ``curriculum.task_at(step,
index)`` and its parameters ``draw_params`` keyed by (seed, step, rank, index) - the same keys as
the folder form. The crop and the image come from the reader (seeded by (seed, rank)); its DALI
checkpoint is part of ``state_dict()``, so a resume gives the same batches. Shard patches carry no
depth map: haze uses the depth proxy (counted in ``stats()["depth_proxy"]``). A batch emptied by
corrupt samples is skipped whole (the iteration advances, the training step does not), so the task
of a sample follows the reader's iteration rather than the trainer's step in that rare case.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dyntrain.data.finetune.degradations import TABLE, degrade, draw_params
from dyntrain.data.pretrain.degrade import DegradeSpec
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader


class ShardCleanLoader(DaliPretrainLoader):
    """Batches of {"input", "target", "keys", "tasks"} (float in [0, 1] on ``device``)."""

    kind = "synthetic_shards"

    def __init__(self, urls, curriculum, preset: str, crop: int, batch_size: int, seed: int,
                 rank: int, world_size: int, accum: int, device, num_threads: int = 4,
                 prefetch: int = 2, shuffle_buffer: int = 1024, decode: str = "auto") -> None:
        # set before the base class builds the pipeline: its external source calls _params
        self.curriculum, self.preset, self.accum = curriculum, preset, int(accum)
        self.depth_proxy = 0
        self.task_counts = {t: 0 for t in TABLE}
        super().__init__(urls, DegradeSpec(crop_size=crop, region_block=min(16, crop)), batch_size,
                         rank=rank, world_size=world_size, device=device, seed=seed,
                         num_threads=num_threads, prefetch=prefetch, shuffle_buffer=shuffle_buffer,
                         decode=decode)

    def draw(self, it: int) -> tuple[int, list[str], list[dict[str, float]]]:
        """(step, tasks, parameters) of DALI iteration ``it`` (see the module docstring)."""
        step, micro = divmod(it, self.accum)
        first = (micro * self.world_size + self.rank) * self.batch_size
        tasks = [self.curriculum.task_at(step, first + i) for i in range(self.batch_size)]
        return step, tasks, draw_params(tasks, self.preset, self.seed, step, self.rank, first)

    # ------------------------------------------------------------------ hooks of the reader
    def _params(self, it: int) -> tuple[np.ndarray, ...]:
        _, tasks, params = self.draw(it)
        is_jpeg = np.array([t == "jpeg" for t in tasks], dtype=bool)
        quality = np.array([int(p.get("quality", 100)) for p in params], dtype=np.int32)
        return is_jpeg, quality

    def _param_types(self, types) -> list:
        return [types.BOOL, types.INT32]

    def _degrade_graph(self, crop, is_jpeg, quality):
        # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
        from nvidia.dali import fn

        if is_jpeg:
            out = fn.jpeg_compression_distortion(crop, quality=quality)
        else:
            out = crop
        return out

    def _emit(self, crop: torch.Tensor, degraded: torch.Tensor, keys: list[str],
              it: int) -> dict[str, Any]:
        _, tasks, params = self.draw(it)
        clean, lq = crop.float(), degraded.float()   # lq holds DALI's JPEG for jpeg samples
        other = [i for i, t in enumerate(tasks) if t != "jpeg"]
        if other:
            sel = torch.tensor(other, device=clean.device)
            lq[sel] = degrade(clean[sel], [tasks[i] for i in other], [params[i] for i in other])
        self.depth_proxy += tasks.count("haze")
        for t in tasks:
            self.task_counts[t] += 1
        self.batches += 1
        self.samples += self.batch_size
        return {"input": lq.div_(255.0), "target": clean.div_(255.0), "keys": keys, "tasks": tasks}

    # ------------------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "preset": self.preset, "accum": self.accum,
                "curriculum": self.curriculum.describe()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "depth_proxy": self.depth_proxy,
                "task_counts": dict(self.task_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.depth_proxy = int(state["depth_proxy"])
        self.task_counts.update({t: int(n) for t, n in state["task_counts"].items()})

    def stats(self) -> dict[str, Any]:
        out = {**super().stats(), "small_skipped": 0, "depth_proxy": self.depth_proxy}
        out.update({f"samples_{t}": n for t, n in self.task_counts.items() if n})
        return out
