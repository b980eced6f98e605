"""The all-in-one test sets of the evaluation (Table 1): finding, pairing and reading their images.

Every image is centre-cropped to a multiple of 16 (the same way in input and target); BSD68's noisy
inputs are made here, reproducibly.

Test-set layouts (``eval.sets`` maps a name below to its folder):

    bsd68     a folder of clean images (recursive); noisy inputs are made here at sigma 15, 25 and 50
              from seed ``eval.noise_seed`` (image i at sigma s gets its own generator seeded by
              (seed, s, i)), rounded to uint8 — reported as tasks bsd68_s15, bsd68_s25, bsd68_s50
    rain100l  rainy/ + gt/ (or input/ + target/): rainy X pairs with gt X, gt "no"+X (rain-001.png ->
              norain-001.png) or gt with X's stem
    sots      hazy/ + gt/ (or outdoor/hazy + outdoor/gt, or hazy/ + clear/): hazy "0001_0.8_0.2.jpg"
              pairs with gt "0001.*" (the text before the first underscore)
    mio       the MiO test sets of ``launch/make_testsets.py``: <preset>/<task>/{lq,gt}/<name>.png,
              reported as tasks mio_<preset>_<task> (``dyntrain.eval.testsets``)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dyntrain.data.finetune.base import haze_clean_stem
from dyntrain.data.finetune.degradations import PRESETS, TABLE
from dyntrain.errors import DyntrainError
from dyntrain.eval.testsets import mio_folders, mio_task
from dyntrain.images import list_images, read_image


SET_KINDS = ("sots", "rain100l", "bsd68", "mio")
BSD68_SIGMAS = (15, 25, 50)
TASK_LABELS = {"sots": "SOTS", "rain100l": "Rain100L", "bsd68_s15": "BSD68 s15",
               "bsd68_s25": "BSD68 s25", "bsd68_s50": "BSD68 s50"}
TASK_LABELS.update({mio_task(p, t): f"MiO-{p} {t}" for p in PRESETS for t in TABLE})


class EvalDataError(DyntrainError, ValueError):
    """A test-set folder, file or pairing that is missing or inconsistent."""


@dataclass
class TestPair:
    """One test image: degraded input and clean target, uint8 (H, W, 3), already centre-cropped."""
    task: str
    key: str
    input: np.ndarray
    target: np.ndarray


def centre_crop(img: np.ndarray, base: int = 16) -> np.ndarray:
    """Crop (H, W, ...) centrally so both sides are multiples of ``base`` (extra row/column at the end)."""
    height, width = img.shape[:2]
    dh, dw = height % base, width % base
    if height - dh <= 0 or width - dw <= 0:
        raise EvalDataError(f"image of {height}x{width} is smaller than the {base}-pixel crop base")
    return img[dh // 2: height - dh + dh // 2, dw // 2: width - dw + dw // 2]


def _read(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except OSError as exc:
        raise EvalDataError(f"cannot read test image {path}: {exc}") from exc


def _first_dir(folder: Path, options: Sequence[tuple[str, str]], name: str) -> tuple[Path, Path]:
    for a, b in options:
        if (folder / a).is_dir() and (folder / b).is_dir():
            return folder / a, folder / b
    tried = ", ".join(f"{a}/ + {b}/" for a, b in options)
    raise EvalDataError(f"{name}: {folder} has none of the layouts {tried}")


def _by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in list_images(folder):
        out.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return out


def _limit(items: list, max_images: int) -> list:
    return items[:max_images] if max_images > 0 else items


def add_test_noise(clean: np.ndarray, sigma: float, seed: int, index: int) -> np.ndarray:
    """Seeded Gaussian noise for BSD68: image ``index`` at ``sigma``, rounded and clipped to uint8."""
    rng = np.random.default_rng([seed, int(sigma), index])
    noisy = clean.astype(np.float64) + rng.standard_normal(clean.shape) * sigma
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def load_bsd68(folder: Path, noise_seed: int = 0, max_images: int = 0, base: int = 16,
               sigmas: Iterable[int] = BSD68_SIGMAS) -> list[TestPair]:
    images = _limit(list_images(folder), max_images)
    if not images:
        raise EvalDataError(f"bsd68: no images under {folder}")
    pairs = []
    for i, path in enumerate(images):
        clean = centre_crop(_read(path), base)
        key = path.relative_to(folder).with_suffix("").as_posix()
        for sigma in sigmas:
            pairs.append(TestPair(f"bsd68_s{sigma}", key, add_test_noise(clean, sigma, noise_seed, i), clean))
    return pairs


def load_rain100l(folder: Path, max_images: int = 0, base: int = 16) -> list[TestPair]:
    rainy_dir, gt_dir = _first_dir(folder, [("rainy", "gt"), ("input", "target")], "rain100l")
    gt = _by_stem(gt_dir)
    pairs = []
    for path in _limit(list_images(rainy_dir), max_images):
        stem = path.relative_to(rainy_dir).with_suffix("").as_posix()
        name = Path(stem).name
        match = gt.get(stem) or gt.get((Path(stem).parent / ("no" + name)).as_posix())
        if match is None:
            raise EvalDataError(f"rain100l: no clean image in {gt_dir} for {path}")
        pairs.append(TestPair("rain100l", stem, *_pair(path, match, base)))
    if not pairs:
        raise EvalDataError(f"rain100l: no images under {rainy_dir}")
    return pairs


def load_sots(folder: Path, max_images: int = 0, base: int = 16) -> list[TestPair]:
    hazy_dir, gt_dir = _first_dir(folder, [("hazy", "gt"), ("outdoor/hazy", "outdoor/gt"),
                                           ("hazy", "clear")], "sots")
    gt = {path.stem: path for path in list_images(gt_dir)}
    pairs = []
    for path in _limit(list_images(hazy_dir), max_images):
        stem = haze_clean_stem(path.name)
        if stem not in gt:
            raise EvalDataError(f"sots: no clean image {gt_dir}/{stem}.* for hazy image {path}")
        pairs.append(TestPair("sots", path.relative_to(hazy_dir).with_suffix("").as_posix(),
                              *_pair(path, gt[stem], base)))
    if not pairs:
        raise EvalDataError(f"sots: no images under {hazy_dir}")
    return pairs


def load_mio(folder: Path, max_images: int = 0, base: int = 16) -> list[TestPair]:
    pairs = []
    for preset, task, sub in mio_folders(folder):
        gt = _by_stem(sub / "gt")
        for path in _limit(list_images(sub / "lq"), max_images):
            stem = path.relative_to(sub / "lq").with_suffix("").as_posix()
            if stem not in gt:
                raise EvalDataError(f"mio: no clean image {sub / 'gt'}/{stem}.* for {path}")
            pairs.append(TestPair(mio_task(preset, task), stem, *_pair(path, gt[stem], base)))
    if not pairs:
        raise EvalDataError(f"mio: no <preset>/<task>/lq images under {folder}")
    return pairs


def _pair(inp_path: Path, tgt_path: Path, base: int) -> tuple[np.ndarray, np.ndarray]:
    inp, tgt = _read(inp_path), _read(tgt_path)
    if inp.shape != tgt.shape:
        raise EvalDataError(f"{inp_path} and {tgt_path} differ in size: {inp.shape[:2]} vs {tgt.shape[:2]}")
    return centre_crop(inp, base), centre_crop(tgt, base)


def load_test_sets(sets: dict[str, str], noise_seed: int = 0, max_images: int = 0) -> list[TestPair]:
    """Every pair of the configured sets (``eval.sets``: kind -> folder), in Table 1's task order."""
    if not sets:
        raise EvalDataError("eval.sets is empty: give at least one of "
                            f"{list(SET_KINDS)} -> folder (e.g. eval.sets={{sots: data/SOTS/outdoor}})")
    out: list[TestPair] = []
    for name in sets:
        if name not in SET_KINDS:
            raise EvalDataError(f"eval.sets.{name}: unknown test set (known: {list(SET_KINDS)})")
    for name in SET_KINDS:
        if name not in sets:
            continue
        folder = Path(sets[name])
        if not folder.is_dir():
            raise EvalDataError(f"eval.sets.{name}: folder {folder} does not exist")
        if name == "bsd68":
            out += load_bsd68(folder, noise_seed, max_images)
        elif name == "rain100l":
            out += load_rain100l(folder, max_images)
        elif name == "mio":
            out += load_mio(folder, max_images)
        else:
            out += load_sots(folder, max_images)
    return out
