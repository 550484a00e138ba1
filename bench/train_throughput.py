"""Stage-2 training step throughput and memory: samples/s and peak memory per GPU against the batch
size, with and without the fused loss and the gradient cache, and the largest batch per GPU.

One step is the stage-2 trainer's own step (``llm2clip.training.step.TrainStep``): the uint8 images
sit in page-locked host memory (as the DataLoader delivers them), each (chunk of the) batch is copied
to the device and normalised, forward + loss + backward with bf16 autocast (the gradient cache),
gradient-norm clip 5, the loss and norm read back (the step's one host sync), AdamW (fused on CUDA),
the schedule, the logit-scale clamp. Models are
ClipModel(ViT preset, random init) with the LLM2CLIP text adapter over (b, --text-dim) bf16 caption
embeddings already on the device (the cache gather is measured on its own, see "breakdown").

Methods (the loss is the symmetric InfoNCE in every one):

    fused+gc    ours: fused Triton loss (llm2clip.training.losses.make_loss fused=True) and the gradient
                cache with --chunk-size images per chunk (activation memory of one chunk)
    fused       fused loss, one pass with autograd over the whole batch
    plain+gc    open_clip-style loss (materialised b x b logits) with the gradient cache
    plain       open_clip-style step: plain loss, no chunking

Measurements (GPU):

* sweep: for each model, method and batch in --batches, --warmup untimed steps then --steps timed
  steps (time.perf_counter around a synchronised step): median, p20 and p80 ms, samples/s = b /
  median; peak memory = torch.cuda.max_memory_allocated over those steps (peak stats reset before
  them; it includes the weights, AdamW state, gradients, the (b, text_dim) embeddings and the
  images of a chunk on the device); out-of-memory is a row (status "oom") and the method's larger
  batches are skipped. saved_act_mib: the peak bytes autograd holds for backward at once during the
  first warm-up step (saved_tensors_hooks; storages once, parameters excluded), i.e. the activation
  memory, the same measure on CPU and CUDA.
* find-max (--find-max): for --find-max-methods, the batch is doubled from --find-max-start
  (default: the chunk size with the gradient cache, else 64) until out of memory, --max-batch, the
  host memory (the uint8 batch must fit in 80% of MemAvailable) or --max-seconds; sizes the sweep
  measured are reused, others run one step (status "ok" rows of kind "probe").
* TFLOP/s: forward FLOPs per sample of the whole model counted once with
  torch.utils.flop_counter.FlopCounterMode (attention routed to the explicit "math" backend for the
  count, so QK^T and PV are seen), times 3 for forward + backward, 4 with the gradient cache (its
  extra forward), 5 with --grad-checkpointing, plus 8 b^2 D for the loss (its useful work,
  docs/loss.md). "tflops" counts executed work, "mfu" only the useful 3x (+ loss); both beside
  the bf16 8192^3 torch.mm rate of the same card measured in the same run.
* breakdown at --breakdown-batch (4096): the fused+gc step time (from the sweep, else measured) and,
  alone, (1) the fused loss forward+backward on (b, D) bf16 features, (2) the cache gather of b
  random rows of --text-dim bf16 from a host table page-locked in place and read zero-copy
  (llm2clip.cache.gather_rows; the device-resident tier is recorded beside it), (3) the main-process
  cost of receiving the loader's batch: pinned uint8 -> device copy + normalisation, counted twice
  with the gradient cache (its two passes each copy every chunk). fraction = (1 + 2 + 3) / step.
  Timed with triton.testing.do_bench (median, p20, p80).

Targets (one H100 80 GB, ViT-B/16 at 224; printed PASS / FAIL and kept in the JSON on CUDA):

    fused+gc largest batch >= 131072 and >= 16x the plain step's largest
    peak memory flat beyond the chunk size: the least-squares slope of fused+gc peak memory over
        batches >= 2 x chunk is <= 1% of the plain step's slope (bytes per sample); the remainder
        is the O(b (text_dim + D)) embeddings and features, which cannot be chunked away
    breakdown fraction at b = 4096 <= 5%

CPU mode (no GPU, or --device cpu): a tiny ViT (width 64, depth 2, 32 px, patch 8, text dim 64,
embedding 32) in fp32 without autocast, batches 8..64, chunk 8, no search, so the script runs end
to end; peak_gib there is VmHWM (reset before the steps) minus VmRSS then, mostly allocator noise
at this size: saved_act_mib is the memory figure to read (and the one plotted). CPU numbers are not
targets and no target is evaluated.

    python bench/train_throughput.py --models B/16         # GPU: every method, search fused+gc and
                                                           #   plain (to 262144): ~10-15 min on H100
    python bench/train_throughput.py --models L/14 --max-batch 65536
    python bench/train_throughput.py --quick               # GPU check: B/16, plain searched to OOM,
                                                           #   fused+gc at 1k/4k/16k, breakdown; ~75 s
    python bench/train_throughput.py --device cpu          # CPU, tiny model, ~30 s on 2 shared cores

Writes the table to stdout and train_throughput-<device>-<card>[-quick][-<tag>]-<time>.json / .md /
.png into --out (default bench/results); the JSON is rewritten after every row, so a run stopped by
``timeout`` (SIGTERM) keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as bench/train_throughput.py
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

MODELS = ("B/16", "L/14", "tiny")
TINY_VIT = {"width": 64, "depth": 2, "heads": 4, "image_size": 32, "patch_size": 8, "output_dim": 64}
METHODS = {  # name -> (fused loss, gradient cache)
    "fused+gc": (True, True),
    "fused": (True, False),
    "plain+gc": (False, True),
    "plain": (False, False),
}
OURS, PLAIN = "fused+gc", "plain"
CHUNK = {"B/16": 256, "L/14": 64, "tiny": 8}  # fits one chunk's bf16 activations in 80 GB with room
GPU_BATCHES = (256, 1024, 4096, 16384)
GPU_QUICK_BATCHES = (1024, 4096, 16384)
CPU_BATCHES = (8, 16, 32, 64)
PLAIN_FIND_START = {"cuda": 64, "cpu": 8}
HOST_FRACTION = 0.8  # the host uint8 batch may take this much of MemAvailable
TARGET_MAX_BATCH = 131072
TARGET_X_PLAIN = 16
TARGET_FLAT_SLOPE = 0.01
TARGET_FRACTION = 0.05
TARGET_MODEL = "B/16"
GRAD_CLIP = 5.0  # the LLM2CLIP recipe's gradient-norm clip (docs/training.md)


class _Stop(Exception):
    """Raised from the SIGTERM handler so a run killed by `timeout` still writes its files."""


class HostMemoryLimit(Exception):
    """The uint8 batch would not fit in host memory."""


# ----------------------------------------------------------------------------- host images


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


class HostImages:
    """A (n, 3, S, S) uint8 batch in host memory, grown on demand; on CUDA page-locked in place with
    cudaHostRegister (not tensor.pin_memory(), whose caching allocator rounds 19 GB up to 32 GB)."""

    def __init__(self, image_size: int, device: str, seed: int):
        self.size, self.device, self.seed = image_size, device, seed
        self.buf = None
        self.pinned = False
        self.note = None

    def get(self, n: int):
        if self.buf is None or self.buf.shape[0] < n:
            self._grow(n)
        return self.buf[:n]

    def _grow(self, n: int) -> None:
        import torch

        s = self.size
        need = n * 3 * s * s
        held = 0 if self.buf is None else self.buf.numel()
        avail = mem_available_bytes()
        if avail is not None and need > HOST_FRACTION * (avail + held):
            raise HostMemoryLimit(
                f"{n} uint8 images need {need / 2**30:.1f} GiB of host memory, over {HOST_FRACTION:.0%} "
                f"of MemAvailable ({(avail + held) / 2**30:.1f} GiB)"
            )
        self.release()
        buf = torch.empty((n, 3, s, s), dtype=torch.uint8)
        if self.device == "cuda":
            err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), need, 0)
            self.pinned = int(err) == 0
            if not self.pinned:
                self.note = f"cudaHostRegister failed ({err}): pageable images, synchronous copies"
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        block = torch.randint(
            0, 256, (min(n, 512), 3, s, s), dtype=torch.uint8, device=self.device, generator=g
        )
        for i in range(0, n, block.shape[0]):  # fill from the device: faster than a CPU RNG
            k = min(block.shape[0], n - i)
            buf[i : i + k].copy_(block[:k])
        self.buf = buf

    def release(self) -> None:
        if self.buf is not None and self.pinned:
            import torch

            torch.cuda.synchronize()  # no copy may still read it
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
        self.buf, self.pinned = None, False


# ----------------------------------------------------------------------------- model and step


def build_state(name: str, args) -> SimpleNamespace:
    """The model (random init, on the device), AdamW, the losses, the image function and FLOPs."""
    import torch

    from llm2clip.data.images import normalize_images
    from llm2clip.models.adapter import AdapterConfig
    from llm2clip.models.clip_model import ClipModel, ClipModelConfig
    from llm2clip.models.vit import ViT, ViTConfig
    from llm2clip.training.losses import make_loss

    dev = args.device
    cfg = ViTConfig.preset("B/16", **TINY_VIT) if name == "tiny" else ViTConfig.preset(name)
    cfg.name = name
    mcfg = ClipModelConfig(
        embed_dim=args.embed_dim, adapter=AdapterConfig(input_dim=args.text_dim, embed_dim=args.embed_dim)
    )
    torch.manual_seed(args.seed)
    with torch.device(dev):
        model = ClipModel(ViT(cfg), mcfg)
    model.to(dev).train()
    if args.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=dev == "cuda")
    mean, std = cfg.image_mean, cfg.image_std

    def image_fn(x):  # what the stage-2 trainer does with a loader batch (llm2clip/apps/train.py)
        return normalize_images(x.to(dev, non_blocking=True), mean, std)

    backend = args.loss_backend or ("auto" if dev == "cuda" else "torch")
    st = SimpleNamespace(
        name=name,
        cfg=cfg,
        model=model,
        opt=opt,
        image_fn=image_fn,
        losses={True: make_loss("infonce", fused=True, backend=backend), False: make_loss("infonce", False)},
        chunk=args.chunk_size or CHUNK[name],
        images=HostImages(cfg.image_size, dev, args.seed),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext(),
        params=sum(p.numel() for p in model.parameters()),
        steps={},
        device=dev,
    )
    st.fwd_flops = forward_flops(st, args)
    return st


def forward_flops(st, args) -> float:
    """Forward FLOPs per sample of the whole model (the trainer's count: llm2clip.training.metrics)."""
    from llm2clip.training.metrics import forward_flops as count

    return count(st.model, st.cfg.image_size, args.text_dim, args.device) or float("nan")


def flops_per_step(st, b: int, grad_cache: bool, chunk: int, executed: bool) -> float:
    """Executed (+1 forward with the gradient cache, +1 with checkpointing) or useful FLOPs of a step
    (llm2clip.training.metrics.StepFlops: 3x forward + 8 b^2 D)."""
    from llm2clip.training.grad_cache import num_chunks
    from llm2clip.training.metrics import StepFlops

    flops = StepFlops(st.fwd_flops, st.model.config.embed_dim)
    if not executed:
        return flops.useful(b, b)
    extra = int(grad_cache and num_chunks(b, chunk) > 1) + int(st.cfg.grad_checkpointing)
    return flops.executed(b, b, extra)


class GivenRows:
    """The caption rows of a step, already on the device (the cache gather is timed on its own)."""

    def __init__(self, text):
        self.text = text

    def launch(self, row_ids) -> None:
        pass

    def wait(self):
        return self.text


def train_step(st, images, text, fused: bool, chunk: int):
    """One stage-2 optimizer step: the trainer's TrainStep on a host uint8 batch."""
    import torch

    from llm2clip.distributed import DistInfo
    from llm2clip.training.optim import lr_schedule
    from llm2clip.training.step import TrainStep

    key = (fused, chunk)
    if key not in st.steps:
        sched = lr_schedule(st.opt, 0, 1, "constant")
        st.steps[key] = TrainStep(
            st.model, st.model, st.opt, sched, st.losses[fused], DistInfo(device=torch.device(st.device)),
            chunk_size=chunk, grad_clip=GRAD_CLIP, autocast=st.autocast, prepare_images=st.image_fn,
        )  # fmt: skip
    stats = st.steps[key](images, None, GivenRows(text))
    return stats.loss, {"chunks": stats.chunks}


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """CUDA: max_memory_allocated since start(); CPU: VmHWM minus VmRSS at start() (approximate)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = None
        else:
            self.base = common.proc_status_kib("VmRSS") if common.reset_hwm() else None

    def read(self) -> dict:
        import torch

        if self.device == "cuda":
            return {
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "peak_source": "torch.cuda.max_memory_allocated",
            }
        hwm = common.proc_status_kib("VmHWM")
        peak = None if self.base is None or hwm is None else max(0, hwm - self.base) / 2**20
        return {"peak_gib": peak, "peak_source": "VmHWM - VmRSS before the steps (CPU, approximate)"}


class _Held:
    """A tensor saved for backward; its bytes leave the live count when autograd drops it."""

    __slots__ = ("owner", "key", "t")

    def __init__(self, owner, key, t):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self):
        if self.key is not None:
            self.owner.drop(self.key)


class SavedActivations:
    """Peak bytes of the tensors autograd holds for backward at once (each storage counted once,
    parameters excluded): the activation memory of a step, measured the same way on CPU and CUDA.
    With the gradient cache it is one chunk's activations (or the loss's saved features, if larger).
    Python runs for every saved tensor, so it is used on an untimed warm-up step only."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.live = self.peak = 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.params or st.nbytes() == 0:
            return _Held(self, None, t)
        ref = self.refs.setdefault(key, [0, st.nbytes()])
        if ref[0] == 0:
            self.live += ref[1]
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(held):
        return held.t

    def drop(self, key) -> None:
        ref = self.refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[key]

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ----------------------------------------------------------------------------- cases


