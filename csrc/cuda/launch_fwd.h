// Launch of one mma.sync forward variant (fwd/mma_kernel.h, and the split-key merge, fwd/merge.h); included only
// by the generated per-variant translation units (csrc/variants.py).
#pragma once
#include "cuda/fwd/mma_kernel.h"
#include "cuda/fwd/merge.h"
#include "cuda/launch.h"

namespace sdpax {
namespace cuda {

// The dense or the packed (cuda/varlen.h) instance of the variant, by p.seqs.
template <class T, int D, FwdKind kKind, bool kPacked>
cudaError_t launch_fwd_kernel(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, D, kKind>;
  constexpr auto kernel = fwd_kernel<T, D, kKind, kPacked>;
  const cudaError_t err = allow_smem<kernel>(Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  const int64_t m_blocks = (rows + Cfg::kBM - 1) / Cfg::kBM;
  const dim3 grid(static_cast<unsigned>(m_blocks * p.batch * p.hkv), 1, static_cast<unsigned>(p.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D, FwdKind kKind>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream) {
  const cudaError_t err = p.seqs != nullptr ? launch_fwd_kernel<T, D, kKind, true>(p, stream)
                                            : launch_fwd_kernel<T, D, kKind, false>(p, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  return launch_merge<T>(p, stream);
}

}  // namespace cuda
}  // namespace sdpax
