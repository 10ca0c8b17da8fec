// Entry points from the host glue (flash_api.cpp) into the CUDA kernels. No torch header here: the host glue
// fills an AttnParams (common/params.h) and these pick the variant and launch on the given stream.
#pragma once
#include <cuda_runtime_api.h>

#include "common/params.h"

namespace sdpax {
namespace cuda {

// How a forward call runs: the kernel kind (0 plain, 1 mask/dropout, 2 decode; see fwd_kernel.h) and the number of
// key splits (> 1 when the grid alone would leave most multiprocessors idle). The host sizes the split workspace
// (o_partial, lse_partial) from it before launch_fwd.
struct FwdPlan {
  int kind = 0;
  int num_splits = 1;
  bool sm90 = false;  // run the Hopper main loop (fwd_sm90.h) of this kind instead of fwd_kernel.h
};
FwdPlan plan_fwd(const AttnParams& p, int num_sms);
// Query rows per inner step of the backward for this head dim: a mask broadcast over rows gets one gradient
// partial sum per such tile (the host sizes the deterministic scratch from it).
int bwd_tile_rows(int64_t head_dim, ScalarKind dtype);

// Forward: out, lse (and o_partial / lse_partial when num_splits > 1, followed by the merge).
cudaError_t launch_fwd(const AttnParams& p, const FwdPlan& plan, cudaStream_t stream);
// Backward: Delta into `delta` (batch*hq*L floats) and zeros into dq_accum, then dK, dV and dq_accum, or with
// p.deterministic dq directly (no dq_accum); dmask when p.dmask is set (zeroed by the caller).
cudaError_t launch_bwd(const AttnParams& p, float* delta, cudaStream_t stream);
// dQ = dq_accum * scale rounded to `dtype`, one pass over the n contiguous elements (dq may be dq_accum itself for
// float). Both 16-byte aligned.
cudaError_t launch_dq_finish(const float* dq_accum, void* dq, ScalarKind dtype, int64_t n, float scale,
                             cudaStream_t stream);

// One variant (instantiated once each, in the files generated from csrc/cuda/variants.py).
template <class T, int D, int kKind>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D, int kKind>
cudaError_t run_fwd_sm90(const AttnParams& p, cudaStream_t stream);
template <class T, int D, bool kGeneral>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D, bool kGeneral>
cudaError_t run_bwd_sm90(const AttnParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace sdpax
