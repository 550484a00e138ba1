#!/usr/bin/env bash
# GPU check: install in place (no network; the C++/CUDA gather extension is built for sm_90 when
# nvcc is there), record the machine, then: the kernel resource report (CPU, in the background),
# the GPU tests, a W=8 simulated distributed loss step, the cache gather tiers, attention,
# extraction, the training step and the single-device loss --quick sweep (roofline column); last,
# one results JSON and one markdown summary of everything.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Under the device tool, which brings back at most 8 files, write elsewhere and pack:
#   bash bench/gpu_check.sh /tmp/gc; cp /tmp/gc/results.json /tmp/gc/summary.md "$OUT"; tar czf "$OUT/gpu_check.tgz" -C /tmp/gc .
#
# Meant for a GPU machine without network where torch and triton are preinstalled system-wide.
# Every step runs under `timeout`; the whole script is budgeted to GPU_CHECK_BUDGET_S seconds
# (default 480 s: about 8 minutes on one H100/H200, inside the device tool's 10-minute command
# limit). Caps: install <= 100 s, GPU tests <= 130 s, simulated W <= 30 s, cache gather <= 30 s,
# attention <= 30 s, extraction <= 25 s, training step <= 50 s, and the loss sweep gets what is
# left (at least 60 s are kept for it and 10 s for the summary); a step never gets more than the
# budget has left. The kernel resource report (bench/kernel_resources.py: compiling only, no GPU)
# runs in the background from the install on, <= 150 s. Exit status: 0 only if the install, the
# tests, the resource report and every benchmark run succeeded; the benchmarks run even when tests
# fail.
#
# Writes into OUT_DIR:
#   results.json    every step (status, seconds, log), every GPU test's outcome, every target's
#                   verdict, the loss rows with their roofline fraction, the resource report
#   summary.md      the same as a page: steps, failed tests, targets, loss vs roofline, resources
#   gpu_check.log   step log, nvidia-smi, versions, install output
#   pytest.log, pytest.xml (JUnit), kernel_resources.log/.json/.md, sim.log, cache_gather.log,
#   attention.log, extract.log, train.log, bench.log, and the benchmarks' JSON / PNG / MD files
#
# Optional: wheels placed in .whl/ at the repository root (for example inf_cl-*.whl, which has no
# compiled parts) are installed with --no-index --no-deps into a temporary folder put on PYTHONPATH.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, PYTEST_ARGS (default: the test files
# that use CUDA, found by grep), SIM_ARGS (default "--simulate-world 8 --batches 32768,131072
# --dims 1024"; empty skips the step), TRAIN_ARGS, CACHE_ARGS, EXTRACT_ARGS (default "--quick";
# empty skips), ATTN_ARGS,
# BENCH_ARGS (bench/loss_throughput.py, default "--quick"), RESOURCE_ARGS (arguments for
# bench/kernel_resources.py, default "--dtypes bf16,fp16"; RESOURCE_ARGS=skip skips it), SKIP_INSTALL=1 (use the project as
# installed, when it imports).

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
T0=$(date +%s)
if [ "${SKIP_INSTALL:-0}" = 1 ] && check_import; then
    log "SKIP_INSTALL=1: using the installed project"
    INSTALL="ok (skipped)"
elif log "pip install --no-index --no-build-isolation --no-deps -e . (LLM2CLIP_FORCE_CUDA=${LLM2CLIP_FORCE_CUDA:-unset})" \
    && timeout "$(left 100 370)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
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
    step "GPU tests" pytest.log "$(left 130 250)" "$PY" -m pytest $PYTEST_ARGS -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml"
else
    log "ERROR: pytest is not installed; tests not run"
    FAILED+=("tests (no pytest)")
    printf 'GPU tests\tno pytest\t0\t-\n' >>"$STEPS"
fi

# ---------------------------------------------------------------- 6. simulated W ranks
SIM_ARGS=${SIM_ARGS---simulate-world 8 --batches 32768,131072 --dims 1024}
if [ -n "$SIM_ARGS" ]; then
    T=$(left 30 220)
    # shellcheck disable=SC2086
    step "simulated W=8 loss" sim.log "$T" "$PY" bench/loss_throughput.py $SIM_ARGS \
        --max-seconds $((T > 25 ? T - 15 : T / 2)) --out "$OUT"
