// FlashAttention-2-style forward (tensor cores through mma.sync), every architecture.
//
// One block computes BM rows of one (batch, kv head). With GQA the G query heads that share a kv head are packed
// into the row dimension (row r -> head hk*G + r / L, position r % L), so K/V tiles are loaded once for the whole
// group and never copied. Each warp owns kMT x 16 rows; S = Q K^T and O += P V run on tensor cores (mma.h: one
// m16n8k16 per step for 16-bit inputs, split TF32 for float) with P kept in registers. K/V tiles stream through a
// two-stage cp.async pipeline: the next visible tile loads while the current one computes.
//
// Variants: element type T (bfloat16, float16, float), head-dim bucket D (E, Ev <= D, padded with zeros in shared
// memory) and kKind (tiles.h):
//   Plain    no mask, no dropout (causal, sinks, GQA, scale are run-time)
//   General  attention mask, dropout, a sliding window and/or a score softcap
//   Decode   plain, for at most 16 rows per (batch, kv head) (decode, GQA groups of L = 1): one-warp blocks of 16
//            rows, so that many blocks share a multiprocessor and keep enough K/V loads in flight; combined with
//            the split-key launch it streams K/V at close to the memory bandwidth.
#pragma once
#include "cuda/fwd/epilogue.h"
#include "cuda/fwd/softmax.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
struct FwdCfg {
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kWarps = tiles::fwd_warps(kKind);
  static constexpr int kMT = tiles::fwd_m_tiles(kF32, D, kKind);  // 16-row m-tiles per warp
  static constexpr int kBM = tiles::fwd_bm(kF32, D, kKind);
  static constexpr int kBN = tiles::fwd_bn(kF32, D, kKind);
  static_assert(kBM == kWarps * 16 * kMT, "tiles.h: rows per block are the warps' m-tiles");
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // K/V tiles in flight: tile j + 1 loads while tile j computes
  static constexpr int kMaskBytes = kBM * kBN;  // one stage of a staged bool mask tile
  static constexpr int kSmem = (kBM + 2 * kStages * kBN) * D * static_cast<int>(sizeof(T)) + kStages * kMaskBytes;
};

// S = Q K^T of one key tile for this warp's MT m-tiles (Q at sQ, K at sK, both SmemTile layouts). Full head-dim
// bucket: columns past E are zero in shared memory, and branch-free loops let the compiler hoist the ldmatrix of
// step kk + 1 above the mma of step kk.
template <class T, int D, int BM, int BN, int MT>
__device__ __forceinline__ void fwd_mma_qk(float (&acc_s)[MT][BN / 8][4], uint32_t sQ, uint32_t sK, int warp,
                                           int lane) {
  using QTile = SmemTile<BM, D, T>;
  using KTile = SmemTile<BN, D, T>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA<T> a[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) QTile::lda(a[mt], sQ, warp * 16 * MT + mt * 16, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      FragB<T> bb;
      KTile::ldb(bb, sK, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma(acc_s[mt][2 * np], a[mt], bb, 0);
        mma(acc_s[mt][2 * np + 1], a[mt], bb, 1);
      }
    }
  }
}

// O += P V of one key tile: P from the S accumulators (rounded to T: the C fragments are the A fragments), V at sV.
template <class T, int D, int BN, int MT>
__device__ __forceinline__ void fwd_mma_pv(float (&acc_o)[MT][D / 8][4], const float (&acc_s)[MT][BN / 8][4],
                                           uint32_t sV, int lane) {
  using KTile = SmemTile<BN, D, T>;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    FragA<T> a[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a_from_c(a[mt], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      FragB<T> bb;
      KTile::ldb_t(bb, sV, kk * 16, dn * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma(acc_o[mt][2 * dn], a[mt], bb, 0);
        mma(acc_o[mt][2 * dn + 1], a[mt], bb, 1);
      }
    }
  }
}

