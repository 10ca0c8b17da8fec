// FlashAttention-2-style backward kernels (tensor cores through mma.sync; float inputs in split TF32, mma.h).
//
//   bwd_delta_kernel  Delta_i = rowsum(dO_i * O_i) (float32), one warp per row.
//   bwd_kernel        one block per (key block, batch * kv head). Each warp owns 16 keys and works on transposed
//                     scores, so the key-indexed gradients stay in registers for the whole block:
//                       S^T = K Q^T,  P^T = exp(S^T * scale - lse)   (recomputed from the forward's lse)
//                       dP^T = V dO^T, dS^T = P^T o (dP^T - Delta)   (dropout: the same Philox keep mask)
//                       dV += P_drop^T dO,  dK += dS^T Q              (register accumulators, all G query heads)
//                       dQ += dS K                                    (through shared memory, float atomics)
//                     Query blocks stream through double-buffered shared memory with cp.async.
// dQ is accumulated in float32 with atomics, so it is not bitwise deterministic: the selector routes
// deterministic-mode training to MATH (python/sdpax/_select.py).
#pragma once
#include "cuda/mask.h"
#include "cuda/mma.h"

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
  for (int64_t c = lane; c < p.Ev; c += 32) acc += to_float(o[c * p.out_st.c]) * to_float(d[c * p.dout_st.c]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) delta[row] = acc;
}

template <class T, int D>
struct BwdCfg {
  static constexpr bool kF32 = sizeof(T) == 4;
  // 8 warps x 16 keys: dQ atomics per flop fall as 1 / kBN. float at d128: 4 warps, so that K, V and the Q / dO
  // buffers (twice the bytes) stay within 136 KB, which an sm80 block can have.
  static constexpr int kWarps = kF32 && D > 64 ? 4 : 8;
  static constexpr int kBN = kWarps * 16;                        // keys per block (16 per warp)
  static constexpr int kBM = D <= 64 && !kF32 ? 64 : 32;        // queries per inner step
  static constexpr int kThreads = kWarps * 32;
  // K, V, 2 x (Q, dO), dS^T; lse and Delta
  static constexpr int kSmem = (2 * kBN * D + 4 * kBM * D + kBN * kBM) * static_cast<int>(sizeof(T)) + 2 * 2 * kBM * 4;
};

