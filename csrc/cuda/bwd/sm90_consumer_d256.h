// The consumer warpgroups of the Hopper backward at head dim 256 (bwd/sm90_kernel.h, plain kind). dK + dV of 64 keys x
// 256 columns are 256 floats per thread of one warpgroup, so the block holds 64 keys and both consumers see all of
// them: consumer w keeps dK / dV columns 128w..128w+127 (64 + 64 accumulators) and computes dQ columns 128w.. (m64n128,
// 64 accumulators). The small products are split by queries: consumer w computes S^T = K Q^T and dP^T = V dO^T of
// queries 32w..32w+31 (m64n32, k = 256) and stores its half of P^T and of dS^T (16-bit, [key][query], 128-byte swizzle,
// double buffered); after one barrier of both, dV / dK read P^T / dS^T from there as K-major A (wgmma_ss_tb) and dQ
// reads dS^T transposed (wgmma_ss_tt), all in one wgmma group. (S^T / dP^T of all 64 queries in both consumers, with
// P^T / dS^T as register A fragments, is 14.7 instead of 10.5 MFLOP of wgmma per step, and slower.) Registers per
// thread: dK + dV 128 + S^T / dP^T 32, then 128 + dQ 64. Issuing the next tile's S^T before this tile's dQ atomics (dQ
// 64 live) makes ptxas serialize the wgmma for lack of registers (C7512, 256-byte spill).
#pragma once
#include "cuda/bwd/epilogue.h"
#include "cuda/bwd/sm90_block.h"
#include "cuda/bwd/sm90_consumer.h"

namespace sdpax {
namespace cuda {

template <class T>
struct BwdSm90ConsumerD256 {
  using Block = BwdSm90Block<T, 256, false>;
  using Cfg = typename Block::Cfg;
  using KTile = typename Block::KTile;
  using QTile = typename Block::QTile;
  using DsTile = typename Block::DsTile;
  static constexpr int BM = Block::BM, BN = Block::BN, NT = Block::NT, kStages = Block::kStages;
  static_assert(BN == 64 && KTile::kBlockBytes == 64 * 128 && DsTile::kBytes == 64 * 64 * 2 && Cfg::kDsBuffers == 4,
                "d256 tiles");
  const Block& blk;
  int wg, wwarp, lane, g, t;
  float scale_log2;
  int key_r;  // accumulator rows (keys) key_r + 8 hf of the block, in both consumers
  int c0;     // this consumer's dK / dV / dQ columns c0..c0+127
  int q0;     // this consumer's queries of S^T / dP^T (tile-relative)

  __device__ __forceinline__ explicit BwdSm90ConsumerD256(const Block& blk_) : blk(blk_) {
    const int tid = blk.tid;
    wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    scale_log2 = blk.p.scale * kLog2e;
    key_r = wwarp * 16 + g;
    c0 = wg * 128;
    q0 = wg * 32;
  }

