#!/usr/bin/env bash
# GPU check: install in place (no network; the C++/CUDA gather extension is built for sm_90 when
# nvcc is there), record the machine, run the tests, then the benchmarks: a W=8 simulated
# distributed loss step, the cache gather tiers, and the single-device loss --quick sweep.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Under the device tool, which brings back at most 8 files, write elsewhere and pack:
#   bash bench/gpu_check.sh /tmp/gc; tar czf "$OUT/gpu_check.tgz" -C /tmp/gc .
#
# Meant for a GPU machine without network where torch and triton are preinstalled system-wide.
# Every step runs under `timeout`; the whole script is budgeted to GPU_CHECK_BUDGET_S seconds
# (default 580 s, inside the device tool's 10-minute command limit): install <= 150 s, tests <= 180 s,
# simulated W <= 60 s, cache gather <= 50 s, attention <= 60 s, extraction <= 50 s, training step
# <= 90 s (it keeps 60 s for the loss sweep), and the quick loss sweep gets what is left (it stops
# starting cases in time). Exit status: 0 only if the install, the tests and every benchmark run succeeded;
# the benchmarks run even when the tests fail.
#
# Writes into OUT_DIR:
#   gpu_check.log   step log, nvidia-smi, versions, install output, summary
#   pytest.log      the test run
#   sim.log         the simulated-W run's stdout/stderr (per-rank work of an 8-GPU step, no comms)
#   cache_gather.log, attention.log, extract.log, train.log, bench.log   the other benchmarks' stdout/stderr
#   loss_throughput-*, cache_gather-*, attention_throughput-*, train_throughput-* .json / .png   rows and plots
#
# Optional: wheels placed in .whl/ at the repository root (for example inf_cl-*.whl, which has no
# compiled parts) are installed with --no-index --no-deps into a temporary folder put on PYTHONPATH.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, PYTEST_ARGS (default "-q tests"),
# SIM_ARGS (default "--simulate-world 8 --batches 32768,131072 --dims 1024"; empty skips the step),
# TRAIN_ARGS (bench/train_throughput.py, default "--quick"; empty skips the step),
# BENCH_ARGS (extra arguments for bench/loss_throughput.py, default "--quick").

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
BUDGET=${GPU_CHECK_BUDGET_S:-580}
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: >"$LOG"
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

# ---------------------------------------------------------------- 2. optional wheels
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
log "pip install --no-index --no-build-isolation --no-deps -e . (LLM2CLIP_FORCE_CUDA=${LLM2CLIP_FORCE_CUDA:-unset})"
if timeout "$(left 150 300)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
    && check_import; then
    log "editable install OK"
else
    # Fallback: a folder on PYTHONPATH whose links give the import names (llm2clip_kernels -> kernels/).
    log "editable install failed or does not import; falling back to PYTHONPATH links"
    LINKS=$(mktemp -d /tmp/gpu_check_links.XXXXXX)
    ln -s "$REPO/kernels" "$LINKS/llm2clip_kernels"
    ln -s "$REPO/llm2clip" "$LINKS/llm2clip"
    export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    if check_import; then
        log "PYTHONPATH install OK ($LINKS)"
    else
        log "ERROR: llm2clip_kernels does not import (see $LOG)"
        FAILED+=("install")
    fi
fi

# ---------------------------------------------------------------- 4. tests
PYTEST_ARGS=${PYTEST_ARGS:--q tests}
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    T=$(left 180 330)
    log "pytest $PYTEST_ARGS (timeout ${T}s)"
    # shellcheck disable=SC2086
    timeout -k 15 "$T" "$PY" -m pytest $PYTEST_ARGS -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) log "tests passed" ;;
        124 | 137) log "ERROR: tests timed out after ${T}s"; FAILED+=("tests (timeout)") ;;
        5) log "ERROR: pytest collected no tests"; FAILED+=("tests (none collected)") ;;
        *) log "ERROR: tests failed (pytest exit $rc)"; FAILED+=("tests (exit $rc)") ;;
    esac
else
    log "ERROR: pytest is not installed; tests not run"
    FAILED+=("tests (no pytest)")
fi

