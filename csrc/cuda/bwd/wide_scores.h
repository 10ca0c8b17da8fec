// From S^T and dP^T to P^T and dS^T in the wide-tile backward loop (bwd/wide_kernel.h): the general kind's mask (the
// vote that skips tiles no element of which is allowed, the allowed bits, the additive bias), causal / bounds limits,
// P^T = exp2(S^T scale log2(e) - lse log2(e)), dropout (the keep function of common/philox.h) and
// dS^T = P^T o (dP^T - Delta).
// Element (mt, n, hf, c) of a thread's S^T / dP^T fragments is key j0 + 32 wk + 16 mt + 8 hf + g, query
// i0 + WQ wn + 8 n + 2t + c; its allowed bit is ((mt * 2 + hf) * WQ / 8 + n) * 2 + c.
// Each mask kind and the dropout choice has its own loop behind a block-uniform branch: one loop with a
// per-element choice is if-converted, and every element would issue the additive path's address arithmetic and
// loads too.
// Helpers take the kernel's state by const reference, as the lambdas they were captured it (see wide_mainloop.h).
#pragma once
#include "cuda/mask.h"

namespace sdpax {
namespace cuda {

// Allowed bits of a row-broadcast mask for head h: the 2 WQ / 8 bits of each of the thread's 4 keys (q = 2 mt + hf)
// that the mask allows (keys past S: not allowed), taken once per head.
template <int WQ, class Bits>
__device__ __forceinline__ void wide_row_bits(Bits& row_allowed, const AttnParams& p, int64_t b, int h, int j0, int wk,
                                              int g, int S) {
  constexpr Bits kRowBits = (Bits(1) << ((WQ / 8) * 2 - 1) << 1) - 1;
  const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
  row_allowed = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int j = j0 + wk * 32 + q * 8 + g;
    if (j < S && mask_bias(p, m_off + int64_t(j) * p.mask_st.c) != -INFINITY)
      row_allowed |= kRowBits << (q * (WQ / 8) * 2);
  }
}

// Allowed bits of a bool mask tile in shared memory (buffer buf; load.h's load_mask_tile): m_tile_lane[mt] is this
// lane's byte of tile row WQ wn + 2t, chunk 2 wk + mt; row r = WQ wn + 8 n + 2t + c of the swizzled tile has
// ((r >> 1) & 3) == t (WQ a multiple of 8), so the lane's bytes are constants apart.
template <int BM, int BN, int WQ, class Bits>
__device__ __forceinline__ void wide_tile_bits_smem(Bits& allowed, const unsigned char* const (&m_tile_lane)[2],
                                                    int buf) {
  const unsigned char *m0 = m_tile_lane[0] + buf * BM * BN, *m1 = m_tile_lane[1] + buf * BM * BN;
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if ((mt ? m1 : m0)[(n * 8 + c) * BN + hf * 8] != 0)
            allowed |= Bits(1) << ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c);
}

// Allowed bits of a mask read in place through its broadcast strides (elements past L / S are not read when the
// tile crosses them).
template <int WQ, class Bits>
__device__ __forceinline__ void wide_tile_bits_global(Bits& allowed, const AttnParams& p, bool cross, int64_t b, int h,
                                                      int i0, int j0, int wk, int wn, int g, int t, int L, int S) {
  const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
      const int64_t r_off = m_off + int64_t(i) * p.mask_st.r;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
          if ((!cross || (i < L && j < S)) && mask_bias(p, r_off + int64_t(j) * p.mask_st.c) != -INFINITY)
            allowed |= Bits(1) << ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c);
        }
    }
}

// Causal / window / bounds folded into the allowed bits: keys row_begin(i) <= j < row_limit(i), rows i < L.
template <int WQ, class Bits>
__device__ __forceinline__ void wide_fold_limits(Bits& allowed, const AttnParams& p, int i0, int j0, int wk, int wn,
                                                 int g, int t, int L) {
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
      const int lim = i < L ? row_limit(p, i) : 0, lo = i < L ? row_begin(p, i) : 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = j0 + wk * 32 + q * 8 + g;
        if (j >= lim || j < lo) allowed &= ~(Bits(1) << (((q * (WQ / 8) + n) * 2) + c));
      }
    }
}

