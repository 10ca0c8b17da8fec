// Launch code of one sm90 forward variant; included only by the generated per-variant translation units
// (fwd_sm90_*.cu, from csrc/cuda/variants.py).
#pragma once
#include "cuda/fwd_kernel.h"  // merge_splits_kernel: the split-key merge is the same for both main loops
#include "cuda/fwd_sm90.h"
#include "cuda/launch.h"

namespace sdpax {
namespace cuda {

template <class T, int D, int kKind>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdSm90Cfg<D, kKind>;
  auto kernel = fwd_sm90_kernel<T, D, kKind>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  if (err != cudaSuccess) return err;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  const int64_t m_blocks = (rows + Cfg::kBM - 1) / Cfg::kBM;
  const dim3 grid(static_cast<unsigned>(m_blocks * p.batch * p.hkv), 1, static_cast<unsigned>(p.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t all_rows = p.batch * p.hq * p.L;
  merge_splits_kernel<T><<<static_cast<unsigned>((all_rows + 7) / 8), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
