// Attention masks, tile by tile. A mask of any broadcast shape arrives as (batch, hq, L, S) strides (0 on
// broadcast dims); the kernels ask for the rows of one tile and get, per row, either a pointer straight into the
// mask (bool or float32 rows with unit column stride: nothing is copied) or into a float32 bias buffer the row was
// converted to (other dtypes and strides). Rows that share storage (a (B, 1, 1, S) padding mask) are looked at
// once. The same pass says whether the whole tile is masked, so the kernels skip its GEMMs.
#pragma once
#include "cpu/tile.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace sdpax::cpu {

// One mask row restricted to a tile's columns: at most one pointer is set.
struct RowMask {
  const float* bias = nullptr;    // additive, natural-log units (-inf hides the key)
  const uint8_t* keep = nullptr;  // bool: nonzero = attend

  // The additive value of column j (0 or -inf for bool rows).
  float at(int64_t j) const {
    if (keep) return keep[j] ? 0.f : kNegInf;
    return bias ? bias[j] : 0.f;
  }
  // The same row from column j on.
  RowMask from(int64_t j) const { return {bias ? bias + j : nullptr, keep ? keep + j : nullptr}; }
};

// Index of the last column of a row mask that is not hidden (-1 if none).
inline int64_t last_visible(const RowMask& rm, int64_t n) {
  int64_t j = n;
  if (rm.keep) {
#if defined(CPU_CAPABILITY_AVX512)
    for (; j >= 64; j -= 64) {
      const uint64_t k = _mm512_test_epi8_mask(_mm512_loadu_si512(rm.keep + j - 64), _mm512_set1_epi8(-1));
      if (k) return j - 64 + 63 - __builtin_clzll(k);
    }
#endif
    for (; j > 0; --j)
      if (rm.keep[j - 1]) return j - 1;
    return -1;
  }
  for (; j > 0; --j)
    if (rm.bias[j - 1] != kNegInf) return j - 1;
  return -1;
}

// The n additive values of a row mask as float32 (bool rows become 0 / -inf).
inline void row_bias(const RowMask& rm, int64_t n, float* out) {
  if (rm.bias) {
    std::memcpy(out, rm.bias, n * sizeof(float));
    return;
  }
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 zero = _mm512_setzero_ps(), ninf = _mm512_set1_ps(kNegInf);
  for (; j + 16 <= n; j += 16) {
    const __mmask16 k = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rm.keep + j)),
                                           _mm_set1_epi8(-1));
    _mm512_storeu_ps(out + j, _mm512_mask_blend_ps(k, ninf, zero));
  }
#endif
  for (; j < n; ++j) out[j] = rm.at(j);
}

inline int64_t mask_elem_size(const AttnParams& p) {
  if (p.mask_kind == MaskKind::Bool) return 1;
  return p.mask_dtype == ScalarKind::Float ? 4 : 2;
}

// Start of the mask row for (b, h, i).
inline const void* mask_row(const AttnParams& p, int64_t b, int64_t h, int64_t i) {
  const int64_t off = b * p.mask_st.b + h * p.mask_st.h + i * p.mask_st.r;
  return static_cast<const char*>(p.mask) + off * mask_elem_size(p);
}

inline bool none_kept(const uint8_t* keep, int64_t n) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + 64 <= n; j += 64)
    if (_mm512_test_epi8_mask(_mm512_loadu_si512(keep + j), _mm512_set1_epi8(-1))) return false;
#endif
  for (; j < n; ++j)
    if (keep[j]) return false;
  return true;
}

inline bool all_neg_inf(const float* x, int64_t n) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (; j + 16 <= n; j += 16)
    if (_mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), ninf, _CMP_NEQ_UQ)) return false;
#endif
  for (; j < n; ++j)
    if (x[j] != kNegInf) return false;
  return true;
}

// The mask row starting at `row`, columns [j0, j0 + n). May convert into buf (n floats). Sets all_masked when no
// column of the row is visible.
inline RowMask load_row_mask(const AttnParams& p, const void* row, int64_t j0, int64_t n, float* buf,
                             bool& all_masked) {
  RowMask rm;
  const int64_t cs = p.mask_st.c;
  if (p.mask_kind == MaskKind::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(row) + j0 * cs;
    if (cs == 1) {
      rm.keep = m;
      all_masked = none_kept(m, n);
      return rm;
    }
    for (int64_t j = 0; j < n; ++j) buf[j] = m[j * cs] ? 0.f : kNegInf;
  } else if (p.mask_dtype == ScalarKind::Float && cs == 1) {
    rm.bias = static_cast<const float*>(row) + j0;
    all_masked = all_neg_inf(rm.bias, n);
    return rm;
  } else {
    switch (p.mask_dtype) {
      case ScalarKind::Float: load_row(static_cast<const float*>(row) + j0 * cs, cs, n, n, buf); break;
      case ScalarKind::BFloat16: load_row(static_cast<const BF16*>(row) + j0 * cs, cs, n, n, buf); break;
      case ScalarKind::Half: load_row(static_cast<const F16*>(row) + j0 * cs, cs, n, n, buf); break;
      default: break;
    }
  }
  rm.bias = buf;
  all_masked = all_neg_inf(buf, n);
  return rm;
}

// Per-tile mask state of a kernel thread: the row starts of the tile's query rows and their RowMasks.
struct TileMask {
  std::vector<const void*> rows;
  std::vector<RowMask> row_masks;
  Scratch buf;

  // Sets the rows of the next tile; row r is (b, head_of(r), i_of(r)).
  template <class RowFn>
  void set_rows(const AttnParams& p, int64_t nrows, const RowFn& row_bhi) {
    rows.resize(nrows);
    row_masks.resize(nrows);
    for (int64_t r = 0; r < nrows; ++r) {
      int64_t b, h, i;
      row_bhi(r, b, h, i);
      rows[r] = mask_row(p, b, h, i);
    }
  }

  // True when every row of the tile reads the same mask row (a (B, 1, 1, S) padding mask, say).
  bool uniform() const { return !rows.empty() && std::all_of(rows.begin(), rows.end(), [&](const void* r) {
                                   return r == rows[0];
                                 }); }

  // Loads columns [j0, j0 + n) of every row; true when the whole tile is masked.
  // Also sets visible_end: no row sees a column at or past it (padding masks hide a tile's tail, which the
  // kernels then leave out of the GEMMs and the softmax).
  bool load(const AttnParams& p, int64_t j0, int64_t n) {
    const int64_t nrows = static_cast<int64_t>(rows.size());
    float* base = buf.get<float>(nrows * n);
    bool all_masked = true;
    int64_t used = 0;
    visible_end = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      if (r > 0 && rows[r] == rows[r - 1]) {
        row_masks[r] = row_masks[r - 1];
        continue;
      }
      bool row_dead = false;
      row_masks[r] = load_row_mask(p, rows[r], j0, n, base + used * n, row_dead);
      if (row_masks[r].bias == base + used * n) ++used;
      all_masked = all_masked && row_dead;
      if (!row_dead && visible_end < n) visible_end = std::max(visible_end, last_visible(row_masks[r], n) + 1);
    }
    return all_masked;
  }

  int64_t visible_end = 0;
};

}  // namespace sdpax::cpu
