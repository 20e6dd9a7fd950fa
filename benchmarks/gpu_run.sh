#!/usr/bin/env bash
# The GPU checks in one go on a bare one-GPU machine (torch, numpy, pyarrow, pyyaml; no Ray,
# no FluidSynth, no package index), from the repo's root, with a bundle made here by
#   python benchmarks/gpu_bundle.py --out gpu_bundle --tracks 168 --seconds 16 --seed 2021 --scores 16 --test-corpus
# then, on the GPU machine:
#   bash benchmarks/gpu_run.sh gpu_bundle OUT_DIR [BUDGET_S]
# 1. tests/test_gpu.py (every stage a few steps on CUDA);
# 2. benchmarks/gpu_check.py (every recipe 300 steps, a small evaluation, step speed);
# 3. benchmarks/gpu_pipeline.py (configs/gpu.yaml's Table-1 rows side by side, the tables, the
#    model to ship chosen on validation), cut off so that the whole run ends inside BUDGET_S.
# OUT_DIR receives few files: results.tgz (logs, tables, reports) and model/ (the export).
# DEVICE=cpu with CHECK_ARGS / PIPE_ARGS (e.g. "--steps 3", "--steps-scale 0.002") is the dry run.
set -u -o pipefail
B=${1:-gpu_bundle}
OUT=${2:-${OUT:-gpu_run_out}}
BUDGET=${3:-560}
DEVICE=${DEVICE:-cuda}
W=${GPU_RUN_WORK:-/tmp/gpu_run}
rm -rf "$W" && mkdir -p "$W" "$OUT"
# SKIP_WHEELS=1: the dry run where everything is installed (the wheels are CPython 3.12's)
[ "${SKIP_WHEELS:-}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$W/site" "$B"/wheels/*.whl || { echo "gpu_run: error: the bundle's wheels did not install" >&2; exit 2; }
export PYTHONPATH="$W/site:$PWD" PYTHONUNBUFFERED=1
rc=0
(nvidia-smi || true; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())") 2>&1 | tee "$W/machine.log"

WSS_TEST_CORPUS="$B/test_corpus" timeout $((BUDGET / 5)) python3 -m pytest -q -rs -p no:cacheprovider \
    tests/test_gpu.py 2>&1 | tee "$W/test_gpu.log" || rc=1
GPU_CHECK_WORK="$W/check" timeout $((BUDGET - SECONDS - 60)) python3 benchmarks/gpu_check.py --corpus "$B/corpus" \
    --out "$W/check_out" --device "$DEVICE" ${CHECK_ARGS:-} 2>&1 | tee "$W/gpu_check.log" || rc=1
left=$((BUDGET - SECONDS - 15))
echo "[gpu_run] $SECONDS s so far; the pipeline gets $left s"
timeout "$left" python3 benchmarks/gpu_pipeline.py --features "$W/check/features" --scores "$B/scores" \
    --out "$W/pipe" --export "$W/model" --device "$DEVICE" ${PIPE_ARGS:-} 2>&1 | tee "$W/gpu_pipeline.log" || rc=1

# what comes back: few files (no checkpoints but the exported model)
(cd "$W" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.wav' --exclude='features' \
    --exclude='scores_features' --exclude='work' ./*.log check_out pipe 2>/dev/null)
[ -d "$W/model" ] && mkdir -p "$OUT/model" && cp "$W/model"/* "$OUT/model/"
echo "[gpu_run] done in $SECONDS s, rc=$rc"
exit $rc
