"""The demo's report: ``<out>/report.md``, PNG plots and a printed summary, from the steps' own files.

Inputs (each optional: a missing one leaves its section out, so a partial run still reports):
``data/summary.json`` and ``zeroshot/summary.json`` (llm2clip.apps.demo.datasets), ``llm/conversion.json``,
``stage1/metrics.json`` (losses, cra_before / cra_after), ``stage2/<run>/metrics.json`` (losses),
``eval/<run>.json`` (llm2clip.eval --out: results.retrieval / results.zeroshot) and ``timings.json``
(the driver: each step's command, log and wall time).

The verdicts are computed, not written by hand: held-out R@10 against 5x chance in both directions,
CRA before vs after, and whether the stage-1 LLM's model beat the raw LLM's at R@10.
"""

from __future__ import annotations

import json
from pathlib import Path

RUNS = {"stage1_llm": "stage-1 LLM (CC LoRA)", "raw_llm": "raw LLM (no stage 1)"}
KS = (1, 5, 10)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(out: Path, timings: dict | None = None) -> dict:
    """Everything the report shows, as one dict (also written to <out>/summary.json)."""
    s: dict = {"timings": timings if timings is not None else (_load(out / "timings.json") or {})}
    s["data"] = _load(out / "data" / "summary.json")
    s["zeroshot_data"] = _load(out / "zeroshot" / "summary.json")
    s["llm"] = _load(out / "llm" / "conversion.json")
    st1 = _load(out / "stage1" / "metrics.json") or {}
    s["stage1"] = {k: st1.get(k) for k in ("cra_before", "cra_after", "losses", "pairs_per_s", "wall_time_s")}
    s["runs"] = {}
    for run in RUNS:
        train = _load(out / "stage2" / run / "metrics.json") or {}
        ev = (_load(out / "eval" / f"{run}.json") or {}).get("results", {})
        s["runs"][run] = {
            "losses": train.get("losses"),
            "samples_per_s": train.get("samples_per_s"),
            "retrieval": ev.get("retrieval"),
            "zeroshot": ev.get("zeroshot"),
        }
    s["verdicts"] = verdicts(s)
    return s


def verdicts(s: dict) -> dict:
    v: dict = {}
    cra0, cra1 = s["stage1"].get("cra_before"), s["stage1"].get("cra_after")
    if cra0 is not None and cra1 is not None:
        v["stage1_raised_cra"] = cra1 > cra0
    for run, r in s["runs"].items():
        ret = r.get("retrieval")
        if ret:
            v[f"{run}_r10_5x_chance"] = all(
                ret[f"{d}_R@10"] >= 5 * ret[f"{d}_chance_R@10"] for d in ("i2t", "t2i")
            )
            v[f"{run}_beats_chance"] = all(ret[f"{d}_R@10"] > ret[f"{d}_chance_R@10"] for d in ("i2t", "t2i"))
    a, b = s["runs"]["stage1_llm"].get("retrieval"), s["runs"]["raw_llm"].get("retrieval")
    if a and b:
        v["stage1_raised_r10"] = {d: a[f"{d}_R@10"] > b[f"{d}_R@10"] for d in ("i2t", "t2i")}
    return v


# ---------------------------------------------------------------------------------------------
# plots


