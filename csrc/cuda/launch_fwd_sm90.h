// Launch of one Hopper forward variant (fwd/sm90_kernel.h, and the split-key merge); included only by the generated
// per-variant translation units (csrc/variants.py).
#pragma once
#include "cuda/fwd/merge.h"
#include "cuda/fwd/sm90_kernel.h"
#include "cuda/launch.h"
#include "cuda/tensor_maps.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdSm90Cfg<D, kKind>;
  constexpr auto kernel = fwd_sm90_kernel<T, D, kKind>;
  cudaError_t err = allow_smem<kernel>(Cfg::kSmem);
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
  // The general kind's staged bool mask by tensor copies (fwd/sm90_kernel.h; if the map cannot be encoded, by cp.async).
  if (Cfg::kGeneral && Cfg::kBN == 128 && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 && p.mask_st.r != 0 &&
      reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && (p.mask_st.r | p.mask_st.h | p.mask_st.b) % 16 == 0)
    work.mask_tma = encode_mask_map(&maps.mask, p, Cfg::kBN, Cfg::kBM);
  int64_t blocks = work.units;
  // Every row block of a persistent block must see a key (fwd/sm90_kernel.h): not so for lower-right causal rows
  // i < L - S, nor, with a sliding window and L > S, for rows whose window lies past the keys.
  const bool windowed = p.win_left >= 0 || p.win_right >= 0;
  const bool all_see_keys = p.S > 0 && !(p.causal == Causal::LowerRight && p.L > p.S) && !(windowed && p.L > p.S);
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
