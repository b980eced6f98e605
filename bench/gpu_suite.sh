#!/usr/bin/env bash
# The prepared GPU suite in one command (see bench/GPU_SUITE.md):
#
#   bash bench/gpu_suite.sh OUTDIR [--dry-run] [--budget-s 480] [--only STAGE,STAGE]
#
# Installs the wheels carried in .whl/ (if any; see bench/prepare_gpu_wheels.sh) into the current
# Python without touching the network, then runs bench/gpu_suite.py. PYTHON picks the interpreter.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_suite.sh OUTDIR [--dry-run] [--budget-s S] [--only STAGE,...]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
# the benchmarks import dynet/dyntrain as packages: from the checkout when the project is not installed
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out="$1"
mkdir -p "$out"
wheels="${GPU_SUITE_WHEELS:-$root/.whl}"
if [ -d "$wheels" ]; then
    # a wheel split into parts (NAME.whl.part-aa, -ab, ...) is joined back first
    for first in "$wheels"/*.whl.part-aa; do
        [ -e "$first" ] || continue
        whole="${first%.part-aa}"
        [ -e "$whole" ] || cat "${whole}".part-* > "$whole"
    done
    shopt -s nullglob
    found=("$wheels"/*.whl)
    if [ ${#found[@]} -gt 0 ]; then
        echo "installing ${#found[@]} carried wheel(s) from $wheels" | tee -a "$out/gpu_suite.log"
        "$python" -m pip install --no-index --no-deps --quiet "${found[@]}" >>"$out/gpu_suite.log" 2>&1 \
            || echo "some carried wheels did not install (see $out/gpu_suite.log); the suite skips what is missing" >&2
    fi
fi
# the wheel installation counts against the 8 minutes (a --budget-s given here still wins)
budget=()
case " $* " in *" --dry-run "*) ;; *) budget=(--budget-s "$((480 - SECONDS))") ;; esac
exec "$python" "$here/gpu_suite.py" "${budget[@]}" "$@"
