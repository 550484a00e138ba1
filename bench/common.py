"""Helpers shared by the benchmark scripts in bench/: run metadata, output files, table cells,
plots, timing, matmul rate, OOM detection and imports from a plain checkout.

The scripts import this as ``bench.common``; run as ``python bench/<name>.py`` they first put the
repository root on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80

# ----------------------------------------------------------------------------- imports


def import_kernels():
    """Import llm2clip_kernels; from a plain checkout (not pip-installed) load it from kernels/."""
    try:
        return importlib.import_module("llm2clip_kernels")
    except ImportError:
        init = REPO_ROOT / "kernels" / "__init__.py"
        if not init.exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "llm2clip_kernels", init, submodule_search_locations=[str(init.parent)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["llm2clip_kernels"] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop("llm2clip_kernels", None)
            raise
        return mod


# ----------------------------------------------------------------------------- run metadata


def utc_timestamp() -> str:
    """Now in UTC, ISO 8601 to the second (the JSON's "timestamp")."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_stamp() -> str:
    """Local time as YYYYmmdd-HHMMSS, the last word of the output file names."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def loadavg():
    """os.getloadavg(), or None where the platform has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def git(*a) -> str | None:
    """stdout of `git *a` in the repository, or None when git fails."""
    try:
        out = subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_meta() -> dict:
    """{"git_sha", "git_dirty"} of the checkout (None where git is unavailable)."""
    status = git("status", "--porcelain")
    return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def triton_version() -> str | None:
    """triton.__version__, or None when triton is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_meta(device: str) -> dict:
    """The card: {"device_name", "cuda"} on CUDA, {"device_name", "cpu_threads"} on CPU."""
    import torch

    if device == "cuda":
        return {"device_name": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return {"device_name": cpu_name(), "cpu_threads": torch.get_num_threads()}


def config_of(args) -> dict:
    """The resolved argparse namespace as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------- output files


def card_tag(device_name: str, fallback: str) -> str:
    """A card name reduced to a file-name word: alphanumerics, '-' for the rest, at most 40."""
    return "".join(c if c.isalnum() else "-" for c in device_name).strip("-")[:40] or fallback


def result_stem(*words) -> str:
    """Output file stem: the non-empty words joined with '-'."""
    return "-".join(str(w) for w in words if w)


def write_json_atomic(path: Path, doc) -> None:
    """Write doc as indented JSON through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tables


def fmt(v, spec: str) -> str:
    """format(v, spec), or '-' right-aligned to the spec's width when v is None."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def str_list(s: str) -> tuple[str, ...]:
    """argparse type: 'a,b c' -> ('a', 'b', 'c')."""
    return tuple(x for x in s.replace(",", " ").split() if x)


def int_list(s: str) -> tuple[int, ...]:
    """argparse type: '1,2 3' -> (1, 2, 3)."""
    return tuple(int(x) for x in str_list(s))


def add_device_arg(p, help: str = "auto: cuda when available") -> None:
    """--device auto|cuda|cpu (default auto), resolved later by :func:`resolve_device`."""
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help=help)


def add_output_args(
    p, out_help: str, tag_help: str = "extra word in the output file names", plot=True
) -> None:
    """--out (default bench/results), --tag and, with plot, --no-plot."""
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=out_help)
    p.add_argument("--tag", default=None, help=tag_help)
    if plot:
        p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")


# ----------------------------------------------------------------------------- plots


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no plot written (pip install matplotlib)")
        return None
    return plt


def style_log_axes(ax, xlabel: str, ylabel: str) -> None:
    """log2 x, log y, labels, a light grid on both tick levels and a small legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, tight layout, 120 dpi PNG at path, and close the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- devices and memory


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; exits when cuda is asked for and missing."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return device


def _oom_types() -> tuple:
    import torch

    types = [torch.cuda.OutOfMemoryError]
    with contextlib.suppress(Exception):
        from triton.runtime.errors import OutOfResources

        types.append(OutOfResources)
    return tuple(types)


def is_oom(exc: BaseException) -> bool:
    """Whether exc is an out-of-memory error (host, CUDA, cuBLAS workspace or Triton resources)."""
    if isinstance(exc, (MemoryError, *_oom_types())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg or "out of resource" in msg
    )


def free_memory(device: str) -> None:
    """Collect garbage and, on CUDA, hand cached blocks back to the driver."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def sync(device: str) -> None:
    """torch.cuda.synchronize() on CUDA; nothing on CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def clear_grads(tensors) -> None:
    """Drop the .grad of every tensor."""
    for x in tensors:
        x.grad = None


# ----------------------------------------------------------------------------- timing


def ms_quantiles(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of durations in seconds (nearest-rank percentiles)."""
    xs = sorted(s * 1e3 for s in seconds)
    q = lambda p: xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]
    return statistics.median(xs), q(0.2), q(0.8)


def ms_fields(name: str, triple) -> dict:
    """{name_ms, name_ms_p20, name_ms_p80} from a (median, p20, p80) triple in ms."""
    return dict(zip((f"{name}_ms", f"{name}_ms_p20", f"{name}_ms_p80"), triple))


def do_bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None):
    """(median, p20, p80) ms of fn() on the GPU from triton.testing.do_bench."""
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES, grad_to_none=grad_to_none
    )


def do_bench_fwd_bwd(forward, backward, leaves, warmup_ms: float, rep_ms: float) -> dict:
    """fwd_ms*, bwd_ms* and fwd_bwd_ms* fields (median, p20, p80) from do_bench.

    forward() returns the output; backward(out, **kw) back-propagates it. Backward is timed on one
    retained graph, so the forward stays outside its timing; the grads of `leaves` are reset to
    None before every repetition and left None at the end.
    """
    kw = {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "grad_to_none": leaves}
    row = ms_fields("fwd", do_bench_ms(forward, **kw))
    out = forward()
    row.update(ms_fields("bwd", do_bench_ms(lambda: backward(out, retain_graph=True), **kw)))
    out = None  # drop the retained graph before timing forward+backward
    clear_grads(leaves)
    row.update(ms_fields("fwd_bwd", do_bench_ms(lambda: backward(forward()), **kw)))
    clear_grads(leaves)
    return row


def perf_fwd_bwd(forward, backward):
    """One forward and backward timed with time.perf_counter: (output, fwd seconds, bwd seconds)."""
    t0 = time.perf_counter()
    out = forward()
    t1 = time.perf_counter()
    backward(out)
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def matmul_rate(device: str, dtype, label: str) -> dict:
    """Dense torch.mm rate: n = 8192 on CUDA (do_bench median), 2048 on CPU (median of 5 after one
    warm-up). {"what": "torch.mm <label> n^3", "ms", "tflops"}."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cuda":
        ms = do_bench_ms(lambda: torch.mm(a, b))[0]
    else:
        torch.mm(a, b)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        ms = statistics.median(ts) * 1e3
    return {"what": f"torch.mm {label} {n}^3", "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


# ----------------------------------------------------------------------------- CPU memory (Linux)


def proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...), None where unavailable."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    return None


def reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
