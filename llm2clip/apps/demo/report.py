"""The demo's report: ``<out>/report.md``, PNG plots and a printed summary, from the steps' own files.

Inputs (each optional: a missing one leaves its section out, so a partial run still reports):
``data/summary.json`` and ``zeroshot/summary.json`` (llm2clip.apps.demo.datasets),
``llm/conversion.json`` and ``llm_gemma/conversion.json``, ``stage1/metrics.json`` (losses,
cra_before / cra_after), ``stage2/<run>/metrics.json`` (losses), ``eval/<run>.json`` (llm2clip.eval
--out: results.retrieval / results.zeroshot / results["multilingual/<folder>"]),
``bundle_check.json`` (llm2clip.apps.demo.bundle_check) and ``timings.json`` (the driver: each
step's command, log, wall and CPU time, load average).

The verdicts are computed, not written by hand: held-out R@10 against 5x chance in both directions,
CRA before vs after, whether the stage-1 LLM's model beat the raw LLM's at R@10, and per model the
languages whose text -> image R@10 is at least twice chance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm2clip.evaluation.metrics import DEFINITIONS, chance_of

RUNS = {"stage1_llm": "SmolLM2 + stage 1", "raw_llm": "SmolLM2 raw", "gemma_raw": "Gemma-3 raw"}
RUN_TITLES = {
    "stage1_llm": "stage-1 SmolLM2-135M",
    "raw_llm": "raw SmolLM2-135M",
    "gemma_raw": "raw Gemma-3-270M",
}
LLM_DIRS = {"llm": "SmolLM2-135M-Instruct", "llm_gemma": "Gemma-3-270M"}
KS = (1, 5, 10)
XL_KS = (1, 10)
# CLIP_benchmark's names (the cross-lingual set's protocol): text -> image and image -> text.
XL_METRICS = {"t2i": "image_retrieval_recall@{k}", "i2t": "text_retrieval_recall@{k}"}
XL_DIRECTIONS = {"t2i": "text -> image", "i2t": "image -> text"}
SCRIPTS = {"ru": "Cyrillic", "uk": "Cyrillic", "el": "Greek", "ja": "Japanese", "ko": "Hangul",
           "zh_CN": "Chinese", "zh_TW": "Chinese", "ar": "Arabic", "he": "Hebrew"}  # fmt: skip


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(out: Path, timings: dict | None = None, languages=None) -> dict:
    """Everything the report shows, as one dict (also written to <out>/summary.json)."""
    s: dict = {"timings": timings if timings is not None else (_load(out / "timings.json") or {})}
    s["data"] = _load(out / "data" / "summary.json")
    s["zeroshot_data"] = _load(out / "zeroshot" / "summary.json")
    s["llm"] = _load(out / "llm" / "conversion.json")
    s["llms"] = {d: c for d in LLM_DIRS if (c := _load(out / d / "conversion.json"))}
    s["bundle_check"] = _load(out / "bundle_check.json")
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
            "crosslingual": next((v for k, v in ev.items() if k.startswith("multilingual/")), None),
        }
    s["crosslingual"] = crosslingual(s, languages)
    s["verdicts"] = verdicts(s)
    return s


def crosslingual(s: dict, languages=None) -> dict | None:
    """The cross-lingual results of every run, as {languages, rows, runs, dataset, ...}: one row per
    language with images, captions, script, each run's R@1 / R@10 both ways, and chance."""
    runs = {run: r["crosslingual"] for run, r in s["runs"].items() if r.get("crosslingual")}
    if not runs:
        return None
    first = next(iter(runs.values()))
    found = list(first["languages"])
    langs = [lang for lang in (languages or found) if lang in found] or found
    rows = []
    for lang in langs:
        r = first["languages"][lang]
        row = {
            "language": lang,
            "script": SCRIPTS.get(lang, "Latin"),
            "images": r.get("N"),
            "captions": r.get("M"),
        }
        for d in XL_METRICS:
            for k in XL_KS:
                name = XL_METRICS[d].format(k=k)
                row[f"chance_{d}_R@{k}"] = chance_of(r, name)
                for run, res in runs.items():
                    row[f"{run}_{d}_R@{k}"] = (res["languages"].get(lang) or {}).get(name)
        rows.append(row)
    return {
        "dataset": first.get("dataset"),
        "split": first.get("split"),
        "protocol": first.get("protocol"),
        "images": first.get("N"),
        # The per-language metrics' definitions (the evaluation's multilingual result lists only N and
        # chance at its top level), then the result's own.
        "definitions": {
            **{name.format(k="k"): DEFINITIONS[name.format(k="k")] for name in XL_METRICS.values()},
            **(first.get("definitions") or {}),
        },
        "languages": langs,
        "runs": list(runs),
        "rows": rows,
    }


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
    xl = s.get("crosslingual")
    if xl:
        others = [row for row in xl["rows"] if row["language"] != "en"]
        for run in xl["runs"]:
            got = [row for row in others if row[f"{run}_t2i_R@10"] is not None]
            v[f"{run}_xl_2x_chance"] = [
                row["language"] for row in got if row[f"{run}_t2i_R@10"] >= 2 * row["chance_t2i_R@10"]
            ]
            v[f"{run}_xl_mean_t2i_R@10"] = sum(row[f"{run}_t2i_R@10"] for row in got) / max(len(got), 1)
        v["xl_mean_chance_t2i_R@10"] = sum(row["chance_t2i_R@10"] for row in others) / max(len(others), 1)
        v["xl_languages"] = [row["language"] for row in others]
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
    xl = s.get("crosslingual")
    if xl:
        langs = xl["languages"]
        fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
        width = 0.8 / len(xl["runs"])
        for ax, (d, k) in zip(axes.flat, [(d, k) for d in XL_METRICS for k in XL_KS], strict=True):
            for i, run in enumerate(xl["runs"]):
                vals = [100 * (row[f"{run}_{d}_R@{k}"] or 0) for row in xl["rows"]]
                ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(langs))], vals, width, label=RUNS[run])
            chance = [100 * row[f"chance_{d}_R@{k}"] for row in xl["rows"]]
            ax.hlines(chance, [x - 0.45 for x in range(len(langs))], [x + 0.45 for x in range(len(langs))],
                      colors="black", linestyles="dashed", linewidth=1, label="chance")  # fmt: skip
            ax.axvline(0.5, color="gray", linewidth=0.8)  # English | the translations
            ax.set_title(f"{XL_DIRECTIONS[d]} R@{k}", fontsize=10)
            ax.set_ylabel("recall (%)")
            ax.grid(axis="y", alpha=0.3)
        for ax in axes[-1]:
            ax.set_xticks(range(len(langs)), langs)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Held-out retrieval per caption language (stage 2 trained on English captions only)")
        fig.tight_layout()
        fig.savefig(pdir / "crosslingual.png", dpi=110)
        plt.close(fig)
        made["crosslingual"] = "plots/crosslingual.png"
    return made


