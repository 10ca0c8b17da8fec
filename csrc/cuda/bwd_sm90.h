// Hopper (sm90a) backward main loop at head dims 64 and 128, 16-bit inputs, non-deterministic dQ (float atomics):
// the plain kind (no mask; causal of either alignment, GQA, sinks through lse) and, of the general kind, bool masks
// without dropout (bwd_sm90_general_ok). Everything else runs bwd_wide.h / bwd_kernel.h (launch.cu decides per
// call).
//
// One block per (128-key block, batch, kv head), as bwd_wide: it walks the G query heads of the GQA group and their
// query tiles of BM = 64 rows (tiles wholly above the causal diagonal are never visited), and keeps dK / dV of its
// 128 keys in registers for the whole walk, so dK / dV are written once, without atomics. Three warpgroups:
//   consumers (warpgroups 0, 1: keys 64w..64w+63 of the block), per query tile:
//     S^T  = K_w Q^T     wgmma m64n64, K_w and Q K-major from shared memory (rows = keys, columns = queries)
//     dP^T = V_w dO^T    the same with V and dO
//     P^T  = exp2(S^T scale log2(e) - lse log2(e))  (lse per column: one FFMA before the exp2)
//     dS^T = P^T o (dP^T - Delta)
//     dV_w += P^T dO,  dK_w += dS^T Q     wgmma m64nD, A = P^T / dS^T from registers (the accumulators rounded to
//                   16 bits are the A fragments, as P in the forward), B = dO / Q read N-major ("tb", as V there)
//     dQ (64 x D) += dS K                 dS^T goes to shared memory ([key][query], 128-byte swizzle) and is read
//                   back transposed as A, K transposed as B (wgmma_ss_tt); float2 atomics into dq_accum.
//       d128: consumer w computes dQ columns 64w..64w+63 over all 128 keys (both consumers' dS^T, one barrier of
//             the two warpgroups per step);
//       d64:  the consumers take turns: consumer n % 2 computes all 64 columns of step n over all 128 keys (an n32
//             split of the 64 K columns would start inside a 128-byte swizzle atom; a split by keys gave every dQ
//             element two atomic adds per tile, 240 vs 252 TFLOP/s of the mma.sync loop at d64 L4k).
//   producer (warpgroup 2): K and V once (TMA), then per query tile Q and dO (TMA) and lse / Delta (plain loads:
//     lse rows are not 16-byte aligned for a bulk copy when L is odd) into a ring of kStages stages with full /
//     empty mbarriers, and the tile's (head, first row), so that the producer alone decides which tiles the
//     consumers see. It stores lse already in log2 units, +inf for rows past L and rows with no allowed key
//     (lse = -inf), so that P is exactly 0 there without a test. Bool mask (general kind): the 64 x 128-byte tile
//     arrives by one tensor copy a step ahead; the producer reads it with 16-byte loads (4 per thread), drops tiles
//     with no allowed element and hands the consumers the rest as 16 bits per element in their fragment order; each
//     consumer thread reads 4 x 16 bytes and ANDs them into its 16-bit P^T / dS^T fragments. A row-broadcast mask
//     (padding) is read from global memory and judged once per head: empty heads are skipped whole, full ones need
//     no further loads and no AND.
//
// Registers per consumer thread at d128: dV 64 + dK 64 + S^T 32 + dP^T 32 at the first products; dV + dK + the
// 16-bit P^T / dS^T fragments 32 + dQ 32 later. The kernel body exists only in the sm_90a compilation.
//
// Head dim 256 (plain kind only): 64-key blocks, the same producer, and its own consumer loop
// (bwd_sm90_consumer_d256): both consumers see all 64 keys and split dK / dV / dQ by head-dim halves.
#pragma once
#include "cuda/bwd/epilogue.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/prims/sync.h"
#include "cuda/prims/tma.h"
#include "cuda/prims/wgmma.h"

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; no driver call is made from here)

