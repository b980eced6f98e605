"""Mixed vs sequential task curricula for multiple-in-one fine-tuning, at equal steps.

    python bench/curriculum.py [--steps-per-period 20] [--periods 10] [--batch 4] [--crop 32]
                               [--dim 8] [--preset in] [--threads N] [--json PATH]

Three arms train the same tiny DyNet (same init, S/L drawn per step by the project's schedule) on
the same synthetic clean images through ``data.source: synthetic``'s loader, each for
periods x steps-per-period steps with Adam:

  mixed             all seven tasks from the start (uniform), cosine LR over the whole run
  seq_detail        sequential, order sr blur noise jpeg rain haze lowlight (MiOIR's SBNJRHL),
                    cosine LR restarted every period
  seq_luminance     sequential, the reverse order (lowlight and haze first)

Then each arm's S and L are evaluated on In-Dis MiO test sets made from held-out clean images
(``dyntrain.eval.testsets``): PSNR per task and averaged. Headline: ``sequential_minus_mixed_db`` =
average PSNR of seq_detail minus mixed, over S and L.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


from common import add_common_args, headline, resolve_device, set_threads, write_json  # noqa: E402
from dyntrain.config import load_config  # noqa: E402
from dyntrain.data.finetune.tasks import TaskCurriculum  # noqa: E402
from dyntrain.data.finetune.degradations import TABLE  # noqa: E402
from dyntrain.data.synthetic import write_synthetic_images  # noqa: E402
from dyntrain.data.finetune.synthetic_pairs import SyntheticPairLoader, scan_clean  # noqa: E402
from dyntrain.eval.evaluate import evaluate_model, load_test_sets  # noqa: E402
from dyntrain.train.model import build_model  # noqa: E402
from dyntrain.train.schedule import VariantSchedule  # noqa: E402
from dyntrain.eval.testsets import make_testsets  # noqa: E402

DETAIL = ["sr", "blur", "noise", "jpeg", "rain", "haze", "lowlight"]
TINY = ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]", "model.num_refinement=1"]


def add_mio_args(parser) -> None:
    """The options of a tiny-DyNet MiO comparison (this bench and bench/shared_weights.py)."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="in", choices=["in", "out"])
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser)


def run_arms(args, train, names) -> tuple[dict, torch.device, int]:
    """``train(name, args, images, test_pairs, device)`` for every arm, on clean training images and MiO
    test pairs made from synthetic photographs; returns (results by arm, device, threads)."""
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_images(tmp / "train", args.train_images, size=(96, 96), seed=args.seed)
        write_synthetic_images(tmp / "test", args.test_images, size=(64, 64), seed=args.seed + 1000)
        make_testsets(tmp / "test", tmp / "mio", [args.preset], DETAIL, args.seed)
        images, _ = scan_clean([str(tmp / "train")], args.crop)
        pairs = load_test_sets({"mio": str(tmp / "mio")})
        return {name: train(name, args, images, pairs, device) for name in names}, device, threads


def train_and_evaluate(model, opt, loader, variant_at, steps: int, test_pairs, device, lr_of=None,
                       variants=("S", "L")) -> tuple[float, dict]:
    """``steps`` L1 steps (the variant of each from ``variant_at``, the LR from ``lr_of`` when given),
    then every test pair restored as each of ``variants``; returns (train seconds, results by variant)."""
    t0 = time.perf_counter()
    for step in range(steps):
        if lr_of is not None:
            for group in opt.param_groups:
                group["lr"] = lr_of(step)
        batch = next(loader)
        out = model(batch["input"], variant=variant_at(step))
        loss = (out.clamp(0, 1) - batch["target"]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    return train_s, evaluate_model(model, test_pairs, list(variants), device)


def arm(name: str, args, images, test_pairs, device) -> dict:
    """Train one arm from the common init; return its per-variant results and wall time."""
    weights = {t: 1 for t in DETAIL}
    steps = args.periods * args.steps_per_period
    if name == "mixed":
        cur = TaskCurriculum(args.seed, weights, "mixed")
        lr_of = TaskCurriculum(args.seed, weights, "sequential", DETAIL, steps, 1, 0, args.lr, args.lr / 100).lr_at
    else:
        order = DETAIL if name == "seq_detail" else DETAIL[::-1]
        cur = TaskCurriculum(args.seed, weights, "sequential", order, args.steps_per_period, args.periods,
                             0, args.lr, args.lr / 100)
        lr_of = cur.lr_at
    cfg = load_config(None, TINY + [f"model.dim={args.dim}", f"run.seed={args.seed}"])
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = VariantSchedule.from_config(cfg)
    loader = SyntheticPairLoader(images, cur, args.preset, args.crop, args.batch, args.seed, 0, 1, 1, device)
    train_s, results = train_and_evaluate(model, opt, loader, schedule.variant_at, steps, test_pairs, device, lr_of)
    return {"train_s": train_s, "steps": steps, "samples": loader.stats(),
            "psnr": {v: {t: r["psnr"] for t, r in res.items()} for v, res in results.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps-per-period", type=int, default=20)
    parser.add_argument("--periods", type=int, default=10)
    add_mio_args(parser)
    args = parser.parse_args(argv)
    arms, device, threads = run_arms(args, arm, ("mixed", "seq_detail", "seq_luminance"))
    avg = f"mio_{args.preset}_average"
    rows = [f"{'arm':14s} {'var':3s} " + " ".join(f"{t:>8s}" for t in list(TABLE) + ["average"])]
    for name, res in arms.items():
        for v in ("S", "L"):
            ps = res["psnr"][v]
            rows.append(f"{name:14s} {v:3s} " + " ".join(
                f"{ps.get(f'mio_{args.preset}_{t}', float('nan')):8.2f}" for t in TABLE) + f" {ps[avg]:8.2f}")
    print("\n".join(rows))
    diff = {v: arms["seq_detail"]["psnr"][v][avg] - arms["mixed"]["psnr"][v][avg] for v in ("S", "L")}
    lum = {v: arms["seq_luminance"]["psnr"][v][avg] - arms["mixed"]["psnr"][v][avg] for v in ("S", "L")}
    result = {"args": vars(args), "threads": threads, "device": str(device), "arms": arms,
              "sequential_minus_mixed_db": diff, "luminance_first_minus_mixed_db": lum}
    write_json(args.json, result)
    print(f"seq_detail - mixed: S {diff['S']:+.3f} dB, L {diff['L']:+.3f} dB; "
          f"seq_luminance - mixed: S {lum['S']:+.3f} dB, L {lum['L']:+.3f} dB")
    headline("sequential_minus_mixed_db", (diff["S"] + diff["L"]) / 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
