// Launch code of one sm90 forward variant; included only by the generated per-variant translation units
// (fwd_sm90_*.cu, from csrc/cuda/variants.py).
#pragma once
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "cuda/fwd_kernel.h"  // merge_splits_kernel: the split-key merge is the same for both main loops
#include "cuda/fwd_sm90.h"
#include "cuda/launch.h"

namespace sdpax {
namespace cuda {

namespace {

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

template <class T, int D, FwdKind kKind>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdSm90Cfg<D, kKind>;
  auto kernel = fwd_sm90_kernel<T, D, kKind>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  FwdTmaMaps maps{};
  if (!(encode_map<T>(&maps.k, p.k, p.k_st, p.batch, p.hkv, p.S, p.E, Cfg::kBN) &&
                      encode_map<T>(&maps.v, p.v, p.v_st, p.batch, p.hkv, p.S, p.Ev, Cfg::kBN)))
    return cudaErrorInvalidValue;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  const int64_t m_blocks = (rows + Cfg::kBM - 1) / Cfg::kBM;
  // One row block per thread block; or (kMulti, enough work) a persistent grid of one block per SM walking pairs of
  // row blocks (FwdSm90Work): equal causal work per pair, so the round robin stays balanced.
  FwdSm90Work work{static_cast<int>(m_blocks * p.batch * p.hkv), 0, 0};
  // The general kind's staged bool mask by tensor copies (fwd_sm90.h; if the map cannot be encoded, by cp.async).
  if (Cfg::kGeneral && Cfg::kBN == 128 && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 && p.mask_st.r != 0 &&
      reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && (p.mask_st.r | p.mask_st.h | p.mask_st.b) % 16 == 0)
    work.mask_tma = encode_mask_map(&maps.mask, p, Cfg::kBN, Cfg::kBM);
  int64_t blocks = work.units;
  // Every row block of a persistent block must see a key (fwd_sm90.h): not so for lower-right causal rows
  // i < L - S.
  const bool all_see_keys = p.S > 0 && !(p.causal == Causal::LowerRight && p.L > p.S);
  if (Cfg::kMulti && p.num_splits == 1 && m_blocks >= 2 && all_see_keys) {
    int dev = 0, sms = 0;
    err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    const int64_t pairs = (m_blocks + 1) / 2 * p.batch * p.hkv;
    if (pairs >= sms) {  // fewer pairs than SMs: one row block per thread block keeps more SMs busy
      work = FwdSm90Work{static_cast<int>(pairs), 1, 0};
      blocks = sms;
    }
  }
  const dim3 grid(static_cast<unsigned>(blocks), 1, static_cast<unsigned>(p.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p, maps, work);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_merge<T>(p, stream);
}

}  // namespace cuda
}  // namespace sdpax
