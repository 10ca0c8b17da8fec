// Backward main loop with wide warp tiles: 16-bit operands, head dims 64, 128 and 256, plain and general kind.
//
// bwd_kernel (bwd_kernel.h) gives each warp 16 keys for the whole block and keeps P^T / dS^T in registers between
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
//   dropout  the keep function of common/philox.h: one Philox call gives the words of 4 consecutive keys of one
//            row, and the 4 lanes g = 4k..4k+3 (same t) hold exactly those 4 keys of the same rows. So each of the
//            4 lanes computes one Philox for one of 4 (row, key group) pairs it shares with the others, turns the
//            4 words into 4 keep bits, and two shuffles hand every lane the 16 bits: 1 Philox per 4 elements where
//            bwd_kernel spends one per element.
//   dmask    dS (float, before rounding) per element, or (mask broadcast over rows) summed over the WQ rows of
//            this warp's half of the step: the S^T tile of a key is split over the 2 query warps, so the row slot
//            of the sum is a WQ-row slot (BwdWideCfg::kMaskRows, which bwd_tile_rows reports for the scratch of
//            deterministic mode): one writer per slot and key, summed in a fixed order (own rows, then the 4 t
//            lanes), so deterministic mode stays bitwise repeatable without a cross-warp pass.
#pragma once
#include <type_traits>

#include "cuda/bwd/epilogue.h"
#include "cuda/bwd/load.h"
#include "cuda/bwd_kernel.h"

namespace sdpax {
namespace cuda {

template <class T, int D, bool kGeneral>
struct BwdWideCfg {
  // launch_impl.h runs bwd_wide_kernel instead of bwd_kernel where this holds (both kinds).
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

template <class T, int D, bool kGeneral>
__global__ void __launch_bounds__(BwdWideCfg<T, D, kGeneral>::kThreads, 1)
    bwd_wide_kernel(const __grid_constant__ AttnParams p) {
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
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const BwdKeyBlock<BN, BM> blk(p, G, L, S);
  const int64_t b = blk.b;
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
  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);
  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  const bool bool_mask = has_mask && p.mask_kind == MaskKind::Bool;
  const bool has_dmask = kGeneral && p.dmask != nullptr;
  const int m4 = g & 3;  // this lane's key within its group of 4 (dropout)
  // Allowed bits of the mask pass (one per element a thread holds: WQ of them).
  using MaskBits = std::conditional_t<(WQ <= 32), uint32_t, uint64_t>;
  constexpr MaskBits kAllBits = ~MaskBits(0) >> (8 * sizeof(MaskBits) - WQ);      // every element
  constexpr MaskBits kRowBits = (MaskBits(1) << ((WQ / 8) * 2 - 1) << 1) - 1;  // the 2 WQ / 8 bits of one key
  MaskBits row_allowed = 0;  // row-broadcast mask: this head's bits (kRowBits per allowed key)
  bool head_any = false;     // row-broadcast mask: some key of the block is allowed for this head
  // Swizzled bool mask tile: this lane's byte of row wn * WQ + 2t, chunk 2 wk + mt (see load_mask).
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

