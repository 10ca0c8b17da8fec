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
// MATH backend and every kernel drop exactly the same elements. With an origin (rng {seed, offset, row0, col0},
// p.drop_origin: a block of a larger problem, context parallelism) element (i, j) draws the decision of
// (i + row0, j + col0). The vectorised paths share one Philox call among the 4 keys of a group, which holds for
// the call's keys only when col0 is a multiple of 4 (`aligned`); otherwise they draw per element.
struct Dropout {
  uint64_t seed, offset, threshold;
  float scale;
  uint32_t row0, col0;
  __device__ __forceinline__ void init(const AttnParams& p) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[1] + p.rng_seq);
    threshold = dropout_threshold(p.dropout_p);
    scale = dropout_scale(p.dropout_p);
    row0 = p.drop_origin ? static_cast<uint32_t>(p.rng[2]) : 0u;
    col0 = p.drop_origin ? static_cast<uint32_t>(p.rng[3]) : 0u;
  }
  __device__ __forceinline__ bool aligned() const { return (col0 & 3u) == 0; }
  // The four words of this call's row i and key group j4 (the group of keys 4 j4 .. 4 j4 + 3 when aligned).
  __device__ __forceinline__ void words(uint32_t bh, uint32_t i, uint32_t j4, uint32_t (&r)[4]) const {
    dropout_words(seed, offset, bh, i + row0, j4 + (col0 >> 2), r);
  }
  // Keep factors (scale or 0) of keys j and j + 1, j even.
  __device__ __forceinline__ float2 pair(uint32_t bh, uint32_t i, uint32_t j) const {
    if (col0 & 1u) return make_float2(one(bh, i, j), one(bh, i, j + 1));  // the pair may straddle two groups
    const uint32_t jj = j + col0;
    uint32_t r[4];
    dropout_words(seed, offset, bh, i + row0, jj >> 2, r);
    const uint32_t w0 = (jj & 2) ? r[2] : r[0], w1 = (jj & 2) ? r[3] : r[1];  // no run-time register index
    return make_float2(w0 >= threshold ? scale : 0.f, w1 >= threshold ? scale : 0.f);
  }
  __device__ __forceinline__ float one(uint32_t bh, uint32_t i, uint32_t j) const {
    const uint32_t jj = j + col0;
    uint32_t r[4];
    dropout_words(seed, offset, bh, i + row0, jj >> 2, r);
    const uint32_t w = (jj & 2) ? ((jj & 1) ? r[3] : r[2]) : ((jj & 1) ? r[1] : r[0]);
    return w >= threshold ? scale : 0.f;
  }
};

// tanh to float32 accuracy under -use_fast_math (which turns tanhf into tanh.approx, 2^-11 relative error: ten
// times torch's own float32 attention error once scores pass through it). |x| < 0.35: the Taylor series to x^13
// (the next term is below 1e-9 relative); beyond: (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.5, no cancellation.
__device__ __forceinline__ float tanh_f32(float x) {
  const float ax = fabsf(x);
  if (ax < 0.35f) {
    const float x2 = x * x;
    float q = 21844.f / 6081075.f;
    q = q * x2 - 1382.f / 155925.f;
    q = q * x2 + 62.f / 2835.f;
    q = q * x2 - 17.f / 315.f;
    q = q * x2 + 2.f / 15.f;
    q = q * x2 - 1.f / 3.f;
    return x + x * x2 * q;
  }
  const float e = exp2f(-2.f * kLog2e * ax);
  return copysignf((1.f - e) / (1.f + e), x);
}

// Score softcap (Gemma 2's): a scaled score x becomes cap tanh(x / cap) before the mask; the backward multiplies dS
// by the derivative 1 - tanh^2. The general kind of the mma.sync loops takes it (cuda/plan.cpp).
struct Softcap {
  bool on;
  float in_scale;  // scale / cap: tanh's argument from the raw score q.k
  float out_log2;  // cap log2(e): the capped score in log2 units from tanh
  __device__ __forceinline__ explicit Softcap(const AttnParams& p, bool allowed)
      : on(allowed && p.softcap > 0.f),
        in_scale(on ? p.scale / p.softcap : 0.f),
        out_log2(p.softcap * kLog2e) {}
};

// Key-visibility limits of query row i: keys [row_begin, row_limit) pass the causal edge, the sliding window
// (common/params.h key_begin / key_end) and the sequence bound.
__device__ __forceinline__ int row_limit(const AttnParams& p, int i) {
  const int64_t lim = key_end(p, i);
  return static_cast<int>(lim < 0 ? 0 : (lim > p.S ? p.S : lim));
}
__device__ __forceinline__ int row_begin(const AttnParams& p, int i) {
  const int64_t lo = key_begin(p, i);
  return static_cast<int>(lo < 0 ? 0 : (lo > p.S ? p.S : lo));
}

// The packed rows (G * L per KV head) and key tiles a forward block covers, for both forward main loops: one
// (batch, KV head, row block) per blockIdx.x, heaviest causal blocks first; one split of the key tiles per
// blockIdx.z.
struct FwdBlock {
  int64_t b;
  int hk, m0;          // KV head, first packed row
  int n_full;          // keys < n_full pass the causal / window end and the bound for every row of the block
  int lo_full;         // keys >= lo_full pass the window's beginning for every row of the block (0: no window)
  int t_begin, t_end;  // the key tiles of this block's split
};
// Block (batch, KV head) bhk, row block m_block (the sm90 loop's persistent blocks walk several of them).
__device__ __forceinline__ FwdBlock fwd_block_at(const AttnParams& p, int rows, int BM, int BN, int m_block,
                                                 int64_t bhk) {
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  FwdBlock blk;
  blk.b = bhk / p.hkv;
  blk.hk = static_cast<int>(bhk % p.hkv);
  blk.m0 = m_block * BM;
  // Query positions covered by the block (conservative when it spans two heads of a GQA group).
  const int r_last = min(blk.m0 + BM, rows) - 1;
  const bool one_head = blk.m0 / L == r_last / L;
  const int i_min = one_head ? blk.m0 % L : 0;
  const int i_max = one_head ? r_last % L : L - 1;
  const int n_end = row_limit(p, i_max);  // keys >= n_end are invisible to every row of the block
  blk.n_full = min(row_limit(p, i_min), S);
  // A sliding window: tiles before the first row's window are invisible to every row; keys from the last row's
  // window beginning on pass every row's beginning.
  const bool windowed = p.win_left >= 0;
  const int t_lo = windowed ? min(row_begin(p, i_min), n_end) / BN : 0;
  blk.lo_full = windowed ? row_begin(p, i_max) : 0;
  const int n_tiles = (n_end + BN - 1) / BN - t_lo;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  blk.t_begin = t_lo + static_cast<int>(blockIdx.z) * per_split;
  blk.t_end = t_lo + min(n_tiles, static_cast<int>(blockIdx.z) * per_split + per_split);
  return blk;
}
// The mma.sync forward's grid: (row block, batch, kv head) per blockIdx.x, with the row blocks of G L rows (of the
// longest sequence of a packed call), heaviest causal blocks first.
struct FwdGridIndex {
  int m_block;
  int64_t b;
  int hk;
};
__device__ __forceinline__ FwdGridIndex fwd_grid_index(const AttnParams& p, int BM) {
  const int m_blocks = static_cast<int>(((p.hq / p.hkv) * p.L + BM - 1) / BM);
  const int64_t bhk = blockIdx.x / m_blocks;
  return {m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks), bhk / p.hkv, static_cast<int>(bhk % p.hkv)};
}

}  // namespace cuda
}  // namespace sdpax
