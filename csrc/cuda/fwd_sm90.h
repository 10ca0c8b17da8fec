// Hopper (sm90a) forward main loop: the same attention as fwd_kernel.h (row packing for GQA, causal tile skipping,
// masks, dropout, sinks, split keys, the fully-masked-row guard, the epilogue), with both matrix products on wgmma.
//
// One block computes BM = 128 rows of one (batch, kv head) with three warpgroups:
//   consumers (warpgroups 0, 1: rows 64w..64w+63), per key tile:
//     S = Q K^T     wgmma m64 n(BN) k16, Q and K from 128-byte-swizzled shared memory (K-major descriptors)
//     online softmax on S in registers (scale, causal bound, mask, running max / sum, dropout)
//     O += P V      wgmma m64 n(D) k16, P from registers (the S accumulators rounded to 16 bits are P's A
//                   fragments), V from shared memory as the N-major (transposed) B operand: V is stored
//                   [key][head dim] exactly like K, no transpose is ever written.
//   producer (warpgroup 2): streams K and V tiles through TMA into two rings of stages (K, V), each stage guarded
//     by full/empty mbarriers: K(j) is released once S(j) is done, V(j) once P(j) V(j) is, so a K stage frees one
//     step earlier than a joint K/V stage would (two stages of each give a tile a whole step to land, which is what
//     lets the general kind keep 128-key tiles at d128 beside its mask buffers); with a bool mask it also loads the
//     mask tile (cp.async), drops tiles that no row may see and hands the consumers the rest packed to one bit per
//     element (causal and bounds included), with the K stage.
// Within a consumer, the softmax of tile j + 1 runs while the tensor cores compute P(j) V(j).
// The plain kind at d64 (kMulti) runs a persistent grid: each block walks pairs of row blocks (FwdSm90Work) as one
// pipeline, so short sequences no longer pay a block's launch, set-up, Q / first K/V latency and drain per 128 rows.
//
// The kernel body exists only in the sm_90a compilation (SDPAX_SM90A_DEVICE); the host launches it only on
// compute capability 9.x when the build contains sm_90a (launch.cu).
#pragma once
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/prims/sync.h"
#include "cuda/prims/tma.h"
#include "cuda/prims/wgmma.h"

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; no driver call is made from here)

#include <type_traits>

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

