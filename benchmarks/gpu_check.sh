#!/usr/bin/env bash
# The GPU check: on one CUDA machine, in one call of about 8 minutes, every figure a first GPU run
# must bring back, the most important first:
#   check_machine   the machine; one line naming anything the check needs that is missing
#   tests           tests/test_kernels.py with the kernels compiled (TRITON_INTERPRET=0)
#   bench_norms     copy bandwidth, then fwd and fwd+bwd of ours, torch eager and compiled (and Liger
#                   where installed), bf16 at 16384x768, 8192x4096, 4096x8192, as % of that bandwidth
#   bench_launches  each of our kernels with every candidate launch: which one wins at each shape
#   step_eager      GPT-2-124M training step (B=16, T=1024, bf16 autocast), every norm variant, eager
#   step_compiled   the same compiled, variants in order of interest while the budget lasts
#   trainer         train.py's own loop at GPT-2-124M (compiled, no accumulation), its current step
#                   against the host-synced one before it
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]    (OUT_DIR: default $OUT, else benchmarks/results_gpu)
#
# Files in OUT_DIR, 7 (a lease brings back at most 8): summary.md (the machine, then each step's table
# as soon as the step ends, with its exit status and seconds), log.txt (every step's progress and
# errors), and one JSON per benchmark, rewritten as its figures come in.
#
# Time: CHECK_SECONDS (default 470) for all steps. Each step runs under its own limit or what is left,
# whichever is less, and a benchmark is told to stop measuring before that (--max-seconds), so that a
# check cut short still writes what it measured. The limits are estimates: no GPU has run this yet.
#
# --dry-run: every step on this CPU at toy shapes (Triton's interpreter, configs/tiny.toml, one
# round, limits x5), writing the same files. The kernel tests are a sample (CI runs the whole file
# in the interpreter already), and torch.compile uses its aot_eager backend: Inductor cannot look
# inside the interpreter's kernels, and its C++ code generation takes minutes on a small CPU.
# tests/test_benchmarks.py runs it.
#
# It runs the python3 it finds (PYTHON=... to choose one): on the GPU machine, that machine's own,
# with its CUDA torch. It installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-benchmarks/results_gpu}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
LOG="$OUT_DIR/log.txt"
: > "$SUMMARY"
: > "$LOG"
# NORMGPT_CPU_KERNEL=0: the few CPU tensors here use rmsnorm's ATen formula, not a C++ build first
export NORMGPT_CPU_KERNEL=0 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then  # a small, shared CPU: generous limits (x5), the interpreter, no GPU
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    BUDGET=${CHECK_SECONDS:-1800} SCALE=5
else
    export TRITON_INTERPRET=0
    BUDGET=${CHECK_SECONDS:-470} SCALE=1
fi
CACHE_DIR=${CHECK_CACHE_DIR:-cache}  # the trainer's tokenizer and tokens
deadline=$((SECONDS + BUDGET))
status=0

run() {  # run NAME LIMIT CMD...: CMD's stdout (its table) to the summary, stderr to the log; @MAX@ in CMD
         # becomes the seconds it may spend measuring (its limit, less time to write its table)
    local name=$1 limit=$(($2 * SCALE)) left=$((deadline - SECONDS)) a
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        printf '\n## %s\n\nnot run: the check'"'"'s budget of %ss is spent\n' "$name" "$BUDGET" >> "$SUMMARY"
        echo "== $name: not run, budget spent" >&2
        status=1
        return
    fi
    local cmd=()
    for a in "$@"; do cmd+=("${a//@MAX@/$((limit * 4 / 5))}"); done
    printf '\n## %s\n\n`%s`\n\n' "$name" "${cmd[*]}" >> "$SUMMARY"
    printf '\n== %s (limit %ss): %s\n' "$name" "$limit" "${cmd[*]}" >> "$LOG"
    echo "== $name (limit ${limit}s)" >&2
    local start=$SECONDS
    timeout -k 10 "$limit" "${cmd[@]}" >> "$SUMMARY" 2>> "$LOG"
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (stopped at its limit: the lines above are what it had printed)"
    printf '\n_%s: exit %s after %ss%s_\n' "$name" "$rc" "$((SECONDS - start))" "$note" >> "$SUMMARY"
    echo "== $name: exit $rc after $((SECONDS - start))s" >&2
    [ "$rc" -eq 0 ] || status=1
}

printf '# GPU check, %s%s\n\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$([ "$DRY" = 1 ] && echo ', dry run on CPU')" >> "$SUMMARY"
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
if ! err=$("$PY" benchmarks/check_machine.py "${DRY_FLAG[@]}" 2>&1 >> "$SUMMARY"); then
    echo "$err" | tee -a "$LOG" >&2
    echo "$err" | tail -n 1 >> "$SUMMARY"
    exit 1
fi

# pytest-xdist, where installed, compiles the tests' kernels on several cores at once
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
PYTEST=("$PY" -m pytest -q --tb=line -p no:cacheprovider "${XDIST[@]}" tests/test_kernels.py)
if [ "$DRY" = 1 ]; then
    run tests 120 "${PYTEST[@]}" -k "candidate or bad_inputs or zero_rows"
    SMOKE=(--smoke --backend aot_eager)
    STEP=(--tiny --device cpu --backend aot_eager --rounds 1 --steps 1 --warmup 1)
    TRAINER=(--config configs/tiny.toml --set device=cpu --rounds 1 --steps 6 --log-interval 2)
else
    run tests 120 "${PYTEST[@]}"
    SMOKE=()
    STEP=(--rounds 5 --steps 5 --warmup 3)
    TRAINER=(--rounds 1 --steps 60 --log-interval 20 --set grad_accum=1)
fi
run bench_norms 100 "$PY" benchmarks/bench_norms.py "${SMOKE[@]}" --max-seconds @MAX@ \
    --json "$OUT_DIR/bench_norms.json"
run bench_launches 70 "$PY" benchmarks/bench_norms.py --tune "${SMOKE[@]}" --max-seconds @MAX@ \
    --json "$OUT_DIR/bench_launches.json"
run step_eager 60 "$PY" benchmarks/bench_train_step.py --modes eager "${STEP[@]}" --max-seconds @MAX@ \
    --json "$OUT_DIR/bench_train_step_eager.json"
# eager and compiled in two runs, so that compiling cannot cost the eager table; ours first
run step_compiled 150 "$PY" benchmarks/bench_train_step.py --modes compiled "${STEP[@]}" --max-seconds @MAX@ \
    --variants triton_rmsnorm+fused_add,triton_rmsnorm,rmsnorm,layernorm,none \
    --json "$OUT_DIR/bench_train_step_compiled.json"
run trainer 120 "$PY" benchmarks/bench_trainer.py "${TRAINER[@]}" --set "cache_dir=$CACHE_DIR" --max-seconds @MAX@ \
    --json "$OUT_DIR/bench_trainer.json"
cat "$SUMMARY"
exit $status
