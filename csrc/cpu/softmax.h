// Online softmax for the CPU kernels: a fast vector exp, the per-row update of a score tile (running max and
// denominator, probabilities in the GEMM type) and the final normalisation with sinks and the fully-masked-row
// guard. The AVX-512 path keeps a row in registers with masked tails; other ISAs use at::vec.
#pragma once
#include "cpu/mask.h"
#include "cpu/tile.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace sdpax::cpu {

// Scores live in the log2 domain: x = s * (scale * log2 e) + bias * log2 e, probabilities are exp2(x - m), the
// running max m is in log2 units and finish_row converts back (lse = (m + log2 l) * ln 2). Folding log2 e into
// the scale saves the multiply-by-log2e of every exp.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Lazy rescaling: a tile is exponentiated at the row's current max unless its own max exceeds it by more than
// this (log2 units), so most tiles need one pass and no accumulator rescale. Probabilities stay below 2^8.
constexpr float kLazyRescale = 8.f;

inline bool has_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(x[j])) return true;
  return false;
}

#if defined(CPU_CAPABILITY_AVX512)

#define SDPAX_INLINE inline __attribute__((always_inline))
#define SDPAX_INLINE_LAMBDA __attribute__((always_inline))

// 2^x for the lanes in `keep` (others 0): x = n + f with n = floor(x), f in [0, 1) by one vreduceps, 2^f by a
// polynomial in f and 2^n applied by vscalefps, which itself scales by 2^floor(x), so n is never formed (two
// uops fewer per 16 scores than roundscale + subtract, in the loop that bounds the bfloat16 forward). The
// polynomials are sqrt(2) * p(f - 1/2) of polynomials for |g| <= 1/2, expanded in f: degree 7 Taylor for float32
// results (8.5e-8 relative), degree 3 fitted for least maximum relative error (7.5e-5) when the probabilities are
// rounded to bfloat16, whose own rounding is 2e-3. Lanes below 2^-125 are flushed to exactly 0 (so -inf, a masked
// score, gives 0): denormal results would cost a microcode assist of ~100 cycles in every instruction that
// touches them. No clamping is needed: -inf and NaN only produce NaN in lanes that are either zeroed or NaN
// anyway, a large finite x gives +inf (the lazy-rescale pass then redoes the row), and NaN stays NaN as in torch
// (it counts as live).
template <int Degree>
SDPAX_INLINE __m512 exp2_512(__m512 x, __mmask16 keep = 0xffff) {
  const __mmask16 live = keep & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  constexpr float taylor7[8] = {1.f,           0.69314730f,   0.24022573f,   0.055507198f,
                                0.0096104881f, 0.0013453789f, 0.00014234180f, 2.1570575e-05f};
  constexpr float fit3[4] = {0.99992526f, 0.69583344f, 0.22606729f, 0.078024484f};
  const float* c = Degree == 3 ? fit3 : taylor7;
  __m512 p = _mm512_set1_ps(c[Degree]);
  for (int d = Degree - 1; d >= 0; --d) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[d]));
  return _mm512_maskz_scalef_ps(live, p, x);
}

// Degree of exp2_512 for probabilities stored as C (float32, or bfloat16 for the AMX GEMMs).
template <class C> constexpr int kExpDegree = std::is_same_v<C, float> ? 7 : 3;

inline Vec fast_exp(const Vec& x) { return Vec(exp2_512<7>(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)))); }

// float -> bfloat16, round to nearest even (probabilities are never NaN); the vcvtneps2bf16 variant is used on
// CPUs with AVX512-BF16 (one instruction instead of five).
SDPAX_INLINE __m256i bf16_of(__m512 x) {
  __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

template <class C, bool HwBf16>
SDPAX_INLINE void store_c(C* dst, __m512 x, __mmask16 k) {
  if constexpr (std::is_same_v<C, float>) {
    _mm512_mask_storeu_ps(dst, k, x);
  } else {
    __m256i h;
    if constexpr (HwBf16) {
      // vcvtneps2bf16 written as asm so the rest of the build needs no -mavx512bf16 (chosen at run time).
      asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(x));
    } else {
      h = bf16_of(x);
    }
    if (k == 0xffff) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
    } else {
      _mm256_mask_storeu_epi16(dst, k, h);
    }
  }
}

