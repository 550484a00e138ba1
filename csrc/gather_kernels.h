// Launchers of the CUDA row-gather kernels (csrc/gather_kernels.cu).
//
// This header is shared by the nvcc-compiled kernels and the host-compiled torch bindings
// (csrc/gather_cuda.cpp), so it includes no torch header: gather_kernels.cu compiles with the CUDA
// headers alone (seconds, not the minutes a .cu that includes ATen takes).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace llm2clip {

// Storage codes of the cache's row table (llm2clip/cache/format.py; keep exactly).
enum StorageCode : int {
  kStorageFloat32 = 0,   // fp32
  kStorageBFloat16 = 1,  // bf16
  kStorageFloat16 = 2,   // fp16
  kStorageInt8 = 3,      // int8 + per-row fp32 scale: q * scale
  kStorageFloat8 = 4,    // fp8 e4m3fn + per-row fp32 scale: q * scale
};

// Output element types.
enum OutCode : int { kOutFloat32 = 0, kOutBFloat16 = 1 };

struct GatherLaunch {
  const uint8_t* table;    // row r starts at table + r * stride_bytes; 16-byte aligned
  int64_t num_rows;        // N; ids outside [0, N) are out of range
  int64_t stride_bytes;    // multiple of 16, >= dim * element size
  const float* scales;     // (N,) per-row scales for codes 3 and 4, else nullptr
  const int64_t* ids;      // (n,) row ids in visiting order
  const int64_t* order;    // (n,) or nullptr: visiting position i writes output row order[i] (else i)
  bool dedup;              // ids are sorted: a position whose id equals its predecessor's skips the
                           // table; launch_copy_duplicates fills it afterwards
  int64_t n;               // number of rows to gather
  int64_t dim;             // values per row
  int storage;             // StorageCode
  int out;                 // OutCode
  void* out_ptr;           // (n, dim) contiguous output
  int32_t* error_flag;     // += 1 for every distinct out-of-range id (its output row is zeros)
};

// Gather the table rows (each distinct id read once when dedup) into the output. Asynchronous on
// `stream`; returns the launch error, if any.
cudaError_t launch_gather_rows(const GatherLaunch& args, cudaStream_t stream);

// With dedup: copy each duplicate's row from its first occurrence's output row (device to device).
// Must run after launch_gather_rows on the same stream.
cudaError_t launch_copy_duplicates(const GatherLaunch& args, cudaStream_t stream);

}  // namespace llm2clip
