// The Hopper forward's shared pieces: its configuration (FwdSm90Cfg), the host-encoded tensor maps and work
// decomposition it is launched with, its named barriers, and the block context (FwdSm90Block) that the producer
// (sm90_producer.h) and the consumers (sm90_consumer.h) share: the call, the shared-memory layout, and the row
// block in progress.
#pragma once
#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; no driver call is made from here)

#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/prims/sync.h"
#include "cuda/prims/wgmma.h"
#include "cuda/tiles.h"

namespace sdpax {
namespace cuda {

// Tensor maps of K and V (4-D: head-dim column, key, kv head, batch; boxes of 64 columns x BN keys, 128-byte
// swizzle), encoded by the host (launch_sm90.h) for the TMA producer; and (general kind, FwdSm90Work::mask_tma) the
// bool mask as bytes (key, row, head, batch; a broadcast head or batch dim has size 1), boxes of BN keys x BM rows.
struct FwdTmaMaps {
  CUtensorMap k, v, mask;
};

// The row blocks a thread block computes: work units u = blockIdx.x, blockIdx.x + gridDim.x, ... < units. A unit is
// one row block (pair = 0: the unit index read as fwd_block reads blockIdx.x, heaviest causal block of each (batch,
// KV head) first), or (pair = 1) the two row blocks m_blocks - 1 - j and j of one (batch, KV head): under causal
// masking with L = S every pair holds m_blocks + 1 key tiles, so a persistent grid (one block per SM walking the
// units round robin) stays balanced without a work queue. The launch (launch_sm90.h) picks: pairs on a persistent
// grid for the kinds with kMulti, one unit per block otherwise.
struct FwdSm90Work {
  int units, pair;
  int mask_tma;  // the mask map is encoded: row blocks within one head load their mask tile by one tensor copy
};

template <int D, FwdKind kKind>
struct FwdSm90Cfg {
  static_assert(kKind == FwdKind::Plain || kKind == FwdKind::General,
                "the sm90 main loop implements the plain and general kinds");
  static constexpr bool kGeneral = kKind == FwdKind::General;
  static constexpr int kWG = 2;  // warpgroups of 64 rows
  static constexpr int kBM = tiles::kFwdSm90BM;
  static_assert(kBM == 64 * kWG, "tiles.h: one 64-row slice per consumer warpgroup");
  // Keys per tile: the n of S's wgmma and the k extent of P V (tiles.h). 128 keys rather than 64: 64-key tiles
  // halve the tensor work per tile while the per-tile costs stay, and S's wgmma n64 reads Q from shared memory as
  // fast as it computes. d256 (64 keys): 64 + 4 x 32 KB of Q and K/V stages; the general kind adds 2 x 2 KB of
  // packed mask and 3 x 8 KB of scan slots, 220 KB.
  static constexpr int kBN = tiles::fwd_sm90_bn(D);
  // The consumer warpgroups plus a producer warpgroup: one thread of it streams K/V through the bulk tensor copy
  // engine (TMA); with a staged mask, all of it loads the mask tile first and drops tiles no row may see.
  static constexpr int kConsumers = 128 * kWG;
  static constexpr int kThreads = kConsumers + 128;
  // Registers move from the producer warpgroup to the consumers (setmaxnreg): 2 x 128 x 240 + 128 x 24 <= 64K;
  // the general kind's producer keeps 40 for the mask scan (2 x 128 x 232 + 128 x 40).
  static constexpr int kConsumerRegs = kGeneral ? 232 : 240, kProducerRegs = kGeneral ? 40 : 24;
  // (The split must fit the launch allocation, 168 x 384 registers: a larger one hangs in setmaxnreg.inc.)
  static_assert(setmaxnreg_fits(kThreads, kConsumers, kConsumerRegs, kProducerRegs),
                "setmaxnreg split exceeds the block's register allocation");
  // Stages per ring (K and V alike): K(j + 1) and V(j) are in use during step j, the rest landing. Two stages of
  // each give every load one step to land; the general kind at d128 has room for no more beside its mask buffers.
  static constexpr int kStages = (kGeneral && D == 128) || D == 256 ? 2 : 3;
  // Bool mask, packed by the producer: per K stage and row, four 32-bit words in key order (bit k of word w = key
  // 32w + k of the tile): one 16-byte load per row and tile; each consumer thread shifts its keys into place.
  // 64-key tiles (d256) use words 0 and 1 and leave 2 and 3 zero (the same layout, one code path).
  static_assert(!kGeneral || kBN == 128 || kBN == 64, "the packed mask layout holds at most 128 keys per row");
  static constexpr int kBitsBytes = kGeneral ? kBM * 16 : 0;
  // Several row blocks per thread block (FwdSm90Work): the plain kind at d64. Short sequences (L = 1k causal: 4.5
  // key tiles of 4 MFLOP per row block on average) spent ~40% of a block's time on its fixed costs (launch, barrier
  // set-up, the Q and first K/V latency, the epilogue) with nothing else on the SM, one block per SM. A persistent
  // block streams K/V of its next row block while it finishes the current one, and loads the next Q (a second Q
  // buffer, 16 KB at d64) a whole row block ahead. (d128 has no room for a second Q beside three K/V stages.)
  static constexpr bool kMulti = !kGeneral && D == 64;
  static constexpr int kQBufs = kMulti ? 2 : 1;
  // The producer's raw mask tiles (BM rows of BN bytes, cp.async), a ring of three scan slots.
  static constexpr int kScanBytes = kGeneral ? kBM * kBN : 0;
  using QTile = Sw128Tile<kBM, D>;
  using KTile = Sw128Tile<kBN, D>;  // K and V stages share the layout
  // + 1024: the dynamic shared-memory base is rounded up to the 1024-byte alignment the swizzle atoms need.
  // full / empty mbarriers per stage of each ring, and the key-tile index each K stage holds (-1: no more tiles).
  // (+ the general kind: a full barrier per scan slot, for the tensor copies of the mask)
  static constexpr int kBarBytes = 4 * kStages * 8 + ((4 * kStages + 7) & ~7) + (kGeneral ? 3 * 8 : 0);
  static constexpr int kSmem = kQBufs * QTile::kBytes + kStages * (2 * KTile::kBytes + kBitsBytes) + 3 * kScanBytes +
                               kBarBytes + 1024;
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
};

// Named barrier ids of the Hopper forward (0 is __syncthreads').
enum FwdSm90Barrier : int {
  kBarProducerAny = 1,    // producer warpgroup: does any row of the block see this mask tile
  kBarConsumersQ = 2,     // both consumer warpgroups: the Q tile is in (one row block per thread block)
  kBarProducerRow = 3,    // producer warpgroup: the one shared mask row of a row-broadcast mask is in
  kBarWarpgroup0 = 4,     // + consumer warpgroup index: that warpgroup's own Q rows are in (kMulti)
};

// What the producer and the consumer warpgroups of one thread block share: the call, the shared-memory layout
// (Q buffers, the K and V rings, the packed mask stages, the producer's scan slots, the barriers), the thread's
// coordinates, and the row block in progress (the first one until a role's loop moves on; only kMulti moves on).
template <class T, int D, FwdKind kKind>
struct FwdSm90Block {
  using Cfg = FwdSm90Cfg<D, kKind>;
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  static constexpr bool kGeneral = Cfg::kGeneral;
  static constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kConsumers, kStages = Cfg::kStages;

