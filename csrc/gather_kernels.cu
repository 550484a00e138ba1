// CUDA row gather for the caption-embedding cache: out[i] = dequant(table[ids[i]]).
//
// Recipe (DGL/GraphBolt, HugeCTR, FBGEMM; docs/cache.md, "Device tiers and the side-stream gather"):
//   - a group of G threads per row (G = 1..32, a sub-warp for short rows, a warp for long ones);
//     each thread issues kUnroll 16-byte loads before it converts anything, so a warp keeps
//     32 * kUnroll * 16 B = 2 KiB in flight; rows are 128-byte padded, so a row's last 16-byte
//     chunk never leaves its row's padding even when dim * itemsize is not a multiple of 16;
//   - the grid is capped at kBlocksPerSM blocks per SM and loops over rows (grid-stride);
//   - int8 / fp8-e4m3 rows are dequantised in registers (q * per-row fp32 scale) and written as
//     bf16 (round to nearest even) or fp32, exactly what `(q.float() * scale).to(out_dtype)` gives;
//   - out-of-range ids add 1 to a device error flag and write a row of zeros: no host sync;
//   - with `dedup` the ids arrive sorted (torch.sort in gather_cuda.cpp) with the permutation that
//     sorted them: a position whose id equals its predecessor's skips the table, and a second,
//     cheap kernel copies its output row from the first occurrence's (found by binary search in
//     the sorted ids), so every distinct row crosses PCIe / HBM once.
//
// The same kernel reads a GPU-resident table and a host table mapped with cudaHostRegister
// (zero-copy over PCIe): the table pointer is all it needs.
//
// No torch header here (see gather_kernels.h). Tuning constants are first guesses, not yet swept
// on a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <atomic>

#include "gather_kernels.h"

namespace llm2clip {
namespace {

constexpr int kThreads = 256;     // threads per block (8 warps)
constexpr int kUnroll = 4;        // 16-byte loads in flight per thread
constexpr int kBlocksPerSM = 4;   // grid cap: 132 SMs * 4 * 256 = 135k threads on an H100 SXM
constexpr int kMaxDevices = 64;

int num_sms() {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) v = 1;
  if (dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// ------------------------------------------------------------------------------- decoding
// Chunk<S>::decode turns one 16-byte chunk (kElems values, little-endian) into floats.

template <int S>
struct Chunk;

template <>
struct Chunk<kStorageFloat32> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ void decode(const uint4& v, float, float (&f)[kElems]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};

template <>
struct Chunk<kStorageBFloat16> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void decode(const uint4& v, float, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
};

template <>
struct Chunk<kStorageFloat16> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void decode(const uint4& v, float, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      __half2_raw raw;
      raw.x = static_cast<unsigned short>(w[k] & 0xffffu);
      raw.y = static_cast<unsigned short>(w[k] >> 16);
      const float2 p = __half22float2(__half2(raw));
      f[2 * k] = p.x;
      f[2 * k + 1] = p.y;
    }
  }
};

template <>
struct Chunk<kStorageInt8> {
  static constexpr int kElems = 16;
  static __device__ __forceinline__ void decode(const uint4& v, float scale, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int8_t q = static_cast<int8_t>((w[k] >> (8 * b)) & 0xffu);
        f[4 * k + b] = static_cast<float>(q) * scale;
      }
    }
  }
};

template <>
struct Chunk<kStorageFloat8> {
  static constexpr int kElems = 16;
  static __device__ __forceinline__ void decode(const uint4& v, float scale, float (&f)[kElems]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Two e4m3 bytes -> two halves (exact: every e4m3fn value is an fp16 value), hardware cvt
        // on sm_89+.
        const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((w[k] >> (16 * h)) & 0xffffu);
        const float2 p = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        f[4 * k + 2 * h] = p.x * scale;
        f[4 * k + 2 * h + 1] = p.y * scale;
      }
    }
  }
};

// ------------------------------------------------------------------------------- storing

template <typename OutT>
__device__ __forceinline__ OutT to_out(float x);
template <>
__device__ __forceinline__ float to_out<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Vector store of one decoded chunk; dst is aligned to min(16, E * sizeof(OutT)) bytes. __stwb is an
// ordinary (write-back) store; the intrinsic keeps nvcc from splitting it into 32-bit stores.
template <int E>
__device__ __forceinline__ void store_chunk(float* dst, const float (&f)[E]) {
#pragma unroll
  for (int k = 0; k < E; k += 4) {
    __stwb(reinterpret_cast<float4*>(dst + k), make_float4(f[k], f[k + 1], f[k + 2], f[k + 3]));
  }
}

template <int E>
__device__ __forceinline__ void store_chunk(__nv_bfloat16* dst, const float (&f)[E]) {
  if constexpr (E == 4) {
    __stwb(reinterpret_cast<uint2*>(dst), make_uint2(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3])));
  } else {
#pragma unroll
    for (int k = 0; k < E; k += 8) {
      __stwb(reinterpret_cast<uint4*>(dst + k),
             make_uint4(pack_bf16x2(f[k], f[k + 1]), pack_bf16x2(f[k + 2], f[k + 3]),
                        pack_bf16x2(f[k + 4], f[k + 5]), pack_bf16x2(f[k + 6], f[k + 7])));
    }
  }
}

