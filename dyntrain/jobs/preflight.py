"""The pre-flight: what can be checked before a training job builds its engine, cheaply at any scale.

Run by ``--dry-run`` (``dyntrain.jobs.dryrun``) and, on rank 0, at the start of every real job
(``dyntrain.train.run.prepare`` broadcasts its outcome, so a failure ends every rank with the same
one line). Each check raises a ``DyntrainError`` naming the key, file or URL, or returns lines for the
log:

- data: the URLs resolve (one listing per folder, never one request per shard) and the samples per
  epoch are counted from the build's ``manifest.json`` (pre-training shards, paired shards), the DALI
  indices when the shards are few (``INDEX_READS``), or the folder scan (paired, synthetic folders);
- checkpoint: ``checkpoint.dir`` is writable (or can be created) and which checkpoint a resume
  continues from (``dyntrain.checkpoint.layout.resume_tag``);
- ``init.checkpoint`` exists and is readable (fine-tuning);
- DALI: on a machine with a GPU, the installed DALI wheel's CUDA flavour against the CUDA the driver
  supports (the rule of ``launch/dali_flavour.sh``);
- tracking: an ``http(s)://`` tracking server answers within ``TRACKING_TIMEOUT_S``; a warning only.
"""
from __future__ import annotations

import json
import posixpath
import re
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from dyntrain.checkpoint.layout import list_checkpoints, resume_tag, step_of_tag
from dyntrain.config import Config, ConfigError
from dyntrain.data.finetune.base import mix, scan_tasks
from dyntrain.data.finetune.degradations.depth import clean_images
from dyntrain.data.finetune.paired_shards import paired_shard_list, read_paired_manifest
from dyntrain.data.finetune.synthetic_pairs import clean_form
from dyntrain.data.pretrain.window import MANIFEST, manifest_shards
from dyntrain.data.shards.wds import parse_index
from dyntrain.data.storage import s3
from dyntrain.data.storage.urls import expand_urls, index_url
from dyntrain.errors import DyntrainError
from dyntrain.tracking.mlflow_tracker import redact


INDEX_READS = 64          # more shards than this and no manifest: the sample count stays unknown
TRACKING_TIMEOUT_S = 3.0


class PreflightFailure(DyntrainError):
    """A check of the pre-flight failed (the message names the thing)."""


@dataclass
class PreflightReport:
    """What the pre-flight found: samples per epoch (None = not counted), where a resume continues
    (None = a fresh start), and lines for the log (warnings start with "warning:")."""
    samples_per_epoch: Optional[int] = None
    resume_from: Optional[str] = None
    resume_step: int = 0
    lines: list[str] = field(default_factory=list)


def preflight(cfg: Config, world_size: int, check_data: bool = True) -> PreflightReport:
    """Every check, in order; raises at the first failure. ``check_data``: False when the job reads
    through a loader of its own (tests, benchmarks), not the config's data source."""
    report = PreflightReport()
    if check_data:
        report.samples_per_epoch, what = count_samples(cfg, world_size)
        report.lines.append(f"pre-flight: data {what}")
    report.resume_from, line = check_checkpoint_dir(cfg)
    report.resume_step = step_of_tag(report.resume_from) if report.resume_from else 0
    report.lines.append(f"pre-flight: {line}")
    if cfg.init.checkpoint:
        report.lines.append(f"pre-flight: {check_init_checkpoint(cfg.init.checkpoint)}")
    dali = check_dali_flavour()
    if dali:
        report.lines.append(f"pre-flight: {dali}")
    report.lines.append(check_tracking(cfg))
    return report


def preflight_lines(cfg: Config, world_size: int, check_data: bool = True) -> list[str]:
    """``dyntrain.train.run.Preflight``: the checks as log lines."""
    return preflight(cfg, world_size, check_data).lines


