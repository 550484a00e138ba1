// llm2clip._C: the operator schemas (TORCH_LIBRARY llm2clip), the CPU row gather and the Python
// module stub.
//
//   llm2clip::gather_rows(table, scales, index, dim, storage, out_dtype, error_flag, dedup=True)
//       out[i, :] = dequant(table[index[i]])  for i < n,  out: (n, dim) in out_dtype
//     table      (N, stride_bytes) uint8, row r = `dim` values of the storage code at r * stride
//     scales     (N,) float32 for codes 3 (int8) and 4 (fp8 e4m3fn), else None
//     index      (n,) int64 or int32, any order, duplicates allowed
//     storage    0 fp32, 1 bf16, 2 fp16, 3 int8 (q * scale), 4 fp8 e4m3fn (q * scale)
//     out_dtype  torch.bfloat16 or torch.float32 (round to nearest even from the fp32 value)
//     error_flag (>= 1,) int32 on the table's device: the CUDA kernel adds 1 per distinct
//                out-of-range id and writes zeros for its row (no host sync); the CPU op raises
//                IndexError naming the index instead and leaves the flag alone
//     dedup      CUDA only: sort the ids, read each distinct row once, scatter through the
//                inverse permutation (see gather_kernels.cu); ignored on CPU
//   llm2clip::register_host_table(table, device=-1, read_only=True) -> Tensor
//     pins a contiguous CPU tensor in place (cudaHostRegister, Mapped | Portable [| ReadOnly]) and
//     returns a CUDA tensor aliasing it (zero-copy reads over PCIe); the alias keeps the CPU
//     tensor alive and unregisters the memory when it dies. CUDA builds only (gather_cuda.cpp).
//
// The Python fake (meta) implementations live in llm2clip/cache/_ext.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>

#include "gather.h"

#ifndef LLM2CLIP_WITH_CUDA
#define LLM2CLIP_WITH_CUDA 0
#endif

namespace llm2clip {
namespace {

// Output bytes per parallel task: small enough to spread a 4k-row batch over every core, large
// enough that the task overhead (~1 us) stays invisible.
constexpr int64_t kCpuGrainBytes = 64 * 1024;

// fp8 e4m3fn -> float through a 256-entry table (the bit-twiddling conversion costs ~5 ns a value).
const std::array<float, 256>& fp8_e4m3fn_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) {
      t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    }
    return t;
  }();
  return table;
}

template <typename In>
inline float load_value(const In* src, int64_t k, const float* /*fp8 table*/) {
  return static_cast<float>(src[k]);
}
template <>
inline float load_value<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* src, int64_t k, const float* fp8) {
  return fp8[src[k].x];
}

template <typename In, typename Out, bool kScaled>
void gather_cpu_typed(const uint8_t* table, int64_t stride_bytes, const float* scales, const int64_t* ids,
                      int64_t n, int64_t dim, Out* out) {
  const int64_t grain = std::max<int64_t>(1, kCpuGrainBytes / (dim * static_cast<int64_t>(sizeof(Out))));
  const float* fp8 = fp8_e4m3fn_table().data();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = ids[i];
      const In* src = reinterpret_cast<const In*>(table + r * stride_bytes);
      Out* dst = out + i * dim;
      if constexpr (std::is_same_v<In, Out> && !kScaled) {
        std::memcpy(dst, src, static_cast<size_t>(dim) * sizeof(Out));
      } else {
        const float s = kScaled ? scales[r] : 1.0f;
        for (int64_t k = 0; k < dim; ++k) {
          float v = load_value(src, k, fp8);
          if constexpr (kScaled) v *= s;
          dst[k] = static_cast<Out>(v);
        }
      }
    }
  });
}

template <typename Out>
void gather_cpu_out(int64_t storage, const uint8_t* table, int64_t stride_bytes, const float* scales,
                    const int64_t* ids, int64_t n, int64_t dim, Out* out) {
  switch (storage) {
    case 0: return gather_cpu_typed<float, Out, false>(table, stride_bytes, scales, ids, n, dim, out);
    case 1: return gather_cpu_typed<c10::BFloat16, Out, false>(table, stride_bytes, scales, ids, n, dim, out);
    case 2: return gather_cpu_typed<c10::Half, Out, false>(table, stride_bytes, scales, ids, n, dim, out);
    case 3: return gather_cpu_typed<int8_t, Out, true>(table, stride_bytes, scales, ids, n, dim, out);
    case 4:
      return gather_cpu_typed<c10::Float8_e4m3fn, Out, true>(table, stride_bytes, scales, ids, n, dim, out);
    default: TORCH_CHECK(false, "llm2clip::gather_rows: unknown storage code ", storage);
  }
}

at::Tensor gather_rows_cpu(const at::Tensor& table, const std::optional<at::Tensor>& scales,
                           const at::Tensor& index, int64_t dim, int64_t storage, at::ScalarType out_dtype,
                           const at::Tensor& /*error_flag: CPU raises instead*/, bool /*dedup*/) {
  check_gather_args(table, scales, index, dim, storage, out_dtype);
  TORCH_CHECK(table.device().is_cpu(), "llm2clip::gather_rows (CPU): table is on ", table.device());
  const at::Tensor ids = index.to(at::kLong).contiguous();
  const int64_t n = ids.size(0);
  const int64_t rows = table.size(0);
  at::Tensor out = at::empty({n, dim}, table.options().dtype(out_dtype));
  if (n == 0) return out;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < rows, "llm2clip::gather_rows: index[", i, "] = ", id[i],
                      " is out of range for a table of ", rows, " rows");
  }
  const uint8_t* base = table.const_data_ptr<uint8_t>();
  const float* s = storage_has_scales(storage) ? scales->const_data_ptr<float>() : nullptr;
  if (out_dtype == at::kFloat) {
    gather_cpu_out<float>(storage, base, table.size(1), s, id, n, dim, out.mutable_data_ptr<float>());
  } else {
    gather_cpu_out<c10::BFloat16>(storage, base, table.size(1), s, id, n, dim,
                                  out.mutable_data_ptr<c10::BFloat16>());
  }
  return out;
}

#if !LLM2CLIP_WITH_CUDA
at::Tensor register_host_table_unavailable(const at::Tensor& /*table*/, int64_t /*device*/, bool /*read_only*/) {
  TORCH_CHECK(false,
              "llm2clip::register_host_table: llm2clip._C was built without CUDA. Rebuild with a CUDA "
              "toolkit (LLM2CLIP_FORCE_CUDA=1 pip install --no-build-isolation -e .) to map host "
              "tables for the GPU.");
}
#endif

}  // namespace
}  // namespace llm2clip

TORCH_LIBRARY(llm2clip, m) {
  m.def(
      "gather_rows(Tensor table, Tensor? scales, Tensor index, int dim, int storage, ScalarType out_dtype, "
      "Tensor(a!) error_flag, bool dedup=True) -> Tensor");
  m.def("register_host_table(Tensor table, int device=-1, bool read_only=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm2clip, CPU, m) {
  m.impl("gather_rows", &llm2clip::gather_rows_cpu);
#if !LLM2CLIP_WITH_CUDA
  m.impl("register_host_table", &llm2clip::register_host_table_unavailable);
#endif
}

// A plain C module (no pybind11): importing llm2clip._C loads this library, whose static
// initialisers register the ops above with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "llm2clip C++/CUDA ops; use them as torch.ops.llm2clip.* (see llm2clip/cache/_ext.py).",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", LLM2CLIP_WITH_CUDA) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
