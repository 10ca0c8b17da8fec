// Launch code of one sm90 backward variant; included only by the generated per-variant translation units
// (bwd_sm90_*.cu, from csrc/cuda/variants.py).
#pragma once
#include "cuda/bwd/sm90_kernel.h"
#include "cuda/launch.h"
#include "cuda/tensor_maps.h"

namespace sdpax {
namespace cuda {

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
  // The bool mask with rows (bwd_sm90_general_ok has checked its alignment; launch_sm90.h's encoder).
  if (kGeneral && p.mask_kind == MaskKind::Bool && p.mask_st.r != 0 &&
      !encode_mask_map(&maps.mask, p, Cfg::kBN, Cfg::kBM))
    return cudaErrorNotSupported;
  cudaError_t err = launch_bwd_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  constexpr auto kernel = bwd_sm90_kernel<T, D, kGeneral>;
  err = allow_smem<kernel>(Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t n_blocks = (p.S + Cfg::kBN - 1) / Cfg::kBN;
  kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), Cfg::kThreads, Cfg::kSmem, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
