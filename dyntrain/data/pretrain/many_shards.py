"""A data set of many small pre-training shards in one folder (local or ``s3://``), with the DALI
index beside each shard and a ``manifest.json`` listing them the way the shard builder does: what
the start-up benchmark and the many-shard tests read. Every sample is a distinct random JPEG patch
(so that sample keys and pixels identify it); building is fast because the images are tiny."""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from dyntrain.data.shards.wds import write_tar
from dyntrain.data.storage.output import ShardOutput


def write_many_shards(out: str, shards: int, per_shard: int, size: int = 64, seed: int = 0,
                      threads: int = 8, only: Optional[Iterable[int]] = None) -> list[str]:
    """Write ``shards`` shards of ``per_shard`` samples (``size`` x ``size`` JPEGs) to ``out``;
    returns the shard names. ``only``: write just these shards (and their indices), the manifest
    still listing all (a large data set whose readers touch only these, for the benchmarks)."""
    output = ShardOutput(out)
    work = Path(tempfile.mkdtemp(prefix="many-shards-"))
    names = [f"shard-{i:06d}.tar" for i in range(shards)]

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        samples = []
        for j in range(per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
            samples.append((f"{i:06d}_{j:04d}", (("jpg", buf.getvalue()), ("json", b"{}"))))
        tar = work / names[i]
        idx = tar.with_suffix(".idx")
        idx.write_text(write_tar(tar, samples).index)
        output.publish(tar, names[i])
        output.publish(idx, idx.name)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(shards) if only is None else sorted(set(only))))
    manifest = {"format": "dyntrain-shards", "num_shards": shards, "num_samples": shards * per_shard,
                "shards": [{"name": n, "index": n[:-4] + ".idx", "samples": per_shard} for n in names]}
    output.write_text("manifest.json", json.dumps(manifest))
    output.close()
    shutil.rmtree(work, ignore_errors=True)
    return names
