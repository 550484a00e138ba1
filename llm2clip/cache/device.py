"""DeviceRows: a batch's cache rows gathered onto the training device, from wherever the table
lives (a tier chosen once). docs/cache.md ("Device tiers and the side-stream gather").

    rows = DeviceRows(cache, device, tier="auto", dtype=torch.bfloat16)
    rows.launch(row_ids)   # (n,) int64 CPU tensor: cache.check_rows, then the gather starts
    ...                    # the step's other work, queued meanwhile on the current stream
    text = rows.wait()     # (n, dim) dtype on device; the current stream waits for the gather

Tiers, on a CUDA device:

    gpu   rows.bin copied into GPU memory; "auto" picks it when the table (and its scales) take
          less than GPU_FRACTION of the free GPU memory
    host  the read-only memory map of rows.bin page-locked in place (cudaHostRegister through the
          extension, no copy) and read by the gather kernel over PCIe
    cpu   the rows gathered on the CPU from the memory map and copied over ("auto" falls back to
          it when the host table cannot be registered: no CUDA extension, locked-memory limit)

gpu and host gather on a side stream (gather.AsyncGather); the scales (int8 / fp8 storages) are
copied to the GPU in both. On a CPU device the tier is "cpu" whatever was asked.

Every CUDA call goes through a CudaRuntime (streams, events, free memory, copies, registration):
pass another object with its methods (runtime=) to check the order of operations on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from . import gather as _gather
from .gather import AsyncGather, CudaStreams
from .reader import EmbeddingCache

TIERS = ("auto", "gpu", "host", "cpu")
GPU_FRACTION = 0.2  # "auto" copies the table to the GPU when it takes less of the free memory


class CudaRuntime(CudaStreams):
    """The CUDA calls of DeviceRows besides the streams': free memory, copies, host registration."""

    def free_memory(self, device: torch.device) -> int:
        return torch.cuda.mem_get_info(device)[0]

    def to_device(
        self, tensor: torch.Tensor, device: torch.device, non_blocking: bool = False
    ) -> torch.Tensor:
        return tensor.to(device, non_blocking=non_blocking)

    def register_host(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A CUDA alias of a CPU tensor (cudaHostRegister); RuntimeError when that is unavailable."""
        ext = _gather.ext_module()
        if ext is None:
            raise RuntimeError(_gather.ext_unavailable_reason())
        return ext.register_host_table(tensor, device)


def choose_tier(tier: str, table_bytes: int, free_bytes: int | None) -> str:
    """The tier to try first on a CUDA device: "gpu" when asked, or for "auto" when the table
    takes less than GPU_FRACTION of free_bytes; else the one asked ("host" for "auto")."""
    if tier == "gpu" or (
        tier == "auto" and free_bytes is not None and table_bytes < GPU_FRACTION * free_bytes
    ):
        return "gpu"
    return "host" if tier == "auto" else tier


class DeviceRows:
    """Gathers cache rows for a batch onto `device`; see the module docstring.

    cache: an open EmbeddingCache. device: where the rows go. tier: "auto", "gpu", "host" or
    "cpu" (CUDA devices; ignored on the CPU). dtype: of the gathered rows (bfloat16 or float32).
    check: call cache.check_rows(ids) in launch() (range check, lazy block verification); pass
    False only when the ids were checked already in this process or a data worker.
    runtime: the CUDA calls (default CudaRuntime()).
    After construction .tier says where the table is: "gpu", "host" or "cpu".
    """

    def __init__(
        self,
        cache: EmbeddingCache,
        device: torch.device | str,
        tier: str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        *,
        check: bool = True,
        runtime: CudaRuntime | None = None,
    ) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        self.cache, self.device, self.dtype, self.check = cache, torch.device(device), dtype, check
        self.table, self.scales = cache.rows_tensor(), cache.scales_tensor()
        self.tier = "cpu"
        self._runtime = runtime
        self._async: AsyncGather | None = None
        self._pending: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._runtime = runtime or CudaRuntime()
            self.tier = self._place(tier)
            if self.tier != "cpu":
                self._async = AsyncGather(self.device, streams=self._runtime)

    def _place(self, tier: str) -> str:
        rt, device = self._runtime, self.device
        if tier == "cpu":
            return "cpu"
        nbytes = self.table.numel() + (self.scales.numel() * 4 if self.scales is not None else 0)
        where = choose_tier(tier, nbytes, rt.free_memory(device) if tier == "auto" else None)
        if where == "gpu":
            self.table = rt.to_device(self.table, device)
        else:
            try:
                self.table = rt.register_host(self.table, device)
            except RuntimeError as e:  # no CUDA extension: gather on the CPU, copy the rows
                if tier == "host":
                    raise RuntimeError(f"cache tier 'host' needs the CUDA extension: {e}") from e
                return "cpu"
        if self.scales is not None:
            self.scales = rt.to_device(self.scales, device)
        return where

    def launch(self, row_ids: torch.Tensor | np.ndarray) -> None:
        """Start gathering the rows of (n,) int64 row ids (a CPU tensor, pinned for an async copy).

        Checks them first (cache.check_rows, unless check=False): an out-of-range id raises
        IndexError and a corrupt block CorruptCacheError, before anything is gathered.
        """
        if self._pending is not None:
            raise RuntimeError("DeviceRows.launch: the previous gather was never wait()ed for")
        if isinstance(row_ids, np.ndarray):
            row_ids = torch.from_numpy(np.ascontiguousarray(row_ids, dtype=np.int64))
        if self.check:
            self.cache.check_rows(row_ids)
        dim, code = self.cache.dim, self.cache.storage_code
        if self._async is None:
            out = _gather.gather_rows(self.table, self.scales, row_ids, dim, code, self.dtype)
            if self.device.type == "cuda":
                out = self._runtime.to_device(out, self.device, non_blocking=True)
            self._pending = out
            return
        ids = self._runtime.to_device(row_ids, self.device, non_blocking=True)
        self._async.launch(self.table, self.scales, ids, dim, code, self.dtype)

    def wait(self) -> torch.Tensor:
        """The (n, dim) rows of the last launch() on the device, usable on the current stream."""
        if self._async is not None:
            return self._async.wait()
        if self._pending is None:
            raise RuntimeError("DeviceRows.wait: nothing was launched")
        out, self._pending = self._pending, None
        return out
