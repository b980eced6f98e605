"""Inference speed and peak memory of DyNet-S and DyNet-L side by side (one weights file).

    python bench/inference.py [--checkpoint PATH | --dim 48] [--sizes 128 256 512] [--iters 5]
                              [--device auto|cpu|cuda] [--threads N] [--json PATH]

Every (variant, size) is measured in a fresh process: images/s at batch 1 after one warm-up pass,
and peak memory above the loaded model — CUDA's max_memory_allocated on a GPU, the growth of the
process's peak resident set (VmHWM, reset before the pass) on the CPU. Last line: s_vs_l_speedup=<L time / S time> at
the largest size.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from typing import Any, Optional


def _build(checkpoint: Optional[str], dim: int, device: str):
    import torch
    from dynet import DyNet, DyNetConfig

    if checkpoint:
        from dyntrain.restore import load_model
        return load_model(checkpoint, device)
    torch.manual_seed(0)
    cfg = DyNetConfig() if dim == 48 else DyNetConfig(dim=dim)
    return DyNet(cfg).to(device).eval()


def _cpu_peak_reset() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _cpu_peak_bytes() -> int:
    """Peak resident set of this process (VmHWM, which _cpu_peak_reset rewinds), else ru_maxrss."""
    from common import proc_status_bytes  # imports torch: only inside the measuring process

    return proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_rss_bytes() -> int:
    from common import proc_status_bytes

    return proc_status_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(args: dict[str, Any], queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model = _build(args["checkpoint"], args["dim"], args["device"])
    variant, size, iters = args["variant"], args["size"], args["iters"]
    with torch.no_grad():
        model(torch.rand(1, 3, 16, 16, device=device), variant=variant)  # allocator and kernels warm
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _cpu_peak_reset()
            base = _cpu_rss_bytes()
        x = torch.rand(1, 3, size, size, device=device)
        model(x, variant=variant)  # warm-up at this size
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x, variant=variant)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _cpu_peak_bytes() - base
        seconds = (time.perf_counter() - start) / iters
    queue.put({"variant": variant, "size": size, "seconds": seconds, "images_per_s": 1.0 / seconds,
               "peak_mb": peak / 2 ** 20})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="weights to load (default: the paper's model, random init)")
    parser.add_argument("--dim", type=int, default=48, help="model width when no checkpoint is given")
    parser.add_argument("--variants", nargs="+", default=["S", "L"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from dynet import count_flops

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    model = _build(args.checkpoint, args.dim, "cpu")
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes:
        for variant in args.variants:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=({"checkpoint": args.checkpoint, "dim": args.dim,
                                                       "device": device, "variant": variant, "size": size,
                                                       "iters": args.iters, "threads": threads}, queue))
            proc.start()
            row = queue.get()
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"measurement of DyNet-{variant} at {size}x{size} failed (exit {proc.exitcode})")
            row["gflops"] = count_flops(model, size, size, variant=variant).total / 1e9
            rows.append(row)

    print(f"DyNet inference, batch 1, {device}" + (f", {threads} threads" if device == "cpu" else "")
          + f", dim {model.config.dim}, {args.iters} timed passes")
    header = f"{'size':>9}  " + "  ".join(f"{'DyNet-' + v + ' img/s':>13} {'peak MB':>8} {'GFLOPs':>8}"
                                          for v in args.variants)
    print(header)
    for size in args.sizes:
        cells = []
        for variant in args.variants:
            r = next(r for r in rows if r["size"] == size and r["variant"] == variant)
            cells.append(f"{r['images_per_s']:>13.3f} {r['peak_mb']:>8.1f} {r['gflops']:>8.2f}")
        print(f"{size:>4}x{size:<4}  " + "  ".join(cells))
    result: dict[str, Any] = {"device": device, "threads": threads, "dim": model.config.dim, "rows": rows}
    largest = max(args.sizes)
    if {"S", "L"} <= set(args.variants):
        s = next(r for r in rows if r["size"] == largest and r["variant"] == "S")
        l_ = next(r for r in rows if r["size"] == largest and r["variant"] == "L")
        result["s_vs_l_speedup"] = l_["seconds"] / s["seconds"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if "s_vs_l_speedup" in result:
        print(f"s_vs_l_speedup={result['s_vs_l_speedup']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
