#!/usr/bin/env bash
# gpu-check.sh OUT_DIR — the checks that need an NVIDIA GPU, in one run of at most 8 minutes
# (about 3–4 of them building on 16 cores).
#
# Runs on a machine with a CUDA driver (no toolkit, PyTorch or network needed):
#   1. build, in release, only what the later steps run: the two GPU test binaries and the CLI;
#   2. the instruction conformance suite (runtime/tests/gpu_conformance.rs): tiny kir kernels for
#      every special instruction the `sim` device models (mma.sync fragments, ldmatrix, cp.async,
#      shuffles, votes, conversions and bf16x2 packing, the .approx ops, atomics) run on the GPU and
#      on `sim` with the same inputs and must agree bit for bit or within the PTX bounds; one line per
#      case, copied to OUT/conformance.txt;
#   3. the `cuda` device tests (runtime/tests/cuda.rs): every generated kernel group of tiny-hybrid
#      against `cpu`; whole sessions against `cpu`; decode after prefill against a whole prefill;
#   4. `flashc bench` on nemotron-flash-1b.arch and qwen3-0.6b.arch with random weights at batch 1
#      and 64 (a model whose groups lack GPU kernels fails fast, naming them);
# writes every log and JSON report under OUT_DIR and prints a summary table last. Every test runs
# with FLASHC_REQUIRE_GPU=1, so a missing driver is a failure, not a skip. Each step has a time
# limit and the whole run a budget; a failed or timed-out step is recorded and the script goes on.
# The exit code is the number of failed steps.
set -u -o pipefail
OUT="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export FLASHC_REQUIRE_GPU=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The whole run must end within 8 minutes; steps that would start too late are not run.
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$(date +%s)
declare -a NAMES STATUS SECS
failed=0

left() {
    echo $((BUDGET - ($(date +%s) - START)))
}

record() {
    NAMES+=("$1")
    STATUS+=("$2")
    SECS+=("$3")
}

# step NAME LIMIT_SECONDS COMMAND...: runs the command with its output in OUT/NAME.log, at most
# LIMIT seconds and never past the budget.
step() {
    local name="$1" limit="$2"
    shift 2
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 15 ]; then
        echo "== $name: not run (out of time)"
        record "$name" "no-time" 0
        failed=$((failed + 1))
        return
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        record "$name" "ok" $(($(date +%s) - t0))
    else
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            record "$name" "TIMEOUT" $(($(date +%s) - t0))
        else
            record "$name" "FAILED" $(($(date +%s) - t0))
        fi
        failed=$((failed + 1))
        tail -n 20 "$OUT/$name.log"
    fi
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# 1. Build: the test binaries and the CLI, nothing else (the whole workspace's tests take too long).
TESTS=()
for t in gpu_conformance cuda; do
    [ -f "runtime/tests/$t.rs" ] && TESTS+=(--test "$t")
done
step build 330 bash -c "cargo build --release -p flashc --bin flashc && \
    cargo test --release -p flashc-runtime ${TESTS[*]} --no-run"

# 2–3. The suites (a suite that does not exist yet is reported as `missing`).
suite() {
    local name="$1" test="$2" limit="$3"
    shift 3
    if [ -f "runtime/tests/$test.rs" ]; then
        step "$name" "$limit" cargo test --release -p flashc-runtime --test "$test" -- --nocapture "$@"
    else
        record "$name" "missing" 0
    fi
}
suite conformance gpu_conformance 90 --test-threads=1
# The case lines (the harness may print a test's name on the same line as its first case).
sed -n -e 's/.*\(conformance .*\)/\1/p' -e '/^  [^ ]/p' "$OUT/conformance.log" >"$OUT/conformance.txt" 2>/dev/null || true
suite cuda-tests cuda 150

# 4. Benchmarks: both batch sizes in one run per model (random weights are made once).
FLASHC="$CARGO_TARGET_DIR/release/flashc"
for model in nemotron-flash-1b qwen3-0.6b; do
    step "bench-$model" 60 bash -o pipefail -c "'$FLASHC' bench examples/$model.arch --random --device cuda \
        --batch 1,64 --prompt 512 --decode 64 --json > '$OUT/bench-$model.json'"
done

echo
if [ -s "$OUT/conformance.txt" ]; then
    echo "instruction conformance (GPU against sim):"
    cat "$OUT/conformance.txt"
    echo
fi
echo "logs: $OUT (total $(($(date +%s) - START))s of a ${BUDGET}s budget)"
printf '%-32s %-8s %6s\n' step status seconds
for i in "${!NAMES[@]}"; do
    printf '%-32s %-8s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
done
exit "$failed"
