#!/usr/bin/env bash
# Prepares, on a machine with network access, the wheels the GPU suite needs beyond the bare GPU
# image (torch, einops, numpy, pillow, tqdm, psutil, Python 3.12), into the git-ignored .whl/:
#
#   bash bench/prepare_gpu_wheels.sh [--print]      # --print: show the commands, run nothing
#
#   deepspeed   ships only an sdist: built here into a py3-none-any wheel (no CUDA ops compiled)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection: DeepSpeed's imports (cp312)
#   pyyaml      dyntrain.config reads YAML (cp312)
#   py-cpuinfo, msgpack: declared by DeepSpeed too; small, carried in case an import needs them
#   nvidia-dali-cuda130  ~199 MB, split into parts under 60 MB (NAME.whl.part-aa, -ab, ...)
#
# bench/gpu_suite.sh joins the parts and installs everything in .whl/ with --no-index --no-deps.
# Download once; the wheels are never committed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.whl"
python="${PYTHON:-python3}"
run() { echo "+ $*"; [ "${PRINT:-0}" = 1 ] || "$@"; }
[ "${1:-}" = "--print" ] && PRINT=1

DEEPSPEED="deepspeed==0.19.8"
PURE=("hjson==3.1.0" "annotated-types==0.8.0" "typing-inspection==0.4.5" "pydantic==2.14.4"
      "py-cpuinfo==9.0.0")
BINARY=("pydantic-core==2.50.5" "pyyaml==6.0.4" "msgpack==1.2.4")
DALI="nvidia-dali-cuda130"
TARGET=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)

run mkdir -p "$dest"
# DeepSpeed: sdist -> py3-none-any wheel; no build isolation, so its setup sees this torch
run "$python" -m pip wheel --no-deps --no-build-isolation -w "$dest" "$DEEPSPEED"
run "$python" -m pip download -d "$dest" --only-binary=:all: --no-deps "${PURE[@]}"
run "$python" -m pip download -d "$dest" "${TARGET[@]}" "${BINARY[@]}"
run "$python" -m pip download -d "$dest" "${TARGET[@]}" "$DALI"
# DALI in parts under 60 MB, so each part fits a size-limited transfer
for wheel in "$dest"/nvidia_dali*.whl; do
    [ -e "$wheel" ] || continue
    run split -b 55M "$wheel" "$wheel.part-"
    run rm "$wheel"
done
[ "${PRINT:-0}" = 1 ] || ls -l "$dest"
