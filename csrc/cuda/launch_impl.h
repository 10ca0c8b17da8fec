// Launch code of one variant; included only by the generated per-variant translation units.
#pragma once
#include "cuda/bwd_kernel.h"
#include "cuda/bwd_wide.h"
#include "cuda/fwd_kernel.h"
#include "cuda/launch.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, D, kKind>;
  auto kernel = fwd_kernel<T, D, kKind>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  const int64_t m_blocks = (rows + Cfg::kBM - 1) / Cfg::kBM;
  const dim3 grid(static_cast<unsigned>(m_blocks * p.batch * p.hkv), 1, static_cast<unsigned>(p.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_merge<T>(p, stream);
}

template <class T, int D, bool kGeneral>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream) {
  using Cfg = BwdCfg<T, D, kGeneral>;
  const int64_t all_rows = p.batch * p.hq * p.L;
  bwd_delta_kernel<T><<<static_cast<unsigned>((all_rows + 7) / 8), 256, 0, stream>>>(p, const_cast<float*>(p.delta));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Main loop: the wide-tile kernel where its table says so (bwd_wide.h), else bwd_kernel. Both take one block
  // per (key block, batch * kv head).
  if constexpr (BwdWideCfg<T, D, kGeneral>::kUse) {
    using WCfg = BwdWideCfg<T, D, kGeneral>;
    auto kernel = bwd_wide_kernel<T, D, kGeneral>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WCfg::kSmem);
    if (err != cudaSuccess) return err;
    const int64_t n_blocks = (p.S + WCfg::kBN - 1) / WCfg::kBN;
    kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), WCfg::kThreads, WCfg::kSmem, stream>>>(p);
  } else {
    auto kernel = bwd_kernel<T, D, kGeneral>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    if (err != cudaSuccess) return err;
    const int64_t n_blocks = (p.S + Cfg::kBN - 1) / Cfg::kBN;
    kernel<<<static_cast<unsigned>(n_blocks * p.batch * p.hkv), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || !p.deterministic) return err;
  // Deterministic mode: dQ from its own pass (bwd_kernel skipped the atomics).
  using DqCfg = BwdDqCfg<T, D>;
  auto dq_kernel = bwd_dq_kernel<T, D, kGeneral>;
  err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DqCfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t m_blocks = (p.L + DqCfg::kBM - 1) / DqCfg::kBM;
  dq_kernel<<<static_cast<unsigned>(m_blocks * p.batch * p.hq), DqCfg::kThreads, DqCfg::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
