// The backward's epilogue, shared by every backward main loop (bwd/mma_kernel.h, bwd/wide_kernel.h, bwd/sm90_kernel.h):
//   Delta pre-pass  Delta_i = rowsum(dO_i * O_i) (float32), one warp per row, before any main loop; it also zeroes
//                   the row of dq_accum (when there is one) that the main loop's atomics add into, so no separate
//                   fill kernel runs.
//   dK, dV          a block owns its keys for the whole walk over the query tiles: each key's dK (scaled) and dV
//                   are written once, in the input dtype, without atomics.
//   dQ              float atomics into dq_accum (unscaled dS K), one pair of columns per atomic where the hardware
//                   has float2 atomics (sm90); launch_dq_finish scales and rounds dq_accum afterwards.
// Accumulator layout: an m16 x n(8 NN) product as a thread holds it (mma.sync tiles as float[NN][4], a wgmma m64 warp
// slice as float[4 NN]): element (row g + 8 hf, column 8 nn + 2t + x) at acc_at(acc, nn, 2 hf + x), with g = lane / 4
// and t = lane % 4. In the key-major products (S^T, dP^T, dK, dV) rows are keys.
#pragma once
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

template <class T>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const __grid_constant__ AttnParams p, float* delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.batch * p.hq * p.L;
  if (row >= rows) return;
  const int64_t bh = row / p.L, i = row % p.L, b = bh / p.hq, h = bh % p.hq;
  const T* o = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + i * p.dout_st.r;
  float acc = 0.f;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  if (p.out_st.c == 1 && p.dout_st.c == 1 && p.Ev % kVec == 0 && reinterpret_cast<uintptr_t>(o) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(d) % 16 == 0) {
    // Rows of 16-byte aligned vectors (the usual case): one load per 16 bytes instead of one per element.
    for (int64_t c = lane * kVec; c < p.Ev; c += 32 * kVec) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c), dv = *reinterpret_cast<const uint4*>(d + c);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc += to_float(oe[e]) * to_float(de[e]);
    }
  } else {
    for (int64_t c = lane; c < p.Ev; c += 32) acc += to_float(o[c * p.out_st.c]) * to_float(d[c * p.dout_st.c]);
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) delta[row] = acc;
  if (p.dq_accum != nullptr) {
    float* dq = p.dq_accum + row * p.E;
    for (int64_t c = lane; c < p.E; c += 32) dq[c] = 0.f;
  }
}

// Delta into p.delta (and zeros into p.dq_accum): the first launch of every backward.
// Delta is per row, whichever sequence the row belongs to: a packed call runs it as one batch of every packed row.
template <class T>
cudaError_t launch_bwd_delta(const AttnParams& p, cudaStream_t stream) {
  const AttnParams rows = all_rows(p);
  const int64_t n = rows.batch * rows.hq * rows.L;
  bwd_delta_kernel<T><<<static_cast<unsigned>((n + 7) / 8), 256, 0, stream>>>(rows, const_cast<float*>(p.delta));
  return cudaGetLastError();
}

template <int NN>
__device__ __forceinline__ float acc_at(const float (&acc)[NN][4], int nn, int e) {
  return acc[nn][e];
}
template <int N>
__device__ __forceinline__ float acc_at(const float (&acc)[N], int nn, int e) {
  return acc[nn * 4 + e];
}

// dK (scaled) and dV of keys j and j + 8 (the accumulators' rows g and g + 8; keys past S are not stored), columns
// c0 + 8 nn + 2t for nn < NN (past E / Ev: not stored). The helpers of this file test against the caller's sizes
// (its int copies, or p's own fields, bound by reference: read where tested); b is the batch as the caller keeps it.
template <class T, int NN, class Acc, class Int, class Batch>
__device__ __forceinline__ void store_dkdv(const AttnParams& p, const Acc& dk, const Acc& dv, Batch b, int hk,
                                           int j, int c0, int t, const Int& S, const Int& E, const Int& Ev) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int jj = j + 8 * hf;
    if (jj >= S) continue;
    T* dk_row = static_cast<T*>(p.dk) + b * p.dk_st.b + static_cast<int64_t>(hk) * p.dk_st.h + int64_t(jj) * p.dk_st.r;
    T* dv_row = static_cast<T*>(p.dv) + b * p.dv_st.b + static_cast<int64_t>(hk) * p.dv_st.h + int64_t(jj) * p.dv_st.r;
