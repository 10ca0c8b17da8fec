// Launch code of one sm90 backward variant; included only by the generated per-variant translation units
// (bwd_sm90_*.cu, from csrc/cuda/variants.py).
#pragma once
#include "cuda/bwd_kernel.h"  // bwd_delta_kernel: the Delta pre-pass is the same for every main loop
#include "cuda/bwd_sm90.h"
#include "cuda/launch_sm90.h"  // encode_map (tensor maps with the 128-byte swizzle)

namespace sdpax {
namespace cuda {

// The bool mask (general kind, a mask with rows) as a 4-D byte tensor (key, row, head, batch): boxes of kBN keys x
// kBM rows, 128-byte swizzle (the raw buffers' layout), zero fill past S and L. A dim the mask broadcasts (stride 0)
// gets size 1. bwd_sm90_general_ok has checked the 16-byte alignment of the base and the strides.
template <class Cfg>
bool encode_mask_map(CUtensorMap* map, const AttnParams& p) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const int64_t heads = p.mask_st.h != 0 ? p.hq : 1, batch = p.mask_st.b != 0 ? p.batch : 1;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.S), static_cast<cuuint64_t>(p.L),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(p.mask_st.r),
                                 static_cast<cuuint64_t>(heads > 1 ? p.mask_st.h : 16),
                                 static_cast<cuuint64_t>(batch > 1 ? p.mask_st.b : 16)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(Cfg::kBN), static_cast<cuuint32_t>(Cfg::kBM), 1, 1};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void*>(p.mask), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// kGeneral: the table's kind (launch.cu picks the general one only where bwd_sm90_general_ok holds). Returns cudaErrorNotSupported, having launched nothing, when a tensor map cannot be encoded (launch.cu then runs
// the mma.sync backward).
template <class T, int D, bool kGeneral>
cudaError_t run_bwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = BwdSm90Cfg<D, kGeneral>;
  BwdTmaMaps maps{};
  if (!(encode_map<T>(&maps.q, p.q, p.q_st, p.batch, p.hq, p.L, p.E, Cfg::kBM) &&
        encode_map<T>(&maps.dout, p.dout, p.dout_st, p.batch, p.hq, p.L, p.Ev, Cfg::kBM) &&
        encode_map<T>(&maps.k, p.k, p.k_st, p.batch, p.hkv, p.S, p.E, Cfg::kBN) &&
        encode_map<T>(&maps.v, p.v, p.v_st, p.batch, p.hkv, p.S, p.Ev, Cfg::kBN)))
    return cudaErrorNotSupported;
  if (kGeneral && p.mask_kind == MaskKind::Bool && p.mask_st.r != 0 && !encode_mask_map<Cfg>(&maps.mask, p))
    return cudaErrorNotSupported;
  const int64_t all_rows = p.batch * p.hq * p.L;
  bwd_delta_kernel<T><<<static_cast<unsigned>((all_rows + 7) / 8), 256, 0, stream>>>(p, const_cast<float*>(p.delta));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto kernel = bwd_sm90_kernel<T, D, kGeneral>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t n_blocks = (p.S + Cfg::kBN - 1) / Cfg::kBN;
  kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), Cfg::kThreads, Cfg::kSmem, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
