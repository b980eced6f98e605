"""PromptIR's three tasks under the task curriculum (``schedule.tasks.mode: sequential`` with
``data.source: paired``): each sample's task comes from ``dyntrain.data.finetune.tasks`` and its pair is drawn
(with replacement) from that task's entries, crop and flip seeded by (seed, step, global index), so
the stream is a pure function of the batch counter and a resume is exact. Denoising noise as in the
epoch loader (``PairedLoaderBase``)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dyntrain.data.finetune.base import (PairedDataError, PairedLoaderBase, PairEntry, collate_pairs,
                                         random_pair_crop)
from dyntrain.images import read_image
from dyntrain.seeds import mix_seed


class CurriculumPairedLoader(PairedLoaderBase):
    """Fine-tuning loader over the task folders whose task mix follows a ``TaskCurriculum``."""

    kind = "paired_curriculum"

    def __init__(self, per_task: dict[str, list[PairEntry]], curriculum, crop_size: int, batch_size: int,
                 seed: int, rank: int, world_size: int, accum: int, device) -> None:
        missing = [t for t in curriculum.order if not per_task.get(t)]
        if missing:
            raise PairedDataError(f"schedule.tasks.order: tasks {missing} have no entries (data.tasks "
                                  f"{sorted(per_task)})")
        super().__init__(seed, rank, world_size, batch_size, torch.device(device),
                         sum(len(v) for v in per_task.values()))
        self.per_task, self.curriculum = per_task, curriculum
        self.crop, self.accum = crop_size, accum

    def _item(self, step: int, index: int) -> dict[str, Any]:
        task = self.curriculum.task_at(step, index)
        rng = np.random.default_rng(mix_seed(self.seed, step, index, 0xA11))
        entries = self.per_task[task]
        entry = entries[int(rng.integers(len(entries)))]
        try:
            inp = read_image(entry.input_path)
            tgt = inp if entry.target_path == entry.input_path else read_image(entry.target_path)
        except (OSError, ValueError) as exc:
            raise PairedDataError(f"paired data: cannot read {entry.input_path} / {entry.target_path}: {exc}") from exc
        inp, tgt = random_pair_crop(inp, tgt, self.crop, rng, what=entry.key)
        return {"input": torch.from_numpy(inp).permute(2, 0, 1), "target": torch.from_numpy(tgt).permute(2, 0, 1),
                "sigma": entry.sigma, "key": entry.key, "task": task, "epoch": 0, "skipped": 0}

    def __next__(self) -> dict[str, Any]:
        step, micro = divmod(self.batches, self.accum)
        first = (micro * self.world_size + self.rank) * self.batch_size
        return self._finish(collate_pairs([self._item(step, first + i) for i in range(self.batch_size)]))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._restore_counters(state)