// Two vectors to 32 consecutive elements: for bfloat16 with AVX512-BF16 one vcvtne2ps2bf16 converts both (2
// cycles per 32 values, where vcvtneps2bf16 takes 2 per 16: the conversion was the largest single cost of the
// bfloat16 softmax row).
template <class C, bool HwBf16>
SDPAX_INLINE void store2_c(C* dst, __m512 lo, __m512 hi) {
  if constexpr (std::is_same_v<C, BF16> && HwBf16) {
    __m512i h;
    asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(h) : "v"(hi), "v"(lo));  // AT&T order: low half from %2
    _mm512_storeu_si512(dst, h);
  } else {
    store_c<C, HwBf16>(dst, lo, 0xffff);
    store_c<C, HwBf16>(dst + 16, hi, 0xffff);
  }
}

SDPAX_INLINE __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << rem) - 1);
}

// exp2(x - m) of the visible columns into pout (times the dropout factors), their sum, and the max of x.
// Lanes of columns [j, j + 16) within the tile (k) that the bool mask keep (may be null) lets through.
SDPAX_INLINE __mmask16 visible(const uint8_t* keep, int64_t j, __mmask16 k) {
  if (!keep) return k;
  return k & _mm_test_epi8_mask(_mm_maskz_loadu_epi8(k, keep + j), _mm_set1_epi8(-1));
}

// exp2(x - m) of the visible columns into pout (times the dropout factors), their sum; vmax_shifted receives
// the lane-wise max of x - m (the caller reduces it only when it needs the row max).
template <class C, bool HwBf16>
SDPAX_INLINE float exp_pass(const float* s, const float* bias, const uint8_t* keep, const float* drop, int64_t lim,
                            __m512 vs, float m, C* pout, __m512& vmax_shifted) {
  constexpr int kDeg = kExpDegree<C>;
  const __m512 neg_m = _mm512_set1_ps(-m), vl2e = _mm512_set1_ps(kLog2e);
  // Two independent (sum, max) chains: one chain's add / max latency would otherwise bound the loop.
  __m512 vsum0 = _mm512_setzero_ps(), vsum1 = vsum0, vmax0 = _mm512_set1_ps(kNegInf), vmax1 = vmax0;
  auto step = [&](int64_t j, __mmask16 k, __m512& vsum, __m512& vmax) SDPAX_INLINE_LAMBDA {
    const __mmask16 kv = visible(keep, j, k);
    __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kv, s + j), vs, neg_m);
    if (bias) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kv, bias + j), vl2e, x);
    vmax = _mm512_mask_max_ps(vmax, kv, vmax, x);
    __m512 e = exp2_512<kDeg>(x, kv);
    vsum = _mm512_add_ps(vsum, e);
    if (drop) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(k, drop + j));
    return e;
  };
  int64_t j = 0;
  for (; j + 32 <= lim; j += 32) {  // full chunks: no tail mask, two chains
    const __m512 e0 = step(j, 0xffff, vsum0, vmax0);
    const __m512 e1 = step(j + 16, 0xffff, vsum1, vmax1);
    store2_c<C, HwBf16>(pout + j, e0, e1);
  }
  for (; j < lim; j += 16) {
    const __mmask16 k = tail_mask(lim - j);
    store_c<C, HwBf16>(pout + j, step(j, k, vsum0, vmax0), k);
  }
  vmax_shifted = _mm512_max_ps(vmax0, vmax1);
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum0, vsum1));
}

