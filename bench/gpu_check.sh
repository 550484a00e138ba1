#!/usr/bin/env bash
# GPU check on a machine without network (torch and triton preinstalled): install in place (wheels
# from .whl/), record the machine, run the GPU tests and the benchmarks each under `timeout` within
# GPU_CHECK_BUDGET_S (default 480 s), then bench/gpu_summary.py writes results.json and summary.md.
# The steps, their caps, the environment overrides and the outputs: bench/README.md, "gpu_check.sh".
# Exit status 0 only if the wheels, the install, the tests, the resource report and every benchmark
# succeeded; the benchmarks run even when tests fail.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Under the device tool, which brings back at most 8 files, write elsewhere and pack:
#   bash bench/gpu_check.sh /tmp/gc; cp /tmp/gc/results.json /tmp/gc/summary.md "$OUT"; tar czf "$OUT/gpu_check.tgz" -C /tmp/gc .

set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac # steps run in other folders
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.tsv" # name, status, seconds, log: read by the summary
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

FAILED=()
elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }
# left SECONDS_CAP RESERVE: seconds a step may use, capped, leaving RESERVE for the later steps.
left() {
    local rem=$((BUDGET - $(elapsed) - $2))
    [ "$rem" -gt "$1" ] && rem=$1
    [ "$rem" -lt 10 ] && rem=10
    echo "$rem"
}
# step NAME LOGFILE SECONDS CMD...: run CMD under timeout, tee to LOGFILE, record the outcome.
step() {
    local name=$1 logfile=$2 secs=$3 t0 rc status
    shift 3
    t0=$(date +%s)
    log "$name: $* (timeout ${secs}s)"
    timeout -k 15 "$secs" "$@" 2>&1 | tee "$OUT/$logfile"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 130 | 137) status=timeout ;;
        *) status="exit $rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$logfile" >>"$STEPS"
    if [ "$status" = ok ]; then log "$name: ok"; else log "ERROR: $name: $status"; FAILED+=("$name ($status)"); fi
}

log "repo $REPO, out $OUT, python $PY, budget ${BUDGET}s"

# ---------------------------------------------------------------- 1. machine and versions
{
    echo "===== nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi failed or missing"
    echo "===== versions"
    timeout 60 "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
print("platform", platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), "sm", f"{p.major}.{p.minor}",
              "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
except Exception as e:
    print("torch import failed:", e)
for name in ("triton", "numpy", "pytest", "matplotlib", "inf_cl"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "present"))
    except Exception as e:
        print(name, "missing:", type(e).__name__)
EOF
    echo "===== git"
    git rev-parse HEAD 2>/dev/null || echo "no git metadata"
    git status --short 2>/dev/null | head -20
} >>"$LOG" 2>&1
log "machine recorded"

# ---------------------------------------------------------------- 2. wheels from .whl/
# webdataset and braceexpand are pure Python and not on the GPU image; llm2clip.data imports them.
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$REPO"/.whl/*.whl \
        >>"$LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "installed wheels from .whl/: $(cd "$REPO/.whl" && ls ./*.whl | tr '\n' ' ')"
    else
        log "WARNING: installing the wheels in .whl/ failed (see above); going on without them"
    fi
fi
if "$PY" -c "import webdataset, braceexpand" >>"$LOG" 2>&1; then
    printf 'wheels\tok\t0\tgpu_check.log\n' >>"$STEPS"
else
    log "ERROR: webdataset / braceexpand do not import: put their wheels in .whl/ (pip download --no-deps webdataset braceexpand -d .whl)"
    FAILED+=("wheels (webdataset, braceexpand)")
    printf 'wheels\tmissing webdataset/braceexpand\t0\tgpu_check.log\n' >>"$STEPS"
fi