# ---------------------------------------------------------------------------------------------
# text


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _present(s: dict) -> list[str]:
    """The runs with results (the Gemma run only exists with --gemma)."""
    return [r for r in RUNS if any(s["runs"].get(r, {}).get(k) for k in ("retrieval", "losses"))] or list(
        RUNS
    )[:2]


def summary_table(s: dict) -> str:
    """Plain-text table: held-out retrieval R@k (both directions) and zero-shot top-1 per run, beside
    chance; cross-lingual text -> image R@10 per language; stage-1 CRA; times and machine load."""
    runs = _present(s)
    rows = ["held-out retrieval (English captions never seen in training; llm2clip protocol)"]
    rows.append(f"{'metric':<16}" + "".join(f"{RUNS[r][:20]:>21}" for r in runs) + f"{'chance':>10}")
    first = next((s["runs"][r]["retrieval"] for r in runs if s["runs"][r].get("retrieval")), None)
    for d in ("i2t", "t2i"):
        for k in KS:
            vals = [(s["runs"][r].get("retrieval") or {}).get(f"{d}_R@{k}") for r in runs]
            chance = first.get(f"{d}_chance_R@{k}") if first else None
            rows.append(
                f"{d + ' R@' + str(k):<16}" + "".join(f"{_pct(v):>21}" for v in vals) + f"{_pct(chance):>10}"
            )
    zs = [(s["runs"][r].get("zeroshot") or {}) for r in runs]
    if any(zs):
        chance = next((z.get("chance_top1") for z in zs if z), None)
        rows.append(
            f"{'zero-shot top1':<16}"
            + "".join(f"{_pct(z.get('top1')):>21}" for z in zs)
            + f"{_pct(chance):>10}"
        )
    xl = s.get("crosslingual")
    if xl:
        rows.append(
            f"cross-lingual text->image R@10 ({xl['dataset']}, {xl['images']} held-out images; "
            "CLIP_benchmark protocol; trained on English only)"
        )
        rows.append(
            f"{'language':<16}" + "".join(f"{RUNS[r][:20]:>21}" for r in xl["runs"]) + f"{'chance':>10}"
        )
        for row in xl["rows"]:
            vals = [row[f"{r}_t2i_R@10"] for r in xl["runs"]]
            label = f"{row['language']} ({row['images']})"
            rows.append(
                f"{label:<16}"
                + "".join(f"{_pct(v):>21}" for v in vals)
                + f"{_pct(row['chance_t2i_R@10']):>10}"
            )
    st1 = s["stage1"]
    if st1.get("cra_before") is not None:
        rows.append(f"stage-1 CRA: {_pct(st1['cra_before'])} before -> {_pct(st1.get('cra_after'))} after")
    rows += _time_lines(s["timings"])
    return "\n".join(rows)


