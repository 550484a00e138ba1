"""The GPU check's last step: OUT_DIR/results.json and OUT_DIR/summary.md from what
bench/gpu_check.sh left in OUT_DIR (steps.tsv, pytest.xml, the benchmarks' JSON, the resource
report).

    python bench/gpu_summary.py OUT_DIR BUDGET_S SECONDS
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as bench/gpu_summary.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

LOSS_FIELDS = tuple("method world b B D fwd_ms bwd_ms fwd_bwd_ms roofline_fwd_bwd_ms fwd_bwd_of_roofline "
                    "fwd_bwd_tflops peak_extra_mib".split())  # fmt: skip
DECODE_FIELDS = (
    "short_side", "images", "pil_per_s", "draft_per_s", "draft_speedup",
    "nvjpeg_per_s", "nvjpeg_mae_worst", "nvjpeg_psnr_min",
)  # fmt: skip
BREAKDOWN_FIELDS = tuple("model batch chunk step_ms loss_ms gather_ms gather_device_ms data_ms data_passes "
                         "data_workers decode_per_worker_per_s decode_ms data_wait_ms workers_keep_up "
                         "workers_needed parts_ms fraction decode_source".split())  # fmt: skip


# fmt: off
LOSS_COLUMNS = [
    ("method", "method", ""), ("W", lambda r: r["world"] or 1, "d"), ("b", "b", "d"), ("B", "B", "d"),
    ("D", "D", "d"),
    ("f+b ms", "fwd_bwd_ms", ".2f"), ("roofline ms", "roofline_fwd_bwd_ms", ".2f"),
    ("of roofline", "fwd_bwd_of_roofline", ".0%"), ("TFLOP/s", "fwd_bwd_tflops", ".0f"),
    ("peak MiB", "peak_extra_mib", ".0f"),
]
DECODE_COLUMNS = [
    ("JPEG shorter side", "short_side", "d"), ("pil (1 core)", "pil_per_s", ".0f"),
    ("draft (1 core)", "draft_per_s", ".0f"), ("draft / pil", "draft_speedup", ".2f"),
    ("nvJPEG (GPU)", "nvjpeg_per_s", ".0f"), ("nvJPEG MAE vs pil", "nvjpeg_mae_worst", ".2f"),
    ("nvJPEG PSNR vs pil", "nvjpeg_psnr_min", ".1f"),
]
# fmt: on


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return None


def newest(out: str, pattern: str, exclude: str | None = None) -> str | None:
    paths = [p for p in glob.glob(os.path.join(out, pattern)) if not exclude or exclude not in p]
    return max(paths, key=os.path.getmtime) if paths else None


def tests_of(path: str) -> list[dict]:
    """Every test case of a JUnit XML file with its outcome."""
    tests = []
    for case in ET.parse(path).iter("testcase") if os.path.exists(path) else ():
        outcome, detail = "passed", []
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, detail = name, (node.get("message") or "").strip().splitlines()
                break
        test = f"{case.get('classname')}::{case.get('name')}"
        detail = detail[0][:300] if detail else ""
        tests.append(
            {"test": test, "outcome": outcome, "seconds": float(case.get("time") or 0), "detail": detail}
        )
    return tests


def targets_of(out: str) -> list[dict]:
    """Every verdict in the benchmarks' JSON ("targets": target, value, pass)."""
    targets = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        doc = load(path) if os.path.basename(path) not in ("results.json", "kernel_resources.json") else None
        for t in doc.get("targets", []) if isinstance(doc, dict) else []:
            verdict = common.VERDICT.get(t.get("pass"), str(t.get("pass")))
            targets.append({"source": os.path.basename(path), "target": t.get("target"), "verdict": verdict,
                            "value": t.get("value"), "note": t.get("note")})  # fmt: skip
    return targets


def summarize(out: str, budget: int, seconds: int) -> dict:
    steps = []
    with open(os.path.join(out, "steps.tsv")) as f:
        for line in f:
            name, status, secs, logfile = line.rstrip("\n").split("\t")
            steps.append({"step": name, "status": status, "seconds": int(secs), "log": logfile})
    tests = tests_of(os.path.join(out, "pytest.xml"))
    loss = []  # the newest single-device sweep and simulated run: our rows
    for path in (newest(out, "loss_throughput-*.json", "simW"), newest(out, "loss_throughput-*simW*.json")):
        for r in (load(path) or {}).get("rows", []):
            if r.get("status") == "ok" and r.get("method", "").startswith("ours"):
                loss.append({k: r.get(k) for k in LOSS_FIELDS})
    data = load(newest(out, "data_throughput-*.json")) or {}
    decode = [{k: r.get(k) for k in DECODE_FIELDS} for r in data.get("rows", []) if r.get("part") == "decode"]
    train = load(newest(out, "train_throughput-*.json")) or {}
    breakdown = [
        {k: r.get(k) for k in BREAKDOWN_FIELDS} for r in train.get("rows", []) if r.get("kind") == "breakdown"
    ]
    failed_steps = [s for s in steps if not s["status"].startswith("ok")]
    failed_tests = [t for t in tests if t["outcome"] in ("failed", "error")]
    return {
        "ok": not failed_steps and not failed_tests,
        "seconds": seconds,
        "budget_s": budget,
        "steps": steps,
        "tests": {
            "total": len(tests),
            "passed": sum(t["outcome"] == "passed" for t in tests),
            "failed": len(failed_tests),
            "skipped": sum(t["outcome"] == "skipped" for t in tests),
            "cases": tests,
        },
        "targets": targets_of(out),
        "loss": loss,
        "data": {"decode": decode, "device": (data.get("meta") or {}).get("device_name")},
        "breakdown": breakdown,
        "kernel_resources": load(os.path.join(out, "kernel_resources.json")),
    }