template <class T, int D, FwdKind kKind>
__global__ void __launch_bounds__(FwdSm90Cfg<D, kKind>::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ FwdTmaMaps maps,
                    const __grid_constant__ FwdSm90Work work) {
#ifdef SDPAX_SM90A_DEVICE
  using Cfg = FwdSm90Cfg<D, kKind>;
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  constexpr bool kGeneral = Cfg::kGeneral;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kConsumers, kStages = Cfg::kStages;
  constexpr int kPathDefault = 0, kPathDropout = 1, kPathElementwise = 2;  // softmax paths (main_loop below)
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sK0 = sQ + Cfg::kQBufs * QTile::kBytes;  // Q buffer x at sQ + x * QTile::kBytes; K stage s at
                                                          // sK0 + s * KTile::kBytes
  const uint32_t sV0 = sK0 + kStages * KTile::kBytes;    // V stage s at sV0 + s * KTile::kBytes
  const uint32_t sM0 = sV0 + kStages * KTile::kBytes;    // packed mask of K stage s at sM0 + s * kBitsBytes
  const unsigned char* smem_m0 = smem + (sM0 - smem_u32(smem));
  const uint32_t sScan0 = sM0 + kStages * Cfg::kBitsBytes;  // producer's scan slot x at sScan0 + x * kScanBytes
  // Packed mask stages, then the producer's three mask scan slots, then the barriers.
  const uint32_t bar_full0 = sScan0 + 3 * Cfg::kScanBytes;  // full barrier of K stage s at bar_full0 + 8 s
  const uint32_t bar_empty0 = bar_full0 + kStages * 8;       // empty barrier of K stage s
  const uint32_t bar_vfull0 = bar_empty0 + kStages * 8;      // full / empty barriers of V stage s
  const uint32_t bar_vempty0 = bar_vfull0 + kStages * 8;
  int* tile_of_stage = reinterpret_cast<int*>(smem + (bar_vempty0 + kStages * 8 - smem_u32(smem)));
  const uint32_t bar_scan0 = bar_vempty0 + kStages * 8 + ((4 * kStages + 7) & ~7);  // scan slot x's: + 8 x

  const int tid = threadIdx.x, wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L);
  const int rows = G * L;
  const int m_blocks = (rows + BM - 1) / BM, n_pairs = (m_blocks + 1) / 2;
  // Row block k (0, or 1 for the light half of a pair) of work unit u, and the row blocks of unit u.
  auto block_of = [&](int u, int k) -> FwdBlock {
    if (!Cfg::kMulti || !work.pair) return fwd_block_at(p, rows, BM, BN, m_blocks - 1 - u % m_blocks, u / m_blocks);
    const int j = u % n_pairs;
    return fwd_block_at(p, rows, BM, BN, k == 0 ? m_blocks - 1 - j : j, u / n_pairs);
  };
  auto items_of = [&](int u) { return Cfg::kMulti && work.pair && 2 * (u % n_pairs) + 1 != m_blocks ? 2 : 1; };
  // The row block in progress (the first one until a role's loop moves on; the general kind has only one).
  FwdBlock blk = block_of(blockIdx.x, 0);
  int64_t b = blk.b;
  int hk = blk.hk, m0 = blk.m0, n_full = blk.n_full, t_begin = blk.t_begin, t_end = blk.t_end;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);

  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  // A bool mask whose rows are 16-byte aligned is loaded by the producer (cp.async), a key tile that no row of the
  // block may see is skipped, and the rest reach the consumers packed to bits; other masks are read element by
  // element in the softmax.
  const bool mask_staged = has_mask && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 &&
                           reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && p.mask_st.r % 16 == 0 &&
                           p.mask_st.h % 16 == 0 && p.mask_st.b % 16 == 0;
  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);

  const bool producer = tid >= NT;  // the producer warpgroup follows the consumer warpgroups
  if (tid == 0) {
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
  __syncthreads();  // barriers initialised before anyone waits on them
  if (producer) {
    // The producer warpgroup publishes the block's key tiles in order: tile index in tile_of_stage, K and V through
    // TMA (one thread), the staged mask through cp.async (all 128; a tile no row of the block may see is dropped
    // here and never reaches the consumers). The n-th published tile goes to stage n % kStages of each ring once the
    // consumers have released that stage's previous tile; a final -1 (K ring only) tells them the stream has ended.
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int ptid = tid - NT;
    int n = 0;  // tiles published
    auto publish_k = [&](int tile, int st) {  // one thread: K of `tile` into K stage st, completing its full barrier
      tile_of_stage[st] = tile;
      mbar_expect_tx(bar_full0 + 8 * st, KTile::kBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        tma_load_4d(sK0 + st * KTile::kBytes + c * KTile::kBlockBytes, &maps.k, bar_full0 + 8 * st, c * 64,
                    tile * BN, hk, static_cast<int>(b));
    };
    auto publish_v = [&](int tile, int st, int n) {  // one thread: V of the n-th published tile into V stage st
      if (n >= kStages) mbar_wait(bar_vempty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
      mbar_expect_tx(bar_vfull0 + 8 * st, KTile::kBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        tma_load_4d(sV0 + st * KTile::kBytes + c * KTile::kBlockBytes, &maps.v, bar_vfull0 + 8 * st, c * 64,
                    tile * BN, hk, static_cast<int>(b));
    };
    if (kGeneral && mask_staged) {
      // Producer thread ptid owns packed row m0 + ptid. Its raw mask tiles stream through a ring of three scan
      // slots, two tiles ahead of the one being decided, so their latency hides behind the scan and the wait for
      // a free stage; each thread loads and reads only its own row, so no barrier is needed between those steps.
      // The bits include causal / bounds: by cp.async, bytes past the row's limit are never loaded (zero-filled); by
      // tensor copy (below), they are cleared from the packed words.
      constexpr int kChunks = BN / 16;
      constexpr bool kTmaMask = BN == 128;  // (64-key tiles, d256: rows 64 bytes apart, their own swizzle: cp.async)
      // A row's 16-byte chunk c sits at chunk c ^ (row % 8) of its slot row: the 8 threads of a quarter warp then
      // read (and cp.async writes) 8 different bank groups instead of one (rows are 128 bytes apart). 64-key
      // tiles (d256): chunk c ^ (row % 4), rows 64 bytes apart, two rows per bank sweep.
      static_assert(!kGeneral || kChunks == 8 || kChunks == 4, "the scan-slot swizzle takes 4 or 8 chunks per row");
      const unsigned char* scan0 = smem + (sScan0 - smem_u32(smem));
      const unsigned char* m = static_cast<const unsigned char*>(p.mask);
      const int pr = m0 + ptid;
      // A mask broadcast over rows and heads (padding masks, (B, 1, 1, S)) has one row per block: eight threads
      // load it, once, into row 0 of the slot and every thread reads it there. (Every thread loading the same
      // 128 bytes for itself sent 128 requests per tile and block to the same few L2 lines: the padding-mask row
      // stayed at ~145 TFLOP/s whatever the consumers did.) Causal bounds are per row, so only without causal.
      const bool one_row = p.mask_st.r == 0 && p.mask_st.h == 0 && p.causal == Causal::None;
      const int sw = one_row ? 0 : ptid & (kChunks - 1);
      const int lim = one_row ? static_cast<int>(p.S) : pr < rows ? row_limit(p, pr % L) : 0;  // keys [0, lim) pass
      const unsigned char* mrow = m;
      if (one_row)
        mrow = m + b * p.mask_st.b;
      else if (pr < rows)
        mrow = m + b * p.mask_st.b + static_cast<int64_t>(hk * G + pr / L) * p.mask_st.h +
               static_cast<int64_t>(pr % L) * p.mask_st.r;
      const int row_off = one_row ? 0 : ptid * BN;  // this thread's row in a scan slot
      // The block's 128 rows within one head (always without GQA packing; rows past L are zero-filled): the whole
      // tile by one tensor copy of thread 0, its 128-byte swizzle the slots' layout. (By cp.async: 8 copies per
      // thread and tile with their address arithmetic, about a tenth of the producer's instructions in the SASS.)
      // Keys past the row's causal limit are then loaded too and cleared from the bits after packing.
      const bool tma = kTmaMask && work.mask_tma && !one_row && (G == 1 || m0 % L + BM <= L);
      const int tma_h = p.mask_st.h != 0 ? hk * G + m0 / L : 0, tma_b = p.mask_st.b != 0 ? static_cast<int>(b) : 0;
      auto prefetch = [&](int tile, int slot) {
        if (tma) {
          if (ptid == 0 && tile < t_end) {
            mbar_expect_tx(bar_scan0 + 8 * slot, Cfg::kScanBytes);
            tma_load_4d(sScan0 + slot * Cfg::kScanBytes, &maps.mask, bar_scan0 + 8 * slot, tile * BN, m0 % L, tma_h,
                        tma_b);
          }
        } else if (tile < t_end) {
          if (one_row) {
            if (ptid < kChunks) {
              const int j = tile * BN + ptid * 16;
              const int bytes = max(0, min(16, lim - j));
              cp_async16_partial(sScan0 + slot * Cfg::kScanBytes + (ptid << 4), bytes > 0 ? mrow + j : m, bytes);
            }
          } else if (tile * BN + BN <= lim) {  // the whole tile inside the row's bounds: no clamping
#pragma unroll
            for (int c = 0; c < kChunks; ++c)
              cp_async16_partial(sScan0 + slot * Cfg::kScanBytes + row_off + ((c ^ sw) << 4),
                                 mrow + tile * BN + c * 16, 16);
          } else {
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
              const int j = tile * BN + c * 16;
              const int bytes = max(0, min(16, lim - j));
              cp_async16_partial(sScan0 + slot * Cfg::kScanBytes + row_off + ((c ^ sw) << 4),
                                 bytes > 0 ? mrow + j : m, bytes);
            }
          }
        }
        cp_async_commit();
      };
      prefetch(t_begin, 0);
      prefetch(t_begin + 1, 1);
      // V of the last published tile, still to be loaded (thread 0; -1: none). It is published once thread 0 has
      // scanned its row of the next tile: its wait for the V stage (released only when the P V two tiles back is
      // done, a step after the K stage) then no longer delays that scan and, through the barrier below, the next
      // K. The consumers read V(n) a step after K(n + 1), which is published after it.
      int v_tile = -1, v_n = 0;
      int slot = 0;
      for (int tile = t_begin; tile < t_end; ++tile, slot = slot == 2 ? 0 : slot + 1) {
        // Slot (slot + 2) % 3 last held tile - 1, which every thread read before its arrival at that tile's barrier.
        prefetch(tile + 2, slot == 0 ? 2 : slot - 1);
        cp_async_wait<2>();  // this tile's chunks are in; the next two may be in flight
        if (tma) mbar_wait(bar_scan0 + 8 * slot, ((tile - t_begin) / 3) & 1);  // its ((tile - t_begin) / 3)-th fill
        // The one shared row was loaded by eight threads: wait for theirs. (The slot is refilled only after the
        // end-of-tile barrier below, which every thread passes after reading it.)
        if (one_row) named_barrier(3, 128);
        const unsigned char* src = scan0 + slot * Cfg::kScanBytes + row_off;
        uint32_t word[4] = {0u, 0u, 0u, 0u};  // bit k of word w: key 32w + k of the tile
        // A bool tensor holds bytes 0 and 1. Keys 8i..8i+7 (words lo, hi of a chunk) then pack with one multiply:
        // z = lo + (hi << 4) has key k (< 4) at bit 8k and key 4 + k at bit 8k + 4, and z * (2^24 + 2^17 + 2^10 + 2^3)
        // moves them to bits 24 + k and 28 + k (term 2^(24 - 7k) for byte k; every other partial product lands on its
        // own bit below 24 or past 31, so nothing carries into the top byte). 3 instructions per 8 keys and 3 prmt
        // per word, against 12 per 8 keys for the general byte test below, which runs only when some byte of the
        // row's tile is neither 0 nor 1 (a mask written through another dtype's view): it packs again, normalized.
        // pack(normalize): the row's bits into word; with normalize, each byte first becomes 0 / 1 by whether it is
        // nonzero (bit 7 set iff nonzero: no carry crosses a byte, 0x7f + 0x7f < 0x100). Returns the OR of the words
        // it packed: bits 1..7 of a byte show a byte above 1.
        auto pack = [&](auto normalize) {
          uint32_t ored = 0u;
#pragma unroll
          for (int ww = 0; ww < kChunks / 2; ++ww) {  // chunks 2ww, 2ww + 1: keys 32ww..
            uint32_t grp[4];                          // keys 32ww + 8i.. in the top byte of grp[i]
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 w = *reinterpret_cast<const uint4*>(src + (((2 * ww + h) ^ sw) << 4));
              uint32_t q[4] = {w.x, w.y, w.z, w.w};
              if constexpr (decltype(normalize)::value) {
#pragma unroll
                for (int i = 0; i < 4; ++i) q[i] = ((((q[i] & 0x7f7f7f7fu) + 0x7f7f7f7fu) | q[i]) >> 7) & 0x01010101u;
              }
              ored |= q[0] | q[1];
              ored |= q[2] | q[3];
              grp[2 * h] = (q[0] + (q[1] << 4)) * 0x01020408u;
              grp[2 * h + 1] = (q[2] + (q[3] << 4)) * 0x01020408u;
            }
            word[ww] = prmt(prmt(grp[0], grp[1], 0x0073u), prmt(grp[2], grp[3], 0x7300u), 0x7610u);
          }
          return ored;
        };
        if ((pack(std::false_type{}) & 0xfefefefeu) != 0u) pack(std::true_type{});
        if (one_row && pr >= rows) {  // rows past the end see no key (the per-row loads never load theirs)
#pragma unroll
          for (int ww = 0; ww < 4; ++ww) word[ww] = 0u;
        }
        if (tma && tile * BN + BN > lim) {  // keys [lim, ...) of this row: causal / bounds (lim = 0 past the rows)
#pragma unroll
          for (int ww = 0; ww < 4; ++ww) {
            const int kk = lim - tile * BN - 32 * ww;  // keys of word ww that pass
            word[ww] &= kk >= 32 ? 0xffffffffu : kk <= 0 ? 0u : (1u << kk) - 1u;
          }
        }
        if (ptid == 0 && v_tile >= 0) {
          publish_v(v_tile, v_n % kStages, v_n);
          v_tile = -1;
        }
        const bool any = (word[0] | word[1] | word[2] | word[3]) != 0u;
        if (!named_barrier_or(1, 128, any)) continue;  // no row of the block may see this tile: drop it
        const int st = n % kStages;
        if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
        *reinterpret_cast<uint4*>(const_cast<unsigned char*>(smem_m0) + st * Cfg::kBitsBytes + ptid * 16) =
            make_uint4(word[0], word[1], word[2], word[3]);
        if (ptid == 0) {  // every producer thread arrives once it has written its row
          publish_k(tile, st);
          v_tile = tile;
          v_n = n;
        } else {
          mbar_arrive(bar_full0 + 8 * st);
        }
        ++n;
      }
      cp_async_wait<0>();
      if (ptid == 0 && v_tile >= 0) publish_v(v_tile, v_n % kStages, v_n);
      // End of the stream: every producer thread arrives on the sentinel stage's full barrier.
      const int st = n % kStages;
      if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);
      if (ptid == 0) tile_of_stage[st] = -1;
      mbar_arrive(bar_full0 + 8 * st);
    } else if (ptid == 0) {
      // Every row block of this thread block in turn, through the same rings: the next block's first tiles land
      // while the consumers finish the current one.
      for (int u = blockIdx.x, k = 0; u < work.units;) {
        if (Cfg::kMulti) {
          blk = block_of(u, k);
          b = blk.b;
          hk = blk.hk;
        }
        for (int tile = blk.t_begin; tile < blk.t_end; ++tile, ++n) {
          const int st = n % kStages;
          if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
          publish_k(tile, st);
          publish_v(tile, st, n);
        }
        if (!Cfg::kMulti) break;  // one row block per thread block
        if (++k == items_of(u)) {
          k = 0;
          u += gridDim.x;
        }
      }
    }
    // End of the stream (general kind: the consumers read the tile of each stage; the plain kind's consumers count
    // the tiles of each row block themselves).
    if (kGeneral && ptid == 0 && !mask_staged) {
      const int st = n % kStages;
      if (n >= kStages) mbar_wait(bar_empty0 + 8 * st, (n / kStages - 1) & 1);
      tile_of_stage[st] = -1;
      mbar_arrive(bar_full0 + 8 * st);
    }
  } else {
  // Consumers (the rest of the kernel; one if/else by role, as setmaxnreg asks).
  setmaxnreg_inc<Cfg::kConsumerRegs>();

  // Q rows of row block qb into Q buffer buf (zero rows past the end, zero columns past E), one cp.async group.
  // Each warpgroup loads only its own 64 rows (the only ones its wgmma read), so a warpgroup barrier publishes them.
  auto load_q = [&](const FwdBlock& qb, int buf) {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = tid & 127; idx < 64 * (D / 8); idx += 128) {
      const int r = wg * 64 + idx / (D / 8), c = idx % (D / 8);
      const int pr = qb.m0 + r;
      const bool ok = pr < rows && c * 8 < E;
      const T* src = q;
      if (ok) src = q + qb.b * p.q_st.b + static_cast<int64_t>(qb.hk * G + pr / L) * p.q_st.h +
                    static_cast<int64_t>(pr % L) * p.q_st.r + c * 8;
      cp_async16(sQ + buf * QTile::kBytes + QTile::offset(r, c), src, ok);
    }
    cp_async_commit();
  };
  const int wg_bar = 4 + wg;  // this warpgroup's named barrier (1 and 3 are the producer's)
  // The two rows this thread holds in the accumulators: packed row m0 + 64 wg + 16 wwarp + 8 hf + g.
  int row_i[2], row_h[2], row_lim[2];
  bool row_ok[2];
  // Packed mask of this thread's rows (allowed: causal/bounds pass and the mask is true), shifted right by 2t so
  // that bit 8m + e of bits[hf][w] is key tile * BN + 32w + 8m + 2t + e of row half hf (accumulator n = 4w + m).
  static_assert(!kGeneral || BN == 128 || BN == 64, "at most four 32-bit mask words per row");
  auto mask_bits = [&](int stage, uint32_t (&bits)[2][4]) {
    const uint4* sm = reinterpret_cast<const uint4*>(smem_m0 + stage * Cfg::kBitsBytes);
    const int r = wg * 64 + wwarp * 16 + g;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const uint4 w = sm[r + 8 * hf];
      bits[hf][0] = w.x >> (2 * t);
      bits[hf][1] = w.y >> (2 * t);
      bits[hf][2] = w.z >> (2 * t);
      bits[hf][3] = w.w >> (2 * t);
    }
  };
  // Whether this thread's bits of the tile are all set (the words past BN / 32 are zero and not looked at).
  auto all_set = [&](const uint32_t (&bits)[2][4]) {
    uint32_t a = 0x03030303u;
#pragma unroll
    for (int w = 0; w < BN / 32; ++w) a &= bits[0][w] & bits[1][w];
    return a == 0x03030303u;
  };

  const bool with_sinks = p.sinks != nullptr && p.num_splits == 1;
  float m_run[2], l_run[2];
  float acc_o[D / 2];
  const float scale_log2 = p.scale * kLog2e;

  // Descriptor bases: this warpgroup's 64 Q rows (of the row block's Q buffer, set per row block); K/V stage 0
  // (stage s adds s * KTile::kBytes to the address, which sits in the low descriptor bits: no carry into the other
  // fields for shared-memory addresses < 256 KB).
  uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK0, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV0, KTile::kBlockBytes, 1024);

  // S = Q K^T of one tile into s (fp32, 64 x BN per warpgroup), issued and committed, not waited for.
  auto issue_s = [&](float (&s)[BN / 2], int stage) {
    const uint64_t kd = k_desc + ((stage * KTile::kBytes) >> 4);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // k16 step kk: 64-column block kk / 4, 32-byte step kk % 4 inside the swizzled 128-byte rows.
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<BN, T>(s, q_desc + qoff, kd + koff, kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of one tile (P in registers), issued, not committed.
  auto issue_pv = [&](const uint32_t (&pa)[BN / 16][4], int stage) {
    const uint64_t vd = v_desc + ((stage * KTile::kBytes) >> 4);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_tb<D, T>(acc_o, pa[kk], vd + ((kk * 16 * 128) >> 4));
  };
  // The last pending P V of a pipeline (tile n - 1 in V stage cur; nothing left to overlap it with): issue and wait.
  auto last_pv = [&](uint32_t (&pa)[BN / 16][4], int cur, int n) {
    mbar_wait(bar_vfull0 + 8 * cur, ((n - 1) / kStages) & 1);
    wgmma_fence();
    issue_pv(pa, cur);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc_o);
    reg_fence_u32(pa);
  };
  // Scale, mask and online softmax of S in place (s then holds P in fp32, dropout applied); the factor that
  // rescales O is returned per row half and applied by the caller once O is no longer being accumulated into.
  // kPath: a constant at every call (main_loop's template argument), folded once the call is inlined.
  // With a positive scale (every real call: 1 / sqrt(E) by default) the tests and the row max run on the unscaled
  // S and the scale enters the exponent's FFMA: max(s c) = c max(s) exactly for c > 0 (rounding is monotone), and
  // -inf c = -inf. That saves an FMUL per element (and the select no longer waits for one): the bool-mask
  // consumers ran 619 instructions per tile and warp against 496 without a mask, 64 of them this FMUL (ncu). A zero, negative or NaN scale (-inf 0 is NaN; a negative scale reverses the max) scales first.
  const bool raw_scale = scale_log2 > 0.f;
  auto softmax = [&](const int kPath, float (&s)[BN / 2], int tile, const uint32_t (&bits)[2][4],
                     float (&alpha)[2]) {
    const int j0 = tile * BN;
    // The factor still to apply in the exponent (1: s is already in log2 units).
    const bool raw = kPath != kPathElementwise && raw_scale;
    const float c = raw ? scale_log2 : 1.f;
    if (kPath != kPathElementwise && !raw) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] *= scale_log2;
    }
    // This tile's per-element test (the elementwise path also scales to log2 units and adds the bias). The kind of
    // test is chosen once per tile and warp (uniform branches around straight-line code): a test chosen inside the
    // element loop put branches and reconvergence points between the elements, and ptxas then ran them one after
    // another (in the SASS: ~10 instructions and a BSSY/BSYNC per element, ~2400 static instructions per 64-key
    // tile; the plain kind's tile is ~450 for 128 keys).
    if (kPath == kPathElementwise) {
      // Masks read from global memory element by element (additive, or bool rows not 16-byte aligned). The row
      // offsets are recomputed here rather than kept live through the loop (registers).
      int64_t row_mask[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        row_mask[hf] = b * p.mask_st.b + row_h[hf] * p.mask_st.h + row_i[hf] * p.mask_st.r;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int hf = i >> 1;
          const int j = j0 + n * 8 + 2 * t + (i & 1);
          float v = s[n * 4 + i] * scale_log2;
          bool ok = j < row_lim[hf];
          if (ok) {
            const float bias = mask_bias(p, row_mask[hf] + j * p.mask_st.c);
            ok = bias != -INFINITY;
            if (p.mask_kind == MaskKind::Additive) v += bias * kLog2e;
          }
          s[n * 4 + i] = ok ? v : -INFINITY;
        }
      }
    } else if (mask_staged && !__all_sync(0xffffffffu, all_set(bits))) {
      // Packed bits (causal and bounds included). A warp whose bits are all set takes the unmasked branch below:
      // the common case for padding masks and for the inner tiles of block-structured masks.
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[n * 4 + i] = (bits[i >> 1][n >> 2] >> (8 * (n & 3) + (i & 1))) & 1u ? s[n * 4 + i] : -INFINITY;
        }
      }
    } else if (!mask_staged && j0 + BN > n_full) {
      // Causal / bounds: only tiles that reach past the keys every row of the block may see.
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int j = j0 + n * 8 + 2 * t + (i & 1);
          s[n * 4 + i] = j < row_lim[i >> 1] ? s[n * 4 + i] : -INFINITY;
        }
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n * 4 + hf * 2], s[n * 4 + hf * 2 + 1]));
      mx = warp_max4(mx) * c;  // in log2 units
      const float m_new = fmaxf(m_run[hf], mx);
      // Fully-masked-so-far guard: with every logit -inf, shift by 0 so exp2 gives 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[hf] = exp2f(m_run[hf] - m_use);
      m_run[hf] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        const float p0 = exp2f(fmaf(s[n * 4 + hf * 2], c, -m_use));
        const float p1 = exp2f(fmaf(s[n * 4 + hf * 2 + 1], c, -m_use));
        rs += p0 + p1;  // the denominator counts every key; dropout scales only what reaches P V
        s[n * 4 + hf * 2] = p0;
        s[n * 4 + hf * 2 + 1] = p1;
      }
      if (kPath == kPathDropout || (kPath == kPathElementwise && has_dropout)) {
        // Keys 8n + 2t + e use the random words of key group 2n + t / 2 (words 2(t & 1) + e), so lanes t and t ^ 1
        // need the same Philox block: each computes the one for n = 2m + (t & 1), keeps its half and hands the
        // other half to its partner (half the Philox work, the same words as Dropout::pair).
        const uint32_t bh = static_cast<uint32_t>(b * p.hq + row_h[hf]), ri = static_cast<uint32_t>(row_i[hf]);
#pragma unroll
        for (int mm = 0; mm < BN / 16; ++mm) {
          const int n_own = 2 * mm + (t & 1);
          uint32_t r[4];
          dropout_words(drop.seed, drop.offset, bh, ri, static_cast<uint32_t>(j0 + n_own * 8 + 2 * t) >> 2, r);
          const uint32_t own0 = (t & 1) ? r[2] : r[0], own1 = (t & 1) ? r[3] : r[1];
          const uint32_t give0 = (t & 1) ? r[0] : r[2], give1 = (t & 1) ? r[1] : r[3];
          const uint32_t got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
          // n = 2mm holds own words when t is even, the partner's when odd; n = 2mm + 1 the other way round.
          const uint32_t a0 = (t & 1) ? got0 : own0, a1 = (t & 1) ? got1 : own1;
          const uint32_t c0 = (t & 1) ? own0 : got0, c1 = (t & 1) ? own1 : got1;
          s[(2 * mm) * 4 + hf * 2] *= a0 >= drop.threshold ? drop.scale : 0.f;
          s[(2 * mm) * 4 + hf * 2 + 1] *= a1 >= drop.threshold ? drop.scale : 0.f;
          s[(2 * mm + 1) * 4 + hf * 2] *= c0 >= drop.threshold ? drop.scale : 0.f;
          s[(2 * mm + 1) * 4 + hf * 2 + 1] *= c1 >= drop.threshold ? drop.scale : 0.f;
        }
      }
      l_run[hf] = l_run[hf] * alpha[hf] + rs;
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
    // Once the running max settles, alpha is 1 for the whole warp: skip the O rescale.
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      acc_o[dn * 4] *= alpha[0];
      acc_o[dn * 4 + 1] *= alpha[0];
      acc_o[dn * 4 + 2] *= alpha[1];
      acc_o[dn * 4 + 3] *= alpha[1];
    }
  };
  // P (fp32 in s) rounded to 16 bits: the A fragment of k16 step n / 2 is (row g, keys 2t..) in registers 0 / 2
  // and (row g + 8, ..) in 1 / 3.
  auto to_a = [&](const float (&s)[BN / 2], uint32_t (&pa)[BN / 16][4]) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      pa[n >> 1][(n & 1) * 2] = pack2<T>(s[n * 4], s[n * 4 + 1]);
      pa[n >> 1][(n & 1) * 2 + 1] = pack2<T>(s[n * 4 + 2], s[n * 4 + 3]);
    }
  };

  // Pipeline. Published tile n sits in K stage n % kStages behind its full barrier (phase n / kStages), its V in
  // V stage n % kStages; `cur` is the tile whose P is in registers (P V pending), `nxt` the one whose Q K^T is
  // issued next. Per warpgroup and tile:
  //   wait K full(nxt), V full(cur); issue S(nxt) = Q K(nxt)^T; issue O += P(cur) V(cur); wait S(nxt);
  //   softmax(nxt) while P(cur) V(cur) runs on the tensor cores; wait O; release K(nxt), V(cur); rescale O.
  // No block barrier in the loop: the two warpgroups drift apart, and one's softmax overlaps the other's matrix
  // products. The steady-state loop has no data-dependent branch between a wgmma's issue and its wait: ptxas
  // tracks the in-flight groups through straight-line code only, and serializes every wgmma of the kernel (C7514)
  // when it cannot prove that the accumulators read after wait_group<1> belong to the completed group.
  // The main loop is compiled once per softmax path, so that each loop holds only the code it runs (one loop with
  // every path inline spanned ~75 KB of instructions, the cold paths' invariants hoisted into registers and
  // spilled): kPathDefault (no mask, or a staged bool mask: the plain kind's only path), kPathDropout, and
  // kPathElementwise (masks read from global memory element by element, with or without dropout).
  // The key tile of published index n (the i-th of the row block) in K stage st, or -1 at the end of the row
  // block: the general kind reads what the producer published (it drops tiles, then publishes -1); the plain kind
  // knows its tiles and waits only for one that exists.
  auto next_tile = [&](int n, int st, int i) -> int {
    if constexpr (kGeneral) {
      mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
      return tile_of_stage[st];
    } else {
      if (i >= t_end - t_begin) return -1;
      mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
      return t_begin + i;
    }
  };
  auto main_loop = [&](auto path) {
    constexpr int kPath = decltype(path)::value;
    int n = 0;    // published index of the tile whose Q K^T is next
    int cur = 0;  // its stage; then the stage of the pending P V
    int tile = next_tile(n, cur, 0);
    if (tile >= 0) {
      float s[BN / 2];
      uint32_t pa[BN / 16][4];
      float alpha[2];
      uint32_t bits[2][4] = {};
      if (mask_staged) mask_bits(cur, bits);
      wgmma_fence();
      issue_s(s, cur);
      wgmma_wait<0>();
      reg_fence(s);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty0 + 8 * cur);  // this warp is done with this K stage (and its mask bits)
      softmax(kPath, s, tile, bits, alpha);
      to_a(s, pa);
      for (++n;; ++n) {
        const int st = cur + 1 == kStages ? 0 : cur + 1;
        tile = next_tile(n, st, n);
        if (tile < 0) break;
        if (mask_staged) mask_bits(st, bits);
        mbar_wait(bar_vfull0 + 8 * cur, ((n - 1) / kStages) & 1);  // published before K(nxt): almost always in
        wgmma_fence();
        issue_s(s, st);
        issue_pv(pa, cur);
        wgmma_commit();
        wgmma_wait<1>();  // S(nxt) done; P(cur) V(cur) may still run
        reg_fence(s);
        softmax(kPath, s, tile, bits, alpha);
        wgmma_wait<0>();
        reg_fence(acc_o);
        reg_fence_u32(pa);  // the P fragments stay untouched until the wgmma that reads them is complete
        __syncwarp();
        if (lane == 0) {  // this warp is done with K(nxt) (and its mask bits) and V(cur)
          mbar_arrive(bar_empty0 + 8 * st);
          mbar_arrive(bar_vempty0 + 8 * cur);
        }
        rescale_o(alpha);
        to_a(s, pa);
        cur = st;
      }
      last_pv(pa, cur, n);  // last tile: P V only
    }
  };
  // Epilogue of the row block with batch eb and rows (eh, ei, eok) (this thread's two), running max em and sum el:
  // normalise, write the output (or this split's partial) and the log-sum-exp.
  auto epilogue = [&](int64_t eb, const int (&eh)[2], const int (&ei)[2], const bool (&eok)[2], const float (&em)[2],
                      const float (&el)[2]) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = warp_sum4(el[hf]);
    if (!eok[hf]) continue;
    // A row with no allowed key (and no sink) has l = 0: output 0 and lse -inf, never NaN.
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float m_use = em[hf] == -INFINITY ? 0.f : em[hf];
    const float lse = l > 0.f ? (m_use + log2f(l)) * kLn2 : -INFINITY;
    const int64_t bh = eb * p.hq + eh[hf];
    const int i = ei[hf];
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + eb * p.out_st.b + eh[hf] * p.out_st.h + i * p.out_st.r;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t;
        if (c < Ev)
          *reinterpret_cast<uint32_t*>(out + c) = pack2<T>(acc_o[dn * 4 + hf * 2] * inv, acc_o[dn * 4 + hf * 2 + 1] * inv);
      }
      if (t == 0) p.lse[bh * p.L + i] = lse;
    } else {
      const int64_t prow = (static_cast<int64_t>(blockIdx.z) * p.batch * p.hq + bh) * p.L + i;
      float* out = p.o_partial + prow * Ev;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + 2 * t;
        if (c < Ev)
          *reinterpret_cast<float2*>(out + c) = make_float2(acc_o[dn * 4 + hf * 2] * inv, acc_o[dn * 4 + hf * 2 + 1] * inv);
      }
      if (t == 0) p.lse_partial[prow] = lse;
    }
  }
  };
  // The row blocks of this thread block as one pipeline (kMulti: the plain kind, one softmax path): the Q K^T of a
  // row block's first key tile is issued with the P V of the previous block's last tile, its softmax runs while that
  // P V does, and the previous block's epilogue follows (after the wait that completes its O). Per block, only the
  // epilogue's stores and one warpgroup barrier (the next Q) stay outside the overlap; the pipeline fills and drains
  // once per thread block. Q of the it-th block sits in buffer it % 2; the one after it is loaded once the block
  // before it has stopped reading its buffer. Every row block of a thread block with several has at least one
  // key tile (launch_sm90.h); a lone block may have none.
  // This thread's rows of the row block in blk (and their running max / sum at the start).
  auto set_rows = [&]() {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = m0 + wg * 64 + wwarp * 16 + hf * 8 + g;
      row_ok[hf] = r < rows;
      const int rr = r < rows ? r : 0;
      row_h[hf] = hk * G + rr / L;
      row_i[hf] = rr % L;
      row_lim[hf] = row_limit(p, row_i[hf]);
      // A sink is one more logit in the denominator: start the running max at it with weight 1 (counted once).
      m_run[hf] = with_sinks ? p.sinks[row_h[hf]] * kLog2e : -INFINITY;
      l_run[hf] = with_sinks && t == 0 ? 1.f : 0.f;
    }
  };
  auto set_block = [&](int u, int k) {
    blk = block_of(u, k);
    b = blk.b;
    hk = blk.hk;
    m0 = blk.m0;
    n_full = blk.n_full;
    t_begin = blk.t_begin;
    t_end = blk.t_end;
    set_rows();
  };
  auto advance = [&](int& u, int& k) {
    if (++k == items_of(u)) {
      k = 0;
      u += gridDim.x;
    }
  };
  if constexpr (Cfg::kMulti) {
    int u = blockIdx.x, k = 0, it = 0;
    set_block(u, k);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
    load_q(blk, 0);
    {
      int u2 = u, k2 = k;
      advance(u2, k2);
      if (u2 < work.units)
        load_q(block_of(u2, k2), 1);
      else
        cp_async_commit();  // (an empty group: the wait below leaves exactly one in flight)
    }
    cp_async_wait<1>();
    fence_proxy_async();  // Q written by cp.async, read by wgmma
    named_barrier(wg_bar, 128);
    q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
    if (t_end <= t_begin) {  // a lone row block that sees no key, or an empty key split (t_begin past the tiles)
      epilogue(b, row_h, row_i, row_ok, m_run, l_run);
    } else {
      float s[BN / 2];
      uint32_t pa[BN / 16][4];
      float alpha[2];
      const uint32_t no_bits[2][4] = {};
      // The finished block's epilogue data while the next one's first tile runs.
      int64_t e_b = 0;
      int e_h[2] = {0, 0}, e_i[2] = {0, 0};
      bool e_ok[2] = {false, false};
      float e_m[2] = {0.f, 0.f}, e_l[2] = {0.f, 0.f};
      mbar_wait(bar_full0, 0);
      wgmma_fence();
      issue_s(s, 0);
      wgmma_wait<0>();
      reg_fence(s);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty0);
      softmax(kPathDefault, s, t_begin, no_bits, alpha);
      to_a(s, pa);
      int cur = 0, i = 1;  // stage of the pending P V; index of the next tile in its row block
      int n = 1;           // published index of the next tile
      for (;; ++n, ++i) {
        const int st = cur + 1 == kStages ? 0 : cur + 1;
        const bool fresh = i == t_end - t_begin;  // the next tile opens the next row block
        if (fresh) {
          advance(u, k);
          if (u >= work.units) break;
          ++it;
          e_b = b;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            e_h[hf] = row_h[hf];
            e_i[hf] = row_i[hf];
            e_ok[hf] = row_ok[hf];
            e_m[hf] = m_run[hf];
            e_l[hf] = l_run[hf];
          }
          set_block(u, k);
          i = 0;
          cp_async_wait<0>();
          fence_proxy_async();
          // This block's Q rows are in; every warp of the warpgroup is past the previous block's last Q K^T.
          named_barrier(wg_bar, 128);
          q_desc = sw128_desc(sQ + (it & 1) * QTile::kBytes + wg * 64 * 128, 16, 1024);
        }
        const int tile = t_begin + i;
        mbar_wait(bar_full0 + 8 * st, (n / kStages) & 1);
        mbar_wait(bar_vfull0 + 8 * cur, ((n - 1) / kStages) & 1);
        wgmma_fence();
        issue_s(s, st);
        issue_pv(pa, cur);
        wgmma_commit();
        wgmma_wait<1>();  // S(nxt) done; P(cur) V(cur) may still run
        reg_fence(s);
        softmax(kPathDefault, s, tile, no_bits, alpha);
        wgmma_wait<0>();
        reg_fence(acc_o);
        reg_fence_u32(pa);
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(bar_empty0 + 8 * st);
          mbar_arrive(bar_vempty0 + 8 * cur);
        }
        if (fresh) {
          epilogue(e_b, e_h, e_i, e_ok, e_m, e_l);
#pragma unroll
          for (int x = 0; x < D / 2; ++x) acc_o[x] = 0.f;
          // The finished block's Q buffer takes the block after this one.
          int u2 = u, k2 = k;
          advance(u2, k2);
          if (u2 < work.units) load_q(block_of(u2, k2), (it + 1) & 1);
        } else {
          rescale_o(alpha);
        }
        to_a(s, pa);
        cur = st;
      }
      last_pv(pa, cur, n);  // last tile of the last row block: P V only
      epilogue(b, row_h, row_i, row_ok, m_run, l_run);
    }
  } else {
    // One row block per thread block (the launch gives the other kinds one unit each): blk is block_of(blockIdx.x, 0).
    set_rows();
    {  // Q tile by all consumer threads (zero rows past the end, zero columns past E)
      const T* q = static_cast<const T*>(p.q);
      for (int idx = tid; idx < BM * (D / 8); idx += NT) {
        const int r = idx / (D / 8), c = idx % (D / 8);
        const int pr = m0 + r;
        const bool ok = pr < rows && c * 8 < E;
        const T* src = q;
        if (ok) src = q + b * p.q_st.b + static_cast<int64_t>(hk * G + pr / L) * p.q_st.h +
                      static_cast<int64_t>(pr % L) * p.q_st.r + c * 8;
        cp_async16(sQ + QTile::offset(r, c), src, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();   // Q written by cp.async, read by wgmma
      named_barrier(2, NT);  // every consumer's Q rows are in (ids 1 and 3 are the producer's)
    }
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
  if constexpr (kGeneral) {
    if (has_mask && !mask_staged)
      main_loop(std::integral_constant<int, kPathElementwise>{});
    else if (has_dropout)
      main_loop(std::integral_constant<int, kPathDropout>{});
    else
      main_loop(std::integral_constant<int, kPathDefault>{});
  } else {
    main_loop(std::integral_constant<int, kPathDefault>{});
  }

  epilogue(b, row_h, row_i, row_ok, m_run, l_run);
  }
  }  // consumers
#endif
}

}  // namespace cuda
}  // namespace sdpax
