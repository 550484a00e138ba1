// CUDA side of llm2clip._C (compiled only when the extension is built with CUDA): the CUDA
// implementation of llm2clip::gather_rows and llm2clip::register_host_table. Schemas and the CPU
// gather: gather.cpp; kernels: gather_kernels.cu.
//
// Host code only (compiled by the C++ compiler, not nvcc); it includes c10/cuda headers but not
// ATen/cuda/CUDAContext.h, so no cuBLAS / cuSPARSE header is needed.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <tuple>

#include "gather.h"
#include "gather_kernels.h"

namespace llm2clip {
namespace {

at::Tensor gather_rows_cuda(const at::Tensor& table, const std::optional<at::Tensor>& scales,
                            const at::Tensor& index, int64_t dim, int64_t storage, at::ScalarType out_dtype,
                            const at::Tensor& error_flag, bool dedup) {
  check_gather_args(table, scales, index, dim, storage, out_dtype);
  TORCH_CHECK(table.is_cuda(), "llm2clip::gather_rows (CUDA): table is on ", table.device());
  TORCH_CHECK(error_flag.device() == table.device() && error_flag.scalar_type() == at::kInt &&
                  error_flag.numel() >= 1 && error_flag.is_contiguous(),
              "llm2clip::gather_rows: error_flag must be a contiguous int32 tensor with >= 1 element on ",
              table.device(), ", got ", error_flag.scalar_type(), " ", error_flag.sizes(), " on ",
              error_flag.device());
  const c10::cuda::CUDAGuard guard(table.device());

  at::Tensor ids = index.to(at::kLong).contiguous();
  const int64_t n = ids.size(0);
  at::Tensor out = at::empty({n, dim}, table.options().dtype(out_dtype));
  if (n == 0) return out;

  // Sort + dedup without a host sync: the permutation from torch.sort is the inverse map from
  // visiting position to output row; duplicates are found from the sorted ids in the kernels.
  at::Tensor order;
  const bool sorted = dedup && n > 1;
  if (sorted) std::tie(ids, order) = at::sort(ids, /*dim=*/0, /*descending=*/false);

  GatherLaunch a{};
  a.table = table.const_data_ptr<uint8_t>();
  a.num_rows = table.size(0);
  a.stride_bytes = table.size(1);
  a.scales = storage_has_scales(storage) ? scales->const_data_ptr<float>() : nullptr;
  a.ids = ids.const_data_ptr<int64_t>();
  a.order = sorted ? order.const_data_ptr<int64_t>() : nullptr;
  a.dedup = sorted;
  a.n = n;
  a.dim = dim;
  a.storage = static_cast<int>(storage);
  a.out = out_dtype == at::kFloat ? kOutFloat32 : kOutBFloat16;
  a.out_ptr = out.data_ptr();
  a.error_flag = error_flag.mutable_data_ptr<int32_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_gather_rows(a, stream));
  if (sorted) C10_CUDA_CHECK(launch_copy_duplicates(a, stream));
  return out;
}

at::Tensor register_host_table_cuda(const at::Tensor& table, int64_t device, bool read_only) {
  TORCH_CHECK(table.device().is_cpu(),
              "llm2clip::register_host_table expects a CPU tensor (e.g. torch.from_numpy of a read-only "
              "np.memmap), got one on ",
              table.device());
  TORCH_CHECK(table.is_contiguous(), "llm2clip::register_host_table: the table must be contiguous");
  const size_t nbytes = table.nbytes();
  TORCH_CHECK(nbytes > 0, "llm2clip::register_host_table: the table is empty");
  int dev = static_cast<int>(device);
  if (dev < 0) C10_CUDA_CHECK(cudaGetDevice(&dev));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));

  unsigned int flags = cudaHostRegisterMapped | cudaHostRegisterPortable;
  if (read_only) {
    int supported = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterReadOnlySupported, dev));
    TORCH_CHECK(supported, "llm2clip::register_host_table: device ", dev,
                " does not support cudaHostRegisterReadOnly; map the file writable (copy-on-write) and "
                "pass read_only=False");
    flags |= cudaHostRegisterReadOnly;
  }
  void* host = const_cast<void*>(table.const_data_ptr());
  cudaError_t err = cudaHostRegister(host, nbytes, flags);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "llm2clip::register_host_table: cudaHostRegister of ", nbytes, " bytes failed: ",
                cudaGetErrorString(err),
                " (is the range already registered? is `ulimit -l` large enough to lock it?)");
  }
  void* dev_ptr = nullptr;
  err = cudaHostGetDevicePointer(&dev_ptr, host, 0);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaHostUnregister(host);
    TORCH_CHECK(false, "llm2clip::register_host_table: cudaHostGetDevicePointer failed: ",
                cudaGetErrorString(err));
  }
  // The deleter owns a reference to the CPU tensor (and through it the memory map), so the host
  // memory outlives every use of the alias; it waits for the device before unpinning.
  at::Tensor keep_alive = table;
  auto deleter = [keep_alive, host, dev](void*) {
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != dev) (void)cudaSetDevice(dev);
    (void)cudaDeviceSynchronize();
    (void)cudaHostUnregister(host);
    if (previous >= 0 && previous != dev) (void)cudaSetDevice(previous);
    (void)cudaGetLastError();  // errors at interpreter exit (CUDA already shut down) are harmless
  };
  const at::Device cuda_device(at::kCUDA, static_cast<c10::DeviceIndex>(dev));
  return at::from_blob(dev_ptr, table.sizes(), table.strides(), deleter, table.options().device(cuda_device),
                       cuda_device);
}

}  // namespace
}  // namespace llm2clip

TORCH_LIBRARY_IMPL(llm2clip, CUDA, m) { m.impl("gather_rows", &llm2clip::gather_rows_cuda); }

// register_host_table takes a CPU tensor, so the dispatcher routes it by the CPU key.
TORCH_LIBRARY_IMPL(llm2clip, CPU, m) { m.impl("register_host_table", &llm2clip::register_host_table_cuda); }
