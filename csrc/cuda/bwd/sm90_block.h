// The Hopper backward's shared pieces: its configuration (BwdSm90Cfg), the host-encoded tensor maps, its named
// barriers, and the block context (BwdSm90Block) that the producer (sm90_producer.h) and the consumers
// (sm90_consumer.h, sm90_consumer_d256.h) share: the call, the shared-memory layout and the block's keys and query
// tiles.
#pragma once
#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; no driver call is made from here)

#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/prims/sync.h"
#include "cuda/prims/wgmma.h"
#include "cuda/tiles.h"

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
  static_assert(D != 256 || !kGeneral, "d256: the plain kind only (sm90_consumer_d256.h)");
  // Keys per block: two consumer warpgroups of 64 (d64 / d128); d256: 64 keys shared by both consumers, each
  // holding dK / dV of half the head dim (sm90_consumer_d256.h).
  static constexpr int kBN = tiles::bwd_sm90_bn(D);
  static constexpr int kBM = tiles::kBwdSm90BM;   // queries per step: the n of S^T / dP^T and the k extent of dK / dV
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = kConsumers + 128;
  // setmaxnreg moves registers between the warpgroups inside the block's launch allocation, 168 per thread
  // (65536 / 384 rounded down to 8) x 384 = 64512: 2 x 128 x 240 + 128 x 24 for the plain kind, 2 x 128 x 232 +
  // 128 x 40 for the general kind (its producer expands the mask: it spills there, off the consumers' path, since it
  // runs two tiles ahead; 224 / 64 spills 3 values into the consumers' loop). A split above the allocation
  // (232 / 48 = 65536) never returns from the consumers' setmaxnreg.inc: the kernel hangs.
  static constexpr int kConsumerRegs = kGeneral ? 232 : 240, kProducerRegs = kGeneral ? 40 : 24;
  static_assert(setmaxnreg_fits(kThreads, kConsumers, kConsumerRegs, kProducerRegs),
                "setmaxnreg split exceeds the block's register allocation");
  // dQ split between the consumers (sm90_consumer.h): by columns at d128, by turns at d64.
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
  // four row loads of a tile are four L2 round trips on the producer's path: the consumers waited for a full stage
  // 40% of the time with a dense bool mask.)
  static constexpr int kRawBytes = kGeneral ? kBM * kBN : 0;
  static constexpr int kRawBufs = kGeneral ? 2 : 0;
  // K, V, the Q / dO stages, two dS^T buffers (a consumer writes step n + 1's while the other may still read step n's:
  // one barrier per step suffices), lse2 / Delta per stage (64 floats each), kMaskBufs mask buffers, kRawBufs raw mask
  // buffers, mbarriers and the (head, first row, full) of each stage, and 1024 bytes of slack for the alignment of the
  // swizzle atoms.
  static constexpr int kBarBytes = (2 * kStages + 2) * 8 + kStages * 16 + kRawBufs * 8;
  // dS^T buffers; d256 adds two P^T buffers after them (sm90_consumer_d256.h).
  static constexpr int kDsBuffers = D == 256 ? 4 : 2;
  static constexpr int kSmem = 2 * KTile::kBytes + kStages * kStageBytes + kDsBuffers * DsTile::kBytes +
                               kStages * 2 * kBM * 4 + kMaskBufs * kBitsBytes + kRawBufs * kRawBytes + kBarBytes +
                               1024;
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
};

// Named barrier ids of the Hopper backward (0 is __syncthreads').
enum BwdSm90Barrier : int {
  kBwdBarConsumers = 1,  // both consumer warpgroups: every dS^T (d256: and P^T) of the step is in shared memory
  kBwdBarProducer = 2,   // producer warpgroup: the verdicts on a bool mask tile (some / every element allowed)
};

// 16-byte slot of consumer thread x in each quarter of a stage's mask (see kBitsBytes): bit 2 flipped in odd warps,
// so that the producer's stores of one phase (lanes t = 0..3 of two adjacent warps) hit 8 different bank groups.
__device__ __forceinline__ int mask_slot(int x) { return x ^ ((x >> 3) & 4); }

// What the producer and the consumer warpgroups of one block share: the call, the shared-memory layout and the
// block's keys. One block per (key block of BN keys, batch, kv head); it walks the G query heads of the GQA group
// and their query tiles of BM rows that can see one of its keys: step s is head hk G + s / q_tiles, query tile
// q_first + s % q_tiles.
template <class T, int D, bool kGeneral>
struct BwdSm90Block {
  using Cfg = BwdSm90Cfg<D, kGeneral>;
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  using DsTile = typename Cfg::DsTile;
  static constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kConsumers, kStages = Cfg::kStages;

