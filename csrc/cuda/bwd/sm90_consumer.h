// The consumer warpgroups of the Hopper backward at head dims 64 and 128 (bwd/sm90_kernel.h), and the score pieces both
// consumer loops share (sm90_consumer_d256.h is the other). Consumer w (warpgroups 0, 1) owns keys 64w..64w+63 of
// the block and, per query tile of BM = 64 rows:
//   S^T  = K_w Q^T     wgmma m64n64, K_w and Q K-major from shared memory (rows = keys, columns = queries)
//   dP^T = V_w dO^T    the same with V and dO
//   P^T  = exp2(S^T scale log2(e) - lse log2(e))  (lse per column: one FFMA before the exp2)
//   dS^T = P^T o (dP^T - Delta)
//   dV_w += P^T dO,  dK_w += dS^T Q     wgmma m64nD, A = P^T / dS^T from registers (the accumulators rounded to
//                 16 bits are the A fragments, as P in the forward), B = dO / Q read N-major ("tb", as V there)
//   dQ (64 x D) += dS K                 dS^T goes to shared memory ([key][query], 128-byte swizzle) and is read
//                 back transposed as A, K transposed as B (wgmma_ss_tt); float2 atomics into dq_accum.
//     d128: consumer w computes dQ columns 64w..64w+63 over all 128 keys (both consumers' dS^T, one barrier of the
//           two warpgroups per step);
//     d64:  the consumers take turns: consumer n % 2 computes all 64 columns of step n over all 128 keys (an n32
//           split of the 64 K columns would start inside a 128-byte swizzle atom; a split by keys gives every dQ
//           element two atomic adds per tile).
// dK / dV of the 128 keys stay in registers for the whole walk and are written once, without atomics. Registers
// per consumer thread at d128: dV 64 + dK 64 + S^T 32 + dP^T 32 at the first products; dV + dK + the 16-bit P^T /
// dS^T fragments 32 + dQ 32 later.
// A branch between a wgmma's issue and its wait makes ptxas serialize every wgmma of the kernel (warning C7514):
// the per-step decisions are taken before an issue or after a wait.
#pragma once
#include "cuda/bwd/epilogue.h"
#include "cuda/bwd/sm90_block.h"

namespace sdpax {
namespace cuda {

// S^T = K_w Q^T into s and dP^T = V_w dO^T into dp (wgmma m64nN, k = the D head-dim columns; K / V at k_desc /
// v_desc, Q / dO of the stage at q_desc + stage_off, dO QTile::kBytes after Q, all K-major), waited for.
template <int N, int D, class T, class KTile, class QTile>
__device__ __forceinline__ void bwd_sm90_scores(float (&s)[N / 2], float (&dp)[N / 2], uint64_t k_desc,
                                                uint64_t v_desc, uint64_t q_desc, uint32_t stage_off) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
    const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
    wgmma_ss<N, T>(s, k_desc + koff, q_desc + stage_off + qoff, kk > 0);
  }
  wgmma_commit();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
    const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
    wgmma_ss<N, T>(dp, v_desc + koff, q_desc + stage_off + ((QTile::kBytes) >> 4) + qoff, kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(s);
  reg_fence(dp);
}

// dQ (64 x N) += dS (64 x BN) K (BN x N): dS^T and K^T both read transposed (MN-major), one wgmma per 16 keys;
// the caller fences and commits.
template <int N, class T, int BN>
__device__ __forceinline__ void bwd_sm90_dq(float (&dq)[N / 2], uint64_t ds_desc, uint64_t kt_desc) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const uint32_t off = (kk * 16 * 128) >> 4;
    wgmma_ss_tt<N, T>(dq, ds_desc + off, kt_desc + off, kk > 0);
  }
}

// Causal / bounds on a query tile that crosses them (some key of the block reaches past its first row's limit, or
// past S: K is zero-filled there, S^T = 0, and P would not be): S^T = -inf where key j + 8 hf (the thread's
// accumulator rows) is at or past the limit min(i + lim_shift, S) of query i = i_w + 8 nn + 2t + e (its columns).
template <int NN>
__device__ __forceinline__ void bwd_sm90_limits(float (&s)[4 * NN], int i_w, int j, int lim_shift, int S, int t) {
#pragma unroll
  for (int nn = 0; nn < NN; ++nn)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int lim = min(i_w + nn * 8 + 2 * t + e + lim_shift, S);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        if (j + 8 * hf >= lim) s[nn * 4 + hf * 2 + e] = -INFINITY;
    }
}

