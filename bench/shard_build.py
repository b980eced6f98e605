"""Shard-building throughput: the builder (1 and 2 workers, and 2 parts + merge) against a plain
single-process loop doing the same decode, cut, encode and write, on real-sized photographs; and a
projection for the paper's 2.09M images on K nodes of C cores.

    python bench/shard_build.py [--images 12] [--size 1536x2048] [--rounds 2] [--mean-mp 4.0]
                                [--cores 32] [--nodes 1,4,16,64] [--json PATH]

  plain:    for each image: ``read_image``, the centred patch grid cut with numpy, JPEG q95 4:4:4
            per patch, one tar per ``--shard-samples`` patches - the floor issue 35 set;
  plain_crop: the same, cut with Pillow (``decode_rgb``, ``crop``: the same bytes, no numpy
            copies) - the stricter floor (``builder_vs_plain_crop_ratio``);
  builder:  ``build_shards`` with ``--workers 1`` and ``2`` (adds the luma, the flat filter, the
            quality scores, the checks of the encoded patches, the JSON members, the DALI index
            and SHA-256);
  parts:    ``build_shards(part=(i, 2))`` for i = 0, 1 one after the other with 1 worker, then
            ``merge_parts`` (what one node of a 2-node build does, and the merge);
  index:    the de-duplication index pass (decode + exact hash + pHash), 1 worker.
Per mode: images/s, patches/s and decoded megapixels/s, total and per worker; the modes run in
alternation ``--rounds`` times and each keeps its fastest round (the least disturbed by other load). The source images are
synthetic photographs (``dyntrain.data.synthetic``; smooth illumination, texture, shapes, flat
regions) saved as JPEG q95. The projection takes the builder's decoded MP/s per worker (1-worker
run) and assumes it scales linearly over cores and nodes (parts share nothing but the output
store), plus the index pass when de-duplicating: hours = 2.09e6 * mean_mp / (rate * K * C).
Each mode also records its CPU seconds (this process's threads and the reaped pool workers), which
other load on the machine disturbs far less than wall time; ``builder_vs_plain_cpu_ratio`` is the
plain loop's fewest CPU seconds over the 1-worker builder's. Each round records the 1-minute load
average when it starts (other processes on the machine), its own builder/plain ratio (wall and
CPU) and its 2-worker/1-worker scaling, so the spread is in the report.
Then each step of the build timed alone (ms per image, ``step_ms_per_image``: where the time goes).
Last line: ``builder_vs_plain_ratio=X`` (the builder's images/s with 1 worker over the plain loop's).
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import common
import numpy as np
from PIL import Image

from dyntrain.data.shards.dedup_steps import index_part
from dyntrain.data.shards.merge import merge_parts
from dyntrain.data.shards.patches import ShardBuildConfig, patch_grid
from dyntrain.data.shards.sources import list_sources
from dyntrain.data.shards.wds import write_tar
from dyntrain.data.shards.writer import build_shards
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.images import decode_rgb, read_image


PAPER_IMAGES = 2_090_000


def numpy_cut(path: str, patch: int) -> Iterator[tuple[int, int, Image.Image]]:
    """``read_image``, then per patch a contiguous copy and ``Image.fromarray`` (the issue's cut)."""
    rgb = read_image(path)
    for row, col, y, x in patch_grid(rgb.shape[0], rgb.shape[1], patch):
        yield row, col, Image.fromarray(np.ascontiguousarray(rgb[y:y + patch, x:x + patch]))


def pillow_cut(path: str, patch: int) -> Iterator[tuple[int, int, Image.Image]]:
    """``decode_rgb``, then Pillow's ``crop`` per patch: the same pixels, no numpy copies."""
    img = decode_rgb(path)
    img.info = {}  # as the builder: no source comment in the patches
    for row, col, y, x in patch_grid(img.height, img.width, patch):
        yield row, col, img.crop((x, y, x + patch, y + patch))


def plain_loop(paths: list[str], out: Path, patch: int, shard_samples: int,
               cut: Callable[[str, int], Iterator] = numpy_cut) -> int:
    """Decode, cut, encode (JPEG q95 4:4:4) and write tars in one process; returns the patches."""
    pending, shards, total = [], 0, 0
    for i, path in enumerate(paths):
        for row, col, tile in cut(path, patch):
            buf = io.BytesIO()
            tile.save(buf, "JPEG", quality=95, subsampling=0)
            pending.append((f"{i:07d}_{row:03d}_{col:03d}", (("jpg", buf.getvalue()),)))
            total += 1
            if len(pending) == shard_samples:
                write_tar(out / f"plain-{shards:06d}.tar", pending)
                pending, shards = [], shards + 1
    if pending:
        write_tar(out / f"plain-{shards:06d}.tar", pending)
    return total


def cpu_now() -> float:
    """CPU seconds of this process (all its threads) and of its reaped children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rates(seconds: float, images: int, patches: int, mpix: float, workers: int,
          cpu: float = float("nan")) -> dict:
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "workers": workers,
            "images_per_s": images / seconds, "images_per_cpu_s": images / cpu,
            "patches_per_s": patches / seconds, "mpix_per_s": mpix / seconds,
            "images_per_s_per_worker": images / seconds / workers,
            "patches_per_s_per_worker": patches / seconds / workers,
            "mpix_per_s_per_worker": mpix / seconds / workers}


def one_round(work: Path, sources: list[str], cfg: dict, n: int, mpix: float, patches: int) -> dict:
    """Every mode once, into fresh folders under ``work``."""
    for sub in ("plain", "crop", "b1", "b2", "parts", "idx"):
        shutil.rmtree(work / sub, ignore_errors=True)
    out: dict[str, dict] = {}
    t, c = common.now(), cpu_now()
    (work / "plain").mkdir()
    assert plain_loop(sources, work / "plain", cfg["patch_size"], cfg["shard_samples"]) == patches
    out["plain"] = rates(common.now() - t, n, patches, mpix, 1, cpu_now() - c)
    t, c = common.now(), cpu_now()
    (work / "crop").mkdir()
    assert plain_loop(sources, work / "crop", cfg["patch_size"], cfg["shard_samples"], pillow_cut) == patches
    out["plain_crop"] = rates(common.now() - t, n, patches, mpix, 1, cpu_now() - c)
    for workers in (1, 2):
        t, c = common.now(), cpu_now()
        m = build_shards([work / "src"], str(work / f"b{workers}"),
                         ShardBuildConfig(workers=workers, **cfg), progress=False)
        out[f"builder_w{workers}"] = rates(common.now() - t, n, m["counts"]["patches_total"],
                                           mpix, workers, cpu_now() - c)
        out[f"builder_w{workers}"]["patches_kept"] = m["num_samples"]
    part_s, c = [], cpu_now()
    for i in range(2):
        t = common.now()
        build_shards([work / "src"], str(work / "parts"), ShardBuildConfig(workers=1, **cfg),
                     progress=False, part=(i, 2))
        part_s.append(common.now() - t)
    t = common.now()
    m = merge_parts(str(work / "parts"), progress=False)
    merge_s = common.now() - t
    out["parts_2x1"] = rates(sum(part_s), n, m["counts"]["patches_total"], mpix, 1, cpu_now() - c)
    out["parts_2x1"].update(part_seconds=[round(s, 3) for s in part_s], merge_seconds=round(merge_s, 3))
    t, c = common.now(), cpu_now()
    index_part(sources, {}, str(work / "idx"), (0, 1), 200_000_000, 1, progress=False)
    out["index_w1"] = rates(common.now() - t, n, 0, mpix, 1, cpu_now() - c)
    return out


def step_times(paths: list[str], cfg: ShardBuildConfig, repeats: int) -> dict[str, float]:
    """Where an image's time goes: milliseconds per image of each step of ``process_image`` and of
    the shard write, each step timed on its own over all images (best of ``repeats``), on the same
    patches the builder keeps."""
    import time

    from dyntrain.data.shards import quality
    from dyntrain.data.shards.patches import check_decodes, check_jpeg_structure, encode

    p, qf = cfg.patch_size, cfg.quality_filter()
    imgs = [decode_rgb(path) for path in paths]
    boxes = [[(x, y, x + p, y + p) for _r, _c, y, x in patch_grid(im.height, im.width, p)] for im in imgs]
    tiles = [[im.crop(b) for b in bx] for im, bx in zip(imgs, boxes)]
    lumas = [[np.asarray(t.convert("L")) for t in ts] for ts in tiles]
    keep = [[quality.flat_fraction(lum, cfg.flat_block, cfg.flat_threshold) <= cfg.max_flat_frac
             for lum in ls] for ls in lumas]
    kept = [[t for t, k in zip(ts, ks) if k] for ts, ks in zip(tiles, keep)]
    kept_l = [[lum for lum, k in zip(ls, ks) if k] for ls, ks in zip(lumas, keep)]
    data = [[encode(t, "jpg", cfg.jpeg_quality, full_check=False) for t in ts] for ts in kept]
    samples = [(f"{i:07d}_{j:03d}", (("jpg", d), ("json", b'{"key": "0000000_000_000"}' * 8)))
               for i, ds in enumerate(data) for j, d in enumerate(ds)]
    out = Path(tempfile.mkdtemp(prefix="shard_steps-"))
    def each(fn, items):  # results dropped at once: a step's memory is reused, as in the build
        def run():
            for item in items:
                fn(item)
        return run
    flat = lambda lum: quality.flat_fraction(quality.PatchLuma(lum), cfg.flat_block,  # noqa: E731
                                             cfg.flat_threshold)
    steps = {
        "decode": each(decode_rgb, paths),
        "cut (crop)": each(lambda ib: [ib[0].crop(b) for b in ib[1]], list(zip(imgs, boxes))),
        "luma (Pillow, per patch)": each(lambda t: np.asarray(t.convert("L")), sum(tiles, [])),
        "flat detector": each(flat, sum(lumas, [])),
        "scores (kept)": each(lambda lum: qf.scores(None, quality.PatchLuma(lum)), sum(kept_l, [])),
        "JPEG encode (kept)": each(lambda t: encode(t, "jpg", cfg.jpeg_quality, full_check=False),
                                   sum(kept, [])),
        "structure check (kept)": each(lambda d: check_jpeg_structure(d, p, p), sum(data, [])),
        "decode check (1 a image)": each(check_decodes, [ds[0] for ds in data if ds]),
        "tar + index + SHA-256": lambda: write_tar(out / "steps.tar", samples),
    }
    times = {}
    try:
        for name, fn in steps.items():
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            times[name] = best * 1e3 / len(paths)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", default="1536x2048", help="HxW of the synthetic photographs")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--shard-samples", type=int, default=1000)
    p.add_argument("--mean-mp", type=float, default=4.0,
                   help="assumed mean megapixels of the paper's source images (projection)")
    p.add_argument("--cores", type=int, default=32, help="cores per node (projection)")
    p.add_argument("--nodes", default="1,4,16,64", help="node counts of the projection")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="shard_build_bench-"))
    write_synthetic_images(work / "src", args.images, size=(h, w), seed=3, fmt="jpg", quality=95)
    sources = list_sources([work / "src"])[0]
    n, mpix = len(sources), len(sources) * h * w / 1e6
    patches_plain = len(patch_grid(h, w, args.patch_size)) * n
    cfg = dict(patch_size=args.patch_size, shard_samples=args.shard_samples)
    results: dict[str, dict] = {}
    rounds: list[dict] = []

    try:
        for _ in range(args.rounds):
            load = os.getloadavg()[0]
            one = one_round(work, sources, cfg, n, mpix, patches_plain)
            rounds.append({"load_1min": load,
                           "ratio": one["builder_w1"]["images_per_s"] / one["plain"]["images_per_s"],
                           "crop_ratio": one["builder_w1"]["images_per_s"]
                           / one["plain_crop"]["images_per_s"],
                           "cpu_ratio": one["plain"]["cpu_seconds"] / one["builder_w1"]["cpu_seconds"],
                           "two_worker_scaling": one["builder_w2"]["images_per_s"]
                           / one["builder_w1"]["images_per_s"],
                           "seconds": {k: r["seconds"] for k, r in one.items()},
                           "cpu_seconds": {k: r["cpu_seconds"] for k, r in one.items()}})
            for name, r in one.items():
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
        steps = step_times(sources, ShardBuildConfig(**cfg), max(3, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n} images {w}x{h} ({h * w / 1e6:.2f} MP, JPEG q95), patch {args.patch_size}, "
          f"{patches_plain} patches cut")
    print(f"{'mode':<12} {'workers':>7} {'s':>8} {'img/s':>8} {'patch/s':>8} {'MP/s':>8} "
          f"{'img/s/wk':>9} {'MP/s/wk':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['workers']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>8.3f} "
              f"{r['patches_per_s']:>8.2f} {r['mpix_per_s']:>8.2f} {r['images_per_s_per_worker']:>9.3f} "
              f"{r['mpix_per_s_per_worker']:>8.2f}")
    for i, r in enumerate(rounds):
        print(f"round {i}: load {r['load_1min']:.2f}, builder/plain {r['ratio']:.3f} "
              f"(/plain_crop {r['crop_ratio']:.3f}) "
              f"(CPU time {r['cpu_ratio']:.3f}), 2 workers/1 {r['two_worker_scaling']:.2f}")
    print("ms per image, step by step (each timed alone, best of the rounds):")
    for name, ms in steps.items():
        print(f"  {name:<26} {ms:7.2f}")
    ratio = results["builder_w1"]["images_per_s"] / results["plain"]["images_per_s"]
    crop_ratio = results["builder_w1"]["images_per_s"] / results["plain_crop"]["images_per_s"]
    scaling = results["builder_w2"]["images_per_s"] / results["builder_w1"]["images_per_s"]
    cpu_ratio = (min(r["cpu_seconds"]["plain"] for r in rounds)
                 / min(r["cpu_seconds"]["builder_w1"] for r in rounds))
    print(f"builder(1 worker) / plain loop = {ratio:.3f} (CPU seconds: {cpu_ratio:.3f}), "
          f"/ plain loop cutting with Pillow = {crop_ratio:.3f}; "
          f"2 workers / 1 worker = {scaling:.2f}; "
          f"2 parts + merge / 1 worker = "
          f"{results['builder_w1']['seconds'] / (results['parts_2x1']['seconds'] + results['parts_2x1']['merge_seconds']):.3f}")
    build_rate = results["builder_w1"]["mpix_per_s_per_worker"]
    index_rate = results["index_w1"]["mpix_per_s_per_worker"]
    total_mp = PAPER_IMAGES * args.mean_mp
    projection = []
    print(f"projection: {PAPER_IMAGES:,} images x {args.mean_mp} MP = {total_mp / 1e6:.2f} TP; "
          f"build {build_rate:.2f} MP/s/worker, dedup index {index_rate:.2f} MP/s/worker, "
          f"{args.cores} cores/node, linear scaling assumed")
    for k in (int(v) for v in args.nodes.split(",")):
        cores = k * args.cores
        build_h = total_mp / (build_rate * cores) / 3600
        index_h = total_mp / (index_rate * cores) / 3600
        projection.append({"nodes": k, "cores": cores, "build_hours": build_h,
                           "with_dedup_hours": build_h + index_h})
        print(f"  {k:>3} nodes x {args.cores} cores: build {build_h:7.2f} h, with de-duplication "
              f"{build_h + index_h:7.2f} h")
    common.write_json(args.json, {"images": n, "size": [h, w], "patch_size": args.patch_size,
                                  "results": results, "builder_vs_plain_ratio": ratio,
                                  "builder_vs_plain_cpu_ratio": cpu_ratio,
                                  "builder_vs_plain_crop_ratio": crop_ratio,
                                  "two_worker_scaling": scaling, "mean_mp": args.mean_mp,
                                  "cores_per_node": args.cores, "projection": projection,
                                  "rounds": rounds, "cpu_count": os.cpu_count(),
                                  "step_ms_per_image": steps,
                                  "command": "python " + " ".join(sys.argv)})
    common.headline("builder_vs_plain_ratio", ratio)


if __name__ == "__main__":
    main()