// The causal / window / bounds limits of a call without a mask on a tile that crosses them: S^T = -inf where key j
// is past row i's limit or (kWindow) before its window's beginning (rows past L see no key; they are zero-padded).
// row_limit(p, i) = min(i + lim_shift, S), row_begin(p, i) = max(i + lo_shift, 0).
template <int WQ, bool kWindow>
__device__ __forceinline__ void wide_apply_limits(float (&st)[2][WQ / 8][4], int i0, int j0, int wk, int wn, int g,
                                                  int t, int L, int S, int64_t lim_shift, int64_t lo_shift) {
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
      const int64_t lim = i < L ? min(i + lim_shift, static_cast<int64_t>(S)) : 0;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if (j0 + wk * 32 + mt * 16 + hf * 8 + g >= lim ||
              (kWindow && j0 + wk * 32 + mt * 16 + hf * 8 + g < i + lo_shift))
            st[mt][n][2 * hf + c] = -INFINITY;
    }
}

// Additive mask broadcast over rows: the bias (log2 units) of each of the thread's 4 keys allowed for this head (in
// L1 after wide_row_bits read it).
template <int WQ, class Bits>
__device__ __forceinline__ void wide_key_bias(float (&key_bias)[4], const AttnParams& p, int64_t b, int h, int j0,
                                              int wk, int g, Bits row_allowed) {
  const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if ((row_allowed >> (q * (WQ / 8) * 2)) & 1)
      key_bias[q] = mask_bias(p, m_off + int64_t(j0 + wk * 32 + q * 8 + g) * p.mask_st.c) * kLog2e;
}

// Biases (log2 units) of the mask pass, per element (n, c, mt, hf).
struct WideNoBias {  // bool mask: the allowed bits alone
  __device__ __forceinline__ float operator()(int, int, int, int) const { return 0.f; }
};
struct WideKeyBias {  // additive mask broadcast over rows: one bias per key of the thread
  const float (&key_bias)[4];
  __device__ __forceinline__ float operator()(int, int, int mt, int hf) const { return key_bias[mt * 2 + hf]; }
};
template <int WQ>
struct WideElemBias {  // additive mask read in place, where allowed
  const AttnParams& p;
  const int64_t& m_off;
  const int &i0, &wn, &t, &j0, &wk, &g;
  __device__ __forceinline__ float operator()(int n, int c, int mt, int hf) const {
    const int i = i0 + wn * WQ + n * 8 + 2 * t + c, j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
    return mask_bias(p, m_off + int64_t(i) * p.mask_st.r + int64_t(j) * p.mask_st.c) * kLog2e;
  }
};

// S^T = S^T scale log2(e) + bias where allowed, -inf elsewhere (the exp2 then skips its own scaling).
template <int WQ, class Bits, class Bias>
__device__ __forceinline__ void wide_mask_pass(float (&st)[2][WQ / 8][4], const Bits& allowed, const float& scale_log2,
                                               Bias bias_of) {
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float& x = st[mt][n][2 * hf + c];
          x = (allowed >> ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c)) & 1 ? x * scale_log2 + bias_of(n, c, mt, hf)
                                                                          : -INFINITY;
        }
}