# ---------------------------------------------------------------- 3. install the project in place
check_import() {
    (cd /tmp && timeout 120 "$PY" -c "import llm2clip_kernels, llm2clip; print('llm2clip_kernels from', llm2clip_kernels.__file__)") \
        >>"$LOG" 2>&1
}
# The C++/CUDA gather extension (csrc/) builds with the project; with nvcc present its CUDA kernels
# are compiled for sm_90 (no nvcc: a CPU-only extension and the CUDA gather tests skip).
if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
    export LLM2CLIP_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
T0=$(date +%s)
if [ "${SKIP_INSTALL:-0}" = 1 ] && check_import; then
    log "SKIP_INSTALL=1: using the installed project"
    INSTALL="ok (skipped)"
elif log "pip install --no-index --no-build-isolation --no-deps -e . (LLM2CLIP_FORCE_CUDA=${LLM2CLIP_FORCE_CUDA:-unset})" \
    && timeout "$(left 100 385)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
    && check_import; then
    log "editable install OK"
    INSTALL=ok
else
    # Fallback: a folder on PYTHONPATH whose links give the import names (llm2clip_kernels -> kernels/).
    log "editable install failed or does not import; falling back to PYTHONPATH links"
    LINKS=$(mktemp -d /tmp/gpu_check_links.XXXXXX)
    ln -s "$REPO/kernels" "$LINKS/llm2clip_kernels"
    ln -s "$REPO/llm2clip" "$LINKS/llm2clip"
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    if check_import; then
        log "PYTHONPATH install OK ($LINKS)"
        INSTALL="ok (PYTHONPATH links)"
    else
        log "ERROR: llm2clip_kernels does not import (see $LOG)"
        FAILED+=("install")
        INSTALL=failed
    fi
fi
printf 'install\t%s\t%s\t%s\n' "$INSTALL" "$(($(date +%s) - T0))" gpu_check.log >>"$STEPS"

# ---------------------------------------------------------------- 4. kernel resources (background)
# Compiles every loss kernel x autotune config for sm_90a and reads ptxas -v: CPU work that
# overlaps the GPU steps. Joined before the summary.
RESOURCE_ARGS=${RESOURCE_ARGS---dtypes bf16,fp16} # fp32's FMA variants compile for minutes
RES_PID=
if [ "$RESOURCE_ARGS" != skip ]; then
    JOBS=$(($(nproc) > 2 ? $(nproc) / 2 : 1))
    log "bench/kernel_resources.py --jobs $JOBS (background, timeout 150s)"
    # shellcheck disable=SC2086
    (
        t0=$(date +%s)
        timeout -k 10 150 "$PY" bench/kernel_resources.py --jobs "$JOBS" --fail-on-spill \
            --json "$OUT/kernel_resources.json" --out "$OUT" $RESOURCE_ARGS >"$OUT/kernel_resources.log" 2>&1
        rc=$?
        case $rc in 0) s=ok ;; 124 | 137) s=timeout ;; *) s="exit $rc" ;; esac
        printf 'kernel resources\t%s\t%s\t%s\n' "$s" "$(($(date +%s) - t0))" kernel_resources.log >"$OUT/.resources.tsv"
    ) &
    RES_PID=$!
fi

# ---------------------------------------------------------------- 5. GPU tests
# Default: the test files that use CUDA (grep), so new GPU tests are picked up; the CPU-only
# suite is CI's job. The compile and resource tests are left out (step 4 does that work).
if [ -z "${PYTEST_ARGS:-}" ]; then
    PYTEST_ARGS="-q $(grep -lE 'requires_cuda|HAS_CUDA|cuda\.is_available|TRITON_DEVICE' tests/test_*.py \
        | grep -v -e test_triton_compile -e test_kernel_resources | tr '\n' ' ')"
fi
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    step "GPU tests" pytest.log "$(left 115 270)" "$PY" -m pytest $PYTEST_ARGS -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml"
else
    log "ERROR: pytest is not installed; tests not run"
    FAILED+=("tests (no pytest)")
    printf 'GPU tests\tno pytest\t0\t-\n' >>"$STEPS"
