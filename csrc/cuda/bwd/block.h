// The keys and query tiles of one block of the backward main loops (bwd/mma_kernel.h, bwd/wide_kernel.h): one block per
// (key block of BN keys, batch, kv head). It walks the G query heads of its GQA group and, per head, the query tiles
// of BM rows that can see one of its keys (tiles wholly above the causal diagonal are never visited): step s is
// head hk G + s / q_tiles, query tile q_first + s % q_tiles.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace sdpax {
namespace cuda {

template <int BN, int BM>
struct BwdKeyBlock {
  int G;             // query heads per kv head
  int64_t b;         // batch
  int hk, j0;        // kv head, first key
  int64_t lim_shift; // row_limit(p, i) = min(i + lim_shift, S) for every kind of alignment
  int q_first;       // first query tile that sees key j0 or later
  int q_tiles;       // query tiles per head from q_first
  int steps;         // G * q_tiles, or 0 when no row sees the block

  // Block blockIdx.x (key blocks fastest) of a call with G query heads per kv head, L query rows and S keys.
  __device__ __forceinline__ BwdKeyBlock(const AttnParams& p, int G_, int L, int S) : G(G_) {
    const int n_blocks = (S + BN - 1) / BN;
    const int n_block = static_cast<int>(blockIdx.x % n_blocks);
    const int64_t bhk = blockIdx.x / n_blocks;
    b = bhk / p.hkv;
    hk = static_cast<int>(bhk % p.hkv);
    j0 = n_block * BN;
    // Query rows that can see key j0 or later: i + 1 + shift > j0 under causal alignment.
    int i_begin = 0;
    if (p.causal != Causal::None) {
      const int64_t shift = p.causal == Causal::LowerRight ? p.S - p.L : 0;
      const int64_t first = static_cast<int64_t>(j0) - shift;
      i_begin = static_cast<int>(first < 0 ? 0 : (first > L ? L : first));
    }
    lim_shift = p.causal == Causal::None ? p.S : 1 + (p.causal == Causal::LowerRight ? p.S - p.L : 0);
    q_first = i_begin / BM;
    q_tiles = (L + BM - 1) / BM - q_first;
    steps = q_tiles > 0 ? G * q_tiles : 0;
  }
  __device__ __forceinline__ int head(int step) const { return hk * G + step / q_tiles; }
  __device__ __forceinline__ int row0(int step) const { return (q_first + step % q_tiles) * BM; }
};

}  // namespace cuda
}  // namespace sdpax
