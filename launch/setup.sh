#!/usr/bin/env bash
# Creates .venv in the repository root and installs the project into it.
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh --dev    plus the test tools
# torch (TORCH_VERSION, default 2.13.0) is installed first, so that nothing that depends on torch
# pulls another build. A stock index (PyPI) serves one Linux build of torch==X, the CUDA one with its
# nvidia-* runtime wheels, GPU or not; so the build is chosen here:
#   GPU (nvidia-smi lists one): torch==X from PyTorch's index for the driver's CUDA
#       (https://download.pytorch.org/whl/cu126|cu128|cu130, launch/dali_flavour.sh's torch_cuda_tag);
#   no GPU: torch==X+cpu from the configured sources (a local wheel, as in CI), else from
#       https://download.pytorch.org/whl/cpu.
# TORCH_INDEX_URL=URL overrides the index in both cases (torch==X from URL). A torch already in
# .venv is kept. DALI's wheel follows the driver (launch/dali_flavour.sh): extra cuda12 or cuda13 by
# nvidia-smi's "CUDA Version", cuda13 (nvidia-dali-cuda130, as always) without a GPU;
# DYNTRAIN_DALI_FLAVOUR overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/dali_flavour.sh
dali=$(dali_extra "$(machine_cuda_version)")
extra="[$dali]"
[ "${1:-}" = "--dev" ] && extra="[dev,$dali]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTORCH_WHL=https://download.pytorch.org/whl
cuda=$(machine_cuda_version)
if .venv/bin/python -c "import torch" 2>/dev/null; then
    :  # keep whatever torch is there (CPU or CUDA build)
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
elif [ -n "$cuda" ]; then
    tag=$(torch_cuda_tag "$cuda")
    echo "torch ${TORCH_VERSION}: the $tag build (the driver supports CUDA $cuda)"
    "${pip[@]}" "torch==${TORCH_VERSION}" --index-url "$PYTORCH_WHL/$tag"
else
    "${pip[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "${pip[@]}" "torch==${TORCH_VERSION}+cpu" --extra-index-url "$PYTORCH_WHL/cpu"
fi
if [ -z "$cuda" ]; then
    .venv/bin/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" 2>/dev/null \
        || echo "warning: installed torch is a CUDA build on a machine without a GPU" >&2
fi
other=nvidia-dali-cuda120
[ "$dali" = cuda12 ] && other=nvidia-dali-cuda130
if .venv/bin/python -m pip show --quiet "$other" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet --yes "$other"   # both flavours provide nvidia.dali
fi
"${pip[@]}" -e ".${extra}"
echo "DALI: the [$dali] extra (launch/dali_flavour.sh)"
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    # DeepSpeed's CPU accelerator JIT-builds its shared-memory collective op at the first process-group
    # start. Build it once here: otherwise the first training run (or the first test) pays for it, and
    # a run killed during that build leaves a lock file behind that makes every later start wait. It goes
    # where the runs look for it (dyntrain.train.engine.extensions_dir_default): the venv's own folder.
    DS_ACCELERATOR=cpu .venv/bin/python -c "from dyntrain.train.engine import extensions_dir_default as d; d()
from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
        >/dev/null 2>&1 || echo "warning: DeepSpeed's CPU communication op did not build" >&2
fi
echo "setup done: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null)"