# ---------------------------------------------------------------- 5. simulated W ranks
SIM_ARGS=${SIM_ARGS---simulate-world 8 --batches 32768,131072 --dims 1024}
if [ -n "$SIM_ARGS" ]; then
    T=$(left 60 280)
    MAXS=$((T > 50 ? T - 30 : T / 2))
    log "bench/loss_throughput.py $SIM_ARGS --max-seconds $MAXS (timeout ${T}s)"
    # shellcheck disable=SC2086
    timeout -k 15 "$T" "$PY" bench/loss_throughput.py $SIM_ARGS --max-seconds "$MAXS" --out "$OUT" 2>&1 \
        | tee "$OUT/sim.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) log "simulated-W benchmark done" ;;
        124 | 130 | 137) log "ERROR: simulated-W benchmark stopped by its time limit (partial rows are in the JSON)"; FAILED+=("sim (timeout)") ;;
        *) log "ERROR: simulated-W benchmark failed (exit $rc)"; FAILED+=("sim (exit $rc)") ;;
    esac
fi

# ---------------------------------------------------------------- 6. cache gather benchmark
T=$(left 50 220)
log "bench/cache_gather.py --quick (timeout ${T}s)"
timeout -k 10 "$T" "$PY" bench/cache_gather.py --quick --out "$OUT" 2>&1 | tee "$OUT/cache_gather.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) log "cache gather benchmark done" ;;
    *) log "ERROR: cache gather benchmark failed or timed out (exit $rc)"; FAILED+=("cache bench (exit $rc)") ;;
esac

# ---------------------------------------------------------------- 7. attention benchmark
ATTN_ARGS=${ATTN_ARGS---quick --llm-models llama-3.2-1b}
if [ -n "$ATTN_ARGS" ]; then
    T=$(left 60 160)
    log "bench/attention_throughput.py $ATTN_ARGS (timeout ${T}s)"
    # shellcheck disable=SC2086
    timeout -k 10 "$T" "$PY" bench/attention_throughput.py $ATTN_ARGS --out "$OUT" 2>&1 | tee "$OUT/attention.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) log "attention benchmark done" ;;
        *) log "ERROR: attention benchmark failed or timed out (exit $rc)"; FAILED+=("attention bench (exit $rc)") ;;
    esac
fi

# ---------------------------------------------------------------- 8. extraction benchmark
T=$(left 50 120)
log "bench/extract_throughput.py --quick (timeout ${T}s)"
timeout -k 10 "$T" "$PY" bench/extract_throughput.py --quick --out "$OUT" 2>&1 | tee "$OUT/extract.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) log "extraction benchmark done" ;;
    *) log "ERROR: extraction benchmark failed or timed out (exit $rc)"; FAILED+=("extract bench (exit $rc)") ;;
esac

# ---------------------------------------------------------------- 8b. stage-2 training step benchmark
# ViT-B/16: the plain step searched to OOM, fused loss + gradient cache at 1k/4k/16k, the b=4096
# loss/gather/data breakdown; it starts no case after 60 s, and keeps 60 s for the loss sweep.
TRAIN_ARGS=${TRAIN_ARGS---quick}
if [ -n "$TRAIN_ARGS" ]; then
    T=$(left 90 60)
    log "bench/train_throughput.py $TRAIN_ARGS (timeout ${T}s)"
    # shellcheck disable=SC2086
    timeout -k 10 "$T" "$PY" bench/train_throughput.py $TRAIN_ARGS --out "$OUT" 2>&1 | tee "$OUT/train.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) log "training step benchmark done" ;;
        124 | 130 | 137) log "ERROR: training step benchmark stopped by its time limit (partial rows are in the JSON)"; FAILED+=("train bench (timeout)") ;;
        *) log "ERROR: training step benchmark failed (exit $rc)"; FAILED+=("train bench (exit $rc)") ;;
    esac
fi

# ---------------------------------------------------------------- 9. loss benchmark
BENCH_ARGS=${BENCH_ARGS:---quick}
T=$(left 300 5)
MAXS=$((T > 90 ? T - 60 : T / 2))
log "bench/loss_throughput.py $BENCH_ARGS --max-seconds $MAXS (timeout ${T}s)"
# shellcheck disable=SC2086
timeout -k 20 "$T" "$PY" bench/loss_throughput.py $BENCH_ARGS --max-seconds "$MAXS" --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) log "benchmark done" ;;
    124 | 130 | 137) log "ERROR: benchmark stopped by its time limit (partial rows are in the JSON)"; FAILED+=("bench (timeout)") ;;
    *) log "ERROR: benchmark failed (exit $rc)"; FAILED+=("bench (exit $rc)") ;;
esac

# ---------------------------------------------------------------- summary
if [ ${#FAILED[@]} -eq 0 ]; then
    log "ALL OK in $(elapsed)s"
    exit 0
fi
log "FAILED: ${FAILED[*]} ($(elapsed)s)"
exit 1
