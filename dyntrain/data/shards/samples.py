"""Single samples of pre-training shards, outside the DALI pipeline: what the loader needs to check
the patch size before it starts and to find the corrupt images of a batch that failed to decode.

``ShardSamples`` reads a shard's DALI index (or builds it from the tar when the shards have no
index files), looks up a sample's image by key, and decodes one encoded image alone with the
training decoder (DALI, on the same device and library), so "corrupt" means exactly "the training
decoder fails on it".
"""
from __future__ import annotations

import io
import posixpath
import tempfile
from typing import Optional

import numpy as np

from dyntrain.data.shards.wds import make_index, parse_index
from dyntrain.data.storage.s3 import DataSourceError, read_bytes
from dyntrain.data.storage.urls import index_url
from dyntrain.images import open_image


# tar component names (extensions inside a shard) that hold the encoded image
IMAGE_COMPONENTS = ("jpg", "jpeg", "png")

ShardIndex = dict[str, dict[str, tuple[int, int]]]  # key -> {component: (offset, size)}


def share_size(total: int, rank: int, world_size: int) -> int:
    """Samples in rank's share of ``total`` (DALI's split: [total*r//W, total*(r+1)//W))."""
    return total * (rank + 1) // world_size - total * rank // world_size


def short_error(exc: BaseException, lines: int = 12) -> str:
    """The last ``lines`` non-empty lines of an exception's text (DALI's errors are long), without
    the pipeline-definition traceback DALI quotes (our own source lines, not the cause)."""
    text, skip = [], 0
    for ln in str(exc).splitlines():
        stripped = ln.strip()
        if skip:                     # the quoted source line under a 'File "...", line N'
            skip -= 1
            continue
        if stripped.startswith('File "'):
            skip = 1
            continue
        if stripped and not stripped.startswith("which was used in the pipeline definition"):
            text.append(ln)
    return "\n".join(text[-lines:])


def parse_source_info(info: str) -> tuple[str, str]:
    """DALI webdataset source info ``<shard url>:<offset>:<member name>`` -> (shard url, key)."""
    url, _offset, name = info.rsplit(":", 2)
    base = posixpath.basename(name)
    return url, base.split(".", 1)[0]


class ShardSamples:
    """Index look-ups and single-image decode checks on the shards of one loader.

    Args:
        indexed: whether every shard has its ``.idx`` file beside it (else indices are built).
        device_id: the DALI device of the training decoder (None on CPU).
        mixed: whether the training decoder is nvJPEG (``mixed``) rather than the CPU one.
    """

    def __init__(self, indexed: bool, device_id: Optional[int], mixed: bool) -> None:
        self.indexed, self.device_id, self.mixed = indexed, device_id, mixed
        self._index_cache: dict[str, ShardIndex] = {}
        self._validator = None

    def index(self, url: str) -> ShardIndex:
        if url not in self._index_cache:
            if self.indexed:
                text = read_bytes(index_url(url)).decode()
            elif url.startswith("s3://"):
                with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
                    tmp.write(read_bytes(url))
                    tmp.flush()
                    text = make_index(tmp.name)
            else:
                text = make_index(url)
            self._index_cache[url] = parse_index(text)
        return self._index_cache[url]

    def first_image_size(self, url: str) -> Optional[tuple[str, int, int]]:
        """(key, width, height) of the first image of a shard (one small read); None when the
        shard holds no image or the first one does not decode (handled while reading)."""
        for key, comps in self.index(url).items():
            ext = next((e for e in IMAGE_COMPONENTS if e in comps), None)
            if ext is None:
                continue
            offset, size = comps[ext]
            try:
                with open_image(io.BytesIO(read_bytes(url, offset, min(size, 65536)))) as im:
                    return key, im.size[0], im.size[1]
            except Exception:  # noqa: BLE001 - a corrupt first sample is handled while reading
                return None
        return None

    def decodes(self, url: str, key: str, prefixes: tuple[str, ...] = ("",)) -> bool:
        """Whether sample ``key`` of shard ``url`` decodes alone with the training decoder: its image
        component for each of ``prefixes`` ("" = the pre-training image; "input.", "target." = a
        pair). The bytes are read whole first: a read that fails or comes back short raises
        ``DataSourceError`` (I/O, never a reason to call the sample corrupt)."""
        comps = self.index(url).get(key, {})
        for prefix in prefixes:
            name = next((prefix + e for e in IMAGE_COMPONENTS if prefix + e in comps), None)
            if name is None or comps[name][1] == 0:
                return False
            offset, size = comps[name]
            data = read_bytes(url, offset, size)
            if len(data) != size:
                raise DataSourceError(f"{url}: sample {key}: read {len(data)} of {size} bytes")
            if not self._validate(data):
                return False
        return True

    def _validate(self, data: bytes) -> bool:
        """Decode one encoded image alone with the training decoder (device and library)."""
        # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
        from nvidia.dali import fn, pipeline_def, types

        if self._validator is None:
            @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id,
                          prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
            def single():
                enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
                return fn.decoders.image(enc, device="mixed" if self.mixed else "cpu",
                                         output_type=types.RGB)
            self._validator = single()
            self._validator.build()
        try:
            self._validator.feed_input("enc", [np.frombuffer(data, dtype=np.uint8)])
            self._validator.run()
            return True
        except RuntimeError:
            self._validator = None  # a failed pipeline cannot run again
            return False

    def close(self) -> None:
        self._validator = None
