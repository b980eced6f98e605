"""WebDataset tar shards and their DALI index: one writer and one index reader/writer for both the
pre-training shards and the paired fine-tuning shards.

A shard is a plain USTAR tar; a sample is consecutive members ``<key>.<component>`` that share the
key (everything before the first dot of the base name). Members are written in the order given,
with mtime 0, mode 0644 and no owner, so equal samples give byte-identical shards.
(``webdataset.TarWriter`` sorts a sample's components by name, which would reorder the paired
shards' ``input``/``target``/``json`` members, so the writer stays our own.)

The index is DALI's webdataset index, format v1.2, exactly as DALI's ``wds2idx`` writes it: a header
line ``v1.2 <samples>``, then per sample ``<ext> <data offset> <size> <member name>`` for every
component, in tar order.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


INDEX_VERSION = "v1.2"

Sample = tuple[str, Sequence[tuple[str, bytes]]]  # (key, [(component, payload), ...])


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes through it (SHA-256) and counts the bytes."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


@dataclass(frozen=True)
class TarWritten:
    """What ``write_tar`` wrote: the DALI index (``make_index`` of the tar, without reading it
    back), the SHA-256 and the size of the file."""
    index: str
    sha256: str
    size: int


def write_tar(path: str | Path, samples: Iterable[Sample]) -> TarWritten:
    """Write a deterministic WebDataset tar: ``key.<component>`` per component, in order."""
    lines: list[list[tuple[str, int, int, str]]] = []
    with open(path, "wb") as raw:
        out = _Hashing(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT,
                          copybufsize=1 << 22) as tf:  # a member in one write, not 16 KiB pieces
            for key, components in samples:
                line = []
                for component, payload in components:
                    info = tarfile.TarInfo(f"{key}.{component}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tf.addfile(info, io.BytesIO(payload))
                    # the member's data is the last ceil(size / 512) blocks written
                    data_at = tf.offset - -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    line.append((component, data_at, len(payload), info.name))
                lines.append(line)
    return TarWritten(_index_text(path, lines), out.sha.hexdigest(), out.size)


def make_index(tar_path: str | Path) -> str:
    """The DALI webdataset index (v1.2) of a tar: one line per sample, components in tar order."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name[m.name.rfind("/") + 1:]
            dot = base.find(".")
            if dot <= 0:
                continue
            stem = m.name[: m.name.rfind("/") + 1 + dot]
            ext = base[dot + 1:]
            if stem != last:
                samples.append([])
                last = stem
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    return _index_text(tar_path, samples)


def _index_text(tar_path: str | Path, samples: list[list[tuple[str, int, int, str]]]) -> str:
    """The index of a tar's samples, each a list of (component, data offset, size, member name)."""
    if not samples:
        raise ValueError(f"{tar_path}: empty shard")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) for comps in samples]
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Index text -> {sample key: {ext: (offset, size)}}."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError("not a DALI webdataset index (v1.x header missing)")
    step = 4 if lines[0].startswith("v1.2") else 3  # v1.2 names every component
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for ordinal, line in enumerate(lines[1:]):
        tok = line.split()
        if not tok:
            continue
        comps: dict[str, tuple[int, int]] = {}
        key = str(ordinal)
        for i in range(0, len(tok) - step + 1, step):
            comps[tok[i]] = (int(tok[i + 1]), int(tok[i + 2]))
            if step == 4:
                name = tok[i + 3]
                key = name[name.rfind("/") + 1:].split(".", 1)[0]
        out[key] = comps
    return out