def _plots(out: Path, s: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made = {}
    losses = s["stage1"].get("losses")
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(losses) + 1), losses, marker=".")
        ax.set(xlabel="step", ylabel="InfoNCE loss", title="Stage 1: caption-contrastive LoRA (SmolLM2-135M)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(pdir / "stage1_loss.png", dpi=110)
        plt.close(fig)
        made["stage1_loss"] = "plots/stage1_loss.png"
    if any(r.get("losses") for r in s["runs"].values()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run, label in RUNS.items():
            ls = s["runs"][run].get("losses")
            if ls:
                ax.plot(range(1, len(ls) + 1), ls, label=label)
        ax.set(xlabel="step", ylabel="contrastive loss", title="Stage 2: MobileNetV2 + adapter")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(pdir / "stage2_loss.png", dpi=110)
        plt.close(fig)
        made["stage2_loss"] = "plots/stage2_loss.png"
    runs = [(run, s["runs"][run]["retrieval"]) for run in RUNS if s["runs"][run].get("retrieval")]
    if runs:
        names = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / (len(runs) + 1)
        xs = range(len(names))
        for i, (run, ret) in enumerate(runs):
            vals = [100 * ret[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS]
            ax.bar([x + i * width for x in xs], vals, width, label=RUNS[run])
        chance = [100 * runs[0][1][f"{d}_chance_R@{k}"] for d in ("i2t", "t2i") for k in KS]
        ax.bar([x + len(runs) * width for x in xs], chance, width, label="chance", color="lightgray")
        ax.set_xticks([x + width * len(runs) / 2 for x in xs], names)
        ax.set(ylabel="recall (%)", title="Held-out retrieval (captions never seen in training)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(pdir / "recall.png", dpi=110)
        plt.close(fig)
        made["recall"] = "plots/recall.png"
    return made


# ---------------------------------------------------------------------------------------------
# text


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(s: dict) -> str:
    """Plain-text table: retrieval R@k (both directions) and zero-shot top-1 per run, beside chance."""
    rows = [f"{'metric':<16}" + "".join(f"{RUNS[r][:22]:>24}" for r in RUNS) + f"{'chance':>10}"]
    first = next((s["runs"][r]["retrieval"] for r in RUNS if s["runs"][r].get("retrieval")), None)
    for d in ("i2t", "t2i"):
        for k in KS:
            vals = [(s["runs"][r].get("retrieval") or {}).get(f"{d}_R@{k}") for r in RUNS]
            chance = first.get(f"{d}_chance_R@{k}") if first else None
            rows.append(
                f"{d + ' R@' + str(k):<16}" + "".join(f"{_pct(v):>24}" for v in vals) + f"{_pct(chance):>10}"
            )
    zs = [(s["runs"][r].get("zeroshot") or {}) for r in RUNS]
    if any(zs):
        chance = next((z.get("chance_top1") for z in zs if z), None)
        rows.append(
            f"{'zero-shot top1':<16}"
            + "".join(f"{_pct(z.get('top1')):>24}" for z in zs)
            + f"{_pct(chance):>10}"
        )
    st1 = s["stage1"]
    if st1.get("cra_before") is not None:
        rows.append(f"stage-1 CRA: {_pct(st1['cra_before'])} before -> {_pct(st1.get('cra_after'))} after")
    total = s["timings"].get("_total", {}).get("seconds")
    if total is not None:
        rows.append(f"total wall time: {total:.0f} s ({total / 60:.1f} min)")
    return "\n".join(rows)


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _verdict_lines(s: dict) -> list[str]:
    v, lines = s["verdicts"], []
    if "stage1_raised_cra" in v:
        st1 = s["stage1"]
        lines.append(
            f"- Stage 1 {'raised' if v['stage1_raised_cra'] else 'did NOT raise'} caption retrieval accuracy "
            f"(CRA, held-out caption -> its second phrasing, top-1): {_pct(st1['cra_before'])} -> "
            f"{_pct(st1['cra_after'])}."
        )
    for run, label in RUNS.items():
        if f"{run}_r10_5x_chance" in v:
            five, above = _yes(v[f"{run}_r10_5x_chance"]), _yes(v[f"{run}_beats_chance"])
            lines.append(
                f"- {label}: held-out R@10 >= 5x chance in both directions: {five}; above chance: {above}."
            )
    if "stage1_raised_r10" in v:
        up = v["stage1_raised_r10"]
        if all(up.values()):
            verdict = "raised held-out R@10 in both directions over the raw-LLM run"
        elif any(up.values()):
            verdict = "raised held-out R@10 in one direction only (" + ", ".join(d for d in up if up[d]) + ")"
        else:
            verdict = "did NOT raise held-out R@10 over the raw-LLM run in this run"
        lines.append(f"- Stage 1 {verdict}.")
    return lines


def _data_lines(s: dict) -> list[str]:
    lines = []
    d = s.get("data")
    if d:
        lines += ["## Data", ""]
        for src, c in d["sources"].items():
            lines.append(f"- {src}: {c['items']} images -> {c['train']} train, {c['heldout']} held-out")
        lines.append(
            f"- split by caption: {d['heldout_captions_in_train']} held-out caption texts occur in train; "
            f"{d['image_size']} px images; stage-1 CRA on {d.get('cra_pairs', '?')} held-out pairs"
        )
        ex = d.get("examples") or []
        if ex:
            lines.append(
                "- example pairs (txt / alt): " + "; ".join(f'"{e["txt"]}" / "{e["alt"]}"' for e in ex[:4])
            )
        lines.append("")
    z = s.get("zeroshot_data")
    if z:
        lines += [
            f"Zero-shot: Fashion-MNIST test subset, {z['images']} images ({z['preprocessing']}); class names "
            f"from {z['classnames_from']}; {len(z['templates'])} templates from {z['templates_from']}.",
            "",
        ]
    if s.get("llm"):
        c = s["llm"]
        lines += [
            f"LLM: SmolLM2-135M-Instruct from `{c['gguf']}` (Q4_1, dequantised to fp32 once: "
            f"GGUF load {c['load_gguf_s']} s, reload of the converted model {c['reload_s']} s).",
            "",
        ]
    return lines


def _step_lines(s: dict) -> list[str]:
    lines = ["## Steps (the commands to run each step yourself)", "",
             "`python` is the interpreter that ran the demo. Times are wall seconds on this machine; "
             "'skipped' steps were done by an earlier run.", ""]  # fmt: skip
    for name, t in s["timings"].items():
        if name.startswith("_"):
            continue
        took = "skipped (done earlier)" if t.get("skipped") else f"{t.get('seconds', 0):.0f} s"
        lines += [f"### {t.get('title', name)} — {took}", "", "```", t.get("command", ""), "```",
                  f"log: `{t.get('log', '')}`", ""]  # fmt: skip
    return lines


_OWN_DATA = [
    "## Your own data",
    "",
    "1. Write webdataset shards: one `<key>.jpg|png` + `<key>.txt` (caption) per sample, optionally a "
    "`<key>.json` with more captions (`llm2clip.data.shards.write_shard` does it from Python); hold "
    "out whole captions for evaluation.",
    "2. Stage 1 needs two captions of the same image: `--field-a txt --field-b json:<key>`, or "
    '`--pairs-jsonl` files of `{"a": ..., "b": ...}`.',
    "3. Extract with the stage-1 adapter (`--adapter RUN/adapter`) into a cache, train with "
    "`torchrun -m llm2clip.train --cache ...`, evaluate with `python -m llm2clip.eval` — the "
    "commands above, with your paths.",
    "",
]


def markdown(s: dict, plots: dict[str, str], preset_name: str) -> str:
    lines = [
        "# LLM2CLIP demo report",
        "",
        f"Preset: `{preset_name}`. Machine-made from the steps' output files; every number below was "
        "measured in this run.",
        "",
        "## Results",
        "",
        "```",
        summary_table(s),
        "```",
        "",
        *_verdict_lines(s),
        "",
    ]
    for key, title in (
        ("recall", "Held-out recall"),
        ("stage1_loss", "Stage 1 loss"),
        ("stage2_loss", "Stage 2 loss"),
    ):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    return "\n".join([*lines, *_data_lines(s), *_step_lines(s), *_OWN_DATA])


def write_report(out: Path, timings: dict | None = None, preset_name: str = "full") -> dict:
    """Write <out>/report.md, <out>/plots/*.png and <out>/summary.json; return the summary dict."""
    from llm2clip.files import atomic_write_json

    out = Path(out)
    s = collect(out, timings)
    plots = _plots(out, s)
    (out / "report.md").write_text(markdown(s, plots, preset_name), encoding="utf-8")
    atomic_write_json(out / "summary.json", s)
    return s
