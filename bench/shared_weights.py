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

import torch
from common import headline, write_json
from curriculum import DETAIL, TINY, add_mio_args, run_arms, train_and_evaluate

from dyntrain.config import load_config
from dyntrain.data.finetune.synthetic_pairs import SyntheticPairLoader
from dyntrain.data.finetune.tasks import TaskCurriculum
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
    drawn = {v: sum(schedule.variant_at(step) == v for step in range(args.steps)) for v in ("S", "L")}
    train_s, results = train_and_evaluate(model, opt, loader, schedule.variant_at, args.steps, test_pairs, device)
    return {"train_s": train_s, "drawn": drawn,
            "psnr": {v: {t: r["psnr"] for t, r in res.items()} for v, res in results.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    add_mio_args(parser)
    args = parser.parse_args(argv)
    arms, device, threads = run_arms(args, train_arm, SCHEDULES)
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
