"""GPU hours of dynamic S/L training against training S and L separately, through the real engine.

    python bench/dynamic_vs_separate.py [--steps N] [--warmup W] [--dim 48 --crop 128 --batch 32]
                                        [--rounds R] [--compile auto|on|off]
                                        [--compile-backend B] [--channels-last auto|on|off]
                                        [--config YAML] [--set dotted.key=value ...]
                                        [--device auto|cpu|cuda] [--threads N] [--json PATH]
    deepspeed --num_gpus G bench/dynamic_vs_separate.py ...      # the same on G GPUs

One DeepSpeed engine (``dyntrain.train.engine.build_engine`` on ``dyntrain.train.model.build_model``,
ZeRO/bf16 as the config says) is trained by the project's ``Trainer`` in the phases below, each
chunk of a phase a fresh Trainer with its own GPU-hour account, all fed by the same in-memory
batches (so the figures are the training system's; the input pipeline has its own benchmark).
The three timed phases run interleaved in --rounds rounds (dynamic, S, L, dynamic, S, L, ...;
each round 1/R of the N iterations, the dynamic draws continuing from round to round), so a drift
of the machine's speed hits all of them alike:

  warm-up   W steps of S, then W of L (untimed: compilation, cuDNN autotuning, allocator)
  dynamic   N iterations, the variant of each drawn by the schedule (schedule.variant_probs)
  S alone   N iterations of S          (the paper's baseline: each variant trained separately)
  L alone   N iterations of L

GPU hours are each phase's training-loop wall time x the number of GPUs (the account's
``gpu_hours``). Reported:

  gpu_hours_saved_frac     1 - dynamic / (S alone + L alone), measured
  expected_saved_frac      the same from the draw: 1 - (n_S t_S + n_L t_L) / (N (t_S + t_L)), with
                           t_v = (v alone) / N — what a switch-free dynamic run would save
  switching_overhead_frac  dynamic / (n_S t_S + n_L t_L) - 1: what the dynamic run costs beyond
                           its steps priced at the separate runs' per-step times
  switch_penalty_s         mean extra time of a dynamic step that follows a switch over one that
                           follows its own variant

Defaults: the paper's setting (dim 48, 128x128 crops, micro-batch 32 per GPU, N=300, W=10,
R=3, compiled blocks, channels-last) on CUDA; dim 8, 32x32, batch 2, N=4, W=1, R=2 on the CPU.
Last line: gpu_hours_saved_frac=<measured saving at equal iterations>.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import common  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="N per phase (CUDA 300, CPU 4)")
    parser.add_argument("--warmup", type=int, default=None, help="W per variant (CUDA 10, CPU 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds the phases are split into (CUDA 3, CPU 2)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for the blocks (default: inductor, as "
                             "model.compile builds it); e.g. aot_eager for a quick CPU check")
    common.add_engine_args(parser)
    args = parser.parse_args(argv)

    import torch

    from dyntrain.train.engine import init_distributed

    device, gpu, sizes = common.engine_setup(args)
    steps = args.steps if args.steps is not None else (300 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    rounds = args.rounds if args.rounds is not None else (3 if gpu else 2)
    if steps < 2 or warmup < 0 or not 1 <= rounds <= steps:
        raise SystemExit("--steps must be >= 2, --warmup >= 0, 1 <= --rounds <= --steps")
    cfg = common.training_config(args.config, args.set, device, sizes, steps,
                                 common.on_off(args.compile, gpu), common.on_off(args.channels_last, gpu))
    if len(cfg.model.variants) < 2:
        raise SystemExit("dynamic training needs at least two variants in model.variants")

    info = init_distributed(cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, peak_source = common.peak_tflops(info.device, args.peak_tflops)
    engine, ds_config = engine_for(cfg, info, args.compile_backend)
    loader = common.SyntheticBatches(cfg.data.micro_batch_size, cfg.data.crop_size, info.device)
    run = compare_phases(cfg, engine, loader, info, steps, warmup, rounds)
    variants, per_step, saved = run["variants"], run["step_s_alone"], run["gpu_hours_saved_frac"]
    overhead = run["switching_overhead_frac"]
    flops = {v: common.train_flops_per_step(_dynet_config(cfg), cfg.data.crop_size,
                                            cfg.data.micro_batch_size, v) for v in variants}
    mfu = {v: common.mfu(flops[v], per_step[v], peak) for v in variants}

    result: dict[str, Any] = {
        "benchmark": "dynamic_vs_separate", **common.environment(info.device), **sizes,
        "world_size": info.world_size, "steps": steps,
        "warmup_per_variant": warmup,
        "zero_stage": cfg.deepspeed.zero_stage, "bf16": ds_config["bf16"]["enabled"],
        "compile": cfg.model.compile, "compile_backend": (args.compile_backend or "inductor")
        if cfg.model.compile else None, "channels_last": cfg.model.channels_last,
        **{k: v for k, v in run.items() if k != "variants"},
        "train_flops_per_step": flops, "peak_tflops": peak, "peak_source": peak_source,
        "mfu_alone": mfu,
    }
    if gpu:
        result["targets"] = {"saved_at_least_0.49": saved >= 0.49,
                             "switching_overhead_at_most_0.01": overhead <= 0.01}
    if info.rank == 0:
        _print_table(result, variants, info.device)
        common.write_json(args.json, result)
        common.headline("gpu_hours_saved_frac", saved)
    loader.close()
    return 0


def engine_for(cfg, info, compile_backend: Optional[str] = None):
    """The project's model and DeepSpeed engine for ``cfg``: (engine, DeepSpeed JSON). A
    ``compile_backend`` other than model.compile's inductor compiles the blocks with it instead."""
    from dyntrain.train.engine import build_engine
    from dyntrain.train.model import build_model

    if compile_backend and cfg.model.compile and cfg.deepspeed.zero_stage < 3:
        model = build_model(common.with_overrides(cfg, ["model.compile=false"]))
        model.compile_blocks(backend=compile_backend)
    else:
        model = build_model(cfg)
    return build_engine(cfg, model, info)


