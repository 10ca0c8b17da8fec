// Backward main loop with wide warp tiles: 16-bit operands, head dims 64, 128 and 256, plain and general kind.
//
// bwd_kernel (bwd/mma_kernel.h) gives each warp 16 keys for the whole block and keeps P^T / dS^T in registers between
// the products; every 16-key warp then re-reads all of Q and dO from shared memory per step, and the kernel is
// bound by shared-memory reads and their latency (csrc/README.md). Here the products of one step
// use different warp tiles, each as square as the 8 warps allow, and P^T and dS^T travel through shared memory:
//   S^T, dP^T (BN x BM):   BN/32 (keys) x 8/(BN/32) (queries) warps of 32 keys x WQ queries
//   dV, dK    (BN x D):    BN/32 (keys) x 8/(BN/32) (columns) warps of 32 keys x DC columns (register accumulators)
//   dQ        (BM x D):    BM/32 (rows) x (8 / (BM/32)) (columns) warps of 32 rows, float atomics
// d64 / d128: BN 128, so 4 x 2 warps of 32 keys x BM/2 queries and 32 keys x D/2 columns; d256: BN 64 (dK + dV of
// 128 keys would be 256 registers per thread), 2 x 4 warps of 32 keys x 16 queries and 32 keys x 64 columns.
// The sum over k of an m x n warp tile reads (m + n) / 16 ldmatrix per m n / 128 mma: 32 x 32 reads 0.5 per mma
// where 16 x 64 reads 0.625, and the dK/dV products read 0.375 (d128) instead of 0.5. P^T and dS^T are written once
// (stmatrix on sm90), and one block barrier after those stores serves both dK/dV and dQ, so a step still crosses
// two barriers. Same block (BN keys, one per (key block, batch * kv head)), same query stream (double-buffered
// Q / dO, lse, Delta through cp.async), same GQA summation order and deterministic-mode split as bwd_kernel.
//
// General kind (mask, dropout, float-mask gradient), same semantics as bwd_kernel:
//   mask     the pass that decides whether the tile is fully masked (then skipped, as in bwd_kernel) keeps the
//            allowed bits (one per element a thread holds, causal / bounds folded in), so a bool mask is read
//            once per tile and an additive one twice (its values are re-read for the bias; in L1 by then). A
//            bool mask with contiguous keys and 16-byte aligned rows (any broadcast) travels with Q / dO: its
//            BM x BN tile of the next step is copied by cp.async into a second buffer, so the test reads shared
//            memory instead of waiting on 32 scattered global byte loads per thread before the block barrier
//            (that wait made bwd_kernel's general kind 3-4x slower than its plain kind). Other masks are read
//            in place through their broadcast strides.
//   dropout  one Philox call per 4 elements, shared by 4 lanes through shuffles (wide_exp_pass).
//   dmask    dS (float, before rounding) per element, or (mask broadcast over rows) summed over the WQ rows of
//            this warp's half of the step (store_dmask_keys32).
// Roles: cuda/bwd/block.h (the block's keys and query steps), load.h (cp.async loads), wide_scores.h (mask, causal,
// exp2, dropout, dS^T), wide_mainloop.h (the products), epilogue.h (dQ atomics, dK / dV and mask-gradient stores).
#pragma once
#include <type_traits>

#include "cuda/bwd/block.h"
#include "cuda/bwd/epilogue.h"
#include "cuda/bwd/load.h"
#include "cuda/bwd/wide_mainloop.h"
#include "cuda/bwd/wide_scores.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

