"""A DALI shard batch that fails: a transient storage error (retried, nothing skipped) or a corrupt
sample (skipped, counted, named). A mixin of ``pipeline.DaliPretrainLoader`` and
``finetune.paired_shards.PairedShardLoader``.

A failed read and an image that does not decode look alike from outside: DALI fails the whole batch
("Critical error in pipeline") and the pipeline is unusable. Each batch therefore starts from the
DALI checkpoint of the last good batch, and a sample is blamed only on evidence:

1. rebuild from that checkpoint with the decoders switched off for the whole batch (a DALI
   conditional driven by an external-source flag) and run it: this reads every sample and yields
   the batch's keys. A failure here is I/O, never a corrupt image.
2. read each sample's encoded images whole through ``dyntrain.data.storage.s3`` (a read cut short
   raises) and decode each alone with the training decoder (``ShardSamples``). A sample is corrupt
   only when its bytes arrived complete and do not decode.
3. rebuild from the same checkpoint with the decoders off for the culprits only and run the batch;
   their slots are filled with copies of good samples of the batch, counted in
   ``stats()["corrupt_skipped"]`` and named in ``stats()["corrupt_keys"]``. With no culprit the
   batch is run again whole (the first failure was a blip that has passed).

Any I/O failure in these steps (DALI's reads, a rebuild, a read of the bytes) is transient: the
whole replay is tried again with backoff (``storage.retry.RetryWindow``) for up to
``data.io_retry_s``, counted in ``stats()["io_retries"]``; past the bound the run fails with one
error naming the shards. The replay is deterministic, so a batch after a retry or a recovery is the
batch an uninterrupted run reads, and a resume stays exact. A batch that fails whole three times in
a row although every image decodes and the storage answers raises instead of retrying until the bound.

Opening the pipeline (the first build, or the rebuild from a resumed checkpoint) is retried the same
way (``_reopen``) while a direct request for a shard fails transiently (the storage is down or
throttling). A build that fails while the storage answers is tried once more at once (DALI's and
boto3's own retries take seconds, so the outage that failed it may have ended since); failing again
while the storage answers, it is a real error and raises.
"""
from __future__ import annotations

from dyntrain.data.shards.samples import parse_source_info, short_error
from dyntrain.data.storage import retry, s3
from dyntrain.data.storage.s3 import DataSourceError


_MAX_UNEXPLAINED = 3


class _Transient(Exception):
    """An I/O failure inside a replay (wraps the cause)."""


class CorruptRecovery:
    """``_run_batch`` for a loader with ``_pipe``, ``_ckpt``, ``_skip``, ``_rebuild``,
    ``_sample_decodes``, ``_shard_names``, ``rank``, ``batch_size``, ``io_retry_s``, ``recoveries``
    and ``io_retries`` (see the module docstring)."""

    def _run_batch(self, it: int):
        """Outputs of batch ``it`` and the slots of its corrupt samples: (outputs, bad)."""
        try:
            return self._pipe.run(), ()
        except RuntimeError as exc:
            return self._recover(exc, it)

    def _recover(self, exc: RuntimeError, it: int):
        window = retry.RetryWindow(f"rank {self.rank} batch {it} ({self._shard_names()})", self.io_retry_s)
        last: BaseException = exc
        unexplained = 0
        while True:
            self.recoveries += 1
            try:
                outputs, bad = self._replay(it)
            except _Transient as t:
                last = t.__cause__ or t
                unexplained = 0
                if window.wait(last):
                    self.io_retries += 1
                    continue
                raise DataSourceError(f"rank {self.rank}: reading batch {it} failed "
                                      f"({self._shard_names()}), {window.gave_up()}:\n"
                                      f"{short_error(last)}") from last
            if outputs is not None:
                window.done()
                return outputs, bad
            unexplained += 1    # the whole batch failed again with every image decoding alone
            if unexplained >= _MAX_UNEXPLAINED:
                raise DataSourceError(
                    f"rank {self.rank}: DALI failed on batch {it} {unexplained} times but every image "
                    f"of it decodes on its own ({self._shard_names()}):\n{short_error(last)}") from last
            if window.wait(last):
                self.io_retries += 1

    def _reopen(self, checkpoint, probe: str) -> None:
        """``_rebuild(checkpoint)``, retried while the storage of ``probe`` (a shard URL) is
        unreachable, for up to ``io_retry_s`` (see the module docstring)."""
        window = retry.RetryWindow(f"rank {self.rank}: opening {self._shard_names()}", self.io_retry_s)
        answered = False  # the last build failed although the storage answered the probe
        while True:
            try:
                self._rebuild(checkpoint)
                window.done()
                return
            except DataSourceError as exc:
                cause = _storage_fault(probe)
                if cause is None and answered:
                    raise
                self.io_retries += 1
                answered = cause is None
                if answered:  # the outage may have ended during DALI's or the probe's own retries
                    continue
                if not window.wait(cause):
                    raise DataSourceError(f"{exc}\n{window.gave_up()}") from exc

    def _replay(self, it: int):
        """Steps 1-3 of the module docstring; (None, ()) when the batch failed again whole."""
        self._skip[it] = tuple(range(self.batch_size))
        probe = self._rerun(it)
        refs = [parse_source_info(probe[-1][i].source_info()) for i in range(self.batch_size)]
        try:
            bad = tuple(i for i, (url, key) in enumerate(refs) if not self._sample_decodes(url, key))
        except DataSourceError as exc:
            raise _Transient() from exc
        self._skip[it] = bad
        if not bad:
            self._skip.pop(it, None)
            try:
                self._rebuild(self._ckpt)
                return self._pipe.run(), ()
            except (RuntimeError, DataSourceError):
                return None, ()
        return self._rerun(it), bad

    def _rerun(self, it: int):
        try:
            self._rebuild(self._ckpt)
            return self._pipe.run()
        except (RuntimeError, DataSourceError) as exc:
            raise _Transient() from exc


def _storage_fault(url: str):
    """The transient error a direct request for ``url`` gets now (None: it answers, or a local path)."""
    if not s3.is_s3(url):
        return None
    bucket, key = s3.parse_s3_url(url)
    try:
        s3.client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - only the transient ones matter here
        return exc if retry.is_transient(exc) else None
    return None
