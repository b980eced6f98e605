"""Multi-node shard builds: parts merged equal one single-process build, a part killed with SIGKILL
resumes to the identical result, --src-list provenance and its errors, merge refusals, the decoded
pixel cap."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from dyntrain.data.shards.build import main
from dyntrain.data.shards.builder import BUILDER_VERSION
from dyntrain.data.shards.merge import merge_parts
from dyntrain.data.shards.patches import ShardBuildConfig
from dyntrain.data.shards.writer import build_shards
from dyntrain.data.storage import s3
from dyntrain.data.storage.s3 import DataSourceError
from dyntrain.data.storage.urls import expand_urls
from dyntrain.data.synthetic import write_synthetic_images
from helpers import read_tar


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "launch" / "make_shards.py")


def patch_set(out: Path | str, scratch: Optional[Path] = None) -> list[tuple[str, str]]:
    """(key, SHA-256 of the decoded pixels) of every sample, in the order training reads them
    (an S3 shard is copied to the file ``scratch`` first)."""
    got = []
    for url in expand_urls([str(out)]):
        if s3.is_s3(url):
            scratch.write_bytes(s3.read_bytes(url))
            url = str(scratch)
        for key, comps in read_tar(Path(url)).items():
            pixels = np.asarray(Image.open(io.BytesIO(comps["png"])))
            got.append((key, hashlib.sha256(pixels.tobytes()).hexdigest()))
    return got


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src")
    write_synthetic_images(folder, 7, size=(192, 256), seed=11)
    return folder


def test_three_parts_merged_equal_one_build(src, tmp_path):
    cfg = dict(patch_size=64, shard_samples=5, image_format="png", workers=1)
    single = build_shards([src], str(tmp_path / "single"), ShardBuildConfig(**cfg), progress=False)
    out = tmp_path / "parts"
    for i in (2, 0, 1):  # any order, any machine
        m = build_shards([src], str(out), ShardBuildConfig(**cfg), progress=False, part=(i, 3))
        assert m["part"]["index"] == i and all(s["name"].startswith(f"shard-p{i:04d}-")
                                               for s in m["shards"])
    merged = merge_parts(str(out), progress=False)
    assert patch_set(out) == patch_set(tmp_path / "single")   # same keys, pixels and order
    assert merged["num_samples"] == single["num_samples"]
    assert merged["counts"] == single["counts"]
    assert merged["sources"] == single["sources"]
    names = [s["name"] for s in merged["shards"]]
    assert len(set(names)) == len(names) and len(merged["parts"]) == 3
    for s in merged["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    lines = (out / "patches.jsonl").read_text().splitlines()
    assert sorted(json.loads(ln)["key"] for ln in lines) == sorted(k for k, _ in patch_set(out))
    # nothing left to do: a re-run of a part and of the merge say so
    again = build_shards([src], str(out), ShardBuildConfig(**cfg), progress=False, part=(1, 3))
    assert "same sources and settings" in again["up_to_date"]
    assert "already merges" in merge_parts(str(out), progress=False)["up_to_date"]


def test_merge_refuses_missing_and_mismatched_parts(src, tmp_path):
    out = tmp_path / "out"
    base = ["--src", str(src), "--out", str(out), "--patch-size", "64", "--quiet", "--workers", "1"]
    assert main(base + ["--part", "0/3"]) == 0
    assert main(base + ["--part", "2/3"]) == 0
    r = cli("merge", "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: merge: part 1 of 3 is missing: no {out / 'part-0001-of-0003.json'}"]
    assert main(base + ["--part", "1/3", "--jpeg-quality", "80"]) == 0   # other settings
    r = cli("merge", "--out", str(out))
    assert r.returncode == 2 and "part 1 of 3 was built from another settings" in r.stderr
    assert not (out / "manifest.json").exists()
    extra = tmp_path / "extra.png"   # another source list
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(extra)
    assert main(base + ["--part", "1/3", "--src", str(extra)]) == 0
    with pytest.raises(DataSourceError, match="part 1 of 3 was built from another source list"):
        merge_parts(str(out), progress=False)
    assert main(base + ["--part", "1/3"]) == 0
    manifest = out / "part-0001-of-0003.json"
    text = manifest.read_text()
    manifest.write_text(text.replace(f'"builder_version": {BUILDER_VERSION}', '"builder_version": 2'))
    with pytest.raises(DataSourceError, match="part 1 of 3 was built by builder version 2, part 0 by "):
        merge_parts(str(out), progress=False)
    manifest.write_text(text)
    gone = json.loads((out / "part-0002-of-0003.json").read_text())["shards"][0]["name"]
    (out / gone).unlink()
    with pytest.raises(DataSourceError, match=f"part 2 of 3: shard {out / gone} .* is missing"):
        merge_parts(str(out), progress=False)
    assert main(base + ["--part", "2/3"]) == 0   # not up to date any more: rebuilt
    assert merge_parts(str(out), progress=False)["num_samples"] > 0
    r = cli("--src", str(src), "--out", str(out), "--part", "3/3")
    assert r.returncode == 2 and "--part" in r.stderr


@pytest.mark.slow
def test_part_killed_after_first_shard_resumes_identically(tmp_path):
    src = tmp_path / "src"
    write_synthetic_images(src, 24, size=(256, 384), seed=12, fmt="png")
    args = ["--src", str(src), "--patch-size", "64", "--shard-samples", "8", "--format", "png",
            "--workers", "1", "--part", "0/2", "--quiet"]
    ref = tmp_path / "ref"
    assert cli(*args, "--out", str(ref)).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "journal-shard-p0000-000000.json"
    deadline = time.time() + 120
    while not journal.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "part-0000-of-0002.json").exists()   # killed mid-way
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 1 <= len(done) < 6
    with pytest.raises(DataSourceError, match=r"part 0 of 2 is unfinished \(\d+ shard\(s\) in its journal\)"):
        merge_parts(str(out), expected=2, progress=False)
    r = cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    want = json.loads((ref / "part-0000-of-0002.json").read_text())
    got = json.loads((out / "part-0000-of-0002.json").read_text())
    assert [(s["name"], s["sha256"]) for s in got["shards"]] == \
        [(s["name"], s["sha256"]) for s in want["shards"]]
    assert got["counts"] == want["counts"]
    keys = [json.loads(ln)["key"] for ln in (out / "patches-p0000.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == want["num_samples"]
    assert not list(out.glob("*journal*"))


def test_src_list_provenance_and_errors(src, tmp_path):
    imgs = sorted(src.glob("*.jpg"))
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("path,source,link,license\n"
                        f"{imgs[0]},flickr2k,https://example.org/a.jpg,CC-BY-4.0\n"
                        f"{imgs[1]},div2k,,\n")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"url": os.path.relpath(imgs[2], tmp_path)}) + "\n")
    out = tmp_path / "out"
    assert main(["--src-list", str(csv_file), "--src-list", str(jsonl), "--out", str(out),
                 "--patch-size", "64", "--quiet", "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    per = manifest["counts"]["per_source"]
    assert set(per) == {"flickr2k", "div2k", "-"} and all(v["images"] == 1 for v in per.values())
    assert sum(v["patches"] for v in per.values()) == manifest["num_samples"]
    seen = {}
    for ln in (out / "patches.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        seen[Path(rec["source"]).name] = (rec.get("provenance"), rec["image_width"], rec["image_height"])
    assert seen[imgs[0].name] == ({"source": "flickr2k", "link": "https://example.org/a.jpg",
                                   "license": "CC-BY-4.0"}, 256, 192)
    assert seen[imgs[1].name][0] == {"source": "div2k"} and seen[imgs[2].name][0] is None
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,source\n{imgs[0]},a\n{imgs[1]},b,extra\n")
    r = cli("--src-list", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {bad}: line 3: 3 fields, the header has 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": str(imgs[0])}) + "\n{oops\n")
    r = cli("--src-list", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and f"{bad}: line 2: not JSON" in r.stderr
    bad.write_text(json.dumps({"license": "MIT"}) + "\n")
    with pytest.raises(DataSourceError, match=r"bad.jsonl: line 1: no 'path'"):
        main(["--src-list", str(bad), "--out", str(tmp_path / "x")])


def test_decoded_pixel_cap_skips_large_images(src, tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)).save(small)
    m = build_shards([src, small], str(tmp_path / "out"),
                     ShardBuildConfig(patch_size=64, workers=1, max_decoded_pixels=256 * 191),
                     progress=False)
    assert m["counts"]["images_too_large"] == 7 and m["counts"]["images_used"] == 1
    assert m["skipped_images"]["too_large"][0]["size"] == [256, 192]
    assert m["num_samples"] == 4


@pytest.mark.slow
def test_parts_from_and_to_s3(src, s3_bucket, tmp_path):
    """Sources under an s3:// prefix, two parts and the merge into another prefix (journal and
    part files on S3): the same patches as a local single-process build of the same images."""
    for p in sorted(src.iterdir()):
        s3.upload_file(p, f"{s3_bucket}/photos/{p.name}")
    cfg = ShardBuildConfig(patch_size=64, shard_samples=7, image_format="png", workers=2)
    build_shards([src], str(tmp_path / "single"), cfg, progress=False)
    out = f"{s3_bucket}/shards"
    for i in range(2):
        m = build_shards([f"{s3_bucket}/photos"], out, cfg, progress=False, part=(i, 2))
        assert m["sources"][0].startswith(f"{s3_bucket}/photos/")
    merged = merge_parts(out, progress=False)
    assert merged["num_samples"] == sum(p["num_samples"] for p in merged["parts"])
    assert patch_set(out + "/", tmp_path / "shard.tar") == patch_set(tmp_path / "single")
    names = {u[len(out) + 1:] for u, _ in s3.list_objects(out + "/")}
    assert {"manifest.json", "patches.jsonl", "part-0000-of-0002.json"} <= names
    assert not [n for n in names if "journal" in n]   # the resume journal is gone


def test_memory_warning_names_the_knob(src, tmp_path, caplog):
    cfg = ShardBuildConfig(patch_size=64, workers=1, max_decoded_pixels=10**13)  # 120 TB at peak
    build_shards([src], str(tmp_path / "out"), cfg, progress=False)
    assert "may need 120000.0 GB" in caplog.text and "--max-decoded-pixels" in caplog.text
