"""DyNet training-step speed: the optimised step against a plain fp32 eager step, side by side.

    python bench/train_step.py [--variants S L] [--dim 48 --crop 128 --batch 32] [--steps 20]
                               [--warmup 5] [--compile auto|none|inductor|aot_eager|eager]
                               [--compile-scope blocks|model] [--compile-mode MODE]
                               [--no-bf16] [--no-channels-last]
                               [--checkpoint-blocks] [--profile DIR] [--device auto|cpu|cuda]
                               [--threads N]
                               [--peak-tflops T] [--json PATH]

Two recipes train the same model (same init, same random batch, L1 loss, Adam lr 1e-4):

  baseline   fp32 weights and activations, NCHW, eager, torch.optim.Adam defaults — how the
             reference code trains.
  optimised  bf16 autocast (fp32 master weights), channels-last activations
             (``DyNet.use_channels_last``, as ``model.channels_last`` sets it), every
             TransformerBlock compiled once with ``DyNet.compile_blocks`` (shared by S and L: no
             recompile on a switch; ``--compile-scope model`` compiles the whole forward instead,
             one graph per variant), cuDNN autotuning, fused Adam on CUDA.

For each variant: median step time over --steps timed steps (after --warmup untimed ones, which
include compilation), patches/s (= micro-batch / step time), peak memory over the timed steps, and
model FLOP utilisation = 3 x forward FLOPs (``dynet.flops``, attention products included) / step
time / the GPU's dense bf16 peak. After timing, the optimised model runs S -> L -> S once more and
the number of graphs compiled by those switches is reported (must be 0).

Defaults: the paper's setting (dim 48, 128x128 crops, micro-batch 32) on CUDA; dim 8, 32x32,
batch 2 on the CPU. Last line: train_step_speedup_<L, else the last variant>=<baseline step time /
optimised step time>.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch

import common  # noqa: E402


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Recipe:
    """How one training step runs (see the module docstring)."""

    def __init__(self, name: str, bf16: bool, channels_last: bool, compile_backend: Optional[str],
                 compile_mode: Optional[str], fused_adam: bool, cudnn_benchmark: bool,
                 compile_scope: str = "blocks") -> None:
        self.name = name
        self.compile_scope = compile_scope
        self.bf16 = bf16
        self.channels_last = channels_last
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode
        self.fused_adam = fused_adam
        self.cudnn_benchmark = cudnn_benchmark

    def describe(self) -> dict[str, Any]:
        return {"bf16_autocast": self.bf16, "channels_last": self.channels_last,
                "compile": self.compile_backend, "compile_mode": self.compile_mode,
                "compile_scope": self.compile_scope if self.compile_backend else None,
                "fused_adam": self.fused_adam, "cudnn_benchmark": self.cudnn_benchmark}


class Runner:
    """One model + optimizer + fixed batch, trained with one recipe."""

    def __init__(self, recipe: Recipe, model_config, device: torch.device, crop: int,
                 batch: int) -> None:
        from dynet import DyNet

        self.recipe, self.device = recipe, device
        torch.manual_seed(0)
        model = DyNet(model_config).to(device)
        model.use_channels_last(recipe.channels_last)  # as model.channels_last does in training
        if recipe.compile_backend:
            kwargs: dict[str, Any] = {"backend": recipe.compile_backend}
            if recipe.compile_mode:
                kwargs["mode"] = recipe.compile_mode
            if recipe.compile_scope == "model":  # one whole-forward graph per variant
                model.compile(dynamic=False, **kwargs)
            else:  # one graph per block shape, shared by every variant
                model.compile_blocks(**kwargs)
        self.model = model.train()
        adam_kwargs: dict[str, Any] = {"lr": 1e-4}
        if recipe.fused_adam:
            adam_kwargs["fused"] = True
        self.optimizer = torch.optim.Adam(model.parameters(), **adam_kwargs)
        gen = torch.Generator().manual_seed(1)
        self.input = torch.rand(batch, 3, crop, crop, generator=gen).to(device)
        self.target = torch.rand(batch, 3, crop, crop, generator=gen).to(device)
        self.loss = float("nan")

    def autocast(self):
        if not self.recipe.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, variant: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.model(self.input, variant=variant)
        loss = (out.float() - self.target).abs().mean()
        loss.backward()
        self.optimizer.step()
        self.loss = loss.detach()

    def timed(self, variant: str, warmup: int, steps: int) -> dict[str, Any]:
        memory = common.PeakMemory(self.device)
        start = common.now()
        for _ in range(warmup):
            self.step(variant)
        common.sync(self.device)
        warmup_s = common.now() - start
        memory.reset()
        times = []
        for _ in range(steps):
            t0 = common.now()
            self.step(variant)
            common.sync(self.device)
            times.append(common.now() - t0)
        loss = float(self.loss)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise RuntimeError(f"{self.recipe.name} recipe, DyNet-{variant}: loss is {loss}")
        return {"times": times, "warmup_s": warmup_s, "peak_bytes": memory.peak_bytes(),
                "memory_kind": memory.kind, "loss": loss}


def profile_steps(runner: "Runner", variant: str, out_dir: str, steps: int = 3) -> list[dict]:
    """Profile ``steps`` training steps; print the top operators, write a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            runner.step(variant)
        common.sync(runner.device)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    trace = Path(out_dir) / f"train_step_{runner.recipe.name}_{variant}.json"
    prof.export_chrome_trace(str(trace))
    key = "self_device_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {steps} {runner.recipe.name} steps of DyNet-{variant} (trace: {trace})")
    print(prof.key_averages().table(sort_by=key, row_limit=20))
    top = []
    for evt in sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]:
        top.append({"name": evt.key, "calls": evt.count, key: getattr(evt, key, 0) / steps})
    return top


