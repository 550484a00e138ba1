"""The benchmark harness: standard flags, run metadata, the case loop, JSON / markdown / PNG output
and the measurement helpers; a script declares its options, cases and measurement. The contract
(flags, file names, rows, targets) is in bench/README.md, "The harness".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80
STYLES = ("-", "--", ":", "-.")  # line styles of a plot's `style` values
VERDICT = {True: "PASS", False: "FAIL", None: "not measured"}  # a target's `pass`


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


def str_list(s: str) -> tuple[str, ...]:
    """argparse type: 'a,b c' -> ('a', 'b', 'c')."""
    return tuple(x for x in s.replace(",", " ").split() if x)


def int_list(s: str) -> tuple[int, ...]:
    """argparse type: '1,2 3' -> (1, 2, 3)."""
    return tuple(int(x) for x in str_list(s))


STANDARD = {  # name -> (flag, type, default, help); a script picks the ones it uses
    "device": ("--device", ("auto", "cuda", "cpu"), "auto", "auto (default): cuda when available, else cpu"),
    "quick": ("--quick", bool, False, "a short preset (see the script's docstring)"),
    "seed": ("--seed", int, 0, "seed of the synthetic data (default 0)"),
    "threads": ("--threads", int, None, "torch CPU threads (default: torch's default)"),
    "warmup_ms": ("--warmup-ms", float, 25.0, "GPU: do_bench warm-up ms per measurement (default 25)"),
    "rep_ms": ("--rep-ms", float, 100.0, "GPU: do_bench repetition ms per measurement (default 100)"),
    "repeats": ("--repeats", int, None, "timed runs per case"),
    "max_seconds": ("--max-seconds", float, None, "start no new case after this many seconds"),
    "json": ("--json", Path, None, "also write the JSON document to this path"),
}


def add_options(p: argparse.ArgumentParser, options: Iterable[tuple]) -> None:
    """Add (flag, type, default, help) options: type bool is a switch, a tuple the choices, an
    argparse.Action subclass the action, anything else the argparse type."""
    for flag, kind, default, help in options:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help)
        elif isinstance(kind, tuple):
            p.add_argument(flag, choices=kind, default=default, help=help)
        elif isinstance(kind, type) and issubclass(kind, argparse.Action):
            p.add_argument(flag, action=kind, default=default, help=help)
        else:
            p.add_argument(flag, type=kind, default=default, help=help)


def check_choices(*checks) -> None:
    """(flag, values, allowed) triples: exit naming the unknown values of the first bad one."""
    for flag, values, allowed in checks:
        if bad := [v for v in values if v not in allowed]:
            raise SystemExit(f"{flag}: unknown {bad}; choose from {tuple(allowed)}")


def torch_dtype(name: str):
    """'bf16' / 'fp16' / 'fp32' -> the torch dtype."""
    import torch

    return getattr(torch, DTYPES[name])


def parser(doc: str, options=(), std=("device",), plot=True, out=True, **override) -> argparse.ArgumentParser:
    """The script's parser: its own options, the standard ones named in `std` (override=
    {name: (default, help)} changes one) and with `out` --out / --tag (/ --no-plot)."""
    p = argparse.ArgumentParser(description=" ".join(doc.strip().split("\n\n")[0].split()))
    add_options(p, options)
    for name in std:
        flag, kind, default, help = STANDARD[name]
        add_options(p, [(flag, kind, *override.get(name, (default, help)))])
    if out:
        p.add_argument(
            "--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/results)"
        )
        p.add_argument("--tag", default=None, help="extra word in the output file names")
    if out and plot:
        p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, resolve --device (auto: cuda when available; cuda missing exits) and apply --threads."""
    args = p.parse_args(argv)
    if not hasattr(args, "device") and not getattr(args, "threads", None):
        return args  # torch not imported (roofline)
    import torch

    if getattr(args, "device", None) == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def git(*a) -> str | None:
    """stdout of `git *a` in the repository, or None when git fails."""
    try:
        out = subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_meta(device: str) -> dict:
    """The card: {"device_name", "cuda", "gpu_memory_gib", "sms"} on CUDA, {"device_name",
    "cpu_threads"} on CPU."""
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "device_name": torch.cuda.get_device_name(),
            "cuda": torch.version.cuda,
            "gpu_memory_gib": p.total_memory / 2**30,
            "sms": p.multi_processor_count,
        }
    return {"device_name": cpu_name(), "cpu_threads": torch.get_num_threads()}


