"""Pre-training data throughput: the DALI loader against a plain WebDataset + PIL + torch DataLoader
pipeline doing the same work, on the same shards, in one run.

    python bench/data_throughput.py [--urls 'DIR/shard-*.tar'] [--workers 2] [--batch 32]
                                    [--crop 128] [--decode auto|cpu|mixed] [--json PATH]

Both pipelines, per sample: decode a 512x512 patch, take a random crop, pick a degradation kind
(JPEG at a random quality / Gaussian noise / salt-and-pepper) for a random 50% of the crop's blocks,
mask another 30%, and deliver float32 NCHW (input, target, mask) batches in [0, 1] to the main
process (on the GPU for the DALI loader when one is used).

  dali:  dyntrain.data.pretrain.pipeline.DaliPretrainLoader, DALI with ``--workers`` CPU threads (decode
         "cpu", or "mixed" = nvJPEG when a GPU is present), the region/noise step vectorised in
         torch on the training device.
  plain: webdataset.WebDataset -> shuffle -> per-sample PIL decode, crop, PIL JPEG round trip /
         NumPy noise, masks -> torch DataLoader with ``--workers`` worker processes.

Without ``--urls`` the benchmark makes its own shards first (synthetic photographs, 512x512 patches)
in a temporary folder. The two loaders are timed in alternating rounds after a warm-up; the figure
per loader is its median patches/s over the rounds. Last line: ``dali_vs_plain_ratio=X.XX``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from dyntrain.data.pretrain.degrade import DegradeSpec, batch_params, degrade_reference  # noqa: E402
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader  # noqa: E402
from dyntrain.data.storage.urls import expand_urls  # noqa: E402
from dyntrain.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("data_throughput")


# ------------------------------------------------------------------------------- plain pipeline
class PlainTransform:
    """The per-sample work of the plain pipeline (PIL + NumPy), same recipe as the DALI loader."""

    def __init__(self, spec: DegradeSpec, seed: int) -> None:
        self.spec, self.seed = spec, seed
        self.rng = None

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image

        if self.rng is None:  # one generator per worker process
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, info.id if info else 0])
        rng, spec, S = self.rng, self.spec, self.spec.crop_size
        data = sample.get("jpg") or sample.get("png") or sample.get("jpeg")
        img = Image.open(io.BytesIO(data)).convert("RGB")  # full decode
        w, h = img.size
        x0, y0 = int(rng.integers(0, w - S + 1)), int(rng.integers(0, h - S + 1))
        crop_img = img.crop((x0, y0, x0 + S, y0 + S))
        clean = np.asarray(crop_img, dtype=np.uint8)
        # the sample's kind and level, then the whole-crop degradation (PIL JPEG round trip or
        # NumPy noise, as in dyntrain.data.pretrain.degrade.degrade_reference)
        params = batch_params(spec, self.seed, int(rng.integers(0, 2**31)), 0, 1)
        degraded = degrade_reference(clean, params, 0)
        # regions: a random permutation of the blocks, blended in uint8, masked pixels 0
        nb = spec.blocks_per_side
        n_deg, n_mask = spec.block_counts
        rank = rng.permutation(nb * nb).reshape(nb, nb)
        b = spec.region_block
        deg = np.kron(rank < n_deg, np.ones((b, b), dtype=bool))[:S, :S]
        msk = np.kron((rank >= n_deg) & (rank < n_deg + n_mask), np.ones((b, b), dtype=bool))[:S, :S]
        inp = np.where(deg[..., None], degraded, clean)
        inp[msk] = 0
        to_t = lambda a: torch.from_numpy(  # noqa: E731  HWC uint8 -> CHW float in [0, 1]
            np.ascontiguousarray(a.transpose(2, 0, 1))).float().div_(255.0)
        mask = torch.from_numpy((deg | msk)[None].astype(np.float32))
        return to_t(inp), to_t(clean), mask


def plain_loader(urls: list[str], spec: DegradeSpec, batch: int, workers: int, seed: int,
                 shuffle: int):
    import webdataset as wds

    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed,
                         handler=wds.warn_and_continue)
          .shuffle(shuffle)
          .map(PlainTransform(spec, seed)))
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                       persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers > 0 else None)


# ------------------------------------------------------------------------------------ measuring
def measure(it, batches: int, batch: int, device: torch.device) -> float:
    """patches/s over ``batches`` batches of iterator ``it`` (the batch is touched on the device)."""
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        x = b["input"] if isinstance(b, dict) else b[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _ = x.shape
    return batches * batch / (time.perf_counter() - t0)


def dali_rate(urls: list[str], spec: DegradeSpec, batch: int, device: torch.device, seed: int,
              workers: int, shuffle: int, decode: str, warmup: int,
              batches: int) -> tuple[float, dict]:
    """patches/s of the project's DALI loader over ``batches`` batches after ``warmup`` ones, and
    its stats() with the decode it used ("mixed" = nvJPEG on the GPU, or "cpu")."""
    loader = DaliPretrainLoader(urls, spec, batch, device=device, seed=seed, num_threads=workers,
                                prefetch=2, shuffle_buffer=shuffle, decode=decode)
    try:
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        return measure(it, batches, batch, device), loader.stats() | {"decode": loader.decode}
    finally:
        loader.close()


def make_shards(folder: Path, images: int, patch: int, shard_samples: int, workers: int) -> list[str]:
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards
    from dyntrain.data.synthetic import write_synthetic_images

    src = folder / "images"
    write_synthetic_images(src, images, size=(2 * patch, 3 * patch), seed=0)
    manifest = build_shards([src], str(folder / "shards"),
                            ShardBuildConfig(patch_size=patch, shard_samples=shard_samples,
                                             workers=workers), progress=False)
    return [str(folder / "shards" / s["name"]) for s in manifest["shards"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--urls", nargs="*", default=None,
                   help="local shards (globs/brace patterns); default: build synthetic ones")
    p.add_argument("--images", type=int, default=32, help="synthetic photographs when no --urls")
    p.add_argument("--patch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2,
                   help="DALI CPU threads = DataLoader worker processes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--decode", choices=["auto", "cpu", "mixed"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the DALI loader delivers batches")
    p.add_argument("--batches", type=int, default=20, help="batches per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--shuffle", type=int, default=256, help="shuffle buffer of both pipelines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    setup_logging(stream=sys.stderr)  # stdout is the results and the headline

    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    spec = DegradeSpec(crop_size=args.crop)
    with tempfile.TemporaryDirectory(prefix="data_bench-") as tmp:
        if args.urls:
            urls = expand_urls(args.urls)
        else:
            t = time.perf_counter()
            urls = make_shards(Path(tmp), args.images, args.patch_size, 48, args.workers)
            log.info(f"built {len(urls)} synthetic shards in {time.perf_counter() - t:.1f}s")
        if any(u.startswith("s3://") for u in urls):
            raise SystemExit("the plain pipeline reads local shards only: pass local --urls")

        def run_dali(seed: int) -> tuple[float, dict]:
            return dali_rate(urls, spec, args.batch, device, seed, args.workers, args.shuffle,
                             args.decode, args.warmup, args.batches)

        def run_plain(seed: int) -> float:
            dl = plain_loader(urls, spec, args.batch, args.workers, seed, args.shuffle)
            it = iter(dl)
            try:
                for _ in range(args.warmup):
                    next(it)
                return measure(it, args.batches, args.batch, torch.device("cpu"))
            finally:
                it._shutdown_workers()  # no worker keeps prefetching into the next round
                del it, dl

        # one loader alive at a time (no background prefetching steals the other's cores);
        # alternating rounds spread any drift of the machine's load over both
        results: dict[str, list[float]] = {"dali": [], "plain": []}
        for r in range(args.rounds):
            rate, dali_stats = run_dali(args.seed + r)
            results["dali"].append(rate)
            results["plain"].append(run_plain(args.seed + r))
            print(f"round {r + 1}/{args.rounds}: dali {results['dali'][-1]:8.1f} patches/s   "
                  f"plain {results['plain'][-1]:8.1f} patches/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["dali"] / med["plain"]
    report = {
        "benchmark": "data_throughput",
        "dali_patches_per_s": med["dali"], "plain_patches_per_s": med["plain"],
        "dali_vs_plain_ratio": ratio, "rounds": results,
        "settings": {"workers": args.workers, "batch": args.batch, "crop": args.crop,
                     "patch_size": args.patch_size, "decode": dali_stats["decode"], "device": str(device),
                     "batches_per_round": args.batches, "warmup": args.warmup,
                     "shuffle": args.shuffle, "shards": len(urls),
                     "samples": dali_stats["total_samples"]},
        "environment": {"cpus": os.cpu_count(), "machine": platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_avg_1m": os.getloadavg()[0],
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    print(f"median patches/s: dali {med['dali']:.1f} ({dali_stats['decode']} decode, {args.workers} threads), "
          f"plain {med['plain']:.1f} (PIL, {args.workers} DataLoader workers)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"dali_vs_plain_ratio={ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