def run_case(st, method: str, b: int, warmup: int, steps: int, args, meta) -> dict:
    """Time `steps` steps after `warmup` at batch b; raises on OOM (the caller records it)."""
    import torch

    fused, gc = METHODS[method]
    chunk = st.chunk if gc else 0
    images = st.images.get(b)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    text = torch.randn(b, args.text_dim, device=args.device, dtype=dtype)
    mem = PeakMemory(args.device)
    mem.start()
    times, info = [], {}
    saved = SavedActivations(st.model) if warmup else None
    for i in range(warmup + steps):
        common.sync(args.device)
        t0 = time.perf_counter()
        with saved.hooks() if i == 0 and saved else contextlib.nullcontext():
            loss, info = train_step(st, images, text, fused, chunk)
        common.sync(args.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    row = mem.read()
    row["saved_act_mib"] = saved.peak / 2**20 if saved else None
    if args.device == "cuda":
        row["static_gib"] = torch.cuda.memory_allocated() / 2**30
    med, p20, p80 = common.ms_quantiles(times)
    row.update(common.ms_fields("step", (med, p20, p80)))
    rate = meta["matmul_rate"]["tflops"]
    executed = flops_per_step(st, b, gc, chunk, executed=True)
    useful = flops_per_step(st, b, gc, chunk, executed=False)
    row.update(
        steps=steps,
        chunks=info.get("chunks", 1),
        loss=float(loss),
        samples_per_s=b / (med * 1e-3),
        flops_step=executed,
        tflops=executed / (med * 1e-3) / 1e12,
        pct_ceiling=100 * executed / (med * 1e-3) / 1e12 / rate,
        mfu=useful / (med * 1e-3) / 1e12 / rate,
    )
    if st.images.note:
        row["note"] = st.images.note
    return row


def guarded(st, args, fn):
    """(row, status): fn()'s row and "ok", or a status row for OOM / host memory / another error."""
    row, failure = None, None
    try:
        row = fn()
    except HostMemoryLimit as e:
        failure = ("host-memory", str(e))
    except (_Stop, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a failed case is a row, not the end of the run
        kind = "oom" if common.is_oom(e) else "error"
        failure = (kind, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    if failure is None:
        return {**row, "status": "ok"}, "ok"
    st.opt.zero_grad(set_to_none=True)  # a step that failed halfway leaves partial gradients
    common.free_memory(args.device)
    return {"status": failure[0], "note": failure[1]}, failure[0]


def case_base(st, kind: str, method: str, b: int) -> dict:
    fused, gc = METHODS[method]
    return {
        "kind": kind,
        "model": st.name,
        "method": method,
        "fused_loss": fused,
        "grad_cache": gc,
        "chunk": st.chunk if gc else 0,
        "batch": b,
    }


def run_model(st, args, meta, emit, out_of_time) -> None:
    """Sweep (--methods), find-max (--find-max-methods) and breakdown for one model. Methods that are
    only searched go first (the plain step's search is short); the breakdown reuses the sweep's step
    at its batch and then costs seconds, so --max-seconds skips it only when that step is missing."""
    searched = args.find_max_methods if args.find_max else ()
    order = [m for m in searched if m not in args.methods] + list(args.methods)
    for method in order:
        if method in args.methods:
            sweep(st, method, args, meta, emit, out_of_time)
        if method in searched:
            find_max(st, method, args, meta, emit, out_of_time)
    if args.breakdown_batch:
        b = args.breakdown_batch
        have = any(
            (r["kind"], r["model"], r["method"], r["batch"], r["status"]) == ("sweep", st.name, OURS, b, "ok")
            for r in meta["_rows"]
        )
        if out_of_time() and not have:
            note = f"--max-seconds {args.max_seconds:g} reached"
            emit({**case_base(st, "breakdown", OURS, b), "status": "skipped", "note": note})
        else:
            emit(breakdown(st, args, meta))
    st.images.release()


def sweep(st, method, args, meta, emit, out_of_time) -> None:
    """--batches in order; after an OOM (or another failure) the larger batches are skipped."""
    stop = None
    for b in args.batches:
        base = case_base(st, "sweep", method, b)
        if stop or out_of_time():
            emit({**base, "status": "skipped", "note": stop or f"--max-seconds {args.max_seconds:g} reached"})
            continue
        row, status = guarded(
            st, args, lambda b=b: run_case(st, method, b, args.warmup, args.steps, args, meta)
        )
        emit({**base, **row})
        if status != "ok":
            stop = f"a smaller batch ended with {status}"


def find_max(st, method, args, meta, emit, out_of_time) -> None:
    """Double the batch until out of memory; reuse the sweep's sizes; one step per new size."""
    _, gc = METHODS[method]
    b = args.find_max_start or (st.chunk if gc else PLAIN_FIND_START[args.device])
    while b <= args.max_batch:
        known = [
            r for r in meta["_rows"] if r["model"] == st.name and r["method"] == method and r["batch"] == b
        ]
        known = [r for r in known if r["kind"] in ("sweep", "probe") and r["status"] != "skipped"]
        if known:
            if known[-1]["status"] != "ok":
                return
            b *= 2
            continue
        base = case_base(st, "probe", method, b)
        if out_of_time():
            emit({**base, "status": "skipped", "note": f"--max-seconds {args.max_seconds:g} reached"})
            return
        row, status = guarded(st, args, lambda b=b: run_case(st, method, b, 0, 1, args, meta))
        emit({**base, **row})
        if status != "ok":
            return
        b *= 2


# ----------------------------------------------------------------------------- breakdown


def time_ms(fn, args) -> tuple[float, float, float]:
    """(median, p20, p80) ms: triton do_bench on CUDA, perf_counter over --steps + 2 runs on CPU."""
    if args.device == "cuda":
        return tuple(common.do_bench_ms(fn, args.warmup_ms, args.rep_ms))
    fn()
    ts = []
    for _ in range(args.steps + 2):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return common.ms_quantiles(ts)


def gather_tables(args) -> list[tuple[str, object]]:
    """(tier, (N, stride) uint8 table) pairs. CUDA with the gather extension: the host table
    page-locked in place, as its zero-copy CUDA alias, and a device-resident table
    (bench/cache_gather.make_tables); CUDA without it: a pageable CPU table that gather_rows reads
    with index_select + copy (the fallback, named "host-torch"); CPU: a CPU table."""
    import torch

    from llm2clip.cache import _ext, ext_available

    stride = -(-args.text_dim * 2 // 128) * 128
    if args.device == "cuda" and ext_available() and _ext.WITH_CUDA:
        from bench import cache_gather

        ns = SimpleNamespace(
            device_table_mib=min(args.gather_table_mib, 1024),
            host_table_mib=args.gather_table_mib,
            seed=args.seed,
        )
        tabs = cache_gather.make_tables(ns, args.text_dim, 1)
        return [("host", tabs["alias"]), ("device", tabs["dev"])]
    rows = max(1, (args.gather_table_mib << 20) // stride)
    table = torch.empty((rows, stride), dtype=torch.uint8).random_(0, 256)
    return [("host" if args.device == "cpu" else "host-torch", table)]


def time_gather(table, b: int, args) -> tuple[float, float, float]:
    """Time llm2clip.cache.gather_rows of b random rows (bf16, --text-dim) of a cache table; the ids
    live on the device the step runs on."""
    import torch

    from llm2clip.cache import gather_rows

    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(0, table.shape[0], (b,), generator=g).to(args.device)
    return time_ms(lambda: gather_rows(table, None, idx, args.text_dim, 1, torch.bfloat16), args)


def breakdown(st, args, meta) -> dict:
    """Step time of fused+gc at the breakdown batch beside the loss, gather and data costs alone."""
    import torch
    import torch.nn.functional as F

    from llm2clip.training.grad_cache import num_chunks

    b = args.breakdown_batch
    base = case_base(st, "breakdown", OURS, b)
    sweep = [
        r
        for r in meta["_rows"]
        if (r["kind"], r["model"], r["method"], r["batch"], r["status"]) == ("sweep", st.name, OURS, b, "ok")
    ]
    if sweep:
        step = sweep[-1]
    else:
        step, status = guarded(st, args, lambda: run_case(st, OURS, b, args.warmup, args.steps, args, meta))
        if status != "ok":
            return {**base, **step}
    row = {
        **base,
        "status": "ok",
        **common.ms_fields("step", (step["step_ms"], step["step_ms_p20"], step["step_ms_p80"])),
    }

    def measure():
        dt = torch.bfloat16 if args.device == "cuda" else torch.float32
        D, dev = st.model.config.embed_dim, args.device
        g = torch.Generator(device=dev).manual_seed(args.seed)
        img = F.normalize(torch.randn(b, D, device=dev, generator=g), dim=-1).to(dt).requires_grad_(True)
        txt = F.normalize(torch.randn(b, D, device=dev, generator=g), dim=-1).to(dt).requires_grad_(True)
        scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
        loss_fn = st.losses[True]

        def loss_fwd_bwd():
            for x in (img, txt, scale):
                x.grad = None
            with st.autocast:
                loss = loss_fn(img, txt, scale, None)
            loss.backward()

        out = {**common.ms_fields("loss", time_ms(loss_fwd_bwd, args))}
        for tier, table in gather_tables(args):
            key = "gather" if tier != "device" else "gather_device"
            out.update(common.ms_fields(key, time_gather(table, b, args)))
            out.setdefault("gather_tier", tier)
            del table
        images = st.images.get(b)
        out.update(common.ms_fields("data", time_ms(lambda: st.image_fn(images), args)))
        return out

    extra, status = guarded(st, args, measure)
    row.update(extra)
    if status != "ok":
        return row
    passes = 2 if num_chunks(b, st.chunk) > 1 else 1
    parts = row["loss_ms"] + row["gather_ms"] + passes * row["data_ms"]
    row.update(
        data_passes=passes,
        parts_ms=parts,
        fraction=parts / row["step_ms"],
        step_includes="h2d + normalise of every chunk (every pass), forward, loss, backward, AdamW",
    )
    return row


# ----------------------------------------------------------------------------- summaries


def max_batches(rows, args) -> list[dict]:
    """Largest ok batch per (model, method) among sweep and probe rows, and what stopped it."""
    out = []
    keys = dict.fromkeys((r["model"], r["method"]) for r in rows if r["kind"] in ("sweep", "probe"))
    for model, method in keys:
        rs = [
            r
            for r in rows
            if (r["model"], r["method"]) == (model, method) and r["kind"] in ("sweep", "probe")
        ]
        ok = [r["batch"] for r in rs if r["status"] == "ok"]
        failed = sorted((r["batch"], r["status"]) for r in rs if r["status"] not in ("ok", "skipped"))
        largest = max(ok) if ok else None
        if failed and (largest is None or failed[0][0] > largest):
            stopped = f"{failed[0][1]} at {failed[0][0]}"
        elif any(r["status"] == "skipped" for r in rs):
            stopped = "time (--max-seconds)"
        elif args.find_max and method in args.find_max_methods:
            stopped = f"--max-batch {args.max_batch}"
        else:
            stopped = "end of --batches (not searched)"
        out.append(
            {
                "model": model,
                "method": method,
                "max_batch": largest,
                "oom": bool(failed) and failed[0][1] == "oom",
                "stopped_by": stopped,
            }
        )
    return out


def memory_slope(rows, model: str, method: str, min_batch: int) -> float | None:
    """Least-squares slope of peak memory (bytes per sample) over ok rows with batch >= min_batch."""
    pts = [
        (r["batch"], r["peak_gib"] * 2**30)
        for r in rows
        if r["model"] == model
        and r["method"] == method
        and r["kind"] in ("sweep", "probe")
        and r["status"] == "ok"
        and r.get("peak_gib") is not None
        and r["batch"] >= min_batch
    ]
    if len({b for b, _ in pts}) < 2:
        return None
    mb = sum(b for b, _ in pts) / len(pts)
    mp = sum(p for _, p in pts) / len(pts)
    return sum((b - mb) * (p - mp) for b, p in pts) / sum((b - mb) ** 2 for b, _ in pts)


def evaluate_targets(rows, maxes, chunk_of: dict, args) -> list[dict]:
    """The issue's targets for ViT-B/16; None where this run did not measure what they need."""
    m = TARGET_MODEL
    if m not in chunk_of:
        return []
    mx = {(r["model"], r["method"]): r for r in maxes}
    ours, plain = mx.get((m, OURS)), mx.get((m, PLAIN))
    ours_max = ours and ours["max_batch"]
    plain_max = plain and plain["max_batch"]
    out = []

    def add(name, value, ok, note=None):
        out.append({"model": m, "target": name, "value": value, "pass": ok, "note": note})

    # A largest batch below the target fails it only when a limit (OOM, host memory, error) stopped
    # the search; stopped by --max-batch, time or the end of --batches it is a lower bound.
    limited = bool(ours) and ours["stopped_by"].startswith(("oom", "host-memory", "error"))
    add(
        f"{OURS} largest batch >= {TARGET_MAX_BATCH}",
        ours_max,
        None
        if ours_max is None
        else (True if ours_max >= TARGET_MAX_BATCH else (False if limited else None)),
        ours and ours["stopped_by"],
    )
    x = ours_max / plain_max if ours_max and plain_max else None
    plain_oom = bool(plain and plain["oom"])
    verdict = None
    if x is not None and plain_oom:
        verdict = True if x >= TARGET_X_PLAIN else (False if limited else None)
    add(
        f"{OURS} largest >= {TARGET_X_PLAIN}x {PLAIN} largest",
        x,
        verdict,
        f"{ours_max} / {plain_max}"
        + ("" if plain_oom else f"; {PLAIN} not searched to OOM")
        + ("" if limited else f"; {OURS} not searched to its limit: a lower bound"),
    )
    s_ours = memory_slope(rows, m, OURS, 2 * chunk_of[m])
    s_plain = memory_slope(rows, m, PLAIN, 1)
    ratio = s_ours / s_plain if s_ours is not None and s_plain else None
    add(
        f"peak memory flat beyond the chunk: slope <= {TARGET_FLAT_SLOPE:.0%} of {PLAIN}'s",
        ratio,
        None if ratio is None else ratio <= TARGET_FLAT_SLOPE,
        None
        if s_ours is None
        else f"{s_ours / 1024:.1f} KiB/sample vs {(s_plain or 0) / 2**20:.1f} MiB/sample",
    )
    bd = [r for r in rows if r["kind"] == "breakdown" and r["model"] == m and r.get("fraction") is not None]
    frac = bd[-1]["fraction"] if bd else None
    add(
        f"loss + gather + data <= {TARGET_FRACTION:.0%} of the step at b = {args.breakdown_batch}",
        frac,
        None if frac is None else frac <= TARGET_FRACTION,
    )
    return out


# ----------------------------------------------------------------------------- output


TABLE_HEAD = (
    f"| {'model':5s} | {'method':8s} | {'kind':6s} | {'batch':>7s} | {'chunk':>5s} | {'status':6s} | "
    f"{'step ms (p20-p80)':>26s} | {'samples/s':>9s} | {'peak MiB':>9s} | {'act MiB':>9s} | "
    f"{'TFLOP/s':>7s} | {'% ceil':>6s} | {'MFU':>5s} |"
)


def format_row(r) -> str:
    if r["status"] != "ok":
        return (
            f"| {r['model']:5s} | {r['method']:8s} | {r['kind']:6s} | {r['batch']:7d} | {r['chunk']:5d} | "
            f"{r['status']:6s} | {(r.get('note') or '')[:90]} |"
        )
    step = f"{r['step_ms']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f})"
    peak = None if r.get("peak_gib") is None else r["peak_gib"] * 1024
    return (
        f"| {r['model']:5s} | {r['method']:8s} | {r['kind']:6s} | {r['batch']:7d} | {r['chunk']:5d} | "
        f"{'ok':6s} | {step:>26s} | {r['samples_per_s']:9.1f} | {common.fmt(peak, '9.1f')} | "
        f"{common.fmt(r.get('saved_act_mib'), '9.2f')} | {r['tflops']:7.3g} | {r['pct_ceiling']:6.1f} | "
        f"{100 * r['mfu']:4.1f}% |"
    )


def format_report(rows, maxes, targets, meta) -> str:
    lines = [TABLE_HEAD, "|" + "|".join("-" * len(c) for c in TABLE_HEAD.strip("|").split("|")) + "|"]
    lines += [format_row(r) for r in rows if r["kind"] in ("sweep", "probe")]
    rate = meta["matmul_rate"]
    lines.append(f"\nceiling: {rate['what']} = {rate['tflops']:.2f} TFLOP/s; {meta['flop_count']}")
    lines.append("\nlargest batch per device:")
    for m in maxes:
        lines.append(f"- {m['model']} {m['method']}: {m['max_batch']} (stopped by {m['stopped_by']})")
    for r in rows:
        if r["kind"] != "breakdown":
            continue
        if r.get("fraction") is None:
            lines.append(f"\nbreakdown {r['model']} b={r['batch']}: {r['status']} {r.get('note') or ''}")
            continue
        lines.append(
            f"\nbreakdown {r['model']} {r['method']} b={r['batch']} (chunk {r['chunk']}): "
            f"step {r['step_ms']:.2f} ms; "
            f"loss fwd+bwd {r['loss_ms']:.3f} ms, cache gather {r['gather_ms']:.3f} ms"
            + (f" (device tier {r['gather_device_ms']:.3f})" if r.get("gather_device_ms") is not None else "")
            + f", data receive {r['data_ms']:.3f} ms x {r['data_passes']} -> {r['parts_ms']:.2f} ms = "
            f"{100 * r['fraction']:.2f}% of the step"
        )
    if targets:
        lines.append(f"\ntargets (one H100 80 GB, ViT-{TARGET_MODEL}-224; this card: {meta['device_name']}):")
        for t in targets:
            verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
            v = t["value"]
            v = f"{v:.4g}" if isinstance(v, float) else v
            lines.append(f"- {t['target']}: {v} -> {verdict}" + (f" ({t['note']})" if t["note"] else ""))
    elif meta["device"] == "cpu":
        lines.append(
            "\nCPU run (tiny model, shared cores): no target is evaluated; these numbers are not targets."
        )
    return "\n".join(lines)


def plot(rows, meta, path: Path) -> bool:
    plt = common.import_pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"B/16": "-", "L/14": "--", "tiny": ":"}
    methods = list(METHODS)
    # CUDA: max_memory_allocated; CPU: the saved-activation peak (VmHWM deltas there are allocator noise)
    cuda = meta["device"] == "cuda"
    mem_of = (lambda r: r.get("peak_gib")) if cuda else (lambda r: (r.get("saved_act_mib") or 0) / 1024)
    drawn = False
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in methods:
            pts = sorted(
                (r["batch"], r["samples_per_s"], mem_of(r))
                for r in rows
                if r["model"] == model and r["method"] == method and r["kind"] in ("sweep", "probe")
                and r["status"] == "ok"
            )  # fmt: skip
            if not pts:
                continue
            kw = {"marker": "o", "color": f"C{methods.index(method)}", "label": f"{model} {method}"}
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(model, "-"), **kw)
            mem = [(b, g) for b, _, g in pts if g]
            if mem:
                ax_m.plot(*zip(*mem), styles.get(model, "-"), **kw)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    common.style_log_axes(ax_t, "batch per device", "samples/s (median step)")
    ylab = (
        "peak memory GiB (max_memory_allocated)" if cuda else "saved activations GiB (peak, autograd hooks)"
    )
    common.style_log_axes(ax_m, "batch per device", ylab)
    label = "CPU, tiny model, not targets" if meta["device"] == "cpu" else meta["device_name"]
    common.save_figure(fig, path, f"stage-2 training step, {label}")
    return True


def collect_meta(args) -> dict:
    import torch

    meta = {
        "timestamp": common.utc_timestamp(),
        "device": args.device,
        "dtype": "bf16 autocast" if args.device == "cuda" else "fp32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "loadavg_start": common.loadavg(),
        "triton": common.triton_version(),
        **common.device_meta(args.device),
        **common.git_meta(),
    }
    if args.device == "cuda":
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    meta["host_mem_available_gib"] = (mem_available_bytes() or 0) / 2**30
    meta["flop_count"] = (
        "FlopCounterMode forward per sample x (3 + 1 with the gradient cache + 1 with checkpointing) "
        "+ 8 b^2 D for the loss; MFU counts 3x forward + loss"
    )
    return meta


# ----------------------------------------------------------------------------- CLI


def _csv(xs) -> str:
    return ",".join(map(str, xs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Stage-2 training step: samples/s and peak memory against the batch size, with and "
        "without the fused loss and the gradient cache; the largest batch per device."
    )
    common.add_device_arg(p)
    p.add_argument(
        "--models",
        type=common.str_list,
        default=None,
        help=f"from {_csv(MODELS)} (default GPU B/16,L/14; CPU tiny)",
    )
    p.add_argument(
        "--methods",
        type=common.str_list,
        default=None,
        help=f"sweep methods from {_csv(METHODS)} (default all)",
    )
    p.add_argument(
        "--batches", type=common.int_list, default=None,
        help=f"sweep batches (default GPU {_csv(GPU_BATCHES)}, --quick {_csv(GPU_QUICK_BATCHES)}; "
        f"CPU {_csv(CPU_BATCHES)})",
    )  # fmt: skip
    p.add_argument(
        "--chunk-size", type=int, default=None,
        help=f"gradient-cache chunk (default per model: {CHUNK})",
    )  # fmt: skip
    p.add_argument(
        "--find-max", action=argparse.BooleanOptionalAction, default=None,
        help="double the batch until out of memory (default on for GPU, off for CPU)",
    )  # fmt: skip
    p.add_argument(
        "--find-max-methods", type=common.str_list, default=None,
        help=f"methods searched (default {OURS},{PLAIN}; --quick {PLAIN})",
    )  # fmt: skip
    p.add_argument(
        "--find-max-start", type=int, default=None,
        help="first batch of the search (default: the chunk with the gradient cache, else 64 (CPU 8))",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=int, default=None, help="largest batch the search tries (default 262144; CPU 64)"
    )
    p.add_argument(
        "--breakdown-batch", type=int, default=None,
        help="batch of the loss / gather / data breakdown (default 4096; CPU 64; 0 skips it)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case before the timed ones")
    p.add_argument(
        "--text-dim", type=int, default=None, help="LLM embedding size d_llm (default 4096; CPU 64)"
    )
    p.add_argument(
        "--embed-dim", type=int, default=None, help="shared embedding size D (default 1280; CPU 32)"
    )
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each ViT block in backward")
    p.add_argument(
        "--loss-backend", default=None, help="fused loss backend (default auto on CUDA, torch on CPU)"
    )
    p.add_argument(
        "--gather-table-mib", type=int, default=None,
        help="host cache table for the gather (default 4096 MiB, --quick 1024; CPU 64)",
    )  # fmt: skip
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up ms (breakdown, GPU)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition ms (breakdown, GPU)")
    p.add_argument(
        "--max-seconds", type=float, default=None,
        help="start no new case after this many seconds (default none; --quick on GPU 60)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help=f"GPU: {TARGET_MODEL}, {OURS} sweep, {PLAIN} search")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and synthetic data")
    common.add_output_args(p, "directory for JSON / markdown / PNG (default bench/results)")
    return p


def resolve_args(args):
    import torch

    args.device = common.resolve_device(args.device)
    gpu = args.device == "cuda"
    if args.models is None:
        args.models = ((TARGET_MODEL,) if args.quick else ("B/16", "L/14")) if gpu else ("tiny",)
    if args.methods is None:
        args.methods = (OURS,) if args.quick and gpu else tuple(METHODS)
    if args.find_max_methods is None:
        args.find_max_methods = (PLAIN,) if args.quick else (OURS, PLAIN)
    for flag, values, allowed in (
        ("--models", args.models, MODELS),
        ("--methods", args.methods, tuple(METHODS)),
        ("--find-max-methods", args.find_max_methods, tuple(METHODS)),
    ):
        if bad := [v for v in values if v not in allowed]:
            raise SystemExit(f"{flag}: unknown {bad}; choose from {allowed}")
    if args.batches is None:
        args.batches = (GPU_QUICK_BATCHES if args.quick else GPU_BATCHES) if gpu else CPU_BATCHES
    if args.find_max is None:
        args.find_max = gpu
    args.max_batch = args.max_batch or (262144 if gpu else 64)
    if args.breakdown_batch is None:
        args.breakdown_batch = 4096 if gpu else 64
    args.steps = args.steps or (2 if args.quick else 3)
    args.text_dim = args.text_dim or (4096 if gpu else 64)
    args.embed_dim = args.embed_dim or (1280 if gpu else 32)
    args.gather_table_mib = args.gather_table_mib or ((1024 if args.quick else 4096) if gpu else 64)
    if args.max_seconds is None and args.quick and gpu:
        args.max_seconds = 60.0
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    meta = collect_meta(args)
    meta["config"] = common.config_of(args)
    meta["argv"] = sys.argv if argv is None else list(argv)
    import torch

    meta["matmul_rate"] = common.matmul_rate(
        args.device, torch.bfloat16 if args.device == "cuda" else torch.float32,
        "bf16" if args.device == "cuda" else "fp32",
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    card = common.card_tag(meta["device_name"], args.device)
    quick = "quick" if args.quick else None
    stem = common.result_stem("train_throughput", args.device, card, quick, args.tag, common.file_stamp())
    json_path, md_path, png_path = (args.out / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    print(
        f"device {meta['device_name']} ({args.device}), torch {meta['torch']}, "
        f"git {meta['git_sha'] or 'n/a'}; "
        f"matmul {meta['matmul_rate']['tflops']:.2f} TFLOP/s"
        + ("  [CPU: tiny model, shared cores, not targets]" if args.device == "cpu" else "")
    )
    rows: list[dict] = []
    meta["_rows"] = rows
    models: dict = {}
    t_start = time.perf_counter()

    def doc(extra=None) -> dict:
        m = {k: v for k, v in meta.items() if not k.startswith("_")}
        return {"meta": m, "models": models, "rows": rows, **(extra or {})}

    def emit(row: dict) -> None:
        rows.append(row)
        common.write_json_atomic(json_path, doc())
        if row["kind"] == "breakdown":
            print(f"  breakdown {row['model']} b={row['batch']}: {row['status']}", flush=True)
        else:
            print("  " + format_row(row), flush=True)

    def out_of_time() -> bool:
        return bool(args.max_seconds) and time.perf_counter() - t_start > args.max_seconds

    def on_term(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    chunk_of = {}
    try:
        for name in args.models:
            st = build_state(name, args)
            chunk_of[name] = st.chunk
            models[name] = {
                "vit": st.cfg.to_dict(),
                "params": st.params,
                "fwd_gflops_per_sample": st.fwd_flops / 1e9,
                "chunk": st.chunk,
                "text_dim": args.text_dim,
                "embed_dim": args.embed_dim,
            }
            print(
                f"{name}: {st.params / 1e6:.1f} M parameters, {st.fwd_flops / 1e9:.2f} GFLOP forward per "
                f"sample, chunk {st.chunk}"
            )
            print(TABLE_HEAD)
            try:
                run_model(st, args, meta, emit, out_of_time)
            finally:
                st.images.release()
                del st
                common.free_memory(args.device)
    except (_Stop, KeyboardInterrupt):
        interrupted = True
        print("\ninterrupted: writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, old)

    maxes = max_batches(rows, args)
    targets = evaluate_targets(rows, maxes, chunk_of, args) if args.device == "cuda" else []
    meta.update(interrupted=interrupted, loadavg_end=common.loadavg(), seconds=time.perf_counter() - t_start)
    common.write_json_atomic(json_path, doc({"max_batch": maxes, "targets": targets}))
    report = format_report(rows, maxes, targets, meta)
    print("\n" + report)
    md_path.write_text(f"# stage-2 training step, {meta['device_name']} ({args.device})\n\n{report}\n")
    print(f"\nresults: {json_path}\ntable:   {md_path}")
    if not args.no_plot and plot(rows, meta, png_path):
        print(f"plot:    {png_path}")
    if interrupted:
        return 130
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
