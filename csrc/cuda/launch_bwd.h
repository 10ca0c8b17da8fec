// Launch of one mma.sync backward variant (the Delta pre-pass, bwd/wide_kernel.h or bwd/mma_kernel.h, and in
// deterministic mode the dQ pass); included only by the generated per-variant translation units (csrc/variants.py).
#pragma once
#include "cuda/bwd/mma_kernel.h"
#include "cuda/bwd/wide_kernel.h"
#include "cuda/launch.h"

namespace sdpax {
namespace cuda {

// The main loop and, in deterministic mode, the dQ pass: the dense or the packed (cuda/varlen.h) instances.
template <class T, int D, bool kGeneral, bool kPacked>
cudaError_t launch_bwd_kernels(const AttnParams& p, cudaStream_t stream) {
  using Cfg = BwdCfg<T, D, kGeneral>;
  cudaError_t err;
  // Main loop: the wide-tile kernel where its table says so (bwd/wide_kernel.h), else bwd_kernel. Both take one block
  // per (key block, batch * kv head).
  if constexpr (BwdWideCfg<T, D, kGeneral>::kUse) {
    using WCfg = BwdWideCfg<T, D, kGeneral>;
    constexpr auto kernel = bwd_wide_kernel<T, D, kGeneral, kPacked>;
    err = allow_smem<kernel>(WCfg::kSmem);
    if (err != cudaSuccess) return err;
    const int64_t n_blocks = (p.S + WCfg::kBN - 1) / WCfg::kBN;
    kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), WCfg::kThreads, WCfg::kSmem, stream>>>(p);
  } else {
    constexpr auto kernel = bwd_kernel<T, D, kGeneral, kPacked>;
    err = allow_smem<kernel>(Cfg::kSmem);
    if (err != cudaSuccess) return err;
    const int64_t n_blocks = (p.S + Cfg::kBN - 1) / Cfg::kBN;
    kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || !p.deterministic) return err;
  // Deterministic mode: dQ from its own pass (the main loop skipped the atomics).
  using DqCfg = BwdDqCfg<T, D>;
  constexpr auto dq_kernel = bwd_dq_kernel<T, D, kGeneral, kPacked>;
  err = allow_smem<dq_kernel>(DqCfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t m_blocks = (p.L + DqCfg::kBM - 1) / DqCfg::kBM;
  dq_kernel<<<static_cast<unsigned>(m_blocks * p.batch * p.hq), DqCfg::kThreads, DqCfg::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D, bool kGeneral>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_bwd_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  return p.seqs != nullptr ? launch_bwd_kernels<T, D, kGeneral, true>(p, stream)
                           : launch_bwd_kernels<T, D, kGeneral, false>(p, stream);
}

}  // namespace cuda
}  // namespace sdpax
