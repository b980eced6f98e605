"""Durable file operations for checkpoints: fsync, atomic replace, marker-first deletion; the modes
of a checkpoint (a tag folder readable by its owner only, ``PRIVATE_DIR`` / ``PRIVATE_FILE``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dyntrain.checkpoint.layout import COMPLETE, CheckpointError


PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # a checkpoint holds the run's config and weights


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the whole new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def retire_tag(tag_dir: str | Path) -> Path:
    """Make a tag folder stop being a checkpoint at once: its marker removed, the folder renamed to
    ``.trash-<tag>-<pid>`` (listings skip it); returns the folder left to delete (the tag folder
    itself when the rename failed)."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    if marker.exists():
        marker.unlink()
        fsync_dir(tag_dir)
    trash = tag_dir.with_name(f".trash-{tag_dir.name}-{os.getpid()}")
    try:
        os.replace(tag_dir, trash)
    except OSError:
        trash = tag_dir
    return trash


def remove_tag(tag_dir: str | Path) -> None:
    """Delete a tag folder: marker first (it stops being a checkpoint), then the files."""
    trash = retire_tag(tag_dir)
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        raise CheckpointError(f"could not delete checkpoint folder {tag_dir}")