#pragma unroll
    for (int nn = 0; nn < NN; ++nn) {
      const int c = c0 + nn * 8 + 2 * t;
      if (c < E) st2<T>(dk_row + c, acc_at(dk, nn, hf * 2) * p.scale, acc_at(dk, nn, hf * 2 + 1) * p.scale);
      if (c < Ev) st2<T>(dv_row + c, acc_at(dv, nn, hf * 2), acc_at(dv, nn, hf * 2 + 1));
    }
  }
}

// dst[0] += x, dst[1] += y (dst 8-byte aligned): one float2 atomic on sm90, two float atomics below.
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// dQ of a warp's m16 x (8 NN) tile of (batch, head) bh: rows i_w + g and i_w + g + 8, columns c0 + 8 nn + 2t, each
// element tested against L and E (bwd_kernel).
template <int NN>
__device__ __forceinline__ void add_dq_checked(const AttnParams& p, const float (&acc)[NN][4], int64_t bh, int i_w,
                                               int c0, int g, int t, int L, int E) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = i_w + hf * 8 + g;
    if (i >= L) continue;
    float* dq = p.dq_accum + lse_row(p, bh, i) * p.E;
#pragma unroll
    for (int nn = 0; nn < NN; ++nn) {
      const int c = c0 + nn * 8 + 2 * t;
      if (c < E) atomic_add2(dq + c, acc[nn][hf * 2], acc[nn][hf * 2 + 1]);
    }
  }
}

// dQ of a warp's two m16 tiles (bwd_wide): rows i_q + 8 r (r = 2 mt + hf, i_q = the warp's first row + g), columns
// c0 + 2t + 8 nn for the first n_cols of the NN n-tiles (those with a column < E). One pointer, offsets of whole
// rows (row8 = 8 E); a warp whose rows and columns are all in bounds adds without tests (no branch around each
// atomic).
template <bool kGuarded, int NN>
__device__ __forceinline__ void add_dq_rows32_tests(const float (&acc)[2][NN][4], float* dq0, int i_q, int L,
                                                    int n_cols, int64_t row8) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (kGuarded && i_q + mt * 16 + hf * 8 >= L) continue;
      float* dq = dq0 + (2 * mt + hf) * row8;
#pragma unroll
      for (int nn = 0; nn < NN; ++nn) {
        if (kGuarded && nn >= n_cols) continue;
        atomic_add2(dq + nn * 8, acc[mt][nn][hf * 2], acc[mt][nn][hf * 2 + 1]);
      }
    }
}
template <int NN>
__device__ __forceinline__ void add_dq_rows32(const AttnParams& p, const float (&acc)[2][NN][4], int64_t bh, int i_q,
                                              int c0, int t, int n_cols, int64_t row8, int L) {
  float* dq0 = p.dq_accum + lse_row(p, bh, i_q) * p.E + c0 + 2 * t;
  if (i_q + 24 < L && n_cols == NN) add_dq_rows32_tests<false>(acc, dq0, i_q, L, n_cols, row8);
  else add_dq_rows32_tests<true>(acc, dq0, i_q, L, n_cols, row8);
}

// dQ of one wgmma consumer warp's m16 slice (bwd_sm90): rows i_w + g and i_w + g + 8 (i_w: the warp's first row),
// columns c0 + 8 nn + 2t (nn < NN). A warp whose 16 rows and 8 NN columns are all in bounds adds without tests.
template <bool kGuarded, int NN>
__device__ __forceinline__ void add_dq_rows16_tests(const AttnParams& p, const float (&dq)[4 * NN], float* dq0,
                                                    int i_q, int c0, int t) {
  const int L = static_cast<int>(p.L), E = static_cast<int>(p.E);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if (kGuarded && i_q + 8 * hf >= L) continue;
    float* d = dq0 + hf * 8 * p.E;
#pragma unroll
    for (int nn = 0; nn < NN; ++nn) {
      if (kGuarded && c0 + nn * 8 + 2 * t >= E) continue;
      atomic_add2(d + nn * 8, dq[nn * 4 + hf * 2], dq[nn * 4 + hf * 2 + 1]);
    }
  }
}
template <int NN>
__device__ __forceinline__ void add_dq_rows16(const AttnParams& p, const float (&dq)[4 * NN], int64_t bh, int i_w,
                                              int c0, int g, int t) {
  const int L = static_cast<int>(p.L), E = static_cast<int>(p.E);
  const int i_q = i_w + g;
  float* dq0 = p.dq_accum + lse_row(p, bh, i_q) * p.E + c0 + 2 * t;
  if (i_w + 16 <= L && c0 + 8 * NN <= E)
    add_dq_rows16_tests<false, NN>(p, dq, dq0, i_q, c0, t);
  else
    add_dq_rows16_tests<true, NN>(p, dq, dq0, i_q, c0, t);
}

