"""Where shards are written: a local folder or an ``s3://bucket/prefix``, files published atomically.

Locally a file is staged under a hidden temporary name beside its final one and renamed into place;
for S3 it is staged in a temporary folder and uploaded whole (an S3 object appears whole or not at
all). Used by the shard builder and by the paired-shard packer.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import is_s3, join_url


class ShardOutput:
    """A local folder or an s3:// prefix; files are published atomically."""

    def __init__(self, out: str) -> None:
        self.url = out.rstrip("/") if is_s3(out) else str(Path(out))
        self.remote = is_s3(out)
        if self.remote:
            s3.check_bucket(self.url)
            self.tmp = Path(tempfile.mkdtemp(prefix="make_shards-"))
        else:
            Path(self.url).mkdir(parents=True, exist_ok=True)
            self.tmp = Path(self.url)

    def remove_leftovers(self, prefix: str, names: tuple[str, ...] = ()) -> None:
        """Delete the staging files of a run that was killed (local output only): those of the
        shards ``<prefix>-NNNNNN.tar|idx`` and of the files ``names``."""
        if self.remote:
            return
        others = "".join(f"|{re.escape(n)}" for n in names)
        ours = re.compile(rf"^\.({re.escape(prefix)}-\d{{6}}\.(tar|idx){others})\.tmp-\d+$")
        for stale in Path(self.url).iterdir():
            if ours.match(stale.name):
                stale.unlink(missing_ok=True)

    def url_of(self, name: str) -> str:
        return join_url(self.url, name)

    def staging(self, name: str) -> Path:
        return self.tmp / f".{name}.tmp-{os.getpid()}"

    def publish(self, staged: Path, name: str) -> None:
        if self.remote:
            s3.upload_file(staged, self.url_of(name))
            staged.unlink(missing_ok=True)
        else:
            os.replace(staged, Path(self.url) / name)

    def write_text(self, name: str, text: str) -> None:
        staged = self.staging(name)
        staged.write_text(text)
        self.publish(staged, name)

    def read_text(self, name: str) -> Optional[str]:
        url = self.url_of(name)
        if not s3.exists(url):
            return None
        return s3.read_bytes(url).decode()

    def list_names(self) -> list[str]:
        if self.remote:
            prefix = self.url + "/"
            return [u[len(prefix):] for u, _ in s3.list_objects(prefix) if "/" not in u[len(prefix):]]
        return [p.name for p in Path(self.url).iterdir() if p.is_file()]

    def remove(self, name: str) -> None:
        if self.remote:
            s3.delete(self.url_of(name))
        else:
            (Path(self.url) / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.tmp, ignore_errors=True)
