"""The shard builder's source images: folders, ``s3://`` prefixes and list files with provenance, and
the deterministic share of one part of a multi-node build.

Sources are kept as strings (a local path or an ``s3://`` URL) in one fixed order: folders and
prefixes in the order given, each listed recursively and sorted by path; a list file in its own
line order; a repeated image is taken once (its first occurrence).

``--src-list FILE`` is CSV (a header row naming the columns) or JSONL (one object a line; the name
ends in ``.jsonl`` or ``.json``). Columns: ``path`` (or ``url``: a local path or an ``s3://``
URL; relative paths are taken from the list file's folder), and the optional ``source`` (the data
set's name), ``link`` (where the image was downloaded from) and ``license``. Each patch's JSON
carries the three optional fields under ``provenance``; the manifest counts images and patches per
source. A malformed line is an error naming the file and the line.

Parts. ``--part I/N`` (``0 <= I < N``) builds the contiguous block ``[n*I//N, n*(I+1)//N)`` of the
source list: every image lies in exactly one part, the blocks depend only on the source list (whose
order is sorted, not the file system's listing order), and the image indices (hence sample keys)
are the same as in a single-machine build.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3
from dyntrain.images import is_image, list_images


PROVENANCE_FIELDS = ("source", "link", "license")

Provenance = dict[str, dict[str, str]]  # source (path or URL) -> {source, link, license}


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    i, sep, n = text.partition("/")
    try:
        part, parts = int(i), int(n)
    except ValueError:
        part, parts = -1, 0
    if not sep or parts < 1 or not 0 <= part < parts:
        raise ValueError(f"--part: expected I/N with 0 <= I < N, got {text!r}")
    return part, parts


def part_block(n: int, part: int, parts: int) -> range:
    """The positions of part ``part`` of ``parts`` in a list of ``n`` sources."""
    return range(n * part // parts, n * (part + 1) // parts)


def _list_s3(prefix: str) -> list[str]:
    found = sorted(url for url, _size in s3.list_objects(prefix.rstrip("/") + "/") if is_image(url))
    if not found:
        raise DataSourceError(f"no image under {prefix}")
    return found


def _local(path: str, base: Optional[Path]) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or base is None else base / p)


def _row(rec: Any, where: str, base: Path) -> tuple[str, dict[str, str]]:
    if not isinstance(rec, dict):
        raise DataSourceError(f"{where}: expected an object with a 'path' (or 'url'), got {rec!r}")
    path = rec.get("path") or rec.get("url")
    if not isinstance(path, str) or not path.strip():
        raise DataSourceError(f"{where}: no 'path' (or 'url') given")
    path = path.strip()
    if path.startswith(("http://", "https://")):
        raise DataSourceError(f"{where}: {path}: http(s) sources are not fetched; download the image "
                              "(keep the address in 'link') or give an s3:// URL")
    prov = {k: str(rec[k]).strip() for k in PROVENANCE_FIELDS if rec.get(k) not in (None, "")}
    return (path if is_s3(path) else _local(path, base)), prov


def read_src_list(list_file: str | Path) -> tuple[list[str], Provenance]:
    """The sources of a CSV or JSONL list file and their provenance (see the module docstring)."""
    f = Path(list_file)
    if not f.is_file():
        raise DataSourceError(f"--src-list: file not found: {list_file}")
    base, rows = f.parent, []
    text = f.read_text()
    if f.suffix.lower() in (".jsonl", ".json"):
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{f}: line {no}: not JSON ({exc.msg})") from None
            rows.append(_row(rec, f"{f}: line {no}", base))
    else:
        reader = csv.reader(io.StringIO(text))
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header and "url" not in header:
            raise DataSourceError(f"{f}: line 1: the header names no 'path' (or 'url') column")
        for row in reader:
            no = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataSourceError(f"{f}: line {no}: {len(row)} fields, the header has {len(header)}")
            rows.append(_row(dict(zip(header, row)), f"{f}: line {no}", base))
    if not rows:
        raise DataSourceError(f"--src-list: no image listed in {f}")
    return [p for p, _ in rows], {p: prov for p, prov in rows if prov}


def list_sources(srcs: Iterable[str | Path], src_lists: Iterable[str | Path] = ()
                 ) -> tuple[list[str], Provenance]:
    """Every image of the folders / files / s3:// prefixes ``srcs``, then of the list files
    ``src_lists`` (see the module docstring), duplicates dropped; and the provenance by source."""
    out: list[str] = []
    prov: Provenance = {}
    seen: set[str] = set()

    def add(found: Iterable[str]) -> None:
        for s in found:
            key = s if is_s3(s) else os.path.realpath(s)
            if key not in seen:
                seen.add(key)
                out.append(s)

    for src in srcs:
        src = str(src)
        if is_s3(src):
            add([src] if is_image(src) else _list_s3(src))
            continue
        p = Path(src)
        if p.is_file():
            add([str(p)])
        elif p.is_dir():
            add(str(f) for f in list_images(p))
        else:
            raise DataSourceError(f"source folder not found: {src}")
    for list_file in src_lists:
        paths, more = read_src_list(list_file)
        add(paths)
        prov.update({k: v for k, v in more.items() if k not in prov})
    return out, prov


def sources_digest(sources: list[str], prov: Provenance) -> str:
    """SHA-256 of the source list and its provenance (the same in every part of one build)."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s}\0{json.dumps(prov.get(s, {}), sort_keys=True)}\n".encode())
    return h.hexdigest()


def stat_digest(sources: Iterable[str]) -> str:
    """SHA-256 of the sources' sizes and modification times (local files; S3 objects by name)."""
    h = hashlib.sha256()
    for s in sources:
        if is_s3(s):
            h.update(f"{s}\n".encode())
            continue
        st = os.stat(s)
        h.update(f"{s}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def split_holdout(sources: list[str], frac: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training images, held-out images): ``round(frac * n)`` whole source images (at least one,
    at most n - 1) drawn with ``seed``; both lists keep the source order."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"--holdout: a fraction in (0, 1) is needed, got {frac}")
    n = len(sources)
    if n < 2:
        raise ValueError(f"--holdout: needs at least 2 source images, found {n}")
    k = min(n - 1, max(1, round(frac * n)))
    held = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    return ([p for i, p in enumerate(sources) if i not in held],
            [p for i, p in enumerate(sources) if i in held])
