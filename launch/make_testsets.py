"""Write the MiO test sets (every clean image degraded by every task, In-Dis and/or Out-Dis).

    python launch/make_testsets.py --src CLEAN_DIR --out DIR [--preset in|out|both] [--seed 0]
        [--tasks sr,blur,noise,jpeg,rain,haze,lowlight]

Writes DIR/<preset>/<task>/{lq,gt}/<name>.png and DIR/manifest.json (every image's parameters);
evaluate with eval.sets={mio: DIR}. A depth map beside a clean image (same name, .npy or 16-bit
PNG) drives its haze; otherwise the documented proxy is used and counted in the manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.logs import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--src", required=True, help="folder of clean images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="both", help="in, out or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all seven)")
    args = parser.parse_args(argv)
    setup_logging()

    from dyntrain.eval.testsets import make_testsets

    presets = ["in", "out"] if args.preset == "both" else [args.preset]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    manifest = make_testsets(args.src, args.out, presets, tasks, args.seed)
    print(f"{len(manifest['images'])} test images in {args.out} "
          f"({manifest['depth_proxy']} haze images used the depth proxy)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
