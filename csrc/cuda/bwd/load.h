// cp.async loads of the mma.sync backward loops (bwd/mma_kernel.h, bwd/wide_kernel.h): K / V of the block, the Q / dO /
// lse / Delta of a query step into one of two buffers (one cp.async group a step ahead of its use), and the general
// kind's bool mask tile. Tiles land in SmemTile layout (16-byte chunks swizzled by row), zero-filled past the rows and
// columns the call has, so the products run over the whole head-dim bucket without tests.
#pragma once
#include "cuda/bwd/block.h"
#include "cuda/prims/mma.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

// Row copies of (rows x D) tiles of T by the NT threads of a block, from a (batch, head) slice at element `off` of
// `base` (row stride st.r, contiguous columns), zero-filled from row valid_rows and column `cols` on.
//   kFixed false: thread tid copies chunks tid, tid + NT, ... (any row count).
//   kFixed true:  thread tid always copies chunk tid % (D / 8 or 4) of rows tid / (chunks per row) + k * (rows
//                 per pass): the loop unrolls and the swizzled offsets are constants apart (bwd_wide).
template <class T, int D, int NT, bool kFixed>
struct BwdRowCopy {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  static constexpr int kCpr = D / kVec, kRowsPer = NT / kCpr;     // kFixed: chunks per row, rows per pass
  int tid, ld_r, ld_c;
  __device__ __forceinline__ explicit BwdRowCopy(int tid_) : tid(tid_), ld_r(tid_ / kCpr), ld_c(tid_ % kCpr) {}

  template <class Tile>
  __device__ __forceinline__ void rows(uint32_t dst, const void* base, int64_t off, const Strides4& st, int r0,
                                       int nrows, int valid_rows, int cols) const {
    if constexpr (kFixed) {
      static_assert(NT % kCpr == 0 && kRowsPer % 8 == 0, "tile loads");
      const T* src0 = static_cast<const T*>(base) + off + static_cast<int64_t>(r0) * st.r;
      const bool col_ok = ld_c * kVec < cols;
#pragma unroll
      for (int k = 0; k < Tile::kBytes / (NT * 16); ++k) {
        const int r = ld_r + k * kRowsPer;
        const bool ok = col_ok && r0 + r < valid_rows;
        cp_async16(dst + Tile::offset(r, ld_c), ok ? src0 + static_cast<int64_t>(r) * st.r + ld_c * kVec : src0, ok);
      }
      (void)nrows;
    } else {
      const T* src0 = static_cast<const T*>(base) + off;
      for (int idx = tid; idx < nrows * (D / kVec); idx += NT) {
        const int r = idx / (D / kVec), c = idx % (D / kVec);
        const bool ok = r0 + r < valid_rows && c * kVec < cols;
        cp_async16(dst + Tile::offset(r, c), ok ? src0 + static_cast<int64_t>(r0 + r) * st.r + c * kVec : src0, ok);
      }
    }
  }
};

// K and V rows [r0, r0 + BN) of the kv head at element offsets k_off / v_off into dst (V KTile::kBytes after K).
template <class KTile, int BN, class Copy>
__device__ __forceinline__ void load_kv_rows(const Copy& copy, const AttnParams& p, uint32_t dst, int64_t k_off,
                                             int64_t v_off, int r0, int S, int E, int Ev) {
  copy.template rows<KTile>(dst, p.k, k_off, p.k_st, r0, BN, S, E);
  copy.template rows<KTile>(dst + KTile::kBytes, p.v, v_off, p.v_st, r0, BN, S, Ev);
}

// K and V of key tile `tile` into stage `stage` of a ring at sKV0 (stage s: K at sKV0 + 2 s KTile::kBytes, V right
// after it): the deterministic dQ pass.
template <class KTile, int BN, class Copy>
__device__ __forceinline__ void load_kv_stage(const Copy& copy, const AttnParams& p, uint32_t sKV0, int64_t k_off,
                                              int64_t v_off, int tile, int stage, int S, int E, int Ev) {
  const uint32_t dst = sKV0 + stage * 2 * KTile::kBytes;
  load_kv_rows<KTile, BN>(copy, p, dst, k_off, v_off, tile * BN, S, E, Ev);
}

// Q and dO of step `step` (BM rows) into buffer buf (Q at sQ0 + 2 buf QTile::kBytes, dO right after it), with their
// lse and Delta into sLse / sDelta + buf BM: one cp.async group (0 past L; those rows are masked anyway).
template <class QTile, int BM, int NT, class Copy, class Blk>
__device__ __forceinline__ void load_q_step(const Copy& copy, const AttnParams& p, const Blk& blk, int step, int buf,
                                            uint32_t sQ0, float* sLse, float* sDelta, int L, int E, int Ev) {
  const int h = blk.head(step), i0 = blk.row0(step);
  const uint32_t q_dst = sQ0 + buf * 2 * QTile::kBytes;
  copy.template rows<QTile>(q_dst, p.q, blk.b * p.q_st.b + static_cast<int64_t>(h) * p.q_st.h, p.q_st, i0, BM, L, E);
  copy.template rows<QTile>(q_dst + QTile::kBytes, p.dout, blk.b * p.dout_st.b + static_cast<int64_t>(h) * p.dout_st.h,
                            p.dout_st, i0, BM, L, Ev);
  const int64_t row0 = lse_row(p, blk.b * p.hq + h, i0);
  for (int r = copy.tid; r < BM; r += NT) {
    const bool ok = i0 + r < L;
    cp_async4(smem_u32(sLse + buf * BM + r), ok ? p.lse + row0 + r : p.lse, ok);
    cp_async4(smem_u32(sDelta + buf * BM + r), ok ? p.delta + row0 + r : p.delta, ok);
  }
}

// The BM x BN bytes of a bool mask (contiguous keys, 16-byte aligned rows) that step `step` sees, into buffer buf
// of a ring at sMask0 (bwd_wide, general kind); rows past L and keys past S are zero-filled (read as masked). The
// 16-byte chunk c of tile row r is stored at chunk c ^ ((r >> 1) & 3): the 4 rows 2t + c' a warp's lanes read in
// one byte load (t = 0..3) then fall in 4 different 16-byte bank groups (unswizzled, rows 256 bytes apart hit the
// same banks: a 4-way conflict on each of the 32 loads per thread and step).
template <int BM, int BN, int NT, class Blk>
__device__ __forceinline__ void load_mask_tile(const AttnParams& p, const Blk& blk, int step, int buf,
                                               const unsigned char* const& sMask0, const int& L, const int& S,
                                               const int& tid) {
  const int h = blk.head(step), i0 = blk.row0(step);
  const unsigned char* m0 = static_cast<const unsigned char*>(p.mask) + blk.b * p.mask_st.b + h * p.mask_st.h;
  const uint32_t dst0 = smem_u32(sMask0) + buf * BM * BN;
#pragma unroll
  for (int k = 0; k < BM * BN / 16 / NT; ++k) {
    const int idx = tid + k * NT, r = idx / (BN / 16), cc = idx % (BN / 16);
    const int i = i0 + r, j = blk.j0 + cc * 16;
    const int bytes = i < L ? max(0, min(16, S - j)) : 0;
    const void* src = bytes > 0 ? m0 + int64_t(i) * p.mask_st.r + j : p.mask;
    cp_async16_partial(dst0 + r * BN + ((cc ^ ((r >> 1) & 3)) << 4), src, bytes);
  }
}

}  // namespace cuda
}  // namespace sdpax