// ------------------------------------------------------------------------------- kernels

template <int S, typename OutT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    gather_rows_kernel(const GatherLaunch a, const int group_log2, const bool vec_out) {
  constexpr int E = Chunk<S>::kElems;
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_in_grid = static_cast<int64_t>(gridDim.x) * (kThreads >> group_log2);
  const int64_t chunks = (a.dim + E - 1) / E;
  const int64_t full_chunks = a.dim / E;
  OutT* const out = static_cast<OutT*>(a.out_ptr);

  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> group_log2; i < a.n;
       i += groups_in_grid) {
    const int64_t id = a.ids[i];
    if (a.dedup && i > 0 && a.ids[i - 1] == id) continue;  // filled by copy_duplicates_kernel
    OutT* const dst = out + (a.order != nullptr ? a.order[i] : i) * a.dim;
    if (id < 0 || id >= a.num_rows) {
      if (lane == 0) atomicAdd(a.error_flag, 1);
      for (int64_t k = lane; k < a.dim; k += group) dst[k] = to_out<OutT>(0.f);
      continue;
    }
    const uint4* const src = reinterpret_cast<const uint4*>(a.table + id * a.stride_bytes);
    const float scale = (S == kStorageInt8 || S == kStorageFloat8) ? __ldg(a.scales + id) : 1.f;
    for (int64_t c0 = lane; c0 < chunks; c0 += static_cast<int64_t>(group) * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * group;
        if (c < chunks) v[u] = __ldg(src + c);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * group;
        if (c >= chunks) continue;
        float f[E];
        Chunk<S>::decode(v[u], scale, f);
        if (vec_out && c < full_chunks) {
          store_chunk<E>(dst + c * E, f);
        } else {
#pragma unroll
          for (int k = 0; k < E; ++k) {
            if (c * E + k < a.dim) dst[c * E + k] = to_out<OutT>(f[k]);
          }
        }
      }
    }
  }
}

// One warp per duplicate position: copy the output row of the id's first occurrence.
template <typename T>  // raw output element: uint16_t (bf16) or uint32_t (fp32)
__global__ void __launch_bounds__(kThreads) copy_duplicates_kernel(const GatherLaunch a, const bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  T* const out = static_cast<T*>(a.out_ptr);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; i < a.n;
       i += warps_in_grid) {
    const int64_t id = a.ids[i];
    if (i == 0 || a.ids[i - 1] != id) continue;
    int64_t lo = 0, hi = i;  // lower_bound of id in the sorted ids[0, i)
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (a.ids[mid] < id) lo = mid + 1; else hi = mid;
    }
    const T* const src = out + a.order[lo] * a.dim;
    T* const dst = out + a.order[i] * a.dim;
    if (vec) {
      const int64_t chunks = a.dim * static_cast<int64_t>(sizeof(T)) / 16;
      for (int64_t c = lane; c < chunks; c += 32) {
        reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(src)[c];
      }
    } else {
      for (int64_t k = lane; k < a.dim; k += 32) dst[k] = src[k];
    }
  }
}

int ceil_log2(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

int grid_for(int64_t threads) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * kBlocksPerSM;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <int S, typename OutT>
void launch_typed(const GatherLaunch& a, cudaStream_t stream) {
  constexpr int E = Chunk<S>::kElems;
  const int64_t chunks = (a.dim + E - 1) / E;
  // Threads per row: enough that each issues about kUnroll loads, at most a warp.
  int group_log2 = ceil_log2((chunks + kUnroll - 1) / kUnroll);
  if (group_log2 > 5) group_log2 = 5;
  const bool vec_out = (a.dim * static_cast<int64_t>(sizeof(OutT))) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.out_ptr) % 16 == 0;
  gather_rows_kernel<S, OutT>
      <<<grid_for(a.n << group_log2), kThreads, 0, stream>>>(a, group_log2, vec_out);
}

template <typename OutT>
cudaError_t launch_out(const GatherLaunch& a, cudaStream_t stream) {
  switch (a.storage) {
    case kStorageFloat32: launch_typed<kStorageFloat32, OutT>(a, stream); break;
    case kStorageBFloat16: launch_typed<kStorageBFloat16, OutT>(a, stream); break;
    case kStorageFloat16: launch_typed<kStorageFloat16, OutT>(a, stream); break;
    case kStorageInt8: launch_typed<kStorageInt8, OutT>(a, stream); break;
    case kStorageFloat8: launch_typed<kStorageFloat8, OutT>(a, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows(const GatherLaunch& a, cudaStream_t stream) {
  if (a.n <= 0) return cudaSuccess;
  switch (a.out) {
    case kOutFloat32: return launch_out<float>(a, stream);
    case kOutBFloat16: return launch_out<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_copy_duplicates(const GatherLaunch& a, cudaStream_t stream) {
  if (!a.dedup || a.n <= 1 || a.order == nullptr) return cudaSuccess;
  const int64_t elem = a.out == kOutFloat32 ? 4 : 2;
  const bool vec = (a.dim * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(a.out_ptr) % 16 == 0;
  const int grid = grid_for(a.n * 32);
  if (a.out == kOutFloat32) {
    copy_duplicates_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(a, vec);
  } else {
    copy_duplicates_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(a, vec);
  }
  return cudaGetLastError();
}

}  // namespace llm2clip
