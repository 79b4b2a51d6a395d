#!/usr/bin/env bash
# The checks only a GPU can make, as one script: the GPU tests, `reid-tune doctor`, and the training,
# evaluation, re-ranking and embedding benchmarks on CUDA. Run it from the repository root on a machine
# with PyTorch; the search layer (Ray, MLflow, Optuna) need not be installed: the tests that need it are
# not collected. Wheels in ./wheels are installed first (no index), e.g. made beside a checkout with
#
#   pip download --no-deps -d wheels pytest iniconfig pluggy packaging click rich markdown-it-py mdurl \
#       pygments onnx onnxruntime onnxscript onnx-ir ml-dtypes protobuf flatbuffers coloredlogs humanfriendly
#
# Each step's whole output goes to $OUT/<step>.log (default ./gpu-checks), its tail and exit status to the
# console; LIMIT (seconds, default 240) bounds each step. The exit status is the number of failed steps.
set -u
OUT=${OUT:-gpu-checks}
LIMIT=${LIMIT:-240}
mkdir -p "$OUT"
if compgen -G "wheels/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --find-links wheels wheels/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
failed=0

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "   exit status $status after $((SECONDS - start)) s"
    tail -n 30 "$OUT/$name.log"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

step gpu-tests python -m pytest tests -k "cuda or gpu" -q -rs -p no:cacheprovider
step doctor python -m reid_tune.cli doctor
step bench-eval python benchmarks/bench_eval.py --device cuda
step bench-rerank python benchmarks/bench_eval.py --rerank --device cuda
step bench-embed python benchmarks/bench_embed.py --device cuda --seconds 2
step bench-train python benchmarks/bench_train.py
exit "$failed"
