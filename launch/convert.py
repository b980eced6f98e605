"""Convert between the authors' DyNet checkpoints and dyntrain's weights files.

    python launch/convert.py --from reference all_in_one_model.ckpt --out weights.safetensors
    python launch/convert.py --to reference weights.safetensors --out model.ckpt      # Lightning form
    python launch/convert.py --to reference CHECKPOINT_DIR --out model.pth            # bare state_dict

--from reference reads a Lightning checkpoint (``net.`` prefix) or a bare state_dict (``.pth``/``.pt``,
with or without ``module.``/``net.``) of DyNet_large or DyNet_small (the same weights), reads the
architecture off the shapes, drops and names the three parameters the reference never uses, and
writes dyntrain weights (``.safetensors`` or ``.pt``) that carry the model config. Files are loaded
with ``torch.load(weights_only=True)``; ``--trust`` loads one that needs more (only for files you
trust: unpickling runs code).

--to reference reads any dyntrain checkpoint folder or export and writes the reference layout:
``--form lightning`` (default for ``.ckpt``), which the authors' ``DyNetModel.load_from_checkpoint``
loads, or ``--form state_dict`` (default otherwise) for ``DyNet_large(decoder=True).load_state_dict``.
The unused parameters are written as zeros so that their strict loading finds every name.

Evaluate, restore and fine-tuning (``init.checkpoint``) also take a reference file directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from dyntrain.errors import cli_main  # noqa: E402
from dyntrain.interop import export_reference, import_reference  # noqa: E402
from dyntrain.interop.files import FORMS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", metavar="IN", nargs=2,
                           help="'reference IN': import the authors' file IN")
    direction.add_argument("--to", dest="target", metavar="IN", nargs=2,
                           help="'reference IN': export dyntrain weights IN to the authors' layout")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--form", choices=FORMS, default=None,
                        help="--to reference: lightning (default for .ckpt) or state_dict")
    parser.add_argument("--trust", action="store_true",
                        help="--from reference: unpickle a file that torch.load(weights_only=True) refuses; "
                             "unpickling runs whatever code the file holds, so only for files you trust "
                             "(every other read of weights or checkpoints in dyntrain is safe-only)")
    args = parser.parse_args(argv)
    layout, src = args.source or args.target
    if layout != "reference":
        parser.error(f"the only other layout is 'reference', got {layout!r}")
    if args.source:
        path, imported = import_reference(src, args.out, trust=args.trust)
        n = sum(t.numel() for t in imported.state_dict.values())
        print(f"{imported.dropped_note()}")
        print(f"imported {len(imported.state_dict)} tensors ({n:,} parameters) from {src} to {path}; "
              f"variants {dict(imported.config.variants)}")
    else:
        path = export_reference(src, args.out, form=args.form)
        print(f"exported {src} to {path} in the reference layout")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