// Scale, mask and online softmax of row half hf of one m-tile's S (s = acc_s[mt]) for the key tile starting at j0:
// s then holds P (dropout applied), the row's running max m and sum l move on, and its output o (acc_o[mt]) is
// rescaled. Elementwise tests only where some element of the tile can fail them (need_elem): keys [lo, lim) are
// visible to the row. With a mask, bits holds the row's allowed elements (bit 2n + e: key j0 + 8n + 2t + e; the
// visible range folded in) and mask_off its offset in the mask.
template <int D, int BN>
__device__ __forceinline__ void fwd_mma_softmax_row(float (&s)[BN / 8][4], float (&o)[D / 8][4], int hf, float& m,
                                                    float& l, const AttnParams& p, int j0, int t, float scale_log2,
                                                    bool has_mask, bool need_elem, uint64_t bits, int64_t mask_off,
                                                    int lo, int lim, bool has_dropout, const Dropout& drop, int64_t b,
                                                    int h, int i, const Softcap& cap) {
  float mx = -INFINITY;
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      // (a capped score: cap tanh(s scale / cap), log2 units)
      float x = cap.on ? cap.out_log2 * tanh_f32(s[n][hf * 2 + e] * cap.in_scale) : s[n][hf * 2 + e] * scale_log2;
      if (has_mask) {
        const int j = j0 + n * 8 + 2 * t + e;
        if (!((bits >> (n * 2 + e)) & 1)) {
          x = -INFINITY;
        } else if (p.mask_kind == MaskKind::Additive) {
          x += mask_bias(p, mask_off + j * p.mask_st.c) * kLog2e;
        }
      } else if (need_elem) {
        const int j = j0 + n * 8 + 2 * t + e;
        if (j >= lim || j < lo) x = -INFINITY;
      }
      s[n][hf * 2 + e] = x;
      mx = fmaxf(mx, x);
    }
  }
  mx = warp_max4(mx);
  float alpha;
  const float m_use = softmax_rescale(m, mx, alpha);
  l *= alpha;
  // Once the running max settles, alpha is 1 for the whole warp: skip the O rescale.
  if (__any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][hf * 2] *= alpha;
      o[dn][hf * 2 + 1] *= alpha;
    }
  }
  float rs = 0.f;
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
    const float p0 = exp2f(s[n][hf * 2] - m_use);
    const float p1 = exp2f(s[n][hf * 2 + 1] - m_use);
    rs += p0 + p1;
    if (has_dropout) {
      const int64_t bh = b * p.hq + h;
      const float2 k2 =
          drop.pair(static_cast<uint32_t>(bh), static_cast<uint32_t>(i), static_cast<uint32_t>(j0 + n * 8 + 2 * t));
      s[n][hf * 2] = p0 * k2.x;
      s[n][hf * 2 + 1] = p1 * k2.y;
    } else {
      s[n][hf * 2] = p0;
      s[n][hf * 2 + 1] = p1;
    }
  }
  l += rs;
}

