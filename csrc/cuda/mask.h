// Which (query i, key j) elements a row may attend to, shared by the forward and backward kernels.
//
// An element is allowed iff i < L, j < S, j is visible under the causal alignment (upper-left: j <= i;
// lower-right: j <= i + S - L) and the attention mask allows it (bool: true; additive: value != -inf).
// The mask is read in place through its broadcast strides (stride 0 on broadcast dims), so a (B, 1, 1, S)
// padding mask and a dense (B, H, L, S) mask cost the same code and no L x S buffer is ever built.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/params.h"
#include "common/philox.h"

namespace sdpax {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The additive bias (natural-log units) of mask element at `off`; a bool mask gives 0 or -inf.
__device__ __forceinline__ float mask_bias(const AttnParams& p, int64_t off) {
  if (p.mask_kind == MaskKind::Bool) {
    return static_cast<const bool*>(p.mask)[off] ? 0.f : -INFINITY;
  }
  switch (p.mask_dtype) {
    case ScalarKind::BFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.mask)[off]);
    case ScalarKind::Half: return __half2float(static_cast<const __half*>(p.mask)[off]);
    default: return static_cast<const float*>(p.mask)[off];
  }
}

// Dropout of one attention row: the random words of key group j/4 decide keep/drop (common/philox.h), so the
// MATH backend and every kernel drop exactly the same elements.
struct Dropout {
  uint64_t seed, offset, threshold;
  float scale;
  __device__ __forceinline__ void init(const AttnParams& p) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[1]);
    threshold = dropout_threshold(p.dropout_p);
    scale = dropout_scale(p.dropout_p);
  }
  // Keep factors (scale or 0) of keys j and j + 1, j even.
  __device__ __forceinline__ float2 pair(uint32_t bh, uint32_t i, uint32_t j) const {
    uint32_t r[4];
    dropout_words(seed, offset, bh, i, j >> 2, r);
    const uint32_t w0 = (j & 2) ? r[2] : r[0], w1 = (j & 2) ? r[3] : r[1];  // no run-time register index
    return make_float2(w0 >= threshold ? scale : 0.f, w1 >= threshold ? scale : 0.f);
  }
  __device__ __forceinline__ float one(uint32_t bh, uint32_t i, uint32_t j) const {
    uint32_t r[4];
    dropout_words(seed, offset, bh, i, j >> 2, r);
    const uint32_t w = (j & 2) ? ((j & 1) ? r[3] : r[2]) : ((j & 1) ? r[1] : r[0]);
    return w >= threshold ? scale : 0.f;
  }
};

// Key-visibility limit of query row i: keys [0, limit) pass the causal test and the sequence bound.
__device__ __forceinline__ int row_limit(const AttnParams& p, int i) {
  if (p.causal == Causal::None) return static_cast<int>(p.S);
  const int64_t shift = p.causal == Causal::LowerRight ? p.S - p.L : 0;
  const int64_t lim = static_cast<int64_t>(i) + 1 + shift;
  return static_cast<int>(lim < 0 ? 0 : (lim > p.S ? p.S : lim));
}

}  // namespace cuda
}  // namespace sdpax
