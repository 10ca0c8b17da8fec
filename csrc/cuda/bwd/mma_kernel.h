// FlashAttention-2-style backward kernels (tensor cores through mma.sync; float inputs in split TF32, mma.h).
//
//   bwd_delta_kernel  Delta_i = rowsum(dO_i * O_i) (float32), one warp per row; it also zeroes the row of dq_accum
//                     (when there is one) that the main loop's atomics add into: no separate fill kernel.
//   bwd_kernel        (float32; 16-bit head dims run bwd/wide_kernel.h, both kinds)
//                     one block per (key block, batch * kv head). Each warp owns 16 keys and works on transposed
//                     scores, so the key-indexed gradients stay in registers for the whole block (head dims above
//                     128: two warps share 16 keys, each keeping half of the dK/dV columns, see BwdCfg):
//                       S^T = K Q^T,  P^T = exp(S^T * scale - lse)   (recomputed from the forward's lse)
//                       dP^T = V dO^T, dS^T = P^T o (dP^T - Delta)   (dropout: the same Philox keep mask)
//                       dV += P_drop^T dO,  dK += dS^T Q              (register accumulators, all G query heads)
//                       dQ += dS K                                    (through shared memory, float atomics)
//                       dmask = dS                                    (float mask gradient, when asked for)
//                     Query blocks stream through double-buffered shared memory with cp.async. The G query heads
//                     of a GQA group are summed into dK/dV in registers by one block in a fixed order.
//   bwd_dq_kernel     deterministic mode only: one block per (query tile, batch * query head) loops over the key
//                     tiles, recomputes P and dS and keeps dQ in registers, so dQ has one writer and a fixed
//                     summation order. (bwd_kernel then skips its dQ atomics.) It costs recomputing S and dP:
//                     about 1.4x the flops of the atomic path.
// Mask gradient: dS is written straight to a float32 buffer when each mask element has one writer (full-shape
// mask, or the per-writer scratch of deterministic mode, summed afterwards by the host); a mask broadcast over
// rows is first summed over the rows of a query tile inside the warp; other broadcasts use float atomics. (A mask
// broadcast over keys needs no writes: its gradient has a closed form, see flash_api.cpp.)
#pragma once
#include "cuda/bwd/epilogue.h"
#include "cuda/bwd/load.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

template <class T, int D, bool kGeneral>
struct BwdCfg {
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kWarps = tiles::bwd_warps(kF32, D);
  // dK and dV of 16 keys over D columns cost each thread D float registers: 256 at D = 256, more than a thread
  // has. Above 128 two warps share 16 keys and each keeps half the columns; both compute the same S^T and dP^T
  // (their reduction runs over all D), which costs 2 of the 5 matrix products twice.
  static constexpr int kColSplit = tiles::bwd_col_split(D);
  static constexpr int kKeyWarps = kWarps / kColSplit;
  static constexpr int kDc = D / kColSplit;                      // dK/dV columns per warp
  static constexpr int kBN = tiles::bwd_bn(kF32, D);             // keys per block (16 per key warp)
  static_assert(kBN == kKeyWarps * 16, "tiles.h: 16 keys per key warp");
  static constexpr int kBM = tiles::bwd_bm(kF32, D, kGeneral ? BwdKind::General : BwdKind::Plain);
  static constexpr int kThreads = kWarps * 32;
  // K, V, 2 x (Q, dO), dS^T; lse and Delta
  static constexpr int kSmem = (2 * kBN * D + 4 * kBM * D + kBN * kBM) * static_cast<int>(sizeof(T)) + 2 * 2 * kBM * 4;
};

