"""The prepared GPU suite (bench/gpu_suite.py): its CPU dry run fills every figure the CPU can
measure, and on a bare image (no DeepSpeed, DALI, MLflow, WebDataset, boto3) it still imports and
skips what it cannot run, with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("device", "driver", "versions", "mfu_L", "mfu_S", "step_ms_L", "step_ms_S",
        "speedup_L_vs_fp32_eager", "gpu_hours_saved_frac", "switch_penalty_s",
        "zero_stage_step_ms", "input_wait_frac", "dali_images_per_s", "compile_s", "skipped")
BLOCKED = ("deepspeed", "nvidia.dali", "mlflow", "webdataset", "boto3")


def blocker(tmp_path: Path, modules: tuple[str, ...]) -> str:
    """A folder with a sitecustomize.py that makes importing ``modules`` raise ImportError."""
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        BLOCKED = {modules!r}

        class _Blocker:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
                return None

        sys.meta_path.insert(0, _Blocker())
    """))
    return str(folder)


def run_suite(tmp_path: Path, *args: str, pythonpath: str = "", timeout: float = 400):
    out = tmp_path / "suite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), str(out),
                           "--dry-run", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), out


@pytest.mark.slow
def test_dry_run_fills_every_figure_the_cpu_can_measure(tmp_path):
    # the dry run's own budget is 170 s; a shared CI machine gets slack, so that no stage is cut
    # short by another job's load (a stage that is cut short leaves nulls, not numbers)
    result, out = run_suite(tmp_path, "--budget-s", "400", timeout=600)
    for key in KEYS:
        assert key in result, key
    assert result["dry_run"] and result["device"].startswith("CPU")
    assert result["versions"]["torch"] and result["versions"]["deepspeed"]
    # measured on the CPU: numbers
    for key in ("step_ms_L", "step_ms_S", "speedup_L_vs_fp32_eager", "compile_s",
                "gpu_hours_saved_frac", "dali_images_per_s", "input_wait_frac"):
        assert isinstance(result[key], (int, float)) and result[key] == result[key], key
    assert result["step_ms_L"] > 0 and result["dali_images_per_s"] > 0
    assert 0 < result["gpu_hours_saved_frac"] < 1 and 0 <= result["input_wait_frac"] < 1
    assert all(isinstance(ms["S"], float) and isinstance(ms["L"], float)
               for ms in result["zero_stage_step_ms"].values())
    assert "2" in result["zero_stage_step_ms"]
    # not measurable on a CPU: null, with the reason
    for key in ("mfu_L", "mfu_S", "driver"):
        assert result[key] is None and result["skipped"][key], key
    assert result["skipped"]["quality_saving"].startswith("dry run: data and validation set built")
    assert result["skipped"]["cuda_graphs"] == "CUDA graphs need a GPU"
    assert result["gpu_tests"]["exit_code"] == 0 and result["gpu_tests"].get("failed", 0) == 0
    assert result["stages"]["train_step"]["status"] == "done"
    for name in ("gpu_tests", "train_step", "dynamic_vs_separate", "input_pipeline"):
        assert result["stages"][name]["status"] == "done", (name, result["stages"][name])
    # every value is either a figure or a reason
    for key in KEYS[:-1]:
        assert result[key] is not None or key in result["skipped"], key
    md = (out / "gpu_suite.md").read_text()
    assert "| L step, optimised (ms) |" in md and "quality_saving" in md
    assert (out / "gpu_suite.log").read_text().count("stage 1 train_step: done") == 1


def test_bare_image_skips_what_it_cannot_run(tmp_path):
    path = blocker(tmp_path, BLOCKED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, str(ROOT), str(ROOT / "bench")])}
    # the suite and the benches its GPU stages call import without the blocked packages
    code = ("import gpu_suite, gpu_stages, common, train_step, dynamic_vs_separate, "
            "input_pipeline, data_throughput, sys\n"
            # what the stages import from dyntrain once DeepSpeed/DALI are there
            "import dyntrain.train.engine, dyntrain.train.model, dyntrain.train.trainer, dyntrain.config, "
            "dyntrain.data.pretrain.pipeline, dyntrain.data.shards.writer, dyntrain.data.synthetic\n"
            "import importlib.util as u\n"
            "assert u.find_spec('torch')\n"
            "for m in ('deepspeed', 'mlflow', 'webdataset', 'boto3', 'nvidia.dali'):\n"
            "    assert not gpu_suite.installed(m), m\n"
            "    assert m not in sys.modules, m\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result, out = run_suite(tmp_path, "--only", "dynamic_vs_separate,input_pipeline,quality_saving",
                            pythonpath=path)
    skipped = result["skipped"]
    assert skipped["dynamic_vs_separate"] == "deepspeed not installed"
    assert skipped["input_pipeline"] == "nvidia-dali not installed"
    assert skipped["quality_saving"] == "deepspeed not installed"
    assert skipped["train_step"] == "not selected (--only)"
    for key in ("gpu_hours_saved_frac", "switch_penalty_s", "zero_stage_step_ms",
                "input_wait_frac", "dali_images_per_s"):
        assert result[key] is None and "not installed" in skipped[key], key
    assert result["versions"]["deepspeed"] is None and result["versions"]["nvidia-dali"] is None
    assert result["versions"]["torch"]
    assert result["stages"]["dynamic_vs_separate"]["status"] == "skipped: deepspeed not installed"
    assert "deepspeed not installed" in (out / "gpu_suite.md").read_text()
