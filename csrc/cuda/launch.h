// Entry points from the host glue (flash_api.cpp) into the CUDA kernels. No torch header here: the host glue
// fills an AttnParams (common/params.h) and these pick the variant and launch on the given stream.
#pragma once
#include <cuda_runtime_api.h>

#include "common/params.h"

namespace sdpax {
namespace cuda {

// Rows (query positions x heads of a GQA group) per forward block for head dims up to `head_dim`; the host uses
// it to size the split-key decode path.
int fwd_block_rows(int64_t head_dim);
int fwd_block_cols(int64_t head_dim);
// Largest head dim (max of E and Ev) the fused backward handles.
int bwd_max_head_dim();

// Forward: out, lse (and o_partial / lse_partial when num_splits > 1, followed by the merge).
cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream);
// Backward: Delta into `delta` (batch*hq*L floats), then dK, dV and dq_accum (zeroed by the caller).
cudaError_t launch_bwd(const AttnParams& p, float* delta, cudaStream_t stream);

// One variant (instantiated once each, in the files generated from csrc/cuda/variants.py).
template <class T, int D, bool kGeneral>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D, bool kGeneral>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace sdpax
