// The online softmax both forward main loops (mma_kernel.h, sm90_consumer.h) run per query row: logits in log2
// units, a running max m and a running sum l per row, and the fully-masked-row guard. The loops keep their own
// register layouts and per-element tests; the row arithmetic that decides the result is here, once.
#pragma once
#include "common/params.h"
#include "cuda/mask.h"

namespace sdpax {
namespace cuda {

// The running (max, sum) of row h before its first key tile. A sink is one more logit in the denominator: the
// running max starts at it with weight 1, counted once (by the row's thread t == 0; the sum is reduced over the
// row's four threads at the end).
__device__ __forceinline__ void softmax_start(const AttnParams& p, int h, bool with_sinks, int t, float& m, float& l) {
  m = with_sinks ? p.sinks[h] * kLog2e : -INFINITY;
  l = with_sinks && t == 0 ? 1.f : 0.f;
}

// Moves the running max m_run to include a tile whose row max is tile_max (log2 units). Returns the shift for the
// tile's exponents and sets alpha, the factor for the sum and the output so far. Fully-masked-so-far guard: while
// every logit is -inf the shift is 0, so exp2 gives 0 rather than NaN.
__device__ __forceinline__ float softmax_rescale(float& m_run, float tile_max, float& alpha) {
  const float m_new = fmaxf(m_run, tile_max);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  alpha = exp2f(m_run - m_use);
  m_run = m_new;
  return m_use;
}

// A row's normaliser and log-sum-exp (natural log) from its running max m and complete sum l. A row with no allowed
// key and no sink has l = 0: output 0 and lse -inf, never NaN.
struct SoftmaxRow {
  float inv, lse;
};
__device__ __forceinline__ SoftmaxRow softmax_finish(float m, float l) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  const float m_use = m == -INFINITY ? 0.f : m;
  return {inv, l > 0.f ? (m_use + log2f(l)) * kLn2 : -INFINITY};
}

}  // namespace cuda
}  // namespace sdpax
