// The Hopper forward's producer warpgroup: it publishes the block's key tiles in order: the tile index in
// tile_of_stage, K and V through TMA (one thread), and with a staged bool mask the mask tile (all 128 threads: a
// tile no row of the block may see is dropped here and never reaches the consumers; the rest are packed to one bit
// per element, causal and bounds included). The n-th published tile goes to stage n % kStages of each ring once
// the consumers have released that stage's previous tile; a final -1 (K ring only, general kind) tells them the
// stream has ended.
#pragma once
#include <type_traits>

#include "cuda/fwd/sm90_block.h"
#include "cuda/prims/tma.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
struct FwdSm90Producer {
  using Block = FwdSm90Block<T, D, kKind>;
  using Cfg = typename Block::Cfg;
  using KTile = typename Block::KTile;
  static constexpr bool kGeneral = Block::kGeneral;
  static constexpr int BM = Block::BM, BN = Block::BN, kStages = Block::kStages;

  Block& k;
  const AttnParams& p;
  const int ptid;  // thread index in the producer warpgroup
  int n = 0;       // tiles published

  __device__ __forceinline__ explicit FwdSm90Producer(Block& block)
      : k(block), p(block.p), ptid(block.tid - Block::NT) {}

  // One thread: K of `tile` into K stage st, completing its full barrier.
  __device__ __forceinline__ void publish_k(int tile, int st) {
    k.tile_of_stage[st] = tile;
    mbar_expect_tx(k.bar_full0 + 8 * st, KTile::kBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
      tma_load_4d(k.sK0 + st * KTile::kBytes + c * KTile::kBlockBytes, &k.maps.k, k.bar_full0 + 8 * st, c * 64,
                  tile * BN, k.hk, static_cast<int>(k.b));
  }
  // One thread: V of the n-th published tile into V stage st.
  __device__ __forceinline__ void publish_v(int tile, int st, int nn) {
    if (nn >= kStages) mbar_wait(k.bar_vempty0 + 8 * st, (nn / kStages - 1) & 1);  // its previous tile released
    mbar_expect_tx(k.bar_vfull0 + 8 * st, KTile::kBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
      tma_load_4d(k.sV0 + st * KTile::kBytes + c * KTile::kBlockBytes, &k.maps.v, k.bar_vfull0 + 8 * st, c * 64,
                  tile * BN, k.hk, static_cast<int>(k.b));
  }
  // The stream's end: the sentinel stage's full barrier (one arrival per producer thread with a staged mask).
  __device__ __forceinline__ void publish_end() {
    const int st = n % kStages;
    if (n >= kStages) mbar_wait(k.bar_empty0 + 8 * st, (n / kStages - 1) & 1);
    if (ptid == 0) k.tile_of_stage[st] = -1;
    mbar_arrive(k.bar_full0 + 8 * st);
  }

  // Without a staged mask: thread 0 publishes every tile of every row block of this thread block in turn, through
  // the same rings (the next block's first tiles land while the consumers finish the current one).
  __device__ __forceinline__ void run_tiles() {
    for (int u = blockIdx.x, kk = 0; u < k.work.units;) {
      if (Cfg::kMulti) {
        k.blk = k.block_of(u, kk);
        k.b = k.blk.b;
        k.hk = k.blk.hk;
      }
      for (int tile = k.blk.t_begin; tile < k.blk.t_end; ++tile, ++n) {
        const int st = n % kStages;
        if (n >= kStages) mbar_wait(k.bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
        publish_k(tile, st);
        publish_v(tile, st, n);
      }
      if (!Cfg::kMulti) break;  // one row block per thread block
      k.advance(u, kk);
    }
  }

  __device__ __forceinline__ void run_staged_mask();

  __device__ __forceinline__ void run() {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (kGeneral && k.mask_staged) {
      run_staged_mask();
    } else if (ptid == 0) {
      run_tiles();
      // End of the stream (general kind: the consumers read the tile of each stage; the plain kind's consumers
      // count the tiles of each row block themselves).
      if (kGeneral) publish_end();
    }
  }
};

// Producer thread ptid owns packed row m0 + ptid of the (single) row block. Its raw mask tiles stream through a
// ring of three scan slots, two tiles ahead of the one being decided, so their latency hides behind the scan and
// the wait for a free stage; each thread loads and reads only its own row, so no barrier is needed between those
// steps. The bits include causal / bounds: by cp.async, bytes past the row's limit are never loaded (zero-filled);
// by tensor copy, they are cleared from the packed words.
template <class T, int D, FwdKind kKind>
struct FwdSm90MaskScan {
  using Block = FwdSm90Block<T, D, kKind>;
  using Cfg = typename Block::Cfg;
  static constexpr int BM = Block::BM, BN = Block::BN;
  static constexpr int kChunks = BN / 16;
  static constexpr bool kTmaMask = BN == 128;  // (64-key tiles, d256: rows 64 bytes apart, their own swizzle: cp.async)
  // A row's 16-byte chunk c sits at chunk c ^ (row % 8) of its slot row: the 8 threads of a quarter warp then read
  // (and cp.async writes) 8 different bank groups instead of one (rows are 128 bytes apart). 64-key tiles (d256):
  // chunk c ^ (row % 4), rows 64 bytes apart, two rows per bank sweep.
  static_assert(!Block::kGeneral || kChunks == 8 || kChunks == 4, "the scan-slot swizzle takes 4 or 8 chunks per row");

  const Block& k;
  const int ptid;
  const unsigned char* scan0;
  const unsigned char* m;
  int pr;
  // A mask broadcast over rows and heads (padding masks, (B, 1, 1, S)) has one row per block: eight threads load
  // it, once, into row 0 of the slot and every thread reads it there (every thread loading the same 128 bytes for
  // itself sent 128 requests per tile and block to the same few L2 lines). Causal bounds are per row, so only
  // without causal.
  bool one_row;
  int sw;
  int lim;  // keys [0, lim) pass
  const unsigned char* mrow;
  int row_off;  // this thread's row in a scan slot
  // The block's 128 rows within one head (always without GQA packing; rows past L are zero-filled): the whole tile
  // by one tensor copy of thread 0, its 128-byte swizzle the slots' layout (by cp.async: 8 copies per thread and
  // tile with their address arithmetic, about a tenth of the producer's instructions). Keys past the row's causal
  // limit are then loaded too and cleared from the bits after packing.
  bool tma;
  int tma_h, tma_b;

  __device__ __forceinline__ FwdSm90MaskScan(const Block& block, int ptid_) : k(block), ptid(ptid_) {
    const AttnParams& p = k.p;
    scan0 = k.smem + (k.sScan0 - smem_u32(k.smem));
    m = static_cast<const unsigned char*>(p.mask);
    pr = k.m0 + ptid;
    one_row = p.mask_st.r == 0 && p.mask_st.h == 0 && p.causal == Causal::None;
    sw = one_row ? 0 : ptid & (kChunks - 1);
    lim = one_row ? static_cast<int>(p.S) : pr < k.rows ? row_limit(p, pr % k.L) : 0;
    mrow = m;
    if (one_row)
      mrow = m + k.b * p.mask_st.b;
    else if (pr < k.rows)
      mrow = m + k.b * p.mask_st.b + static_cast<int64_t>(k.hk * k.G + pr / k.L) * p.mask_st.h +
             static_cast<int64_t>(pr % k.L) * p.mask_st.r;
    row_off = one_row ? 0 : ptid * BN;
    tma = kTmaMask && k.work.mask_tma && !one_row && (k.G == 1 || k.m0 % k.L + BM <= k.L);
    tma_h = p.mask_st.h != 0 ? k.hk * k.G + k.m0 / k.L : 0, tma_b = p.mask_st.b != 0 ? static_cast<int>(k.b) : 0;
  }

  // The raw mask tile `tile` into scan slot `slot` (one cp.async group per call, empty past the tiles).
  __device__ __forceinline__ void prefetch(int tile, int slot) const {
    if (tma) {
      if (ptid == 0 && tile < k.t_end) {
        mbar_expect_tx(k.bar_scan0 + 8 * slot, Cfg::kScanBytes);
        tma_load_4d(k.sScan0 + slot * Cfg::kScanBytes, &k.maps.mask, k.bar_scan0 + 8 * slot, tile * BN, k.m0 % k.L,
                    tma_h, tma_b);
      }
    } else if (tile < k.t_end) {
      if (one_row) {
        if (ptid < kChunks) {
          const int j = tile * BN + ptid * 16;
          const int bytes = max(0, min(16, lim - j));
          cp_async16_partial(k.sScan0 + slot * Cfg::kScanBytes + (ptid << 4), bytes > 0 ? mrow + j : m, bytes);
        }
      } else if (tile * BN + BN <= lim) {  // the whole tile inside the row's bounds: no clamping
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
          cp_async16_partial(k.sScan0 + slot * Cfg::kScanBytes + row_off + ((c ^ sw) << 4), mrow + tile * BN + c * 16,
                             16);
      } else {
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int j = tile * BN + c * 16;
          const int bytes = max(0, min(16, lim - j));
          cp_async16_partial(k.sScan0 + slot * Cfg::kScanBytes + row_off + ((c ^ sw) << 4), bytes > 0 ? mrow + j : m,
                             bytes);
        }
      }
    }
    cp_async_commit();
  }

  // The row's bits of the tile in scan slot `src` into word (bit k of word w: key 32w + k of the tile).
  // A bool tensor holds bytes 0 and 1. Keys 8i..8i+7 (words lo, hi of a chunk) then pack with one multiply:
  // z = lo + (hi << 4) has key k (< 4) at bit 8k and key 4 + k at bit 8k + 4, and z * (2^24 + 2^17 + 2^10 + 2^3)
  // moves them to bits 24 + k and 28 + k (term 2^(24 - 7k) for byte k; every other partial product lands on its own
  // bit below 24 or past 31, so nothing carries into the top byte). 3 instructions per 8 keys and 3 prmt per word,
  // against 12 per 8 keys for the general byte test, which runs only when some byte of the row's tile is neither 0
  // nor 1 (a mask written through another dtype's view): it packs again, normalized. With normalize, each byte
  // first becomes 0 / 1 by whether it is nonzero (bit 7 set iff nonzero: no carry crosses a byte, 0x7f + 0x7f <
  // 0x100). Returns the OR of the words it packed: bits 1..7 of a byte show a byte above 1.
  template <bool kNormalize>
  __device__ __forceinline__ uint32_t pack(const unsigned char* src, uint32_t (&word)[4]) const {
    uint32_t ored = 0u;
#pragma unroll
    for (int ww = 0; ww < kChunks / 2; ++ww) {  // chunks 2ww, 2ww + 1: keys 32ww..
      uint32_t grp[4];                          // keys 32ww + 8i.. in the top byte of grp[i]
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 w = *reinterpret_cast<const uint4*>(src + (((2 * ww + h) ^ sw) << 4));
        uint32_t q[4] = {w.x, w.y, w.z, w.w};
        if constexpr (kNormalize) {
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
  }

  // This row's packed bits of the tile in scan slot `slot`, causal / bounds applied.
  __device__ __forceinline__ void row_bits(int tile, int slot, uint32_t (&word)[4]) const {
    const unsigned char* src = scan0 + slot * Cfg::kScanBytes + row_off;
#pragma unroll
    for (int ww = 0; ww < 4; ++ww) word[ww] = 0u;
    if ((pack<false>(src, word) & 0xfefefefeu) != 0u) pack<true>(src, word);
    if (one_row && pr >= k.rows) {  // rows past the end see no key (the per-row loads never load theirs)
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
  }
};

template <class T, int D, FwdKind kKind>
__device__ __forceinline__ void FwdSm90Producer<T, D, kKind>::run_staged_mask() {
  const FwdSm90MaskScan<T, D, kKind> scan(k, ptid);
  scan.prefetch(k.t_begin, 0);
  scan.prefetch(k.t_begin + 1, 1);
  // V of the last published tile, still to be loaded (thread 0; -1: none). It is published once thread 0 has
  // scanned its row of the next tile: its wait for the V stage (released only when the P V two tiles back is done,
  // a step after the K stage) then no longer delays that scan and, through the barrier below, the next K. The
  // consumers read V(n) a step after K(n + 1), which is published after it.
  int v_tile = -1, v_n = 0;
  int slot = 0;
  for (int tile = k.t_begin; tile < k.t_end; ++tile, slot = slot == 2 ? 0 : slot + 1) {
    // Slot (slot + 2) % 3 last held tile - 1, which every thread read before its arrival at that tile's barrier.
    scan.prefetch(tile + 2, slot == 0 ? 2 : slot - 1);
    cp_async_wait<2>();  // this tile's chunks are in; the next two may be in flight
    // By tensor copy: the ((tile - t_begin) / 3)-th fill of the slot.
    if (scan.tma) mbar_wait(k.bar_scan0 + 8 * slot, ((tile - k.t_begin) / 3) & 1);
    // The one shared row was loaded by eight threads: wait for theirs. (The slot is refilled only after the
    // end-of-tile barrier below, which every thread passes after reading it.)
    if (scan.one_row) named_barrier(kBarProducerRow, 128);
    uint32_t word[4];
    scan.row_bits(tile, slot, word);
    if (ptid == 0 && v_tile >= 0) {
      publish_v(v_tile, v_n % kStages, v_n);
      v_tile = -1;
    }
    const bool any = (word[0] | word[1] | word[2] | word[3]) != 0u;
    if (!named_barrier_or(kBarProducerAny, 128, any)) continue;  // no row of the block may see this tile: drop it
    const int st = n % kStages;
    if (n >= kStages) mbar_wait(k.bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
    *reinterpret_cast<uint4*>(const_cast<unsigned char*>(k.smem_m0) + st * Cfg::kBitsBytes + ptid * 16) =
        make_uint4(word[0], word[1], word[2], word[3]);
    if (ptid == 0) {  // every producer thread arrives once it has written its row
      publish_k(tile, st);
      v_tile = tile;
      v_n = n;
    } else {
      mbar_arrive(k.bar_full0 + 8 * st);
    }
    ++n;
  }
  cp_async_wait<0>();
  if (ptid == 0 && v_tile >= 0) publish_v(v_tile, v_n % kStages, v_n);
  publish_end();  // every producer thread arrives on the sentinel stage's full barrier
}

}  // namespace cuda
}  // namespace sdpax
