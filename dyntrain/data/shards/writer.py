"""Shard builder: photographs -> WebDataset shards of 512x512 patches, on one machine or in parts.

    python launch/make_shards.py --src DIR_OR_S3 [--src ...] [--src-list FILE] --out DIR_OR_S3_URL \
        [--patch-size 512] [--shard-samples N] [--format jpg|png] [--workers N] [--part I/N] ...
    python launch/make_shards.py merge --out DIR_OR_S3_URL      # after the N parts

Images are processed in a process pool (``dyntrain.data.shards.patches``: decode, cut, filter, encode);
results are consumed in source order, so the output does not depend on the number of workers.
Sources and parts: ``dyntrain.data.shards.sources``; the build itself: ``builder.py``.

Output (``OUT`` is a folder or ``s3://bucket/prefix``, see ``dyntrain.data.storage.output``):
  ``shard-000000.tar``  WebDataset shard: ``<key>.jpg|png`` + ``<key>.json`` per sample. Keys have no
                        dots: ``<image index:07d>_<row:03d>_<col:03d>`` (the index in the whole
                        source list). The JSON holds the source path, the patch position (x, y, row,
                        col), the patch and image resolution, the flat fraction, the quality scores
                        and, from a ``--src-list``, the image's ``provenance`` (source, link, license).
  ``shard-000000.idx``  the DALI index of that shard (format v1.2, as ``wds2idx`` writes it).
  ``patches.jsonl``     one line per kept patch (key, shard, source, position, scores).
  ``manifest.json``     written last: build settings, counts kept/dropped per reason and per source,
                        skipped images with the reason, shard list with sample counts, bytes, SHA-256.
Part I of N writes ``shard-pIIII-000000.tar|idx``, ``patches-pIIII.jsonl`` and
``part-IIII-of-NNNN.json`` instead; ``merge`` (``dyntrain.data.shards.merge``) checks the parts and
writes ``patches.jsonl`` and ``manifest.json`` over all of them. Part shard names sort in source
order, so a folder or prefix of merged parts reads exactly as a single-machine build.

Re-running is safe: shards are written under a temporary name and renamed (local) or uploaded whole
(S3 objects appear atomically), the manifest is written last, shard names and contents are
deterministic, and shards of an earlier build that the new manifest does not list are removed after
the manifest is written. A re-run whose sources and settings match the existing manifest does
nothing (the returned manifest's ``up_to_date`` says why; ``--force`` rebuilds). A killed build
resumes after its last complete shard (``dyntrain.data.shards.resume``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from dyntrain.data.shards.builder import BUILDER_VERSION, Builder
from dyntrain.data.shards.patches import ShardBuildConfig
from dyntrain.data.shards.resume import Journal
from dyntrain.data.shards.sources import (Provenance, list_sources, part_block, sources_digest, split_holdout,
                                          stat_digest)
from dyntrain.data.storage.output import ShardOutput
from dyntrain.logs import get_logger


log = get_logger(__name__)

MANIFEST = "manifest.json"
PATCH_LIST = "patches.jsonl"


def build_fingerprint(cfg: ShardBuildConfig, sources: list[str], prov: Provenance,
                      mine: list[str], extra: Optional[dict[str, Any]] = None) -> str:
    """What a build's output depends on: the settings, the whole source list with its provenance,
    the sizes and times of the images it reads (``mine``), and ``extra`` (part, de-duplication plan)."""
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "cfg": cfg.fingerprint_dict(), **(extra or {})},
                        sort_keys=True).encode())
    h.update(sources_digest(sources, prov).encode())
    h.update(stat_digest(mine).encode())
    return h.hexdigest()


def up_to_date(output: ShardOutput, fingerprint: str, manifest_name: str = MANIFEST
               ) -> Optional[dict[str, Any]]:
    """The existing manifest when it was built from the same sources and settings and every shard
    it lists is present; None otherwise."""
    old = output.read_text(manifest_name)
    if old is None:
        return None
    try:
        manifest = json.loads(old)
    except json.JSONDecodeError:
        return None
    names = set(output.list_names())
    if manifest.get("fingerprint") == fingerprint and all(
            s["name"] in names and s["index"] in names for s in manifest.get("shards", [])):
        return manifest
    return None


def build_with_holdout(srcs: list[str | Path], out: str, val_out: str, frac: float,
                       cfg: Optional[ShardBuildConfig] = None, seed: int = 0, force: bool = False,
                       progress: bool = True, *, sources: Optional[list[str]] = None,
                       prov: Optional[Provenance] = None, part: Optional[tuple[int, int]] = None,
                       extra: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every patch of a held-out image goes to ``val_out``, never to ``out``; both manifests record
    the split (``split`` and ``holdout``: fraction, seed, both outputs and the held-out images).
    The split is drawn over the whole source list, so every part of a build draws the same one."""
    if str(val_out).rstrip("/") == str(out).rstrip("/"):
        raise ValueError("--val-out must differ from --out (validation shards live apart)")
    if sources is None:
        sources, prov = list_sources(srcs)
    train, held = split_holdout(sources, frac, seed)
    record = {"frac": frac, "seed": seed, "train_out": str(out), "val_out": str(val_out),
              "val_images": held}
    manifests = []
    for split, share, dest in (("train", train, out), ("val", held, val_out)):
        manifests.append(build_shards(srcs, dest, cfg, force, progress, sources=share, prov=prov,
                                      part=part, extra={**(extra or {}), "split": split,
                                                        "holdout": record}))
    return manifests[0], manifests[1]


