"""Gather cached rows by id and dequantise them: out[i] = dequant(table[index[i], :dim]).

Two backends behind one selector (`backend=`):

* "ext": the C++/CUDA extension `llm2clip.cache._ext` (csrc/; one warp per row, 16-byte loads,
  dequantisation in registers, device-side bounds checks, no host sync). Used by "auto" when it
  imports, reports `_ext.AVAILABLE`, and applies (its optional `_ext.supports(...)` says so, or
  else: the index is a CUDA tensor).
* "torch": this file's pure-PyTorch reference and fallback: view the table bytes as the storage
  dtype, index_select the rows, dequantise in fp32 (q * scale), cast. A CPU table with a CUDA
  index is gathered on the CPU and copied over (the baseline to beat, docs/cache.md).

"auto" falls back to "torch" with ONE warning per process when the extension is unavailable
(never built, failed to import, or built without CUDA); nothing is imported before the first call.

AsyncGather runs gather_rows on a CUDA side stream so it overlaps the work queued meanwhile on the
current stream; its stream and event calls go through a CudaStreams object, which a test replaces
with a recorder to check the order of operations on the CPU.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .format import STORAGES, storage_of

BACKENDS = ("auto", "torch", "ext")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ext_state: dict = {"loaded": False, "module": None, "reason": None, "warned": False}


def _load_ext():
    """The extension module if it is importable and AVAILABLE, else None (reason kept)."""
    st = _ext_state
    if not st["loaded"]:
        st["loaded"] = True
        try:
            from . import _ext  # the binding of the csrc/ extension (llm2clip/cache/_ext.py)
        except (ImportError, OSError, RuntimeError) as e:
            st["reason"] = f"llm2clip.cache._ext does not import ({type(e).__name__}: {e})"
        else:
            if getattr(_ext, "AVAILABLE", False):
                st["module"] = _ext
            else:
                why = getattr(_ext, "UNAVAILABLE_REASON", None) or "_ext.AVAILABLE is False"
                st["reason"] = f"llm2clip.cache._ext is unavailable ({why})"
    return st["module"]


def ext_module():
    """The extension module (llm2clip.cache._ext) if it can be used here, else None."""
    return _load_ext()


def ext_unavailable_reason() -> str | None:
    _load_ext()
    return _ext_state["reason"]


def ext_available() -> bool:
    """Whether the C++/CUDA gather extension can be used in this process."""
    return _load_ext() is not None


def available_backends() -> list[str]:
    """Concrete backends that can run here (for tests that run every path on the same inputs)."""
    return ["torch"] + (["ext"] if ext_available() else [])


def _check_args(table_u8, scales, index, dim, storage_code, out_dtype):
    if isinstance(storage_code, bool) or int(storage_code) not in range(len(STORAGES)):
        raise ValueError(f"bad storage code {storage_code!r}; known: 0..{len(STORAGES) - 1}")
    st = storage_of(int(storage_code))
    if not isinstance(table_u8, torch.Tensor) or table_u8.dtype != torch.uint8 or table_u8.ndim != 2:
        raise TypeError("table_u8 must be a (N, stride) uint8 tensor")
    if table_u8.numel() and table_u8.stride(1) != 1:
        raise ValueError("table_u8 rows must be contiguous (stride(1) == 1)")
    stride = table_u8.shape[1]
    if stride % st.itemsize or int(dim) <= 0 or int(dim) * st.itemsize > stride:
        raise ValueError(f"dim {dim} of {st.name} does not fit a row stride of {stride} bytes")
    if st.quantized:
        if scales is None:
            raise ValueError(f"storage {st.name} needs per-row scales")
        if scales.dtype != torch.float32 or scales.shape != (table_u8.shape[0],):
            raise ValueError(
                f"scales must be ({table_u8.shape[0]},) float32, got {tuple(scales.shape)} {scales.dtype}"
            )
    if not isinstance(index, torch.Tensor) or index.ndim != 1:
        raise TypeError("index must be a 1-D integer tensor")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return st


def gather_rows(
    table_u8: torch.Tensor,
    scales: torch.Tensor | None,
    index: torch.Tensor,
    dim: int,
    storage_code: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Gather and dequantise rows of a cache table.

    table_u8: (N, stride) uint8, the raw rows (stride a multiple of the storage itemsize).
    scales:   (N,) float32 per-row scales for storage codes 3 (int8) and 4 (fp8-e4m3), else None.
    index:    (n,) integer row ids, each in [0, N); on the device the output should live on.
    dim:      embedding width; dim * itemsize <= stride.
    storage_code: 0 fp32, 1 bf16, 2 fp16, 3 int8 + scale, 4 fp8-e4m3 + scale.
    out_dtype: float32, bfloat16 or float16.
    backend:  "auto" (extension when available and applicable, else torch), "torch" or "ext".
    Returns (n, dim) out_dtype on index.device. Out-of-range ids raise IndexError (torch path).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_args(table_u8, scales, index, dim, storage_code, out_dtype)
    if backend != "torch":
        ext = _load_ext()
        if ext is None:
            if backend == "ext":
                raise RuntimeError(_ext_state["reason"])
            if not _ext_state["warned"]:
                _ext_state["warned"] = True
                warnings.warn(
                    f"{_ext_state['reason']}; gathering cache rows with the PyTorch fallback",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif ext.supports(table_u8, scales, index, dim, storage_code, out_dtype):
            return ext.gather_rows(table_u8, scales, index, int(dim), int(storage_code), out_dtype)
        elif backend == "ext":
            raise ValueError(
                f"backend='ext': the extension does not support these arguments (devices "
                f"{table_u8.device}/{index.device}, storage {storage_code}, out_dtype {out_dtype})"
            )
    return gather_rows_torch(table_u8, scales, index, dim, storage_code, out_dtype)


def gather_rows_torch(table_u8, scales, index, dim, storage_code, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The pure-PyTorch reference (same arguments as gather_rows, no backend selection)."""
    st = _check_args(table_u8, scales, index, dim, storage_code, out_dtype)
    n_rows = table_u8.shape[0]
    if n_rows == 0:
        table_u8 = table_u8.contiguous()  # an empty tensor may carry any strides
    idx = index.to(table_u8.device, torch.int64)
    if idx.numel():
        bad = (idx < 0) | (idx >= n_rows)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"row id {int(idx[pos])} (position {pos} of the index) is out of range "
                f"for a table of {n_rows} rows"
            )
    q = table_u8.view(st.dtype).index_select(0, idx)[:, : int(dim)]
    if st.quantized:
        s = scales.to(table_u8.device).index_select(0, idx).unsqueeze(1)
        out = (q.to(torch.float32) * s).to(out_dtype)
    else:
        out = q.to(out_dtype)
    return out.to(index.device).contiguous()


