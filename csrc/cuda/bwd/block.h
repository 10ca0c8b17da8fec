// The keys and query tiles of one block of the backward main loops (bwd/mma_kernel.h, bwd/wide_kernel.h): one block per
// (key block of BN keys, batch, kv head). It walks the G query heads of its GQA group and, per head, the query tiles
// of BM rows that can see one of its keys (tiles wholly above the causal diagonal are never visited): step s is
// head hk G + s / q_tiles, query tile q_first + s % q_tiles.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace sdpax {
namespace cuda {

// The grid of the key-block loops: (key block, batch, kv head) per blockIdx.x, key blocks fastest, as many as the
// longest sequence of a packed call has.
struct BwdGridIndex {
  int n_block;
  int64_t b;
  int hk;
};
__device__ __forceinline__ BwdGridIndex bwd_grid_index(const AttnParams& p, int BN) {
  const int n_blocks = static_cast<int>((p.S + BN - 1) / BN);
  const int64_t bhk = blockIdx.x / n_blocks;
  return {static_cast<int>(blockIdx.x % n_blocks), bhk / p.hkv, static_cast<int>(bhk % p.hkv)};
}

template <int BN, int BM>
struct BwdKeyBlock {
  int G;             // query heads per kv head
  int64_t b;         // batch
  int hk, j0;        // kv head, first key
  int64_t lim_shift; // row_limit(p, i) = min(i + lim_shift, S) for every kind of alignment
  int64_t lo_shift;  // row_begin(p, i) = max(i + lo_shift, 0) (no window: -(L + S), every key for every row)
  int q_first;       // first query tile that sees key j0 or later
  int q_tiles;       // query tiles per head from q_first that can see a key of the block
  int steps;         // G * q_tiles, or 0 when no row sees the block

  // Key block n_block of (batch b, kv head hk) of a call with G query heads per kv head, L query rows and S keys.
  __device__ __forceinline__ BwdKeyBlock(const AttnParams& p, int G_, int L, int S, int n_block, int64_t b_, int hk_)
      : G(G_), b(b_), hk(hk_) {
    j0 = n_block * BN;
    // key_end(p, i) = i + lim_shift and key_begin(p, i) = i + lo_shift (common/params.h) both grow with i.
    lim_shift = key_end(p, 0) >= p.S ? p.S : key_end(p, 0);
    lo_shift = p.win_left >= 0 ? key_begin(p, 0) : -(p.L + p.S);
    // Query rows that can see a key of [j0, j_last]: i + lim_shift > j0 and i + lo_shift <= j_last.
    const int64_t j_last = min(j0 + BN, S) - 1;
    const bool bounded = p.causal != Causal::None || p.win_right >= 0;
    const int64_t first = bounded ? j0 - lim_shift + 1 : 0;
    const int64_t end = j_last - lo_shift + 1;
    const int i_begin = static_cast<int>(first < 0 ? 0 : (first > L ? L : first));
    const int i_end = static_cast<int>(end < 0 ? 0 : (end > L ? L : end));
    q_first = i_begin / BM;
    q_tiles = i_end > i_begin ? (i_end + BM - 1) / BM - q_first : 0;
    steps = q_tiles > 0 ? G * q_tiles : 0;
  }
  __device__ __forceinline__ int head(int step) const { return hk * G + step / q_tiles; }
  __device__ __forceinline__ int row0(int step) const { return (q_first + step % q_tiles) * BM; }
};

}  // namespace cuda
}  // namespace sdpax
