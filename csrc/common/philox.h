// Counter-based random numbers for dropout (Philox-4x32-10, Salmon et al., SC'11).
//
// The keep/drop decision of attention element (bh, i, j) is a pure function of
//   (seed, offset, bh, i, j)   bh = flattened (batch..., query head), i = query row, j = key column
// so a backward pass (or another backend on the same device) regenerates exactly the same mask without storing it:
//   counter = (j / 4, i, bh, offset_lo32), key = (seed_lo32, seed_hi32)
//   r       = philox4x32_10(counter, key)[j % 4]          (one Philox call serves four neighbouring keys)
//   keep    = r >= threshold,   threshold = floor(p * 2^32) (so p = 1 drops everything)
//
// The round function is written once, generically over the word type W, so the composite ATen MATH backend
// (W = a tensor of uint32 values held in int64) and the fused CPU/CUDA kernels (W = uint32_t) cannot drift apart.
// This header includes no torch header.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SDPAX_HD __host__ __device__ __forceinline__
#else
#define SDPAX_HD inline
#endif

namespace sdpax {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Word operations for plain 32-bit integers. Overloads for other word types live next to their users.
SDPAX_HD uint32_t philox_wrap32(uint32_t x) { return x; }
SDPAX_HD void philox_mulhilo(uint32_t m, uint32_t x, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = m * x;
  hi = __umulhi(m, x);
#else
  const uint64_t p = static_cast<uint64_t>(m) * x;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Ten rounds of Philox-4x32 on counter c with key (k0, k1); the result replaces c.
template <class W, class K>
SDPAX_HD void philox4x32_10(W (&c)[4], K k0, K k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 = philox_wrap32(k0 + kPhiloxW0);
      k1 = philox_wrap32(k1 + kPhiloxW1);
    }
    W hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c[0], hi0, lo0);
    philox_mulhilo(kPhiloxM1, c[2], hi1, lo1);
    W n0 = hi1 ^ c[1] ^ k0;
    W n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// Dropout threshold: a random word r keeps its element iff r >= threshold. 2^32 (p = 1) keeps nothing.
SDPAX_HD uint64_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(p * 4294967296.0);
}

// Factor applied to kept probabilities: 1/(1-p), and 0 for p = 1 (everything dropped gives zeros, not NaN).
SDPAX_HD double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// The four random words of the group of keys [4*(j/4), 4*(j/4)+4) for row i of head bh.
SDPAX_HD void dropout_words(uint64_t seed, uint64_t offset, uint32_t bh, uint32_t i, uint32_t j4, uint32_t (&r)[4]) {
  r[0] = j4;
  r[1] = i;
  r[2] = bh;
  r[3] = static_cast<uint32_t>(offset);
  philox4x32_10(r, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace sdpax
