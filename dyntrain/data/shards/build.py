"""The shard builder's command line (``python launch/make_shards.py``; logic in ``writer.py``).

    make_shards.py --src DIR ... --out OUT [--part I/N] ...   build (all of it, or part I of N)
    make_shards.py merge --out OUT [--out VAL_OUT] [--parts N] join the parts of a parted build
    make_shards.py index --src DIR ... --out OUT --part I/N     de-duplication: hash part I's images
    make_shards.py plan --out OUT --parts N                     de-duplication: the plan over all parts
    make_shards.py --dedup ...                                  build without the plan's duplicates
    make_shards.py manifest --out OUT [--force]                 a manifest (and missing DALI indices)
                                                                for shards made by other tools

stdout carries one JSON line (output, shard and sample counts), and a second one for the validation
shards with ``--holdout``; the log goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from dyntrain.data.shards.builder import empty_message
from dyntrain.data.shards.dedup import NEAR_THRESHOLD, apply_plan
from dyntrain.data.shards.dedup_steps import index_part, load_plan, make_plan, plan_summary
from dyntrain.data.shards.foreign import describe_shards
from dyntrain.data.shards.merge import merge_parts
from dyntrain.data.shards.patches import ShardBuildConfig
from dyntrain.data.shards.sources import list_sources, parse_part
from dyntrain.data.shards.writer import build_shards, build_with_holdout
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.errors import DyntrainError, cli_main
from dyntrain.logs import get_logger, setup_logging


log = get_logger(__name__)


def _threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_merge_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make_shards.py merge",
        description="Check the parts of a parted build (make_shards --part I/N) and write the one "
                    "manifest.json and patches.jsonl over all of them.")
    p.add_argument("--out", action="append", required=True, metavar="DIR_OR_S3_URL",
                   help="the parts' output (repeat: e.g. the training and the validation output)")
    p.add_argument("--parts", type=int, default=0, metavar="N", help="expected number of parts")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def merge_main(argv: list[str]) -> int:
    args = parse_merge_args(argv)
    setup_logging(stream=sys.stderr)
    for out in args.out:
        m = merge_parts(out, args.parts, progress=not args.quiet)
        print(json.dumps({"out": out, "num_shards": m["num_shards"], "num_samples": m["num_samples"],
                          "parts": len(m["parts"]), "counts": m["counts"],
                          **({"up_to_date": m["up_to_date"]} if "up_to_date" in m else {})}))
    return 0


def manifest_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="make_shards.py manifest",
        description="Write manifest.json and the missing DALI indices for a WebDataset shard folder "
                    "made by other tools (img2dataset, tarp): training then starts on it without "
                    "listing the folder or opening every shard.")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_URL", help="the shard folder")
    p.add_argument("--force", action="store_true", help="replace a manifest that lists other shards")
    args = p.parse_args(argv)
    setup_logging(stream=sys.stderr)
    m = describe_shards(args.out, force=args.force)
    print(json.dumps({"out": args.out, "num_shards": m["num_shards"], "num_samples": m["num_samples"],
                      "indices_made": m.get("indices_made", 0), "up_to_date": m.get("up_to_date", False)}))
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="make_shards.py plan",
        description="Group the exact and near duplicates over the indices of all N parts "
                    "(make_shards index --part I/N) and write OUT/_dedup/plan.json.")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_URL")
    p.add_argument("--parts", type=int, default=1, metavar="N")
    p.add_argument("--threshold", type=int, default=NEAR_THRESHOLD,
                   help="pHash bits (of 64) within which two images are near duplicates")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(stream=sys.stderr)
    plan = make_plan(args.out, args.parts, args.threshold, progress=not args.quiet)
    print(json.dumps({"out": args.out, "images": plan["images"], "dropped": plan["counts"]}))
    return 0


def _dedup(args: argparse.Namespace, sources: list[str], prov: dict) -> tuple[list[str], dict]:
    """The source list without the plan's duplicates, and the manifest's record of the plan; a
    single-machine build makes the plan itself when it has none for these sources."""
    try:
        plan = load_plan(args.out, sources, prov)
    except DataSourceError:
        if args.part is not None:
            raise
        plan = None
    if plan is None:
        if args.part is not None:
            raise DataSourceError(f"--dedup: no de-duplication plan in {args.out}: run make_shards "
                                  "index (every part) and plan first")
        index_part(sources, prov, args.out, (0, 1), args.max_decoded_pixels, args.workers,
                   not args.quiet)
        make_plan(args.out, 1, progress=not args.quiet)
        plan = load_plan(args.out, sources, prov)
    return apply_plan(sources, plan), {"dedup": plan_summary(plan)}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Cut photographs into patches, filter flat/low-quality ones, write WebDataset "
                    "shards with DALI indices and a manifest to a folder or s3://bucket/prefix.")
    p.add_argument("--src", action="append", default=[], metavar="DIR_OR_S3",
                   help="image folder (recursive) or s3:// prefix; repeat for several")
    p.add_argument("--src-list", action="append", default=[], metavar="FILE",
                   help="CSV or JSONL list of images: path (or url), optional source, link, license")
    p.add_argument("--part", type=_part, default=None, metavar="I/N",
                   help="build part I (0-based) of N: a fixed block of the source list; then merge")
    p.add_argument("--max-decoded-pixels", type=int, default=ShardBuildConfig.max_decoded_pixels,
                   metavar="PIXELS", help="skip (reason too_large) images with more pixels; decoding "
                   "takes up to ~12 bytes a pixel, so the default 200e6 keeps a worker under 2.4 GB")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_URL")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--shard-samples", type=int, default=1000, metavar="N")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg",
                   help="jpg = high-quality JPEG (4:4:4), png = lossless")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--flat-block", type=int, default=16, help="cell side of the flat detector")
    p.add_argument("--flat-threshold", type=float, default=4.0,
                   help="RMS gradient of the 8-bit luma (levels/pixel) below which a cell is flat")
    p.add_argument("--max-flat-frac", type=float, default=0.5,
                   help="drop a patch whose flat fraction exceeds this")
    p.add_argument("--min-sharpness", type=float, default=None,
                   help="drop patches whose Laplacian variance is below this")
    p.add_argument("--max-noise", type=float, default=None,
                   help="drop patches whose estimated noise sigma (8-bit levels) exceeds this")
    p.add_argument("--quality-hook", default=None, metavar="MODULE:FUNCTION",
                   help="callable(rgb uint8 HxWx3) -> {score: value} adding quality scores")
    p.add_argument("--quality-min", type=_threshold, action="append", default=[], metavar="NAME=V")
    p.add_argument("--quality-max", type=_threshold, action="append", default=[], metavar="NAME=V")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all CPUs)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRAC",
                   help="hold out this fraction of the source images: every patch of a held-out "
                        "image goes to the validation shards (--val-out), never to --out")
    p.add_argument("--val-out", default=None, metavar="DIR_OR_S3_URL",
                   help="where the held-out images' shards go (default: <out>-val)")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out image draw")
    p.add_argument("--dedup", action="store_true",
                   help="leave out the exact and near duplicates of OUT/_dedup/plan.json (made by "
                        "index + plan; a build without --part makes it itself)")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["manifest"]:
        return manifest_main(argv[1:])
    index = argv[:1] == ["index"]
    args = parse_args(argv[1:] if index else argv)
    setup_logging(stream=sys.stderr)
    if not args.src and not args.src_list:
        raise DyntrainError("make_shards: give the images with --src and/or --src-list")
    if index:
        sources, prov = list_sources(args.src, args.src_list)
        head = index_part(sources, prov, args.out, args.part or (0, 1), args.max_decoded_pixels,
                          args.workers, not args.quiet)
        print(json.dumps({"out": args.out, **head}))
        return 0
    qmin, qmax = dict(args.quality_min), dict(args.quality_max)
    if args.min_sharpness is not None:
        qmin["sharpness"] = args.min_sharpness
    if args.max_noise is not None:
        qmax["noise"] = args.max_noise
    try:
        cfg = ShardBuildConfig(patch_size=args.patch_size, shard_samples=args.shard_samples,
                               image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                               flat_block=args.flat_block, flat_threshold=args.flat_threshold,
                               max_flat_frac=args.max_flat_frac, quality_min=qmin,
                               quality_max=qmax, quality_hook=args.quality_hook,
                               workers=args.workers, prefix=args.prefix,
                               max_decoded_pixels=args.max_decoded_pixels)
        sources, prov = list_sources(args.src, args.src_list)
        extra: dict = {}
        if args.dedup:  # before the holdout split: a held-out image has no twin in training
            sources, extra = _dedup(args, sources, prov)
        val = None
        if args.holdout:
            val_out = args.val_out or args.out.rstrip("/") + "-val"
            manifest, val = build_with_holdout(args.src, args.out, val_out, args.holdout, cfg,
                                               args.holdout_seed, args.force, not args.quiet,
                                               sources=sources, prov=prov, part=args.part, extra=extra)
        else:
            manifest = build_shards(args.src, args.out, cfg, force=args.force, progress=not args.quiet,
                                    sources=sources, prov=prov, part=args.part, extra=extra)
    except ValueError as exc:  # a bad option value (ShardBuildConfig); DyntrainErrors pass through
        if isinstance(exc, DyntrainError):
            raise
        raise DyntrainError(f"make_shards: {exc}") from None
    if manifest["num_samples"] == 0 and args.part is None:
        # every patch filtered out: the manifest says why, but no data (a part may be empty)
        raise DataSourceError(empty_message(args.src + args.src_list, manifest["counts"],
                                            args.patch_size, args.out))
    print(json.dumps({"out": args.out, "num_shards": manifest["num_shards"],
                      "num_samples": manifest["num_samples"], "counts": manifest["counts"],
                      **({"up_to_date": manifest["up_to_date"]} if "up_to_date" in manifest else {})}))
    if val is not None:
        print(json.dumps({"val_out": val["holdout"]["val_out"], "num_shards": val["num_shards"],
                          "num_samples": val["num_samples"],
                          "val_images": len(val["holdout"]["val_images"])}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
