"""Python side of the C++/CUDA row gather `llm2clip._C` (csrc/): fake kernels for torch.compile,
the sort/dedup gather, the device error flag and the host-mapped tier. A thin wrapper: the backend
choice and the side-stream gather live in gather.py, the device tiers in device.py.

    out[i, :] = dequant(table[index[i], :dim])      out: (n, dim) bf16 or fp32

The ops (schemas in csrc/gather.cpp) are `torch.ops.llm2clip.gather_rows` (CPU: at::parallel_for
over rows; CUDA: a warp or sub-warp per row, 16-byte loads, dequantised in registers) and
`torch.ops.llm2clip.register_host_table` (CUDA builds). `register_fake` below gives gather_rows
its output shape under FakeTensor, so torch.compile traces through it without a graph break.

Module contents:

    AVAILABLE            the extension imported and registered its ops
    WITH_CUDA            ... and was built with the CUDA kernels
    UNAVAILABLE_REASON   why not (None when AVAILABLE)
    gather_rows(...)     the gather (contract with llm2clip/cache/gather.py)
    supports(...)        whether gather_rows takes these arguments (else use the PyTorch fallback)
    GatherErrors         the CUDA error flag: out-of-range ids write zero rows and count here;
                         only .count() / .check() synchronise with the device
    register_host_table  zero-copy CUDA alias of a (memory-mapped) CPU table

Build and environment flags: setup.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

# ---------------------------------------------------------------------------- loading


def _load():
    if importlib.util.find_spec("llm2clip._C") is None:
        return None, (
            "llm2clip._C is not built (install torch first, then `pip install --no-build-isolation -e .`;"
            " see setup.py)"
        )
    try:
        _C = importlib.import_module("llm2clip._C")
    except (ImportError, OSError) as e:
        # Built but unloadable: usually built against another torch (undefined symbols). Say so once.
        reason = f"llm2clip._C failed to load ({type(e).__name__}: {e}); rebuild it against this torch"
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    return _C, None


_C, UNAVAILABLE_REASON = _load()
AVAILABLE: bool = _C is not None
WITH_CUDA: bool = bool(getattr(_C, "WITH_CUDA", 0))

OUT_DTYPES = (torch.bfloat16, torch.float32)
_ITEMSIZE = {0: 4, 1: 2, 2: 2, 3: 1, 4: 1}  # storage code -> bytes per value (format.py)

if AVAILABLE:

    @torch.library.register_fake("llm2clip::gather_rows")
    def _gather_rows_fake(table, scales, index, dim, storage, out_dtype, error_flag, dedup=True):
        torch._check(index.dim() == 1, lambda: f"index must be 1-D, got {index.dim()}-D")
        torch._check(table.dim() == 2 and table.dtype == torch.uint8, lambda: "table must be 2-D uint8")
        return table.new_empty((index.shape[0], dim), dtype=out_dtype)


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)


# ---------------------------------------------------------------------------- error flag


class GatherErrors:
    """Device-side error flag of the CUDA gather.

    flag: (1,) int32 on the device; every distinct out-of-range id gathered with this flag adds 1
    and its output row is written as zeros. Nothing synchronises until `count()` / `check()` is
    called: call `check()` every few hundred steps or at the end of an epoch, not every step.
    """

    def __init__(self, device: torch.device | str | int | None = None):
        self.flag = torch.zeros(1, dtype=torch.int32, device=_resolve_device(device))

    def count(self) -> int:
        """Out-of-range ids seen since the last reset (synchronises with the device)."""
        return int(self.flag.item())

    def reset(self) -> None:
        self.flag.zero_()

    def check(self, reset: bool = True) -> None:
        """Raise IndexError if any out-of-range id was gathered (synchronises with the device)."""
        n = self.count()
        if n:
            if reset:
                self.reset()
            raise IndexError(
                f"{n} out-of-range row id(s) were gathered on {self.flag.device}; their output rows "
                "are zeros (the table or the key index does not match the batch)"
            )


def _resolve_device(device) -> torch.device:
    if device is None:
        device = torch.device("cuda")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_DEFAULT_ERRORS: dict[torch.device, GatherErrors] = {}
_CPU_FLAG = torch.zeros(1, dtype=torch.int32)  # the CPU op raises instead; the schema takes a flag


def default_errors(device: torch.device | str | int | None = None) -> GatherErrors:
    """The per-device flag used when gather_rows is called without error_flag."""
    device = _resolve_device(device)
    errs = _DEFAULT_ERRORS.get(device)
    if errs is None:
        errs = _DEFAULT_ERRORS[device] = GatherErrors(device)
    return errs


def check_errors(device: torch.device | str | int | None = None) -> None:
    """default_errors(device).check(): raise if an out-of-range id was gathered (syncs)."""
    default_errors(device).check()


# ---------------------------------------------------------------------------- the gather


def supports(table_u8, scales, index, dim, storage_code, out_dtype) -> bool:
    """Whether gather_rows can take these arguments (layout, devices, dtypes); cheap, no sync."""
    if not AVAILABLE or out_dtype not in OUT_DTYPES or int(storage_code) not in _ITEMSIZE:
        return False
    if table_u8.device != index.device or (scales is not None and scales.device != table_u8.device):
        return False
    if table_u8.device.type == "cuda":
        if not WITH_CUDA:
            return False
    elif table_u8.device.type != "cpu":
        return False
    if table_u8.dtype != torch.uint8 or table_u8.dim() != 2 or table_u8.stride(1) != 1:
        return False
    stride = table_u8.shape[1]
    if table_u8.shape[0] > 1 and table_u8.stride(0) != stride:
        return False
    return (
        stride % 16 == 0
        and table_u8.data_ptr() % 16 == 0
        and 0 < int(dim) * _ITEMSIZE[int(storage_code)] <= stride
        and index.dim() == 1
        and index.dtype in (torch.int64, torch.int32)
    )


def gather_rows(
    table_u8: torch.Tensor,
    scales: torch.Tensor | None,
    index: torch.Tensor,
    dim: int,
    storage_code: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    error_flag: GatherErrors | torch.Tensor | None = None,
    dedup: bool = True,
) -> torch.Tensor:
    """Gather and dequantise rows: out[i] = dequant(table_u8[index[i], :dim * itemsize]).

    table_u8:     (N, stride_bytes) uint8, contiguous, stride_bytes % 16 == 0, 16-byte aligned data
                  (the cache format: 128-byte rows, data at 4 KiB). CPU, CUDA, or a CUDA alias of a
                  host table from register_host_table.
    scales:       (N,) float32 on the table's device for storage codes 3 and 4, else None.
    index:        (n,) int64 / int32 row ids on the table's device; any order, duplicates allowed.
    dim:          values per row.
    storage_code: 0 fp32, 1 bf16, 2 fp16, 3 int8 (q * scale), 4 fp8 e4m3fn (q * scale).
    out_dtype:    torch.bfloat16 or torch.float32.
    error_flag:   CUDA only: a GatherErrors (or its (1,) int32 flag) that counts out-of-range ids
                  (their rows come back as zeros); default: default_errors(table device) (under
                  torch.compile create it before compiling, or pass one).
                  On CPU an out-of-range id raises IndexError naming it.
    dedup:        CUDA only: sort the ids and read each distinct row once (no host sync).
    Returns (n, dim) out_dtype on the table's device.
    """
    _require()
    if table_u8.device.type == "cuda":
        if error_flag is None:
            error_flag = default_errors(table_u8.device)
        flag = error_flag.flag if isinstance(error_flag, GatherErrors) else error_flag
    else:
        flag = _CPU_FLAG
    return torch.ops.llm2clip.gather_rows(
        table_u8, scales, index, int(dim), int(storage_code), out_dtype, flag, bool(dedup)
    )


# ---------------------------------------------------------------------------- host tier


def register_host_table(
    cpu_table: torch.Tensor, device: torch.device | str | int | None = None, read_only: bool = True
) -> torch.Tensor:
    """A CUDA tensor aliasing a CPU tensor's memory, read by the GPU over PCIe (zero-copy).

    The memory is page-locked in place with cudaHostRegister(Mapped | Portable | ReadOnly), never
    copied and never rounded up (unlike tensor.pin_memory(), whose caching allocator pins the next
    power of two). Typical use on a read-only memory map of a cache file::

        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=4096, shape=(rows, stride))
        cpu = torch.from_numpy(mm)          # warns that the array is read-only: fine, never written
        table = register_host_table(cpu)    # (rows, stride) uint8 on cuda; pass it to gather_rows

    The alias holds a reference to `cpu_table` (and so to the map) and unregisters the memory when
    it is freed. Register a memory range once: ranges sharing a page with a registered one fail.
    Locking needs `ulimit -l` (RLIMIT_MEMLOCK) large enough. read_only=False is for writable
    mappings on devices without ReadOnly registration support.
    """
    _require()
    if not WITH_CUDA:
        raise RuntimeError("llm2clip._C was built without CUDA: register_host_table is unavailable")
    index = -1 if device is None else _resolve_device(device).index
    return torch.ops.llm2clip.register_host_table(cpu_table, index, bool(read_only))
