"""DeepSpeed setup: the one function that writes the DeepSpeed JSON, process-group start-up, and
engine construction.

``build_ds_config`` derives everything DeepSpeed needs from the typed config — the batch plan
(micro-batch, gradient accumulation, global batch, lr and step counts for the world size at hand:
``dyntrain.config.plan.batch_plan``), ZeRO stage 0-3,
bf16, explicit gradient clipping, optimizer (DeepSpeed "Adam"/"AdamW" through ``torch_adam``, so no
compiled ops are needed) and the LR schedule:

    constant  WarmupLR        linear warm-up 0 -> lr over optim.warmup_steps, then lr
    cosine    WarmupCosineLR  linear warm-up, then cosine from lr to optim.min_lr at total_steps
    linear    WarmupDecayLR   linear warm-up, then linear decay to 0 at total_steps

(DeepSpeed's schedulers run optimizer step k at their value for iteration k - 1 — step 0 at the warm-up
start — and treat a warm-up
shorter than 2 steps as 2; with ``warmup_steps: 0`` the constant schedule is exactly lr throughout.)

The same code path serves ``deepspeed launch/pretrain.py`` and ``python launch/pretrain.py``: for a
single process without a launcher, ``init_distributed`` fills in MASTER_ADDR/MASTER_PORT (a free
port)/RANK/WORLD_SIZE/LOCAL_RANK so DeepSpeed starts a world of one. Without CUDA it selects
DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``), which talks gloo.

ZeRO-3 works with DyNet's changing call pattern (see ``ZERO3_NOTE``).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dyntrain.config import Config
from dyntrain.config.plan import batch_plan
from dyntrain.devices import choose_device
from dyntrain.errors import ConfigError
from dyntrain.train.gradnorm import use_exact_norm
from dyntrain.train.model import compilation


ZERO3_NOTE = (
    "ZeRO-3 records the order in which sub-modules run and prefetches parameters along it. When "
    "the drawn variant changes, the order changes (a shared block runs f times), DeepSpeed sees a "
    "module it did not expect, invalidates the trace, gathers parameters on demand for the rest of "
    "that pass and records a new trace at the next step. This is correct (tested: identical "
    "weights across ranks and the same losses as ZeRO-0) but prefetching helps only on runs of "
    "the same variant; stage3_max_reuse_distance keeps a shared block's parameters gathered "
    "between its f applications.")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


# ------------------------------------------------------------------------------------ devices
def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """``run.device``: "auto" = CUDA when present, else CPU."""

    return choose_device(cfg.run.device, local_rank, setting="run.device", error=ConfigError)


def resolve_bf16(cfg: Config, device: torch.device) -> bool:
    """``deepspeed.bf16``: "auto" = on only on a CUDA device with bf16 support."""
    value = cfg.deepspeed.bf16
    if value == "auto":
        if device.type == "cuda" and not torch.cuda.is_available():
            return True  # a dry run of a GPU job on a machine without one: the GPUs we target have bf16
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for MASTER_PORT; the tests use
    this one helper for every server and launcher they start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_single_process_env() -> None:
    """No launcher: describe a world of one so DeepSpeed's env:// start-up works."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_SIZE", "1")


