"""Gather cached rows by id and dequantise them: out[i] = dequant(table[index[i], :dim]).

Two backends behind one selector (`backend=`):

* "ext": the C++/CUDA extension `llm2clip.cache._ext` (csrc/; one warp per row, 16-byte loads,
  dequantisation in registers, device-side bounds checks, no host sync). Used by "auto" when it
  imports, reports `_ext.AVAILABLE`, and applies (its optional `_ext.supports(...)` says so, or
  else: the index is a CUDA tensor).
* "torch": this file's pure-PyTorch reference and fallback: view the table bytes as the storage
  dtype, index_select the rows, dequantise in fp32 (q * scale), cast. A CPU table with a CUDA
  index is gathered on the CPU and copied over (the baseline to beat in DESIGN.md section 3).

"auto" falls back to "torch" with ONE warning per process when the extension is unavailable
(never built, failed to import, or built without CUDA); nothing is imported before the first call.
"""

from __future__ import annotations

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