# ---------------------------------------------------------------------------- side stream


class CudaStreams:
    """The stream and event calls of AsyncGather (torch.cuda). A test passes a recorder with the
    same methods, whose streams have wait_stream / wait_event and whose events have record / query,
    to check the order of operations without a GPU."""

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device, priority: int = 0):
        return torch.cuda.Stream(device, priority=priority)

    def use_stream(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


class AsyncGather:
    """Run gather_rows on a side stream so it overlaps the work queued on the current stream.

        ag = AsyncGather("cuda")               # one per loop: it owns a CUDA stream
        ag.launch(table, scales, ids, dim, code, torch.bfloat16)   # ids made on the current stream
        image_feats = vision(images)           # queued meanwhile on the current stream
        text_embeds = ag.wait()                # the current stream waits for the gather's event

    launch() makes the side stream wait for the current stream (the ids may still be computed),
    launches the gather there, records an event and record_stream()s the ids on the side stream;
    wait() makes the current stream wait for that event and record_stream()s the output on it, so
    the caching allocator never hands either out again too early. Neither synchronises the host.

    device: where the side stream lives (default: the table's device at launch); on a CPU device
    the gather runs inside launch(). streams: the stream/event calls (default CudaStreams()).
    """

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        priority: int = 0,
        streams: CudaStreams | None = None,
    ):
        self._device = None if device is None else _cuda_device(device)
        self._streams = streams or CudaStreams()
        self._priority = priority
        self._stream = None
        self._pending: tuple[torch.Tensor, object | None] | None = None

    @property
    def stream(self):
        """The side stream (created on first use)."""
        if self._stream is None:
            self._stream = self._streams.new_stream(self._device or _cuda_device(None), self._priority)
        return self._stream

    def launch(
        self, table_u8: torch.Tensor, scales, index: torch.Tensor, *rest, backend: str = "auto"
    ) -> None:
        """Start gather_rows(table_u8, scales, index, *rest, backend=backend); rest is
        (dim, storage_code[, out_dtype])."""
        if self._pending is not None:
            raise RuntimeError("AsyncGather.launch: the previous gather was never wait()ed for")
        args = (table_u8, scales, index, *rest)
        device = self._device if self._device is not None else table_u8.device
        if device.type != "cuda":  # nothing to overlap with: gather here and now
            self._pending = (gather_rows(*args, backend=backend), None)
            return
        self._device = device
        s = self._streams
        stream = self.stream
        stream.wait_stream(s.current_stream(self._device))
        with s.use_stream(stream):
            out = gather_rows(*args, backend=backend)
            event = s.new_event()
            event.record(stream)
        s.record_stream(index, stream)  # allocated on the current stream, read on the side stream
        self._pending = (out, event)

    def ready(self) -> bool:
        """Whether the launched gather has finished (no synchronisation)."""
        return self._pending is None or self._pending[1] is None or self._pending[1].query()

    def wait(self) -> torch.Tensor:
        """The gathered rows, usable on the current stream (no host synchronisation)."""
        if self._pending is None:
            raise RuntimeError("AsyncGather.wait: nothing was launched")
        out, event = self._pending
        self._pending = None
        if event is not None:
            current = self._streams.current_stream(self._device)
            current.wait_event(event)
            self._streams.record_stream(out, current)  # allocated on the side stream, used on this one
        return out


def _cuda_device(device) -> torch.device:
    """A CUDA device with its index (the current one when none is given)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device
