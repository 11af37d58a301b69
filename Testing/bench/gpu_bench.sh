#!/usr/bin/env bash
# GPU benchmark (issue 13): stage-1 MFU under torchrun/NCCL, stage-2 step time, encoder vs MONAI-size ViT.
#
# On the device machine (from the repository root):
#     bash Testing/bench/gpu_bench.sh                 # figures -> $OUT/gpu_bench.json, table on stdout
# Expected ~2-4 min on one H100; the whole script is capped at 7 minutes (GPU_BENCH_TIMEOUT) so that a
# 15-minute device budget leaves room for a rerun; give the device call timeout_s=450.
#
# MONAI is not on the GPU machine: the encoder baseline is then RefViT (plain PyTorch, MONAI's ViT
# arithmetic, SDPA off) and the script says so. To compare with MONAI itself, pack it here first:
#     bash Testing/bench/gpu_bench.sh --pack-monai     # copies the venv's pure-Python monai (~7 MB) to .whl/site
# and name ".whl" in the device call's carry; this script then puts .whl/site on PYTHONPATH.
#
# Here (no GPU):  bash Testing/bench/gpu_bench.sh --cpu-smoke   (seconds; figures meaningless)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "--pack-monai" ]]; then
    site=$(.venv/bin/python -c 'import monai, os; print(os.path.dirname(os.path.dirname(monai.__file__)))')
    mkdir -p .whl/site
    rm -rf .whl/site/monai .whl/site/monai-*.dist-info
    cp -r "$site/monai" "$site"/monai-*.dist-info .whl/site/
    find .whl/site -name __pycache__ -type d -prune -exec rm -rf {} +
    du -sh .whl/site
    exit 0
fi
PY=${PYTHON:-$(command -v python3)}
[[ -x .venv/bin/python && -z "${PYTHON:-}" && "${1:-}" == "--cpu-smoke" ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD/DecipherMRTraining${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .whl/site/monai ]] && export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[[ -z "${1:-}" ]] && { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true; }
exec timeout --kill-after=20 "${GPU_BENCH_TIMEOUT:-420}" "$PY" Testing/bench/gpu_bench.py "$@"