fi

# ---------------------------------------------------------------- 7. cache gather benchmark
CACHE_ARGS=${CACHE_ARGS---quick}
if [ -n "$CACHE_ARGS" ]; then
    # shellcheck disable=SC2086
    step "cache gather" cache_gather.log "$(left 30 190)" "$PY" bench/cache_gather.py $CACHE_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 8. attention benchmark
ATTN_ARGS=${ATTN_ARGS---quick --llm-models llama-3.2-1b}
if [ -n "$ATTN_ARGS" ]; then
    # shellcheck disable=SC2086
    step "attention" attention.log "$(left 30 160)" "$PY" bench/attention_throughput.py $ATTN_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 9. extraction benchmark
EXTRACT_ARGS=${EXTRACT_ARGS---quick}
if [ -n "$EXTRACT_ARGS" ]; then
    # shellcheck disable=SC2086
    step "extraction" extract.log "$(left 25 135)" "$PY" bench/extract_throughput.py $EXTRACT_ARGS --out "$OUT"
fi

# ---------------------------------------------------------------- 10. stage-2 training step benchmark
TRAIN_ARGS=${TRAIN_ARGS---quick}
if [ -n "$TRAIN_ARGS" ]; then
    T=$(left 50 85)
    # shellcheck disable=SC2086
    step "training step" train.log "$T" "$PY" bench/train_throughput.py $TRAIN_ARGS \
        --max-seconds $((T > 30 ? T - 25 : T / 2)) --out "$OUT"
fi

# ---------------------------------------------------------------- 11. loss benchmark (roofline column)
BENCH_ARGS=${BENCH_ARGS:---quick}
T=$(left 300 15)
# shellcheck disable=SC2086
step "loss sweep" bench.log "$T" "$PY" bench/loss_throughput.py $BENCH_ARGS \
    --max-seconds $((T > 60 ? T - 40 : T / 2)) --out "$OUT"

# ---------------------------------------------------------------- 12. results.json + summary.md
if [ -n "$RES_PID" ]; then
    wait "$RES_PID"
    cat "$OUT/.resources.tsv" >>"$STEPS" 2>/dev/null || printf 'kernel resources\tmissing\t0\t-\n' >>"$STEPS"
    rm -f "$OUT/.resources.tsv"
    grep -q $'^kernel resources\tok\t' "$STEPS" || FAILED+=("kernel resources")
fi
log "writing results.json and summary.md"
timeout 60 "$PY" - "$OUT" "$BUDGET" "$(elapsed)" <<'EOF' >>"$LOG" 2>&1 || log "ERROR: the summary failed (see $LOG)"
import glob, json, os, re, sys
import xml.etree.ElementTree as ET

out, budget, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def newest(pattern):
    paths = sorted(glob.glob(os.path.join(out, pattern)), key=os.path.getmtime)
    return paths[-1] if paths else None

steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, secs, logfile = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "seconds": int(secs), "log": logfile})

tests = []
if os.path.exists(os.path.join(out, "pytest.xml")):
    for case in ET.parse(os.path.join(out, "pytest.xml")).iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").strip().splitlines()
                break
        else:
            detail = []
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "detail": detail[0][:300] if detail else ""})

targets = []  # from the benchmarks' JSON ("targets") and the "<- target ...: PASS" lines of their logs
for path in glob.glob(os.path.join(out, "*.json")):
    if os.path.basename(path) in ("results.json", "kernel_resources.json"):
        continue
    doc = load(path)
    for t in (doc or {}).get("targets", []) if isinstance(doc, dict) else []:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}.get(t.get("pass"), str(t.get("pass")))
        what = t.get("target") or " ".join(f"{k}={t[k]}" for k in ("method", "dim", "batch") if k in t)
        targets.append({"source": os.path.basename(path), "target": what, "verdict": verdict,
                        "value": t.get("value", t.get("checks"))})
for s in steps:
    path = os.path.join(out, s["log"])
    if s["log"] == "-" or not os.path.exists(path) or path.endswith((".json", "gpu_check.log")):
        continue
    for line in open(path, errors="replace"):
        m = re.search(r"<-\s*(target|acceptance).*\b(PASS|FAIL)\b", line)
        if m:
            targets.append({"source": s["log"], "target": line.strip()[:200], "verdict": m.group(2)})

