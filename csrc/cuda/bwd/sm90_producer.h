// The producer warpgroup of the Hopper backward (bwd/sm90_kernel.h): K and V of the block once (TMA), then the query
// tiles in order into a ring of kStages stages with full / empty mbarriers: Q and dO (TMA, thread 0), lse and Delta
// (plain loads: lse rows are not 16-byte aligned for a bulk copy when L is odd; threads 0..63, one row each), the
// tile's (head, first row) in tile_of_stage, so that the producer alone decides which tiles the consumers see; a final
// head of -1 ends the stream. It stores lse already in log2 units, +inf for rows past L and rows with no allowed key
// (lse = -inf), so that P is exactly 0 there without a test. General kind (bool mask): the 64 x 128-byte tile arrives
// by one tensor copy a step ahead; the producer reads it with 16-byte loads (4 per thread), drops tiles with no allowed
// element and hands the consumers the rest as 16 bits per element in their fragment order (BwdSm90Cfg::kBitsBytes). A
// row-broadcast mask (padding) is read from global memory and judged once per head: empty heads are skipped whole, full
// ones need no further loads and no AND.
#pragma once
#include "cuda/bwd/sm90_block.h"
#include "cuda/prims/tma.h"

namespace sdpax {
namespace cuda {

// Bit 7 of each byte of v set iff the byte is nonzero: its low 7 bits carry into bit 7 when added to 0x7f, or bit 7
// is set itself (no carry crosses a byte).
__device__ __forceinline__ uint32_t nonzero7(uint32_t v) { return ((v & 0x7f7f7f7fu) + 0x7f7f7f7fu) | v; }

// The producer thread's share of a bool mask tile. Thread ptid reads 16-byte chunk mc (keys 16 mc..) of tile rows r0,
// r0 + 1, r0 + 8, r0 + 9 with r0 = 16 rq + 2 mt (mt = ptid % 4, rq = ptid / 32): exactly the elements of one 16-byte
// slot of each of the 8 consumer threads (g = 0..7, t = mt) of consumer warp mc (query rows r0 (+1, +8, +9) are
// those threads' columns; keys g and g + 8 of the chunk their rows). Each slot is one 16-byte store; the 8 lanes of a
// store phase (4 t x 2 warps) hit 8 different slots modulo 8 with the swizzle mask_slot (bit 2 ^= warp bit 0).
template <class Block>
struct BwdSm90MaskScan {
  using Cfg = typename Block::Cfg;
  static constexpr int BM = Block::BM, BN = Block::BN;
  int mt, mc, rq, r0;
  int j;                       // this thread's first key
  const unsigned char* mbase;  // its first key in the mask of batch b
  int64_t mst_h;
  uint32_t oob[4];             // bytes past S of this thread's chunk (0xff; zero in the loaded words)
  int chunk_bytes;             // how many bytes of the chunk are inside S
  uint32_t raw_a, raw_b;       // raw buffer slots of rows r0 and r0 + 1 (rows r0 + 8, r0 + 9: 8 rows further)
  // A mask broadcast over rows: every tile of a head is the same, so its any / full verdict is taken once per
  // head, and a full tile needs no loads (padding masks: every tile is full or empty). It is read from global
  // memory when needed; other masks stream through the raw buffers (kRawBufs), one step ahead.
  bool staged;
  int mask_h, mask_b;          // head and batch coordinates of the tensor copy: 0 on broadcast dims

  __device__ __forceinline__ BwdSm90MaskScan(const Block& blk, int ptid) {
    const AttnParams& p = blk.p;
    mt = ptid & 3, mc = (ptid >> 2) & 7, rq = ptid >> 5;
    r0 = 16 * rq + 2 * mt;
    j = blk.j0 + mc * 16;
    mbase = static_cast<const unsigned char*>(p.mask) + static_cast<int64_t>(blk.b) * p.mask_st.b + j;
    mst_h = p.mask_st.h;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      oob[w] = 0u;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (j + 4 * w + e >= blk.S) oob[w] |= 0xffu << (8 * e);
    }
    chunk_bytes = max(0, min(16, blk.S - j));
    // Chunk c of raw row r at c ^ (r % 8).
    raw_a = blk.sRaw0 + r0 * BN + ((mc ^ (r0 & 7)) << 4);
    raw_b = blk.sRaw0 + (r0 + 1) * BN + ((mc ^ ((r0 + 1) & 7)) << 4);
    staged = blk.has_mask && !blk.one_row;
    mask_h = mst_h != 0, mask_b = p.mask_st.b != 0;
  }

