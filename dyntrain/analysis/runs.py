"""What the comparison reads from MLflow: pre-training runs (their account) and evaluated runs
(their PSNR/SSIM tables), and the GPU-hour saving of separate vs dynamic pre-training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class PretrainRun:
    run_id: str
    name: str
    experiment: str
    mode: str  # "dynamic" or "fixed:<variant>"
    status: str
    metrics: dict[str, float]
    data: str = ""   # the training set (MLflow dataset input): name@digest

    @property
    def steps(self) -> float:
        return sum(v for k, v in self.metrics.items() if k.startswith("steps_") and k != "steps_s")


@dataclass
class ResultRun:
    run_id: str
    name: str
    experiment: str
    stage: str
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # variant -> task -> psnr/ssim
    gflops: dict[str, float] = field(default_factory=dict)


def separate_vs_dynamic(pretrain: list[PretrainRun]) -> Optional[dict[str, Any]]:
    """Measured saving of the newest dynamic run against fixed-variant baseline runs (one per variant,
    the newest), their GPU hours scaled to the dynamic run's step count."""
    dynamic = [r for r in pretrain if r.mode == "dynamic" and r.metrics.get("gpu_hours") and r.steps]
    baselines: dict[str, PretrainRun] = {}
    for r in pretrain:
        if r.mode.startswith("fixed:") and r.metrics.get("gpu_hours") and r.steps:
            baselines[r.mode[6:]] = r
    if not dynamic or len(baselines) < 2:
        return None
    d = dynamic[-1]
    separate = sum(b.metrics["gpu_hours"] / b.steps * d.steps for b in baselines.values())
    return {"dynamic": d.name, "steps": d.steps, "dynamic_gpu_hours": d.metrics["gpu_hours"],
            "baselines": sorted(b.name for b in baselines.values()), "separate_gpu_hours": separate,
            "saved_frac": 1.0 - d.metrics["gpu_hours"] / separate}