template <class T, int D, bool kGeneral>
__global__ void __launch_bounds__(BwdCfg<T, D>::kThreads, 1) bwd_kernel(const __grid_constant__ AttnParams p) {
  using Cfg = BwdCfg<T, D>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kThreads, NW = Cfg::kWarps;
  using KTile = SmemTile<BN, D, T>;
  using QTile = SmemTile<BM, D, T>;
  using STile = SmemTile<BN, BM, T>;
  constexpr int kVec = KTile::kVec;  // elements per 16-byte copy
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + KTile::kBytes;
  const uint32_t sQ0 = sV + KTile::kBytes;            // Q buffers at sQ0 + buf * 2 * QTile::kBytes,
  const uint32_t sS = sQ0 + 4 * QTile::kBytes;        // dO right after each Q buffer
  float* sLse = reinterpret_cast<float*>(smem + 2 * KTile::kBytes + 4 * QTile::kBytes + STile::kBytes);
  float* sDelta = sLse + 2 * BM;
  unsigned char* sS_ptr = smem + 2 * KTile::kBytes + 4 * QTile::kBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const int n_blocks = (S + BN - 1) / BN;
  const int n_block = static_cast<int>(blockIdx.x % n_blocks);
  const int64_t bhk = blockIdx.x / n_blocks;
  const int64_t b = bhk / p.hkv;
  const int hk = static_cast<int>(bhk % p.hkv);
  const int j0 = n_block * BN;

  // Query rows that can see key j0 or later: i + 1 + shift > j0 under causal alignment.
  int i_begin = 0;
  if (p.causal != Causal::None) {
    const int64_t shift = p.causal == Causal::LowerRight ? p.S - p.L : 0;
    const int64_t first = static_cast<int64_t>(j0) - shift;
    i_begin = static_cast<int>(first < 0 ? 0 : (first > L ? L : first));
  }
  const int q_first = i_begin / BM;
  const int q_tiles = (L + BM - 1) / BM - q_first;
  const int steps = q_tiles > 0 ? G * q_tiles : 0;
  const int last_key = min(j0 + BN, S) - 1;

  // K and V of this block, zero-filled past S and past E / Ev.
  auto load_rows = [&](uint32_t dst, const void* base, int64_t off, const Strides4& st, int r0, int nrows,
                       int valid_rows, int cols, auto tile) {
    using Tile = decltype(tile);
    const T* src0 = static_cast<const T*>(base) + off;
    for (int idx = tid; idx < nrows * (D / kVec); idx += NT) {
      const int r = idx / (D / kVec), c = idx % (D / kVec);
      const bool ok = r0 + r < valid_rows && c * kVec < cols;
      cp_async16(dst + Tile::offset(r, c), ok ? src0 + static_cast<int64_t>(r0 + r) * st.r + c * kVec : src0, ok);
    }
  };
  const int64_t k_off = b * p.k_st.b + static_cast<int64_t>(hk) * p.k_st.h;
  const int64_t v_off = b * p.v_st.b + static_cast<int64_t>(hk) * p.v_st.h;
  load_rows(sK, p.k, k_off, p.k_st, j0, BN, S, E, KTile{});
  load_rows(sV, p.v, v_off, p.v_st, j0, BN, S, Ev, KTile{});

  auto step_head = [&](int step) { return hk * G + step / q_tiles; };
  auto step_i0 = [&](int step) { return (q_first + step % q_tiles) * BM; };
  auto load_q = [&](int step, int buf) {
    const int h = step_head(step), i0 = step_i0(step);
    const uint32_t q_dst = sQ0 + buf * 2 * QTile::kBytes;
    load_rows(q_dst, p.q, b * p.q_st.b + static_cast<int64_t>(h) * p.q_st.h, p.q_st, i0, BM, L, E, QTile{});
    load_rows(q_dst + QTile::kBytes, p.dout, b * p.dout_st.b + static_cast<int64_t>(h) * p.dout_st.h, p.dout_st,
              i0, BM, L, Ev, QTile{});
    // lse and Delta of the same rows travel in the same cp.async group (0 past L; those rows are masked anyway).
    const int64_t row0 = (b * p.hq + h) * p.L + i0;
    for (int r = tid; r < BM; r += NT) {
      const bool ok = i0 + r < L;
      cp_async4(smem_u32(sLse + buf * BM + r), ok ? p.lse + row0 + r : p.lse, ok);
      cp_async4(smem_u32(sDelta + buf * BM + r), ok ? p.delta + row0 + r : p.delta, ok);
    }
  };
  if (steps > 0) load_q(0, 0);
  cp_async_commit();

  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);
  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  const float scale_log2 = p.scale * kLog2e;

  // This warp's keys: rows g and g + 8 of its 16.
  int key[2];
  key[0] = j0 + warp * 16 + g;
  key[1] = key[0] + 8;

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[dn][e] = acc_dv[dn][e] = 0.f;

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int h = step_head(step), i0 = step_i0(step);
    const int64_t bh = b * p.hq + h;
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) load_q(step + 1, buf ^ 1);
    cp_async_commit();

    // Elementwise tests (causal / bounds / mask) only where some element of the tile can fail them.
    const int i_last = min(i0 + BM, L) - 1;
    const bool need_elem = has_mask || last_key >= row_limit(p, i0) || i0 + BM > L || j0 + BN > S;
    if (has_mask) {
      bool any = false;
#pragma unroll
      for (int n = 0; n < BM / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + n * 8 + 2 * t + (e & 1), j = key[e >> 1];
          if (i < L && j < row_limit(p, i))
            any |= mask_bias(p, b * p.mask_st.b + h * p.mask_st.h + int64_t(i) * p.mask_st.r +
                                    int64_t(j) * p.mask_st.c) != -INFINITY;
        }
      if (!__syncthreads_or(any)) continue;  // the whole tile is masked: it contributes nothing
    }
    (void)i_last;

    const uint32_t sQ = sQ0 + buf * 2 * QTile::kBytes;
    const uint32_t sdO = sQ + QTile::kBytes;

    // S^T = K_w Q^T and dP^T = V_w dO^T (16 keys x BM queries per warp).
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {  // full bucket: padding columns are zero, loops stay branch-free
      FragA<T> a, av;
      KTile::lda(a, sK, warp * 16, kk * 16, lane);
      KTile::lda(av, sV, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BM / 16; ++np) {
        FragB<T> bb, bd;
        QTile::ldb(bb, sQ, np * 16, kk * 16, lane);
        QTile::ldb(bd, sdO, np * 16, kk * 16, lane);
        mma(st[2 * np], a, bb, 0);
        mma(st[2 * np + 1], a, bb, 1);
        mma(dpt[2 * np], av, bd, 0);
        mma(dpt[2 * np + 1], av, bd, 1);
      }
    }

    // P^T, dropout, dS^T. st becomes P_drop^T (for dV), dpt becomes dS^T.
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = n * 8 + 2 * t + (e & 1);
        const int i = i0 + r, j = key[e >> 1];
        float s = st[n][e] * scale_log2;
        if (need_elem) {
          if (i >= L || j >= row_limit(p, i)) {
            s = -INFINITY;
          } else if (has_mask) {
            s += mask_bias(p, b * p.mask_st.b + h * p.mask_st.h + int64_t(i) * p.mask_st.r +
                                  int64_t(j) * p.mask_st.c) * kLog2e;
          }
        }
        // A row with no allowed key has lse = -inf: its P must be 0, not exp2(-inf + inf).
        const float lse = sLse[buf * BM + r];
        const float pr = lse == -INFINITY ? 0.f : exp2f(s - lse * kLog2e);
        float dp = dpt[n][e];
        float pd = pr;
        if (has_dropout) {
          const float keep = drop.one(static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j));
          dp *= keep;
          pd *= keep;
        }
        st[n][e] = pd;
        dpt[n][e] = pr * (dp - sDelta[buf * BM + r]);
      }
    }

    // dV += P_drop^T dO, dK += dS^T Q (A operands straight from the C fragments).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      FragA<T> ap, as;
      a_from_c(ap, st[2 * kk], st[2 * kk + 1]);
      a_from_c(as, dpt[2 * kk], dpt[2 * kk + 1]);
      // dS^T to shared memory for dQ (rows = keys, columns = queries).
      {
        const int row = warp * 16 + g, col = kk * 16 + 2 * t;
        STile::st2(sS_ptr, row, col, dpt[2 * kk][0], dpt[2 * kk][1]);
        STile::st2(sS_ptr, row + 8, col, dpt[2 * kk][2], dpt[2 * kk][3]);
        STile::st2(sS_ptr, row, col + 8, dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        STile::st2(sS_ptr, row + 8, col + 8, dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        FragB<T> bb, bq;
        QTile::ldb_t(bb, sdO, kk * 16, dn * 16, lane);
        QTile::ldb_t(bq, sQ, kk * 16, dn * 16, lane);
        mma(acc_dv[2 * dn], ap, bb, 0);
        mma(acc_dv[2 * dn + 1], ap, bb, 1);
        mma(acc_dk[2 * dn], as, bq, 0);
        mma(acc_dk[2 * dn + 1], as, bq, 1);
      }
    }
    __syncthreads();

    // dQ (BM x E) += dS (BM x BN) K (BN x E): warp -> one 16-row m-tile and a share of the columns.
    {
      constexpr int kMTiles = BM / 16;
      constexpr int kSplit = NW / kMTiles;      // warps per m-tile
      constexpr int kCols = D / kSplit;         // columns per warp
      const int mt = warp % kMTiles, c_begin = (warp / kMTiles) * kCols;
      float acc_dq[kCols / 8][4];
#pragma unroll
      for (int dn = 0; dn < kCols / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[dn][e] = 0.f;
      if (c_begin < E) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          FragA<T> a;
          STile::lda_t(a, sS, kk * 16, mt * 16, lane);
#pragma unroll
          for (int dn = 0; dn < kCols / 16; ++dn) {
            FragB<T> bb;
            KTile::ldb_t(bb, sK, kk * 16, c_begin + dn * 16, lane);
            mma(acc_dq[2 * dn], a, bb, 0);
            mma(acc_dq[2 * dn + 1], a, bb, 1);
          }
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = i0 + mt * 16 + hf * 8 + g;
          if (i >= L) continue;
          float* dq = p.dq_accum + (bh * p.L + i) * p.E;
#pragma unroll
          for (int dn = 0; dn < kCols / 8; ++dn) {
            const int c = c_begin + dn * 8 + 2 * t;
            if (c < E) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              atomicAdd(reinterpret_cast<float2*>(dq + c), make_float2(acc_dq[dn][hf * 2], acc_dq[dn][hf * 2 + 1]));
#else
              atomicAdd(dq + c, acc_dq[dn][hf * 2]);
              atomicAdd(dq + c + 1, acc_dq[dn][hf * 2 + 1]);
#endif
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // dK (scaled) and dV of this warp's 16 keys.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = key[hf];
    if (j >= S) continue;
    T* dk = static_cast<T*>(p.dk) + b * p.dk_st.b + static_cast<int64_t>(hk) * p.dk_st.h + int64_t(j) * p.dk_st.r;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_st.b + static_cast<int64_t>(hk) * p.dv_st.h + int64_t(j) * p.dv_st.r;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (c < E) st2<T>(dk + c, acc_dk[dn][hf * 2] * p.scale, acc_dk[dn][hf * 2 + 1] * p.scale);
      if (c < Ev) st2<T>(dv + c, acc_dv[dn][hf * 2], acc_dv[dn][hf * 2 + 1]);
    }
  }
}

}  // namespace cuda
}  // namespace sdpax
