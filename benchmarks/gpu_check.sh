#!/usr/bin/env bash
# The CUDA checks of issues 14 and 20 in one run, on a machine with a CUDA GPU and torch installed.
#
#   benchmarks/gpu_check.sh OUTPUT_DIR        # everything lands in OUTPUT_DIR; < 9.5 minutes
#   GPU_CHECK_PARTS="env compiled-tests compiled" benchmarks/gpu_check.sh OUTPUT_DIR   # some parts
#
# Parts, each under its own `timeout` (a hang costs that part only), in order of importance:
#   env       nvidia-smi, torch/CUDA versions, which peers and test tools are installed
#   cuda-tests python -m pytest -q -m cuda -rs            (cuda-tests.log, cuda-tests.xml)
#   compiled-tests python -m pytest -q tests/test_compiled_step.py (compiled-tests.xml)
#   compiled  compiled.py --device cuda (issue 20): torch.compile'd AdamW/SGD steps with and
#             without the EMA, 8 x 32M params, AdamW fp32 first; EMA cost against the compiled
#             inner step, Inductor's kernel count and the CUDA kernels of one steady-state step
#             (torch.profiler) with and without the EMA (goal: the same, e.g. 2 and 2)
#   bench     bench.py --device cuda --suites updates    (1B fp32 in 200 tensors, 10,000 x 4096,
#             500M bf16 with fp32 shadows; peers installed there; copy ceiling in the same run)
#   offload   offload.py (268M-param bf16 step), update_every 1 and 10
#   extras    bench.py --device cuda --suites swa shadows host (host last: the slowest)
#   suite     the whole test suite, with whatever time is left (suite.log, suite.xml)
# then summary.txt (also printed): every part's exit status and time, and the headline numbers.
#
# Nothing is installed: a missing package is reported (env.log) and its peer is skipped.
# PYTHON=... picks the interpreter (default python3); GPU_CHECK_BUDGET=... the total seconds (560);
# GPU_CHECK_PARTS=... the parts to run, by name (default: all; "suite" is the whole test suite).
# GPU_CHECK_SMOKE=1: a CPU smoke test of the script itself (tiny shapes, no claims, no suite).
# The device tool returns at most 8 files: run it as
#   benchmarks/gpu_check.sh /tmp/gpu; tar czf $OUT/gpu_check.tgz -C /tmp gpu; cp /tmp/gpu/summary.txt $OUT/
set -u

OUT_DIR=${1:?usage: benchmarks/gpu_check.sh OUTPUT_DIR}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-560}
PARTS=" ${GPU_CHECK_PARTS:-env cuda-tests compiled-tests compiled bench offload offload10 extras suite} "
DEVICE=(--device cuda)
OFFLOAD=()
if [[ ${GPU_CHECK_SMOKE:-0} == 1 ]]; then DEVICE=(--device cpu --quick) OFFLOAD=(--cpu-smoke); fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=()

# part NAME LIMIT_S CMD...: run CMD with stdout+stderr in NAME.log, under min(LIMIT_S, time left).
part() {
    local name=$1 limit=$2
    shift 2
    if [[ $PARTS != *" $name "* ]]; then return; fi  # not asked for (GPU_CHECK_PARTS)
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 10)); then
        STATUS+=("$(printf '%-14s skipped: out of time' "$name")")
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$? took=$(($(date +%s) - t0))
    local what="ok"
    if ((rc == 124 || rc == 137)); then what="TIMED OUT"; elif ((rc == 5)); then what="no tests ran";
    elif ((rc != 0)); then what="FAILED"; fi
    STATUS+=("$(printf '%-14s rc=%-3s %4ss  %s' "$name" "$rc" "$took" "$what")")
    tail -n 5 "$OUT_DIR/$name.log"
}

env_report() {
    nvidia-smi || echo "nvidia-smi: not found"
    "$PY" - <<'EOF'
import importlib.util, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(), "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for name in ["pytest", "hypothesis", "timm", "ema_pytorch", "torch_ema", "diffusers", "numpy", "pytest_timeout"]:
    print(f"{name:<14}", "installed" if importlib.util.find_spec(name) else "MISSING (its checks are skipped)")
EOF
}

export -f env_report
export PY
part env 30 bash -c env_report
part cuda-tests 100 "$PY" -m pytest -q -m cuda -rs --junitxml="$OUT_DIR/cuda-tests.xml" tests
part compiled-tests 90 "$PY" -m pytest -q -rs --junitxml="$OUT_DIR/compiled-tests.xml" tests/test_compiled_step.py
part compiled 180 "$PY" benchmarks/compiled.py "${DEVICE[@]}" --json "$OUT_DIR/compiled.json"
part bench 150 "$PY" benchmarks/bench.py "${DEVICE[@]}" --suites updates --json "$OUT_DIR/bench.json"
part offload 60 "$PY" benchmarks/offload.py "${OFFLOAD[@]}" --rounds 7 --block 5 --json "$OUT_DIR/offload.json"
part offload10 60 "$PY" benchmarks/offload.py "${OFFLOAD[@]}" --every 10 --rounds 5 --block 20 --json "$OUT_DIR/offload-every10.json"
part extras 75 "$PY" benchmarks/bench.py "${DEVICE[@]}" --suites swa shadows host --json "$OUT_DIR/extras.json"
TIMEOUT_ARG=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARG=(--timeout=60); fi
if [[ ${GPU_CHECK_SMOKE:-0} == 1 ]]; then
    STATUS+=("suite          skipped: smoke test")
elif [[ $PARTS == *" suite "* ]]; then
    part suite 400 "$PY" -m pytest -q -rs "${TIMEOUT_ARG[@]}" --junitxml="$OUT_DIR/suite.xml" tests
fi

{
    echo "gpu_check: $(($(date +%s) - START)) s of a ${BUDGET} s budget; outputs in $OUT_DIR"
    printf '%s\n' "${STATUS[@]}"
    "$PY" benchmarks/_gpu_summary.py "$OUT_DIR" 2>&1
} | tee "$OUT_DIR/summary.txt"
