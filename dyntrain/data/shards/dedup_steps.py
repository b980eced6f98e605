"""The de-duplication steps over a build's output (see ``dyntrain.data.shards.dedup`` for the rule):
the index pass of one part, the plan over all parts, and the plan's use by the build.

Files, under ``OUT/_dedup/`` (a folder or an s3:// prefix):
  ``index-IIII-of-NNNN.jsonl``  a header line (source-list digest, part, decoded-pixel cap), then one
                                record a source image of the part: position, path, width, height,
                                exact hash, pHash (or the reason it has none);
  ``plan.json``                 the source-list digest, hash and threshold, counts per reason and the
                                dropped images (position, path, reason, kept twin, distance).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from dyntrain.data.shards.dedup import NEAR_THRESHOLD, hash_image, plan_from_records
from dyntrain.data.shards.patches import ShardBuildConfig
from dyntrain.data.shards.pool import ordered_map
from dyntrain.data.shards.sources import Provenance, part_block, sources_digest
from dyntrain.data.storage.output import ShardOutput
from dyntrain.data.storage.s3 import DataSourceError, join_url
from dyntrain.logs import get_logger
from dyntrain.progress import progress_bar


log = get_logger(__name__)

DEDUP_DIR = "_dedup"
PLAN = "plan.json"


def index_name(part: int, parts: int) -> str:
    return f"index-{part:04d}-of-{parts:04d}.jsonl"


def _folder(out: str) -> ShardOutput:
    return ShardOutput(join_url(str(out).rstrip("/"), DEDUP_DIR))


def index_part(sources: list[str], prov: Provenance, out: str, part: tuple[int, int], cap: int,
               workers: int = 0, progress: bool = True, pixel_limit: int = ShardBuildConfig.max_image_pixels) -> dict[str, Any]:
    """Hash part ``part``'s block of ``sources`` into ``OUT/_dedup``; a finished index of the same
    source list and cap is kept. ``pixel_limit``: Pillow's decompression-bomb limit, the build's
    (``--max-image-pixels``). Returns the header (with ``up_to_date`` when nothing was done)."""
    folder = _folder(out)
    name = index_name(*part)
    header = {"sources_digest": sources_digest(sources, prov), "part": part[0], "parts": part[1],
              "max_decoded_pixels": cap}
    try:
        old = folder.read_text(name)
        if old is not None and json.loads(old.split("\n", 1)[0]) == header:
            return {**header, "up_to_date": f"{folder.url_of(name)} indexes the same sources"}
        tasks = [(i, sources[i], cap) for i in part_block(len(sources), *part)]
        n = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
        lines = [json.dumps(header)]
        with progress_bar(len(tasks), "[make_shards index] images", "img", progress) as bar:
            for rec in ordered_map(hash_image, tasks, n, pixel_limit, path_of=lambda task: task[1],
                                   what="make_shards index"):
                lines.append(json.dumps(rec))
                bar.update(1)
        folder.write_text(name, "\n".join(lines) + "\n")
        return header
    finally:
        folder.close()


def make_plan(out: str, parts: int, threshold: int = NEAR_THRESHOLD,
              progress: bool = True) -> dict[str, Any]:
    """Read the ``parts`` indices of ``OUT/_dedup`` (refusing a missing one or one of another source
    list, naming it), group the duplicates, write ``plan.json``. Returns the plan."""
    folder = _folder(out)
    try:
        records: list[dict[str, Any]] = []
        digest = None
        for i in range(parts):
            text = folder.read_text(index_name(i, parts))
            if text is None:
                raise DataSourceError(f"plan: part {i} of {parts} has no index: "
                                      f"{folder.url_of(index_name(i, parts))} (run make_shards index)")
            lines = text.splitlines()
            header = json.loads(lines[0])
            digest = digest or header["sources_digest"]
            if header["sources_digest"] != digest:
                raise DataSourceError(f"plan: {folder.url_of(index_name(i, parts))} indexes another "
                                      "source list than part 0")
            records.extend(json.loads(ln) for ln in lines[1:] if ln)
        plan = {"sources_digest": digest, "parts": parts, **plan_from_records(records, threshold)}
        folder.write_text(PLAN, json.dumps(plan, indent=1))
        if progress:
            log.info("de-duplication plan %s: %d images, drop %d exact and %d near duplicates",
                     folder.url_of(PLAN), plan["images"], plan["counts"]["exact"], plan["counts"]["near"])
        return plan
    finally:
        folder.close()


def load_plan(out: str, sources: list[str], prov: Provenance) -> Optional[dict[str, Any]]:
    """The plan of ``OUT/_dedup`` when it was made from this source list; None when there is none;
    raises when it belongs to another source list."""
    folder = _folder(out)
    try:
        text = folder.read_text(PLAN)
        url = folder.url_of(PLAN)
    finally:
        folder.close()
    if text is None:
        return None
    plan = json.loads(text)
    if plan.get("sources_digest") != sources_digest(sources, prov):
        raise DataSourceError(f"{url} was made from another source list: run make_shards index and "
                              "plan again")
    return {**plan, "url": url}


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """What a build's manifest records of the plan it applied."""
    return {"plan": plan["url"], "hash": plan["hash"], "threshold": plan["threshold"],
            "keep_rule": plan["keep_rule"], "images_dropped": plan["counts"]}