def _time_lines(timings: dict) -> list[str]:
    total = timings.get("_total", {}).get("seconds")
    if total is None:
        return []
    steps = [t for name, t in timings.items() if not name.startswith("_") and not t.get("skipped")]
    cpu = sum(t.get("cpu_seconds") or 0 for t in steps)
    loads = [x for t in steps for x in (t.get("load_avg") or [])]
    line = f"total wall time: {total:.0f} s ({total / 60:.1f} min)"
    if cpu:
        line += f"; CPU time of the steps {cpu:.0f} s"
    if loads:
        line += f"; 1-min load average {min(loads):.1f}..{max(loads):.1f} ({os.cpu_count()} cores)"
    return [line]


def _yes(flag) -> str:
    return "yes" if flag else "no"


def _verdict_lines(s: dict) -> list[str]:
    v, lines = s["verdicts"], []
    labels = {r: RUNS[r] for r in _present(s)}
    if "stage1_raised_cra" in v:
        st1 = s["stage1"]
        lines.append(
            f"- Stage 1 {'raised' if v['stage1_raised_cra'] else 'did NOT raise'} caption retrieval accuracy "
            f"(CRA, held-out caption -> its second phrasing, top-1): {_pct(st1['cra_before'])} -> "
            f"{_pct(st1['cra_after'])}."
        )
    for run, label in labels.items():
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
    xl = s.get("crosslingual")
    if xl:
        n = len(v["xl_languages"])
        chance = _pct(v["xl_mean_chance_t2i_R@10"])
        for run in xl["runs"]:
            above = v[f"{run}_xl_2x_chance"]
            lines.append(
                f"- {RUNS[run]}, cross-lingual: text -> image R@10 >= 2x chance in {len(above)} of {n} other "
                f"languages ({', '.join(above) or 'none'}); mean over them "
                f"{_pct(v[f'{run}_xl_mean_t2i_R@10'])} (chance {chance})."
            )
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
    for folder, name in LLM_DIRS.items():
        c = (s.get("llms") or {}).get(folder)
        if not c:
            continue
        quant = c.get("quantization", "Q4_1")
        sha = str(c.get("gguf_sha256"))[:12]
        line = (
            f"LLM `{folder}/`: {name} from `{c['gguf']}` ({quant}, sha256 {sha}..., dequantised to fp32 "
            f"once: GGUF load {c['load_gguf_s']} s, reload of the converted model {c['reload_s']} s)"
        )
        if c.get("params"):
            line += f"; {c['params'] / 1e6:.0f}M parameters, {c.get('layers')} layers, "
            line += f"width {c.get('hidden_size')}"
        tok = c.get("tokenizer")
        if tok:
            line += f"; '{tok['example']}' tokenizes as {' '.join(tok['example_tokens'])}"
        checks = c.get("check") or []
        if checks:
            line += "; greedy next token: " + ", ".join(
                f"'{x['prompt']}' -> '{x['next_token']}'" for x in checks
            )
        lines += [line + ".", ""]
    return lines