    // Tiles that cross a causal / bounds limit (block-uniform); only those test each element against it.
    const bool cross = last_key >= row_limit(p, i0) || i0 + BM > L || j0 + BN > S;
    // Mask: bit ((mt * 2 + hf) * WQ / 8 + n) * 2 + c set where element (mt, n, hf, c) is allowed (mask, causal and
    // bounds); a tile no element of which is allowed contributes nothing and is skipped.
    MaskBits allowed = 0;
    if (has_mask) {
      if (row_bcast) {
        if (step % q_tiles == 0) {  // a new head: this thread's 4 keys, spread over its rows; one vote per head
          const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
          row_allowed = 0;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int j = j0 + wk * 32 + q * 8 + g;
            if (j < S && mask_bias(p, m_off + int64_t(j) * p.mask_st.c) != -INFINITY)
              row_allowed |= kRowBits << (q * (WQ / 8) * 2);
          }
          head_any = __syncthreads_or(row_allowed != 0);
        }
        allowed = row_allowed;
        if (!cross && !head_any) continue;
      } else if (mask_smem) {
        // Row r = wn * WQ + n * 8 + 2t + c of the swizzled tile has ((r >> 1) & 3) == t (WQ a multiple of 8).
        const unsigned char* m0 = m_tile_lane[0] + buf * BM * BN, *m1 = m_tile_lane[1] + buf * BM * BN;
#pragma unroll
        for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
              for (int hf = 0; hf < 2; ++hf)
                if ((mt ? m1 : m0)[(n * 8 + c) * BN + hf * 8] != 0)
                  allowed |= MaskBits(1) << ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c);
      } else {  // in place through the broadcast strides
        const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
#pragma unroll
        for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
            const int64_t r_off = m_off + int64_t(i) * p.mask_st.r;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
              for (int hf = 0; hf < 2; ++hf) {
                const int j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
                if ((!cross || (i < L && j < S)) && mask_bias(p, r_off + int64_t(j) * p.mask_st.c) != -INFINITY)
                  allowed |= MaskBits(1) << ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c);
              }
          }
      }
      if (cross) {  // fold causal / bounds in: keys j < row_limit(i), rows i < L
#pragma unroll
        for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
            const int lim = i < L ? row_limit(p, i) : 0;
#pragma unroll
            for (int q = 0; q < 4; ++q)
              if (j0 + wk * 32 + q * 8 + g >= lim) allowed &= ~(MaskBits(1) << (((q * (WQ / 8) + n) * 2) + c));
          }
      }
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
    auto product = [&](float (&c)[2][WQ / 8][4], uint32_t a_base, uint32_t b_base) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a[2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt].r, KTile::moved(a_base, mt * 16, 2 * kk));
