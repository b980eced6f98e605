"""The GPU-hour saving at equal quality: one dynamic run against the two separate runs.

    python bench/quality_saving.py [--seed 0] [--steps N] [--eval-every E] [--images M]
                                   [--dim 8 --crop 32 --batch 4] [--device auto|cpu|cuda]
                                   [--work DIR] [--json PATH]

Three pre-trainings through the real path (``launch/pretrain.py``, one process each, one after
another - DeepSpeed keeps process groups that a second engine in the same process cannot reuse:
DeepSpeed engine, Trainer, DALI loader on real shards, MLflow in sqlite, validation every E steps), with the same seed, training shards and held-out validation shards (built here
from generated photographs with ``make_shards --holdout 0.25``):

    dynamic    schedule.mode=dynamic (S and L drawn with p = 0.5)      N steps
    S alone    schedule.mode=fixed schedule.fixed_variant=S            N steps
    L alone    schedule.mode=fixed schedule.fixed_variant=L            N steps

then ``dyntrain.compare.compare_iso_quality`` (what ``launch/compare.py --iso-quality`` runs): for
each variant the GPU hours its separate run needed to reach the dynamic run's final val PSNR, and
``iso_quality_saving = 1 - gh_dynamic / sum_v gh_separate_to_match[v]``, plus the equal-budget view.
Also reported: the equal-iterations saving of the account (``gpu_hours_saved_frac``).

Defaults: CPU dim 8, 32x32 crops, batch 4, N=240, E=20; CUDA dim 48, 128x128, batch 32, N=2000,
E=100. Last line: iso_quality_saving=<value>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = {"dim": 8, "crop": 32, "batch": 4, "steps": 240, "eval_every": 20, "images": 16,
       "val_samples": 32, "lr": 2e-3}
GPU = {"dim": 48, "crop": 128, "batch": 32, "steps": 2000, "eval_every": 100, "images": 48,
       "val_samples": 256, "lr": 1e-3}
MODES = {"dynamic": ["schedule.mode=dynamic"],
         "S": ["schedule.mode=fixed", "schedule.fixed_variant=S"],
         "L": ["schedule.mode=fixed", "schedule.fixed_variant=L"]}


def prepare_data(work: Path, images: int, seed: int, patch: int) -> tuple[str, str]:
    """Generated photographs -> training and held-out validation shards; returns their globs."""
    from dyntrain.data.patches import ShardBuildConfig
    from dyntrain.data.shards import build_with_holdout
    from dyntrain.data.synthetic import write_synthetic_images

    write_synthetic_images(work / "images", images, size=(4 * patch, 4 * patch), seed=seed)
    cfg = ShardBuildConfig(patch_size=patch, shard_samples=32, max_flat_frac=1.0, workers=1)
    build_with_holdout([work / "images"], str(work / "shards"), str(work / "val"), 0.25, cfg,
                       seed=seed, progress=False)
    return f"{work / 'shards'}/*.tar", f"{work / 'val'}/*.tar"


def run_three(work: Path, size: dict[str, Any], seed: int, device: str,
              extra: Optional[list[str]] = None) -> dict[str, Any]:
    """The three trainings and the comparison (see the module docstring); returns the figures."""
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    from dyntrain.compare import compare_iso_quality

    work.mkdir(parents=True, exist_ok=True)
    train, val = prepare_data(work, size["images"], seed, max(64, 2 * size["crop"]))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    experiment = f"quality-saving-seed{seed}"
    base = [f"run.seed={seed}", f"run.max_steps={size['steps']}", f"run.log_every={size['eval_every']}",
            f"run.device={device}", f"model.dim={size['dim']}", f"data.crop_size={size['crop']}",
            f"data.micro_batch_size={size['batch']}", f"data.train_urls=[{train}]",
            f"data.val_urls=[{val}]", "data.shuffle_buffer=64", f"eval.every={size['eval_every']}",
            f"eval.val_samples={size['val_samples']}", f"optim.lr={size['lr']}",
            "optim.lr_schedule=constant", "optim.warmup_steps=0", "checkpoint.dir=null",
            f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.system_metrics=false",
            "schedule.verify_every=0", "deepspeed.zero_stage=2"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", device))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for name, mode in MODES.items():
        log = work / f"train_{name}.log"
        with open(log, "w") as out:
            rc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config",
                                 str(ROOT / "configs" / "quickstart.yaml"), *base, *mode,
                                 f"run.name=qs-{name}-seed{seed}", *(extra or [])],
                                env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"training {name} failed (exit {rc}); log: {log}")
    png = work / "iso_quality.png"
    r = compare_iso_quality(uri, experiment, None, png, log=True)
    account = {name: MlflowClient(uri).get_run(run).data.metrics for name, run in
               [("dynamic", r["dynamic_run"])] + list(r["baseline_runs"].items())}
    return {"seed": seed, "size": size, "iso_quality_saving": r["iso_quality_saving"],
            "iso_quality_saving_is_bound": r["iso_quality_saving_is_bound"],
            "gh_dynamic": r["gh_dynamic"], "gh_separate_to_match": r["gh_separate_to_match"],
            "reached": r["reached"], "target_psnr": r["target_psnr"],
            "psnr_separate_same_gpu_hours": r["psnr_separate_same_gpu_hours"],
            "psnr_separate_same_own_steps": r["psnr_separate_same_own_steps"],
            "own_steps_dynamic": r["own_steps_dynamic"],
            "gpu_hours_saved_frac_equal_iterations": account["dynamic"].get("gpu_hours_saved_frac"),
            "gpu_hours_train": {k: v.get("gpu_hours_train") for k, v in account.items()},
            "table": r["text"], "plot": str(png), "tracking_uri": uri, "experiment": experiment}


def suite_stage(dry_run: bool = False, deadline: Optional[float] = None) -> dict[str, Any]:
    """The GPU suite's "quality saving" stage (bench/gpu_stages.py): the GPU-sized setting (steps
    cut to what the deadline leaves, at least 500). The dry run builds the held-out shards and the
    fixed validation set only (seconds) and returns their description."""
    import tempfile
    import time

    import torch

    with tempfile.TemporaryDirectory(prefix="quality_saving_") as tmp:
        if dry_run:
            from dyntrain.data.degrade import DegradeSpec
            from dyntrain.validation import build_val_set

            _, val = prepare_data(Path(tmp), 4, 0, 64)
            vs = build_val_set([val], DegradeSpec(crop_size=32), 8, seed=0)
            return {"dry_run": True, "val_samples": len(vs), "val_fingerprint": vs.fingerprint}
        gpu = torch.cuda.is_available()
        size = dict(GPU if gpu else CPU)
        if deadline is not None:  # ~0.1 s per step and run with start-up and validation, 3 runs
            left = deadline - time.time() - 120
            size["steps"] = max(500, min(size["steps"], int(left / 0.3)))
            size["eval_every"] = max(1, size["steps"] // 20)
        r = run_three(Path(tmp), size, 0, "cuda" if gpu else "cpu")
    r.pop("plot")
    return r


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    for key in ("steps", "eval_every", "images", "dim", "crop", "batch", "val_samples"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--work", default=None, help="where shards, mlflow.db and the plot go "
                                                     "(default runs/quality_saving/seed<S>)")
    parser.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    if args.threads:
        common.set_threads(args.threads)
    size = dict(GPU if device.type == "cuda" else CPU)
    for key in list(size):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    work = Path(args.work or f"runs/quality_saving/seed{args.seed}")
    r = run_three(work, size, args.seed, device.type, args.set)
    print(r["table"])
    print(f"equal iterations (the account): gpu_hours_saved_frac="
          f"{common.fmt(r['gpu_hours_saved_frac_equal_iterations'], '.4f')}; plot {r['plot']}")
    r["environment"] = common.environment(device)
    common.write_json(args.json, r)
    common.headline("iso_quality_saving", r["iso_quality_saving"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