namespace sdpax {
namespace cuda {

// Tensor maps of Q, dO (boxes of 64 columns x 64 rows) and K, V (64 columns x 128 keys), 4-D (column, row, head,
// batch), 128-byte swizzle, zero fill past the ends; encoded by the host (launch_bwd_sm90.h). General kind with a
// mask that has rows (mask_st.r != 0): the bool mask as bytes (key, row, head, batch; a broadcast head or batch dim
// has size 1), boxes of 128 keys x 64 rows.
struct BwdTmaMaps {
  CUtensorMap q, dout, k, v, mask;
};


template <int D, bool kGeneral>
struct BwdSm90Cfg {
  static_assert(D == 64 || D == 128 || D == 256, "the sm90 backward covers head dims 64, 128 and 256");
  static_assert(D != 256 || !kGeneral, "d256: the plain kind only (bwd_sm90_consumer_d256)");
  // Keys per block: two consumer warpgroups of 64 (d64 / d128); d256: 64 keys shared by both consumers, each
  // holding dK / dV of half the head dim (bwd_sm90_consumer_d256).
  static constexpr int kBN = tiles::bwd_sm90_bn(D);
  static constexpr int kBM = tiles::kBwdSm90BM;   // queries per step: the n of S^T / dP^T and the k extent of dK / dV
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = kConsumers + 128;
  // setmaxnreg moves registers between the warpgroups inside the block's launch allocation, 168 per thread (65536 / 384
  // rounded down to 8) x 384 = 64512: 2 x 128 x 240 + 128 x 24 for the plain kind, 2 x 128 x 232 + 128 x 40 for the
  // general kind (its producer expands the mask: it spills there, off the consumers' path, since it runs two tiles
  // ahead; 224 / 64 spilled 3 values into the consumers' loop). A split above the allocation (232 / 48 = 65536) never
  // returns from the consumers' setmaxnreg.inc: the kernel hangs.
  static constexpr int kConsumerRegs = kGeneral ? 232 : 240, kProducerRegs = kGeneral ? 40 : 24;
  static_assert(setmaxnreg_fits(kThreads, kConsumers, kConsumerRegs, kProducerRegs),
                "setmaxnreg split exceeds the block's register allocation");
  // dQ split between the consumers (see the top): by columns at d128, by turns at d64.
  static constexpr bool kDqByTurns = D == 64;
  // Q / dO stages: the producer runs this many tiles ahead.
  static constexpr int kStages = 2;
  using KTile = Sw128Tile<kBN, D>;   // K and V
  using QTile = Sw128Tile<kBM, D>;   // Q and dO of one stage
  using DsTile = Sw128Tile<kBN, kBM>;  // dS^T: rows = keys, 64 query columns = one 128-byte row
  static constexpr int kStageBytes = 2 * QTile::kBytes;  // Q then dO
  // Bool mask of a stage, 16 bits per element (0xffff: kept, 0: masked), already in the consumers' fragment order:
  // the consumers AND it into the 16-bit P^T / dS^T A fragments (4 x 16-byte loads and 32 LOP3 per thread and
  // step; one bit per element cost 16 loads, 16 shifts and 32 test + select pairs). Word r of uint4 c of consumer
  // thread x (at 16 (256 c + mask_slot(x))) masks pa[c][r] / da[c][r]: (key key_r + 8 (r & 1), queries
  // 16 c + 8 (r >> 1) + 2t, + 1), the low half the first query.
  static constexpr int kBitsBytes = kGeneral ? kBM * kBN * 2 : 0;
  // Mask buffers: tile n uses buffer n % kMaskBufs. One more than the stages, so that the producer can store tile
  // n's mask before its wait for stage n % kStages (tile n - kStages released; tile n - 1 may still be read) and
  // publish the tile right after that wait. (ptxas spills ~100 bytes in the producer at 48 registers either way.)
  static constexpr int kMaskBufs = kGeneral ? kStages + 1 : 0;
  static constexpr int kMaskRing = kMaskBufs > 0 ? kMaskBufs : 1;  // n % kMaskRing: no "% 0" in the plain kind
  // The producer's raw mask rows (kBM rows x kBN bytes, as in memory; 16-byte chunk c of row r at c ^ (r % 8): the
  // TMA's 128-byte swizzle), one tensor copy per tile issued one step ahead into two buffers, each with its own full
  // barrier: a tile's load latency hides behind the previous tile's wait for a free stage. (Loaded when needed, the
  // four row loads of a tile were four L2 round trips on the producer's path: ncu showed the consumers waiting for a
  // full stage 40% of the time with a dense bool mask. Then by cp.async, 4 copies per producer thread and tile.)
  static constexpr int kRawBytes = kGeneral ? kBM * kBN : 0;
  static constexpr int kRawBufs = kGeneral ? 2 : 0;
  // K, V, the Q / dO stages, two dS^T buffers (a consumer writes step n + 1's while the other may still read step n's:
  // one barrier per step suffices), lse2 / Delta per stage (64 floats each), kMaskBufs mask buffers, kRawBufs raw mask
  // buffers, mbarriers and the (head, first row, full) of each stage, and 1024 bytes of slack for the alignment of the
  // swizzle atoms.
  static constexpr int kBarBytes = (2 * kStages + 2) * 8 + kStages * 16 + kRawBufs * 8;
  // dS^T buffers; d256 adds two P^T buffers after them (bwd_sm90_consumer_d256).
  static constexpr int kDsBuffers = D == 256 ? 4 : 2;
  static constexpr int kSmem = 2 * KTile::kBytes + kStages * kStageBytes + kDsBuffers * DsTile::kBytes +
                               kStages * 2 * kBM * 4 + kMaskBufs * kBitsBytes + kRawBufs * kRawBytes + kBarBytes +
                               1024;
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
};

// 16-byte slot of consumer thread x in each quarter of a stage's mask (see kBitsBytes): bit 2 flipped in odd warps,
// so that the producer's stores of one phase (lanes t = 0..3 of two adjacent warps) hit 8 different bank groups.
__device__ __forceinline__ int mask_slot(int x) { return x ^ ((x >> 3) & 4); }

// Consumer warpgroups at head dim 256. dK + dV of 64 keys x 256 columns are 256 floats per thread of one
// warpgroup, so the block holds 64 keys and both consumers see all of them: consumer w keeps dK / dV columns
// 128w..128w+127 (64 + 64 accumulators) and computes dQ columns 128w.. (m64n128, 64 accumulators). The small
// products are split by queries: consumer w computes S^T = K Q^T and dP^T = V dO^T of queries 32w..32w+31
// (m64n32, k = 256) and stores its half of P^T and of dS^T (16-bit, [key][query], 128-byte swizzle, double
// buffered); after one barrier of both, dV / dK read P^T / dS^T from there as K-major A (wgmma_ss_tb) and dQ reads
// dS^T transposed (wgmma_ss_tt), all in one wgmma group. (S^T / dP^T of all 64 queries in both consumers, with
// P^T / dS^T as register A fragments, is 14.7 instead of 10.5 MFLOP of wgmma per step, and measured slower.)
// Registers per thread: dK + dV 128 + S^T / dP^T 32, then 128 + dQ 64.
// Issuing the next tile's S^T before this tile's dQ atomics (dQ 64 live) made ptxas serialize the wgmma for lack
// of registers (C7512, 256-byte spill).
template <class T, class Cfg>
__device__ __forceinline__ void bwd_sm90_consumer_d256(const AttnParams& p, uint32_t sK, uint32_t sV, uint32_t sQ0,
                                                       uint32_t sDs0, const float* row_vals, uint32_t bar_full0,
                                                       uint32_t bar_empty0, uint32_t bar_kv,
                                                       const int4* tile_of_stage, int b, int hk, int j0,
                                                       int lim_shift) {
#ifdef SDPAX_SM90A_DEVICE
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  using DsTile = typename Cfg::DsTile;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kConsumers, kStages = Cfg::kStages;
  static_assert(BN == 64 && KTile::kBlockBytes == 64 * 128 && DsTile::kBytes == 64 * 64 * 2 && Cfg::kDsBuffers == 4,
                "d256 tiles");
  const int S = static_cast<int>(p.S);
  const int tid = threadIdx.x;
  const int wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  const int key_r = wwarp * 16 + g;  // accumulator rows (keys) key_r + 8 hf of the block, in both consumers
  const int c0 = wg * 128;           // this consumer's dK / dV / dQ columns c0..c0+127
  const int q0 = wg * 32;            // this consumer's queries of S^T / dP^T (tile-relative)

  float acc_dk[64], acc_dv[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  const uint64_t k_desc = sw128_desc(sK, 16, 1024);  // all 64 keys, A of S^T (K-major)
  const uint64_t v_desc = sw128_desc(sV, 16, 1024);
  const uint64_t q_desc = sw128_desc(sQ0 + q0 * 128, 16, 1024);  // rows q0.. of Q / dO, K-major B of S^T / dP^T
  // Q / dO columns c0.. (64-column blocks 2w, 2w + 1) as the N-major B of dK / dV.
  const uint64_t qt_desc = sw128_desc(sQ0 + wg * 2 * QTile::kBlockBytes, QTile::kBlockBytes, 1024);
  // dS^T buffer x at sDs0 + x DsTile::kBytes, P^T buffer x two buffers later: K-major A of dK / dV (one 128-byte
  // row of 64 queries per key), and dS^T M-major A of dQ with B = K columns c0.. (N-major), k = the 64 keys.
  const uint64_t dsk_desc = sw128_desc(sDs0, 16, 1024);
  const uint64_t pt_desc = sw128_desc(sDs0 + 2 * DsTile::kBytes, 16, 1024);
  const uint64_t ds_desc = sw128_desc(sDs0, DsTile::kBlockBytes, 1024);
  const uint64_t kt_desc = sw128_desc(sK + wg * 2 * KTile::kBlockBytes, KTile::kBlockBytes, 1024);

  mbar_wait(bar_kv, 0);
  for (int n = 0;; ++n) {
    const int st = n % kStages;
    const uint32_t stage_off = (st * Cfg::kStageBytes) >> 4;
    mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
    const int4 tile = tile_of_stage[st];
    if (tile.x < 0) break;
    const int h = tile.x, i0 = tile.y;

    float s[16], dp[16];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<32, T>(s, k_desc + koff, q_desc + stage_off + qoff, kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<32, T>(dp, v_desc + koff, q_desc + stage_off + (QTile::kBytes >> 4) + qoff, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(s);
    reg_fence(dp);

    // Causal / bounds, as in the kernel body (keys past S: K is zero-filled, S^T = 0); queries i0 + q0 + ...
    const bool cross = j0 + BN > S || (p.causal != Causal::None && j0 + BN - 1 >= i0 + lim_shift);
    if (cross) {
#pragma unroll
      for (int nn = 0; nn < 4; ++nn)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lim = min(i0 + q0 + nn * 8 + 2 * t + e + lim_shift, S);
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            if (j0 + key_r + 8 * hf >= lim) s[nn * 4 + hf * 2 + e] = -INFINITY;
        }
    }
    const float* lse2 = row_vals + st * 2 * BM + q0;
    const uint32_t ds_buf = sDs0 + (n & 1) * DsTile::kBytes, pt_buf = ds_buf + 2 * DsTile::kBytes;
#pragma unroll
    for (int nn = 0; nn < 4; ++nn) {
      const float2 l2 = *reinterpret_cast<const float2*>(lse2 + nn * 8 + 2 * t);
      const float2 dl = *reinterpret_cast<const float2*>(lse2 + BM + nn * 8 + 2 * t);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float p0 = exp2f(s[nn * 4 + hf * 2] * scale_log2 - l2.x);
        const float p1 = exp2f(s[nn * 4 + hf * 2 + 1] * scale_log2 - l2.y);
        const float d0 = p0 * (dp[nn * 4 + hf * 2] - dl.x), d1 = p1 * (dp[nn * 4 + hf * 2 + 1] - dl.y);
        // Row key_r + 8 hf, 16-byte chunk 4w + nn (queries q0 + 8nn..) swizzled by the row % 8 = g.
        const uint32_t off = (key_r + 8 * hf) * 128 + (((4 * wg + nn) ^ g) << 4) + 4 * t;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(pt_buf + off), "r"(pack2<T>(p0, p1)) : "memory");
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_buf + off), "r"(pack2<T>(d0, d1)) : "memory");
      }
    }
    fence_proxy_async();   // the generic-proxy stores above, read by wgmma (async proxy) below
    named_barrier(1, NT);  // both halves of P^T / dS^T are in

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
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t off = (kk * 16 * 128) >> 4;
      wgmma_ss_tt<128, T>(dq, ds_desc + buf_off + off, kt_desc + off, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc_dv);
    reg_fence(acc_dk);
    reg_fence(dq);
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty0 + 8 * st);  // this warp is done with the stage