#pragma unroll
        for (int np = 0; np < WQ / 16; ++np) {
          FragB<T> bb;
          ldmatrix_x4(bb.r, QTile::moved(b_base, np * 16, 2 * kk));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma(c[mt][2 * np], a[mt], bb, 0);
            mma(c[mt][2 * np + 1], a[mt], bb, 1);
          }
        }
      }
    };
    // Both products in one k loop (Cfg::kFuseSdP): the same instructions per product, twice the independent chains.
    auto product2 = [&]() {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a[2], av[2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ldmatrix_x4(a[mt].r, KTile::moved(lane_k, mt * 16, 2 * kk));
          ldmatrix_x4(av[mt].r, KTile::moved(lane_k, mt * 16, 2 * kk) + KTile::kBytes);
        }
#pragma unroll
        for (int np = 0; np < WQ / 16; ++np) {
          FragB<T> bq, bd;
          ldmatrix_x4(bq.r, QTile::moved(lane_q + q_buf, np * 16, 2 * kk));
          ldmatrix_x4(bd.r, QTile::moved(lane_q + q_buf, np * 16, 2 * kk) + QTile::kBytes);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma(st[mt][2 * np], a[mt], bq, 0);
            mma(st[mt][2 * np + 1], a[mt], bq, 1);
            mma(dpt[mt][2 * np], av[mt], bd, 0);
            mma(dpt[mt][2 * np + 1], av[mt], bd, 1);
          }
        }
      }
    };
    if constexpr (Cfg::kFuseSdP) {
      product2();
    } else {
      product(st, lane_k, lane_q + q_buf);
      product(dpt, lane_k + KTile::kBytes, lane_q + q_buf + QTile::kBytes);
    }

    // Causal / bounds: S^T = -inf where key j is past row i's limit (rows past L see no key; they are zero-padded).
    // Only tiles that cross a limit pay for the tests. With a mask, S^T becomes S^T * scale * log2(e) + bias *
    // log2(e) here (-inf where not allowed), and the exp2 below skips its own scaling.
    // Each kind of mask has its own loop (a block-uniform branch around it): one loop with a per-element choice
    // is if-converted and every element would issue the additive path's address arithmetic and loads too.
    auto mask_pass = [&](auto bias_of) {
#pragma unroll
      for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              float& x = st[mt][n][2 * hf + c];
              x = (allowed >> ((((mt * 2 + hf) * (WQ / 8) + n) * 2) + c)) & 1
                      ? x * scale_log2 + bias_of(n, c, mt, hf)
                      : -INFINITY;
            }
    };
    // exp2 below: S^T * pscale - lse2 (the mask pass has applied the scale where it ran).
    float pscale = has_mask ? 1.f : scale_log2;
    if (bool_mask) {
      // A thread whose elements are all allowed (padding masks inside the valid length, mostly-true masks) skips
      // the pass: the exp2 scales as in the plain kind.
      if (allowed == kAllBits) pscale = scale_log2;
      else mask_pass([&](int, int, int, int) { return 0.f; });
    } else if (row_bcast) {  // additive, broadcast over rows: one bias per key of this thread (in L1 after the test)
      const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
      float key_bias[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if ((row_allowed >> (q * (WQ / 8) * 2)) & 1)
          key_bias[q] = mask_bias(p, m_off + int64_t(j0 + wk * 32 + q * 8 + g) * p.mask_st.c) * kLog2e;
      mask_pass([&](int, int, int mt, int hf) { return key_bias[mt * 2 + hf]; });
    } else if (has_mask) {  // additive: read where allowed
      const int64_t m_off = b * p.mask_st.b + h * p.mask_st.h;
      mask_pass([&](int n, int c, int mt, int hf) {
        const int i = i0 + wn * WQ + n * 8 + 2 * t + c, j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
        return mask_bias(p, m_off + int64_t(i) * p.mask_st.r + int64_t(j) * p.mask_st.c) * kLog2e;
      });
    } else if (cross) {
#pragma unroll
      for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
          const int64_t lim = i < L ? min(i + lim_shift, static_cast<int64_t>(S)) : 0;
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
              if (j0 + wk * 32 + mt * 16 + hf * 8 + g >= lim) st[mt][n][2 * hf + c] = -INFINITY;
        }
    }

    // P^T = exp2(S^T * scale - lse), dS^T = P^T o (dP^T - Delta) (one FFMA before the exp2). Dropout: st becomes
    // P_drop^T = P^T * keep (for dV) and dS^T = P^T o (dP^T * keep - Delta).
    // The dropout and no-dropout versions are separate loops (a block-uniform branch; see mask_pass).
    auto exp_pass = [&](auto with_dropout) {
      constexpr bool kDrop = decltype(with_dropout)::value;
#pragma unroll
    for (int n = 0; n < WQ / 8; ++n) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        // Keep bits of this (n, mt): bit 4 q + w is word w of pair q = 2 hf + c, computed by lane m4 = q.
        uint32_t keep_bits = 0;
        if (kDrop) {
          const int i = i0 + wn * WQ + n * 8 + 2 * t + (m4 & 1);
          const int j4 = (j0 + wk * 32 + mt * 16 + (m4 >> 1) * 8 + (g & ~3)) >> 2;
          uint32_t r[4];
          dropout_words(drop.seed, drop.offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(i),
                        static_cast<uint32_t>(j4), r);
          uint32_t nib = 0;
#pragma unroll
          for (int w = 0; w < 4; ++w) nib |= (r[w] >= drop.threshold ? 1u : 0u) << w;
          keep_bits = nib << (4 * m4);
          keep_bits |= __shfl_xor_sync(0xffffffffu, keep_bits, 4);
          keep_bits |= __shfl_xor_sync(0xffffffffu, keep_bits, 8);
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = wn * WQ + n * 8 + 2 * t + c;
          // A row with no allowed key has lse = -inf: its P must be 0, not exp2(-inf + inf); +inf here gives 0.
          const float lse = sLse[buf * BM + r], delta = sDelta[buf * BM + r];
          const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int e = 2 * hf + c;
            const float pr = exp2f(st[mt][n][e] * pscale - lse2);
            if (kDrop) {
              const float keep = (keep_bits >> (4 * (2 * hf + c) + m4)) & 1 ? drop.scale : 0.f;
              st[mt][n][e] = pr * keep;
              dpt[mt][n][e] = pr * (dpt[mt][n][e] * keep - delta);
            } else {
              st[mt][n][e] = pr;
              dpt[mt][n][e] = pr * (dpt[mt][n][e] - delta);
            }
          }
        }
      }
    }
    };
    if (has_dropout) exp_pass(std::true_type{});
    else exp_pass(std::false_type{});

    // Mask gradient: dS itself (rows past L and keys past S hold 0 and are not written).
    if (has_dmask) {
      const int64_t base = b * p.dmask_st.b + h * p.dmask_st.h;
      // Broadcast over rows: this warp's WQ rows of each key (4 lanes x WQ / 4 values), one write per slot; a
      // half-step wholly past L has no slot (deterministic mode sizes the scratch to ceil(L / WQ) slots).
      if (p.dmask_tile_rows && i0 + wn * WQ < L) {
        const int slot = (i0 + wn * WQ) / WQ;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float part = 0.f;
#pragma unroll
            for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
              for (int c = 0; c < 2; ++c) part += dpt[mt][n][2 * hf + c];
            part = warp_sum4(part);
            const int j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
            if (t == 0 && j < S) {
              float* dst = p.dmask + base + int64_t(slot) * p.dmask_st.r + int64_t(j) * p.dmask_st.c;
              if (p.dmask_atomic) atomicAdd(dst, part);
              else *dst = part;
            }
          }
      } else if (!p.dmask_tile_rows) {
#pragma unroll
        for (int n = 0; n < WQ / 8; ++n)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = i0 + wn * WQ + n * 8 + 2 * t + c;
            if (i >= L) continue;
            float* row = p.dmask + base + int64_t(i) * p.dmask_st.r;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
              for (int hf = 0; hf < 2; ++hf) {
                const int j = j0 + wk * 32 + mt * 16 + hf * 8 + g;
                if (j >= S) continue;
                float* dst = row + int64_t(j) * p.dmask_st.c;
                if (p.dmask_atomic) atomicAdd(dst, dpt[mt][n][2 * hf + c]);
                else *dst = dpt[mt][n][2 * hf + c];
              }
          }
      }
    }

    // P^T and dS^T to shared memory (16-bit, as the A operands of dV / dK and, transposed, of dQ).
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kk = 0; kk < WQ / 16; ++kk) {
        FragA<T> ap, as;
        a_from_c(ap, st[mt][2 * kk], st[mt][2 * kk + 1]);
        a_from_c(as, dpt[mt][2 * kk], dpt[mt][2 * kk + 1]);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        stmatrix_x4(ap.r, PTile::moved(lane_ps, mt * 16, 2 * kk));
        stmatrix_x4(as.r, PTile::moved(lane_ps, mt * 16, 2 * kk) + PTile::kBytes);
#else
        PTile::sta(ap, sP, wk * 32 + mt * 16, wn * WQ + kk * 16, lane);
        PTile::sta(as, sS, wk * 32 + mt * 16, wn * WQ + kk * 16, lane);
#endif
      }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q on this warp's 32 keys x DC columns.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      FragA<T> ap[2], as[2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        ldmatrix_x4(ap[mt].r, PTile::moved(lane_pa, mt * 16, 2 * kk));
        ldmatrix_x4(as[mt].r, PTile::moved(lane_pa, mt * 16, 2 * kk) + PTile::kBytes);
      }