template <class T, int D, bool kGeneral>
struct BwdWideCfg {
  // launch_bwd.h runs bwd_wide_kernel instead of bwd_kernel where this holds (both kinds).
  static constexpr bool kUse = tiles::bwd_wide(sizeof(T) == 4, D);
  static constexpr int kWarps = tiles::kBwdWideWarps;
  static constexpr int kThreads = kWarps * 32;
  // Keys per block. dK + dV of a block cost 2 BN D / 256 float registers per thread: 128 at d128 with 128 keys;
  // d256 takes 64 keys for the same 128 (FlashAttention-2's d256 tile), so its S^T / dP^T and dK / dV warp tiles
  // keep 32 keys (2 key warps) and split the other side 4 ways.
  static constexpr int kBN = tiles::bwd_wide_bn(D);
  static constexpr int kKeyWarps = kBN / 32;             // S^T / dP^T and dK / dV: warps along the keys
  static constexpr int kColWarps = kWarps / kKeyWarps;   // and along the queries (S^T) / columns (dK, dV)
  // Queries per step. Registers at the S^T / dP^T products: dK + dV accumulators 32 x D / kColWarps x 2 per thread
  // (128 at d128 and d256, 64 at d64) plus S^T and dP^T of 32 x WQ (BM at d128 64 -> 64, d64 128 -> 128, d256 64
  // -> 32): ~192 at most. The general kind at d64 keeps 64 (128 spilled 332 bytes with its mask bits and dropout
  // state). d256: K, V (2 x 32 KB), 2 x (Q, dO) (4 x 32 KB), P^T / dS^T (2 x 8 KB) = 208 KB of 227.
  static constexpr int kBM = tiles::bwd_wide_bm(D, kGeneral ? BwdKind::General : BwdKind::Plain);
  static constexpr int kWQ = kBM / kColWarps;          // S^T / dP^T queries per warp
  static_assert(kWQ == tiles::bwd_wide_warp_rows(D, kGeneral ? BwdKind::General : BwdKind::Plain), "tiles.h");
  static constexpr int kMaskRows = kWQ;                // rows per slot of a row-broadcast mask's gradient
  static constexpr int kDc = D / kColWarps;            // dK / dV columns per warp
  static constexpr int kQRows = kBM / 32;              // dQ: warps along rows (32 rows each)
  static constexpr int kQc = D / (kWarps / kQRows);    // dQ: columns per warp
  // S^T and dP^T in one k loop where one product alone has few independent accumulators (d256: 4 per warp, each a
  // chain of 16 dependent mma over the head dim); two chains of 8 keep the tensor pipe busier for 12 more registers.
  static constexpr bool kFuseSdP = kWQ <= 16;
  static_assert(kQc % 16 == 0, "dQ warp tile needs whole 16-column B fragments");
  static_assert(!kUse || (kWQ % 16 == 0 && kDc % 16 == 0), "S^T / dK warp tiles need whole 16-wide fragments");
  // K, V, 2 x (Q, dO), P^T, dS^T; lse and Delta; general kind: 2 bool mask tiles (BM x BN bytes)
  static constexpr int kSmemMask = (2 * kBN * D + 4 * kBM * D + 2 * kBN * kBM) * static_cast<int>(sizeof(T)) +
                                   2 * 2 * kBM * 4;
  static constexpr int kSmem = kSmemMask + (kGeneral ? 2 * kBM * kBN : 0);
  static_assert(!kUse || kSmem <= 227 * 1024, "shared memory of one sm90 block");
};

