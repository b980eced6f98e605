"""Helpers shared by the benchmarks: device choice, the GPU's bf16 peak, timing, peak memory,
model FLOPs per training step, the JSON report and the headline line.

Every benchmark prints a readable table, writes its full results with ``--json PATH`` and prints
its headline figure as its last line, ``name=value``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from dyntrain.data.loader import LoaderBase

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment; first match wins.
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]

# the paper's pre-training setting and the small CPU setting the benchmarks fall back to
PAPER = {"dim": 48, "crop": 128, "batch": 32}
CPU_SMALL = {"dim": 8, "crop": 32, "batch": 2}


def add_common_args(parser) -> None:
    """--device, --threads, --peak-tflops, --json (every benchmark takes them)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = CUDA when present")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0 = OMP_NUM_THREADS or torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the accelerator's dense bf16 peak for MFU (default: by GPU name; "
                             "none on CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the full results here")


def resolve_device(name: str) -> torch.device:
    """--device: see ``dyntrain.devices.choose_device`` (exits when CUDA is asked for but absent)."""
    from dyntrain.devices import choose_device

    return choose_device(name, setting="--device", error=SystemExit)


def set_threads(threads: int) -> int:
    """Apply --threads (0 keeps OMP_NUM_THREADS / torch's default); return the thread count."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_tflops(device: torch.device,
                override: Optional[float] = None) -> tuple[Optional[float], str]:
    """(dense bf16 peak in TFLOP/s or None, where the figure came from)."""
    if override is not None:
        if override <= 0:
            raise SystemExit(f"--peak-tflops must be positive, got {override}")
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for fragment, value in GPU_BF16_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            return value, f"table entry {fragment!r} for {name!r}"
    return None, f"unknown GPU {name!r} (pass --peak-tflops)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()


def paper_or_small(device: torch.device, dim: Optional[int], crop: Optional[int],
                   batch: Optional[int]) -> dict[str, int]:
    """Sizes given on the command line, else the paper's on CUDA and the small ones on CPU."""
    base = PAPER if device.type == "cuda" else CPU_SMALL
    return {"dim": dim if dim is not None else base["dim"],
            "crop": crop if crop is not None else base["crop"],
            "batch": batch if batch is not None else base["batch"]}


# ------------------------------------------------------------------- benches on the real engine
def add_engine_args(parser) -> None:
    """Model size, compile/channels-last and config arguments of the benches that train through
    the real DeepSpeed engine (dynamic_vs_separate, input_pipeline)."""
    import argparse

    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch per GPU")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="model.compile (DyNet.compile_blocks); auto = on with CUDA")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--config", default=None, help="YAML run config (default: the paper's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, e.g. deepspeed.zero_stage=0 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_common_args(parser)


def on_off(value: str, gpu: bool) -> bool:
    """An auto/on/off flag: auto = on with CUDA."""
    return gpu if value == "auto" else value == "on"


def engine_setup(args) -> tuple[torch.device, bool, dict[str, int]]:
    """Device (DS_ACCELERATOR=cpu without CUDA), torch threads and sizes: (device, gpu, sizes)."""
    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    set_threads(args.threads)
    return device, device.type == "cuda", paper_or_small(device, args.dim, args.crop, args.batch)


# ------------------------------------------------------------------------------------- memory
def proc_status_bytes(field: str) -> Optional[int]:
    """A size from /proc/self/status (e.g. ``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_BASE_RSS = proc_status_bytes("VmRSS") or 0  # after importing torch, before any model exists


class PeakMemory:
    """Peak memory of a stretch of work: CUDA's max_memory_allocated on a GPU (weights, optimizer
    state and activations); on the CPU the process's peak resident set (VmHWM, rewound through
    /proc/self/clear_refs) above its resident set right after importing torch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = proc_status_bytes("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - _BASE_RSS)

    @property
    def kind(self) -> str:
        return ("cuda max_memory_allocated" if self.device.type == "cuda"
                else "process peak RSS above the RSS after importing torch")


def release(device: torch.device) -> None:
    """Give cached memory back between side-by-side measurements."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- FLOPs
def train_flops_per_step(model_config, crop: int, batch: int, variant: str) -> int:
    """Model FLOPs of one training step (forward + backward = 3 x forward) from the project's
    own counter, with the channel-attention products included (``FlopCount.total``)."""
    from dynet import DyNet
    from dynet.flops import count_flops

    with torch.device("meta"):
        meta = DyNet(model_config)
    return 3 * count_flops(meta, crop, crop, variant=variant, batch=batch).total


def mfu(flops_per_step: float, step_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOP utilisation: achieved FLOP/s over the peak (None without a peak)."""
    if peak is None or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak * 1e12)


def stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return {"mean_s": sum(ordered) / n, "median_s": median, "min_s": ordered[0],
            "max_s": ordered[-1], "n": n}


# -------------------------------------------------------------------------------------- output
def environment(device: torch.device) -> dict[str, Any]:
    return {"date": datetime.date.today().isoformat(), "device": device_name(device),
            "device_type": device.type, "torch": torch.__version__,
            "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}


def write_json(path: Optional[str], result: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")


def fmt(value: Optional[float], spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def headline(name: str, value: Optional[float]) -> None:
    """The benchmark's last line: name=value (value None prints as 'nan')."""
    print(f"{name}={'nan' if value is None else format(value, '.4g')}", flush=True)


# ------------------------------------------------------------------- the real training system
def training_config(config_path: Optional[str], overrides: list[str], device: torch.device,
                    sizes: dict[str, int], steps: int, compile_blocks: bool,
                    channels_last: bool):
    """The run config a benchmark trains with: ``config_path`` (default: the paper's defaults),
    the benchmark's sizes and switches, then the user's ``--set`` overrides (which win)."""
    from dyntrain.config import load_config

    base = [f"run.device={device.type}", f"run.max_steps={steps}", f"run.log_every={steps}",
            f"model.dim={sizes['dim']}", f"data.crop_size={sizes['crop']}",
            f"data.micro_batch_size={sizes['batch']}", "deepspeed.global_batch_size=null",
            "deepspeed.gradient_accumulation_steps=1",
            f"model.compile={str(compile_blocks).lower()}",
            f"model.channels_last={str(channels_last).lower()}", "tracking.enabled=false",
            "checkpoint.dir=null", "schedule.verify_every=0"]
    return load_config(config_path, base + list(overrides))


def with_overrides(cfg, overrides: list[str]):
    """A copy of ``cfg`` with dotted overrides applied."""
    from dyntrain.config import Config, apply_override

    data = cfg.to_dict()
    for item in overrides:
        apply_override(data, item)
    return Config.from_dict(data)


class SyntheticBatches(LoaderBase):
    """An in-memory loader with the data contract's shape: ``count`` fixed random batches on the
    training device, cycled forever, so training steps measure compute alone."""

    def __init__(self, batch: int, crop: int, device: torch.device, count: int = 4,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self._batches = []
        for i in range(count):
            target = torch.rand(batch, 3, crop, crop, generator=gen)
            noisy = (target + 0.1 * torch.randn(batch, 3, crop, crop, generator=gen)).clamp(0, 1)
            self._batches.append({"input": noisy.to(device), "target": target.to(device),
                                  "keys": [f"synthetic-{i}-{j}" for j in range(batch)]})
        self._i = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._batches[self._i % len(self._batches)]
        self._i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self._i}

    def load_state_dict(self, state: dict) -> None:
        self._i = int(state["i"])

    def stats(self) -> dict:
        return {"samples": self._i * len(self._batches[0]["keys"]), "corrupt_skipped": 0,
                "epoch": 0}

    def close(self) -> None:
        self._batches = []


def fixed_schedule(cfg, variant: str):
    from dyntrain.train.schedule import VariantSchedule

    return VariantSchedule(cfg.run.seed, cfg.model.variants, mode="fixed", fixed_variant=variant)


def dynamic_schedule(cfg):
    from dyntrain.train.schedule import VariantSchedule

    return VariantSchedule(cfg.run.seed, cfg.model.variants, cfg.schedule.variant_probs,
                           mode="dynamic")


def train_phase(cfg, engine, loader, schedule, info, steps: int, start: int = 0) -> dict[str, Any]:
    """Train global iterations ``start .. start + steps - 1`` through the project's Trainer (a
    fresh Trainer and GPU-hour account on the given engine and loader); returns the account's
    metrics plus the per-step records."""
    from dyntrain.train.callbacks import OnEveryStep
    from dyntrain.train.trainer import Trainer

    phase_cfg = with_overrides(cfg, [f"run.max_steps={start + steps}", f"run.log_every={steps}"])
    trainer = Trainer(phase_cfg, engine, loader, schedule, None, info.rank, info.world_size,
                      device=info.device)
    trainer.step = start  # the schedule's draws continue where the previous chunk stopped
    records: list[dict[str, Any]] = []
    trainer.add_callback(OnEveryStep(lambda ctx: records.append(
        {k: ctx.metrics[k] for k in ("variant", "step_time_s", "data_wait_s", "loss")})))  # never forces a host read
    sync(info.device)
    result = trainer.train()
    sync(info.device)
    return {"metrics": result.metrics, "records": records, "steps": result.step - start}
