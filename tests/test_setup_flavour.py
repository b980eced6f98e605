"""launch/setup.sh's choice of DALI wheel (pyproject extra cuda12 / cuda13) as a function of the
driver's CUDA version, without a GPU: the shell functions of launch/dali_flavour.sh."""
from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "dali_flavour.sh"

NVIDIA_SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def _bash(snippet: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    if "DYNTRAIN_DALI_FLAVOUR" not in env:
        full.pop("DYNTRAIN_DALI_FLAVOUR", None)
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {snippet}'], input=stdin,
                          capture_output=True, text=True, env=full, timeout=30)


@pytest.mark.parametrize("version, extra", [("", "cuda13"), ("12.0", "cuda12"), ("12.4", "cuda12"),
                                            ("12.9", "cuda12"), ("13.0", "cuda13"), ("13.1", "cuda13")])
def test_extra_by_driver(version, extra):
    r = _bash(f'dali_extra "{version}"')
    assert r.returncode == 0 and r.stdout.strip() == extra, r.stderr


def test_old_driver_and_bad_input_fail_in_one_line():
    r = _bash('dali_extra "11.8"')
    assert r.returncode != 0 and r.stdout == "" and "CUDA 11.8" in r.stderr
    r = _bash('dali_extra "abc"')
    assert r.returncode != 0 and "'abc'" in r.stderr
    assert _bash('dali_extra "12.4"', DYNTRAIN_DALI_FLAVOUR="cuda13").stdout.strip() == "cuda13"
    assert _bash('dali_extra ""', DYNTRAIN_DALI_FLAVOUR="cuda11").returncode != 0


def test_driver_version_from_nvidia_smi_header():
    r = _bash("driver_cuda_version", stdin=NVIDIA_SMI_HEADER)
    assert r.stdout.strip() == "12.4"
    assert _bash("driver_cuda_version", stdin="No devices were found\n").stdout.strip() == ""


def test_extras_name_the_wheels_and_the_base_list_names_none():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cuda12"]] == ["nvidia-dali-cuda120"]
    assert [d.split(">")[0] for d in extras["cuda13"]] == ["nvidia-dali-cuda130"]
    assert not [d for d in project["dependencies"] if d.startswith("nvidia-dali")]
    # the CPU path (no nvidia-smi on PATH) keeps today's wheel
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in {**os.environ, "PATH": "/usr/bin:/bin"}.items()
                            if k != "DYNTRAIN_DALI_FLAVOUR"})
    assert r.returncode == 0 and r.stdout.strip() == "cuda13", r.stderr


@pytest.mark.parametrize("version, tag", [("12.6", "cu126"), ("12.7", "cu126"), ("12.8", "cu128"),
                                          ("12.9", "cu128"), ("13.0", "cu130"), ("13.2", "cu130")])
def test_torch_index_by_driver(version, tag):
    """setup.sh installs torch from PyTorch's index for the driver's CUDA (a stock index would give
    the one CUDA build it has, GPU or not)."""
    r = _bash(f'torch_cuda_tag "{version}"')
    assert r.returncode == 0 and r.stdout.strip() == tag, r.stderr


def test_torch_index_refuses_an_old_driver_naming_the_override():
    for version in ("12.4", "11.8", "x"):
        r = _bash(f'torch_cuda_tag "{version}"')
        assert r.returncode != 0 and r.stdout == "", version
    assert "TORCH_INDEX_URL" in _bash('torch_cuda_tag "12.4"').stderr