  const AttnParams& p;
  const FwdTmaMaps& maps;
  const FwdSm90Work& work;
  unsigned char* smem;
  uint32_t sQ;          // Q buffer x at sQ + x * QTile::kBytes
  uint32_t sK0, sV0;    // K / V stage s at sK0 / sV0 + s * KTile::kBytes
  uint32_t sM0;         // packed mask of K stage s at sM0 + s * kBitsBytes
  const unsigned char* smem_m0;
  uint32_t sScan0;      // producer's scan slot x at sScan0 + x * kScanBytes
  uint32_t bar_full0, bar_empty0;    // full / empty barrier of K stage s at + 8 s
  uint32_t bar_vfull0, bar_vempty0;  // full / empty barriers of V stage s
  int* tile_of_stage;   // the key tile each K stage holds (-1: no more tiles)
  uint32_t bar_scan0;   // scan slot x's full barrier at + 8 x (tensor copies of the mask)

  int tid, wg, wwarp, lane, g, t;
  int G, L, rows, m_blocks, n_pairs;
  FwdBlock blk;  // the row block in progress, and its fields
  int64_t b;
  int hk, m0, n_full, lo_full, t_begin, t_end;  // lo_full: FwdBlock's (a sliding window, plain kind only)
  int E, Ev;
  bool has_mask;
  // A bool mask whose rows are 16-byte aligned is loaded by the producer (cp.async), a key tile that no row of the
  // block may see is skipped, and the rest reach the consumers packed to bits; other masks are read element by
  // element in the softmax.
  bool mask_staged;
  Dropout drop;
  bool has_dropout;

