"""Build WebDataset shards (+ DALI indices + manifest.json) from folders of photographs.

    python launch/make_shards.py --src DIR [--src DIR ...] --out DIR_OR_S3_URL \
        [--patch-size 512] [--shard-samples N] [--part I/N] [--dedup]
    python launch/make_shards.py merge --out DIR_OR_S3_URL          # after the N parts
    python launch/make_shards.py index|plan ...                     # de-duplication steps

All options: ``python launch/make_shards.py --help``; the logic lives in ``dyntrain.data.shards.writer``
(command line: ``dyntrain.data.shards.build``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyntrain.data.shards.build import main  # noqa: E402
from dyntrain.errors import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main(main))
