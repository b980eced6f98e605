"""The console tracker: the lines a person reads while a run trains (rank 0 only).

Three kinds of line, each prefixed with ``[<run name>]``:

- the header before the first step (``log_start``): schedule and variant probabilities, world,
  device, ZeRO stage, bf16, global batch, steps, MLflow run;
- a progress line for every window of metrics the trainer logs (those with ``patches_per_s``):
  ``step t/total | loss L (S l_S L l_L) | lr | patches/s | per-variant step time | saved X% at equal
  iterations | ETA`` (every saving names its basis: ``dyntrain.tracking.savings``);
  the per-variant figures are the ``loss_<v>`` / ``step_time_<v>`` metrics of the window, and the
  ETA is the remaining steps at the window's mean step time;
- the summary at the end (``log_end``): finished / stopped early, GPU hours, separate, saved (at
  equal iterations).

Other metrics (evaluation, the final account) make no line here. The lines are INFO records of the
``dyntrain`` logger (``dyntrain.logs``).
"""
from __future__ import annotations

import datetime
from typing import Optional

from dyntrain.logs import get_logger
from dyntrain.tracking.base import RunHeader, Tracker
from dyntrain.tracking.savings import EQUAL_ITERATIONS, saved_text


log = get_logger(__name__)


class ConsoleTracker(Tracker):
    """Args:
    run_name: ``run.name`` (the prefix of every line).
    max_steps: ``run.max_steps`` (the total of the progress line and its ETA).
    """

    def __init__(self, run_name: str, max_steps: int) -> None:
        self.run_name = run_name
        self.max_steps = int(max_steps)

    def log_start(self, header: RunHeader) -> None:
        log.info(self.header_line(header))

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if step is not None and "patches_per_s" in metrics:
            log.info(self.progress_line(metrics, step))

    def log_end(self, step: int, stopped_early: bool, metrics: dict[str, float]) -> None:
        log.info(self.summary_line(step, stopped_early, metrics))

    # ------------------------------------------------------------------------------ lines
    def header_line(self, h: RunHeader) -> str:
        probs = ", ".join(f"{n}={p:.2f}" for n, p in h.probs.items() if p > 0)
        return (f"[{self.run_name}] {h.schedule_mode} training of {probs} | world {h.world_size} "
                f"on {h.device_type} | ZeRO {h.zero_stage} | bf16 {h.bf16} | "
                f"global batch {h.global_batch} | steps {h.start_step}->{h.max_steps} | "
                f"mlflow run {h.run_id}")

    def progress_line(self, m: dict[str, float], step: int) -> str:
        variants = sorted(k[len("loss_"):] for k in m if k.startswith("loss_"))
        per_variant = " ".join(f"{n} {m[f'loss_{n}']:.4f}" for n in variants)
        times = " ".join(f"{n} {m[f'step_time_{n}']:.3f}s" for n in variants)
        eta = datetime.timedelta(seconds=round((self.max_steps - step) * m["step_time_s"]))
        saved = m.get("gpu_hours_saved_frac")
        saved_txt = f" | {saved_text(saved, EQUAL_ITERATIONS)}" if saved is not None else ""
        return (f"[{self.run_name}] step {step}/{self.max_steps} | loss {m['loss']:.4f} "
                f"({per_variant}) | lr {m['lr']:.2e} | {m['patches_per_s']:.1f} patches/s | "
                f"{times}{saved_txt} | ETA {eta}")

    def summary_line(self, step: int, stopped_early: bool, m: dict[str, float]) -> str:
        parts = [f"gpu_hours {m['gpu_hours']:.5f}"]
        if m.get("gpu_hours_lost"):  # faults: the saving is of the productive hours
            causes = ", ".join(f"{c} {m[k]:.5f}" for c in ("stall", "replay", "restart")
                               if m.get(k := f"gpu_hours_lost_{c}"))
            parts.append(f"productive {m['gpu_hours_productive']:.5f} + lost to faults "
                         f"{m['gpu_hours_lost']:.5f} ({causes})")
        if "gpu_hours_separate" in m:
            parts += [f"separate {m['gpu_hours_separate']:.5f}",
                      f"{saved_text(m['gpu_hours_saved_frac'], EQUAL_ITERATIONS, 2)} "
                      f"(expected from step times {m['gpu_hours_saved_frac_expected'] * 100:.2f}%)"]
        if "overhead_frac" in m:
            parts.append(f"outside steps {m['overhead_frac'] * 100:.2f}%")
        state = "stopped early" if stopped_early else "finished"
        return f"[{self.run_name}] {state} at step {step} | " + " | ".join(parts)