# -------------------------------------------------------------------------------------- data
def count_samples(cfg: Config, world_size: int = 1) -> tuple[Optional[int], str]:
    """(samples per epoch or None, a description) of the job's data; raises naming a missing URL."""
    data = cfg.data
    if data.source == "shards":
        total, what = shard_samples(data.train_urls, "data.train_urls")
        if total is not None and total < world_size:
            raise PreflightFailure(f"data.train_urls: {total} samples cannot give each of {world_size} ranks "
                                   f"a share ({data.train_urls[0]} ...)")
        if data.val_urls:
            expand_urls(data.val_urls)
        return total, what
    if data.source == "paired":
        if not data.root:
            raise PreflightFailure("data.root: not set (data.source=paired reads task folders under it)")
        entries = mix(scan_tasks(data.root, data.tasks, data.sigmas), data.tasks)
        return len(entries), f"{len(entries)} paired samples per epoch under {data.root}"
    if data.source == "paired_shards":
        if len(data.train_urls) != 1:
            raise ConfigError(f"data.train_urls: give exactly one packed paired-shard folder or s3:// prefix "
                              f"for data.source=paired_shards, got {data.train_urls}")
        base = str(data.train_urls[0])
        urls, total = paired_shard_list(base, read_paired_manifest(base), data.tasks, data.sigmas, cfg.run.seed)
        return total, f"{total} paired samples per epoch in {len(set(urls))} shards at {base}"
    urls = [str(u) for u in data.clean_urls]  # synthetic
    if clean_form(urls) == "shards":
        total, what = shard_samples(urls, "data.clean_urls")
        return total, f"clean images: {what}"
    images = 0
    for url in urls:
        if not Path(url).is_dir():
            raise PreflightFailure(f"data.clean_urls: {url} is not a folder")
        images += len(clean_images(url))
    if not images:
        raise PreflightFailure(f"data.clean_urls: no image under {urls}")
    return images, f"{images} clean images (degraded on the fly) under {', '.join(urls)}"


def shard_samples(entries: list[str], key: str) -> tuple[Optional[int], str]:
    """Samples in the shards ``entries`` name: the manifest's counts, else the indices of a few shards."""
    if not entries:
        raise PreflightFailure(f"{key}: no shard URLs given")
    listed = manifest_shards(entries)  # one s3:// folder with the builder's manifest: no listing
    if listed is not None:
        shards, counts = listed
        return sum(counts), f"{sum(counts)} samples in {len(shards)} shards ({MANIFEST} of {entries[0]})"
    shards = expand_urls(entries)
    counts = local_manifest_counts(shards)
    if counts is not None:
        return sum(counts), f"{sum(counts)} samples in {len(shards)} shards ({MANIFEST})"
    if len(shards) > INDEX_READS:
        return None, f"{len(shards)} shards (no {MANIFEST}: samples not counted)"
    total = 0
    for url in shards:
        idx = index_url(url)
        try:
            text = s3.read_bytes(idx).decode() if s3.is_s3(idx) else Path(idx).read_text()
        except (OSError, s3.DataSourceError):
            return None, f"{len(shards)} shards (no index beside {url}: samples not counted)"
        total += len(parse_index(text))
    return total, f"{total} samples in {len(shards)} shards (their indices)"


