#!/usr/bin/env bash
# Which DALI wheel to install: the pyproject extra "cuda12" (nvidia-dali-cuda120) or "cuda13"
# (nvidia-dali-cuda130), from the CUDA version the NVIDIA driver supports.
#   bash launch/dali_flavour.sh               the extra for this machine (nvidia-smi's "CUDA Version")
#   bash launch/dali_flavour.sh 12.4          the extra for a driver that supports CUDA 12.4
#   source launch/dali_flavour.sh             defines driver_cuda_version and dali_extra (setup.sh)
# No GPU (no nvidia-smi, or it lists none): cuda13, the wheel the CPU path has always installed
# (DALI's CPU operators work the same in every flavour). DYNTRAIN_DALI_FLAVOUR=cuda12|cuda13 overrides.

# The "CUDA Version: X.Y" of nvidia-smi's header on stdin -> "X.Y" (empty when there is none).
driver_cuda_version() {
    sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# dali_extra [CUDA_VERSION]: prints cuda12 or cuda13; an empty version means "no GPU".
# Fails (status 1, message on stderr) for a driver older than CUDA 12, which no DALI 2 wheel supports.
dali_extra() {
    local version=${1:-} major
    case "${DYNTRAIN_DALI_FLAVOUR:-}" in
        cuda12|cuda13) echo "$DYNTRAIN_DALI_FLAVOUR"; return 0 ;;
        "") ;;
        *) echo "DYNTRAIN_DALI_FLAVOUR must be cuda12 or cuda13, got '$DYNTRAIN_DALI_FLAVOUR'" >&2; return 1 ;;
    esac
    if [ -z "$version" ]; then
        echo cuda13
        return 0
    fi
    major=${version%%.*}
    if ! [[ "$major" =~ ^[0-9]+$ ]]; then
        echo "cannot read the driver's CUDA version '$version' (expected X.Y)" >&2
        return 1
    fi
    if [ "$major" -ge 13 ]; then
        echo cuda13
    elif [ "$major" -eq 12 ]; then
        echo cuda12
    else
        echo "the NVIDIA driver supports CUDA $version; DALI's wheels need CUDA 12 or 13: update the driver" >&2
        return 1
    fi
}

# torch_cuda_tag CUDA_VERSION: the CUDA variant of PyTorch's wheel index for a driver that supports
# CUDA_VERSION (cu126, cu128 or cu130: the variants PyTorch publishes for its 2.9-2.10 releases; a
# newer driver runs an older CUDA build). Fails (status 1, message on stderr) for an older driver.
torch_cuda_tag() {
    local version=${1:-} major minor
    major=${version%%.*}
    minor=${version#*.}
    minor=${minor%%.*}
    if ! [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]]; then
        echo "cannot read the driver's CUDA version '$version' (expected X.Y)" >&2
        return 1
    fi
    if [ "$major" -ge 13 ]; then
        echo cu130
    elif [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; then
        echo cu128
    elif [ "$major" -eq 12 ] && [ "$minor" -ge 6 ]; then
        echo cu126
    else
        echo "the NVIDIA driver supports CUDA $version; torch's CUDA wheels need 12.6 or newer: update the driver or set TORCH_INDEX_URL" >&2
        return 1
    fi
}

# The driver's CUDA version on this machine, empty without a usable GPU.
machine_cuda_version() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi 2>/dev/null | driver_cuda_version
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    if [ $# -gt 0 ]; then
        dali_extra "$1"
    else
        dali_extra "$(machine_cuda_version)"
    fi
fi