def measure_recipe(recipe: Recipe, model_config, device, sizes, variants, warmup, steps,
                   flops, peak, profile_dir: Optional[str] = None) -> dict[str, Any]:
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = recipe.cudnn_benchmark
    try:
        graphs_before = dynamo_graphs()
        runner = Runner(recipe, model_config, device, sizes["crop"], sizes["batch"])
        rows = {}
        for variant in variants:
            r = runner.timed(variant, warmup, steps)
            st = common.stats(r.pop("times"))
            step_s = st["median_s"]
            rows[variant] = {**st, "step_s": step_s, "patches_per_s": sizes["batch"] / step_s,
                             "peak_mb": r["peak_bytes"] / 2 ** 20, "memory_kind": r["memory_kind"],
                             "warmup_s": r["warmup_s"], "loss": r["loss"],
                             "train_flops_per_step": flops[variant],
                             "achieved_tflops": flops[variant] / step_s / 1e12,
                             "mfu": common.mfu(flops[variant], step_s, peak)}
        graphs_after_warmup = dynamo_graphs()
        for variant in list(variants) + [variants[0]]:  # one more switch round, e.g. S -> L -> S
            runner.step(variant)
        common.sync(device)
        switch_graphs = dynamo_graphs() - graphs_after_warmup
        profile = profile_steps(runner, variants[-1], profile_dir) if profile_dir else None
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark
    del runner
    common.release(device)
    return {"recipe": recipe.describe(), "variants": rows,
            "graphs_compiled": graphs_after_warmup - graphs_before,
            "graphs_compiled_by_switching": switch_graphs, "profile_top_ops_per_step": profile}


# ------------------------------------------------------------------------------------ recipes
def fp32_eager() -> Recipe:
    """The reference step: fp32, contiguous, eager, plain Adam."""
    return Recipe("baseline", bf16=False, channels_last=False, compile_backend=None,
                  compile_mode=None, fused_adam=False, cudnn_benchmark=False)


def optimised(gpu: bool, backend: Optional[str], mode: Optional[str] = None,
              scope: str = "blocks", bf16: bool = True, channels_last: bool = True,
              name: str = "optimised") -> Recipe:
    """The optimised step (bf16 autocast, channels-last, compiled blocks; fused Adam and cuDNN
    autotuning on a GPU); ``scope``/``mode`` select the alternatives below."""
    return Recipe(name, bf16=bf16, channels_last=channels_last, compile_backend=backend,
                  compile_mode=mode, fused_adam=gpu, cudnn_benchmark=gpu, compile_scope=scope)


def whole_model(gpu: bool, backend: Optional[str]) -> Recipe:
    """Alternative: the whole forward compiled, one graph per variant (fuses across blocks)."""
    return optimised(gpu, backend, scope="model", name="whole_model")


def cuda_graphs(gpu: bool) -> Recipe:
    """Alternative: compiled blocks replayed as CUDA graphs (inductor's reduce-overhead mode;
    CUDA only)."""
    return optimised(gpu, "inductor", mode="reduce-overhead", name="cuda_graphs")


def model_config(dim: int, checkpoint_blocks: bool = False):
    """The paper's DyNetConfig (dim 48) or the same at another width."""
    from dynet import DyNetConfig

    if dim == 48:
        return DyNetConfig(checkpoint_blocks=checkpoint_blocks)
    return DyNetConfig(dim=dim, checkpoint_blocks=checkpoint_blocks)


