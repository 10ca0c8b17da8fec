// Host side of TMA: tensor maps of the (batch, head, row, column) tensors the Hopper loops copy, encoded through
// the runtime's driver entry point (so the extension does not link libcuda).
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "common/params.h"

namespace sdpax {
namespace cuda {
namespace {  // internal linkage: each variant's translation unit that launches a Hopper loop has its own copy

// cuTensorMapEncodeTiled through the runtime's driver entry point, so the extension does not link libcuda.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// 4-D map of a (batch, head, row, column) tensor of `elem_bytes`-byte elements with element strides `st`: boxes of
// `box_cols` columns x `rows` rows of one head, 128-byte swizzle (the Sw128Tile layout), zero fill outside (columns
// past `cols`, rows past `n`).
bool encode_4d(CUtensorMap* map, CUtensorMapDataType dt, int elem_bytes, const void* base, const Strides4& st,
               int64_t batch, int64_t heads, int64_t n, int64_t cols, int box_cols, int rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  // Strides of size-1 dims are never stepped; give them a legal value (a positive multiple of 16 bytes).
  auto stride = [&](int64_t size, int64_t s) { return static_cast<cuuint64_t>(size > 1 ? s * elem_bytes : 16); };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(n),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {stride(n, st.r), stride(heads, st.h), stride(batch, st.b)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  return encode(map, dt, 4, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Q / K / V / O-like 16-bit tensors: boxes of 64 columns (128 bytes) x `rows` rows.
template <class T>
bool encode_map(CUtensorMap* map, const void* base, const Strides4& st, int64_t batch, int64_t heads, int64_t n,
                int64_t cols, int rows) {
  const CUtensorMapDataType dt =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode_4d(map, dt, 2, base, st, batch, heads, n, cols, 64, rows);
}

// The bool mask as bytes (key, row, head, batch): boxes of `keys` x `rows`, zero fill past S and L. A dim the mask
// broadcasts (stride 0) gets size 1. The caller has checked the 16-byte alignment of the base and of the strides,
// and that the mask has rows (mask_st.r != 0).
bool encode_mask_map(CUtensorMap* map, const AttnParams& p, int keys, int rows) {
  return encode_4d(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.mask, p.mask_st, p.mask_st.b != 0 ? p.batch : 1,
                   p.mask_st.h != 0 ? p.hq : 1, p.L, p.S, keys, rows);
}

}  // namespace
}  // namespace cuda
}  // namespace sdpax