def extensions_dir_default() -> Optional[str]:
    """Where DeepSpeed's JIT-built ops go unless TORCH_EXTENSIONS_DIR says: the environment's own
    ``torch_extensions`` folder, where ``launch/setup.sh`` builds the CPU accelerator's shared-memory
    collective op. Torch's default, ``~/.cache/torch_extensions``, is shared by every checkout on the
    machine, and two environments rebuild the op there in turn (25-70 s at a start). Left to torch
    where the environment is not writable (a site-wide install). Returns the folder in use, if set."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def init_distributed(cfg: Config) -> DistInfo:
    """Start torch.distributed through DeepSpeed (launcher or single process), pick the device,
    and on CPU share the cores between the local ranks (unless OMP_NUM_THREADS says otherwise)."""
    _fill_single_process_env()
    extensions_dir_default()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # lazy: deepspeed is slow to import and unused by inference
    import deepspeed  # after DS_ACCELERATOR is settled: the accelerator is chosen on first use
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    if os.environ.get("DYNTRAIN_DS_VERBOSE") != "1":  # keep the progress lines readable
        ds_logger.setLevel(logging.WARNING)

    backend = get_accelerator().communication_backend_name()
    if device.type == "cpu" and backend not in ("gloo", "ccl"):
        raise RuntimeError(f"DeepSpeed chose the {get_accelerator()._name!r} accelerator "
                           f"(backend {backend}) but run.device resolved to cpu; set DS_ACCELERATOR=cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts
    shm = device.type == "cpu" and backend == "gloo" and not dist.is_initialized()
    if shm:
        # the rendezvous first (our store now holds MASTER_PORT: no other job is live on it), then
        # the stale buffers of a killed run on this port go, before the ranks create theirs
        # lazy: deepspeed is slow to import and unused by inference (DeepSpeed's DEEPSPEED_TIMEOUT)
        from deepspeed.constants import default_pg_timeout

        dist.init_process_group(backend, timeout=default_pg_timeout)
        if local_rank == 0:
            remove_shm_buffers()
        dist.barrier()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if shm:
        dist.barrier()       # every rank has mapped every rank's buffer: the names can go
        if local_rank == 0:
            remove_shm_buffers()
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def shm_buffer_prefix() -> str:
    """The names DeepSpeed's CPU accelerator gives its shared-memory all-reduce buffers for this
    world (``csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_
    <rank>``, one per rank, created at ``deepspeed.init_distributed`` when every rank is local, and
    never unlinked by DeepSpeed), up to the rank."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_")


def remove_shm_buffers(shm_dir: Path = Path("/dev/shm")) -> int:
    """Unlink this world's shared-memory buffers (every rank of this MASTER_ADDR:MASTER_PORT, this
    user). Safe once every rank has mapped them (a mapping outlives its name) and before any rank
    creates its own; ``init_distributed`` calls it at both points on local rank 0, so a run leaves
    nothing in /dev/shm even when killed, and a run killed during start-up is cleaned up by the next
    one on its port. Returns how many went."""
    prefix, removed = shm_buffer_prefix(), 0
    if not shm_dir.is_dir():
        return 0
    for path in shm_dir.glob(prefix + "*"):
        if path.name[len(prefix):].isdigit():
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


# ------------------------------------------------------------------------------ DeepSpeed JSON
def shutdown_distributed() -> None:
    """Leave the process group after a normal finish: a barrier, so no rank tears down while a peer
    still talks to it, then destroy every group. Left to interpreter exit, gloo's threads can be
    torn down mid-flight and abort a rank ("terminate called without an active exception", exit
    -6) after its work is done, which a job script would read as a failed run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_ds_config(cfg: Config, world_size: int, device: torch.device | str = "cpu",
                    data_ranks: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, from its parts: batch, optimizer, scheduler, ZeRO
    (``data_ranks``: the readers the ranks host, ``dyntrain.data.logical``; None = one per rank).
    ``cfg`` is planned first (``batch_plan(...).apply``; a planned config plans to itself), so the
    dry run and the real start hand DeepSpeed the same JSON."""
    device = torch.device(device)
    cfg = batch_plan(cfg, world_size, data_ranks).apply(cfg)
    ds = cfg.deepspeed
    config: dict[str, Any] = {
        **ds_batch(cfg, world_size, data_ranks),
        "gradient_clipping": float(cfg.optim.grad_clip),  # explicit: 0.0 = no clipping
        "optimizer": ds_optimizer(cfg.optim),
        "scheduler": ds_scheduler(cfg),
        "bf16": {"enabled": resolve_bf16(cfg, device)},
        "fp16": {"enabled": False},
        "zero_optimization": ds_zero(ds, device),
        "steps_per_print": ds.steps_per_print if ds.steps_per_print > 0 else 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if ds.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # keep torch Adam (no compiled CPU Adam)
    return config


def ds_batch(cfg: Config, world_size: int, data_ranks: Optional[int] = None) -> dict[str, int]:
    """Micro-batch, accumulation and global batch (``batch_plan`` derives them)."""
    plan = batch_plan(cfg, world_size, data_ranks)
    assert plan.micro_batch * plan.accumulation * world_size == plan.global_batch
    return {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.accumulation}


def ds_optimizer(opt) -> dict[str, Any]:
    """DeepSpeed's "Adam"/"AdamW" through ``torch_adam``: no compiled DeepSpeed ops needed."""
    return {
        "type": "AdamW" if opt.name == "adamw" else "Adam",
        "params": {
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            "adam_w_mode": opt.name == "adamw",  # DeepSpeed's "Adam" means AdamW unless told
            "torch_adam": True,
        },
    }


def ds_scheduler(cfg: Config) -> dict[str, Any]:
    """``optim.lr_schedule`` as one of DeepSpeed's schedulers (see the module docstring)."""
    opt = cfg.optim
    total_steps = opt.total_steps if opt.total_steps is not None else cfg.run.max_steps
    warmup = opt.warmup_steps
    if opt.lr_schedule == "constant":
        return {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0 if warmup > 0 else opt.lr, "warmup_max_lr": opt.lr,
            "warmup_num_steps": max(1, warmup), "warmup_type": "linear"}}
    if opt.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps, "warmup_min_ratio": 0.0,
            "warmup_num_steps": max(1, warmup), "cos_min_ratio": opt.min_lr / opt.lr,
            "warmup_type": "linear"}}
    return {"type": "WarmupDecayLR", "params": {  # linear
        "total_num_steps": total_steps, "warmup_min_lr": 0.0, "warmup_max_lr": opt.lr,
        "warmup_num_steps": max(1, warmup), "warmup_type": "linear"}}