  __device__ __forceinline__ FwdSm90Block(const AttnParams& p_, const FwdTmaMaps& maps_, const FwdSm90Work& work_,
                                          unsigned char* smem_)
      : p(p_), maps(maps_), work(work_), smem(smem_) {
    sQ = (smem_u32(smem) + 1023u) & ~1023u;
    sK0 = sQ + Cfg::kQBufs * QTile::kBytes;
    sV0 = sK0 + kStages * KTile::kBytes;
    sM0 = sV0 + kStages * KTile::kBytes;
    smem_m0 = smem + (sM0 - smem_u32(smem));
    sScan0 = sM0 + kStages * Cfg::kBitsBytes;
    // Packed mask stages, then the producer's three mask scan slots, then the barriers.
    bar_full0 = sScan0 + 3 * Cfg::kScanBytes;
    bar_empty0 = bar_full0 + kStages * 8;
    bar_vfull0 = bar_empty0 + kStages * 8;
    bar_vempty0 = bar_vfull0 + kStages * 8;
    tile_of_stage = reinterpret_cast<int*>(smem + (bar_vempty0 + kStages * 8 - smem_u32(smem)));
    bar_scan0 = bar_vempty0 + kStages * 8 + ((4 * kStages + 7) & ~7);

    tid = threadIdx.x, wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    G = static_cast<int>(p.hq / p.hkv);
    L = static_cast<int>(p.L);
    rows = G * L;
    m_blocks = (rows + BM - 1) / BM, n_pairs = (m_blocks + 1) / 2;
    blk = block_of(blockIdx.x, 0);
    b = blk.b;
    hk = blk.hk, m0 = blk.m0, n_full = blk.n_full, lo_full = blk.lo_full, t_begin = blk.t_begin, t_end = blk.t_end;
    E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);

    has_mask = kGeneral && p.mask_kind != MaskKind::None;
    mask_staged = has_mask && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 &&
                  reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && p.mask_st.r % 16 == 0 && p.mask_st.h % 16 == 0 &&
                  p.mask_st.b % 16 == 0;
    drop = Dropout{};
    has_dropout = kGeneral && p.dropout_p > 0.0;
    if (has_dropout) drop.init(p);
  }

  // Row block k (0, or 1 for the light half of a pair) of work unit u, and the row blocks of unit u.
  __device__ __forceinline__ FwdBlock block_of(int u, int k) const {
    if (!Cfg::kMulti || !work.pair) return fwd_block_at(p, rows, BM, BN, m_blocks - 1 - u % m_blocks, u / m_blocks);
    const int j = u % n_pairs;
    return fwd_block_at(p, rows, BM, BN, k == 0 ? m_blocks - 1 - j : j, u / n_pairs);
  }
  __device__ __forceinline__ int items_of(int u) const {
    return Cfg::kMulti && work.pair && 2 * (u % n_pairs) + 1 != m_blocks ? 2 : 1;
  }
  // The next work item (unit u, row block k of it) of this thread block.
  __device__ __forceinline__ void advance(int& u, int& k) const {
    if (++k == items_of(u)) {
      k = 0;
      u += gridDim.x;
    }
  }

  // Thread 0, before anyone waits on them.
  __device__ __forceinline__ void init_barriers() const {
    for (int st = 0; st < kStages; ++st) {
      // The producer's arrive(.expect_tx) (the copies complete the bytes); with a packed mask, one arrival per
      // producer thread, each after writing its row's bits.
      mbar_init(bar_full0 + 8 * st, mask_staged ? 128 : 1);
      mbar_init(bar_empty0 + 8 * st, 2 * 4);  // one arrival per consumer warp
      mbar_init(bar_vfull0 + 8 * st, 1);
      mbar_init(bar_vempty0 + 8 * st, 2 * 4);
    }
    if (kGeneral)
      for (int x = 0; x < 3; ++x) mbar_init(bar_scan0 + 8 * x, 1);
    mbar_init_fence();
  }
};

}  // namespace cuda
}  // namespace sdpax
