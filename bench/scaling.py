"""How DyNet pre-training scales out: a step-time model built from measured parts, checked on 2 ranks.

    python bench/scaling.py [--step-source auto|suite|measure|flops] [--suite PATH] [--batch 32]
                            [--assume-mfu 0.30] [--intra-gbps 360] [--inter-gbps 45]
                            [--manifest PATH/manifest.json] [--bytes-per-sample B]
                            [--no-check] [--check-steps 16] [--check-warmup 2] [--check-threads 1]
                            [--dim 8 --crop 32 --set key=value ...] [--plot PNG] [--json PATH]

Inputs (measured where this machine can, otherwise a documented parameter):
  step time of S and L on one GPU: ``step_ms_S``/``step_ms_L`` of ``bench/results/gpu_suite.json``
      (--suite) when present; else measured with ``bench/train_step.py``'s optimised recipe on the
      current device when it is a GPU (--step-source measure forces it on any device); else
      (no suite, no GPU) estimated as the project's training FLOPs per step (dynet.flops, paper
      setting, micro-batch --batch) at --assume-mfu (0.30: the MFU target of bench/train_step.py)
      of the H100 SXM bf16 peak (989 TFLOP/s, bench/common.py) — marked "flops" in the output.
  parameters and communication bytes: counted on the model of the run config (paper's DyNet,
      16,613,135 parameters, 179 tensors); 2 bytes per element with bf16, 4 in fp32 (DeepSpeed's
      default communication dtype); buckets, overlap and ZeRO-3 persistence threshold read from
      the JSON that ``dyntrain.train.engine.build_ds_config`` generates for a CUDA run of each stage.
  bandwidths (NCCL bus bandwidth, the figure nccl-tests reports): intra-node 360 GB/s — H100 SXM
      NVLink 4 is 900 GB/s bidirectional per GPU (NVIDIA H100 datasheet), of which NCCL all-reduce
      reaches about 360-480 GB/s busbw on 8 GPUs of a DGX/HGX H100 (NVIDIA nccl-tests reports);
      inter-node 45 GB/s — one 400 Gb/s (50 GB/s) ConnectX-7 InfiniBand NIC per GPU (DGX H100
      reference architecture), of which about 90% is reached as busbw. Latency per
      collective step 8 us in a node, 15 us across nodes (nccl-tests small-message figures).
  bytes per training sample: mean shard bytes per sample of --manifest (make_shards' manifest.json,
      which the whole 512x512 JPEG patch is read for, however small the crop); default 180 kB, a
      512x512 4:4:4 JPEG at quality 95 of photographic content.

Model (DeepSpeed 0.19's collectives; n ranks; G = parameters x comm bytes):
  collective time  = latency x steps + volume / busbw, ring volumes: all-reduce 2(n-1)/n x bytes,
                     all-gather and reduce-scatter (n-1)/n x bytes; steps 2 ceil(log2 n) for an
                     all-reduce, ceil(log2 n) otherwise (NCCL's tree for small messages); several
                     nodes: the inter-node link bounds the ring.
  ZeRO 0           one all-reduce of G after the backward pass (engine bucket 5e8 elements): exposed.
  ZeRO 1, 2        gradients all-reduced in reduce_bucket_size buckets as the backward pass (2/3 of
                   the step) produces them, on a side stream when overlap_comm (only the tail after
                   the backward pass shows), else in line; then the updated partitions all-gathered
                   in allgather_bucket_size pieces (nothing to overlap: exposed).
  ZeRO 3           non-persistent parameters gathered in forward and again in backward, prefetched
                   in stage3_prefetch_bucket_size pieces along the recorded trace; after a variant
                   switch the trace is invalid (dyntrain.train.engine.ZERO3_NOTE) and that step's gathers
                   are exposed; gradients reduce-scattered in buckets overlapping backward.
  every step       one small all-reduce of the loss (dyntrain.train.trainer), latency only.
  dynamic mix      the step is S or L (schedule.variant_probs): t(n) = sum_v p_v t_v(n), each
                   variant with its own compute/communication ratio; efficiency = t(1) / t(n)
                   (weak scaling: the per-GPU batch fixed at --batch, i.e. the job that states
                   ``deepspeed.global_batch_size=<batch x n>``; each row's batch comes from the
                   batch plan, ``dyntrain.config.plan.batch_plan``, the function the jobs use, and
                   must give micro-batch x accumulation = --batch. Each row also carries the plan
                   of the run config as shipped, ``config_plan``: pretrain.yaml's global batch 32 is
                   split over n GPUs up to 32 and grows to n beyond, which is strong scaling).
  S3 read          aggregate samples/s x bytes per sample.

Check (default on; --no-check skips): on this machine the real engine (DeepSpeed, gloo, CPU, the
config's ZeRO stage) trains S and L on 1 rank and on 2 ranks (the deepspeed launcher), and the 2-rank
run times all-reduce and all-gather of the real gradient size; the model fed with the measured
1-rank step times and the fitted gloo latency/bandwidth predicts the 2-rank step time
(``two_rank.relative_error``). Last line: weak_scaling_64=<efficiency at 8 nodes x 8 GPUs with the
recommended ZeRO stage>.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import common  # noqa: E402
from scaling_check import run_check  # noqa: E402 - the measured half

from dyntrain.config.plan import batch_plan, lr_factor  # noqa: E402
from dyntrain.logs import setup_logging  # noqa: E402

from scaling_model import (  # noqa: E402, F401 - the model, re-exported for the tests
    INTRA_GBPS,
    INTER_GBPS,
    INTRA_LAT_S,
    INTER_LAT_S,
    DEFAULT_BYTES_PER_SAMPLE,
    H100_PEAK_TFLOPS,
    GPUS_PER_NODE,
    NODES,
    BACKWARD_FRAC,
    ENGINE_ALLREDUCE_BUCKET,
    Link,
    gpu_link,
    serial_tail,
    bucketed,
    prefetch_exposed,
    exposed_comm_s,
    model_shape,
    step_time_s,
)


def suite_step_s(path: Path) -> Optional[tuple[dict[str, float], Optional[int]]]:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("step_ms_S") is None or data.get("step_ms_L") is None:
        return None
    return {"S": data["step_ms_S"] / 1e3, "L": data["step_ms_L"] / 1e3}, data.get("batch")


def measured_step_s(cfg, device, batch: int, crop: int) -> dict[str, float]:
    """The optimised recipe of bench/train_step.py on ``device``."""
    import train_step

    gpu = device.type == "cuda"
    recipe = train_step.Recipe("optimised", bf16=gpu, channels_last=gpu, compile_backend=None,
                               compile_mode=None, fused_adam=gpu, cudnn_benchmark=gpu)
    sizes = {"dim": cfg.model.dim, "crop": crop, "batch": batch}
    flops = {v: 0 for v in ("S", "L")}
    rows = train_step.measure_recipe(recipe, _dynet_config(cfg), device, sizes, ["S", "L"],
                                     3 if gpu else 1, 10 if gpu else 3, flops, None)["variants"]
    return {v: rows[v]["step_s"] for v in ("S", "L")}


def flops_step_s(cfg, batch: int, crop: int, mfu: float) -> dict[str, float]:
    return {v: common.train_flops_per_step(_dynet_config(cfg), crop, batch, v)
            / (mfu * H100_PEAK_TFLOPS * 1e12) for v in ("S", "L")}


def bytes_per_sample(manifest: Optional[str]) -> tuple[float, str]:
    if not manifest:
        return float(DEFAULT_BYTES_PER_SAMPLE), "default (512x512 JPEG q95)"
    data = json.loads(Path(manifest).read_text())
    shards = data["shards"]
    return sum(s["bytes"] for s in shards) / sum(s["samples"] for s in shards), manifest


def _dynet_config(cfg):
    from dyntrain.train.model import dynet_config

    return dynet_config(cfg)


# ---------------------------------------------------------------------------- the table
def scaling_table(cfg, step_s, probs, batch: int, intra: float, inter: float,
                  bytes_sample: float) -> dict[str, Any]:
    from dyntrain.train.engine import build_ds_config

    rows, shapes = [], {}
    comm_bytes = 2 if cfg.deepspeed.bf16 is not False else 4
    for stage in (0, 1, 2, 3):
        scfg = common.with_overrides(cfg, [f"deepspeed.zero_stage={stage}", "deepspeed.bf16=true",
                                           "deepspeed.global_batch_size=null"])
        zero = build_ds_config(scfg, 1, "cuda")["zero_optimization"]
        shape = model_shape(cfg, zero.get("stage3_param_persistence_threshold", 0))
        shapes[stage] = {"zero_optimization": zero, **shape}
        base = step_time_s(step_s, probs, stage, zero, shape, comm_bytes, 1, gpu_link(1, 1, intra, inter))
        for g in GPUS_PER_NODE:
            for m in NODES:
                n = g * m
                t = step_time_s(step_s, probs, stage, zero, shape, comm_bytes, n,
                                gpu_link(g, m, intra, inter))
                job, config_plan = weak_scaling_plan(cfg, batch, n), batch_plan(cfg, n)
                per_gpu = batch / t["mix"]
                rows.append({"zero_stage": stage, "gpus_per_node": g, "nodes": m, "gpus": n,
                             "plan": plan_summary(job), "overrides": [f"deepspeed.global_batch_size={batch * n}",
                                                                      f"data.micro_batch_size={batch}",
                                                                      f"optim.lr={job.lr:.6g}"],
                             "config_plan": plan_summary(config_plan),
                             "step_s": t, "efficiency": base["mix"] / t["mix"],
                             "efficiency_per_variant": {v: base[v] / t[v] for v in step_s},
                             "patches_per_s_per_gpu": per_gpu, "patches_per_s": per_gpu * n,
                             "s3_read_bytes_per_s": per_gpu * n * bytes_sample})
    return {"rows": rows, "stages": shapes, "comm_bytes": comm_bytes}


def weak_scaling_plan(cfg, batch: int, n: int):
    """The batch plan of the weak-scaling job on n GPUs: global batch ``batch x n`` with a per-GPU
    cap of ``batch``, the config's samples budget, and its lr scaled from the config's global batch
    by its ``optim.lr_scaling``; the plan must split the batch as ``batch`` per GPU."""
    base = batch_plan(cfg, 1)
    glob = batch * n
    lr = cfg.optim.lr * lr_factor(cfg.optim.lr_scaling, glob / base.configured_global_batch)
    plan = batch_plan(common.with_overrides(cfg, [f"deepspeed.global_batch_size={glob}",
                                                  f"data.micro_batch_size={batch}", f"optim.lr={lr}",
                                                  f"run.max_samples={base.samples}",
                                                  "deepspeed.gradient_accumulation_steps=1"]), n)
    assert plan.micro_batch * plan.accumulation == batch and not plan.grown, plan
    return plan


def plan_summary(plan) -> dict[str, Any]:
    return {"global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation, "iterations": plan.iterations, "lr": plan.lr, "rule": plan.rule}


def recommend(rows: list[dict]) -> dict[int, int]:
    """GPUs -> the ZeRO stage with the best efficiency at 8 GPUs per node (fewer GPUs: one node);
    within 0.1% of each other the stage nearest ZeRO-2 wins (the config's, less memory than 0/1)."""
    best: dict[int, tuple[float, int, int]] = {}
    for r in rows:
        if r["gpus_per_node"] == 8 or (r["nodes"] == 1 and r["gpus"] < 8):
            key = (round(r["efficiency"], 3), -abs(r["zero_stage"] - 2), r["zero_stage"])
            best[r["gpus"]] = max(best.get(r["gpus"], key), key)
    return {n: key[2] for n, key in sorted(best.items())}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in (0, 1, 2, 3):
        pts = sorted((r["gpus"], r["efficiency"]) for r in rows if r["zero_stage"] == stage
                     and (r["gpus_per_node"] == 8 or (r["nodes"] == 1 and r["gpus"] < 8)))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[stage],
                linestyle="--" if stage == 1 else "-", label=f"ZeRO-{stage}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (one node up to 8, then 8 per node)")
    ax.set_ylabel("weak-scaling efficiency (dynamic S/L)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], rec: dict[int, int], source: str, bytes_sample: float) -> None:
    print(f"\nWeak-scaling efficiency of dynamic S/L pre-training (step times: {source}; "
          f"8 GPUs per node from 8 GPUs up)")
    print(f"{'GPUs':>5} {'nodes':>5} " + " ".join(f"{'ZeRO-' + str(s):>7}" for s in range(4))
          + f" {'best':>5} {'patch/s/GPU':>11} {'patch/s':>9} {'S3 GB/s':>8}")
    for n, stage in rec.items():
        cells = {r["zero_stage"]: r for r in rows if r["gpus"] == n
                 and (r["gpus_per_node"] == 8 or (r["nodes"] == 1 and n < 8))}
        best = cells[stage]
        print(f"{n:>5} {best['nodes']:>5} " + " ".join(f"{cells[s]['efficiency']:>7.1%}" for s in range(4))
              + f" {stage:>5} {best['patches_per_s_per_gpu']:>11.0f} {best['patches_per_s']:>9.0f}"
              f" {best['s3_read_bytes_per_s'] / 1e9:>8.2f}")
    print(f"bytes per training sample: {bytes_sample / 1e3:.0f} kB")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-source", default="auto", choices=["auto", "suite", "measure", "flops"])
    p.add_argument("--suite", default=str(Path(__file__).resolve().parent / "results" / "gpu_suite.json"))
    p.add_argument("--batch", type=int, default=common.PAPER["batch"], help="per-GPU micro-batch")
    p.add_argument("--crop", type=int, default=common.PAPER["crop"])
    p.add_argument("--assume-mfu", type=float, default=0.30)
    p.add_argument("--intra-gbps", type=float, default=INTRA_GBPS)
    p.add_argument("--inter-gbps", type=float, default=INTER_GBPS)
    p.add_argument("--manifest", default=None, help="the shards' manifest.json")
    p.add_argument("--bytes-per-sample", type=float, default=None)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/pretrain.yaml"),
                   help="run config (default: the paper's, configs/pretrain.yaml)")
    p.add_argument("--no-check", action="store_true", help="skip the 2-rank measurement")
    p.add_argument("--check-steps", type=int, default=16)
    p.add_argument("--check-warmup", type=int, default=2)
    p.add_argument("--check-threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--check-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the checked engine (default: dim 8, 32x32, batch 2)")
    p.add_argument("--plot", default=None, help="PNG (default: next to --json, else runs/scaling.png)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    setup_logging(0)

    from dyntrain.config import load_config

    cfg = load_config(args.config, [])
    probs = {v: float(cfg.schedule.variant_probs[v]) for v in ("S", "L")}
    batch, suite, source = args.batch, None, args.step_source
    if source in ("auto", "suite"):
        suite = suite_step_s(Path(args.suite))
        if suite is None and source == "suite":
            raise SystemExit(f"--step-source suite: no step_ms_S/step_ms_L in {args.suite}")
    device = common.resolve_device("auto")
    if suite is not None:
        step_s, batch = suite[0], suite[1] or batch
        source = f"measured, {args.suite}"
    elif source == "measure" or (source == "auto" and device.type == "cuda"):
        step_s = measured_step_s(cfg, device, batch, args.crop)
        source = f"measured by train_step on {common.device_name(device)}"
    else:
        step_s = flops_step_s(cfg, batch, args.crop, args.assume_mfu)
        source = f"flops: training FLOPs at MFU {args.assume_mfu:.2f} of {H100_PEAK_TFLOPS:.0f} TFLOP/s"
    if args.bytes_per_sample is not None:
        bytes_sample, bytes_source = args.bytes_per_sample, "--bytes-per-sample"
    else:
        bytes_sample, bytes_source = bytes_per_sample(args.manifest)

    table = scaling_table(cfg, step_s, probs, batch, args.intra_gbps, args.inter_gbps, bytes_sample)
    rows = table["rows"]
    rec = recommend(rows)
    print_table(rows, rec, source, bytes_sample)
    at64 = next(r for r in rows if r["gpus"] == 64 and r["gpus_per_node"] == 8
                and r["zero_stage"] == rec[64])
    plot_path = Path(args.plot or (Path(args.json).with_suffix(".png") if args.json else "runs/scaling.png"))
    plot(rows, plot_path)

    check = None
    if not args.no_check:
        check = run_check(args, probs)
    result: dict[str, Any] = {
        "benchmark": "scaling", **common.environment(device), "step_source": source,
        "step_s_one_gpu": step_s, "batch_per_gpu": batch, "variant_probs": probs,
        "intra_node_gbps": args.intra_gbps, "inter_node_gbps": args.inter_gbps,
        "latency_s": {"intra": INTRA_LAT_S, "inter": INTER_LAT_S},
        "bytes_per_sample": bytes_sample, "bytes_per_sample_source": bytes_source,
        "comm_bytes_per_element": table["comm_bytes"], "stages": table["stages"],
        "recommended_zero_stage": rec, "rows": rows, "plot": str(plot_path),
        "weak_scaling_64": at64["efficiency"], "s3_read_bytes_per_s": at64["s3_read_bytes_per_s"],
        "two_rank": check,
    }
    if check is not None:
        print(f"2-rank check (CPU, gloo, ZeRO-{check['zero_stage']}): measured "
              f"{check['measured_step_s']['mix'] * 1e3:.1f} ms, predicted "
              f"{check['predicted_step_s']['mix'] * 1e3:.1f} ms from 1 rank "
              f"{check['one_rank_step_s']['mix'] * 1e3:.1f} ms; error {check['relative_error']:.1%}")
    print(f"S3 read at 64 GPUs: {at64['s3_read_bytes_per_s'] / 1e9:.2f} GB/s; plot: {plot_path}")
    common.write_json(args.json, result)
    common.headline("weak_scaling_64", at64["efficiency"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
