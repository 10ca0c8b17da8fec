// Building blocks shared by the fused CPU kernels: compute types, GEMM on packed tiles, operand packing,
// dropout factors, per-thread scratch and the task loop. Masks live in mask.h, the online softmax in softmax.h.
//
// GEMMs go through at::native::cpublas::brgemm (oneDNN micro-kernels: AMX for bfloat16, AVX-512 / AVX2 FMA for
// float32). brgemm multiplies row-major A (M x K) by B (K x N) into float C. For bfloat16, B is in VNNI-2 layout
// (pairs of consecutive K rows interleaved: element (k, n) at [(k/2) * 2N + 2n + k%2]) and K is padded to even
// with zeros. float16 tiles are widened to float32 (exact), so half uses the float32 GEMM; so does bfloat16 on CPUs
// without AMX (dispatch_dtype).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "common/params.h"
#include "common/philox.h"

namespace sdpax::cpu {

using BF16 = c10::BFloat16;
using F16 = c10::Half;
using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C, the element type GEMM operands are packed in, is float32 or bfloat16 (VNNI pairs); see dispatch_dtype.
template <class C> constexpr bool kVnni = std::is_same_v<C, BF16>;
// K of a GEMM as packed: bfloat16 pairs K rows, so an odd K gets one zero row/column.
template <class C> inline int64_t padk(int64_t k) { return kVnni<C> ? (k + 1) & ~int64_t(1) : k; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether bfloat16 GEMM operands can stay bfloat16: torch's could_pack is true where oneDNN runs bfloat16 brgemm
// on AMX. Elsewhere brgemm may refuse the VNNI layout (it does on CPUs without AVX-512), so bfloat16 is widened to
// float32 like float16. Asked on every call rather than cached: it also follows torch.backends.mkldnn.enabled,
// which brgemm obeys.
inline bool bf16_gemm() { return at::native::cpublas::could_pack(at::kBFloat16); }

// The input dtypes the CPU kernels are instantiated for: the one list of variants (float64 runs on MATH).
// f receives a value of the element type T and one of the compute type C its GEMM operands are packed in:
// bfloat16 for bfloat16 inputs where bf16_gemm(), else float32 (float16, and bfloat16 without AMX, are widened).
template <class F>
inline void dispatch_dtype(ScalarKind kind, const F& f) {
  switch (kind) {
    case ScalarKind::Float: f(float{}, float{}); break;
    case ScalarKind::BFloat16:
      if (bf16_gemm()) {
        f(BF16{}, BF16{});
      } else {
        f(BF16{}, float{});
      }
      break;
    case ScalarKind::Half: f(F16{}, float{}); break;
    default: TORCH_CHECK(false, "sdpax: the CPU flash kernel supports float32, bfloat16 and float16");
  }
}

// ---- GEMM ----

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const BF16* A, int64_t lda, const BF16* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// ---- element conversion ----

template <class S, class D>
inline void convert_n(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, n * sizeof(S));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Row r of a strided source (element (r, c) at src[r * rs + c * cs]) into dst[0, n) as D, zero-filling [n, npad).
template <class S, class D>
inline void load_row(const S* src, int64_t cs, int64_t n, int64_t npad, D* dst) {
  if (cs == 1) {
    convert_n(src, dst, n);
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<D>(static_cast<float>(src[c * cs]));
  }
  for (int64_t c = n; c < npad; ++c) dst[c] = D(0.f);
}

// A operand: rows x cols of a strided source, row-major with leading dimension ld (cols padded with zeros).
template <class S, class D>
inline void pack_a(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, int64_t ld, D* dst) {
  for (int64_t r = 0; r < rows; ++r) load_row(src + r * rs, cs, cols, ld, dst + r * ld);
}

// VNNI-2 interleave of two rows of 16-bit elements: dst[2n] = r0[n], dst[2n + 1] = r1[n] (r1 null: zeros).
inline void vnni_pair(const uint16_t* r0, const uint16_t* r1, int64_t n, uint16_t* dst) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (; j + 32 <= n; j += 32) {
    const __m512i a = _mm512_loadu_si512(r0 + j);
    const __m512i b = r1 ? _mm512_loadu_si512(r1 + j) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(dst + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
#endif
  for (; j < n; ++j) {
    dst[2 * j] = r0[j];
    dst[2 * j + 1] = r1 ? r1[j] : 0;
  }
}

// B operand whose K dimension runs along the source's rows: element (k, n) = src[k * rs + n * cs], K = rows.
// float: row-major K x N. bfloat16: VNNI-2 with K padded to even.
template <class S, class D>
inline void pack_b_rows(const S* src, int64_t rs, int64_t cs, int64_t K, int64_t N, D* dst) {
  if constexpr (!kVnni<D>) {
    pack_a(src, rs, cs, K, N, N, dst);
  } else if (std::is_same_v<S, D> && cs == 1) {
    for (int64_t k0 = 0; k0 < K; k0 += 2) {
      const auto* r0 = reinterpret_cast<const uint16_t*>(src + k0 * rs);
      const auto* r1 = k0 + 1 < K ? reinterpret_cast<const uint16_t*>(src + (k0 + 1) * rs) : nullptr;
      vnni_pair(r0, r1, N, reinterpret_cast<uint16_t*>(dst + k0 * N));
    }
  } else {
    thread_local float tmp[2][512];
    for (int64_t k0 = 0; k0 < K; k0 += 2) {
      D* out = dst + k0 * N;
      for (int64_t n0 = 0; n0 < N; n0 += 512) {
        const int64_t nn = std::min<int64_t>(512, N - n0);
        for (int h = 0; h < 2; ++h) {
          if (k0 + h < K) {
            load_row(src + (k0 + h) * rs + n0 * cs, cs, nn, nn, tmp[h]);
          } else {
            std::fill(tmp[h], tmp[h] + nn, 0.f);
          }
        }
        for (int64_t n = 0; n < nn; ++n) {
          out[2 * (n0 + n)] = D(tmp[0][n]);
          out[2 * (n0 + n) + 1] = D(tmp[1][n]);
        }
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// One 16 x 16 block of 32-bit words: dst[c * ld + r] = src[r * rs + c].
inline void transpose16x16(const uint32_t* src, int64_t rs, uint32_t* dst, int64_t ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * rs);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + m] now holds, in 128-bit lane l, column 4l + m of rows 4q..4q+3. Gather lanes across row groups.
  for (int m = 0; m < 4; ++m) {
    const __m512i a = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88);       // lanes 0,2 of r[m], r[4+m]
    const __m512i b = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xdd);       // lanes 1,3
    const __m512i c = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xdd);
    t[m] = _mm512_shuffle_i32x4(a, c, 0x88);       // lane 0 of every group: column m
    t[8 + m] = _mm512_shuffle_i32x4(a, c, 0xdd);   // lane 2: column 8 + m
    t[4 + m] = _mm512_shuffle_i32x4(b, d, 0x88);   // lane 1: column 4 + m
    t[12 + m] = _mm512_shuffle_i32x4(b, d, 0xdd);  // lane 3: column 12 + m
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ld, t[i]);
}
#endif

// 32-bit transpose: dst[c * ld + r] = src[r * rs + c] for r < rows, c < cols.
inline void transpose32(const uint32_t* src, int64_t rs, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
#if defined(CPU_CAPABILITY_AVX512)
      if (r1 - r0 == kB && c1 - c0 == kB) {
        transpose16x16(src + r0 * rs + c0, rs, dst + c0 * ld + r0, ld);
        continue;
      }
#endif
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + r] = src[r * rs + c];
    }
}