#pragma unroll
      for (int dn = 0; dn < DC / 16; ++dn) {
        FragB<T> bd, bq;
        ldmatrix_x4_trans(bd.r, QTile::moved(lane_qt + q_buf, kk * 16, 2 * dn) + QTile::kBytes);
        ldmatrix_x4_trans(bq.r, QTile::moved(lane_qt + q_buf, kk * 16, 2 * dn));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma(acc_dv[mt][2 * dn], ap[mt], bd, 0);
          mma(acc_dv[mt][2 * dn + 1], ap[mt], bd, 1);
          mma(acc_dk[mt][2 * dn], as[mt], bq, 0);
          mma(acc_dk[mt][2 * dn + 1], as[mt], bq, 1);
        }
      }
    }

    // dQ (BM x E) += dS (BM x BN) K (BN x E) on 32 rows x QC columns per warp, then float2 atomics.
    if (dq_atomic) {
      if (c_begin < E) {
        float acc_dq[2][QC / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int dn = 0; dn < QC / 8; ++dn)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[mt][dn][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          FragA<T> a[2];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) ldmatrix_x4_trans(a[mt].r, PTile::moved(lane_st, kk * 16, 2 * mt));
#pragma unroll
          for (int dn = 0; dn < QC / 16; ++dn) {
            FragB<T> bk;
            ldmatrix_x4_trans(bk.r, KTile::moved(lane_kt, kk * 16, 2 * dn));
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              mma(acc_dq[mt][2 * dn], a[mt], bk, 0);
              mma(acc_dq[mt][2 * dn + 1], a[mt], bk, 1);
            }
          }
        }
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
