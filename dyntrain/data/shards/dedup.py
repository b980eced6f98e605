"""De-duplication of the source images across the whole build, before the holdout split.

Two hashes per image, from its decoded pixels (EXIF orientation applied, 8-bit RGB):
  * exact: SHA-256 of the pixel array and its shape - the same photograph stored twice, even as
    different files (another container, other metadata, lossless re-encoding);
  * near: a 64-bit DCT perceptual hash (pHash). The luma is area-averaged to 32x32, transformed with
    a 2-D DCT-II, and the 8x8 lowest frequencies are compared with their median (the DC term left out
    of the median); bit k is set when coefficient k is above it. Low frequencies survive resizing and
    re-encoding, so copies differ in a few bits, while another crop of the same scene moves the
    content against the 32x32 grid and flips many.
Two images are near duplicates when their pHashes differ in at most ``NEAR_THRESHOLD`` = 6 of 64 bits
(measured on 12 of the synthetic photographs of ``dyntrain.data.synthetic``, 512x384: 0.5x and
0.75x resizes and JPEG q70 copies differ in 0-2 bits, crops shifted by 1/8 of the width in 24-32,
unrelated images in 24-42). Groups are the connected components of
"exact or near duplicate"; each group keeps ONE image: the one with the most pixels (the original
rather than a downscaled copy), ties broken by the earliest position in the source list; the others
are dropped and listed with the reason, the kept twin and the distance.

Pipeline (each step also runs as Slurm array tasks, see ``slurm/make_shards.sbatch``):
  1. ``make_shards index --part I/N``: hashes part I's block -> ``OUT/_dedup/index-IIII-of-NNNN.jsonl``;
  2. ``make_shards plan --parts N``: reads every index (refusing a missing one, or one of another
     source list), groups, writes ``OUT/_dedup/plan.json``;
  3. ``make_shards --dedup --part I/N``: the build drops the plan's images from the source list
     before the holdout split and the part blocks, so a held-out image has no twin in training.
Candidate pairs for the near test come from a multi-index: the 64 bits cut into 7 bands, any two
hashes within 6 bits agree exactly on at least one band (pigeonhole), so bucketing by each band
finds every pair without comparing all of them.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import numpy as np
from PIL import Image
from scipy.fft import dctn

from dyntrain.data.shards.patches import decode_capped
from dyntrain.data.storage.s3 import DataSourceError


NEAR_THRESHOLD = 6
HASH_NAME = "pHash-64 (32x32 area luma, 2-D DCT-II, 8x8 low frequencies vs their median)"
_CHUNK = 1024
_BANDS = [(0, 9), (9, 18), (18, 27), (27, 36), (36, 45), (45, 54), (54, 64)]


def phash(rgb: np.ndarray) -> int:
    """The 64-bit perceptual hash of an (H, W, 3) uint8 image (see the module docstring)."""
    grey = Image.fromarray(rgb).convert("L").resize((32, 32), Image.BOX)
    coeffs = dctn(np.asarray(grey, dtype=np.float64), type=2)  # unnormalised: 4x the plain sums
    low = coeffs[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def exact_hash(rgb: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgb.shape}".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def hash_image(task: tuple[int, str, int]) -> dict[str, Any]:
    """Index record of one image: (position, path, decoded-pixel cap) -> hashes and size, or the
    reason it has none (unreadable or over the cap: the build skips it anyway)."""
    index, path, cap = task
    rec: dict[str, Any] = {"i": index, "path": path}
    try:
        img, size = decode_capped(path, cap)
    except DataSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the build reports it as corrupt
        return {**rec, "skip": f"{type(exc).__name__}"}
    if img is None:
        return {**rec, "skip": "too_large"}
    rgb = np.asarray(img)
    return {**rec, "w": int(rgb.shape[1]), "h": int(rgb.shape[0]), "exact": exact_hash(rgb),
            "phash": f"{phash(rgb):016x}"}


class _Groups:
    """Union-find over image positions."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: np.ndarray, threshold: int = NEAR_THRESHOLD) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, of rows of the uint64 array ``hashes`` within ``threshold`` bits."""
    if threshold >= len(_BANDS):
        raise ValueError(f"threshold {threshold}: the multi-index guarantees at most {len(_BANDS) - 1}")
    pairs: set[tuple[int, int]] = set()
    for lo, hi in _BANDS:
        band = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(band, kind="stable")
        starts = np.flatnonzero(np.diff(band[order], prepend=np.uint64(band.max() + 1 if len(band) else 0)))
        for a, b in zip(starts, list(starts[1:]) + [len(order)]):
            members = order[a:b]
            if len(members) < 2:
                continue
            x = hashes[members]
            for c in range(0, len(members), _CHUNK):  # rows in chunks: memory _CHUNK x bucket
                dist = np.bitwise_count(x[c:c + _CHUNK, None] ^ x[None, :])
                for u, v in zip(*np.nonzero(dist <= threshold)):
                    i, j = int(members[c + u]), int(members[v])
                    if i != j:
                        pairs.add((min(i, j), max(i, j)))
    return pairs


def plan_from_records(records: list[dict[str, Any]], threshold: int = NEAR_THRESHOLD
                      ) -> dict[str, Any]:
    """Which images to drop (see the module docstring): ``dropped`` lists position, path, reason
    (exact|near), the kept twin's position and path, and the pHash distance."""
    recs = [r for r in records if "exact" in r]
    groups, first = _Groups(), {}
    for r in recs:
        twin = first.setdefault(r["exact"], r["i"])
        groups.union(twin, r["i"])
    hashes = np.array([int(r["phash"], 16) for r in recs], dtype=np.uint64)
    for a, b in near_pairs(hashes, threshold):
        groups.union(recs[a]["i"], recs[b]["i"])
    by_pos = {r["i"]: r for r in recs}
    members: dict[int, list[int]] = {}
    for r in recs:
        members.setdefault(groups.find(r["i"]), []).append(r["i"])
    dropped = []
    for group in members.values():
        if len(group) < 2:
            continue
        keep = min(group, key=lambda i: (-by_pos[i]["w"] * by_pos[i]["h"], i))
        k = by_pos[keep]
        for i in sorted(group):
            if i == keep:
                continue
            r = by_pos[i]
            exact = r["exact"] == k["exact"]
            dist = bin(int(r["phash"], 16) ^ int(k["phash"], 16)).count("1")
            dropped.append({"i": i, "path": r["path"], "reason": "exact" if exact else "near",
                            "kept_i": keep, "kept": k["path"], "distance": dist})
    dropped.sort(key=lambda d: d["i"])
    counts = {"exact": sum(d["reason"] == "exact" for d in dropped),
              "near": sum(d["reason"] == "near" for d in dropped)}
    return {"hash": HASH_NAME, "threshold": threshold, "images": len(records),
            "hashed": len(recs), "counts": counts,
            "keep_rule": "per group the most pixels, then the earliest in the source list",
            "dropped": dropped}


def apply_plan(sources: list[str], plan: Optional[dict[str, Any]]) -> list[str]:
    """The source list without the plan's dropped images (positions checked against paths)."""
    if plan is None:
        return sources
    drop = set()
    for d in plan["dropped"]:
        if d["i"] >= len(sources) or sources[d["i"]] != d["path"]:
            raise DataSourceError(f"de-duplication plan: image {d['i']} is {d['path']} in the plan "
                                  "but not in this source list (re-run index and plan)")
        drop.add(d["i"])
    return [s for i, s in enumerate(sources) if i not in drop]