    // dQ rows i0 + 16 wwarp + g + 8 hf, columns c0 + 8 nn + 2t: float2 atomics.
    add_dq_rows16<16>(p, dq, static_cast<int64_t>(b) * p.hq + h, i0 + wwarp * 16, c0, g, t);
  }

  // dK (scaled) and dV of this thread's keys, columns c0..
  store_dkdv<T, 16>(p, acc_dk, acc_dv, b, hk, j0 + key_r, c0, t, p.S, p.E, p.Ev);
#endif
}

template <class T, int D, bool kGeneral>
__global__ void __launch_bounds__(BwdSm90Cfg<D, kGeneral>::kThreads, 1)
    bwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ BwdTmaMaps maps) {
#ifdef SDPAX_SM90A_DEVICE
  using Cfg = BwdSm90Cfg<D, kGeneral>;
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  using DsTile = typename Cfg::DsTile;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kConsumers, kStages = Cfg::kStages;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sK = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sV = sK + KTile::kBytes;
  const uint32_t sQ0 = sV + KTile::kBytes;  // stage s: Q at sQ0 + s * kStageBytes, dO QTile::kBytes after it
  const uint32_t sDs0 = sQ0 + kStages * Cfg::kStageBytes;  // dS^T buffer x at sDs0 + x * DsTile::kBytes
  const uint32_t sRow0 = sDs0 + Cfg::kDsBuffers * DsTile::kBytes;  // stage s: lse2 at + s * 2 BM floats, Delta BM after
  const uint32_t sBits0 = sRow0 + kStages * 2 * BM * 4;    // mask buffer x at + x * kBitsBytes
  const uint32_t sRaw0 = sBits0 + Cfg::kMaskBufs * Cfg::kBitsBytes;  // raw mask buffer x at + x * kRawBytes
  const uint32_t bar_full0 = sRaw0 + Cfg::kRawBufs * Cfg::kRawBytes;
  const uint32_t bar_empty0 = bar_full0 + kStages * 8;
  const uint32_t bar_kv = bar_empty0 + kStages * 8;
  auto smem_ptr = [&](uint32_t addr) { return smem + (addr - smem_u32(smem)); };
  float* row_vals = reinterpret_cast<float*>(smem_ptr(sRow0));
  uint32_t* bits0 = reinterpret_cast<uint32_t*>(smem_ptr(sBits0));
  // (head, first row, whether every element of the tile in bounds is allowed (general kind), -); head -1: the end
  int4* tile_of_stage = reinterpret_cast<int4*>(smem_ptr(bar_kv + 16));
  const uint32_t bar_raw0 = bar_kv + 16 + kStages * 16;  // full barrier of raw mask buffer x at + 8 x

  const int tid = threadIdx.x;
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int n_blocks = (S + BN - 1) / BN;
  const int n_block = static_cast<int>(blockIdx.x % n_blocks);
  const int64_t bhk = blockIdx.x / n_blocks;
  const int b = static_cast<int>(bhk / p.hkv);
  const int hk = static_cast<int>(bhk % p.hkv);
  const int j0 = n_block * BN;
  // Query rows that can see key j0 or later (i + 1 + shift > j0 under causal alignment); keys [0, row limit) of
  // row i pass: row_limit(i) = min(i + lim_shift, S).
  int i_begin = 0;
  const int shift = p.causal == Causal::LowerRight ? S - L : 0;
  if (p.causal != Causal::None) i_begin = min(max(j0 - shift, 0), L);
  const int lim_shift = p.causal == Causal::None ? S : 1 + shift;
  const int q_first = i_begin / BM;
  const int q_tiles = (L + BM - 1) / BM - q_first;
  const int steps = q_tiles > 0 ? G * q_tiles : 0;
  const bool has_mask = kGeneral && p.mask_kind == MaskKind::Bool;
  // A mask broadcast over rows (padding masks, (B, 1, 1, S)): one row of bits per tile, loaded by 8 threads.
  const bool one_row = has_mask && p.mask_st.r == 0;

  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(bar_full0 + 8 * st, 128);  // every producer thread, after its lse / Delta / mask-bit stores
      mbar_init(bar_empty0 + 8 * st, 8);   // one arrival per consumer warp
    }
    mbar_init(bar_kv, 1);
    for (int x = 0; x < Cfg::kRawBufs; ++x) mbar_init(bar_raw0 + 8 * x, 1);
    mbar_init_fence();
  }
  __syncthreads();

  if (tid >= NT) {
    // Producer warpgroup. It publishes the query tiles in order: (head, first row) in tile_of_stage, Q and dO by
    // TMA (thread 0), lse2 / Delta (threads 0..63, one row each) and the packed mask bits (general kind); a tile
    // that no element of the block may see is dropped here. A final head of -1 ends the stream.
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int ptid = tid - NT;
    if (ptid == 0) {
      mbar_expect_tx(bar_kv, 2 * KTile::kBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_4d(sK + c * KTile::kBlockBytes, &maps.k, bar_kv, c * 64, j0, hk, b);
        tma_load_4d(sV + c * KTile::kBlockBytes, &maps.v, bar_kv, c * 64, j0, hk, b);
      }
    }
    // Mask tile: thread ptid reads 16-byte chunk mc (keys 16 mc..) of tile rows r0, r0 + 1, r0 + 8, r0 + 9 with
    // r0 = 16 rq + 2t (t = ptid % 4, rq = ptid / 32): exactly the elements of one 16-byte slot of each of the 8
    // consumer threads (g = 0..7, t) of consumer warp mc (query rows r0 (+1, +8, +9) are those threads' columns;
    // keys g and g + 8 of the chunk their rows). Each slot is one 16-byte store; the 8 lanes of a store phase
    // (4 t x 2 warps) hit 8 different slots modulo 8 with the swizzle mask_slot (bit 2 ^= warp bit 0).
    const int mt = ptid & 3, mc = (ptid >> 2) & 7, rq = ptid >> 5;
    const int r0 = 16 * rq + 2 * mt;
    const int j = j0 + mc * 16;  // this thread's first key
    const unsigned char* mbase = static_cast<const unsigned char*>(p.mask) + static_cast<int64_t>(b) * p.mask_st.b + j;
    const int64_t mst_h = p.mask_st.h;
    // Bytes past S of this thread's chunk (0xff; zero in the loaded words), and how many bytes it copies.
    uint32_t oob[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (j + 4 * w + e >= S) oob[w] |= 0xffu << (8 * e);
    const int chunk_bytes = max(0, min(16, S - j));
    // Raw buffer slots of rows r0 and r0 + 1 (rows r0 + 8, r0 + 9: 8 rows further); chunk c of row r at c ^ (r % 8).
    const uint32_t raw_a = sRaw0 + r0 * BN + ((mc ^ (r0 & 7)) << 4);
    const uint32_t raw_b = sRaw0 + (r0 + 1) * BN + ((mc ^ ((r0 + 1) & 7)) << 4);
    // A mask broadcast over rows: every tile of a head is the same, so its any / full verdict is taken once per
    // head, and a full tile needs no loads (padding masks: every tile is full or empty). It is read from global
    // memory when needed; other masks stream through the raw buffers (kRawBufs), one step ahead.
    const bool staged = has_mask && !one_row;
    // Thread 0: the tile (head h, first row i0) into raw buffer buf by one tensor copy; rows past L and keys past S
    // are zero-filled, so that they read back as masked (no bounds test in the scan). Buffer buf was last read two
    // steps back, by every producer thread before its arrival at that step's barriers, which thread 0 has passed.
    const int mask_h = mst_h != 0, mask_b = p.mask_st.b != 0;  // broadcast dims: coordinate 0
    auto raw_copy = [&](int h, int i0, int buf) {
      mbar_expect_tx(bar_raw0 + 8 * buf, Cfg::kRawBytes);
      tma_load_4d(sRaw0 + buf * Cfg::kRawBytes, &maps.mask, bar_raw0 + 8 * buf, j0, i0, mask_h * h, mask_b * b);
    };
    // The tile of step s is (head hk G + s / q_tiles, row tile q_first + s % q_tiles): kept as (hs, qs), stepped
    // without divisions; (hn, qn) is the step after it, whose copy is issued one step ahead.
    int hs = hk * G, qs = q_first;
    if (staged && ptid == 0 && steps > 0) raw_copy(hs, qs * BM, 0);
    bool head_full = false;
    int n = 0;  // tiles published
    for (int step = 0; step < steps; ++step) {
      const int h = hs, i0 = qs * BM;
      const bool head_start = qs == q_first;
      int hn = hs, qn = qs + 1;
      if (qn * BM >= L) hn = hs + 1, qn = q_first;
      hs = hn, qs = qn;
      // lse / Delta of row i0 + ptid, loaded before the mask tile and the wait for a free stage so that their
      // latencies overlap.
      float row_lse = -INFINITY, row_delta = 0.f;
      if (ptid < BM && i0 + ptid < L) {
        const int64_t row = (static_cast<int64_t>(b) * p.hq + h) * p.L + i0 + ptid;
        row_lse = p.lse[row];
        row_delta = p.delta[row];
      }
      if (staged) {
        if (ptid == 0 && step + 1 < steps) raw_copy(hn, qn * BM, (step + 1) & 1);
        mbar_wait(bar_raw0 + 8 * (step & 1), (step >> 1) & 1);  // this step's tile is in (the (step / 2)-th use)
      }
      bool full = true;
      if (has_mask && (!one_row || head_start || !head_full)) {
        // (else: a full tile of a row-broadcast mask; nothing to read)
        // x[r][w]: bit 7 of byte e set iff key 16 mc + 4w + e of tile row r0 + (r & 1) + 8 (r >> 1) is allowed and in
        // bounds; the other bits are not looked at (the stores below replicate bit 7 over the byte). A bool tensor
        // holds bytes 0 and 1: x = q << 7, and the verdicts test bit 0 of the raw bytes. A byte above 1 (a mask
        // written through another dtype's view) shows in the OR of the raw words; the staged rows are then read again
        // and each byte tested for nonzero (bit 7 set iff its low 7 bits carry into bit 7 when added to 0x7f, or bit 7
        // is set itself; no carry crosses a byte). The row-broadcast path gives 0 / 1 bytes itself.
        uint32_t x[4][4];
        // Bit 0 of each byte: some element / every element (past S: passes; row-broadcast masks only, see below).
        uint32_t any_or = 0u, all_and = 0xffffffffu;
        const int rows_left = chunk_bytes > 0 ? L - i0 - r0 : 0;
        auto raw_row = [&](int r) {  // staged row r of this thread's chunk
          return *reinterpret_cast<const uint4*>(
              smem_ptr((r & 1 ? raw_b : raw_a) + (step & 1) * Cfg::kRawBytes + (r >> 1) * 8 * BN));
        };
        auto nonzero7 = [](uint32_t v) { return ((v & 0x7f7f7f7fu) + 0x7f7f7f7fu) | v; };
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int k = (r & 1) + 8 * (r >> 1);
          uint32_t q[4] = {0u, 0u, 0u, 0u};
          if (staged) {  // (rows past L and keys past S were zero-filled by the copy)
            const uint4 v = raw_row(r);
            q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
          } else {  // one row for all (mask_st.r == 0): read where it is
            if (rows_left > k) {
              const unsigned char* src = mbase + h * mst_h;
              if (chunk_bytes == 16) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
                q[0] = (nonzero7(v.x) >> 7) & 0x01010101u, q[1] = (nonzero7(v.y) >> 7) & 0x01010101u;
                q[2] = (nonzero7(v.z) >> 7) & 0x01010101u, q[3] = (nonzero7(v.w) >> 7) & 0x01010101u;
              } else {  // the block's last chunk, partly past S: the bytes inside only
#pragma unroll
                for (int w = 0; w < 4; ++w)
#pragma unroll
                  for (int e = 0; e < 4; ++e)
                    if (4 * w + e < chunk_bytes) q[w] |= static_cast<uint32_t>(src[4 * w + e] != 0) << (8 * e);
              }
            }
#pragma unroll
            for (int w = 0; w < 4; ++w) all_and &= q[w] | oob[w];
          }
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            x[r][w] = q[w] << 7;
            any_or |= q[w];
          }
        }
        if (staged && (any_or & 0xfefefefeu) != 0u) {
          any_or = 0u;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const uint4 v = raw_row(r);
            const uint32_t q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              x[r][w] = nonzero7(q[w]);
              any_or |= x[r][w] >> 7;
            }
          }
        }
        {  // into buffer n % kMaskBufs before the barriers (a dropped tile's is overwritten by the next)
          uint4* dst = reinterpret_cast<uint4*>(bits0 + (n % Cfg::kMaskRing) * (Cfg::kBitsBytes / 4)) + rq * 256;
          // Key g's slot: mask_slot(x0 + 4g) = x0 + 4 (g ^ flip) with flip = warp mc's bit 0 (x0 = 32 mc + mt), so
          // lanes of even and odd warps (one store phase) hit different bank groups; two bases for even / odd g.
          const int flip = mc & 1;
          uint4* dst_e = dst + mc * 32 + mt + 4 * flip;  // g even: x0 + 4g + 4 flip
          uint4* dst_o = dst + mc * 32 + mt - 4 * flip;  // g odd:  x0 + 4g - 4 flip
#pragma unroll
          for (int g = 0; g < 8; ++g) {
            // Key g (word g / 4, byte g % 4) and key g + 8 (word 2 + g / 4), 0xffff / 0 for each of the two rows of
            // a pair (the low half: the even row), bit 7 replicated (selectors 0x8..0xf).
            const uint32_t sel = (g & 3) * 0x1111u + 0xcc88u;
            const int w = g >> 2;
            (g & 1 ? dst_o : dst_e)[4 * g] =
                make_uint4(prmt(x[0][w], x[1][w], sel), prmt(x[0][2 + w], x[1][2 + w], sel),
                           prmt(x[2][w], x[3][w], sel), prmt(x[2][2 + w], x[3][2 + w], sel));
          }
        }
        // A tile with rows past L is never "full" (those rows read as masked): it only costs the consumers the
        // mask AND on the last row tile.
        if (!named_barrier_or(2, 128, (any_or & 0x01010101u) != 0u)) {  // no element of this tile may be seen: drop it
          if (one_row) {  // nor any tile of this head
            step += q_tiles - 1 - (i0 / BM - q_first);  // (then ++step: the next head's first tile)
            hs = h + 1, qs = q_first;
          }
          continue;
        }
        // Whether every element is allowed: only for a row-broadcast mask (it spares the loads of the head's other
        // tiles). A staged tile is handed to the consumers as not full: their AND is a few instructions inside the
        // exp2 loop, less than the second barrier and the reduction it would take here.
        full = one_row && named_barrier_and(2, 128, (all_and & 0x01010101u) == 0x01010101u);
        if (one_row && head_start) head_full = full;
      }
      const int st = n % kStages;
      if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
      if (ptid < BM) {
        float* lse2 = row_vals + st * 2 * BM;
        // A row with no allowed key (or past L) has P = 0: exp2(x - inf) = 0, never exp2(-inf + inf).
        lse2[ptid] = row_lse == -INFINITY ? INFINITY : row_lse * kLog2e;
        lse2[BM + ptid] = row_delta;
      }
      // Every thread arrives after its own stores (arrive releases them); thread 0's arrival also announces the
      // bytes the copies will deliver, so the phase completes once both are in.
      const uint32_t bar = bar_full0 + 8 * st;
      if (ptid == 0) {
        tile_of_stage[st] = make_int4(h, i0, full, 0);
        mbar_expect_tx(bar, Cfg::kStageBytes);
        const uint32_t dst = sQ0 + st * Cfg::kStageBytes;
#pragma unroll
        for (int c = 0; c < D / 64; ++c) {
          tma_load_4d(dst + c * QTile::kBlockBytes, &maps.q, bar, c * 64, i0, h, b);
          tma_load_4d(dst + QTile::kBytes + c * QTile::kBlockBytes, &maps.dout, bar, c * 64, i0, h, b);
        }
      } else {
        mbar_arrive(bar);
      }
      ++n;
    }
    const int st = n % kStages;
    if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);
    if (ptid == 0) tile_of_stage[st] = make_int4(-1, 0, 0, 0);
    mbar_arrive(bar_full0 + 8 * st);
    return;
  }

  setmaxnreg_inc<Cfg::kConsumerRegs>();
  if constexpr (D == 256) {
    bwd_sm90_consumer_d256<T, Cfg>(p, sK, sV, sQ0, sDs0, row_vals, bar_full0, bar_empty0, bar_kv, tile_of_stage, b, hk,
                                   j0, lim_shift);
    return;
  }
  const int wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  // This thread's accumulator rows (keys) in S^T / dP^T / dK / dV: key_r + 8 hf of the block.
  const int key_r = wg * 64 + wwarp * 16 + g;

  float acc_dk[D / 2], acc_dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  // Descriptors (K-major: leading offset unused, 8-row groups 1024 B apart; N/M-major: 64-column blocks
  // kBlockBytes apart, 8 k-rows 1024 B apart). Stage / buffer offsets are added to the address bits.
  const uint64_t k_desc = sw128_desc(sK + wg * 64 * 128, 16, 1024);  // this warpgroup's 64 keys, A of S^T
  const uint64_t v_desc = sw128_desc(sV + wg * 64 * 128, 16, 1024);
  const uint64_t q_desc = sw128_desc(sQ0, 16, 1024);                   // Q / dO as B of S^T / dP^T
  const uint64_t qt_desc = sw128_desc(sQ0, QTile::kBlockBytes, 1024);  // Q / dO as N-major B of dK / dV
  // dQ: A = dS^T (M-major), B = K (N-major), all 128 keys. By columns (d128): K columns 64 wg..; by turns (d64):
  // all 64 columns on every other step.
  constexpr bool kByTurns = Cfg::kDqByTurns;
  const uint64_t ds_desc = sw128_desc(sDs0, DsTile::kBlockBytes, 1024);
  const uint64_t kt_desc = sw128_desc(sK + (kByTurns ? 0 : wg * KTile::kBlockBytes), KTile::kBlockBytes, 1024);
  const int dq_c0 = kByTurns ? 0 : wg * 64;  // first dQ column of this warpgroup

  mbar_wait(bar_kv, 0);
  for (int n = 0;; ++n) {
    const int st = n % kStages;
    const uint32_t stage_off = (st * Cfg::kStageBytes) >> 4;
    mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
    const int4 tile = tile_of_stage[st];
    if (tile.x < 0) break;
    const int h = tile.x, i0 = tile.y;
    float s[32], dp[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<64, T>(s, k_desc + koff, q_desc + stage_off + qoff, kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<64, T>(dp, v_desc + koff, q_desc + stage_off + ((QTile::kBytes) >> 4) + qoff, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(s);
    reg_fence(dp);

    // Causal / bounds: only tiles where some key of the block reaches past the first row's limit (or past S: K is
    // zero-filled there, S^T = 0, and P would not be).
    const bool cross = j0 + BN > S || (p.causal != Causal::None && j0 + BN - 1 >= i0 + lim_shift);
    if (cross) {
#pragma unroll
      for (int nn = 0; nn < 8; ++nn)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lim = min(i0 + nn * 8 + 2 * t + e + lim_shift, S);
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            if (j0 + key_r + 8 * hf >= lim) s[nn * 4 + hf * 2 + e] = -INFINITY;
        }
    }
    const float* lse2 = row_vals + st * 2 * BM;
    uint32_t pa[4][4], da[4][4];
    // Bool mask (general kind, a tile not wholly allowed; bounds included): P^T and dS^T are 0 where it is clear
    // (whatever exp2 gave there, inf included). The mask words of k16 step c are loaded before its exp2s, so that
    // their latency hides behind them: loaded where they were used, after all the exp2s, the loads sat on the path
    // to the dS^T stores; all 16 words loaded before the exp2s spilled 5 registers there.
    const bool masked = has_mask && !tile.z;
    const uint4* mw =
        reinterpret_cast<const uint4*>(bits0 + (n % Cfg::kMaskRing) * (Cfg::kBitsBytes / 4)) + mask_slot(tid);
    uint4 mword = make_uint4(~0u, ~0u, ~0u, ~0u);
#pragma unroll
    for (int nn = 0; nn < 8; ++nn) {
      if (has_mask && (nn & 1) == 0 && masked) mword = mw[256 * (nn >> 1)];
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
      // A fragment of k16 step nn / 2: (row g, queries 2t..) in registers 0 / 2, (row g + 8, ..) in 1 / 3.
      // Word r of the step's mask masks register r.
      const uint32_t m_lo = (nn & 1) ? mword.z : mword.x, m_hi = (nn & 1) ? mword.w : mword.y;
      pa[nn >> 1][(nn & 1) * 2] = pack2<T>(pr[0], pr[1]);
      pa[nn >> 1][(nn & 1) * 2 + 1] = pack2<T>(pr[2], pr[3]);
      da[nn >> 1][(nn & 1) * 2] = pack2<T>(ds[0], ds[1]);
      da[nn >> 1][(nn & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
      if (has_mask) {
        pa[nn >> 1][(nn & 1) * 2] &= m_lo;
        pa[nn >> 1][(nn & 1) * 2 + 1] &= m_hi;
        da[nn >> 1][(nn & 1) * 2] &= m_lo;
        da[nn >> 1][(nn & 1) * 2 + 1] &= m_hi;
      }
    }
    // dS^T to shared memory (buffer n % 2): row key_r + 8 hf, 16-byte chunk nn (queries 8nn..) swizzled by the
    // row % 8 = g; the 8 rows x 4 words of a warp's store hit 32 different banks.
    const uint32_t ds_buf = sDs0 + (n & 1) * DsTile::kBytes;
#pragma unroll
    for (int nn = 0; nn < 8; ++nn)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const uint32_t addr = ds_buf + (key_r + 8 * hf) * 128 + ((nn ^ g) << 4) + 4 * t;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[nn >> 1][(nn & 1) * 2 + hf]) : "memory");
      }
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
    // Both consumers' dS^T is in (id 1: this kernel's named barrier; 0 is __syncthreads').
    named_barrier(1, NT);
    float dq[32];
    // By turns: the other consumer's step. Decided after the wait for dV / dK (a branch between a wgmma's issue
    // and its wait makes ptxas serialize every wgmma of the kernel, C7514).
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
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t off = (kk * 16 * 128) >> 4;
        wgmma_ss_tt<64, T>(dq, ds_desc + ds_off + off, kt_desc + off, kk > 0);
      }
      wgmma_commit();
    }
    wgmma_wait<0>();
    reg_fence(acc_dv);
    reg_fence(acc_dk);
    reg_fence(dq);
    reg_fence_u32(pa);
    reg_fence_u32(da);
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty0 + 8 * st);  // this warp is done with the stage's Q / dO / lse / Delta
    if (!my_dq) continue;

    // dQ rows i0 + 16 wwarp + g + 8 hf, columns dq_c0 + 8 nn + 2t: float2 atomics. (float4 atomics after one
    // shuffle per 8 columns halve the atomic instructions but not the L2 sectors; measured slower.)
    add_dq_rows16<8>(p, dq, static_cast<int64_t>(b) * p.hq + h, i0 + wwarp * 16, dq_c0, g, t);
  }

  // dK (scaled) and dV of this thread's keys.
  store_dkdv<T, D / 8>(p, acc_dk, acc_dv, b, hk, j0 + key_r, 0, t, p.S, p.E, p.Ev);
#endif
}

}  // namespace cuda
}  // namespace sdpax