  // Thread 0: the tile (head h, first row i0) into raw buffer buf by one tensor copy; rows past L and keys past S
  // are zero-filled, so that they read back as masked (no bounds test in the scan). Buffer buf was last read two
  // steps back, by every producer thread before its arrival at that step's barriers, which thread 0 has passed.
  __device__ __forceinline__ void raw_copy(const Block& blk, int h, int i0, int buf) const {
    mbar_expect_tx(blk.bar_raw0 + 8 * buf, Cfg::kRawBytes);
    tma_load_4d(blk.sRaw0 + buf * Cfg::kRawBytes, &blk.maps.mask, blk.bar_raw0 + 8 * buf, blk.j0, i0, mask_h * h,
                mask_b * blk.b);
  }
  // Staged row r (r0 + (r & 1) + 8 (r >> 1)) of this thread's chunk, raw buffer step % 2.
  __device__ __forceinline__ uint4 raw_row(const Block& blk, int r, int step) const {
    return *reinterpret_cast<const uint4*>(
        blk.ptr((r & 1 ? raw_b : raw_a) + (step & 1) * Cfg::kRawBytes + (r >> 1) * 8 * BN));
  }

  // The tile of step `step` (head h, first row i0): stores this thread's 4 slots of the consumers' mask words into
  // buffer n % kMaskBufs (a dropped tile's are overwritten by the next) and returns in bit 0 of each byte of any_or /
  // all_and whether some / every element of its chunk is allowed (all_and: row-broadcast masks only; past S passes).
  __device__ __forceinline__ void pack(const Block& blk, int step, int h, int i0, int n, uint32_t& any_or,
                                       uint32_t& all_and) const {
    // x[r][w]: bit 7 of byte e set iff key 16 mc + 4w + e of tile row r0 + (r & 1) + 8 (r >> 1) is allowed and in
    // bounds; the other bits are not looked at (the stores below replicate bit 7 over the byte). A bool tensor
    // holds bytes 0 and 1: x = q << 7, and the verdicts test bit 0 of the raw bytes. A byte above 1 (a mask
    // written through another dtype's view) shows in the OR of the raw words; the staged rows are then read again
    // and each byte tested for nonzero. The row-broadcast path gives 0 / 1 bytes itself.
    uint32_t x[4][4];
    any_or = 0u, all_and = 0xffffffffu;
    const int rows_left = chunk_bytes > 0 ? blk.L - i0 - r0 : 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int k = (r & 1) + 8 * (r >> 1);
      uint32_t q[4] = {0u, 0u, 0u, 0u};
      if (staged) {  // (rows past L and keys past S were zero-filled by the copy)
        const uint4 v = raw_row(blk, r, step);
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
        const uint4 v = raw_row(blk, r, step);
        const uint32_t q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          x[r][w] = nonzero7(q[w]);
          any_or |= x[r][w] >> 7;
        }
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(blk.bits0 + (n % Cfg::kMaskRing) * (Cfg::kBitsBytes / 4)) + rq * 256;
    // Key g's slot: mask_slot(x0 + 4g) = x0 + 4 (g ^ flip) with flip = warp mc's bit 0 (x0 = 32 mc + mt), so lanes
    // of even and odd warps (one store phase) hit different bank groups; two bases for even / odd g.
    const int flip = mc & 1;
    uint4* dst_e = dst + mc * 32 + mt + 4 * flip;  // g even: x0 + 4g + 4 flip
    uint4* dst_o = dst + mc * 32 + mt - 4 * flip;  // g odd:  x0 + 4g - 4 flip
#pragma unroll
    for (int g = 0; g < 8; ++g) {
      // Key g (word g / 4, byte g % 4) and key g + 8 (word 2 + g / 4), 0xffff / 0 for each of the two rows of a
      // pair (the low half: the even row), bit 7 replicated (selectors 0x8..0xf).
      const uint32_t sel = (g & 3) * 0x1111u + 0xcc88u;
      const int w = g >> 2;
      (g & 1 ? dst_o : dst_e)[4 * g] =
          make_uint4(prmt(x[0][w], x[1][w], sel), prmt(x[0][2 + w], x[1][2 + w], sel), prmt(x[2][w], x[3][w], sel),
                     prmt(x[2][2 + w], x[3][2 + w], sel));
    }
  }
};

template <class T, int D, bool kGeneral>
struct BwdSm90Producer {
  using Block = BwdSm90Block<T, D, kGeneral>;
  using Cfg = typename Block::Cfg;
  using KTile = typename Block::KTile;
  using QTile = typename Block::QTile;
  static constexpr int BM = Block::BM, NT = Block::NT, kStages = Block::kStages;
  const Block& blk;
  int ptid;  // thread of the producer warpgroup

  __device__ __forceinline__ explicit BwdSm90Producer(const Block& blk_) : blk(blk_), ptid(blk_.tid - NT) {}

  // Thread 0: K and V of the block, once.
  __device__ __forceinline__ void load_kv() const {
    if (ptid == 0) {
      mbar_expect_tx(blk.bar_kv, 2 * KTile::kBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_4d(blk.sK + c * KTile::kBlockBytes, &blk.maps.k, blk.bar_kv, c * 64, blk.j0, blk.hk, blk.b);
        tma_load_4d(blk.sV + c * KTile::kBlockBytes, &blk.maps.v, blk.bar_kv, c * 64, blk.j0, blk.hk, blk.b);
      }
    }
  }

