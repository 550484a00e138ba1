"""Every entry point meets user errors with one line and exit status 2, never a traceback
(``--debug`` / ``LLM2CLIP_DEBUG=1`` shows it), and refuses non-finite float options at parse time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip.cli import UsageError, finite_float, run

REPO = Path(__file__).resolve().parent.parent


def _start(module: str, *argv, debug: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLM2CLIP_DEBUG": "1" if debug else ""}
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, argv)], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_user_errors_exit_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"a": "x", "b": "y"}\n')
    cases = {  # started together: each pays the interpreter's start-up once, in parallel
        "extract model": (
            _start("llm2clip.extract", "--shards", tmp_path, "--out", tmp_path / "c", "--model", missing),
            f"--model {missing}: no such file or directory",
        ),
        "extract field": (
            _start("llm2clip.extract", "--shards", tmp_path, "--out", tmp_path / "c", "--model", tmp_path,
                   "--fields", "=txt"),
            "bad caption field '=txt'",
        ),
        "train lr": (
            _start("llm2clip.train", "--train-shards", tmp_path, "--cache", tmp_path, "--output-dir",
                   tmp_path / "r", "--lr", "nan"),
            "argument --lr: 'nan' is not a finite number",
        ),
        "eval checkpoint": (
            _start("llm2clip.eval", "--checkpoint", tmp_path / "none", "--retrieval-shards", tmp_path,
                   "--eval-cache", tmp_path),
            "is not a checkpoint directory",
        ),
        "stage1 model": (
            _start("llm2clip.stage1", "--model", missing, "--output-dir", tmp_path / "s",
                   "--pairs-jsonl", jsonl),
            f"--model {missing}: no such file or directory",
        ),
        "debug": (
            _start("llm2clip.extract", "--shards", tmp_path, "--out", tmp_path / "c", "--model", missing,
                   debug=True),
            "Traceback",
        ),
    }  # fmt: skip
    for name, (proc, expected) in cases.items():
        _, err = proc.communicate(timeout=240)
        print(name, proc.returncode, err[-600:])
        assert proc.returncode == 2, name
        assert expected in err, name
        if name != "debug":
            assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, name


def test_run_maps_failures_to_exit_codes(capsys):
    def user(argv):
        raise UsageError("bad flag")

    def stopped(argv):
        raise FloatingPointError("step 3: loss nan")

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    for fn, code in ((user, 2), (stopped, 1)):
        with pytest.raises(SystemExit) as e:
            run(fn, "llm2clip.x", [])
        assert e.value.code == code
    err = capsys.readouterr().err
    assert "llm2clip.x: error: bad flag" in err and "llm2clip.x: error: step 3: loss nan" in err
    with pytest.raises(KeyError):
        run(bug, "llm2clip.x", [])


def test_finite_float():
    assert finite_float("1e-5") == 1e-5
    for bad in ("nan", "inf", "-inf", "x"):
        with pytest.raises(Exception, match="not a"):
            finite_float(bad)