template <class T, int D, bool kGeneral>
struct BwdSm90Consumer {
  using Block = BwdSm90Block<T, D, kGeneral>;
  using Cfg = typename Block::Cfg;
  using KTile = typename Block::KTile;
  using QTile = typename Block::QTile;
  using DsTile = typename Block::DsTile;
  static constexpr int BM = Block::BM, BN = Block::BN, NT = Block::NT, kStages = Block::kStages;
  static constexpr bool kByTurns = Cfg::kDqByTurns;
  const Block& blk;
  int wg, wwarp, lane, g, t;
  float scale_log2;
  int key_r;  // this thread's accumulator rows (keys) in S^T / dP^T / dK / dV: key_r + 8 hf of the block

  __device__ __forceinline__ explicit BwdSm90Consumer(const Block& blk_) : blk(blk_) {
    const int tid = blk.tid;
    wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    scale_log2 = blk.p.scale * kLog2e;
    key_r = wg * 64 + wwarp * 16 + g;
  }

  // P^T and dS^T of tile n (stage st) as the 16-bit A fragments of dV / dK: pa / da[k16 step][register], register
  // (row g, queries 2t..) 0 / 2, (row g + 8, ..) 1 / 3. Bool mask (general kind, a tile not wholly allowed; bounds
  // included): P^T and dS^T are 0 where it is clear (whatever exp2 gave there, inf included). The mask words of k16
  // step c are loaded before its exp2s, so that their latency hides behind them: loaded after all the exp2s, the
  // loads sat on the path to the dS^T stores; all 16 words loaded before the exp2s spilled 5 registers there.
  __device__ __forceinline__ void fragments(uint32_t (&pa)[4][4], uint32_t (&da)[4][4], const float (&s)[32],
                                            const float (&dp)[32], int n, int st, bool masked) const {
    const float* lse2 = blk.row_vals + st * 2 * BM;
    const uint4* mw =
        reinterpret_cast<const uint4*>(blk.bits0 + (n % Cfg::kMaskRing) * (Cfg::kBitsBytes / 4)) + mask_slot(blk.tid);
    uint4 mword = make_uint4(~0u, ~0u, ~0u, ~0u);
#pragma unroll
    for (int nn = 0; nn < 8; ++nn) {
      if (blk.has_mask && (nn & 1) == 0 && masked) mword = mw[256 * (nn >> 1)];
      const float2 l2 = *reinterpret_cast<const float2*>(lse2 + nn * 8 + 2 * t);
      const float2 dl = *reinterpret_cast<const float2*>(lse2 + BM + nn * 8 + 2 * t);
      float pr[4], ds[4];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        pr[hf * 2] = exp2f(s[nn * 4 + hf * 2] * scale_log2 - l2.x);
        pr[hf * 2 + 1] = exp2f(s[nn * 4 + hf * 2 + 1] * scale_log2 - l2.y);
        ds[hf * 2] = pr[hf * 2] * (dp[nn * 4 + hf * 2] - dl.x);
        ds[hf * 2 + 1] = pr[hf * 2 + 1] * (dp[nn * 4 + hf * 2 + 1] - dl.y);
      }
      // Word r of the step's mask masks register r.
      const uint32_t m_lo = (nn & 1) ? mword.z : mword.x, m_hi = (nn & 1) ? mword.w : mword.y;
      pa[nn >> 1][(nn & 1) * 2] = pack2<T>(pr[0], pr[1]);
      pa[nn >> 1][(nn & 1) * 2 + 1] = pack2<T>(pr[2], pr[3]);
      da[nn >> 1][(nn & 1) * 2] = pack2<T>(ds[0], ds[1]);
      da[nn >> 1][(nn & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
      if (blk.has_mask) {
        pa[nn >> 1][(nn & 1) * 2] &= m_lo;
        pa[nn >> 1][(nn & 1) * 2 + 1] &= m_hi;
        da[nn >> 1][(nn & 1) * 2] &= m_lo;
        da[nn >> 1][(nn & 1) * 2 + 1] &= m_hi;
      }
    }
  }

  // dS^T to shared memory (buffer n % 2): row key_r + 8 hf, 16-byte chunk nn (queries 8nn..) swizzled by the
  // row % 8 = g; the 8 rows x 4 words of a warp's store hit 32 different banks.
  __device__ __forceinline__ void store_ds(const uint32_t (&da)[4][4], int n) const {
    const uint32_t ds_buf = blk.sDs0 + (n & 1) * DsTile::kBytes;
#pragma unroll
    for (int nn = 0; nn < 8; ++nn)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const uint32_t addr = ds_buf + (key_r + 8 * hf) * 128 + ((nn ^ g) << 4) + 4 * t;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[nn >> 1][(nn & 1) * 2 + hf]) : "memory");
      }
  }

  __device__ __forceinline__ void run() const {
    const AttnParams& p = blk.p;
    float acc_dk[D / 2], acc_dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

    // Descriptors (K-major: leading offset unused, 8-row groups 1024 B apart; N/M-major: 64-column blocks
    // kBlockBytes apart, 8 k-rows 1024 B apart). Stage / buffer offsets are added to the address bits.
    const uint64_t k_desc = sw128_desc(blk.sK + wg * 64 * 128, 16, 1024);  // this warpgroup's 64 keys, A of S^T
    const uint64_t v_desc = sw128_desc(blk.sV + wg * 64 * 128, 16, 1024);
    const uint64_t q_desc = sw128_desc(blk.sQ0, 16, 1024);                   // Q / dO as B of S^T / dP^T
    const uint64_t qt_desc = sw128_desc(blk.sQ0, QTile::kBlockBytes, 1024);  // Q / dO as N-major B of dK / dV
    // dQ: A = dS^T (M-major), B = K (N-major), all 128 keys. By columns (d128): K columns 64 wg..; by turns (d64):
    // all 64 columns on every other step.
    const uint64_t ds_desc = sw128_desc(blk.sDs0, DsTile::kBlockBytes, 1024);
    const uint64_t kt_desc =
        sw128_desc(blk.sK + (kByTurns ? 0 : wg * KTile::kBlockBytes), KTile::kBlockBytes, 1024);
    const int dq_c0 = kByTurns ? 0 : wg * 64;  // first dQ column of this warpgroup

    mbar_wait(blk.bar_kv, 0);
    int st;
    int4 tile;
    for (int n = 0; blk.next_tile(n, st, tile); ++n) {
      const int h = tile.x, i0 = tile.y;
      const uint32_t stage_off = (st * Cfg::kStageBytes) >> 4;
      float s[32], dp[32];
      bwd_sm90_scores<64, D, T, KTile, QTile>(s, dp, k_desc, v_desc, q_desc, stage_off);
      if (blk.crosses(i0)) bwd_sm90_limits<8>(s, i0, blk.j0 + key_r, blk.lim_shift, blk.S, t);
      uint32_t pa[4][4], da[4][4];
      fragments(pa, da, s, dp, n, st, blk.has_mask && !tile.z);
      store_ds(da, n);
      fence_proxy_async();  // the generic-proxy stores above, read by wgmma (async proxy) below

      // dV += P^T dO, dK += dS^T Q (A from registers).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const uint32_t off = stage_off + ((kk * 16 * 128) >> 4);
        wgmma_rs_tb<D, T>(acc_dv, pa[kk], qt_desc + off + (QTile::kBytes >> 4));
        wgmma_rs_tb<D, T>(acc_dk, da[kk], qt_desc + off);
      }
      wgmma_commit();
      named_barrier(kBwdBarConsumers, NT);  // both consumers' dS^T is in
      float dq[32];
      // By turns: the other consumer's step. Decided after the wait for dV / dK (see the top).
      const bool my_dq = !kByTurns || (n & 1) == wg;
      if (kByTurns) {
        wgmma_wait<0>();
        reg_fence(acc_dv);
        reg_fence(acc_dk);
        reg_fence_u32(pa);
        reg_fence_u32(da);
      }
      if (my_dq) {
        wgmma_fence();
        const uint32_t ds_off = ((n & 1) * DsTile::kBytes) >> 4;
        bwd_sm90_dq<64, T, BN>(dq, ds_desc + ds_off, kt_desc);
        wgmma_commit();
      }
      wgmma_wait<0>();
      reg_fence(acc_dv);
      reg_fence(acc_dk);
      reg_fence(dq);
      reg_fence_u32(pa);
      reg_fence_u32(da);
      blk.release_stage(st, lane);
      if (!my_dq) continue;

      // dQ rows i0 + 16 wwarp + g + 8 hf, columns dq_c0 + 8 nn + 2t: float2 atomics. (float4 atomics after one
      // shuffle per 8 columns halve the atomic instructions but not the L2 sectors, and are slower.)
      add_dq_rows16<8>(p, dq, static_cast<int64_t>(blk.b) * p.hq + h, i0 + wwarp * 16, dq_c0, g, t);
    }

    // dK (scaled) and dV of this thread's keys.
    store_dkdv<T, D / 8>(p, acc_dk, acc_dv, blk.b, blk.hk, blk.j0 + key_r, 0, t, p.S, p.E, p.Ev);
  }
};

}  // namespace cuda
}  // namespace sdpax
