"""The measured half of bench/scaling.py: the real engine on 1 and on 2 CPU ranks (gloo), and the
gloo all-reduce / all-gather of the real gradient size, to check the step-time model against.

    python bench/scaling_check.py --out ONE.json [--steps 8 --warmup 2 --threads 1] [--set k=v ...]
    deepspeed --num_gpus 2 bench/scaling_check.py --out TWO.json [...]    # the same on 2 ranks

Each rank trains DyNet-S and DyNet-L in turns through ``dyntrain.train.engine.build_engine`` and the
project's Trainer (in-memory batches, so the figures are the training system's), --warmup untimed
steps per variant, then --steps timed ones per variant in two interleaved rounds. The step time of a
variant is its fastest timed step: on a shared machine other jobs only ever add time (the median is
reported alongside). On more than one rank it then times (median of 10) an all-reduce of the
gradient (every parameter, the engine's dtype), an all-gather of the same bytes, and an 8-byte
all-reduce (the latency). ``run_check`` runs two 1-rank runs side by side (each with the share of the
machine one rank of the 2-rank run gets, as a GPU rank has its own GPU), then the 2-rank run, and
compares the model's prediction; it records the load average, since other jobs on a shared machine
slow the synchronised 2-rank steps more than independent 1-rank ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import common  # noqa: E402
import scaling_model  # noqa: E402

from dyntrain.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("scaling_check")

CHECK_MODEL = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
               "model.num_refinement=1", "data.crop_size=32", "data.micro_batch_size=2",
               "deepspeed.bf16=false"]


def check_config(overrides: list[str], steps: int):
    """The checked run: CPU, the paper's config with the small model, then the user's overrides."""
    return common.training_config(None, CHECK_MODEL + list(overrides), common.resolve_device("cpu"),
                                  dict(common.CPU_SMALL, crop=32), steps, False, False)


def _median(values: list[float]) -> float:
    return common.stats(values)["median_s"]


def time_collectives(params: int, dtype, reps: int = 10) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    grad = torch.ones(params, dtype=dtype)
    chunk = torch.ones(math.ceil(params / world), dtype=dtype)
    gathered = torch.empty(chunk.numel() * world, dtype=dtype)
    tiny = torch.ones(2, dtype=torch.float32)
    ops = {"all_reduce_grad_s": lambda: dist.all_reduce(grad),
           "all_gather_grad_s": lambda: dist.all_gather_into_tensor(gathered, chunk),
           "all_reduce_8_bytes_s": lambda: dist.all_reduce(tiny)}
    out = {}
    for name, op in ops.items():
        times = []
        for _ in range(reps + 1):
            dist.barrier()
            t0 = common.now()
            op()
            times.append(common.now() - t0)
        out[name] = _median(times[1:])
    return out


def worker(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    setup_logging()

    import torch

    from dyntrain.train.engine import build_engine, init_distributed, shutdown_distributed
    from dyntrain.train.model import build_model

    cfg = check_config(args.set, args.steps)
    info = init_distributed(cfg)
    torch.set_num_threads(args.threads)
    engine, ds_config = build_engine(cfg, build_model(cfg), info)
    loader = common.SyntheticBatches(cfg.data.micro_batch_size, cfg.data.crop_size, info.device)
    variants = ("S", "L")
    for v in variants:
        common.train_phase(cfg, engine, loader, common.fixed_schedule(cfg, v), info, args.warmup)
    times: dict[str, list[float]] = {v: [] for v in variants}
    half = [args.steps // 2, args.steps - args.steps // 2]
    for r, n in enumerate(half):
        for v in variants:
            chunk = common.train_phase(cfg, engine, loader, common.fixed_schedule(cfg, v), info, n,
                                       start=args.warmup + r * args.steps)
            times[v] += [rec["step_time_s"] for rec in chunk["records"]]
    params = sum(p.numel() for p in engine.module.parameters())
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    result: dict[str, Any] = {
        "world_size": info.world_size, "threads": torch.get_num_threads(),
        "zero_stage": cfg.deepspeed.zero_stage, "zero_optimization": ds_config["zero_optimization"],
        "comm_bytes": torch.tensor([], dtype=dtype).element_size(), "params": params,
        "step_s": {v: min(times[v]) for v in variants},
        "median_step_s": {v: _median(times[v]) for v in variants}, "step_times_s": times,
        "collectives": time_collectives(params, dtype) if info.world_size > 1 else None,
    }
    loader.close()
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info(f"{info.world_size} rank(s): S {result['step_s']['S'] * 1e3:.1f} ms, "
                 f"L {result['step_s']['L'] * 1e3:.1f} ms per step")
    shutdown_distributed()
    return 0


def _launch(ranks: int, outs: list[Path], args, timeout: float = 600) -> list[dict[str, Any]]:
    """One ``ranks``-rank run per path in ``outs``, side by side; their results."""
    from dyntrain.train.engine import free_port

    script = str(Path(__file__).resolve())
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.check_threads),
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    procs = []
    for out in outs:
        inner = ["--out", str(out), "--steps", str(args.check_steps), "--warmup",
                 str(args.check_warmup), "--threads", str(args.check_threads)]
        cmd = [sys.executable, script] if ranks == 1 else [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), script]
        with open(out.with_suffix(".log"), "w") as console:  # files: no pipe fills up and blocks
            procs.append(subprocess.Popen(cmd + inner + [f"--set={s}" for s in args.check_set],
                                          env=env, stdout=console, stderr=subprocess.STDOUT))
    results = []
    for proc, out in zip(procs, outs):
        proc.wait(timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            text = out.with_suffix(".log").read_text()
            raise RuntimeError(f"the {ranks}-rank measurement failed ({proc.returncode}):\n"
                               f"{text[-4000:]}")
        results.append(json.loads(out.read_text()))
    return results


def run_check(args, probs: dict[str, float]) -> dict[str, Any]:
    """Measure 1 and 2 ranks, fit the gloo link, predict the 2-rank step from the 1-rank one."""
    with tempfile.TemporaryDirectory() as tmp:
        ranks_here = 2
        log.info("2-rank check: the engine on 1 CPU rank (two such runs side by side, so each has "
                 "the share of the machine a rank of the 2-rank run has) ...")
        load = [os.getloadavg()[0]]
        ones = _launch(1, [Path(tmp) / f"one{i}.json" for i in range(ranks_here)], args)
        load.append(os.getloadavg()[0])
        log.info("2-rank check: the engine on 2 CPU ranks (deepspeed launcher, gloo) ...")
        (two,) = _launch(2, [Path(tmp) / "two.json"], args)
        load.append(os.getloadavg()[0])
    return {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "device": common.device_name(common.resolve_device("cpu")),
            **model_check(ones, two, check_config(args.check_set, args.check_steps), probs),
            "load_average_1min": load, "cpus": os.cpu_count()}


def model_check(ones: list[dict[str, Any]], two: dict[str, Any], cfg, probs: dict[str, float]) -> dict[str, Any]:
    """The model fed with what one check measured (the 1-rank runs ``ones``, the 2-rank run ``two``,
    as ``worker`` writes them): the gloo link fitted to the 2-rank run's collectives, the predicted
    2-rank step from the fastest 1-rank steps, and its error against the measured 2-rank step. Pure
    arithmetic: the same inputs give the same prediction on any machine."""
    one = {"step_s": {v: min(o["step_s"][v] for o in ones) for v in ones[0]["step_s"]},
           "step_times_s": [o["step_times_s"] for o in ones]}
    n, col = two["world_size"], two["collectives"]
    grad_bytes = two["params"] * two["comm_bytes"]
    latency = col["all_reduce_8_bytes_s"] / (2 * math.ceil(math.log2(n)))
    moving = max(col["all_reduce_grad_s"] - col["all_reduce_8_bytes_s"], 1e-9)
    link = scaling_model.Link(latency, 2 * (n - 1) / n * grad_bytes / moving, "gloo (measured)")
    zero = two["zero_optimization"]
    shape = scaling_model.model_shape(cfg, zero.get("stage3_param_persistence_threshold", 0))
    same = {v: 1.0 for v in one["step_s"]}  # the timed chunks run one variant at a time
    predicted = scaling_model.step_time_s(one["step_s"], same, two["zero_stage"], zero, shape,
                                    two["comm_bytes"], n, link)
    mix = lambda d: sum(probs[v] * d[v] for v in probs)  # noqa: E731
    predicted["mix"] = mix(predicted)
    measured = {**two["step_s"], "mix": mix(two["step_s"])}
    errors = {k: abs(predicted[k] - measured[k]) / measured[k] for k in measured}
    return {
        "ranks": n,
        "threads_per_rank": two["threads"], "zero_stage": two["zero_stage"], "params": two["params"],
        "comm_bytes_per_element": two["comm_bytes"], "collectives_s": col,
        "link": {"latency_s": link.latency_s, "busbw_bytes_per_s": link.busbw},
        "modelled_all_gather_s": link.collective_s("all_gather", grad_bytes, n),
        "one_rank_step_s": {**one["step_s"], "mix": mix(one["step_s"])},
        "measured_step_s": measured, "predicted_step_s": predicted,
        "step_times_s": {"one_rank": one["step_times_s"], "two_ranks": two["step_times_s"]},
        "relative_error_per_variant": {v: errors[v] for v in one["step_s"]},
        "relative_error": errors["mix"],
    }


if __name__ == "__main__":
    sys.exit(worker())