  const AttnParams& p;
  const BwdTmaMaps& maps;
  unsigned char* smem;
  uint32_t sK, sV;        // K and V of the block
  uint32_t sQ0;           // stage s: Q at sQ0 + s kStageBytes, dO QTile::kBytes after it
  uint32_t sDs0;          // dS^T buffer x at sDs0 + x DsTile::kBytes
  uint32_t sRow0;         // stage s: lse2 at + s 2 BM floats, Delta BM floats after it
  uint32_t sBits0;        // consumers' mask words of buffer x at + x kBitsBytes (general kind)
  uint32_t sRaw0;         // producer's raw mask buffer x at + x kRawBytes (general kind)
  uint32_t bar_full0, bar_empty0;  // full / empty barrier of stage s at + 8 s
  uint32_t bar_kv;        // K and V are in
  float* row_vals;        // sRow0
  uint32_t* bits0;        // sBits0
  int4* tile_of_stage;    // (head, first row, every element allowed (general kind), -) of stage s; head -1: the end
  uint32_t bar_raw0;      // full barrier of raw mask buffer x at + 8 x

  int tid;
  int G, L, S;
  int b, hk, j0;          // batch, kv head, first key
  int lim_shift;          // keys [0, min(i + lim_shift, S)) of query row i pass causal / bounds
  int q_first, q_tiles, steps;
  bool has_mask;          // a bool mask (general kind)
  bool one_row;           // a mask broadcast over rows (padding masks, (B, 1, 1, S)): one row of bits per tile

  __device__ __forceinline__ BwdSm90Block(const AttnParams& p_, const BwdTmaMaps& maps_, unsigned char* smem_)
      : p(p_), maps(maps_), smem(smem_) {
    sK = (smem_u32(smem) + 1023u) & ~1023u;
    sV = sK + KTile::kBytes;
    sQ0 = sV + KTile::kBytes;
    sDs0 = sQ0 + kStages * Cfg::kStageBytes;
    sRow0 = sDs0 + Cfg::kDsBuffers * DsTile::kBytes;
    sBits0 = sRow0 + kStages * 2 * BM * 4;
    sRaw0 = sBits0 + Cfg::kMaskBufs * Cfg::kBitsBytes;
    bar_full0 = sRaw0 + Cfg::kRawBufs * Cfg::kRawBytes;
    bar_empty0 = bar_full0 + kStages * 8;
    bar_kv = bar_empty0 + kStages * 8;
    row_vals = reinterpret_cast<float*>(ptr(sRow0));
    bits0 = reinterpret_cast<uint32_t*>(ptr(sBits0));
    tile_of_stage = reinterpret_cast<int4*>(ptr(bar_kv + 16));
    bar_raw0 = bar_kv + 16 + kStages * 16;

    tid = threadIdx.x;
    G = static_cast<int>(p.hq / p.hkv);
    L = static_cast<int>(p.L), S = static_cast<int>(p.S);
    const int n_blocks = (S + BN - 1) / BN;
    const int n_block = static_cast<int>(blockIdx.x % n_blocks);
    const int64_t bhk = blockIdx.x / n_blocks;
    b = static_cast<int>(bhk / p.hkv);
    hk = static_cast<int>(bhk % p.hkv);
    j0 = n_block * BN;
    // Query rows that can see key j0 or later: i + 1 + shift > j0 under causal alignment.
    int i_begin = 0;
    const int shift = p.causal == Causal::LowerRight ? S - L : 0;
    if (p.causal != Causal::None) i_begin = min(max(j0 - shift, 0), L);
    lim_shift = p.causal == Causal::None ? S : 1 + shift;
    q_first = i_begin / BM;
    q_tiles = (L + BM - 1) / BM - q_first;
    steps = q_tiles > 0 ? G * q_tiles : 0;
    has_mask = kGeneral && p.mask_kind == MaskKind::Bool;
    one_row = has_mask && p.mask_st.r == 0;
  }

  // The generic pointer of shared-memory address addr.
  __device__ __forceinline__ unsigned char* ptr(uint32_t addr) const { return smem + (addr - smem_u32(smem)); }

  // A consumer's wait for the n-th query tile the producer hands out, in stage st = n % kStages: false when the
  // stream has ended (head -1), else tile is its tile_of_stage entry.
  __device__ __forceinline__ bool next_tile(int n, int& st, int4& tile) const {
    st = n % kStages;
    mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
    tile = tile_of_stage[st];
    return tile.x >= 0;
  }

  // Whether the query tile from row i0 crosses the causal limit or the end of the keys somewhere in this block.
  __device__ __forceinline__ bool crosses(int i0) const {
    return j0 + BN > S || (p.causal != Causal::None && j0 + BN - 1 >= i0 + lim_shift);
  }

  // This warp is done with stage st (its Q / dO / lse / Delta): one of the 8 arrivals (one per consumer warp) the
  // stage's empty barrier waits for.
  __device__ __forceinline__ void release_stage(int st, int lane) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty0 + 8 * st);
  }

  // Thread 0, before anyone waits on them.
  __device__ __forceinline__ void init_barriers() const {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(bar_full0 + 8 * st, 128);  // every producer thread, after its lse / Delta / mask-bit stores
      mbar_init(bar_empty0 + 8 * st, 8);   // one arrival per consumer warp
    }
    mbar_init(bar_kv, 1);
    for (int x = 0; x < Cfg::kRawBufs; ++x) mbar_init(bar_raw0 + 8 * x, 1);
    mbar_init_fence();
  }
};

}  // namespace cuda
}  // namespace sdpax
