// Products for a few query rows against K and V read in place (the decode step), without packing.
//
// With M <= 16 rows per KV head a decode step does ~2 * M flops per K/V element it reads, so it is bound by how
// fast K and V stream in; the packed GEMM path (fwd_mainloop.h) reads each K/V tile once more to pack it
// (transposed, VNNI pairs for bfloat16), which costs as much as the products themselves here. These kernels read
// K and V rows where they are (unit column stride) and widen them to float32 in registers:
//   scores_direct: s (M x n) = q (M x E, float32) . K rows^T   4 rows x 4 keys per step, 16 dot products reduced
//                                                              together by one shuffle tree
//   pv_direct:     acc (M x Ev) += P (M x n) . V rows            4 rows x 32 columns per step, 32-key blocks that
//                                                              stay in L1 while the row groups pass over them
#pragma once
#include "cpu/tile.h"

namespace sdpax::cpu {

// Rows the direct kernels take for GEMM compute type C: above this the packed GEMMs win (sooner on AMX, where
// bfloat16 stays bfloat16).
template <class C> constexpr int64_t kDirectMaxRows = kVnni<C> ? 8 : 16;

#if defined(CPU_CAPABILITY_AVX512)

// 16 (or `cnt`, zero-filled) elements of T widened to float32.
template <class T>
inline __m512 load16(const T* p, __mmask16 keep = 0xffff) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(keep, p);
  } else if constexpr (std::is_same_v<T, BF16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, p));
  }
}

// Lane i of the result = the sum of the 16 lanes of a[i].
inline __m512 reduce16(__m512 (&a)[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // u[k]: 128-bit lane q holds partial sums of sources 4k..4k+3; add the four 128-bit lanes of each.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xee));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
}

// q: rows padded to a multiple of 4 (zero rows) and to E16 = round_up(E, 16) columns (zeros), row stride E16.
template <class T>
inline void scores_direct(int64_t M, int64_t n, int64_t E, const float* q, const T* k, int64_t ks, float* s,
                          int64_t lds) {
  const int64_t chunks = (E + 15) / 16;
  const __mmask16 tail = E % 16 ? __mmask16((1u << (E % 16)) - 1) : __mmask16(0xffff);
  const int64_t E16 = chunks * 16;
  for (int64_t r0 = 0; r0 < M; r0 += 4) {
    const float* q0 = q + r0 * E16;
    for (int64_t j0 = 0; j0 < n; j0 += 4) {
      const T* kr[4];
      for (int j = 0; j < 4; ++j) kr[j] = k + std::min(j0 + j, n - 1) * ks;  // a tail key repeats the last one
      __m512 a[16];
      for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask16 keep = c == chunks - 1 ? tail : __mmask16(0xffff);
        __m512 kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = load16(kr[j] + c * 16, keep);
        for (int r = 0; r < 4; ++r) {
          const __m512 qv = _mm512_loadu_ps(q0 + r * E16 + c * 16);
          for (int j = 0; j < 4; ++j) a[4 * r + j] = _mm512_fmadd_ps(qv, kv[j], a[4 * r + j]);
        }
      }
      const __m512 sum = reduce16(a);  // lane 4 r + j: row r0 + r, key j0 + j
      const int64_t rows = std::min<int64_t>(4, M - r0), keys = std::min<int64_t>(4, n - j0);
      const __mmask8 km = __mmask8((1u << keys) - 1);
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, sum);
      for (int64_t r = 0; r < rows; ++r) _mm_mask_storeu_ps(s + (r0 + r) * lds + j0, km, _mm_load_ps(lanes + 4 * r));
    }
  }
}

// P element as float32 (P is stored in the GEMM compute type: float32, or bfloat16 for bfloat16 inputs on AMX).
inline float p_of(float x) { return x; }
inline float p_of(BF16 x) { return static_cast<float>(x); }