def local_manifest_counts(shards: list[str]) -> Optional[list[int]]:
    """Per-shard sample counts from a local ``manifest.json`` beside the shards (None when any is missing)."""
    by_folder: dict[str, dict[str, int]] = {}
    counts = []
    for url in shards:
        if s3.is_s3(url):
            return None
        folder = posixpath.dirname(url)
        if folder not in by_folder:
            path = Path(folder, MANIFEST)
            try:
                manifest = json.loads(path.read_text())
                by_folder[folder] = {str(s["name"]): int(s["samples"]) for s in manifest["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                return None
        count = by_folder[folder].get(posixpath.basename(url))
        if count is None:
            return None
        counts.append(count)
    return counts


# -------------------------------------------------------------------------------- checkpoints
def check_checkpoint_dir(cfg: Config) -> tuple[Optional[str], str]:
    """(tag a resume continues from or None, a line); raises when the folder cannot be written."""
    folder = cfg.checkpoint.dir
    if not folder:
        return None, "no checkpoints (checkpoint.dir is null)"
    path = Path(folder)
    probe_in = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe_in.is_dir():
        raise PreflightFailure(f"checkpoint.dir: {probe_in} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".dyntrain-probe-"):
            pass
    except OSError as exc:
        raise PreflightFailure(f"checkpoint.dir: {folder} is not writable ({exc.strerror or exc})") from None
    tag = resume_tag(folder, cfg.checkpoint.resume, warn=False)  # CheckpointError names the tag
    if tag:
        return tag, f"checkpoints in {folder} (writable); resumes from {tag}"
    others = list_checkpoints(folder) if path.is_dir() and cfg.checkpoint.resume.strip() == "never" else []
    if others and not cfg.checkpoint.overwrite:  # what the checkpoint manager refuses at the start
        raise PreflightFailure(f"checkpoint.dir {folder} holds {len(others)} checkpoint(s) of another run, newest "
                               f"{others[-1].tag}: a fresh start (checkpoint.resume=never) would mix its tags with "
                               f"them; resume it, choose another checkpoint.dir, or set checkpoint.overwrite=true")
    deletes = f"; deletes {len(others)} checkpoint(s) first (checkpoint.overwrite=true)" if others else ""
    return None, f"checkpoints in {folder} (writable); starts fresh (checkpoint.resume={cfg.checkpoint.resume}){deletes}"


def check_init_checkpoint(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise PreflightFailure(f"init.checkpoint: {path} does not exist")
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    if not files:
        raise PreflightFailure(f"init.checkpoint: {path} holds no file")
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise PreflightFailure(f"init.checkpoint: {f} is not readable ({exc.strerror or exc})") from None
    return f"init.checkpoint {path} readable ({len(files)} file(s))"


# ------------------------------------------------------------------------------- environment
def dali_extra_for(cuda_version: str) -> Optional[str]:
    """``launch/dali_flavour.sh``'s rule: the DALI extra for a driver's CUDA version (None: too old)."""
    major = int(cuda_version.split(".")[0])
    return "cuda13" if major >= 13 else "cuda12" if major == 12 else None


def driver_cuda_version() -> str:
    """The "CUDA Version" of nvidia-smi's header ("" when there is no nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"CUDA Version: *([0-9]+\.[0-9]+)", out)
    return found.group(1) if found else ""


def check_dali_flavour() -> str:
    """On a GPU machine: the installed DALI flavour against the CUDA the driver supports ("" without
    a GPU, where every flavour runs DALI's CPU operators alike)."""
    if not torch.cuda.is_available():
        return ""
    installed = [d for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120") if _installed(d)]
    if not installed:
        raise PreflightFailure("DALI: no nvidia-dali-cuda120/130 wheel installed (bash launch/setup.sh)")
    driver = driver_cuda_version()
    if not driver:
        return f"DALI {installed[0]} (the driver's CUDA version not read: nvidia-smi missing)"
    want = dali_extra_for(driver)
    have = "cuda13" if installed[0].endswith("130") else "cuda12"
    if want is None:
        raise PreflightFailure(f"DALI: the NVIDIA driver supports CUDA {driver}; DALI's wheels need CUDA 12 or 13")
    if have == "cuda13" and want == "cuda12":  # a CUDA 12 wheel runs on a newer driver, not the reverse
        raise PreflightFailure(f"DALI: {installed[0]} is installed but the driver supports CUDA {driver} "
                               f"(needs the {want} flavour: see launch/dali_flavour.sh)")
    return f"DALI {installed[0]} for the driver's CUDA {driver}"


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def check_tracking(cfg: Config) -> str:
    """A line: the tracking server answers, or a warning (never a failure: training does not need it)."""
    uri = cfg.tracking.uri
    shown = redact("tracking.uri", uri)
    if not cfg.tracking.enabled:
        return "pre-flight: tracking off (tracking.enabled=false)"
    if not uri.startswith(("http://", "https://")):
        return f"pre-flight: tracking to {shown}"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TRACKING_TIMEOUT_S):
            return f"pre-flight: tracking server {shown} answers"
    except Exception as exc:  # noqa: BLE001 - any failure is a warning, never fatal
        reason = getattr(exc, "reason", None) or exc
        return (f"warning: tracking server {shown} did not answer in {TRACKING_TIMEOUT_S:g} s ({reason}); "
                f"metrics are buffered until it does")
