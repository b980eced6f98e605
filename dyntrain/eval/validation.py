"""Pre-training validation: a fixed held-out set, every variant evaluated on it during training.

The set. ``data.val_urls`` names held-out shards (``make_shards --holdout``). Once per run, every
rank builds the same ``eval.val_samples`` crops through the training loader itself
(:class:`~dyntrain.data.pretrain.pipeline.DaliPretrainLoader`: same DALI decode/crop/degradation, same torch
regions and blend), read in file order (no shuffling), one sample per loader batch, so the crop
window, degradation kind and level and the regions of sample ``i`` are a pure function of
(``run.seed``, the shard list, ``i``) - independent of the world size, the validation batch size and
the training data. Each sample's degraded and masked regions are kept apart so that they can be
scored separately. ``fingerprint`` (shard list + seed + sizes + degradation spec) is logged as the
param ``val.fingerprint``; the SHA-256 of the tensors as the tag ``val.inputs_sha256``, and before
every evaluation the tensors are hashed again and must match (identical inputs at every evaluation).

The evaluation. Every ``eval.every`` steps, at the last step and before the first step of a fresh
run, every variant of ``model.variants`` (trained or not) runs on the set. Weights: a plain fp32 copy
of the engine's module (``dyntrain.eval.periodic.plain_copy``; under ZeRO-3 gathered collectively), on every rank.
Data: rank r scores samples r, r + W, ...; per-sample sums are all-reduced, so every ZeRO stage and
world size gives the same figures. Metrics at the training step (``log_metrics(step=...)``):

    val/<v>/l1, val/<v>/psnr                    over the whole crop (mean over samples)
    val/<v>/l1_degraded, val/<v>/psnr_degraded  over the degraded region only
    val/<v>/l1_masked, val/<v>/psnr_masked      over the masked region only
    val/<v>/own_steps                           optimizer steps trained with v so far
    val/gpu_hours                               training GPU hours so far, validation excluded
    val/pflop                                   training work so far (``tracking.account``)
    val/time_s                                  this evaluation's wall time

Validation time stays out of every step time; the GPU-hour account books it as time outside steps
(``val_s_total``; ``gpu_hours_train`` excludes it).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dyntrain.data.pretrain.degrade import DegradeSpec, batch_params, region_masks
from dyntrain.data.pretrain.pipeline import DaliPretrainLoader
from dyntrain.errors import ConfigError
from dyntrain.eval.periodic import PeriodicEvaluation
from dyntrain.logs import get_logger
from dyntrain.seeds import seed32
from dyntrain.train.callbacks import StepContext


log = get_logger(__name__)

_SALT = 0x7A11D  # the validation set's seeds never coincide with a training rank's
FIELDS = ("l1", "psnr", "n", "l1_degraded", "psnr_degraded", "n_degraded",
          "l1_masked", "psnr_masked", "n_masked")


class ValidationInputsChanged(RuntimeError):
    """The fixed validation tensors no longer hash to the value they had when built."""


@dataclass
class ValSet:
    """The fixed validation crops (CPU tensors): input/target float (N, 3, S, S), regions bool
    (N, 1, S, S)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    degraded: torch.Tensor
    masked: torch.Tensor
    keys: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.inputs, self.targets, self.degraded, self.masked):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def val_fingerprint(shards: list[str], seed: int, samples: int, spec) -> str:
    """What determines the set: shard list, run seed, size and the degradation spec."""
    text = json.dumps({"shards": list(shards), "seed": int(seed), "samples": int(samples),
                       "spec": repr(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_val_set(urls, spec, samples: int, seed: int) -> ValSet:
    """Read ``samples`` crops (at most the shards' sample count) of ``urls`` into a :class:`ValSet`."""

    vseed = seed32(seed, _SALT)
    loader = DaliPretrainLoader(urls, spec, 1, rank=0, world_size=1, device="cpu", seed=vseed,
                                num_threads=1, prefetch=1, shuffle_buffer=0, decode="cpu")
    try:
        n = min(int(samples), loader.total_samples)
        inputs, targets, degraded, masked, keys = [], [], [], [], []
        for i in range(n):
            batch = next(loader)
            gen = torch.Generator().manual_seed(int(batch_params(spec, vseed, 0, i, 1)["region_seed"]))
            deg, msk = region_masks(spec, 1, gen, torch.device("cpu"))
            if not torch.equal((deg | msk).float(), batch["mask"].cpu()):
                raise RuntimeError(f"validation sample {i}: regions do not match the loader's mask")
            inputs.append(batch["input"].cpu())
            targets.append(batch["target"].cpu())
            degraded.append(deg)
            masked.append(msk)
            keys.extend(batch["keys"])
        shards = list(loader.shards)
    finally:
        loader.close()
    return ValSet(torch.cat(inputs), torch.cat(targets), torch.cat(degraded), torch.cat(masked), keys,
                  val_fingerprint(shards, seed, n, spec))


def _region_sums(err_abs: torch.Tensor, err_sq: torch.Tensor, region: Optional[torch.Tensor]
                 ) -> tuple[float, float, float]:
    """(sum of per-sample L1, sum of per-sample PSNR, samples counted) over ``region``."""
    if region is None:
        l1 = err_abs.flatten(1).mean(1)
        mse = err_sq.flatten(1).mean(1)
        keep = torch.ones_like(l1, dtype=torch.bool)
    else:
        w = region.float().expand_as(err_abs).flatten(1)
        count = w.sum(1)
        keep = count > 0
        l1 = (err_abs.flatten(1) * w).sum(1) / count.clamp_min(1)
        mse = (err_sq.flatten(1) * w).sum(1) / count.clamp_min(1)
    psnr = -10.0 * torch.log10(mse.clamp_min(1e-10))
    return float(l1[keep].sum()), float(psnr[keep].sum()), float(keep.sum())


@torch.no_grad()
def score_variants(model: torch.nn.Module, valset: ValSet, variants: dict, rank: int, world: int,
                   device: torch.device, batch_size: int) -> dict[str, list[float]]:
    """This rank's per-variant sums (in ``FIELDS`` order) over samples rank, rank + world, ..."""
    idx = list(range(rank, len(valset), world))
    out = {}
    for name, reuse in variants.items():
        sums = [0.0] * len(FIELDS)
        for lo in range(0, len(idx), batch_size):
            sel = torch.as_tensor(idx[lo:lo + batch_size])
            x = valset.inputs[sel].to(device)
            y = valset.targets[sel].to(device)
            pred = model(x, reuse=tuple(reuse)).float().clamp(0.0, 1.0)
            err_abs, err_sq = (pred - y).abs(), (pred - y) ** 2
            regions = (None, valset.degraded[sel].to(device), valset.masked[sel].to(device))
            for k, region in enumerate(regions):
                for j, value in enumerate(_region_sums(err_abs, err_sq, region)):
                    sums[3 * k + j] += value
        out[name] = sums
    return out


def reduce_scores(local: dict[str, list[float]], world: int, device: torch.device
                  ) -> dict[str, list[float]]:
    """Sum every rank's sums (all ranks get the result)."""
    names = list(local)
    t = torch.tensor([local[n] for n in names], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return {n: t[i].tolist() for i, n in enumerate(names)}


def to_metrics(sums: dict[str, list[float]]) -> dict[str, float]:
    """``val/<v>/<name>`` means from summed per-sample figures (regions with no samples left out)."""
    out = {}
    for name, s in sums.items():
        for k, region in enumerate(("", "_degraded", "_masked")):
            n = s[3 * k + 2]
            if n > 0:
                out[f"val/{name}/l1{region}"] = s[3 * k] / n
                out[f"val/{name}/psnr{region}"] = s[3 * k + 1] / n
    return out


class Validation(PeriodicEvaluation):
    """Pre-training validation (a callback of every rank): builds the fixed set at the start,
    evaluates a fresh run before its first step, then every ``eval.every`` steps and at the last.
    Subscribers (``then``) get each evaluation's ``val/...`` figures."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg.eval.every, cfg.run.max_steps, cfg.deepspeed.zero_stage == 3, all_ranks=True)
        self.cfg = cfg
        self.valset: Optional[ValSet] = None
        self.digest = ""
        self._t0 = 0.0

    def on_start(self, ctx: StepContext) -> None:
        """Build the set (its time is booked as validation) and, for a fresh run, evaluate at step 0
        (the step-0 figures inform no subscriber: the draw starts from the configured probabilities)."""
        cfg = self.cfg
        try:
            spec = DegradeSpec.from_config(cfg.data)
        except ValueError as exc:
            raise ConfigError(f"data: {exc}") from None
        t0 = time.perf_counter()
        self.valset = build_val_set(cfg.data.val_urls, spec, cfg.eval.val_samples, cfg.run.seed)
        self.digest = self.valset.digest()
        ctx.account.add_validation(time.perf_counter() - t0)
        ctx.tracker.log_params({"val.fingerprint": self.valset.fingerprint, "val.samples": len(self.valset)})
        ctx.tracker.set_tags({"val.fingerprint": self.valset.fingerprint, "val.inputs_sha256": self.digest})
        if ctx.step == 0:
            self.run(ctx)

    def run(self, ctx: StepContext) -> dict[str, float]:
        self._t0 = time.perf_counter()  # the evaluation's time includes the check and the weights' copy
        if self.valset.digest() != self.digest:
            raise ValidationInputsChanged(f"step {ctx.step}: the validation tensors changed since they "
                                          f"were built (sha256 {self.digest[:12]}...)")
        return super().run(ctx)

    def evaluate(self, model: Optional[torch.nn.Module], ctx: StepContext) -> dict[str, float]:
        step = ctx.step
        local = score_variants(model, self.valset, dict(self.cfg.model.variants), ctx.rank,
                               ctx.world_size, ctx.device, self.cfg.eval.val_batch_size)
        del model
        out = to_metrics(reduce_scores(local, ctx.world_size, ctx.device))
        account = ctx.account
        for name in self.cfg.model.variants:
            out[f"val/{name}/own_steps"] = float(account.count.get(name, 0))
        dt = time.perf_counter() - self._t0
        account.add_validation(dt)
        out["val/gpu_hours"] = account.gpu_hours_train
        if account.flops_per_sample:
            out["val/pflop"] = account.pflop
        out["val/time_s"] = dt
        ctx.tracker.log_metrics(out, step=step)
        if ctx.rank == 0:
            psnr = ", ".join(f"{n} {out[f'val/{n}/psnr']:.2f}" for n in self.cfg.model.variants
                             if f"val/{n}/psnr" in out)
            log.info(f"[{self.cfg.run.name}] val @ step {step}: PSNR {psnr} dB "
                     f"({len(self.valset)} crops, {dt:.1f} s)")
        return out