  // Tile n (head h, first row i0, every element allowed or not) into stage n % kStages once its previous tile is
  // released: lse2 / Delta of the threads' rows, then (thread 0) the tile's coordinates and its Q / dO copies. Every
  // thread arrives after its own stores (arrive releases them); thread 0's arrival also announces the bytes the
  // copies will deliver, so the phase completes once both are in.
  __device__ __forceinline__ void publish(int n, int h, int i0, bool full, float row_lse, float row_delta) const {
    const int st = n % kStages;
    if (n >= kStages) mbar_wait(blk.bar_empty0 + 8 * st, (n / kStages - 1) & 1);  // its previous tile released
    if (ptid < BM) {
      float* lse2 = blk.row_vals + st * 2 * BM;
      // A row with no allowed key (or past L) has P = 0: exp2(x - inf) = 0, never exp2(-inf + inf).
      lse2[ptid] = row_lse == -INFINITY ? INFINITY : row_lse * kLog2e;
      lse2[BM + ptid] = row_delta;
    }
    const uint32_t bar = blk.bar_full0 + 8 * st;
    if (ptid == 0) {
      blk.tile_of_stage[st] = make_int4(h, i0, full, 0);
      mbar_expect_tx(bar, Cfg::kStageBytes);
      const uint32_t dst = blk.sQ0 + st * Cfg::kStageBytes;
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_4d(dst + c * QTile::kBlockBytes, &blk.maps.q, bar, c * 64, i0, h, blk.b);
        tma_load_4d(dst + QTile::kBytes + c * QTile::kBlockBytes, &blk.maps.dout, bar, c * 64, i0, h, blk.b);
      }
    } else {
      mbar_arrive(bar);
    }
  }

  // The end of the stream: head -1 in stage n % kStages.
  __device__ __forceinline__ void finish(int n) const {
    const int st = n % kStages;
    if (n >= kStages) mbar_wait(blk.bar_empty0 + 8 * st, (n / kStages - 1) & 1);
    if (ptid == 0) blk.tile_of_stage[st] = make_int4(-1, 0, 0, 0);
    mbar_arrive(blk.bar_full0 + 8 * st);
  }

  // After setmaxnreg_dec (bwd/sm90_kernel.h).
  __device__ __forceinline__ void run() const {
    const AttnParams& p = blk.p;
    const int L = blk.L, b = blk.b, q_first = blk.q_first, q_tiles = blk.q_tiles, steps = blk.steps;
    const bool has_mask = blk.has_mask, one_row = blk.one_row;
    load_kv();
    const BwdSm90MaskScan<Block> scan(blk, ptid);
    // The tile of step s is (head hk G + s / q_tiles, row tile q_first + s % q_tiles): kept as (hs, qs), stepped
    // without divisions; (hn, qn) is the step after it, whose mask copy is issued one step ahead.
    int hs = blk.hk * blk.G, qs = q_first;
    if (scan.staged && ptid == 0 && steps > 0) scan.raw_copy(blk, hs, qs * BM, 0);
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
      if (scan.staged) {
        if (ptid == 0 && step + 1 < steps) scan.raw_copy(blk, hn, qn * BM, (step + 1) & 1);
        mbar_wait(blk.bar_raw0 + 8 * (step & 1), (step >> 1) & 1);  // this step's tile is in (the (step / 2)-th use)
      }
      bool full = true;
      if (has_mask && (!one_row || head_start || !head_full)) {
        // (else: a full tile of a row-broadcast mask; nothing to read)
        uint32_t any_or, all_and;
        scan.pack(blk, step, h, i0, n, any_or, all_and);
        // A tile with rows past L is never "full" (those rows read as masked): it only costs the consumers the
        // mask AND on the last row tile.
        if (!named_barrier_or(kBwdBarProducer, 128, (any_or & 0x01010101u) != 0u)) {  // no element may be seen
          if (one_row) {  // nor any tile of this head
            step += q_tiles - 1 - (i0 / BM - q_first);  // (then ++step: the next head's first tile)
            hs = h + 1, qs = q_first;
          }
          continue;
        }
        // Whether every element is allowed: only for a row-broadcast mask (it spares the loads of the head's other
        // tiles). A staged tile is handed to the consumers as not full: their AND is a few instructions inside the
        // exp2 loop, less than the second barrier and the reduction it would take here.
        full = one_row && named_barrier_and(kBwdBarProducer, 128, (all_and & 0x01010101u) == 0x01010101u);
        if (one_row && head_start) head_full = full;
      }
      publish(n, h, i0, full, row_lse, row_delta);
      ++n;
    }
    finish(n);
  }
};

}  // namespace cuda
}  // namespace sdpax
