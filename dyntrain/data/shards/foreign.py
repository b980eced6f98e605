"""A manifest for a WebDataset shard set made by other tools (img2dataset, tarp, ...):
``make_shards manifest --out DIR_OR_S3_URL``.

Such a folder has tars and perhaps DALI indices, but no ``manifest.json``, so a training run lists the
folder and DALI opens every shard at each start (``dyntrain.data.pretrain.window``). This command, run
once, writes for every ``*.tar`` directly in the folder its DALI index where it is missing (the tar is
read once) and reads the sample count from every index, then writes ``manifest.json`` (shard names,
index names, sample counts) the way the builder does: afterwards the folder starts like one the
builder made.

The pre-training reader takes a sample's image (``jpg``, ``jpeg`` or ``png``) and its ``json``; a
sample that lacks one of them would be skipped by DALI and shift every count after it, so it is
refused here, named. A folder that already has a manifest is left alone when that manifest lists the
same shards (``up_to_date``); one that lists others is refused unless ``force``.
"""
from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dyntrain.data.shards.samples import IMAGE_COMPONENTS
from dyntrain.data.shards.wds import make_index, parse_index
from dyntrain.data.storage import s3
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.logs import get_logger


log = get_logger(__name__)

MANIFEST = "manifest.json"
THREADS = 8


def _index_text(output: ShardOutput, name: str, present: bool) -> tuple[str, bool]:
    """The DALI index of shard ``name`` (read, or made from the tar and published); True if made."""
    idx = name[:-4] + ".idx"
    if present:
        return s3.read_bytes(output.url_of(idx)).decode(), False
    if output.remote:
        with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
            tmp.write(s3.read_bytes(output.url_of(name)))
            tmp.flush()
            text = make_index(tmp.name)
    else:
        text = make_index(output.url_of(name))
    output.write_text(idx, text)
    return text, True


def _count(url: str, text: str) -> int:
    """Samples of an index, every one with an image and a ``json`` (else a clear error)."""
    try:
        samples = parse_index(text)
        declared = int(text.split("\n", 1)[0].split()[1])
    except (ValueError, IndexError) as exc:
        raise DataSourceError(f"{url}: not a DALI webdataset index ({exc})") from None
    for key, comps in samples.items():
        if "json" not in comps or not any(e in comps for e in IMAGE_COMPONENTS):
            raise DataSourceError(
                f"{url}: sample {key!r} has components {sorted(comps)}; the pre-training reader needs "
                f"an image ({'/'.join(IMAGE_COMPONENTS)}) and a json for every sample (DALI would skip "
                f"it and every count after it would be off)")
    if declared != len(samples):
        raise DataSourceError(f"{url}: the index header says {declared} samples, its lines {len(samples)}")
    return declared


def describe_shards(out: str, force: bool = False) -> dict[str, Any]:
    """Write the missing DALI indices and ``manifest.json`` of the shard folder ``out`` (local or
    ``s3://``); returns the manifest (with ``up_to_date`` / ``indices_made``)."""
    output = ShardOutput(out)
    try:
        names = set(output.list_names())
        shards = sorted(n for n in names if n.endswith(".tar"))
        if not shards:
            raise DataSourceError(f"{out}: no *.tar shard in this folder")
        old = output.read_text(MANIFEST)
        if old is not None:
            try:
                listed = sorted(str(s["name"]) for s in json.loads(old)["shards"])
            except (ValueError, KeyError, TypeError):
                listed = None
            if listed == shards and not force:
                manifest = json.loads(old)
                manifest["up_to_date"] = True
                return manifest
            if not force:
                raise DataSourceError(f"{output.url_of(MANIFEST)} exists and lists other shards than the "
                                      f"{len(shards)} in the folder: pass --force to replace it")

        def one(name: str) -> tuple[int, bool]:
            text, made = _index_text(output, name, name[:-4] + ".idx" in names)
            return _count(output.url_of(name[:-4] + ".idx"), text), made

        with ThreadPoolExecutor(THREADS) as pool:
            found = list(pool.map(one, shards))
        made = sum(m for _, m in found)
        manifest = {"format": "dyntrain-shards", "made_by": "make_shards manifest",
                    "num_shards": len(shards), "num_samples": sum(c for c, _ in found),
                    "shards": [{"name": n, "index": n[:-4] + ".idx", "samples": c}
                               for n, (c, _) in zip(shards, found)]}
        output.write_text(MANIFEST, json.dumps(manifest, indent=1))
        log.info("%s: manifest of %d shards, %d samples; %d index file(s) made", out, len(shards),
                 manifest["num_samples"], made)
        return {**manifest, "indices_made": made}
    finally:
        output.close()