def run_meta(args, argv=None, device: str = "cpu") -> dict:
    import torch

    try:
        import triton
    except ImportError:
        triton = None
    status = git("status", "--porcelain")
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton and triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": cpu_name(),
        "loadavg_start": loadavg(),
        **device_meta(device),
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "argv": sys.argv if argv is None else list(argv),
    }


def write_json_atomic(path: Path, doc) -> None:
    """Write doc as indented JSON through a temporary file, so a reader never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


class Stop(Exception):
    """SIGTERM (from `timeout`) turned into an exception, so a stopped run still writes its files."""


@dataclasses.dataclass
class Case:
    """One row to measure: `row` names the case (it goes into the row), `measure()` returns the
    measured fields (or a list of rows: one per rank). Without `measure` the row is written as it is
    with `status` / `note`. A failure skips the later cases of the same `group` whose `size`
    is >= the failed one's in every coordinate; `timed` cases are subject to --max-seconds."""

    row: dict
    measure: Callable[[], dict | list] | None = None
    group: object = None
    size: tuple = ()
    status: str = "skipped"
    note: str | None = None
    timed: bool = True


class Run:
    """One benchmark run: metadata, rows, output files. Use as a context manager: inside it SIGTERM
    raises :class:`Stop`, which (like Ctrl-C) ends the block with `interrupted` set."""

    def __init__(self, name: str, args, argv=None, *, mode: str | None = None, writer: bool = True, **meta):
        self.name, self.args, self.writer = name, args, writer
        self.device = getattr(args, "device", "cpu")
        self.meta = {**run_meta(args, argv, self.device), **meta}
        self.rows: list[dict] = []
        self.doc: dict = {"targets": []}
        self.t0 = time.perf_counter()
        self.interrupted = False
        self.catch = True  # False: a failing case raises (distributed: the other ranks would hang)
        self.agree = lambda flag: flag  # distributed: rank 0's decision on every rank
        self._failed: dict = {}
        # the card as a file-name word: alphanumerics, '-' for the rest, at most 40
        card = "".join(c if c.isalnum() else "-" for c in self.meta["device_name"]).strip("-")[:40]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = "-".join(str(w) for w in (name, self.device, card or self.device, mode, args.tag, stamp) if w)
        self.stem = Path(args.out) / stem
        if writer:
            self.stem.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Run:
        def on_term(signum, frame):
            raise Stop()

        self._old = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        signal.signal(signal.SIGTERM, self._old)
        if kind is not None and issubclass(kind, (Stop, KeyboardInterrupt)):
            self.interrupted = True
            print("\ninterrupted: writing what was measured", flush=True)
            return True
        return False

    def path(self, ext: str) -> Path:
        return Path(f"{self.stem}.{ext}")

    def print(self, *a, **kw) -> None:
        if self.writer:
            print(*a, **kw, flush=True)

    def write(self, **doc) -> None:
        """Add top-level fields to the JSON document and rewrite it (rank 0 / the writer only)."""
        self.doc.update(doc)
        if not self.writer:
            return
        full = {"meta": self.meta, "rows": self.rows, **self.doc}
        write_json_atomic(self.path("json"), full)
        if getattr(self.args, "json", None):
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(self.args.json), full)

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def out_of_time(self) -> bool:
        limit = getattr(self.args, "max_seconds", None)
        return self.agree(bool(limit) and time.perf_counter() - self.t0 > limit)

    def sweep(self, cases: Iterable[Case]) -> list[dict]:
        """Measure every case in order, one row each (see :class:`Case`); returns the rows."""
        for case in cases:
            for row in self.measure(case):
                self.emit(row)
        return self.rows

    def measure(self, case: Case) -> list[dict]:
        row = dict(case.row)
        skip = self._skip(case)
        if case.measure is None or skip:
            status, note = (case.status, case.note) if skip is None else ("skipped", skip)
            return [{**row, "status": status, **({"note": note} if note else {})}]
        named = [
            f"{k}={v}" for k, v in row.items() if k not in ("kind", "device") and isinstance(v, (str, int))
        ]
        self.print("  " + " ".join(n for n in named if not n.endswith(("=True", "=False"))), "...", end="")
        t0 = time.perf_counter()
        try:
            got = case.measure()
            rows = [{**row, "status": "ok", **r} for r in (got if isinstance(got, list) else [got])]
        except (Stop, KeyboardInterrupt):
            raise
        except Exception as e:
            if not self.catch:
                raise
            status = getattr(e, "status", None) or ("oom" if is_oom(e) else "error")
            line = (str(e).strip().splitlines() or [""])[0]
            rows = [{**row, "status": status, "note": f"{type(e).__name__}: {line}"[:200]}]
            if status == "error":
                import traceback

                traceback.print_exc()
        finally:
            free_memory(self.device)
        bad = rows[0]["status"]
        if bad != "ok" and case.group is not None:
            old = self._failed.get(case.group)
            self._failed[case.group] = (case.size if old is None else tuple(map(min, old[0], case.size)), bad)
        self.print(f" {bad} ({time.perf_counter() - t0:.1f}s)")
        return rows

    def _skip(self, case: Case) -> str | None:
        failed = self._failed.get(case.group) if case.group is not None else None
        if failed and all(s >= f for s, f in zip(case.size, failed[0])):
            return f"a smaller case ended with {failed[1]}"
        if case.timed and case.measure is not None and self.out_of_time():
            return f"--max-seconds {self.args.max_seconds:g} reached"
        return None

    def target(self, target: str, value, ok: bool | None, note: str | None = None, **extra) -> dict:
        """Record one target's verdict (True PASS, False FAIL, None not measured) in doc["targets"]."""
        t = {"target": target, "value": value, "pass": ok, "note": note, **extra}
        self.doc["targets"].append(t)
        return t

    def finish(self, text="", *, md: str | None = None, title="", panels=(), plot_rows=None) -> int:
        """Write the JSON (and markdown, the plot of `plot_rows`, default the rows), print `text`
        and the targets; the exit status."""
        self.meta.update(loadavg_end=loadavg(), seconds=time.perf_counter() - self.t0)
        self.meta["interrupted"] = self.interrupted
        self.write()
        if not self.writer:
            return 0
        if text:
            print("\n" + text)
        targets = self.doc["targets"]
        if targets:
            print(f"\ntargets (this card: {self.meta['device_name']}):")
        for t in targets:
            v = f"{t['value']:.4g}" if isinstance(t["value"], float) else t["value"]
            verdict = VERDICT[t["pass"]]
            print(f"- {t['target']}: {v} -> {verdict}" + (f" ({t['note']})" if t.get("note") else ""))
        print(f"\nresults: {self.path('json')}")
        if md is not None:
            self.path("md").write_text(md)
            print(f"table:   {self.path('md')}")
        rows = self.rows if plot_rows is None else plot_rows
        if panels and not getattr(self.args, "no_plot", True) and plot(rows, self.path("png"), title, panels):
            print(f"plot:    {self.path('png')}")
        if self.interrupted:
            return 130
        return 1 if any(r.get("status") == "error" for r in self.rows) else 0


