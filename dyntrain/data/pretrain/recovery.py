"""Corrupt samples in a DALI shard stream (a mixin of ``pipeline.DaliPretrainLoader``).

A JPEG that does not decode makes DALI fail the whole batch ("Critical error in
pipeline") and leaves the pipeline unusable. The loader then (1) rebuilds the pipeline from the
checkpoint of the last good batch with the decoder switched off for every sample of the failing
batch (a DALI conditional driven by an external-source flag), which yields the batch's keys;
(2) decodes each of those images alone (``shard_samples.ShardSamples``) to find the culprits; (3)
rebuilds from the same checkpoint with the decoder switched off for the culprits only, whose slots
are filled with copies of good samples of the same batch, counted in ``stats()["corrupt_skipped"]``
and named in ``stats()["corrupt_keys"]``. The recovery is deterministic, so it replays identically
after a resume. A failure in which no image is corrupt (a shard that vanished, a broken
connection) raises :class:`DataSourceError` naming the shards.
"""
from __future__ import annotations

from dyntrain.data.shards.samples import parse_source_info, short_error
from dyntrain.data.storage.s3 import DataSourceError


_MAX_RECOVERY_ATTEMPTS = 3


class CorruptRecovery:
    """``_recover`` for a loader with ``_pipe``, ``_ckpt``, ``_skip``, ``_rebuild``, ``_samples``,
    ``rank``, ``batch_size`` and ``recoveries`` (see the module docstring)."""

    def _recover(self, exc: RuntimeError, it: int):
        """Rebuild from the last good checkpoint and run batch ``it`` again with its corrupt images
        left undecoded (see the module docstring). Returns (crop, jpeg, meta, bad slots)."""
        last: BaseException = exc
        for _attempt in range(_MAX_RECOVERY_ATTEMPTS):
            self.recoveries += 1
            self._skip[it] = tuple(range(self.batch_size))
            self._rebuild(self._ckpt)
            try:
                _, _, meta = self._pipe.run()
            except RuntimeError as probe_exc:
                raise DataSourceError(f"rank {self.rank}: reading batch {it} failed:\n"
                                      f"{short_error(probe_exc)}") from probe_exc
            refs = [parse_source_info(meta[i].source_info()) for i in range(self.batch_size)]
            bad = tuple(i for i, (url, key) in enumerate(refs) if not self._samples.decodes(url, key))
            if not bad:
                shards = sorted({u for u, _ in refs})
                raise DataSourceError(
                    f"rank {self.rank}: DALI failed on batch {it} but every image of it decodes on "
                    f"its own (shards {', '.join(shards)}):\n{short_error(last)}") from last
            self._skip[it] = bad
            self._rebuild(self._ckpt)
            try:
                crop, jpeg, meta = self._pipe.run()
                return crop, jpeg, meta, bad
            except RuntimeError as again:
                last = again
        raise DataSourceError(f"rank {self.rank}: batch {it} still fails after "
                              f"{_MAX_RECOVERY_ATTEMPTS} recoveries:\n{short_error(last)}") from last