fi

# ---------------------------------------------------------------- 6. simulated W ranks
SIM_ARGS=${SIM_ARGS---simulate-world 8 --batches 32768,131072 --dims 1024}
if [ -n "$SIM_ARGS" ]; then
    T=$(left 25 245)
    # shellcheck disable=SC2086
    step "simulated W=8 loss" sim.log "$T" "$PY" bench/loss_throughput.py $SIM_ARGS \
        --max-seconds $((T > 25 ? T - 15 : T / 2)) --out "$OUT"
fi

# ---------------------------------------------------------------- 7. cache gather benchmark
CACHE_ARGS=${CACHE_ARGS---quick}
if [ -n "$CACHE_ARGS" ]; then
    # shellcheck disable=SC2086
    step "cache gather" cache_gather.log "$(left 30 215)" "$PY" bench/cache_gather.py $CACHE_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 8. attention benchmark
ATTN_ARGS=${ATTN_ARGS---quick --llm-models llama-3.2-1b}
if [ -n "$ATTN_ARGS" ]; then
    # shellcheck disable=SC2086
    step "attention" attention.log "$(left 30 185)" "$PY" bench/attention_throughput.py $ATTN_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 9. extraction benchmark
EXTRACT_ARGS=${EXTRACT_ARGS---quick}
if [ -n "$EXTRACT_ARGS" ]; then
    # shellcheck disable=SC2086
    step "extraction" extract.log "$(left 25 160)" "$PY" bench/extract_throughput.py $EXTRACT_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 10. data path: decode rates per worker (nvJPEG too)
DATA_ARGS=${DATA_ARGS---only decode --sizes 512 --quick}
if [ -n "$DATA_ARGS" ]; then
    # shellcheck disable=SC2086
    step "data decode" data.log "$(left 25 135)" "$PY" bench/data_throughput.py $DATA_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 11. stage-2 training step benchmark
# Its breakdown's data cost comes from the decode rate just measured (the draft path at 512 px).
TRAIN_ARGS=${TRAIN_ARGS---quick}
if [ -n "$TRAIN_ARGS" ]; then
    T=$(left 50 85)
    DATA_JSON=$(ls -t "$OUT"/data_throughput-*.json 2>/dev/null | head -1)
    # shellcheck disable=SC2086
    step "training step" train.log "$T" "$PY" bench/train_throughput.py $TRAIN_ARGS \
        ${DATA_JSON:+--decode-rate "$DATA_JSON"} --max-seconds $((T > 30 ? T - 25 : T / 2)) --out "$OUT"
fi

# ---------------------------------------------------------------- 12. loss benchmark (roofline column)
BENCH_ARGS=${BENCH_ARGS:---quick}
T=$(left 300 15)
# shellcheck disable=SC2086
step "loss sweep" bench.log "$T" "$PY" bench/loss_throughput.py $BENCH_ARGS \
    --max-seconds $((T > 60 ? T - 40 : T / 2)) --out "$OUT"

# ---------------------------------------------------------------- 13. results.json + summary.md
if [ -n "$RES_PID" ]; then
    wait "$RES_PID"
    cat "$OUT/.resources.tsv" >>"$STEPS" 2>/dev/null || printf 'kernel resources\tmissing\t0\t-\n' >>"$STEPS"
    rm -f "$OUT/.resources.tsv"
    grep -q $'^kernel resources\tok\t' "$STEPS" || FAILED+=("kernel resources")
fi
log "writing results.json and summary.md"
timeout 60 "$PY" bench/gpu_summary.py "$OUT" "$BUDGET" "$(elapsed)" >>"$LOG" 2>&1 \
    || log "ERROR: the summary failed (see $LOG)"

if [ ${#FAILED[@]} -eq 0 ]; then
    log "ALL OK in $(elapsed)s"
    exit 0
fi
log "FAILED: ${FAILED[*]} ($(elapsed)s)"
exit 1