// B operand whose K dimension runs along the source's columns (a transposed use of the rows):
// element (k, n) = src[n * rs + k * cs], K = cols, N = rows.
template <class S, class D>
inline void pack_b_cols(const S* src, int64_t rs, int64_t cs, int64_t K, int64_t N, D* dst) {
  const int64_t Kp = padk<D>(K);
  if (std::is_same_v<S, D> && cs == 1 && K == Kp) {
    // float: a plain transpose; bfloat16 VNNI: pairs of k are one 32-bit word, transposed as a unit.
    const int64_t words = kVnni<D> ? K / 2 : K;
    const int64_t row_words = kVnni<D> ? rs / 2 : rs;
    const bool aligned = reinterpret_cast<uintptr_t>(src) % sizeof(uint32_t) == 0;
    if (aligned && (!kVnni<D> || rs % 2 == 0)) {
      transpose32(reinterpret_cast<const uint32_t*>(src), row_words, N, words, reinterpret_cast<uint32_t*>(dst), N);
      return;
    }
  }
  thread_local float row[1024];
  for (int64_t n = 0; n < N; ++n) {
    load_row(src + n * rs, cs, K, Kp, row);
    if constexpr (!kVnni<D>) {
      for (int64_t k = 0; k < K; ++k) dst[k * N + n] = row[k];
    } else {
      for (int64_t k = 0; k < Kp; k += 2) {
        dst[k * N + 2 * n] = D(row[k]);
        dst[k * N + 2 * n + 1] = D(row[k + 1]);
      }
    }
  }
}

