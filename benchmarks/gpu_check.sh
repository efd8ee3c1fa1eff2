#!/usr/bin/env bash
# The GPU check, on one CUDA machine, in < ~10 minutes (an estimate: it has never run on a GPU):
#   1. tests/test_kernels.py with the kernels compiled (TRITON_INTERPRET=0), not interpreted
#   2. benchmarks/bench_norms.py: copy bandwidth, then fwd and fwd+bwd of every implementation
#   3. benchmarks/bench_train_step.py: GPT-2-124M step, each norm variant, eager and compiled
#   4. benchmarks/bench_trainer.py: train.py's own loop at GPT-2-124M (B=16, T=1024, bf16, compiled,
#      no accumulation: nanoGPT's bench shape), its current step against the host-synced one before it
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else benchmarks/results_gpu)
# Every table lands in OUT_DIR; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results_gpu}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
status=0
run() {  # run NAME SECONDS CMD...: output to OUT_DIR/NAME.txt (and the terminal)
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT_DIR/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"; } \
    > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"
# time limits (s); estimated well under them (~600 s in all), most of it compiling seven GPTs.
# Eager and compiled steps run as two invocations so that the compiles cannot cost the eager table.
# NORMGPT_CPU_KERNEL=0: the few CPU-tensor tests here use the ATen RMSNorm instead of first building
# the C++ CPU kernel (~10-20 s of this budget; tests/test_rmsnorm.py covers that kernel on CPU)
run tests 150 env TRITON_INTERPRET=0 NORMGPT_CPU_KERNEL=0 "$PY" -m pytest -q tests/test_kernels.py
run bench_norms 120 "$PY" benchmarks/bench_norms.py --json "$OUT_DIR/bench_norms.json"
run bench_train_step_eager 90 "$PY" benchmarks/bench_train_step.py --modes eager --rounds 5 --steps 5 \
    --json "$OUT_DIR/bench_train_step_eager.json"
run bench_train_step_compiled 260 "$PY" benchmarks/bench_train_step.py --modes compiled --rounds 5 --steps 5 \
    --max-seconds 230 --json "$OUT_DIR/bench_train_step_compiled.json"
run bench_trainer 300 "$PY" benchmarks/bench_trainer.py --rounds 1 --steps 60 --log-interval 20 \
    --set grad_accum=1 --json "$OUT_DIR/bench_trainer.json"
exit $status