template <class C, bool HwBf16, bool Plain>
SDPAX_INLINE float softmax_row_impl(const float* s, int64_t n, int64_t npad, float scale2, const RowMask& mask,
                                    int64_t lim, const float* drop, float& m, float& l, C* pout) {
  lim = std::clamp<int64_t>(lim, 0, n);
  // Plain: the pointers are constant nulls, so the inlined exp_pass loops carry no mask or dropout tests.
  const float* bias = Plain ? nullptr : mask.bias;
  const uint8_t* keep = Plain ? nullptr : mask.keep;
  if constexpr (Plain) drop = nullptr;
  const __m512 vs = _mm512_set1_ps(scale2);
  float row_max;
  // A row without a running max yet (its first visible tile) guesses one from its first 16 visible scores, so
  // that it too usually needs a single pass; its accumulator is still zero, so no rescale is owed.
  float guess = m;
  if (m == kNegInf && lim > 0) {
    const __mmask16 kv = visible(keep, 0, tail_mask(lim));
    __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(kv, s), vs);
    if (bias) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kv, bias), _mm512_set1_ps(kLog2e), x);
    guess = _mm512_mask_reduce_max_ps(kv, x);
  }
  if (guess != kNegInf && !std::isnan(guess)) {
    __m512 vmax;
    const float sum = exp_pass<C, HwBf16>(s, bias, keep, drop, lim, vs, guess, pout, vmax);
    // The usual case: no score of this tile exceeds the running max by more than the lazy threshold.
    if (!_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(kLazyRescale), _CMP_GT_OQ)) {
      std::fill(pout + lim, pout + npad, C(0.f));
      l += sum;
      m = guess;
      return 1.f;
    }
    row_max = _mm512_reduce_max_ps(vmax) + guess;
  } else {
    const __m512 vl2e = _mm512_set1_ps(kLog2e);
    __m512 vmax = _mm512_set1_ps(kNegInf);
    for (int64_t j = 0; j < lim; j += 16) {
      const __mmask16 kv = visible(keep, j, tail_mask(lim - j));
      __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(kv, s + j), vs);
      if (bias) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(kv, bias + j), vl2e, x);
      vmax = _mm512_mask_max_ps(vmax, kv, vmax, x);
    }
    row_max = _mm512_reduce_max_ps(vmax);
  }
  const float m_new = std::max(m, row_max);
  if (m_new == kNegInf) {
    // Nothing visible yet: no probability mass; m stays -inf so a later visible key is not underweighted.
    // A NaN score can hide behind -inf here (vector max drops NaN); it must still poison the row, as in torch.
    if (has_nan(s, lim)) l = std::numeric_limits<float>::quiet_NaN();
    std::fill(pout, pout + npad, C(0.f));
    return 1.f;
  }
  __m512 unused;
  const float sum = exp_pass<C, HwBf16>(s, bias, keep, drop, lim, vs, m_new, pout, unused);
  std::fill(pout + lim, pout + npad, C(0.f));
  const float alpha = m == kNegInf ? 0.f : std::exp2(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

inline bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

#else

inline Vec fast_exp(const Vec& x) { return x.exp_u20(); }

#endif

// Score softcap on a tile of raw products q.k (rows x n, row stride ld), in place: s -> (cap / scale) tanh(s scale
// / cap), so that the softmax's own scaling by `scale` yields cap tanh(s scale / cap) (the softcap of the scaled
// score; masks and the causal limit apply after it). tanh(y) = 1 - 2 / (e^2y + 1) is exact at the saturated ends
// (e^2y = inf or 0) and within a few float32 ulps of 1 in absolute terms near 0, below the scores' own rounding.
// The backward reads the capped score back: d(cap tanh(y)) / d(scale s) = 1 - t^2 with t = s_capped scale / cap.
inline void softcap_tile(float* s, int64_t rows, int64_t n, int64_t ld, float scale, float cap) {
  if (scale == 0.f) return;  // every scaled score is 0, capped or not
  const Vec two_y(2.f * scale / cap), back(cap / scale), one(1.f), two(2.f);
  const int64_t w = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * ld;
    int64_t j = 0;
    for (; j + w <= n; j += w) {
      const Vec t = one - two / (fast_exp(Vec::loadu(x + j) * two_y) + one);
      (t * back).store(x + j);
    }
    if (j < n) {
      const Vec t = one - two / (fast_exp(Vec::loadu(x + j, n - j) * two_y) + one);
      (t * back).store(x + j, n - j);
    }
  }
}