// Splits 32-bit words into their low and high 16-bit halves: lo[j] = w[j] & 0xffff, hi[j] = w[j] >> 16.
inline void split_words(const uint32_t* w, int64_t n, uint16_t* lo, uint16_t* hi) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  alignas(64) static const uint16_t even[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                               32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  alignas(64) static const uint16_t odd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                              33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
  for (; j + 32 <= n; j += 32) {
    const __m512i a = _mm512_loadu_si512(w + j), b = _mm512_loadu_si512(w + j + 16);
    _mm512_storeu_si512(lo + j, _mm512_permutex2var_epi16(a, ie, b));
    _mm512_storeu_si512(hi + j, _mm512_permutex2var_epi16(a, io, b));
  }
#endif
  for (; j < n; ++j) {
    lo[j] = static_cast<uint16_t>(w[j]);
    hi[j] = static_cast<uint16_t>(w[j] >> 16);
  }
}

// A operand that is the transpose of a strided source: dst (cols x ld), dst[c * ld + r] = src[r * rs + c * cs],
// zero in columns [rows, ld).
template <class S, class D>
inline void pack_a_transposed(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, int64_t ld, D* dst) {
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + c * ld + ld, D(0.f));
  const bool aligned = reinterpret_cast<uintptr_t>(src) % sizeof(uint32_t) == 0;
  if constexpr (std::is_same_v<S, D> && sizeof(D) == 4) {
    if (cs == 1) {
      transpose32(reinterpret_cast<const uint32_t*>(src), rs, rows, cols, reinterpret_cast<uint32_t*>(dst), ld);
      return;
    }
  } else if constexpr (std::is_same_v<S, D> && sizeof(D) == 2) {
    if (cs == 1 && rs % 2 == 0 && cols % 2 == 0 && aligned) {
      // Transpose pairs of columns as 32-bit words, then split each word row into its two 16-bit columns.
      thread_local std::vector<uint32_t> words;
      words.resize(cols / 2 * rows);
      transpose32(reinterpret_cast<const uint32_t*>(src), rs / 2, rows, cols / 2, words.data(), rows);
      for (int64_t c = 0; c < cols; c += 2)
        split_words(words.data() + c / 2 * rows, rows, reinterpret_cast<uint16_t*>(dst + c * ld),
                    reinterpret_cast<uint16_t*>(dst + (c + 1) * ld));
      return;
    }
  }
  thread_local float row[1024];
  for (int64_t r = 0; r < rows; ++r) {
    load_row(src + r * rs, cs, cols, cols, row);
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = D(row[c]);
  }
}

// ---- dropout ----

#if defined(CPU_CAPABILITY_AVX512)
// 32 x 32 -> 64-bit products of 16 lanes, split in high and low words (AVX-512 has no 32-bit mulhi).
inline void mulhilo16(uint32_t m, __m512i x, __m512i& hi, __m512i& lo) {
  const __m512i vm = _mm512_set1_epi32(static_cast<int32_t>(m));
  const __m512i even = _mm512_mul_epu32(x, vm);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), vm);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mullo_epi32(x, vm);
}
#endif

struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0, threshold = 0;
  int64_t row0 = 0, col0 = 0;  // the call's origin in the problem whose decisions it draws (AttnParams)
  float scale = 1.f;

#if defined(CPU_CAPABILITY_AVX512)
  // philox4x32_10 of philox.h on 16 counters at once (the key is this call's seed).
  void philox16(__m512i (&c)[4]) const {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(kPhiloxM0, c[0], hi0, lo0);
      mulhilo16(kPhiloxM1, c[2], hi1, lo1);
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c[1]), _mm512_set1_epi32(static_cast<int32_t>(k0)));
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c[3]), _mm512_set1_epi32(static_cast<int32_t>(k1)));
      c[0] = n0;
      c[1] = lo1;
      c[2] = n2;
      c[3] = lo0;
    }
  }
