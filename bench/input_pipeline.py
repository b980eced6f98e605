"""Is training ever waiting for data? The DALI loader alone against the training step's
consumption rate, and the fraction of each training step spent waiting for input.

    python bench/input_pipeline.py [--urls 'DIR/shard-*.tar' | --images 64 --patch-size 512]
                                   [--steps N] [--warmup W] [--loader-batches M]
                                   [--dali-threads T] [--prefetch Q] [--decode auto|mixed|cpu]
                                   [--dim 48 --crop 128 --batch 32] [--compile auto|on|off]
                                   [--channels-last auto|on|off] [--config YAML]
                                   [--set dotted.key=value ...] [--device auto|cpu|cuda]
                                   [--json PATH]

Without ``--urls`` the benchmark first builds its own WebDataset shards (synthetic photographs cut
into --patch-size patches by ``dyntrain.data.shards.writer.build_shards``) in a temporary folder.
One process, one DeepSpeed engine (the project's ``build_model`` + ``build_engine``), the project's
``Trainer`` and the project's DALI loader (``build_pretrain_loader``: ``mixed`` nvJPEG decoding on
a GPU, ``data.num_threads`` CPU threads, ``data.prefetch`` batches queued):

  compute    N dynamic S/L iterations fed from batches already in memory: what training
             consumes when input costs nothing (after W untimed steps of each variant)
  loader     the DALI loader alone, M batches after W untimed ones: what it can deliver
  training   N dynamic iterations fed by the DALI loader (after W untimed ones); the Trainer
             times how long each step waits in next(loader)

Reported: patches/s of the loader and of the compute-only training, their ratio (the loader's
headroom; > 1 means it keeps up), input_wait_frac = total wait / total step time of the fed
run, and the fed run's slow-down against the compute-only run.

Defaults: the paper's setting (dim 48, 128x128 crops, micro-batch 32, 512x512 patches, N=100,
W=10, M=50, compiled blocks, channels-last) on CUDA; dim 8, 32x32, batch 2, 64x64 patches, N=4,
W=1, M=5 on the CPU. Last line: input_wait_frac=<fraction>.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import common  # noqa: E402
from dyntrain.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("input_pipeline")


def make_shards(folder: Path, images: int, patch: int) -> tuple[list[str], int]:
    """Synthetic photographs -> shards through the project's shard builder; (urls, samples)."""
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards
    from dyntrain.data.synthetic import write_synthetic_images

    src = folder / "images"
    write_synthetic_images(src, images, size=(2 * patch, 3 * patch), seed=0)
    manifest = build_shards([src], str(folder / "shards"),
                            ShardBuildConfig(patch_size=patch, shard_samples=64, workers=1),
                            progress=False)
    urls = [str(folder / "shards" / s["name"]) for s in manifest["shards"]]
    return urls, int(manifest["num_samples"])


def time_loader(loader, device, warmup: int, batches: int, batch: int) -> dict[str, float]:
    for _ in range(warmup):
        next(loader)
    common.sync(device)
    start = common.now()
    for _ in range(batches):
        out = next(loader)
        _ = out["input"].shape
    common.sync(device)
    seconds = common.now() - start
    return {"seconds": seconds, "batches": batches, "batches_per_s": batches / seconds,
            "patches_per_s": batches * batch / seconds}


def loader_overrides(urls: list[str], samples: Optional[int], decode: str,
                     threads: Optional[int], prefetch: Optional[int]) -> list[str]:
    """The dotted config overrides that point the loader at ``urls`` (None keeps the config's)."""
    extra = [f"data.train_urls={urls!r}", f"data.decode={decode}"]
    if threads is not None:
        extra.append(f"data.num_threads={threads}")
    if prefetch is not None:
        extra.append(f"data.prefetch={prefetch}")
    if samples is not None:
        extra.append(f"data.shuffle_buffer={min(1024, samples)}")
    return extra