template <class T, int D, bool kGeneral, bool kPacked>
__global__ void __launch_bounds__(BwdWideCfg<T, D, kGeneral>::kThreads, 1)
    bwd_wide_kernel(const __grid_constant__ AttnParams params) {
  using Cfg = BwdWideCfg<T, D, kGeneral>;
  static_assert(Cfg::kUse, "wide backward: 16-bit, head dim <= 128 or 256");
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kThreads, WQ = Cfg::kWQ, DC = Cfg::kDc;
  constexpr int QC = Cfg::kQc;
  using KTile = SmemTile<BN, D, T>;
  using QTile = SmemTile<BM, D, T>;
  using PTile = SmemTile<BN, BM, T>;  // P^T and dS^T: rows = keys, columns = queries
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + KTile::kBytes;
  const uint32_t sQ0 = sV + KTile::kBytes;      // Q buffers at sQ0 + buf * 2 * QTile::kBytes, dO after each
  const uint32_t sP = sQ0 + 4 * QTile::kBytes;
  const uint32_t sS = sP + PTile::kBytes;
  float* sLse = reinterpret_cast<float*>(smem + 2 * KTile::kBytes + 4 * QTile::kBytes + 2 * PTile::kBytes);
  float* sDelta = sLse + 2 * BM;
  const unsigned char* sMaskTile = smem + Cfg::kSmemMask;  // buffer buf at + buf * BM * BN (general kind)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wk = warp % Cfg::kKeyWarps;  // keys [wk * 32, wk * 32 + 32) of the block in S^T / dP^T and in dK / dV
  const int wn = warp / Cfg::kKeyWarps;  // queries [wn * WQ, + WQ) of the step in S^T / dP^T; columns [wn * DC, + DC)
                                         // of dK / dV
  const BwdGridIndex at = bwd_grid_index(params, BN);
  int64_t b = at.b;
  const AttnParams p = seq_view<T, kPacked>(params, b);  // a packed call: this block's sequence, as batch 0
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  if (at.n_block * BN >= S) return;  // past a shorter sequence's keys (packed calls only)
  const BwdKeyBlock<BN, BM> blk(p, G, L, S, at.n_block, b, at.hk);
  const int hk = blk.hk, j0 = blk.j0, q_tiles = blk.q_tiles, steps = blk.steps;
  const int64_t lim_shift = blk.lim_shift;
  const int last_key = min(j0 + BN, S) - 1;

  // K and V of the block, zero-filled past S and past E / Ev.
  using Copy = BwdRowCopy<T, D, NT, true>;
  static_assert(BM % Copy::kRowsPer == 0 && BN % Copy::kRowsPer == 0, "tile loads");
  const Copy copy(tid);
  const int64_t k_off = b * p.k_st.b + static_cast<int64_t>(hk) * p.k_st.h;
  const int64_t v_off = b * p.v_st.b + static_cast<int64_t>(hk) * p.v_st.h;
  load_kv_rows<KTile, BN>(copy, p, sK, k_off, v_off, j0, S, E, Ev);

  // A mask broadcast over query rows (a padding mask, (B, 1|H, 1, S)) is tested on one row: its allowed keys depend
  // only on the head, so each thread keeps its 4 key bits spread over its rows (`row_allowed`), refreshed once per
  // head, and the block-wide skip vote runs once per head (per step only on tiles that cross a causal / bounds
  // limit). No shared copy, no per-step mask reads for the test.
  const bool row_bcast = kGeneral && p.mask_kind != MaskKind::None && p.mask_st.r == 0;
  // Bool mask through shared memory (see the top and load_mask_tile): contiguous keys, 16-byte aligned rows, heads
  // and batches.
  const bool mask_smem = kGeneral && !row_bcast && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 &&
                         (reinterpret_cast<uintptr_t>(p.mask) & 15) == 0 &&
                         ((p.mask_st.r | p.mask_st.h | p.mask_st.b) & 15) == 0;
  static_assert(!kGeneral || ((BM * BN / 16) % NT == 0 && (BN / 16 == 8 || BN / 16 == 4) && WQ % 8 == 0),
                "mask tile copy (the chunk swizzle needs 4 or 8 chunks per row)");
  if (steps > 0) {
    load_q_step<QTile, BM, NT>(copy, p, blk, 0, 0, sQ0, sLse, sDelta, L, E, Ev);
    if (mask_smem) load_mask_tile<BM, BN, NT>(p, blk, 0, 0, sMaskTile, L, S, tid);
  }
  cp_async_commit();

  const bool dq_atomic = !p.deterministic;  // else bwd_dq_kernel computes dQ
  const Softcap cap(p, kGeneral);
  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);
  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  const bool bool_mask = has_mask && p.mask_kind == MaskKind::Bool;
  const bool has_dmask = kGeneral && p.dmask != nullptr;
  const int m4 = g & 3;  // this lane's key within its group of 4 (dropout)
  // Allowed bits of the mask pass (one per element a thread holds: WQ of them).
  using MaskBits = std::conditional_t<(WQ <= 32), uint32_t, uint64_t>;
  constexpr MaskBits kAllBits = ~MaskBits(0) >> (8 * sizeof(MaskBits) - WQ);  // every element
  MaskBits row_allowed = 0;  // row-broadcast mask: this head's bits (2 WQ / 8 per allowed key)
  bool head_any = false;     // row-broadcast mask: some key of the block is allowed for this head
  // Swizzled bool mask tile: this lane's byte of row wn * WQ + 2t, chunk 2 wk + mt (see load_mask_tile).
  const unsigned char* m_tile_lane[2] = {
      sMaskTile + (wn * WQ + 2 * t) * BN + (((2 * wk) ^ t) << 4) + g,
      sMaskTile + (wn * WQ + 2 * t) * BN + (((2 * wk + 1) ^ t) << 4) + g};

  // Lane addresses of every shared-memory operand (SmemTile::moved); the Q / dO ones move with the buffer.
  const int qm = warp % Cfg::kQRows, c_begin = (warp / Cfg::kQRows) * QC;  // dQ: rows qm * 32, columns c_begin
  const uint32_t lane_k = KTile::a_addr(sK, wk * 32, 0, lane);         // K / V as A of S^T / dP^T
  const uint32_t lane_q = QTile::b_addr(sQ0, wn * WQ, 0, lane);        // Q / dO as B of S^T / dP^T
  const uint32_t lane_ps = PTile::a_addr(sP, wk * 32, wn * WQ, lane);  // P^T / dS^T stores
  const uint32_t lane_pa = PTile::a_addr(sP, wk * 32, 0, lane);        // P^T / dS^T as A of dV / dK
  const uint32_t lane_qt = QTile::a_addr(sQ0, 0, wn * DC, lane);       // dO / Q as B of dV / dK
  const uint32_t lane_st = PTile::b_addr(sS, 0, qm * 32, lane);        // dS as A of dQ (dS^T read transposed)
  const uint32_t lane_kt = KTile::a_addr(sK, 0, c_begin, lane);        // K as B of dQ
  const int64_t dq_row8 = 8 * p.E;                                      // dq_accum: 8 rows
  const int dq_cols = max(0, min(QC / 8, (E - c_begin - 2 * t + 7) / 8));  // n-tiles with column < E
  const float scale_log2 = p.scale * kLog2e;

  float acc_dk[2][DC / 8][4], acc_dv[2][DC / 8][4];  // [16-key m-tile][8-column n-tile]
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int dn = 0; dn < DC / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[mt][dn][e] = acc_dv[mt][dn][e] = 0.f;

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int h = blk.head(step), i0 = blk.row0(step);
    const int64_t bh = b * p.hq + h;
    // Also orders the previous step's reads of P^T / dS^T before this step's stores.
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) {
      load_q_step<QTile, BM, NT>(copy, p, blk, step + 1, buf ^ 1, sQ0, sLse, sDelta, L, E, Ev);
      if (mask_smem) load_mask_tile<BM, BN, NT>(p, blk, step + 1, buf ^ 1, sMaskTile, L, S, tid);
    }
    cp_async_commit();

    // Tiles that cross a causal / window / bounds limit (block-uniform); only those test each element against it.
    // (A sliding window runs the general kind: cuda/plan.cpp.)
    const bool cross = last_key >= row_limit(p, i0) || i0 + BM > L || j0 + BN > S ||
                       (kGeneral && j0 < row_begin(p, min(i0 + BM, L) - 1));
    // Mask: bit ((mt * 2 + hf) * WQ / 8 + n) * 2 + c set where element (mt, n, hf, c) is allowed (mask, causal and
    // bounds); a tile no element of which is allowed contributes nothing and is skipped.
    MaskBits allowed = 0;
    if (has_mask) {
      if (row_bcast) {
        if (step % q_tiles == 0) {  // a new head: this thread's 4 keys, spread over its rows; one vote per head
          wide_row_bits<WQ>(row_allowed, p, b, h, j0, wk, g, S);
          head_any = __syncthreads_or(row_allowed != 0);
        }
        allowed = row_allowed;
        if (!cross && !head_any) continue;
      } else if (mask_smem) {
        wide_tile_bits_smem<BM, BN, WQ>(allowed, m_tile_lane, buf);
      } else {  // in place through the broadcast strides
        wide_tile_bits_global<WQ>(allowed, p, cross, b, h, i0, j0, wk, wn, g, t, L, S);
      }
      if (cross) wide_fold_limits<WQ>(allowed, p, i0, j0, wk, wn, g, t, L);
      if ((!row_bcast || cross) && !__syncthreads_or(allowed != 0)) continue;
    }
    const uint32_t q_buf = buf * 2 * QTile::kBytes;  // dO is QTile::kBytes after Q

    // S^T = K Q^T and dP^T = V dO^T on this warp's 32 keys x WQ queries; one product after the other keeps only
    // one product's fragments live.
    float st[2][WQ / 8][4], dpt[2][WQ / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[mt][n][e] = dpt[mt][n][e] = 0.f;
    if constexpr (Cfg::kFuseSdP) {
      wide_product2<T, KTile, QTile, D, WQ>(st, dpt, lane_k, lane_q, q_buf);
    } else {
      wide_product<T, KTile, QTile, D, WQ>(st, lane_k, lane_q + q_buf);
      wide_product<T, KTile, QTile, D, WQ>(dpt, lane_k + KTile::kBytes, lane_q + q_buf + QTile::kBytes);
    }

    if (cap.on) {
      // Softcap (general kind): one pass does the mask, the limits, P^T, dropout and dS^T (wide_scores.h).
      if (!has_mask) {
        allowed = kAllBits;
        if (cross) wide_fold_limits<WQ>(allowed, p, i0, j0, wk, wn, g, t, L);
      }
      if (!has_mask || bool_mask) {
        wide_softcap_pass<BM, WQ>(st, dpt, allowed, cap, WideNoBias{}, i0, wn, t, j0, wk, g, has_dropout, drop, bh,
                                  sLse, sDelta, buf);
      } else if (row_bcast) {
        float key_bias[4] = {0.f, 0.f, 0.f, 0.f};
        wide_key_bias<WQ>(key_bias, p, b, h, j0, wk, g, row_allowed);
        wide_softcap_pass<BM, WQ>(st, dpt, allowed, cap, WideKeyBias{key_bias}, i0, wn, t, j0, wk, g, has_dropout,
                                  drop, bh, sLse, sDelta, buf);
      } else {
        const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
        wide_softcap_pass<BM, WQ>(st, dpt, allowed, cap, WideElemBias<WQ>{p, m_off, i0, wn, t, j0, wk, g}, i0, wn,
                                  t, j0, wk, g, has_dropout, drop, bh, sLse, sDelta, buf);
      }
    } else {
      // Mask and causal / bounds limits on S^T, one loop per mask kind (wide_scores.h). Only tiles that cross a limit
      // pay for its tests. With a mask, S^T becomes S^T scale log2(e) + bias log2(e) (-inf where not allowed), and the
      // exp2 below skips its own scaling: exp2(S^T pscale - lse2).
      float pscale = has_mask ? 1.f : scale_log2;
      if (bool_mask) {
        // A thread whose elements are all allowed (padding masks inside the valid length, mostly-true masks) skips
        // the pass: the exp2 scales as in the plain kind.
        if (allowed == kAllBits) pscale = scale_log2;
        else wide_mask_pass<WQ>(st, allowed, scale_log2, WideNoBias{});
      } else if (row_bcast) {  // additive, broadcast over rows: one bias per key of this thread (in L1 after the test)
        float key_bias[4] = {0.f, 0.f, 0.f, 0.f};
        wide_key_bias<WQ>(key_bias, p, b, h, j0, wk, g, row_allowed);
        wide_mask_pass<WQ>(st, allowed, scale_log2, WideKeyBias{key_bias});
      } else if (has_mask) {  // additive: read where allowed
        const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
        wide_mask_pass<WQ>(st, allowed, scale_log2, WideElemBias<WQ>{p, m_off, i0, wn, t, j0, wk, g});
      } else if (cross) {
        wide_apply_limits<WQ, kGeneral>(st, i0, j0, wk, wn, g, t, L, S, lim_shift, blk.lo_shift);
      }

      // P^T (P_drop^T with dropout: st, for dV) and dS^T (dpt), one loop with dropout and one without.
      if (has_dropout)
        wide_exp_pass<true, BM, WQ>(st, dpt, pscale, i0, wn, t, m4, j0, wk, g, drop, bh, sLse, sDelta, buf);
      else
        wide_exp_pass<false, BM, WQ>(st, dpt, pscale, i0, wn, t, m4, j0, wk, g, drop, bh, sLse, sDelta, buf);
    }

    // Mask gradient: dS itself (rows past L and keys past S hold 0 and are not written).
    if (has_dmask) store_dmask_keys32<WQ>(p, dpt, b, h, i0 + wn * WQ, j0 + wk * 32, g, t, L, S);

    // P^T and dS^T to shared memory (16-bit, as the A operands of dV / dK and, transposed, of dQ).
    wide_store_pds<T, PTile, WQ>(st, dpt, lane_ps, sP, sS, wk, wn, lane);
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q on this warp's 32 keys x DC columns.
    wide_dkdv<T, PTile, QTile, BM, DC>(acc_dv, acc_dk, lane_pa, lane_qt, q_buf);

    // dQ (BM x E) += dS (BM x BN) K (BN x E) on 32 rows x QC columns per warp, then float2 atomics.
    if (dq_atomic) {
      if (c_begin < E) {
        float acc_dq[2][QC / 8][4];
        wide_dq<T, PTile, KTile, BN, QC>(acc_dq, lane_st, lane_kt);
        add_dq_rows32<QC / 8>(p, acc_dq, bh, i0 + qm * 32 + g, c_begin, t, dq_cols, dq_row8, L);
      }
    }
  }
  cp_async_wait<0>();

  // dK (scaled) and dV of this warp's 32 keys and DC columns.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
    store_dkdv<T, DC / 8>(p, acc_dk[mt], acc_dv[mt], b, hk, j0 + wk * 32 + mt * 16 + g, wn * DC, t, S, E, Ev);
}

}  // namespace cuda
}  // namespace sdpax