def markdown(doc: dict, out: str) -> str:
    md = [
        f"# GPU check: {'OK' if doc['ok'] else 'FAILED'} in {doc['seconds']} s (budget {doc['budget_s']} s)",
        "",
    ]
    log = open(os.path.join(out, "gpu_check.log"), errors="replace").read()
    m = re.search(r"^device .*$", log, re.MULTILINE)
    md += [
        f"Card: {m.group(0) if m else 'no CUDA device found'}",
        "",
        "## Steps",
        "",
        "| step | status | s |",
        "|---|---|---|",
    ] + [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in doc["steps"]]
    t = doc["tests"]
    failed = [c for c in t["cases"] if c["outcome"] in ("failed", "error")]
    md += ["", f"## GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", ""]
    md += [f"- FAILED {c['test']}: {c['detail']}" for c in failed] or ["(no failures)"]
    md += ["", "<details><summary>every test</summary>", ""] + [
        f"- {c['outcome']}: {c['test']}" for c in t["cases"]
    ]
    md += ["", "</details>", "", "## Targets", ""]
    md += [
        f"- {x['verdict']}: {x['target']}: {x['value']:{'.4g' if isinstance(x['value'], float) else ''}}"
        + (f" ({x['note']})" if x.get("note") else "")
        + f" ({x['source']})"
        for x in doc["targets"]
    ] or ["(no target reported)"]
    md += [
        "",
        "## Loss vs the roofline model (bench/roofline.py)",
        "",
        common.table(doc["loss"], LOSS_COLUMNS, md=True),
    ]
    md += ["", f"## Data path: decoded + augmented samples/s to 224 px ({doc['data']['device']})", ""]
    md += [common.table(doc["data"]["decode"], DECODE_COLUMNS, md=True)]
    md += ["", "## Training step breakdown (bench/train_throughput.py)", ""]
    for r in doc["breakdown"]:
        if r["fraction"] is None:
            md.append(f"- {r['model']} b={r['batch']}: not measured")
            continue
        md.append(
            f"- {r['model']} b={r['batch']}: step {r['step_ms']:.1f} ms; loss {r['loss_ms']:.2f} ms, gather "
            f"{r['gather_ms']:.2f} ms, data receive {r['data_ms']:.2f} ms x {r['data_passes']}, loader wait "
            f"{common.fmt(r['data_wait_ms'], '.1f')} ms ({r['data_workers']} workers x "
            f"{common.fmt(r['decode_per_worker_per_s'], '.0f')} samples/s: "
            f"{common.fmt(r['decode_ms'], '.1f')} ms a batch, "
            f"{common.fmt(r['workers_needed'], '')} needed) -> {r['fraction']:.2%} of the step"
        )
    md += ["", "## Kernel resources (sm_90a, ptxas -v)", ""]
    res = (doc["kernel_resources"] or {}).get("summary")
    if not res:
        return "\n".join(md + ["(no resource report: see kernel_resources.log)"]) + "\n"
    bad = res["main_path_bad"]
    md += [
        f"{res['triton_kernels_compiled']} Triton kernel x config compiles, {res['errors']} errors, "
        f"{res['spilling']} spilling ({len(bad)} on the main paths: {'PASS' if not bad else 'FAIL'}), "
        f"{res['not_fitting']} not fitting shared memory; CUDA extension: {res['cuda_ext_kernels']} kernels, "
        f"{res['cuda_ext_spilling']} spilling.",
        "",
    ] + [f"- {x}" for x in bad]
    table = newest(out, "kernel_resources-*.md")
    if table:
        md += ["", "<details><summary>per kernel x config</summary>", "", open(table).read(), "</details>"]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    out, budget, seconds = (argv or sys.argv[1:])[:3]
    doc = summarize(out, int(budget), int(seconds))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(doc, out))
    print("summary written:", os.path.join(out, "summary.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