def measure_feed(cfg, engine, info, steps: int, warmup: int,
                 loader_batches: int) -> dict[str, Any]:
    """The three measurements of the module docstring on one engine: training from memory, the
    project's DALI loader alone, and training fed by it; returns each one's rates, the input wait
    fraction, the fed run's slow-down, the decode actually used and the loader's counters."""
    from dyntrain.data.pretrain.pipeline import build_pretrain_loader

    batch = cfg.data.micro_batch_size
    dynamic = common.dynamic_schedule(cfg)
    # compute only: warm every variant, then N dynamic iterations from memory
    memory = common.SyntheticBatches(batch, cfg.data.crop_size, info.device)
    for v in dynamic.active:
        if warmup:
            common.train_phase(cfg, engine, memory, common.fixed_schedule(cfg, v), info, warmup)
    compute = common.train_phase(cfg, engine, memory, dynamic, info, steps)
    memory.close()

    # the loader alone, then the same loader feeding training
    loader = build_pretrain_loader(cfg, info.rank, info.world_size, info.device)
    try:
        alone = time_loader(loader, info.device, warmup, loader_batches, batch)
        if warmup:
            common.train_phase(cfg, engine, loader, dynamic, info, warmup)
        fed = common.train_phase(cfg, engine, loader, dynamic, info, steps)
        loader_stats = loader.stats()
        decode = getattr(loader, "decode", cfg.data.decode)
    finally:
        loader.close()

    def rate(phase: dict[str, Any]) -> dict[str, float]:
        step_s = sum(r["step_time_s"] for r in phase["records"])
        wait_s = sum(r["data_wait_s"] for r in phase["records"])
        n = len(phase["records"])
        return {"steps": n, "step_s_mean": step_s / n, "wall_s": phase["metrics"]["train_wall_s"],
                "patches_per_s": n * batch * info.world_size / phase["metrics"]["train_wall_s"],
                "data_wait_s": wait_s, "wait_frac": wait_s / step_s,
                "max_step_wait_frac": max(r["data_wait_s"] / r["step_time_s"]
                                          for r in phase["records"])}

    compute_rate, fed_rate = rate(compute), rate(fed)
    return {"decode": decode, "loader_alone": alone, "compute_only": compute_rate,
            "fed": fed_rate, "input_wait_frac": fed_rate["wait_frac"],
            "fed_slowdown_frac": fed_rate["step_s_mean"] / compute_rate["step_s_mean"] - 1.0,
            "loader_stats": {k: v for k, v in loader_stats.items() if not isinstance(v, list)}}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", nargs="+", default=None,
                        help="shards to read (default: build synthetic ones)")
    parser.add_argument("--images", type=int, default=None,
                        help="synthetic photographs (CUDA 64, CPU 4); 6 patches each")
    parser.add_argument("--patch-size", type=int, default=None, help="CUDA 512, CPU 64")
    parser.add_argument("--steps", type=int, default=None, help="N (CUDA 100, CPU 4)")
    parser.add_argument("--warmup", type=int, default=None, help="W (CUDA 10, CPU 1)")
    parser.add_argument("--loader-batches", type=int, default=None, help="M (CUDA 50, CPU 5)")
    parser.add_argument("--dali-threads", type=int, default=None,
                        help="data.num_threads (default: the config's)")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="data.prefetch (default: the config's)")
    parser.add_argument("--decode", default="auto", choices=["auto", "mixed", "cpu"])
    common.add_engine_args(parser)
    args = parser.parse_args(argv)
    setup_logging()

    import torch

    from dyntrain.train.engine import build_engine, init_distributed
    from dyntrain.train.model import build_model

    device, gpu, sizes = common.engine_setup(args)
    steps = args.steps if args.steps is not None else (100 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    loader_batches = args.loader_batches if args.loader_batches is not None else (50 if gpu else 5)
    images = args.images if args.images is not None else (64 if gpu else 4)
    patch = args.patch_size if args.patch_size is not None else (512 if gpu else 64)
    if steps < 1 or warmup < 0 or loader_batches < 1:
        raise SystemExit("--steps and --loader-batches must be >= 1, --warmup >= 0")
    if patch < sizes["crop"]:
        raise SystemExit(f"--patch-size {patch} is smaller than the crop {sizes['crop']}")

    with tempfile.TemporaryDirectory(prefix="input_pipeline-") as tmp:
        if args.urls:
            urls, samples = list(args.urls), None
        else:
            t0 = common.now()
            urls, samples = make_shards(Path(tmp), images, patch)
            log.info(f"built {len(urls)} synthetic shard(s), {samples} patches of "
                     f"{patch}x{patch}, in {common.now() - t0:.1f}s")
        extra = loader_overrides(urls, samples, args.decode, args.dali_threads, args.prefetch)
        cfg = common.training_config(args.config, extra + list(args.set), device, sizes, steps,
                                     common.on_off(args.compile, gpu), common.on_off(args.channels_last, gpu))

        info = init_distributed(cfg)
        if args.threads:
            torch.set_num_threads(args.threads)
        model = build_model(cfg)
        engine, ds_config = build_engine(cfg, model, info)
        feed = measure_feed(cfg, engine, info, steps, warmup, loader_batches)
    batch = cfg.data.micro_batch_size
    alone, compute_rate, fed_rate = feed["loader_alone"], feed["compute_only"], feed["fed"]
    consume = compute_rate["patches_per_s"] / info.world_size  # per rank, like the loader
    result: dict[str, Any] = {
        "benchmark": "input_pipeline", **common.environment(info.device), **sizes,
        "world_size": info.world_size, "steps": steps, "warmup": warmup,
        "loader_batches": loader_batches, "urls": len(urls), "samples": samples,
        "patch_size": None if args.urls else patch,
        "dali_threads": cfg.data.num_threads, "prefetch": cfg.data.prefetch,
        "compile": cfg.model.compile, "channels_last": cfg.model.channels_last,
        "bf16": ds_config["bf16"]["enabled"], "zero_stage": cfg.deepspeed.zero_stage,
        **feed, "loader_headroom": alone["patches_per_s"] / consume,
    }
    if gpu:
        result["targets"] = {"input_wait_below_0.02": result["input_wait_frac"] < 0.02}
    if info.rank == 0:
        print(f"\nInput pipeline vs training on {info.world_size} x "
              f"{common.device_name(info.device)}: dim {sizes['dim']}, {sizes['crop']}x"
              f"{sizes['crop']}, micro-batch {batch}; DALI decode {feed['decode']}, "
              f"{cfg.data.num_threads} threads, prefetch {cfg.data.prefetch}")
        print(f"{'':>22} {'patches/s':>10} {'s/step':>9} {'wait %':>8}")
        print(f"{'DALI loader alone':>22} {alone['patches_per_s']:>10.1f} "
              f"{1 / alone['batches_per_s']:>9.4f} {'':>8}")
        for name, r in (("training, from memory", compute_rate),
                        ("training, fed by DALI", fed_rate)):
            print(f"{name:>22} {r['patches_per_s']:>10.1f} {r['step_s_mean']:>9.4f} "
                  f"{r['wait_frac'] * 100:>7.2f}%")
        print(f"loader headroom (loader / training consumption per rank): "
              f"{result['loader_headroom']:.2f}x; fed steps {result['fed_slowdown_frac']:+.1%} "
              f"vs from memory; worst single-step wait {fed_rate['max_step_wait_frac']:.1%}")
        common.write_json(args.json, result)
        common.headline("input_wait_frac", result["input_wait_frac"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