#endif

  explicit Dropout(const AttnParams& p) {
    on = p.dropout_p > 0.0;
    if (on) {
      seed = static_cast<uint64_t>(p.rng[0]);
      offset = static_cast<uint64_t>(p.rng[1]);
      row0 = p.drop_row0;
      col0 = p.drop_col0;
      threshold = dropout_threshold(p.dropout_p);
      scale = dropout_scale(p.dropout_p);
    }
  }

  // f[j - j0] = scale if element (bh, i, j) is kept else 0, for j in [j0, j0 + n).
  void factors(int64_t bh, int64_t i, int64_t j0, int64_t n, float* f) const {
    i += row0;  // from here on (i, j0) are the problem's coordinates; f stays indexed from j0
    j0 += col0;
    int64_t j4 = j0 / 4;
#if defined(CPU_CAPABILITY_AVX512)
    // Sixteen Philox counters (consecutive groups of four keys) per step, the same function as philox.h.
    if (threshold <= 0xffffffffu) {
      if (j0 % 4 != 0) {
        scalar_groups(bh, i, j0, n, j4, j4 + 1, f);
        ++j4;
      }
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i thr = _mm512_set1_epi32(static_cast<int32_t>(threshold));
      const __m512 vscale = _mm512_set1_ps(scale);
      for (; (j4 + 16) * 4 <= j0 + n; j4 += 16) {
        __m512i c[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j4)), lane),
                        _mm512_set1_epi32(static_cast<int32_t>(i)), _mm512_set1_epi32(static_cast<int32_t>(bh)),
                        _mm512_set1_epi32(static_cast<int32_t>(offset))};
        philox16(c);
        uint32_t keep[4];
        for (int t = 0; t < 4; ++t) keep[t] = _mm512_cmpge_epu32_mask(c[t], thr);
        // Columns 16 at a time: bit 4g + t of the store mask is word t of group g.
        for (int blk = 0; blk < 4; ++blk) {
          uint32_t m = 0;
          for (int t = 0; t < 4; ++t) {
            uint32_t x = (keep[t] >> (4 * blk)) & 0xF;
            x = (x | x << 3 | x << 6 | x << 9) & 0x1111;
            m |= x << t;
          }
          _mm512_storeu_ps(f + (j4 + 4 * blk) * 4 - j0, _mm512_maskz_mov_ps(static_cast<__mmask16>(m), vscale));
        }
      }
    }
#endif
    scalar_groups(bh, i, j0, n, j4, (j0 + n + 3) / 4, f);
  }

  // Groups [g0, g1) of four keys, one Philox call each, clipped to [j0, j0 + n).
  void scalar_groups(int64_t bh, int64_t i, int64_t j0, int64_t n, int64_t g0, int64_t g1, float* f) const {
    uint32_t r[4];
    for (int64_t j4 = g0; j4 < g1; ++j4) {
      dropout_words(seed, offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j4), r);
      for (int t = 0; t < 4; ++t) {
        const int64_t j = j4 * 4 + t;
        if (j >= j0 && j < j0 + n) f[j - j0] = r[t] >= threshold ? scale : 0.f;
      }
    }
  }
};

// ---- scratch and scheduling ----

// A growable, 64-byte aligned buffer. Kernels keep them thread_local so repeated calls reuse the memory.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(ptr_); }
  template <class X>
  X* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(X), 64));
    if (bytes > cap_) {
      std::free(ptr_);
      ptr_ = std::aligned_alloc(64, bytes);
      TORCH_CHECK(ptr_ != nullptr, "sdpax: out of memory allocating ", std::to_string(bytes),
                  " bytes of kernel scratch");
      cap_ = bytes;
    }
    return static_cast<X*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

// Runs body(t) for t in [0, n) on torch's thread pool (honouring torch.set_num_threads). Threads take tasks in
// order from a shared counter, so a task list sorted by decreasing cost is balanced greedily (longest first).
template <class F>
inline void run_tasks(int64_t n, bool uses_amx, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t);
    // AMX tile state is per thread; hand it back so other code on this thread starts clean.
    if (uses_amx) at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace sdpax::cpu
