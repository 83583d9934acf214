#!/usr/bin/env bash
# gpu-check.sh OUT_DIR — the checks that need an NVIDIA GPU, in one run of a few minutes.
#
# Runs on a machine with a CUDA driver (and, optionally, nvcc/PyTorch; no network needed):
#   1. build flashc (release);
#   2. the instruction conformance suite: tiny kir kernels for every special instruction the `sim`
#      device models (mma.sync fragments, ldmatrix, cp.async, shuffles, cvt packing order,
#      ex2/rsqrt/tanh approximations, atomics) run on the GPU and on `sim` with the same inputs and
#      must agree bit for bit (or within the documented approximation bounds);
#   3. the `cuda` device tests (kernel generators against `cpu`; tiny examples end to end);
#   4. `flashc bench` on nemotron-flash-1b.arch and qwen3-0.6b.arch with random weights at batch 1
#      and 64;
# and writes every log and JSON report under OUT_DIR, then prints a summary table. Each step's
# failure is recorded and the script goes on, so one run reports everything; the exit code is the
# number of failed steps.
set -u
OUT="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export FLASHC_REQUIRE_GPU=1
declare -a NAMES STATUS SECS
failed=0

step() {
    local name="$1"
    shift
    local t0
    t0=$(date +%s)
    echo "== $name"
    if "$@" >"$OUT/$name.log" 2>&1; then
        STATUS+=("ok")
    else
        STATUS+=("FAILED")
        failed=$((failed + 1))
        tail -n 20 "$OUT/$name.log"
    fi
    NAMES+=("$name")
    SECS+=($(($(date +%s) - t0)))
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step build cargo build --release --workspace --all-targets
# A suite that does not exist yet is reported as `missing`, not run.
suite() {
    local name="$1" test="$2"
    if [ -f "runtime/tests/$test.rs" ]; then
        step "$name" cargo test --release -p flashc-runtime --test "$test" -- --nocapture
    else
        NAMES+=("$name")
        STATUS+=("missing")
        SECS+=(0)
    fi
}
suite conformance gpu_conformance
suite cuda-tests cuda
for model in nemotron-flash-1b qwen3-0.6b; do
    for batch in 1 64; do
        step "bench-$model-b$batch" sh -c "./target/release/flashc bench examples/$model.arch --random --device cuda \
            --batch $batch --prompt 2048 --decode 256 --json > '$OUT/bench-$model-b$batch.json'"
    done
done

echo
printf '%-32s %-8s %6s\n' step status seconds
for i in "${!NAMES[@]}"; do
    printf '%-32s %-8s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
done
exit "$failed"