def ds_zero(ds, device: torch.device) -> dict[str, Any]:
    """The ``zero_optimization`` section.

    Buckets sized for DyNet's 16.6M parameters (bench/scaling.py models the choice): gradients
    are reduced in 2M-element buckets (4 MB in bf16, ~8 per step) so the reduction overlaps the
    rest of the backward pass yet each bucket stays bandwidth-bound on InfiniBand; the updated
    partitions are all-gathered in one call (the gather after the step cannot overlap anything);
    ZeRO-3 prefetches 2M elements ahead and keeps tensors under 1e5 elements (152 of 179,
    10% of the parameters) resident, so they cost no latency-bound gathers of their own.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": ds.overlap_comm and device.type == "cuda",
                     "contiguous_gradients": True,
                     "reduce_bucket_size": int(2e6), "allgather_bucket_size": int(2e7)})
    if ds.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update({"stage3_prefetch_bucket_size": int(2e6),
                     "stage3_param_persistence_threshold": int(1e5),
                     # keep a shared block gathered between its f applications
                     "stage3_max_reuse_distance": int(1e9),
                     "stage3_max_live_parameters": int(1e9),
                     "stage3_gather_16bit_weights_on_model_save": False})
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return zero


def ds_config_for(cfg: Config, world_size: int, device: torch.device | str, data_ranks: Optional[int] = None,
                  custom_scheduler: bool = False) -> dict[str, Any]:
    """Exactly the JSON ``build_engine`` hands to ``deepspeed.initialize`` (and ``--dry-run`` prints):
    ``build_ds_config``, less its "scheduler" when the job brings its own LR scheduler."""
    config = build_ds_config(cfg, world_size, device, data_ranks)
    if custom_scheduler:
        config.pop("scheduler")
    return config


def build_engine(cfg: Config, model: torch.nn.Module, dist_info: DistInfo, lr_scheduler=None,
                 data_ranks: Optional[int] = None):
    """Wrap ``model`` in a DeepSpeed engine built from ``build_ds_config``. ``lr_scheduler``
    (``optimizer -> scheduler``, e.g. the task curriculum's restarts) replaces the JSON's scheduler;
    ``data_ranks``: see ``build_ds_config``."""
    # lazy: deepspeed is slow to import and unused by inference
    import deepspeed

    ds_config = ds_config_for(cfg, dist_info.world_size, dist_info.device, data_ranks,
                              custom_scheduler=lr_scheduler is not None)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config, lr_scheduler=lr_scheduler)
    if cfg.optim.grad_clip > 0:  # the clipping norm independent of the world size (gradnorm.py)
        use_exact_norm(engine.optimizer)
    if compilation(cfg) == "engine":
        engine.compile()
    return engine, ds_config