// One element of the mask gradient.
__device__ __forceinline__ void dmask_put(const AttnParams& p, float* dst, float v) {
  if (p.dmask_atomic) atomicAdd(dst, v);
  else *dst = v;
}

// A mask broadcast over rows: key j's gradient summed over row slot `slot`, from the partial sums of lanes
// t = 0..3 (same g); lane t = 0 writes it (keys past S: nothing).
__device__ __forceinline__ void dmask_put_key_sum(const AttnParams& p, int64_t base, int slot, int j, float part,
                                                  int t, int S) {
  part = warp_sum4(part);
  if (t == 0 && j < S) dmask_put(p, p.dmask + base + int64_t(slot) * p.dmask_st.r + int64_t(j) * p.dmask_st.c, part);
}

// Mask gradient of a 16-key warp tile of dS^T (bwd_kernel): keys j_lo and j_hi = j_lo + 8, queries i0 + 8 n + 2t
// (+1) of (batch b, head h); rows past L and keys past S are not written. A row-broadcast mask: one slot per query
// tile of BM rows, this tile's rows of each key summed first (4 lanes x BM / 4 values).
template <int BM>
__device__ __forceinline__ void store_dmask_keys16(const AttnParams& p, const float (&ds)[BM / 8][4], int64_t b, int h,
                                                   int i0, int j_lo, int j_hi, int t, int L, int S) {
  const int64_t base = b * p.dmask_st.b + h * p.dmask_st.h;
  if (p.dmask_tile_rows) {
    float part[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[e >> 1] += ds[n][e];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) dmask_put_key_sum(p, base, i0 / BM, hf ? j_hi : j_lo, part[hf], t, S);
  } else {
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + n * 8 + 2 * t + (e & 1), j = (e >> 1) ? j_hi : j_lo;
        if (i < L && j < S)
          dmask_put(p, p.dmask + base + int64_t(i) * p.dmask_st.r + int64_t(j) * p.dmask_st.c, ds[n][e]);
      }
  }
}

// Mask gradient of a 32-key x WQ-query warp tile of dS^T (bwd_wide): keys j_w + 16 mt + 8 hf + g, queries
// i_w + 8 n + 2t + c of (batch b, head h). A row-broadcast mask: the S^T tile of a key is split over two query
// warps, so a slot is this warp's WQ rows (BwdWideCfg::kMaskRows; a slot wholly past L has none: deterministic mode
// sizes the scratch to ceil(L / WQ) slots), summed in a fixed order (own rows, then the 4 t lanes): deterministic
// mode stays bitwise repeatable without a cross-warp pass.
template <int WQ>
__device__ __forceinline__ void store_dmask_keys32(const AttnParams& p, const float (&ds)[2][WQ / 8][4], int64_t b,
                                                   int h, int i_w, int j_w, int g, int t, int L, int S) {
  const int64_t base = b * p.dmask_st.b + h * p.dmask_st.h;
  if (p.dmask_tile_rows && i_w < L) {
    const int slot = i_w / WQ;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float part = 0.f;
#pragma unroll
        for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c) part += ds[mt][n][2 * hf + c];
        dmask_put_key_sum(p, base, slot, j_w + mt * 16 + hf * 8 + g, part, t, S);
      }
  } else if (!p.dmask_tile_rows) {
#pragma unroll
    for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = i_w + n * 8 + 2 * t + c;
        if (i >= L) continue;
        float* row = p.dmask + base + int64_t(i) * p.dmask_st.r;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int j = j_w + mt * 16 + hf * 8 + g;
            if (j >= S) continue;
            dmask_put(p, row + int64_t(j) * p.dmask_st.c, ds[mt][n][2 * hf + c]);
          }
      }
  }
}

}  // namespace cuda
}  // namespace sdpax
