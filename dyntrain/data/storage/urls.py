"""Shard URL lists: brace patterns, globs, folders and s3:// prefixes -> a checked list of shards.

Accepted forms (each entry of ``data.train_urls``; results are concatenated, duplicates dropped):

    data/shards/shard-000003.tar              one local shard
    data/shards/*.tar  data/**/shard-*.tar    a local glob
    data/shards                               a local folder: every *.tar in it
    shard-{000000..000099}.tar                a brace range (zero padding kept), also {a,b,c}
                                              (expanded by the ``braceexpand`` package)
    s3://bucket/prefix/shard-000003.tar       one S3 shard
    s3://bucket/prefix/*.tar                  an S3 glob (objects are listed with boto3)
    s3://bucket/prefix/                       an S3 "folder": every *.tar under the prefix

Every shard's DALI index is ``<shard stem>.idx`` beside it (``shard-000003.tar`` ->
``shard-000003.idx``). A pattern that matches nothing, a missing shard, a missing bucket, an
unreachable endpoint or rejected credentials raise :class:`DataSourceError` naming the URL.
"""
from __future__ import annotations

import fnmatch
import glob
import posixpath
from pathlib import Path
from typing import Iterable

from braceexpand import braceexpand

from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3


_GLOB_CHARS = set("*?[")


def index_url(shard_url: str) -> str:
    """The DALI index beside a shard: ``.../shard-000003.tar`` -> ``.../shard-000003.idx``."""
    base = shard_url[:-4] if shard_url.endswith(".tar") else shard_url
    return base + ".idx"


def _has_glob(s: str) -> bool:
    return any(c in s for c in _GLOB_CHARS)


def _expand_local(entry: str) -> list[str]:
    p = Path(entry)
    if _has_glob(entry):
        found = sorted(f for f in glob.glob(entry, recursive=True) if Path(f).is_file())
        if not found:
            raise DataSourceError(f"no shard matches {entry}")
        return found
    if p.is_dir():
        found = sorted(str(f) for f in p.glob("*.tar"))
        if not found:
            raise DataSourceError(f"no *.tar shard in folder {entry}")
        return found
    if not p.is_file():
        raise DataSourceError(f"shard not found: {entry}")
    return [str(p)]


def _expand_s3_glob(entry: str) -> list[str]:
    bucket, key = s3.parse_s3_url(entry)
    if not key or key.endswith("/"):
        pattern, literal = key + "*.tar", key
        recursive = False
    else:
        pattern = key
        cut = min(i for i, c in enumerate(key) if c in _GLOB_CHARS)
        literal = key[:cut]
        recursive = "**" in key
    found = []
    for url, _size in s3.list_objects(f"s3://{bucket}/{literal}", label=entry):
        k = url[len(f"s3://{bucket}/"):]
        if recursive:
            ok = fnmatch.fnmatchcase(k, pattern)
        else:  # '*' does not cross '/' (like a shell glob)
            ok = (k.count("/") == pattern.count("/")) and fnmatch.fnmatchcase(k, pattern)
        if ok:
            found.append(url)
    if not found:
        s3.check_bucket(entry)  # a missing bucket gets its own message
        raise DataSourceError(f"no shard matches {entry}")
    return sorted(found)


def _check_s3_exist(urls: list[str]) -> None:
    """Every listed S3 shard must exist: one listing per folder, not one request per shard."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault(posixpath.dirname(u), []).append(u)
    for folder, members in by_dir.items():
        present = {u for u, _ in s3.list_objects(folder + "/", label=members[0])}
        missing = [u for u in members if u not in present]
        if missing:
            if not present:
                s3.check_bucket(missing[0])
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataSourceError(f"shard not found: {missing[0]}{more}")


def expand_urls(entries: Iterable[str] | str, check: bool = True) -> list[str]:
    """Expand ``data.train_urls`` into a list of shard URLs (order kept, duplicates dropped)."""
    if isinstance(entries, str):
        entries = [entries]
    entries = [str(e) for e in entries]
    if not entries:
        raise DataSourceError("no shard URLs given (data.train_urls is empty)")
    out: list[str] = []
    s3_plain: list[str] = []
    for entry in entries:
        for item in braceexpand(entry, escape=False):
            if is_s3(item):
                if _has_glob(item) or item.endswith("/") or "/" not in item[len("s3://"):]:
                    out.extend(_expand_s3_glob(item if "/" in item[5:] else item + "/"))
                else:
                    out.append(item)
                    s3_plain.append(item)
            else:
                out.extend(_expand_local(item) if check or _has_glob(item) else [item])
    if check and s3_plain:
        _check_s3_exist(s3_plain)
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]


def missing_indices(idx: list[str]) -> list[str]:
    local = [u for u in idx if not is_s3(u) and not Path(u).is_file()]
    remote = [u for u in idx if is_s3(u)]
    missing = list(local)
    by_dir: dict[str, list[str]] = {}
    for u in remote:
        by_dir.setdefault(posixpath.dirname(u), []).append(u)
    for folder, members in by_dir.items():
        present = {u for u, _ in s3.list_objects(folder + "/", label=members[0])}
        missing.extend(u for u in members if u not in present)
    return missing

