// Building blocks shared by the fused CPU kernels: compute types, GEMM on packed tiles, operand packing, mask
// dropout factors, per-thread scratch and the task loop. Masks live in mask.h, the online softmax in softmax.h.
//
// GEMMs go through at::native::cpublas::brgemm (oneDNN micro-kernels: AMX for bfloat16 on CPUs that have it,
// AVX-512 FMA for float32). brgemm multiplies row-major A (M x K) by B (K x N) into float C. For bfloat16, B is
// in VNNI-2 layout (pairs of consecutive K rows interleaved: element (k, n) at [(k/2) * 2N + 2n + k%2]) and K is
// padded to even with zeros. float16 tiles are widened to float32 (exact), so half uses the float32 GEMM.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/params.h"
#include "common/philox.h"

namespace sdpax::cpu {

using BF16 = c10::BFloat16;
using F16 = c10::Half;
using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The element type GEMM operands are packed in: bfloat16 stays bfloat16 (AMX), float16 and float32 use float32.
template <class T> struct ComputeOf { using type = float; };
template <> struct ComputeOf<BF16> { using type = BF16; };

template <class C> constexpr bool kVnni = std::is_same_v<C, BF16>;
// K of a GEMM as packed: bfloat16 pairs K rows, so an odd K gets one zero row/column.
template <class C> inline int64_t padk(int64_t k) { return kVnni<C> ? (k + 1) & ~int64_t(1) : k; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// B operand whose K dimension runs along the source's rows: element (k, n) = src[k * rs + n * cs], K = rows.
// float: row-major K x N. bfloat16: VNNI-2 with K padded to even.
template <class S, class D>
inline void pack_b_rows(const S* src, int64_t rs, int64_t cs, int64_t K, int64_t N, D* dst) {
  if constexpr (!kVnni<D>) {
    pack_a(src, rs, cs, K, N, N, dst);
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

// B operand whose K dimension runs along the source's columns (a transposed use of the rows):
// element (k, n) = src[n * rs + k * cs], K = cols, N = rows.
template <class S, class D>
inline void pack_b_cols(const S* src, int64_t rs, int64_t cs, int64_t K, int64_t N, D* dst) {
  const int64_t Kp = padk<D>(K);
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

// A operand that is the transpose of a strided source: dst (cols x ld), dst[c * ld + r] = src[r * rs + c * cs].
template <class S, class D>
inline void pack_a_transposed(const S* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, int64_t ld, D* dst) {
  thread_local float row[1024];
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + c * ld + ld, D(0.f));
  for (int64_t r = 0; r < rows; ++r) {
    load_row(src + r * rs, cs, cols, cols, row);
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = D(row[c]);
  }
}

// ---- dropout ----

struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0, threshold = 0;
  float scale = 1.f;

  explicit Dropout(const AttnParams& p) {
    on = p.dropout_p > 0.0;
    if (on) {
      seed = static_cast<uint64_t>(p.rng[0]);
      offset = static_cast<uint64_t>(p.rng[1]);
      threshold = dropout_threshold(p.dropout_p);
      scale = dropout_scale(p.dropout_p);
    }
  }

  // f[j - j0] = scale if element (bh, i, j) is kept else 0, for j in [j0, j0 + n).
  void factors(int64_t bh, int64_t i, int64_t j0, int64_t n, float* f) const {
    uint32_t r[4];
    for (int64_t j4 = j0 / 4; j4 * 4 < j0 + n; ++j4) {
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
      TORCH_CHECK(ptr_ != nullptr, "sdpax: out of memory allocating ", bytes, " bytes of kernel scratch");
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