def compile_seconds(row: dict[str, Any], warmup: int) -> float:
    """Compilation time of a measured variant: its warm-up time beyond ``warmup`` steady steps."""
    return max(0.0, row["warmup_s"] - warmup * row["step_s"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["S", "L"])
    parser.add_argument("--dim", type=int, default=None, help="model width (CUDA 48, CPU 8)")
    parser.add_argument("--crop", type=int, default=None, help="crop side (CUDA 128, CPU 32)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (CUDA 32, CPU 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 20, CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (CUDA 5, CPU 1)")
    parser.add_argument("--compile", default="auto",
                        choices=["auto", "none", "inductor", "aot_eager", "eager"],
                        help="torch.compile backend of the optimised recipe's blocks "
                             "(auto = inductor on CUDA, none on CPU)")
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                        help="blocks: DyNet.compile_blocks (what model.compile does in training); "
                             "model: the whole forward, one graph per variant (fuses across "
                             "blocks, longer compile; with ZeRO-2 that is DeepSpeed's "
                             "engine.compile())")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs, reduce-overhead")
    parser.add_argument("--no-bf16", action="store_true", help="optimised recipe without autocast")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing, profile 3 optimised steps of the last variant: "
                             "top operators by self time printed, Chrome trace written to DIR")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="activation checkpointing of the shared blocks (both recipes)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    threads = common.set_threads(args.threads)
    sizes = common.paper_or_small(device, args.dim, args.crop, args.batch)
    gpu = device.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    backend = {"auto": "inductor" if gpu else None, "none": None}.get(args.compile, args.compile)
    if backend and warmup < 1:
        raise SystemExit("--compile needs --warmup >= 1 (the first step compiles)")
    peak, peak_source = common.peak_tflops(device, args.peak_tflops)

    cfg = model_config(sizes["dim"], args.checkpoint_blocks)
    unknown = [v for v in args.variants if v not in cfg.variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(cfg.variants)}")
    flops = {v: common.train_flops_per_step(cfg, sizes["crop"], sizes["batch"], v)
             for v in args.variants}

    recipes = [fp32_eager(), optimised(gpu, backend, args.compile_mode, args.compile_scope,
                                       bf16=not args.no_bf16,
                                       channels_last=not args.no_channels_last)]
    results = {r.name: measure_recipe(r, cfg, device, sizes, args.variants, warmup, steps, flops,
                                      peak, args.profile if r.name == "optimised" else None)
               for r in recipes}

    base, opt = results["baseline"]["variants"], results["optimised"]["variants"]
    speedup = {v: base[v]["step_s"] / opt[v]["step_s"] for v in args.variants}
    headline_variant = "L" if "L" in args.variants else args.variants[-1]

    compiled = ", no compile"
    if backend:
        mode = f", {args.compile_mode}" if args.compile_mode else ""
        compiled = f", compiled {args.compile_scope} ({backend}{mode})"
    print(f"DyNet training step on {common.device_name(device)}"
          + ("" if gpu else f", {threads} threads")
          + f": dim {sizes['dim']}, {sizes['crop']}x{sizes['crop']}, micro-batch {sizes['batch']}, "
          f"{warmup} warm-up + {steps} timed steps (median)")
    print(f"optimised = {'bf16 autocast' if not args.no_bf16 else 'fp32'}"
          f"{', channels-last' if not args.no_channels_last else ''}"
          f"{compiled}"
          f"{', fused Adam, cudnn.benchmark' if gpu else ''}; peak: {fmt_peak(peak, peak_source)}")
    print(f"{'variant':>8} {'recipe':>10} {'step ms':>9} {'patches/s':>10} {'peak MB':>9} "
          f"{'TFLOP/s':>8} {'MFU':>7} {'warm-up s':>9}")
    for v in args.variants:
        for name, rows in (("baseline", base), ("optimised", opt)):
            r = rows[v]
            print(f"{v:>8} {name:>10} {r['step_s'] * 1e3:>9.2f} {r['patches_per_s']:>10.1f} "
                  f"{r['peak_mb']:>9.1f} {r['achieved_tflops']:>8.3f} "
                  f"{common.fmt(r['mfu'], '.1%'):>7} {r['warmup_s']:>9.1f}")
        print(f"{v:>8} {'speed-up':>10} {speedup[v]:>9.2f}x")
    opt_res = results["optimised"]
    print(f"graphs compiled by the optimised recipe: {opt_res['graphs_compiled']}, "
          f"added by the extra variant switches: {opt_res['graphs_compiled_by_switching']}")

    result: dict[str, Any] = {
        "benchmark": "train_step", **common.environment(device), **sizes,
        "warmup": warmup, "steps": steps, "peak_tflops": peak, "peak_source": peak_source,
        "flops_per_step": flops, "results": results, "speedup": speedup,
        "mfu_optimised": {v: opt[v]["mfu"] for v in args.variants},
        "patches_per_s_ratio": {v: opt[v]["patches_per_s"] / base[v]["patches_per_s"]
                                for v in args.variants},
    }
    if gpu and "L" in args.variants:
        result["targets"] = {"mfu_L_at_least_0.30": (opt["L"]["mfu"] or 0) >= 0.30,
                             "speedup_L_at_least_2": speedup["L"] >= 2.0}
    common.write_json(args.json, result)
    for v in args.variants:
        if opt[v]["mfu"] is not None:
            print(f"mfu_{v}={opt[v]['mfu']:.4f}")
    common.headline(f"train_step_speedup_{headline_variant}", speedup[headline_variant])
    return 0


def fmt_peak(peak: Optional[float], source: str) -> str:
    return f"{peak:.0f} TFLOP/s bf16 ({source})" if peak is not None else source


if __name__ == "__main__":
    sys.exit(main())