// One row of a score tile. s[0, n) holds raw q.k products; columns >= lim are masked (causal), the row's mask
// (bool or additive in natural-log units, or none) is applied after scaling; scale2 = scale * log2 e. Updates the running max m (log2
// units) and denominator l, writes the probabilities (times the dropout factors drop, if any) to pout[0, npad)
// as C (zeros past lim) and returns the factor the row's accumulator must be multiplied by.
template <class C>
inline float softmax_row(const float* s, int64_t n, int64_t npad, float scale2, const RowMask& mask, int64_t lim,
                         const float* drop, float& m, float& l, C* pout) {
#if defined(CPU_CAPABILITY_AVX512)
  // No mask and no dropout (the common case) gets its own copy of the row loops, free of pointer tests.
  const bool plain = !mask.bias && !mask.keep && !drop;
  if constexpr (std::is_same_v<C, BF16>) {
    if (cpu_has_bf16()) {
      if (plain) return softmax_row_impl<BF16, true, true>(s, n, npad, scale2, mask, lim, drop, m, l, pout);
      return softmax_row_impl<BF16, true, false>(s, n, npad, scale2, mask, lim, drop, m, l, pout);
    }
  }
  if (plain) return softmax_row_impl<C, false, true>(s, n, npad, scale2, mask, lim, drop, m, l, pout);
  return softmax_row_impl<C, false, false>(s, n, npad, scale2, mask, lim, drop, m, l, pout);
#else
  lim = std::clamp<int64_t>(lim, 0, n);
  float row_max = kNegInf;
  for (int64_t j = 0; j < lim; ++j) row_max = std::max(row_max, s[j] * scale2 + mask.at(j) * kLog2e);
  const float m_new = std::max(m, row_max);
  if (m_new == kNegInf) {
    if (has_nan(s, lim)) l = std::numeric_limits<float>::quiet_NaN();
    std::fill(pout, pout + npad, C(0.f));
    return 1.f;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < lim; ++j) {
    const float e = std::exp2(s[j] * scale2 + mask.at(j) * kLog2e - m_new);
    sum += e;
    pout[j] = static_cast<C>(drop ? e * drop[j] : e);
  }
  std::fill(pout + lim, pout + npad, C(0.f));
  const float alpha = m == kNegInf ? 0.f : std::exp2(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
#endif
}

// softmax_row with the columns before lo hidden as well (a sliding window's left edge): the row is processed from
// column lo on, so every column the window hides costs nothing.
template <class C>
inline float softmax_row(const float* s, int64_t n, int64_t npad, float scale2, const RowMask& mask, int64_t lo,
                         int64_t lim, const float* drop, float& m, float& l, C* pout) {
  if (lo <= 0) return softmax_row(s, n, npad, scale2, mask, lim, drop, m, l, pout);
  lo = std::min(lo, n);
  std::fill(pout, pout + lo, C(0.f));
  return softmax_row(s + lo, n - lo, npad - lo, scale2, mask.from(lo), lim - lo, drop ? drop + lo : nullptr, m, l,
                     pout + lo);
}

inline void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * va).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) * va).store(x + j, n - j);
}

// Final normalisation of one row (m in log2 units): folds the sink logit into the denominator (m and l are
// updated to include it) and writes out = acc / l as T. A row with no visible key and no sink has l = 0: output 0.
template <class T>
inline void finish_row(float* acc, int64_t ev, float& m, float& l, const float* sink, T* out, int64_t out_cs) {
  float a = 1.f;
  if (sink) {
    const float sink2 = *sink * kLog2e;
    const float m2 = std::max(m, sink2);
    a = m == kNegInf ? 0.f : std::exp2(m - m2);
    l = l * a + std::exp2(sink2 - m2);
    m = m2;
  }
  if (l == 0.f) {
    for (int64_t c = 0; c < ev; ++c) out[c * out_cs] = T(0.f);
    return;
  }
  scale_row(acc, ev, a / l);
  if (out_cs == 1) {
    convert_n(acc, out, ev);
  } else {
    for (int64_t c = 0; c < ev; ++c) out[c * out_cs] = static_cast<T>(acc[c]);
  }
}

// Natural log-sum-exp of rows from their max (log2 units) and denominator, in place over l: (m + log2 l) ln 2,
// -inf where l = 0 (no visible key, as MATH). Vectorised: a scalar log2f per row was a few percent of the small
// encoder shapes.
inline void lse_rows(const float* m, float* l, int64_t n) {
  using V = at::vec::Vectorized<float>;
  int64_t r = 0;
  for (; r + V::size() <= n; r += V::size())
    ((V::loadu(m + r) + V::loadu(l + r).log2()) * V(kLn2)).store(l + r);
  for (; r < n; ++r) l[r] = (m[r] + std::log2(l[r])) * kLn2;
}

}  // namespace sdpax::cpu