// Blocks: one per (m block, batch * kv head), ordered so that the heaviest causal blocks start first.
template <class T, int D, FwdKind kKind, bool kPacked>
__global__ void __launch_bounds__(FwdCfg<T, D, kKind>::kThreads, 1) fwd_kernel(
    const __grid_constant__ AttnParams params) {
  using Cfg = FwdCfg<T, D, kKind>;
  constexpr bool kGeneral = kKind == FwdKind::General;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, MT = Cfg::kMT, NT = Cfg::kThreads;
  using QTile = SmemTile<BM, D, T>;
  using KTile = SmemTile<BN, D, T>;
  constexpr int kVec = QTile::kVec;  // elements per 16-byte copy
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK0 = sQ + QTile::kBytes;                       // K stage s at sK0 + s * KTile::kBytes
  const uint32_t sV0 = sK0 + Cfg::kStages * KTile::kBytes;       // V stage s at sV0 + s * KTile::kBytes
  // Staged bool-mask tiles (BM rows x BN bytes per stage) after the V stages.
  const unsigned char* sM0 = smem + QTile::kBytes + 2 * Cfg::kStages * KTile::kBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const FwdGridIndex at = fwd_grid_index(params, BM);
  int64_t b = at.b;
  const AttnParams p = seq_view<T, kPacked>(params, b);  // a packed call: this block's sequence, as batch 0
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int rows = G * L;
  if (at.m_block * BM >= rows) return;  // past a shorter sequence's rows (packed calls only)
  const FwdBlock blk = fwd_block_at(p, rows, BM, BN, at.m_block, b * p.hkv + at.hk);
  const int hk = blk.hk, m0 = blk.m0, n_full = blk.n_full, t_begin = blk.t_begin, t_end = blk.t_end;
  const int lo_full = kGeneral ? blk.lo_full : 0;  // a sliding window runs the general kind (cuda/plan.cpp)
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);

  // The rows this thread holds in the C fragments: [mt][half] -> packed row m0 + warp*16*MT + mt*16 + half*8 + g.
  int row_i[MT][2], row_h[MT][2], row_lim[MT][2], row_lo[MT][2];
  bool row_ok[MT][2];
  int64_t row_mask[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = m0 + warp * 16 * MT + mt * 16 + hf * 8 + g;
      row_ok[mt][hf] = r < rows;
      const int rr = r < rows ? r : 0;
      row_h[mt][hf] = hk * G + rr / L;
      row_i[mt][hf] = rr % L;
      row_lim[mt][hf] = row_limit(p, row_i[mt][hf]);
      row_lo[mt][hf] = kGeneral ? row_begin(p, row_i[mt][hf]) : 0;
      row_mask[mt][hf] = b * p.mask_st.b + row_h[mt][hf] * p.mask_st.h + row_i[mt][hf] * p.mask_st.r;
    }
  }
  const bool warp_active = m0 + warp * 16 * MT < rows;

  // Q tile (zero rows past the end, zero columns past E).
  {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = tid; idx < BM * (D / kVec); idx += NT) {
      const int r = idx / (D / kVec), c = idx % (D / kVec);
      const int pr = m0 + r;
      const bool ok = pr < rows && c * kVec < E;
      const T* src = q;
      if (ok) src = q + b * p.q_st.b + static_cast<int64_t>(hk * G + pr / L) * p.q_st.h +
                    static_cast<int64_t>(pr % L) * p.q_st.r + c * kVec;
      cp_async16(sQ + QTile::offset(r, c), src, ok);
    }
  }
  // Key j's row: j of the (batch, kv head), or in a paged cache (packed calls) row j % page of its page, whose
  // stride is st.b (common/params.h kv_pages).
  const bool paged = kPacked && p.kv_pages != nullptr;
  auto load_kv = [&](uint32_t dst, const void* base, const Strides4& st, int cols, int tile) {
    const T* src0 = static_cast<const T*>(base) + b * st.b + static_cast<int64_t>(hk) * st.h;
    for (int idx = tid; idx < BN * (D / kVec); idx += NT) {
      const int r = idx / (D / kVec), c = idx % (D / kVec);
      const int j = tile * BN + r;
      const bool ok = j < S && c * kVec < cols;
      int64_t row = static_cast<int64_t>(j) * st.r;
      if (paged && ok) row = p.kv_pages[j / p.kv_page] * st.b + (j % p.kv_page) * st.r;
      cp_async16(dst + KTile::offset(r, c), ok ? src0 + row + c * kVec : src0, ok);
    }
  };

  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  // With a mask, next_tile() reads this thread's mask elements of a candidate tile once, keeps one bit per element
  // (allowed: causal/bounds pass and mask != -inf / true) for the softmax step, and skips tiles where the whole
  // block sees no allowed element. Bit index: ((mt * 2 + half) * BN / 8 + n) * 2 + e.
  static_assert(MT * 2 * BN / 4 <= 64, "mask bits must fit in 64");
  // A bool mask whose rows are 16-byte aligned travels through shared memory with the K/V tiles (cp.async, so its
  // latency hides behind the previous tile's math); other masks are read element by element by next_tile().
  const bool mask_staged = has_mask && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 &&
                           reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && p.mask_st.r % 16 == 0 &&
                           p.mask_st.h % 16 == 0 && p.mask_st.b % 16 == 0;
  auto next_tile = [&](int tile, uint64_t& bits) {
    if (!has_mask || mask_staged) return tile;
    for (; tile < t_end; ++tile) {
      bits = 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if (row_ok[mt][hf]) {
#pragma unroll
            for (int c = 0; c < BN / 4; ++c) {
              const int j = tile * BN + (c >> 1) * 8 + 2 * t + (c & 1);
              if (j < row_lim[mt][hf] && j >= row_lo[mt][hf] &&
                  mask_bias(p, row_mask[mt][hf] + j * p.mask_st.c) != -INFINITY)
                bits |= uint64_t(1) << ((mt * 2 + hf) * (BN / 4) + c);
            }
          }
      if (__syncthreads_or(bits != 0)) break;
    }
    return tile;
  };

  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);

  const bool with_sinks = p.sinks != nullptr && p.num_splits == 1;
  float m_run[MT][2], l_run[MT][2];
  float acc_o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) softmax_start(p, row_h[mt][hf], with_sinks, t, m_run[mt][hf], l_run[mt][hf]);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dn][e] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  const Softcap cap(p, kGeneral);

  auto load_tile = [&](int tile, int stage) {
    load_kv(sK0 + stage * KTile::kBytes, p.k, p.k_st, E, tile);
    load_kv(sV0 + stage * KTile::kBytes, p.v, p.v_st, Ev, tile);
    if (mask_staged) {
      const unsigned char* m = static_cast<const unsigned char*>(p.mask);
      for (int idx = tid; idx < BM * (BN / 16); idx += NT) {
        const int r = idx / (BN / 16), c = idx % (BN / 16);
        const int pr = m0 + r, j = tile * BN + c * 16;
        const int bytes = pr < rows ? max(0, min(16, S - j)) : 0;
        const unsigned char* src = m;
        if (bytes > 0)
          src = m + b * p.mask_st.b + static_cast<int64_t>(hk * G + pr / L) * p.mask_st.h +
                static_cast<int64_t>(pr % L) * p.mask_st.r + j;
        cp_async16_partial(smem_u32(sM0 + stage * Cfg::kMaskBytes + r * BN + c * 16), src, bytes);
      }
    }
  };
  uint64_t bits = 0, bits_next = 0;
  int tile = next_tile(t_begin, bits);
  if (tile < t_end) load_tile(tile, 0);
  cp_async_commit();
  int tile_next = tile < t_end ? next_tile(tile + 1, bits_next) : t_end;
  if (tile_next < t_end) load_tile(tile_next, 1);
  cp_async_commit();

  for (int stage = 0; tile < t_end; stage ^= 1) {
    cp_async_wait<1>();  // this tile's group is complete; the next tile's may still be in flight
    __syncthreads();
    const uint32_t sK = sK0 + stage * KTile::kBytes, sV = sV0 + stage * KTile::kBytes;
    bool skip = false;  // staged mask: the whole tile is masked for every row of the block
    if (mask_staged) {
      const unsigned char* sm = sM0 + stage * Cfg::kMaskBytes;
      bits = 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const unsigned char* row = sm + (warp * 16 * MT + mt * 16 + hf * 8 + g) * BN;
#pragma unroll
          for (int c = 0; c < BN / 4; ++c) {
            const int col = (c >> 1) * 8 + 2 * t + (c & 1);
            const int j = tile * BN + col;
            if (row[col] && j < row_lim[mt][hf] && j >= row_lo[mt][hf])
              bits |= uint64_t(1) << ((mt * 2 + hf) * (BN / 4) + c);
          }
        }
      skip = !__syncthreads_or(bits != 0);
    }

    float acc_s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][n][e] = 0.f;
    if (warp_active && !skip) fwd_mma_qk<T, D, BM, BN, MT>(acc_s, sQ, sK, warp, lane);

    // Scale, mask, online softmax. Elementwise tests only where some element of the tile can fail them.
    const int j0 = tile * BN;
    const bool need_elem = has_mask || j0 + BN > n_full || j0 < lo_full;
    if (warp_active && !skip) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          fwd_mma_softmax_row<D, BN>(acc_s[mt], acc_o[mt], hf, m_run[mt][hf], l_run[mt][hf], p, j0, t, scale_log2,
                                     has_mask, need_elem, bits >> ((mt * 2 + hf) * (BN / 4)), row_mask[mt][hf],
                                     row_lo[mt][hf], row_lim[mt][hf], has_dropout, drop, b, row_h[mt][hf],
                                     row_i[mt][hf], cap);
    }

    if (warp_active && !skip) fwd_mma_pv<T, D, BN, MT>(acc_o, acc_s, sV, lane);
    __syncthreads();  // every warp is done with this stage: refill it with the tile after next
    int tile_after = tile_next < t_end ? next_tile(tile_next + 1, bits) : t_end;
    if (tile_after < t_end) load_tile(tile_after, stage);
    cp_async_commit();
    tile = tile_next;
    tile_next = tile_after;
    const uint64_t b = bits;
    bits = bits_next;
    bits_next = b;
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      fwd_store_row<T, D>(p, b, row_h[mt][hf], row_i[mt][hf], row_ok[mt][hf], m_run[mt][hf], l_run[mt][hf], t,
                          [&](int dn, int e) { return acc_o[mt][dn][hf * 2 + e]; });
}

}  // namespace cuda
}  // namespace sdpax