template <class T, int D, bool kGeneral, bool kPacked>
__global__ void __launch_bounds__(BwdCfg<T, D, kGeneral>::kThreads, 1)
    bwd_kernel(const __grid_constant__ AttnParams params) {
  using Cfg = BwdCfg<T, D, kGeneral>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kThreads, NW = Cfg::kWarps;
  using KTile = SmemTile<BN, D, T>;
  using QTile = SmemTile<BM, D, T>;
  using STile = SmemTile<BN, BM, T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + KTile::kBytes;
  const uint32_t sQ0 = sV + KTile::kBytes;            // Q buffers at sQ0 + buf * 2 * QTile::kBytes,
  const uint32_t sS = sQ0 + 4 * QTile::kBytes;        // dO right after each Q buffer
  float* sLse = reinterpret_cast<float*>(smem + 2 * KTile::kBytes + 4 * QTile::kBytes + STile::kBytes);
  float* sDelta = sLse + 2 * BM;
  unsigned char* sS_ptr = smem + 2 * KTile::kBytes + 4 * QTile::kBytes;

  constexpr int DC = Cfg::kDc;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kw = warp % Cfg::kKeyWarps;  // this warp's 16 keys
  const int ch = warp / Cfg::kKeyWarps;  // and its share of the dK/dV columns: [ch * DC, ch * DC + DC)
  const BwdGridIndex at = bwd_grid_index(params, BN);
  int64_t b = at.b;
  const AttnParams p = seq_view<T, kPacked>(params, b);  // a packed call: this block's sequence, as batch 0
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  if (at.n_block * BN >= S) return;  // past a shorter sequence's keys (packed calls only)
  const BwdKeyBlock<BN, BM> blk(p, G, L, S, at.n_block, b, at.hk);
  const int hk = blk.hk, j0 = blk.j0, steps = blk.steps;
  const int last_key = min(j0 + BN, S) - 1;

  // K and V of this block, zero-filled past S and past E / Ev.
  const BwdRowCopy<T, D, NT, false> copy(tid);
  const int64_t k_off = b * p.k_st.b + static_cast<int64_t>(hk) * p.k_st.h;
  const int64_t v_off = b * p.v_st.b + static_cast<int64_t>(hk) * p.v_st.h;
  load_kv_rows<KTile, BN>(copy, p, sK, k_off, v_off, j0, S, E, Ev);
  if (steps > 0) load_q_step<QTile, BM, NT>(copy, p, blk, 0, 0, sQ0, sLse, sDelta, L, E, Ev);
  cp_async_commit();

  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);
  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  const bool has_dmask = kGeneral && p.dmask != nullptr && ch == 0;  // the column halves hold the same dS
  const bool dq_atomic = !p.deterministic;                             // else bwd_dq_kernel computes dQ
  const float scale_log2 = p.scale * kLog2e;
  const Softcap cap(p, kGeneral);

  // This warp's keys: rows g and g + 8 of its 16.
  int key[2];
  key[0] = j0 + kw * 16 + g;
  key[1] = key[0] + 8;

  float acc_dk[DC / 8][4], acc_dv[DC / 8][4];
#pragma unroll
  for (int dn = 0; dn < DC / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[dn][e] = acc_dv[dn][e] = 0.f;

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int h = blk.head(step), i0 = blk.row0(step);
    const int64_t bh = b * p.hq + h;
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) load_q_step<QTile, BM, NT>(copy, p, blk, step + 1, buf ^ 1, sQ0, sLse, sDelta, L, E, Ev);
    cp_async_commit();

    // Elementwise tests (causal / window / bounds / mask) only where some element of the tile can fail them.
    const int i_last = min(i0 + BM, L) - 1;
    const bool need_elem = has_mask || last_key >= row_limit(p, i0) || i0 + BM > L || j0 + BN > S ||
                           (kGeneral && j0 < row_begin(p, i_last));
    if (has_mask) {
      bool any = false;
#pragma unroll
      for (int n = 0; n < BM / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + n * 8 + 2 * t + (e & 1), j = key[e >> 1];
          if (i < L && j < row_limit(p, i) && j >= row_begin(p, i))
            any |= mask_bias(p, b * p.mask_st.b + h * p.mask_st.h + int64_t(i) * p.mask_st.r +
                                    int64_t(j) * p.mask_st.c) != -INFINITY;
        }
      if (!__syncthreads_or(any)) continue;  // the whole tile is masked: it contributes nothing
    }

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
      KTile::lda(a, sK, kw * 16, kk * 16, lane);
      KTile::lda(av, sV, kw * 16, kk * 16, lane);
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
        const float th = cap.on ? tanh_f32(st[n][e] * cap.in_scale) : 0.f;  // softcap: dS gets 1 - th^2
        float s = cap.on ? th * cap.out_log2 : st[n][e] * scale_log2;
        if (need_elem) {
          if (i >= L || j >= row_limit(p, i) || (kGeneral && j < row_begin(p, i))) {
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
        dpt[n][e] = pr * (dp - sDelta[buf * BM + r]) * (cap.on ? 1.f - th * th : 1.f);
      }
    }

    // Mask gradient: dS itself (rows past L and keys past S hold 0 and are not written).
    if (has_dmask) store_dmask_keys16<BM>(p, dpt, b, h, i0, key[0], key[1], t, L, S);

    // dV += P_drop^T dO, dK += dS^T Q (A operands straight from the C fragments).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      FragA<T> ap, as;
      a_from_c(ap, st[2 * kk], st[2 * kk + 1]);
      a_from_c(as, dpt[2 * kk], dpt[2 * kk + 1]);
      // dS^T to shared memory for dQ (rows = keys, columns = queries).
      if (dq_atomic && ch == 0) {
        const int row = kw * 16 + g, col = kk * 16 + 2 * t;
        STile::st2(sS_ptr, row, col, dpt[2 * kk][0], dpt[2 * kk][1]);
        STile::st2(sS_ptr, row + 8, col, dpt[2 * kk][2], dpt[2 * kk][3]);
        STile::st2(sS_ptr, row, col + 8, dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        STile::st2(sS_ptr, row + 8, col + 8, dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < DC / 16; ++dn) {
        FragB<T> bb, bq;
        QTile::ldb_t(bb, sdO, kk * 16, ch * DC + dn * 16, lane);
        QTile::ldb_t(bq, sQ, kk * 16, ch * DC + dn * 16, lane);
        mma(acc_dv[2 * dn], ap, bb, 0);
        mma(acc_dv[2 * dn + 1], ap, bb, 1);
        mma(acc_dk[2 * dn], as, bq, 0);
        mma(acc_dk[2 * dn + 1], as, bq, 1);
      }
    }
    __syncthreads();

    // dQ (BM x E) += dS (BM x BN) K (BN x E): warp -> one 16-row m-tile and a share of the columns.
    if (dq_atomic) {
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
        add_dq_checked<kCols / 8>(p, acc_dq, bh, i0 + mt * 16, c_begin, g, t, L, E);
      }
    }
  }
  cp_async_wait<0>();

  // dK (scaled) and dV of this warp's 16 keys.
  store_dkdv<T, DC / 8>(p, acc_dk, acc_dv, b, hk, key[0], ch * DC, t, S, E, Ev);
}