def compare_phases(cfg, engine, loader, info, steps: int, warmup: int,
                   rounds: int) -> dict[str, Any]:
    """Warm-up, then the dynamic, S-alone and L-alone phases in ``rounds`` interleaved rounds on
    one engine (see the module docstring); returns the phases' wall times, GPU hours, draws and
    the figures derived from them (saving, expected saving, switching overhead, switch penalty)."""
    dynamic = common.dynamic_schedule(cfg)
    variants = dynamic.active
    start = common.now()
    for v in variants:
        if warmup:
            common.train_phase(cfg, engine, loader, common.fixed_schedule(cfg, v), info, warmup)
    warmup_s = common.now() - start
    # the phases run in interleaved rounds (dynamic, S, L, dynamic, S, L, ...), each round a
    # 1/R share of the N iterations, so a drift of the machine's speed hits all phases alike
    schedules = {"dynamic": dynamic, **{f"{v} alone": common.fixed_schedule(cfg, v)
                                        for v in variants}}
    bounds = [steps * r // rounds for r in range(rounds + 1)]
    phases: dict[str, dict[str, Any]] = {name: {"wall_s": 0.0, "gpu_hours": 0.0, "records": [],
                                                "accounts": []} for name in schedules}
    for r in range(rounds):
        for name, schedule in schedules.items():
            chunk = common.train_phase(cfg, engine, loader, schedule, info,
                                       bounds[r + 1] - bounds[r], start=bounds[r])
            ph = phases[name]
            ph["wall_s"] += chunk["metrics"]["train_wall_s"]
            ph["gpu_hours"] += chunk["metrics"]["gpu_hours"]
            ph["records"] += [{**rec, "round": r} for rec in chunk["records"]]
            ph["accounts"].append(chunk["metrics"])

    wall = {name: p["wall_s"] for name, p in phases.items()}
    gpu_hours = {name: p["gpu_hours"] for name, p in phases.items()}
    per_step = {v: wall[f"{v} alone"] / steps for v in variants}
    draws = {v: sum(rec["variant"] == v for rec in phases["dynamic"]["records"]) for v in variants}
    separate = sum(gpu_hours[f"{v} alone"] for v in variants)
    priced = sum(draws[v] * per_step[v] for v in variants)
    dyn_records = phases["dynamic"]["records"]
    switches = sum(a["variant"] != b["variant"] and a["round"] == b["round"]
                   for a, b in zip(dyn_records, dyn_records[1:]))
    return {
        "variants": variants,
        "steps_done": {name: len(p["records"]) for name, p in phases.items()},
        "warmup_s": warmup_s,
        "variant_probs": {v: dynamic.probs[v] for v in variants},
        "draws": draws, "switches": switches, "wall_s": wall, "gpu_hours": gpu_hours,
        "gpu_hours_separate": separate, "step_s_alone": per_step,
        "gpu_hours_saved_frac": 1.0 - gpu_hours["dynamic"] / separate,
        "expected_saved_frac": 1.0 - priced / (steps * sum(per_step.values())),
        "switching_overhead_frac": wall["dynamic"] / priced - 1.0,
        "switch_penalty_s": _switch_penalty(dyn_records), "rounds": rounds,
        "accounts": {name: p["accounts"] for name, p in phases.items()},
        "step_records": {name: [[rec["variant"], rec["step_time_s"]] for rec in p["records"]]
                         for name, p in phases.items()},
    }


def _switch_penalty(records: list[dict[str, Any]]) -> Optional[float]:
    """Mean extra seconds of a step that follows a switch over one that follows its own variant
    (weighted over variants; None when either kind is missing)."""
    same: dict[str, list[float]] = {}
    switched: dict[str, list[float]] = {}
    for prev, rec in zip(records, records[1:]):
        if prev["round"] != rec["round"]:  # other phases ran in between
            continue
        bucket = same if prev["variant"] == rec["variant"] else switched
        bucket.setdefault(rec["variant"], []).append(rec["step_time_s"])
    pairs = [(len(switched[v]), sum(switched[v]) / len(switched[v]) - sum(same[v]) / len(same[v]))
             for v in switched if v in same]
    if not pairs:
        return None
    return sum(n * p for n, p in pairs) / sum(n for n, _ in pairs)


def _dynet_config(cfg):
    from dyntrain.train.model import dynet_config

    return dynet_config(cfg)


def _print_table(r: dict[str, Any], variants: list[str], device) -> None:
    n = r["steps"]
    print(f"\nDynamic vs separate training on {r['world_size']} x {common.device_name(device)}: "
          f"dim {r['dim']}, {r['crop']}x{r['crop']}, micro-batch {r['batch']}, ZeRO "
          f"{r['zero_stage']}, bf16 {r['bf16']}, compile {r['compile']}, channels-last "
          f"{r['channels_last']}; N={n} per phase after {r['warmup_per_variant']} warm-up "
          f"steps per variant ({r['warmup_s']:.1f}s)")
    print(f"{'phase':>10} {'wall s':>9} {'GPU h':>10} {'s/step':>9}  draws")
    for name, wall in r["wall_s"].items():
        draws = (", ".join(f"{v} {r['draws'][v]}" for v in variants)
                 + f", {r['switches']} switches") if name == "dynamic" else ""
        print(f"{name:>10} {wall:>9.2f} {r['gpu_hours'][name]:>10.3g} {wall / n:>9.4f}  {draws}")
    sep = " + ".join(f"{v} alone" for v in variants)
    print(f"separate ({sep}): {r['gpu_hours_separate']:.3g} GPU h")
    for v in variants:
        print(f"MFU of {v} alone: {common.fmt(r['mfu_alone'][v], '.1%')}")
    print(f"GPU hours saved by dynamic training at equal iterations: {r['gpu_hours_saved_frac']:.1%} measured, "
          f"{r['expected_saved_frac']:.1%} expected from the draw at the separate step times "
          f"(the saving at equal quality: bench/quality_saving.py)")
    print(f"switching overhead (dynamic wall / its steps priced at the separate step times - 1): "
          f"{r['switching_overhead_frac']:+.2%}")
    print(f"switch penalty (a step after a switch vs after its own variant): "
          f"{common.fmt(r['switch_penalty_s'], '+.4f')} s")


if __name__ == "__main__":
    sys.exit(main())
