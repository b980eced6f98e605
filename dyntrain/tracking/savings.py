"""Which saving a number is: every saving the system prints or logs names its basis.

    equal_iterations           the GPU-hour account of a run (``gpu_hours_saved_frac``): 1 - the run's
                               GPU hours / what training every variant separately for the same
                               number of iterations each would take. It holds by construction (the
                               draw sets it), whatever quality results.
    equal_validation_quality   ``compare --iso-quality`` (``iso_quality_saving``): the share of the
                               separate runs' cost the dynamic run saves while reaching the same
                               validation PSNR per variant.
    equal_finetuned_quality    the same at equal PSNR after fine-tuning (the downstream saving).

In MLflow the basis is a tag: ``gpu_hours_saved_basis`` on every training run (with the run's
description, ``mlflow.note.content``, saying what that figure means), ``iso_quality_saving_basis``
(``iso_quality_saving_<axis>_basis``) on the run ``compare --iso-quality`` writes to.
"""
from __future__ import annotations


EQUAL_ITERATIONS = "equal_iterations"
EQUAL_VALIDATION_QUALITY = "equal_validation_quality"
EQUAL_FINETUNED_QUALITY = "equal_finetuned_quality"

BASIS_WORDS = {
    EQUAL_ITERATIONS: "at equal iterations",
    EQUAL_VALIDATION_QUALITY: "at equal validation quality",
    EQUAL_FINETUNED_QUALITY: "at equal fine-tuned quality",
}

# what the tags say: the basis of each saving metric, under the name ``<saving>_basis``
SAVED_BASIS_TAG = "gpu_hours_saved_basis"          # of gpu_hours_saved_frac (and its _expected twin)
NOTE_TAG = "mlflow.note.content"                   # the run's description in the MLflow UI


def iso_basis_tag(axis: str = "gpu_hours") -> dict[str, str]:
    """The tag of ``iso_quality_saving`` (``iso_quality_saving_<axis>`` on another cost axis)."""
    metric = "iso_quality_saving" if axis == "gpu_hours" else f"iso_quality_saving_{axis}"
    return {f"{metric}_basis": EQUAL_VALIDATION_QUALITY}


RUN_NOTE = (
    "gpu_hours_saved_frac is the GPU-hour saving at equal iterations (1 - this run's GPU hours / the "
    "GPU hours of training each variant separately for the same number of iterations each): it holds "
    "by construction whatever quality results; the saving at equal validation quality is measured by "
    "`python launch/compare.py --iso-quality` against separate baseline runs (schedule.mode=fixed) "
    "with the same data.val_urls, and logged here as iso_quality_saving.")


def saved_text(frac: float, basis: str, decimals: int = 1) -> str:
    """``saved 49.1% at equal iterations``."""
    return f"saved {frac * 100:.{decimals}f}% {BASIS_WORDS[basis]}"


def run_tags() -> dict[str, str]:
    """The tags every training run gets: the basis of its GPU-hour saving and the description."""
    return {SAVED_BASIS_TAG: EQUAL_ITERATIONS, NOTE_TAG: RUN_NOTE}
