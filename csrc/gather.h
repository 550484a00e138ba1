// Argument checks shared by the CPU (gather.cpp) and CUDA (gather_cuda.cpp) row-gather ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace llm2clip {

// Element bytes of a storage code (llm2clip/cache/format.py), 0 if unknown.
inline int64_t storage_itemsize(int64_t storage) {
  switch (storage) {
    case 0: return 4;  // fp32
    case 1: return 2;  // bf16
    case 2: return 2;  // fp16
    case 3: return 1;  // int8 + per-row fp32 scale
    case 4: return 1;  // fp8 e4m3fn + per-row fp32 scale
    default: return 0;
  }
}

inline bool storage_has_scales(int64_t storage) { return storage == 3 || storage == 4; }

// Checks everything that does not need the index values. Index values are checked by the CPU op
// (an error naming the index) and on the device by the CUDA op (the error flag).
inline void check_gather_args(const at::Tensor& table, const std::optional<at::Tensor>& scales,
                              const at::Tensor& index, int64_t dim, int64_t storage,
                              at::ScalarType out_dtype) {
  const int64_t itemsize = storage_itemsize(storage);
  TORCH_CHECK(itemsize > 0, "llm2clip::gather_rows: unknown storage code ", storage,
              " (0 fp32, 1 bf16, 2 fp16, 3 int8, 4 fp8_e4m3)");
  TORCH_CHECK(table.scalar_type() == at::kByte && table.dim() == 2,
              "llm2clip::gather_rows: table must be a 2-D uint8 tensor (rows, stride_bytes), got ",
              table.scalar_type(), " with shape ", table.sizes());
  TORCH_CHECK(table.stride(1) == 1 && (table.size(0) <= 1 || table.stride(0) == table.size(1)),
              "llm2clip::gather_rows: table must be contiguous (rows, stride_bytes), got strides ",
              table.strides());
  const int64_t stride_bytes = table.size(1);
  TORCH_CHECK(dim >= 1, "llm2clip::gather_rows: dim must be >= 1, got ", dim);
  TORCH_CHECK(dim * itemsize <= stride_bytes, "llm2clip::gather_rows: a row of ", dim, " values of ",
              itemsize, " bytes does not fit the table's stride of ", stride_bytes, " bytes");
  TORCH_CHECK(stride_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(table.data_ptr()) % 16 == 0,
              "llm2clip::gather_rows: rows must start 16-byte aligned (stride_bytes % 16 == 0 and a "
              "16-byte aligned data pointer; the cache format pads rows to 128 bytes and starts the "
              "data at 4 KiB), got stride ", stride_bytes);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kFloat,
              "llm2clip::gather_rows: out_dtype must be bfloat16 or float32, got ", out_dtype);
  TORCH_CHECK(index.dim() == 1, "llm2clip::gather_rows: index must be 1-D, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "llm2clip::gather_rows: index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.device() == table.device(), "llm2clip::gather_rows: index is on ", index.device(),
              " but the table is on ", table.device());
  if (storage_has_scales(storage)) {
    TORCH_CHECK(scales.has_value(), "llm2clip::gather_rows: storage code ", storage,
                " (quantised) needs per-row scales");
    const at::Tensor& s = *scales;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == table.size(0),
                "llm2clip::gather_rows: scales must be float32 of shape (", table.size(0), ",), got ",
                s.scalar_type(), " ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "llm2clip::gather_rows: scales must be contiguous");
    TORCH_CHECK(s.device() == table.device(), "llm2clip::gather_rows: scales are on ", s.device(),
                " but the table is on ", table.device());
  } else {
    TORCH_CHECK(!scales.has_value(), "llm2clip::gather_rows: storage code ", storage,
                " is not quantised; pass scales=None");
  }
}

}  // namespace llm2clip