// P^T = exp2(S^T * pscale - lse2), dS^T = P^T o (dP^T - Delta) (one FFMA before the exp2), lse and Delta of buffer
// buf. kDrop: st becomes P_drop^T = P^T * keep (for dV) and dS^T = P^T o (dP^T * keep - Delta). One Philox call
// gives the words of 4 consecutive keys of one row, and the 4 lanes g = 4k..4k+3 (same t) hold exactly those keys of
// the same rows: each of them computes one of the 4 (row, key group) pairs they share (m4 = g % 4), turns its 4
// words into keep bits, and two shuffles hand every lane all 16 bits: one Philox per 4 elements.
template <bool kDrop, int BM, int WQ>
__device__ __forceinline__ void wide_exp_pass(float (&st)[2][WQ / 8][4], float (&dpt)[2][WQ / 8][4],
                                              const float& pscale, const int& i0, const int& wn, const int& t,
                                              const int& m4, const int& j0, const int& wk, const int& g,
                                              const Dropout& drop, const int64_t& bh, float* const& sLse,
                                              float* const& sDelta, const int& buf) {
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      // Keep bits of this (n, mt): bit 4 q + w is word w of pair q = 2 hf + c, computed by lane m4 = q.
      uint32_t keep_bits = 0;
      if (kDrop && drop.aligned()) {
        const int i = i0 + wn * WQ + n * 8 + 2 * t + (m4 & 1);
        const int j4 = (j0 + wk * 32 + mt * 16 + (m4 >> 1) * 8 + (g & ~3)) >> 2;
        uint32_t r[4];
        drop.words(static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j4), r);
        uint32_t nib = 0;
#pragma unroll
        for (int w = 0; w < 4; ++w) nib |= (r[w] >= drop.threshold ? 1u : 0u) << w;
        keep_bits = nib << (4 * m4);
        keep_bits |= __shfl_xor_sync(0xffffffffu, keep_bits, 4);
        keep_bits |= __shfl_xor_sync(0xffffffffu, keep_bits, 8);
      }
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = wn * WQ + n * 8 + 2 * t + c;
        // A row with no allowed key has lse = -inf: its P must be 0, not exp2(-inf + inf); +inf here gives 0.
        const float lse = sLse[buf * BM + r], delta = sDelta[buf * BM + r];
        const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int e = 2 * hf + c;
          const float pr = exp2f(st[mt][n][e] * pscale - lse2);
          if (kDrop) {
            // (an origin off the 4-key groups: this element's own draw)
            const float keep = !drop.aligned() ? drop.one(static_cast<uint32_t>(bh), static_cast<uint32_t>(i0 + r),
                                                          static_cast<uint32_t>(j0 + wk * 32 + mt * 16 + hf * 8 + g))
                               : (keep_bits >> (4 * (2 * hf + c) + m4)) & 1 ? drop.scale : 0.f;
            st[mt][n][e] = pr * keep;
            dpt[mt][n][e] = pr * (dpt[mt][n][e] * keep - delta);
          } else {
            st[mt][n][e] = pr;
            dpt[mt][n][e] = pr * (dpt[mt][n][e] - delta);
          }
        }
      }
    }
  }
}

// The softcap's pass (general kind, p.softcap > 0), in place of the mask pass and the exp pass: per element, the
// capped score z = cap tanh(S^T scale / cap) in log2 units plus the mask's bias where allowed (-inf elsewhere),
// P^T = exp2(z - lse2), dropout by the per-element keep function, and dS^T = P^T o (dP^T keep - Delta) o (1 - tanh^2)
// (the cap's derivative). One loop for every mask kind (the bias functor) with the tanh kept per element.
template <int BM, int WQ, class Bits, class Bias>
__device__ __forceinline__ void wide_softcap_pass(float (&st)[2][WQ / 8][4], float (&dpt)[2][WQ / 8][4],
                                                  const Bits& allowed, const Softcap& cap, Bias bias_of, int i0,
                                                  int wn, int t, int j0, int wk, int g, bool has_dropout,
                                                  const Dropout& drop, int64_t bh, const float* sLse,
                                                  const float* sDelta, int buf) {
#pragma unroll
  for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = wn * WQ + n * 8 + 2 * t + c;
      const float lse = sLse[buf * BM + r], delta = sDelta[buf * BM + r];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int e = 2 * hf + c;
          const float th = tanh_f32(st[mt][n][e] * cap.in_scale);
          const bool ok = (allowed >> ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c)) & 1;
          // A row with no allowed key has lse = -inf; its elements are not allowed, so P stays 0.
          const float pr = ok ? exp2f(th * cap.out_log2 + bias_of(n, c, mt, hf) - lse * kLog2e) : 0.f;
          float keep = 1.f;
          if (has_dropout)
            keep = drop.one(static_cast<uint32_t>(bh), static_cast<uint32_t>(i0 + r),
                            static_cast<uint32_t>(j0 + wk * 32 + mt * 16 + hf * 8 + g));
          st[mt][n][e] = pr * keep;
          dpt[mt][n][e] = pr * (dpt[mt][n][e] * keep - delta) * (1.f - th * th);
        }
    }
}

}  // namespace cuda
}  // namespace sdpax