template <class T, class C>
inline void pv_direct(int64_t M, int64_t Ev, int64_t n, const C* pm, int64_t ldp, const T* v, int64_t vs, float* acc,
                      int64_t ldacc) {
  constexpr int64_t kKeys = 32;  // a block of V rows (<= 32 x 256 x 4 bytes) that stays in L1 across row groups
  alignas(64) float pf[4][kKeys];  // P of the row group and key block as float32 (missing rows: zeros)
  for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
    const int64_t nj = std::min(kKeys, n - j0);
    for (int64_t r0 = 0; r0 < M; r0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - r0);
      for (int64_t r = 0; r < 4; ++r)
        for (int64_t j = 0; j < nj; ++j) pf[r][j] = r < rows ? p_of(pm[(r0 + r) * ldp + j0 + j]) : 0.f;
      float* a0 = acc + r0 * ldacc;
      float* a1 = acc + (r0 + std::min<int64_t>(1, rows - 1)) * ldacc;  // a missing row aliases a real one and
      float* a2 = acc + (r0 + std::min<int64_t>(2, rows - 1)) * ldacc;  // is never stored
      float* a3 = acc + (r0 + std::min<int64_t>(3, rows - 1)) * ldacc;
      for (int64_t c = 0; c < Ev; c += 32) {
        const __mmask16 k0 = c + 16 <= Ev ? __mmask16(0xffff) : __mmask16((1u << (Ev - c)) - 1);
        const __mmask16 k1 = c + 32 <= Ev ? __mmask16(0xffff)
                             : c + 16 >= Ev ? __mmask16(0) : __mmask16((1u << (Ev - c - 16)) - 1);
        // Eight named accumulators (an array of them ends up on the stack).
        __m512 o00 = _mm512_maskz_loadu_ps(k0, a0 + c), o01 = _mm512_maskz_loadu_ps(k1, a0 + c + 16);
        __m512 o10 = _mm512_maskz_loadu_ps(k0, a1 + c), o11 = _mm512_maskz_loadu_ps(k1, a1 + c + 16);
        __m512 o20 = _mm512_maskz_loadu_ps(k0, a2 + c), o21 = _mm512_maskz_loadu_ps(k1, a2 + c + 16);
        __m512 o30 = _mm512_maskz_loadu_ps(k0, a3 + c), o31 = _mm512_maskz_loadu_ps(k1, a3 + c + 16);
        const T* vr = v + j0 * vs + c;
        for (int64_t j = 0; j < nj; ++j, vr += vs) {
          const __m512 v0 = load16(vr, k0), v1 = load16(vr + 16, k1);
          const __m512 p0 = _mm512_set1_ps(pf[0][j]), p1 = _mm512_set1_ps(pf[1][j]);
          const __m512 p2 = _mm512_set1_ps(pf[2][j]), p3 = _mm512_set1_ps(pf[3][j]);
          o00 = _mm512_fmadd_ps(p0, v0, o00);
          o01 = _mm512_fmadd_ps(p0, v1, o01);
          o10 = _mm512_fmadd_ps(p1, v0, o10);
          o11 = _mm512_fmadd_ps(p1, v1, o11);
          o20 = _mm512_fmadd_ps(p2, v0, o20);
          o21 = _mm512_fmadd_ps(p2, v1, o21);
          o30 = _mm512_fmadd_ps(p3, v0, o30);
          o31 = _mm512_fmadd_ps(p3, v1, o31);
        }
        _mm512_mask_storeu_ps(a0 + c, k0, o00);
        _mm512_mask_storeu_ps(a0 + c + 16, k1, o01);
        if (rows > 1) {
          _mm512_mask_storeu_ps(a1 + c, k0, o10);
          _mm512_mask_storeu_ps(a1 + c + 16, k1, o11);
        }
        if (rows > 2) {
          _mm512_mask_storeu_ps(a2 + c, k0, o20);
          _mm512_mask_storeu_ps(a2 + c + 16, k1, o21);
        }
        if (rows > 3) {
          _mm512_mask_storeu_ps(a3 + c, k0, o30);
          _mm512_mask_storeu_ps(a3 + c + 16, k1, o31);
        }
      }
    }
  }
}

#else  // portable fallback (builds without AVX-512): the same products, one dot / one axpy at a time

template <class T>
inline void scores_direct(int64_t M, int64_t n, int64_t E, const float* q, const T* k, int64_t ks, float* s,
                          int64_t lds) {
  const int64_t E16 = round_up(E, 16);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float d = 0.f;
      for (int64_t e = 0; e < E; ++e) d += q[r * E16 + e] * static_cast<float>(k[j * ks + e]);
      s[r * lds + j] = d;
    }
}

template <class T, class C>
inline void pv_direct(int64_t M, int64_t Ev, int64_t n, const C* pm, int64_t ldp, const T* v, int64_t vs, float* acc,
                      int64_t ldacc) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const float pr = static_cast<float>(pm[r * ldp + j]);
      for (int64_t e = 0; e < Ev; ++e) acc[r * ldacc + e] += pr * static_cast<float>(v[j * vs + e]);
    }
}

#endif

}  // namespace sdpax::cpu