def is_oom(exc: BaseException) -> bool:
    """Whether exc is an out-of-memory error (host, CUDA, cuBLAS workspace or Triton resources)."""
    import torch

    oom = [MemoryError, torch.cuda.OutOfMemoryError]
    with contextlib.suppress(Exception):
        from triton.runtime.errors import OutOfResources

        oom.append(OutOfResources)
    if isinstance(exc, tuple(oom)):
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
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def clear_grads(tensors) -> None:
    for x in tensors:
        x.grad = None


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


class PeakMemory:
    """Peak memory since :meth:`start`. CUDA: torch.cuda.max_memory_allocated minus what was
    allocated at start (``absolute``: not minus); CPU: VmHWM (reset at start, after glibc's
    malloc_trim) minus VmRSS then, approximate since the allocator may reuse pages it kept."""

    def __init__(self, device: str, absolute: bool = False):
        self.device, self.absolute, self.base = device, absolute, None
        self.how = ("max_memory_allocated" + ("" if absolute else " - before")) if device == "cuda" else None

    def start(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0 if self.absolute else torch.cuda.memory_allocated()
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = proc_status_kib("VmRSS") * 1024 if reset_hwm() and proc_status_kib("VmRSS") else None
        self.how = "VmHWM (reset before) - VmRSS then" if self.base is not None else "not measured (no /proc)"
        return self

    def mib(self) -> float | None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        hwm = proc_status_kib("VmHWM")
        return None if self.base is None or hwm is None else max(0, hwm * 1024 - self.base) / 2**20


def ms_quantiles(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of durations in seconds (nearest-rank percentiles)."""
    xs = sorted(s * 1e3 for s in seconds)
    q = lambda p: xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]
    return statistics.median(xs), q(0.2), q(0.8)


def ms_fields(name: str, triple) -> dict:
    """{name_ms, name_ms_p20, name_ms_p80} from a (median, p20, p80) triple in ms."""
    return dict(zip((f"{name}_ms", f"{name}_ms_p20", f"{name}_ms_p80"), triple))


def timings(fn, n: int, sync_fn=None, budget_s: float = float("inf"), warm: bool = True) -> list[float]:
    """Seconds of up to n runs of fn() (each followed by sync_fn()), after one untimed run with
    `warm`; no further run once budget_s of timed work was done."""
    if warm:
        fn()
        sync_fn and sync_fn()
    out = []
    while len(out) < max(1, n) and sum(out) < budget_s:
        t0 = time.perf_counter()
        fn()
        sync_fn and sync_fn()
        out.append(time.perf_counter() - t0)
    return out


def do_bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None):
    """(median, p20, p80) ms of fn() on the GPU from triton.testing.do_bench."""
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES, grad_to_none=grad_to_none
    )


def time_ms(fn, device: str, args, n: int = 3, sync_fn=None) -> tuple[float, float, float]:
    """(median, p20, p80) ms: do_bench(--warmup-ms, --rep-ms) on CUDA, else n perf_counter runs."""
    if device == "cuda":
        return tuple(do_bench_ms(fn, args.warmup_ms, args.rep_ms))
    return ms_quantiles(timings(fn, n, sync_fn))


def fwd_bwd_ms(forward, backward, leaves, device: str, args, n: int = 3, budget_s=float("inf"), first=None):
    """fwd_ms*, bwd_ms* and fwd_bwd_ms* fields (median, p20, p80). forward() returns the output,
    backward(out, **kw) back-propagates it. CUDA: do_bench, backward on one retained graph (the
    forward outside its timing), grads of `leaves` reset before every repetition. CPU: up to n
    runs timed with perf_counter (until budget_s), `first()` called after the first one."""
    if device == "cuda":
        kw = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "grad_to_none": leaves}
        row = ms_fields("fwd", do_bench_ms(forward, **kw))
        out = forward()
        row.update(ms_fields("bwd", do_bench_ms(lambda: backward(out, retain_graph=True), **kw)))
        out = None  # drop the retained graph before timing forward+backward
        clear_grads(leaves)
        row.update(ms_fields("fwd_bwd", do_bench_ms(lambda: backward(forward()), **kw)))
        clear_grads(leaves)
        return row
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    while len(times["fwd"]) < max(1, n) and sum(times["fwd_bwd"]) < budget_s:
        clear_grads(leaves)
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        backward(out)
        t2 = time.perf_counter()
        for k, t in (("fwd", t1 - t0), ("bwd", t2 - t1), ("fwd_bwd", t2 - t0)):
            times[k].append(t)
        if first and len(times["fwd"]) == 1:
            first(out)
        out = None
    row = {k: v for name, ts in times.items() for k, v in ms_fields(name, ms_quantiles(ts)).items()}
    return {**row, "timed_runs": len(times["fwd"])}


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
        ms = statistics.median(timings(lambda: torch.mm(a, b), 5)) * 1e3
    return {"what": f"torch.mm {label} {n}^3", "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def ceiling(device: str, dtype: str = "fp32") -> dict:
    """The TFLOP/s ceiling the benchmarks compare with: bf16 8192^3 on CUDA, `dtype` 2048^3 on CPU."""
    name = "bf16" if device == "cuda" else dtype
    return matmul_rate(device, torch_dtype(name), name)


def contrastive_inputs(b, B, D, dtype, device, seed, scale=1 / 0.07, bias=-10.0):
    """L2-normalised leaf features (b x D, B x D), a scale and a bias leaf, all requiring grad."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    feats = []
    for n in (b, B):
        x = torch.randn(n, D, generator=g, dtype=torch.float32, device=device).to(dtype)
        x.div_(x.float().norm(dim=1, keepdim=True).to(dtype))
        feats.append(x.requires_grad_())
    scale = torch.tensor(scale, device=device, dtype=torch.float32, requires_grad=True)
    bias = torch.tensor(bias, device=device, dtype=torch.float32, requires_grad=True)
    return feats[0], feats[1], scale, bias


def fmt(v, spec: str) -> str:
    """format(v, spec); '-' for None."""
    return "-" if v is None else format(v, spec)


def note(r: dict) -> str:
    """A row's note; for a row that is not ok, its status first."""
    n = r.get("note") or ""
    return n if r.get("status", "ok") == "ok" else f"{r.get('status')}: {n}"


def table(rows, cols, md: bool = False) -> str:
    """A table of rows; cols: (header, key or fn(row), format spec). Text columns are left-aligned,
    numbers right-aligned; md: a markdown table."""
    body = []
    for r in rows:
        cells = []
        for _, key, spec in cols:
            try:
                v = key(r) if callable(key) else r.get(key)
            except (KeyError, TypeError):  # a field the row lacks (a failed case)
                v = None
            cells.append((fmt(v, spec), isinstance(v, str)))
        body.append(cells)
    heads = [(c[0], bool(body) and body[0][i][1]) for i, c in enumerate(cols)]
    width = [max(len(x[i][0]) for x in [heads, *body]) for i in range(len(cols))]
    line = lambda cells: [s.ljust(w) if left else s.rjust(w) for (s, left), w in zip(cells, width)]
    if md:
        return "\n".join(
            ["| " + " | ".join(line(heads)) + " |", "|" + "|".join("-" * (w + 2) for w in width) + "|"]
            + ["| " + " | ".join(line(c)) + " |" for c in body]
        )
    text = ["  ".join(line(c)).rstrip() for c in [heads, *body]]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


@dataclasses.dataclass
class Panel:
    """One log-log panel: a line per distinct `series` value (colour) and `style` value (line
    style) of the ok rows that `where` keeps, y = row[y] (or y(row); None / 0 is left out);
    refs(rows) -> [(label, xs, ys)] adds black reference lines."""

    y: str | Callable
    ylabel: str
    x: str = "b"
    xlabel: str = "batch"
    series: tuple = ("method",)
    style: str | None = None
    where: Callable | None = None
    refs: Callable | None = None
    title: str | None = None


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


def plot(rows, path: Path, title: str, panels) -> bool:
    """The panels side by side into a 120 dpi PNG; False when matplotlib is missing or nothing is drawn."""
    plt = import_pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    drawn = False
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    for ax, pn in zip(axes[0], panels):
        sel = [r for r in ok if pn.where is None or pn.where(r)]
        value = pn.y if callable(pn.y) else (lambda r, k=pn.y: r.get(k))
        keys = list(dict.fromkeys(tuple(r.get(k) for k in pn.series) for r in sel))
        styles = list(dict.fromkeys(r.get(pn.style) for r in sel)) if pn.style else [None]
        for ci, key in enumerate(keys):
            for si, st in enumerate(styles):
                pts = sorted(
                    (r[pn.x], value(r))
                    for r in sel
                    if tuple(r.get(k) for k in pn.series) == key
                    and (not pn.style or r.get(pn.style) == st)
                    and value(r)
                )
                if pts:
                    label = " ".join(v if isinstance(v, str) else f"{k}={v}" for k, v in zip(pn.series, key))
                    label += f" {pn.style}={st}" if pn.style else ""
                    ax.plot(*zip(*pts), STYLES[si % 4], marker="o", color=f"C{ci}", label=label)
                    drawn = True
        for label, xs, ys in pn.refs(sel) if pn.refs else []:
            ax.plot(xs, ys, ":", color="k", lw=0.8, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(pn.xlabel)
        ax.set_ylabel(pn.ylabel)
        if pn.title:
            ax.set_title(pn.title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if drawn:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn
