// Entry points from the host glue (flash_api.cpp) into the CUDA kernels. No torch header here: the host glue
// fills an AttnParams (common/params.h) and these pick the variant and launch on the given stream.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

#include "common/params.h"
#include "cuda/plan.h"

namespace sdpax {
namespace cuda {

// The device the current stream runs on, looked up once per device.
DeviceInfo current_device();

// Forward: out, lse (and o_partial / lse_partial when num_splits > 1, followed by the merge).
cudaError_t launch_fwd(const AttnParams& p, const FwdPlan& plan, cudaStream_t stream);
// Backward: Delta into `delta` (batch*hq*L floats) and zeros into dq_accum, then dK, dV and dq_accum, or with
// p.deterministic dq directly (no dq_accum); dmask when p.dmask is set (zeroed by the caller).
cudaError_t launch_bwd(const AttnParams& p, const BwdPlan& plan, float* delta, cudaStream_t stream);
// dQ = dq_accum * scale rounded to `dtype`, one pass over the n contiguous elements (dq may be dq_accum itself for
// float). Both 16-byte aligned.
cudaError_t launch_dq_finish(const float* dq_accum, void* dq, ScalarKind dtype, int64_t n, float scale,
                             cudaStream_t stream);

// The dynamic shared memory of kernel kKernel raised to `bytes`, once per device: the attribute stays set, and the
// driver call costs as much as the launch itself on small calls (decode steps).
template <auto kKernel>
cudaError_t allow_smem(int bytes) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev >= 0 && dev < 64 ? uint64_t(1) << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// One variant (instantiated once each, in the files generated from csrc/cuda/variants.py).
template <class T, int D, FwdKind kKind>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D, FwdKind kKind>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream);
template <class T, int D, bool kGeneral>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D, bool kGeneral>
cudaError_t run_bwd_sm90(const AttnParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace sdpax
