"""The communication model of bench/scaling.py, shared with its measured half (bench/scaling_check.py):
interconnect links, DeepSpeed's collectives per ZeRO stage, the exposed communication of a step and
the predicted step time."""
from __future__ import annotations

import math
from typing import Any

import torch

from dynet import DyNet
from dyntrain.train.model import dynet_config

INTRA_GBPS, INTER_GBPS = 360.0, 45.0            # NCCL busbw, GB/s (sources in the docstring)
INTRA_LAT_S, INTER_LAT_S = 8e-6, 15e-6          # per collective step
DEFAULT_BYTES_PER_SAMPLE = 180_000
H100_PEAK_TFLOPS = 989.0
GPUS_PER_NODE = (1, 2, 4, 8)
NODES = (1, 2, 4, 8, 16, 32)
BACKWARD_FRAC = 2.0 / 3.0                       # backward = 2 x forward FLOPs
ENGINE_ALLREDUCE_BUCKET = int(5e8)              # DeepSpeed's stage-0 all-reduce bucket (elements)


class Link:
    """Latency per collective step (s) and bus bandwidth (bytes/s) of one interconnect."""

    def __init__(self, latency_s: float, busbw: float, name: str = "") -> None:
        self.latency_s, self.busbw, self.name = latency_s, busbw, name

    def collective_s(self, op: str, nbytes: float, n: int) -> float:
        if n <= 1 or nbytes <= 0:
            return 0.0
        steps = math.ceil(math.log2(n))
        if op == "all_reduce":
            return 2 * steps * self.latency_s + 2 * (n - 1) / n * nbytes / self.busbw
        return steps * self.latency_s + (n - 1) / n * nbytes / self.busbw


def gpu_link(gpus_per_node: int, nodes: int, intra_gbps: float, inter_gbps: float) -> Link:
    if nodes > 1:
        return Link(INTER_LAT_S, min(intra_gbps, inter_gbps) * 1e9, "InfiniBand")
    return Link(INTRA_LAT_S, intra_gbps * 1e9, "NVLink")


def serial_tail(ready_s: list[float], durations: list[float], compute_end: float) -> float:
    """Chunks on one communication stream, chunk i ready at ready_s[i]: how long the last one
    finishes after ``compute_end`` (the exposed part)."""
    finish = 0.0
    for ready, dur in zip(ready_s, durations):
        finish = max(finish, ready) + dur
    return max(0.0, finish - compute_end)


def bucketed(op: str, elements: int, bucket: int, comm_bytes: int, n: int, link: Link) -> list[float]:
    """Durations of the buckets one collective over ``elements`` is split into."""
    count = max(1, math.ceil(elements / max(1, bucket)))
    sizes = [bucket] * (count - 1) + [elements - bucket * (count - 1)]
    return [link.collective_s(op, s * comm_bytes, n) for s in sizes]


def prefetch_exposed(gathers: list[float], compute_s: float) -> float:
    """Gathers issued ahead along the trace, compute of chunk i waits for gather i (chunks in
    proportion to their gather time): the time the pass is stretched by."""
    total = sum(gathers) or 1.0
    done_gather = done_compute = 0.0
    for g in gathers:
        done_gather += g
        done_compute = max(done_compute, done_gather) + compute_s * g / total
    return max(0.0, done_compute - compute_s)


def exposed_comm_s(stage: int, zero: dict[str, Any], shape: dict[str, int], comm_bytes: int,
                   n: int, link: Link, step_s: float, trace_valid: bool = True) -> float:
    """Communication time one step of ``step_s`` compute shows on ``n`` ranks (see the docstring)."""
    if n <= 1:
        return 0.0
    params = shape["params"]
    loss = link.collective_s("all_reduce", 8, n)
    bwd = BACKWARD_FRAC * step_s
    overlap = bool(zero.get("overlap_comm", False))
    if stage == 0:
        return loss + sum(bucketed("all_reduce", params, ENGINE_ALLREDUCE_BUCKET, comm_bytes, n, link))
    reduce_op = "all_reduce" if stage < 3 else "reduce_scatter"
    grads = bucketed(reduce_op, params, zero["reduce_bucket_size"], comm_bytes, n, link)
    ready = [bwd * (i + 1) / len(grads) for i in range(len(grads))] if overlap else [bwd] * len(grads)
    grad_tail = serial_tail(ready, grads, bwd)
    if stage < 3:
        gather = sum(bucketed("all_gather", params, zero["allgather_bucket_size"], comm_bytes, n, link))
        return loss + grad_tail + gather
    sharded = shape["params"] - shape["persistent_params"]
    gathers = bucketed("all_gather", sharded, zero["stage3_prefetch_bucket_size"], comm_bytes, n, link)
    gathers = [g + link.latency_s * shape["sharded_tensors"] / len(gathers) for g in gathers]
    if trace_valid:
        fwd_bwd = prefetch_exposed(gathers, step_s - bwd) + prefetch_exposed(gathers, bwd)
    else:
        fwd_bwd = 2 * sum(gathers)
    persistent = link.collective_s("all_gather", shape["persistent_params"] * comm_bytes, n)
    return loss + fwd_bwd + grad_tail + persistent


def model_shape(cfg, threshold: int) -> dict[str, int]:
    """Parameter count, and those a ZeRO-3 persistence threshold keeps resident."""
    with torch.device("meta"):
        sizes = [p.numel() for p in DyNet(dynet_config(cfg)).parameters()]
    small = [s for s in sizes if s < threshold]
    return {"params": sum(sizes), "tensors": len(sizes), "persistent_params": sum(small),
            "sharded_tensors": len(sizes) - len(small)}


def step_time_s(step_s: dict[str, float], probs: dict[str, float], stage: int, zero, shape,
                comm_bytes: int, n: int, link: Link) -> dict[str, float]:
    """Per-variant modelled step time on n ranks and the mix's mean. Under ZeRO-3 a step after a
    switch (previous variant differs: probability 1 - p_v) runs without a valid prefetch trace."""
    out = {}
    for v, t in step_s.items():
        valid = exposed_comm_s(stage, zero, shape, comm_bytes, n, link, t, True)
        if stage == 3:
            invalid = exposed_comm_s(stage, zero, shape, comm_bytes, n, link, t, False)
            valid = probs[v] * valid + (1 - probs[v]) * invalid
        out[v] = t + valid
    out["mix"] = sum(probs[v] * out[v] for v in step_s)
    return out


# ------------------------------------------------------------------------------- inputs