loss = []  # the newest single-device sweep and simulated run
runs = sorted(glob.glob(os.path.join(out, "loss_throughput-*.json")), key=os.path.getmtime)
sweep = [p for p in runs if "simW" not in p][-1:]
sim = [p for p in runs if "simW" in p][-1:]
for p in sweep + sim:
    doc = load(p) if p else None
    for r in (doc or {}).get("rows", []):
        if r.get("status") == "ok" and r.get("method", "").startswith("ours"):
            loss.append({k: r.get(k) for k in ("method", "world", "b", "B", "D", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                               "roofline_fwd_bwd_ms", "fwd_bwd_of_roofline", "fwd_bwd_tflops",
                                               "peak_extra_mib")})

resources = load(os.path.join(out, "kernel_resources.json"))
res_summary = resources["summary"] if resources else None
failed_steps = [s for s in steps if not s["status"].startswith("ok")]
failed_tests = [t for t in tests if t["outcome"] in ("failed", "error")]
doc = {"ok": not failed_steps and not failed_tests, "seconds": seconds, "budget_s": budget, "steps": steps,
       "tests": {"total": len(tests), "passed": sum(t["outcome"] == "passed" for t in tests),
                 "failed": len(failed_tests), "skipped": sum(t["outcome"] == "skipped" for t in tests), "cases": tests},
       "targets": targets, "loss": loss, "kernel_resources": resources}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(doc, f, indent=1)

md = [f"# GPU check: {'OK' if doc['ok'] else 'FAILED'} in {seconds} s (budget {budget} s)", ""]
versions = open(os.path.join(out, "gpu_check.log"), errors="replace").read()
m = re.search(r"^device .*$", versions, re.MULTILINE)
md += [f"Card: {m.group(0) if m else 'no CUDA device found'}", "", "## Steps", "", "| step | status | s |", "|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
t = doc["tests"]
md += ["", f"## GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", ""]
md += [f"- FAILED {c['test']}: {c['detail']}" for c in failed_tests] or ["(no failures)"]
md += ["", "<details><summary>every test</summary>", ""] + [f"- {c['outcome']}: {c['test']}" for c in tests]
md += ["", "</details>", "", "## Targets", ""]
md += [f"- {x['verdict']}: {x['target']} ({x['source']})" for x in targets] or ["(no target reported)"]
md += ["", "## Loss vs the roofline model (bench/roofline.py)", "",
       "| method | W | b | B | D | f+b ms | roofline ms | of roofline | TFLOP/s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
fmt = lambda v, s: "-" if v is None else format(v, s)
md += [f"| {r['method']} | {r.get('world') or 1} | {r['b']} | {r['B']} | {r['D']} | {fmt(r['fwd_bwd_ms'], '.2f')} | "
       f"{fmt(r['roofline_fwd_bwd_ms'], '.2f')} | {fmt(r['fwd_bwd_of_roofline'], '.0%')} | "
       f"{fmt(r['fwd_bwd_tflops'], '.0f')} | {fmt(r['peak_extra_mib'], '.0f')} |" for r in loss]
md += ["", "## Kernel resources (sm_90a, ptxas -v)", ""]
if res_summary:
    bad = res_summary["main_path_bad"]
    md += [f"{res_summary['triton_kernels_compiled']} Triton kernel x config compiles, {res_summary['errors']} errors, "
           f"{res_summary['spilling']} spilling ({len(bad)} on the main paths: {'PASS' if not bad else 'FAIL'}), "
           f"{res_summary['not_fitting']} not fitting shared memory; CUDA extension: {res_summary['cuda_ext_kernels']} "
           f"kernels, {res_summary['cuda_ext_spilling']} spilling.", ""]
    md += [f"- {x}" for x in bad]
    table = newest("kernel_resources-*.md")
    if table:
        md += ["", "<details><summary>per kernel x config</summary>", "", open(table).read(), "</details>"]
else:
    md += ["(no resource report: see kernel_resources.log)"]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("summary written:", os.path.join(out, "summary.md"))
EOF

if [ ${#FAILED[@]} -eq 0 ]; then
    log "ALL OK in $(elapsed)s"
    exit 0
fi
log "FAILED: ${FAILED[*]} ($(elapsed)s)"
exit 1
