"""What running an L-trained DyNet as S costs (the authors' release is trained as DyNet-L only).

    python bench/shared_weights.py [--steps 300] [--batch 4] [--crop 32] [--dim 8] [--preset in]
                                   [--threads N] [--json PATH]

Because S and L share every weight, any DyNet checkpoint runs as either; but a model trained only as
L has never been asked to restore with S's fewer block applications. Three arms train the same tiny
DyNet from the same init on the same synthetic all-in-one data (MiOIR's seven degradations, mixed),
for the same number of steps with Adam:

  L_only    every step DyNet-L (schedule.mode fixed, as the reference code trains the release)
  S_only    every step DyNet-S
  dynamic   S or L drawn per step (the paper's recipe)

Each is then evaluated as S and as L on In-Dis MiO test sets made from held-out clean images.
Headline ``l_trained_as_s_cost_db``: PSNR of L_only run as L minus run as S (MiO average).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_common_args, headline, resolve_device, set_threads, write_json
from curriculum import DETAIL, TINY

from dyntrain.config import load_config
from dyntrain.data.finetune.synthetic_pairs import SyntheticPairLoader, scan_clean
from dyntrain.data.finetune.tasks import TaskCurriculum
from dyntrain.data.synthetic import write_synthetic_images
from dyntrain.eval.evaluate import evaluate_model, load_test_sets
from dyntrain.eval.testsets import make_testsets
from dyntrain.train.model import build_model
from dyntrain.train.schedule import VariantSchedule

SCHEDULES = {"L_only": ["schedule.mode=fixed", "schedule.fixed_variant=L"],
             "S_only": ["schedule.mode=fixed", "schedule.fixed_variant=S"],
             "dynamic": ["schedule.mode=dynamic"]}


def train_arm(name: str, args, images, test_pairs, device) -> dict:
    cfg = load_config(None, TINY + [f"model.dim={args.dim}", f"run.seed={args.seed}"] + SCHEDULES[name])
    torch.manual_seed(args.seed)  # the same init in every arm
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = VariantSchedule.from_config(cfg)
    curriculum = TaskCurriculum(args.seed, {t: 1 for t in DETAIL}, "mixed")
    loader = SyntheticPairLoader(images, curriculum, args.preset, args.crop, args.batch, args.seed, 0, 1, 1, device)
    drawn = {"S": 0, "L": 0}
    t0 = time.perf_counter()
    for step in range(args.steps):
        variant = schedule.variant_at(step)
        drawn[variant] += 1
        batch = next(loader)
        loss = (model(batch["input"], variant=variant).clamp(0, 1) - batch["target"]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    results = evaluate_model(model, test_pairs, ["S", "L"], device)
    return {"train_s": train_s, "drawn": drawn,
            "psnr": {v: {t: r["psnr"] for t, r in res.items()} for v, res in results.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="in", choices=["in", "out"])
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_images(Path(tmp, "train"), args.train_images, size=(96, 96), seed=args.seed)
        write_synthetic_images(Path(tmp, "test"), args.test_images, size=(64, 64), seed=args.seed + 1000)
        make_testsets(Path(tmp, "test"), Path(tmp, "mio"), [args.preset], DETAIL, args.seed)
        pairs = load_test_sets({"mio": str(Path(tmp, "mio"))})
        images, _ = scan_clean([str(Path(tmp, "train"))], args.crop)
        arms = {name: train_arm(name, args, images, pairs, device) for name in SCHEDULES}
    avg = f"mio_{args.preset}_average"
    print(f"{'arm':8s} {'steps S/L':>10s} {'run as S':>9s} {'run as L':>9s}   (MiO {args.preset}-Dis average PSNR, dB)")
    for name, res in arms.items():
        drawn = f"{res['drawn']['S']}/{res['drawn']['L']}"
        print(f"{name:8s} {drawn:>10s} {res['psnr']['S'][avg]:9.2f} {res['psnr']['L'][avg]:9.2f}")
    cost = arms["L_only"]["psnr"]["L"][avg] - arms["L_only"]["psnr"]["S"][avg]
    dynamic_cost = arms["dynamic"]["psnr"]["L"][avg] - arms["dynamic"]["psnr"]["S"][avg]
    vs_s_only = arms["L_only"]["psnr"]["S"][avg] - arms["S_only"]["psnr"]["S"][avg]
    result = {"args": vars(args), "threads": threads, "device": str(device), "arms": arms,
              "l_trained_as_s_cost_db": cost, "dynamic_s_vs_l_db": dynamic_cost,
              "l_trained_as_s_minus_s_trained_db": vs_s_only}
    write_json(args.json, result)
    print(f"L-trained, run as S minus run as L: {-cost:+.3f} dB; minus an S-trained model run as S: "
          f"{vs_s_only:+.3f} dB; dynamic, S minus L: {-dynamic_cost:+.3f} dB")
    headline("l_trained_as_s_cost_db", cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
