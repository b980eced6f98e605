"""The GPU-hour account: what dynamic S/L training costs against training each variant alone.

Let N be the productive optimizer steps (see "Faults" below), n_v of them with variant v, t_v the
mean productive step time of v (wall clock of the step: data wait + forward + backward + optimizer;
on CUDA synchronised at the step's end), W the wall time of the training loop (everything between
the first step's start and the last step's end: steps, logging, checkpoint saves, checks; summed over
resumed segments; start-up before the first step — process group, model, engine, loader, resume — is
reported separately as ``startup_s_total`` and included in ``gpu_hours_with_startup``), R the
start-up time of the segments after the first (restarts) and A the number of accelerators (GPUs, or
CPU processes on a machine without GPU):

    gpu_hours                     = (W + R) * A / 3600
    gpu_hours_lost                = sum of gpu_hours_lost_<cause>, cause in stall, replay, restart
    gpu_hours_productive          = gpu_hours - gpu_hours_lost
    gpu_hours_separate            = N * sum_v t_v * A / 3600       (v over the variants the run trains)
    gpu_hours_saved_frac          = 1 - gpu_hours_productive / gpu_hours_separate
    gpu_hours_saved_frac_expected = 1 - sum_v n_v t_v / (N * sum_v t_v)
    overhead_frac                 = 1 - sum_v n_v t_v * A / 3600 / gpu_hours_productive
                                    (productive time outside the steps)
    switch_penalty_s              = mean over steps that switched variant of (t - t_v of a
                                    non-switching step of the same variant)

Faults cost GPU hours but do not move the saving: the time they cost is booked by cause and left out
of both sides of the saving. Per step (its label: the variants it trains, and its teacher):

    replay    a step computed again after a resume: its index is below the furthest step any earlier
              segment reached (``furthest_step``, carried in the account state and, for a segment
              killed after its last checkpoint, in ``account_progress.json`` beside the checkpoints,
              written by rank 0 after every step). Its whole time is lost, with its pro-rata share
              of the loop's time outside steps (logging, checkpoint saves: the productive steps'
              ratio of outside time to step time); it counts in ``steps_<v>`` (it is in the final
              weights) but not in N: the first computation of that step died with the killed
              segment, whose time after its checkpoint the account never saw (a resume continues
              the checkpoint's account), so the replay stands for it (``replayed_steps``).
    restart   the start-up of every segment after the first (R), plus the warm-up of a resumed
              segment: the first step of each label in it counts at its typical time, the rest is
              lost (``restarts``: segments after the first). The first segment's warm-up is part of
              any run (a separate run pays its own) and stays productive.
    stall     a step longer than 3 x its label's typical time + 0.5 s (a step that waited on
              storage, or on a peer that did) counts at its typical time; the excess is lost
              (``stalled_steps``). The total step time is judged, not only the data wait: under data
              parallelism a stalled reader on one rank makes every rank wait in the all-reduce.

The typical time of a label is the median of its last 15 ordinary steps (neither warm-up nor
stalled) once 3 were seen; before that, the largest typical time of the other labels (a variant's
first steps can stall too); before any, nothing is judged (the bounds: ``dyntrain.tracking.faults``).
gpu_hours = productive + lost holds by construction. Every time figure is
carried across resumes in accelerator-seconds (a segment on another number of accelerators converts
them), so a step on 1 rank hosting 2 readers and one on 2 ranks weigh the same.

Validation (``dyntrain.eval.validation``) runs between steps: its time is part of W but never of a step
time, and is reported as ``val_s_total``; ``gpu_hours_train = (W - validation time in the loop) * A /
3600`` is the training cost alone, the x axis of the validation curves (``val/gpu_hours``).

Steps that run several variants (``schedule.mode: sandwich``) count as a step of each of them
(``steps_<v>``, ``val/<v>/own_steps``: every variant got an update), and their time is split between
the variants in proportion to each variant's measured forward time inside the step (the backward
pass and the optimizer step are shared out in the same proportion), so ``sum_v`` of the per-variant
seconds stays the time of the steps, N counts optimizer steps, and ``t_v`` is v's share of such a
step. A distillation teacher's forward without gradient (dynamic mode) is measured on its own and
booked as ``teacher_s_total``: part of the steps' time (and of W) but of no variant's ``t_v``, so it
lowers the saving instead of inflating the "separate" estimate.

Work, independent of the machine's speed and load: with F_v = one forward of v on one sample at the
run's crop size (FLOPs, ``dynet.flops``, attention products included) and B the samples of a step
(all ranks), a training pass costs 3 F_v B (forward and backward), a teacher forward F_T B;
``pflop`` is their sum so far (in 1e15), ``val/pflop`` its value at each validation. Run-to-run
comparisons on a shared machine can use it as their cost axis (``compare --iso-quality --x pflop``).

"Separate" is what the paper compares against: training each variant alone for the same N
iterations, at the per-variant step time measured in this run. With two variants at p = 0.5,
sum_v n_v t_v ~ N (t_S + t_L) / 2, so the expected saving is ~50% whatever t_S and t_L are. The
measured saving falls short of the expected one only by the time spent outside steps
(``overhead_frac`` / 2 for two equiprobable variants); a switching cost would show in
``switch_penalty_s``. In fixed-variant mode (the baselines) the run trains one variant, so
``gpu_hours_separate`` is that variant's own cost and the saving is ~0 (slightly negative: overhead).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Optional

from dyntrain.tracking.faults import LOST_CAUSES, FaultLedger


def forward_shares(variants, pass_s: Optional[dict[str, float]]) -> list[float]:
    """Each variant's share of a multi-variant step (fractions summing to 1): in proportion to its
    measured forward seconds in ``pass_s``, equal shares when none was measured."""
    weights = [max(0.0, (pass_s or {}).get(v, 0.0)) for v in variants]
    total = sum(weights)
    if total <= 0:
        return [1.0 / len(variants)] * len(variants)
    return [w / total for w in weights]


class GPUHourAccount:
    """Per-variant step counts and times plus the training loop's wall time (see module docstring).

    Args:
        accelerators: GPUs, or CPU processes, the run occupies (the world size).
        variants: the variants the run trains (probability > 0); ``gpu_hours_separate`` sums over them.
    """

    def __init__(self, accelerators: int, variants: Iterable[str]) -> None:
        self.accelerators = int(accelerators)
        self.variants = list(variants)
        self.count = {v: 0 for v in self.variants}      # steps of v in the final weights (steps_<v>)
        self.productive = {v: 0 for v in self.variants}  # n_v: those not replayed
        self.seconds = {v: 0.0 for v in self.variants}   # productive seconds of v's steps
        # steps that follow a step of the same variant vs. a switch (first step of a segment: neither)
        self.same = {v: [0, 0.0] for v in self.variants}
        self.switched = {v: [0, 0.0] for v in self.variants}
        self.n_steps = 0       # optimizer steps (a sandwich step counts once here, once per variant above)
        self.n_productive = 0  # N: optimizer steps not replayed
        self.teacher_s = 0.0   # teacher forwards without gradient (dynamic-mode distillation)
        self.flops = 0.0       # training work so far (FLOPs, see the module docstring)
        self.flops_per_sample: dict[str, float] = {}  # F_v; empty = work not counted
        self.prior_wall_s = 0.0
        self.startup_s = 0.0  # process start -> first step, summed over segments (not in gpu_hours)
        self.restart_startup_s = 0.0  # the part of it after the first segment (R, in gpu_hours)
        self.val_s = 0.0       # validation, all of it
        self.val_loop_s = 0.0  # validation inside the training loop's wall time
        self.faults = FaultLedger()  # what faults cost (``dyntrain.tracking.faults``)
        self._segment_start: Optional[float] = None
        self._segment_wall_s = 0.0
        self._previous: Optional[str] = None

    # --------------------------------------------------------------------------------- timing
    def start(self) -> None:
        """Start (or restart, after a resume) the wall clock of the training loop."""
        self._segment_start = time.perf_counter()
        self._previous = None

    def stop(self) -> None:
        if self._segment_start is not None:
            self._segment_wall_s += time.perf_counter() - self._segment_start
            self._segment_start = None

    @property
    def wall_s(self) -> float:
        running = time.perf_counter() - self._segment_start if self._segment_start is not None else 0.0
        return self.prior_wall_s + self._segment_wall_s + running

    def add_startup(self, seconds: float) -> None:
        """Start-up time of this segment (distributed init, model, engine, loader, resume); after
        the first segment it is restart cost."""
        self.startup_s += float(seconds)
        if self.faults.resumed:
            self.restart_startup_s += float(seconds)
            self.faults.add_startup(float(seconds))

    def add_validation(self, seconds: float) -> None:
        """Validation took ``seconds`` (between steps, or before the loop started)."""
        self.val_s += float(seconds)
        if self._segment_start is not None:
            self.val_loop_s += float(seconds)

    @property
    def gpu_hours_train(self) -> float:
        """GPU hours of the training loop without its validation time."""
        return max(0.0, self.wall_s - self.val_loop_s) * self.accelerators / 3600.0

    def _ensure(self, variant: str) -> None:
        if variant not in self.count:  # e.g. a variant outside the planned set
            self.variants.append(variant)
            self.count[variant], self.productive[variant], self.seconds[variant] = 0, 0, 0.0
            self.same[variant], self.switched[variant] = [0, 0.0], [0, 0.0]

    def record(self, variant: str, seconds: float) -> None:
        """One productive optimizer step of ``variant`` took ``seconds``."""
        self._ensure(variant)
        self.n_steps += 1
        self.n_productive += 1
        self.count[variant] += 1
        self.productive[variant] += 1
        self.seconds[variant] += seconds
        if self._previous is not None:
            bucket = self.same if self._previous == variant else self.switched
            bucket[variant][0] += 1
            bucket[variant][1] += seconds
        self._previous = variant

    def record_step(self, variants, seconds: float, pass_s: Optional[dict[str, float]] = None,
                    samples: int = 0, teacher: Optional[str] = None, step: Optional[int] = None) -> None:
        """One optimizer step that trained ``variants`` took ``seconds``; ``pass_s``: measured
        forward seconds per variant inside it, and "teacher" for the forward without gradient of
        the variant ``teacher``; ``samples``: samples of the step over all ranks (work count);
        ``step``: its index (0-based), which tells a replay after a resume (None: not judged)."""
        variants = list(variants)
        if self.flops_per_sample and samples:
            work = 3.0 * sum(self.flops_per_sample.get(v, 0.0) for v in variants)
            if teacher is not None:
                work += self.flops_per_sample.get(teacher, 0.0)
            self.flops += work * samples
        label = "+".join(variants) + (f"|{teacher}" if teacher is not None else "")
        if self.faults.replayed(step, label, float(seconds)):  # in the final weights, but lost time
            self.n_steps += 1
            for v in variants:
                self._ensure(v)
                self.count[v] += 1
            self._previous = None
            return
        kept = self.faults.judge(label, float(seconds))
        scale = kept / seconds if seconds > 0 else 1.0
        pass_s = {k: x * scale for k, x in (pass_s or {}).items()}
        teacher_s = float(pass_s.pop("teacher", 0.0))
        train = max(0.0, kept - teacher_s)
        self.teacher_s += teacher_s
        if len(variants) == 1:
            self.record(variants[0], train)
        else:
            for v, share in zip(variants, forward_shares(variants, pass_s)):
                self._ensure(v)
                self.count[v] += 1
                self.productive[v] += 1
                self.seconds[v] += train * share
            self.n_steps += 1
            self.n_productive += 1
            self._previous = None  # a switch penalty is a property of single-variant steps

    # -------------------------------------------------------------------------------- figures
    @property
    def steps(self) -> int:
        """Optimizer steps recorded (replays included)."""
        return self.n_steps

    @property
    def pflop(self) -> float:
        return self.flops / 1e15

    def mean_step_s(self, variant: str) -> Optional[float]:
        """t_v: the mean productive step time of ``variant`` (None before its first)."""
        n = self.productive.get(variant, 0)
        return self.seconds[variant] / n if n else None

    def metrics(self) -> dict[str, float]:
        """The account as MLflow metrics (the gpu_hours_separate family only once every trained
        variant has been measured)."""
        a, n_steps, wall = self.accelerators, self.n_productive, self.wall_s
        step_sum = sum(self.seconds.values()) + self.teacher_s
        total_s = wall + self.restart_startup_s
        lost = self.faults.lost_by_cause(total_s, step_sum)
        lost_s = sum(lost.values())
        productive_s = total_s - lost_s
        out: dict[str, float] = {"gpu_hours": total_s * a / 3600.0, "train_wall_s": wall,
                                 "steps_s": step_sum, "gpu_hours_productive": productive_s * a / 3600.0,
                                 "gpu_hours_lost": lost_s * a / 3600.0}
        for cause in LOST_CAUSES:
            out[f"gpu_hours_lost_{cause}"] = lost[cause] * a / 3600.0
        out["replayed_steps"] = float(self.faults.replayed_steps)
        out["stalled_steps"] = float(self.faults.stalled_steps)
        out["restarts"] = float(self.faults.segments - 1)
        if self.teacher_s:
            out["teacher_s_total"] = self.teacher_s
        if self.flops_per_sample:
            out["pflop"] = self.pflop
        if productive_s > 0:
            out["overhead_frac"] = 1.0 - step_sum / productive_s
        if self.val_s:
            out["val_s_total"] = self.val_s
            out["gpu_hours_train"] = self.gpu_hours_train
        if self.startup_s:
            out["startup_s_total"] = self.startup_s
            out["gpu_hours_with_startup"] = (wall + self.startup_s) * a / 3600.0
        for v in self.variants:
            mean = self.mean_step_s(v)
            if mean is not None:
                out[f"step_time_mean_{v}"] = mean
                out[f"gpu_hours_{v}"] = self.seconds[v] * a / 3600.0
            if self.count[v]:
                out[f"steps_{v}"] = float(self.count[v])
        means = [self.mean_step_s(v) for v in self.variants]
        if n_steps and all(m is not None for m in means):
            per_iter_separate = sum(means)  # type: ignore[arg-type]
            separate = n_steps * per_iter_separate * a / 3600.0
            out["gpu_hours_separate"] = separate
            out["gpu_hours_saved_frac"] = 1.0 - out["gpu_hours_productive"] / separate
            out["gpu_hours_saved_frac_expected"] = 1.0 - step_sum / (n_steps * per_iter_separate)
        penalties = []
        for v in self.variants:
            (n_same, s_same), (n_sw, s_sw) = self.same[v], self.switched[v]
            if n_same and n_sw:
                penalties.append((n_sw, s_sw / n_sw - s_same / n_same))
        if penalties:
            total = sum(n for n, _ in penalties)
            out["switch_penalty_s"] = sum(n * p for n, p in penalties) / total
        return out

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"accelerators": self.accelerators, "variants": list(self.variants),
                "n_steps": self.n_steps, "n_productive": self.n_productive, "teacher_s": self.teacher_s,
                "flops": self.flops, "count": dict(self.count), "productive": dict(self.productive),
                "seconds": dict(self.seconds),
                "same": {k: list(v) for k, v in self.same.items()},
                "switched": {k: list(v) for k, v in self.switched.items()},
                "wall_s": self.wall_s, "startup_s": self.startup_s, "restart_startup_s": self.restart_startup_s,
                "val_s": self.val_s, "val_loop_s": self.val_loop_s, "faults": self.faults.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the account of a checkpoint: this is a new segment of that run (a restart)."""
        for v in state["variants"]:
            if v not in self.variants:
                self.variants.append(v)
        # a resumed run may use a different number of accelerators: its past times are converted
        # into accelerator-seconds at the new count (a step of 2 s on 1 rank weighs 1 s on 2), so
        # gpu_hours stays the sum of both segments and t_v mixes them fairly
        scale = state["accelerators"] / self.accelerators
        self.count.update(state["count"])
        # before the fault account existed every step was productive
        self.productive.update(state.get("productive", state["count"]))
        self.seconds.update({k: float(x) * scale for k, x in state["seconds"].items()})
        for name in ("same", "switched"):
            getattr(self, name).update({k: [int(v[0]), float(v[1]) * scale] for k, v in state[name].items()})
        # before multi-variant steps existed every step counted for exactly one variant
        self.n_steps = int(state.get("n_steps", sum(int(c) for c in state["count"].values())))
        self.n_productive = int(state.get("n_productive", self.n_steps))
        self.flops = float(state.get("flops", 0.0))
        for v in self.variants:
            self.count.setdefault(v, 0)
            self.productive.setdefault(v, 0)
            self.seconds.setdefault(v, 0.0)
            self.same.setdefault(v, [0, 0.0])
            self.switched.setdefault(v, [0, 0.0])
        self.prior_wall_s = float(state["wall_s"]) * scale
        self.startup_s = float(state.get("startup_s", 0.0)) * scale
        self.restart_startup_s = float(state.get("restart_startup_s", 0.0)) * scale
        self.val_s = float(state.get("val_s", 0.0)) * scale
        self.val_loop_s = float(state.get("val_loop_s", 0.0)) * scale
        self.teacher_s = float(state.get("teacher_s", 0.0)) * scale
        self.faults.load_state_dict(state.get("faults", {}), scale, self.n_steps)
        self._segment_wall_s = 0.0
        self._segment_start = None