  // P^T and dS^T of this consumer's 32 queries of tile n (stage st) to shared memory (buffer n % 2; P^T two buffers
  // after dS^T): row key_r + 8 hf, 16-byte chunk 4w + nn (queries q0 + 8nn..) swizzled by the row % 8 = g.
  __device__ __forceinline__ void store_pds(const float (&s)[16], const float (&dp)[16], int n, int st) const {
    const float* lse2 = blk.row_vals + st * 2 * BM + q0;
    const uint32_t ds_buf = blk.sDs0 + (n & 1) * DsTile::kBytes, pt_buf = ds_buf + 2 * DsTile::kBytes;
#pragma unroll
    for (int nn = 0; nn < 4; ++nn) {
      const float2 l2 = *reinterpret_cast<const float2*>(lse2 + nn * 8 + 2 * t);
      const float2 dl = *reinterpret_cast<const float2*>(lse2 + BM + nn * 8 + 2 * t);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float p0 = exp2f(s[nn * 4 + hf * 2] * scale_log2 - l2.x);
        const float p1 = exp2f(s[nn * 4 + hf * 2 + 1] * scale_log2 - l2.y);
        const float d0 = p0 * (dp[nn * 4 + hf * 2] - dl.x), d1 = p1 * (dp[nn * 4 + hf * 2 + 1] - dl.y);
        const uint32_t off = (key_r + 8 * hf) * 128 + (((4 * wg + nn) ^ g) << 4) + 4 * t;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(pt_buf + off), "r"(pack2<T>(p0, p1)) : "memory");
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_buf + off), "r"(pack2<T>(d0, d1)) : "memory");
      }
    }
  }

  __device__ __forceinline__ void run() const {
    const AttnParams& p = blk.p;
    float acc_dk[64], acc_dv[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_dk[i] = acc_dv[i] = 0.f;

    const uint64_t k_desc = sw128_desc(blk.sK, 16, 1024);  // all 64 keys, A of S^T (K-major)
    const uint64_t v_desc = sw128_desc(blk.sV, 16, 1024);
    const uint64_t q_desc = sw128_desc(blk.sQ0 + q0 * 128, 16, 1024);  // rows q0.. of Q / dO, K-major B of S^T / dP^T
    // Q / dO columns c0.. (64-column blocks 2w, 2w + 1) as the N-major B of dK / dV.
    const uint64_t qt_desc = sw128_desc(blk.sQ0 + wg * 2 * QTile::kBlockBytes, QTile::kBlockBytes, 1024);
    // dS^T buffer x at sDs0 + x DsTile::kBytes, P^T buffer x two buffers later: K-major A of dK / dV (one 128-byte
    // row of 64 queries per key), and dS^T M-major A of dQ with B = K columns c0.. (N-major), k = the 64 keys.
    const uint64_t dsk_desc = sw128_desc(blk.sDs0, 16, 1024);
    const uint64_t pt_desc = sw128_desc(blk.sDs0 + 2 * DsTile::kBytes, 16, 1024);
    const uint64_t ds_desc = sw128_desc(blk.sDs0, DsTile::kBlockBytes, 1024);
    const uint64_t kt_desc = sw128_desc(blk.sK + wg * 2 * KTile::kBlockBytes, KTile::kBlockBytes, 1024);

    mbar_wait(blk.bar_kv, 0);
    int st;
    int4 tile;
    for (int n = 0; blk.next_tile(n, st, tile); ++n) {
      const int h = tile.x, i0 = tile.y;
      const uint32_t stage_off = (st * Cfg::kStageBytes) >> 4;

      float s[16], dp[16];
      bwd_sm90_scores<32, 256, T, KTile, QTile>(s, dp, k_desc, v_desc, q_desc, stage_off);
      // Causal / bounds (keys past S: K is zero-filled, S^T = 0); queries i0 + q0 + ...
      if (blk.crosses(i0)) bwd_sm90_limits<4>(s, i0 + q0, blk.j0 + key_r, blk.lim_shift, blk.S, t);
      store_pds(s, dp, n, st);
      fence_proxy_async();                  // the generic-proxy stores above, read by wgmma (async proxy) below
      named_barrier(kBwdBarConsumers, NT);  // both halves of P^T / dS^T are in

      // dV_w += P^T dO[:, c0..], dK_w += dS^T Q[:, c0..], dQ[:, c0..] = dS K[:, c0..]: one group.
      float dq[64];
      wgmma_fence();
      const uint32_t buf_off = ((n & 1) * DsTile::kBytes) >> 4;
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const uint32_t aoff = buf_off + ((kk * 32) >> 4);
        const uint32_t boff = stage_off + ((kk * 16 * 128) >> 4);
        wgmma_ss_tb<128, T>(acc_dv, pt_desc + aoff, qt_desc + boff + (QTile::kBytes >> 4), 1);
        wgmma_ss_tb<128, T>(acc_dk, dsk_desc + aoff, qt_desc + boff, 1);
      }
      bwd_sm90_dq<128, T, BN>(dq, ds_desc + buf_off, kt_desc);
      wgmma_commit();
      wgmma_wait<0>();
      reg_fence(acc_dv);
      reg_fence(acc_dk);
      reg_fence(dq);
      blk.release_stage(st, lane);

      // dQ rows i0 + 16 wwarp + g + 8 hf, columns c0 + 8 nn + 2t: float2 atomics.
      add_dq_rows16<16>(p, dq, static_cast<int64_t>(blk.b) * p.hq + h, i0 + wwarp * 16, c0, g, t);
    }

    // dK (scaled) and dV of this thread's keys, columns c0..
    store_dkdv<T, 16>(p, acc_dk, acc_dv, blk.b, blk.hk, blk.j0 + key_r, c0, t, p.S, p.E, p.Ev);
  }
};

}  // namespace cuda
}  // namespace sdpax
