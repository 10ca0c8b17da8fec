// Variant dispatch: run-time dtype / head dim / mask kind -> the template instantiation listed in the generated
// gen/variants.h (from csrc/cuda/variants.py). Kernels are instantiated in their own translation units.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/fwd_kernel.h"
#include "cuda/launch.h"
#include "cuda/gen/variants.h"

namespace sdpax {
namespace cuda {

#define SDPAX_DECLARE(pass, ctype, kind, d, flag) \
  extern template cudaError_t run_##pass<ctype, d, flag>(const AttnParams&, cudaStream_t);
SDPAX_CUDA_VARIANTS(SDPAX_DECLARE)
#undef SDPAX_DECLARE

namespace {

int bucket(int64_t head_dim) {
  for (int b : SDPAX_CUDA_FWD_HEAD_DIMS)
    if (head_dim <= b) return b;
  return -1;
}

bool general(const AttnParams& p) { return p.mask_kind != MaskKind::None || p.dropout_p > 0.0; }

}  // namespace

int fwd_block_rows(int64_t head_dim) {
  switch (bucket(head_dim)) {
    case 64: return FwdCfg<64, false>::kBM;
    case 128: return FwdCfg<128, false>::kBM;
    default: return FwdCfg<256, false>::kBM;
  }
}
int fwd_block_cols(int64_t head_dim) {
  switch (bucket(head_dim)) {
    case 64: return FwdCfg<64, false>::kBN;
    case 128: return FwdCfg<128, false>::kBN;
    default: return FwdCfg<256, false>::kBN;
  }
}
int bwd_max_head_dim() { return SDPAX_CUDA_BWD_MAX_HEAD_DIM; }

cudaError_t launch_fwd(const AttnParams& p, cudaStream_t stream) {
  const int d = bucket(std::max(p.E, p.Ev));
  const bool gen = general(p);
#define SDPAX_CASE_fwd(ctype, kind, dd, flag) \
  if (p.dtype == ScalarKind::kind && d == dd && gen == flag) return run_fwd<ctype, dd, flag>(p, stream);
#define SDPAX_CASE_bwd(ctype, kind, dd, flag)
#define SDPAX_CASE(pass, ctype, kind, dd, flag) SDPAX_CASE_##pass(ctype, kind, dd, flag)
  SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_fwd
#undef SDPAX_CASE_bwd
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd(const AttnParams& p, float* delta, cudaStream_t stream) {
  AttnParams q = p;
  q.delta = delta;
  const int d = bucket(std::max(p.E, p.Ev));
  const bool gen = general(p);
#define SDPAX_CASE_fwd(ctype, kind, dd, flag)
#define SDPAX_CASE_bwd(ctype, kind, dd, flag) \
  if (p.dtype == ScalarKind::kind && d == dd && gen == flag) return run_bwd<ctype, dd, flag>(q, stream);
  SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_fwd
#undef SDPAX_CASE_bwd
#undef SDPAX_CASE
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdpax
