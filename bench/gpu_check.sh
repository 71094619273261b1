#!/usr/bin/env bash
# The GPU check of stages 05, 02 and 06 (bench/gpu_check.py says what it measures): one GPU, at most
# 8 minutes, one JSON on stdout. Without a GPU (or with --cpu-smoke) it runs tiny shapes on the CPU.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--cpu-smoke] [--data DIR] [--out FILE] [--logs DIR] [--peak-tflops T]
#
# A GPU machine without network (the lent H100/H200): prepare on a machine with PyPI, then carry .gpucheck:
#   bash bench/gpu_check.sh --prepare      # .gpucheck/data: ../shared's shared_aa.fasta + shared_3di.fasta;
#                                          # .gpucheck/wheels: what such an image may lack (fair-esm, our
#                                          # transformers) and flash-attn if PyPI has a binary wheel of it
#   bash bench/gpu_check.sh --wheels .gpucheck/wheels --data .gpucheck/data --out "$OUT/gpu_check.json" --logs "$OUT"
# --wheels DIR: its wheels are installed first (no index, no build, 120 s at most) into a temporary
# directory put first on PYTHONPATH; flash-attn is used only if its wheel installs and imports, else
# SDPA, and the JSON says so (`flash_attn`, `setup`).
#
# Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    mkdir -p .gpucheck/data .gpucheck/wheels
    db=../shared/data/foldseek_db
    install -m 644 "$db/shared_aa.fasta" "$db/shared_3di.fasta" .gpucheck/data/
    tv=$("$PY" -c 'import transformers; print(transformers.__version__)')
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d .gpucheck/wheels "transformers==$tv" fair-esm==2.0.0
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d .gpucheck/wheels flash-attn 2>/dev/null \
        || echo "[gpu_check] PyPI has no binary flash-attn wheel for this platform: the GPU run will use SDPA" >&2
    du -sh .gpucheck >&2
    exit 0
fi

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
wheel_dir=""
args=()
while (( $# )); do
    if [[ "$1" == "--wheels" ]]; then wheel_dir=${2:?--wheels needs a directory}; shift 2; else args+=("$1"); shift; fi
done
shopt -s nullglob
wheels=()
[[ -n "$wheel_dir" ]] && wheels=("$wheel_dir"/*.whl)
note=${wheel_dir:+"no wheels in $wheel_dir"}
note=${note:-"no carried wheels"}
flash=()
others=()
for w in "${wheels[@]}"; do if [[ "${w##*/}" == flash_attn-* ]]; then flash+=("$w"); else others+=("$w"); fi; done
pip_in() { timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$@" >&2; }
if (( ${#wheels[@]} )); then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if (( ${#others[@]} )); then
        pip_in "${others[@]}" && note="carried wheels: ${others[*]##*/}" || note="installing ${others[*]##*/} failed"
    fi
    if (( ${#flash[@]} )); then
        pip_in "${flash[@]}" && note+="; flash-attn wheel installed" \
            || note+="; the flash-attn wheel did not install within 120 s: SDPA"
    fi
fi
rc=0
"$PY" bench/gpu_check.py --setup-note "$note" "${args[@]}" || rc=$?
[[ -n "${site:-}" ]] && rm -rf "$site"
exit $rc