def part_names(part: Optional[tuple[int, int]], prefix: str) -> tuple[str, str, str]:
    """(shard prefix, manifest name, patch list name) of a whole build or of part (I, N)."""
    if part is None:
        return prefix, MANIFEST, PATCH_LIST
    i, n = part
    return f"{prefix}-p{i:04d}", f"part-{i:04d}-of-{n:04d}.json", f"patches-p{i:04d}.jsonl"


def build_shards(srcs: list[str | Path], out: str, cfg: Optional[ShardBuildConfig] = None,
                 force: bool = False, progress: bool = True, *, sources: Optional[list[str]] = None,
                 prov: Optional[Provenance] = None, part: Optional[tuple[int, int]] = None,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Build the shards of ``srcs`` (or of the image list ``sources`` with its provenance ``prov``)
    into ``out`` (folder or s3:// prefix); ``part`` = (I, N) builds part I's block only (manifest
    ``part-I-of-N.json``, shards ``<prefix>-pIIII-NNNNNN.tar``; ``merge`` joins them); ``extra`` is
    added to the manifest. A killed build resumes after its last complete shard. Returns the manifest."""
    cfg = cfg or ShardBuildConfig()
    cfg.quality_filter()  # a bad hook fails here, not in every worker
    if sources is None:
        sources, prov = list_sources(srcs)
    prov = prov or {}
    block = part_block(len(sources), *part) if part else range(len(sources))
    tasks = [(i, sources[i], prov.get(sources[i], {})) for i in block]
    extra = dict(extra or {})
    if part is not None:
        extra["part"] = {"index": part[0], "parts": part[1], "first_image": block.start,
                         "images": len(block), "sources_digest": sources_digest(sources, prov),
                         "settings": cfg.fingerprint_dict()}
    fingerprint = build_fingerprint(cfg, sources, prov, [t[1] for t in tasks],
                                    {"part": list(part) if part else None, **extra})
    names = part_names(part, cfg.prefix)
    output = ShardOutput(str(out))
    journal = Journal(output, names[0])
    try:
        output.remove_leftovers(names[0], names[1:])
        manifest = None if force else up_to_date(output, fingerprint, names[1])
        if manifest is not None:
            manifest["up_to_date"] = (f"{output.url_of(names[1])} lists the same sources and settings "
                                      f"and all its {manifest['num_shards']} shards are present")
            if progress:
                log.info("up to date, nothing to do: %s", manifest["up_to_date"])
            return manifest
        return Builder(tasks, output, cfg, progress, [str(s) for s in srcs], extra, names,
                        journal).run(fingerprint, force)
    finally:
        output.close()