def _crosslingual_lines(s: dict, plots: dict[str, str]) -> list[str]:
    xl = s.get("crosslingual")
    if not xl:
        return []
    d = s.get("data") or {}
    tr = d.get("translations") or {}
    runs = xl["runs"]
    lines = [
        "## Cross-lingual retrieval (stage 2 trained on English captions only)",
        "",
        f"Dataset `{xl['dataset']}` (`data/{xl['dataset']}/`, the XM3600 layout): the {xl['images']} "
        "held-out Tux Paint stamps (split: held out by English caption, never trained on) with the "
        "translations their own `.txt` files carry; the models only ever saw English captions. Each "
        f"language is scored on the images that have a caption in it ({xl['protocol']} protocol, one "
        "caption per image and language). Evaluated by `python -m llm2clip.eval --xm3600 ... "
        "--languages ...` (the eval steps below), each caption embedded by the model's own LLM.",
        "",
    ]
    for direction, title in XL_DIRECTIONS.items():
        head = ["language", "script", "images", "captions"]
        head += [f"{RUNS[r]} R@{k}" for r in runs for k in XL_KS] + [f"chance R@{k}" for k in XL_KS]
        lines += [f"{title} (query: {'a caption' if direction == 't2i' else 'an image'}):", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in xl["rows"]:
            cells = [f"**{row['language']}**" if row["language"] == "en" else row["language"], row["script"],
                     str(row["images"]), str(row["captions"])]  # fmt: skip
            cells += [_pct(row[f"{r}_{direction}_R@{k}"]) for r in runs for k in XL_KS]
            cells += [_pct(row[f"chance_{direction}_R@{k}"]) for k in XL_KS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "crosslingual" in plots:
        lines += [f"![Cross-lingual recall]({plots['crosslingual']})", ""]
    langs = tr.get("languages") or {}
    same = [
        f"{lang} {langs[lang]['same_as_english']}"
        for lang in xl["languages"]
        if langs.get(lang, {}).get("same_as_english")
    ]
    if langs:
        distinct = ", ".join(
            f"{lang} {langs[lang]['distinct']}/{langs[lang]['captions']}"
            for lang in xl["languages"]
            if lang in langs
        )
        lines += [
            f"Distinct captions per language (after lower-casing and dropping punctuation): {distinct}. "
            f"Translations equal to the English caption: {', '.join(same) or 'none'}. Latin-script "
            'translations share names and cognates with English ("Adelaide Rosella"), so their recall '
            "mixes token overlap with transfer; Cyrillic, Japanese and Chinese captions share no "
            "script with the training captions.",
            "",
        ]
    defs = xl.get("definitions") or {}
    if defs:
        lines += ["Definitions (from the evaluation's output):", ""]
        lines += [f"- `{k}`: {v}" for k, v in defs.items()]
        lines.append("")
    return lines


def _bundle_lines(s: dict) -> list[str]:
    b = s.get("bundle_check")
    if not b:
        return []
    lines = [
        "## Use the trained model",
        "",
        "Every run's `final/` is a bundle: the tower, the adapter and the recipe of the LLM it was trained "
        "against. Three lines load it and encode images (PIL) and captions (run by the last step below):",
        "",
        "```python",
        b["bundles"][0]["snippet"],
        "```",
        "",
        "`python -m llm2clip.export --checkpoint DIR --format bundle --out OUT` makes a bundle of any "
        "checkpoint (`--format hf|open_clip|timm` exports the tower for those libraries).",
        "",
    ]
    for r in b["bundles"]:
        lines.append(
            f"- `{r['bundle']}` (LLM `{r.get('llm')}`): loaded in {r['load_s']} s; {r['images']} held-out "
            f"images and their captions -> {r['dim']}-d L2-normalised features; among those "
            f"{r['images']} captions, the image's own ranks first for {r.get('own_caption_first')} of "
            f"them (1 expected by chance); cosine to its own caption {r.get('own_caption_cosine')}, "
            f"{r.get('other_caption_cosine')} to the others on average."
        )
    lines.append("")
    return lines


def _step_lines(s: dict) -> list[str]:
    lines = ["## Steps (the commands to run each step yourself)", "",
             "`python` is the interpreter that ran the demo. Times are wall seconds on this machine, with "
             "the CPU seconds the step's processes used and the 1-minute load average at its start and "
             "end (other jobs on the machine stretch wall times); 'skipped' steps were done by an earlier "
             "run.", ""]  # fmt: skip
    for name, t in s["timings"].items():
        if name.startswith("_"):
            continue
        took = "skipped (done earlier)" if t.get("skipped") else f"{t.get('seconds', 0):.0f} s"
        if not t.get("skipped") and t.get("cpu_seconds") is not None:
            load = t.get("load_avg") or []
            took += f" (CPU {t['cpu_seconds']:.0f} s, load {' -> '.join(f'{x:.1f}' for x in load)})"
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
    parts = [*_crosslingual_lines(s, plots), *_bundle_lines(s), *_data_lines(s), *_step_lines(s), *_OWN_DATA]
    return "\n".join([*lines, *parts])


def write_report(out: Path, timings: dict | None = None, preset_name: str = "full", languages=None) -> dict:
    """Write <out>/report.md, <out>/plots/*.png and <out>/summary.json; return the summary dict.
    languages: the cross-lingual table's languages, in order (default: the evaluation's)."""
    from llm2clip.files import atomic_write_json

    out = Path(out)
    s = collect(out, timings, languages)
    plots = _plots(out, s)
    (out / "report.md").write_text(markdown(s, plots, preset_name), encoding="utf-8")
    atomic_write_json(out / "summary.json", s)
    return s
