"""Which data a run reads, as MLflow records it (dataset inputs, ``dyntrain.tracking``): per set (the
training shards ``data.train_urls``, the validation shards ``data.val_urls``) a name, the source
URLs, a digest of the data and the sample count.

The digest hashes the shard folders' ``manifest.json`` files (the builder's, or one written by
``make_shards manifest``): every shard's name and sample count, and the build's sources and
settings, so two runs on the same shards have the same digest whatever their config says, and a
rebuilt folder gets another. A set without a manifest is described by its URL entries (digest over
them, ``manifest: false``, no sample count): listing and opening every shard to count it is what
the manifest exists to avoid.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any, Optional, Sequence

from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError, is_s3
from dyntrain.logs import get_logger


log = get_logger(__name__)

MANIFEST = "manifest.json"


def shard_folder(entry: str) -> str:
    """The folder a URL entry names: itself when it is a folder, else the part before its last '/'
    (a glob, a brace pattern or one shard)."""
    entry = str(entry)
    if not is_s3(entry) and os.path.isdir(entry):
        return entry.rstrip("/") or "/"
    head, tail = posixpath.split(entry)
    if not tail:  # "s3://b/p/"
        return head
    if not any(c in tail for c in "*?[{") and not tail.endswith(".tar"):
        return entry.rstrip("/")  # an s3:// folder named without its slash
    return head


def describe(urls: Sequence[str], context: str) -> Optional[dict[str, Any]]:
    """The description of one set of shards (None when ``urls`` is empty)."""
    urls = [str(u) for u in urls]
    if not urls:
        return None
    folders = sorted(dict.fromkeys(shard_folder(u) for u in urls))
    digest = hashlib.sha256()
    samples, shards, manifests = 0, 0, 0
    for folder in folders:
        url = f"{folder}/{MANIFEST}"
        try:
            raw = s3.read_bytes(url) if (s3.head(url) is not None if is_s3(url) else os.path.isfile(url)) else None
        except DataSourceError:
            raw = None
        if raw is None:
            continue
        try:
            manifest = json.loads(raw)
            samples += int(manifest["num_samples"])
            shards += int(manifest.get("num_shards", len(manifest.get("shards", []))))
        except (ValueError, KeyError, TypeError):
            continue
        digest.update(url.encode() + b"\0" + hashlib.sha256(raw).digest())
        manifests += 1
    complete = manifests == len(folders)
    if not complete:  # some folder without a manifest: what the config names, not the data
        digest = hashlib.sha256(json.dumps(sorted(urls)).encode())
    name = posixpath.basename(folders[0].rstrip("/")) or folders[0]
    if len(folders) > 1:
        name += f"+{len(folders) - 1}"
    return {"name": name, "context": context, "sources": urls, "folders": folders,
            "digest": digest.hexdigest(), "manifest": complete,
            "num_samples": samples if complete else None, "num_shards": shards if complete else None}


def describe_datasets(data) -> list[dict[str, Any]]:
    """The training and validation sets of a ``data`` config section (shard sources only); [] with a
    warning when a manifest cannot be read (the record of the data never stops a run)."""
    try:
        return _describe_sets(data)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("data: the run's data sets are not recorded (%s: %s)", type(exc).__name__, exc)
        return []


def _describe_sets(data) -> list[dict[str, Any]]:
    out = []
    if getattr(data, "source", "shards") in ("shards", "paired_shards"):
        train = describe(list(data.train_urls or []), "training")
        if train is not None:
            out.append(train)
    val = describe(list(getattr(data, "val_urls", None) or []), "validation")
    if val is not None:
        out.append(val)
    return out