template <class T, int D>
struct BwdDqCfg {
  static constexpr int kWarps = 4;
  static constexpr int kBM = tiles::kBwdDqBM;          // query rows per block (16 per warp)
  static_assert(kBM == kWarps * 16, "tiles.h: 16 rows per warp");
  // keys per tile; 32 at D = 256 keeps S, dP and dQ in registers; float tiles (twice the bytes) take 32 keys so
  // that the block stays within the 163 KB an sm80 block can have
  static constexpr int kBN = tiles::bwd_dq_bn(sizeof(T) == 4, D);
  static constexpr int kThreads = kWarps * 32;
  // Q, dO, then two stages of (K, V)
  static constexpr int kSmem = (2 * kBM * D + 2 * 2 * kBN * D) * static_cast<int>(sizeof(T));
};

// Deterministic dQ: dQ_i = scale * sum_j dS_ij K_j, summed over the key tiles in order by the one block that owns
// row i. Writes dq (input dtype, scaled) directly.
template <class T, int D, bool kGeneral, bool kPacked>
__global__ void __launch_bounds__(BwdDqCfg<T, D>::kThreads, 1) bwd_dq_kernel(
    const __grid_constant__ AttnParams params) {
  using Cfg = BwdDqCfg<T, D>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kThreads;
  using QTile = SmemTile<BM, D, T>;
  using KTile = SmemTile<BN, D, T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sdO = sQ + QTile::kBytes;
  const uint32_t sKV0 = sdO + QTile::kBytes;  // stage s: K at sKV0 + s * 2 * KTile::kBytes, V right after

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // One block per (query tile of the longest sequence, batch, head), heaviest causal blocks first.
  const int m_blocks = static_cast<int>((params.L + BM - 1) / BM);
  const int m_block = m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks);
  int64_t b = blockIdx.x / m_blocks / params.hq;
  const int h = static_cast<int>(blockIdx.x / m_blocks % params.hq);
  const AttnParams p = seq_view<T, kPacked>(params, b);  // a packed call: this block's sequence, as batch 0
  const int64_t bh = b * p.hq + h;
  const int G = static_cast<int>(p.hq / p.hkv), hk = h / G;
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const int i0 = m_block * BM;
  if (i0 >= L) return;  // past a shorter sequence's rows (packed calls only)
  const int n_end = row_limit(p, min(i0 + BM, L) - 1);             // keys visible to the block's last row
  const int n_full = i0 + BM <= L ? row_limit(p, i0) : 0;          // keys visible to all of its rows
  // A sliding window (general kind): keys before the first row's window beginning are invisible to every row,
  // keys from the last row's on pass every row's beginning.
  const int t_lo = kGeneral ? min(row_begin(p, i0), n_end) / BN : 0;
  const int lo_full = kGeneral ? row_begin(p, min(i0 + BM, L) - 1) : 0;
  const int n_tiles = (n_end + BN - 1) / BN - t_lo;

  const BwdRowCopy<T, D, NT, false> copy(tid);
  copy.template rows<QTile>(sQ, p.q, b * p.q_st.b + int64_t(h) * p.q_st.h, p.q_st, i0, BM, L, E);
  copy.template rows<QTile>(sdO, p.dout, b * p.dout_st.b + int64_t(h) * p.dout_st.h, p.dout_st, i0, BM, L, Ev);
  const int64_t k_off = b * p.k_st.b + int64_t(hk) * p.k_st.h;
  const int64_t v_off = b * p.v_st.b + int64_t(hk) * p.v_st.h;
  if (n_tiles > 0) load_kv_stage<KTile, BN>(copy, p, sKV0, k_off, v_off, t_lo, 0, S, E, Ev);
  cp_async_commit();

  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);
  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  const float scale_log2 = p.scale * kLog2e;
  const Softcap cap(p, kGeneral);

  // The rows this thread holds: i0 + warp * 16 + g (+ 8). Past L: lse = -inf, so P = 0 and nothing is written.
  int row[2], lim[2], lo[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    row[hf] = i0 + warp * 16 + hf * 8 + g;
    const bool ok = row[hf] < L;
    lim[hf] = ok ? row_limit(p, row[hf]) : 0;
    lo[hf] = ok && kGeneral ? row_begin(p, row[hf]) : 0;
    const int64_t r = lse_row(p, bh, row[hf]);
    lse2[hf] = ok ? p.lse[r] * kLog2e : -INFINITY;
    delta[hf] = ok ? p.delta[r] : 0.f;
  }

  float acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[dn][e] = 0.f;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (tile + 1 < n_tiles)
      load_kv_stage<KTile, BN>(copy, p, sKV0, k_off, v_off, t_lo + tile + 1, stage ^ 1, S, E, Ev);
    cp_async_commit();
    const uint32_t sK = sKV0 + stage * 2 * KTile::kBytes, sV = sK + KTile::kBytes;
    const int j0 = (t_lo + tile) * BN;

    // S = Q K^T and dP = dO V^T (16 rows x BN keys per warp).
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<T> a, ad;
      QTile::lda(a, sQ, warp * 16, kk * 16, lane);
      QTile::lda(ad, sdO, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        FragB<T> bk, bv;
        KTile::ldb(bk, sK, np * 16, kk * 16, lane);
        KTile::ldb(bv, sV, np * 16, kk * 16, lane);
        mma(s[2 * np], a, bk, 0);
        mma(s[2 * np + 1], a, bk, 1);
        mma(dp[2 * np], ad, bv, 0);
        mma(dp[2 * np + 1], ad, bv, 1);
      }
    }

    // dS = P o (dP_drop - Delta), in the same order of operations as bwd_kernel.
    const bool need_elem = has_mask || j0 + BN > n_full || j0 < lo_full;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e >> 1;
        const int i = row[hf], j = j0 + n * 8 + 2 * t + (e & 1);
        const float th = cap.on ? tanh_f32(s[n][e] * cap.in_scale) : 0.f;  // softcap: dS gets 1 - th^2
        float x = cap.on ? th * cap.out_log2 : s[n][e] * scale_log2;
        if (need_elem) {
          if (j >= lim[hf] || j < lo[hf]) {
            x = -INFINITY;
          } else if (has_mask) {
            x += mask_bias(p, b * p.mask_st.b + h * p.mask_st.h + int64_t(i) * p.mask_st.r +
                                  int64_t(j) * p.mask_st.c) * kLog2e;
          }
        }
        const float pr = lse2[hf] == -INFINITY ? 0.f : exp2f(x - lse2[hf]);
        float d = dp[n][e];
        if (has_dropout) d *= drop.one(static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j));
        s[n][e] = pr * (d - delta[hf]) * (cap.on ? 1.f - th * th : 1.f);
      }
    }

    // dQ += dS K (A operand straight from the C fragments, K read transposed as the B operand).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      FragA<T> a;
      a_from_c(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        FragB<T> bk;
        KTile::ldb_t(bk, sK, kk * 16, dn * 16, lane);
        mma(acc[2 * dn], a, bk, 0);
        mma(acc[2 * dn + 1], a, bk, 1);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = row[hf];
    if (i >= L) continue;
    T* dq = static_cast<T*>(p.dq) + b * p.dq_st.b + int64_t(h) * p.dq_st.h + int64_t(i) * p.dq_st.r;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (c < E) st2<T>(dq + c, acc[dn][hf * 2] * p.scale, acc[dn][hf * 2 + 1] * p.scale);
    }
  }
}

}  // namespace cuda
}  // namespace sdpax
