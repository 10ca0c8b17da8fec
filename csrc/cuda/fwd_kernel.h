// FlashAttention-2-style forward kernel (tensor cores through mma.sync) and the split-key merge.
//
// One block computes BM rows of one (batch, kv head). With GQA the G query heads that share a kv head are packed
// into the row dimension (row r -> head hk*G + r / L, position r % L), so K/V tiles are loaded once for the whole
// group and never copied. Each warp owns kMT x 16 rows; S = Q K^T and O += P V run on tensor cores (mma.h: one
// m16n8k16 per step for 16-bit inputs, split TF32 for float) with P kept in registers. K/V tiles stream through a two-stage cp.async pipeline: the next visible tile loads while the current
// one computes.
//
// Variants: element type T (bfloat16, float16, float), head-dim bucket D (E, Ev <= D, padded with zeros in shared
// memory) and kKind (tiles.h):
//   Plain    no mask, no dropout (causal, sinks, GQA, scale are run-time)
//   General  attention mask and/or dropout
//   Decode   plain, for at most 16 rows per (batch, kv head) (decode, GQA groups of L = 1): one-warp blocks of 16
//              rows, so that many blocks share a multiprocessor and keep enough K/V loads in flight; combined with
//              the split-key launch it streams K/V at close to the memory bandwidth.
#pragma once
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
struct FwdCfg {
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kWarps = tiles::fwd_warps(kKind);
  static constexpr int kMT = tiles::fwd_m_tiles(kF32, D, kKind);  // 16-row m-tiles per warp
  static constexpr int kBM = tiles::fwd_bm(kF32, D, kKind);
  static constexpr int kBN = tiles::fwd_bn(kF32, D, kKind);
  static_assert(kBM == kWarps * 16 * kMT, "tiles.h: rows per block are the warps' m-tiles");
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;  // K/V tiles in flight: tile j + 1 loads while tile j computes
  static constexpr int kMaskBytes = kBM * kBN;  // one stage of a staged bool mask tile
  static constexpr int kSmem = (kBM + 2 * kStages * kBN) * D * static_cast<int>(sizeof(T)) + kStages * kMaskBytes;
};

// Blocks: one per (m block, batch * kv head), ordered so that the heaviest causal blocks start first.
template <class T, int D, FwdKind kKind>
__global__ void __launch_bounds__(FwdCfg<T, D, kKind>::kThreads, 1) fwd_kernel(const __grid_constant__ AttnParams p) {
  using Cfg = FwdCfg<T, D, kKind>;
  constexpr bool kGeneral = kKind == FwdKind::General;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, MT = Cfg::kMT, NT = Cfg::kThreads;
  using QTile = SmemTile<BM, D, T>;
  using KTile = SmemTile<BN, D, T>;
  constexpr int kVec = QTile::kVec;  // elements per 16-byte copy
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK0 = sQ + QTile::kBytes;                       // K stage s at sK0 + s * KTile::kBytes
  const uint32_t sV0 = sK0 + Cfg::kStages * KTile::kBytes;       // V stage s at sV0 + s * KTile::kBytes
  // Staged bool-mask tiles (BM rows x BN bytes per stage) after the V stages.
  const unsigned char* sM0 = smem + QTile::kBytes + 2 * Cfg::kStages * KTile::kBytes;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int rows = G * L;
  const FwdBlock blk = fwd_block(p, rows, BM, BN);
  const int64_t b = blk.b;
  const int hk = blk.hk, m0 = blk.m0, n_full = blk.n_full, t_begin = blk.t_begin, t_end = blk.t_end;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);

  // The rows this thread holds in the C fragments: [mt][half] -> packed row m0 + warp*16*MT + mt*16 + half*8 + g.
  int row_i[MT][2], row_h[MT][2], row_lim[MT][2];
  bool row_ok[MT][2];
  int64_t row_mask[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = m0 + warp * 16 * MT + mt * 16 + hf * 8 + g;
      row_ok[mt][hf] = r < rows;
      const int rr = r < rows ? r : 0;
      row_h[mt][hf] = hk * G + rr / L;
      row_i[mt][hf] = rr % L;
      row_lim[mt][hf] = row_limit(p, row_i[mt][hf]);
      row_mask[mt][hf] = b * p.mask_st.b + row_h[mt][hf] * p.mask_st.h + row_i[mt][hf] * p.mask_st.r;
    }
  }
  const bool warp_active = m0 + warp * 16 * MT < rows;

  // Q tile (zero rows past the end, zero columns past E).
  {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = tid; idx < BM * (D / kVec); idx += NT) {
      const int r = idx / (D / kVec), c = idx % (D / kVec);
      const int pr = m0 + r;
      const bool ok = pr < rows && c * kVec < E;
      const T* src = q;
      if (ok) src = q + b * p.q_st.b + static_cast<int64_t>(hk * G + pr / L) * p.q_st.h +
                    static_cast<int64_t>(pr % L) * p.q_st.r + c * kVec;
      cp_async16(sQ + QTile::offset(r, c), src, ok);
    }
  }
  auto load_kv = [&](uint32_t dst, const void* base, const Strides4& st, int cols, int tile) {
    const T* src0 = static_cast<const T*>(base) + b * st.b + static_cast<int64_t>(hk) * st.h;
    for (int idx = tid; idx < BN * (D / kVec); idx += NT) {
      const int r = idx / (D / kVec), c = idx % (D / kVec);
      const int j = tile * BN + r;
      const bool ok = j < S && c * kVec < cols;
      cp_async16(dst + KTile::offset(r, c), ok ? src0 + static_cast<int64_t>(j) * st.r + c * kVec : src0, ok);
    }
  };

  const bool has_mask = kGeneral && p.mask_kind != MaskKind::None;
  // With a mask, next_tile() reads this thread's mask elements of a candidate tile once, keeps one bit per element
  // (allowed: causal/bounds pass and mask != -inf / true) for the softmax step, and skips tiles where the whole
  // block sees no allowed element. Bit index: ((mt * 2 + half) * BN / 8 + n) * 2 + e.
  static_assert(MT * 2 * BN / 4 <= 64, "mask bits must fit in 64");
  // A bool mask whose rows are 16-byte aligned travels through shared memory with the K/V tiles (cp.async, so its
  // latency hides behind the previous tile's math); other masks are read element by element by next_tile().
  const bool mask_staged = has_mask && p.mask_kind == MaskKind::Bool && p.mask_st.c == 1 &&
                           reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && p.mask_st.r % 16 == 0 &&
                           p.mask_st.h % 16 == 0 && p.mask_st.b % 16 == 0;
  auto next_tile = [&](int tile, uint64_t& bits) {
    if (!has_mask || mask_staged) return tile;
    for (; tile < t_end; ++tile) {
      bits = 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if (row_ok[mt][hf]) {
#pragma unroll
            for (int c = 0; c < BN / 4; ++c) {
              const int j = tile * BN + (c >> 1) * 8 + 2 * t + (c & 1);
              if (j < row_lim[mt][hf] && mask_bias(p, row_mask[mt][hf] + j * p.mask_st.c) != -INFINITY)
                bits |= uint64_t(1) << ((mt * 2 + hf) * (BN / 4) + c);
            }
          }
      if (__syncthreads_or(bits != 0)) break;
    }
    return tile;
  };

  Dropout drop{};
  const bool has_dropout = kGeneral && p.dropout_p > 0.0;
  if (has_dropout) drop.init(p);

  const bool with_sinks = p.sinks != nullptr && p.num_splits == 1;
  float m_run[MT][2], l_run[MT][2];
  float acc_o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      // A sink is one more logit in the denominator: start the running max at it with weight 1 (counted once).
      m_run[mt][hf] = with_sinks ? p.sinks[row_h[mt][hf]] * kLog2e : -INFINITY;
      l_run[mt][hf] = with_sinks && t == 0 ? 1.f : 0.f;
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dn][e] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  auto load_tile = [&](int tile, int stage) {
    load_kv(sK0 + stage * KTile::kBytes, p.k, p.k_st, E, tile);
    load_kv(sV0 + stage * KTile::kBytes, p.v, p.v_st, Ev, tile);
    if (mask_staged) {
      const unsigned char* m = static_cast<const unsigned char*>(p.mask);
      for (int idx = tid; idx < BM * (BN / 16); idx += NT) {
        const int r = idx / (BN / 16), c = idx % (BN / 16);
        const int pr = m0 + r, j = tile * BN + c * 16;
        const int bytes = pr < rows ? max(0, min(16, S - j)) : 0;
        const unsigned char* src = m;
        if (bytes > 0)
          src = m + b * p.mask_st.b + static_cast<int64_t>(hk * G + pr / L) * p.mask_st.h +
                static_cast<int64_t>(pr % L) * p.mask_st.r + j;
        cp_async16_partial(smem_u32(sM0 + stage * Cfg::kMaskBytes + r * BN + c * 16), src, bytes);
      }
    }
  };
  uint64_t bits = 0, bits_next = 0;
  int tile = next_tile(t_begin, bits);
  if (tile < t_end) load_tile(tile, 0);
  cp_async_commit();
  int tile_next = tile < t_end ? next_tile(tile + 1, bits_next) : t_end;
  if (tile_next < t_end) load_tile(tile_next, 1);
  cp_async_commit();

  for (int stage = 0; tile < t_end; stage ^= 1) {
    cp_async_wait<1>();  // this tile's group is complete; the next tile's may still be in flight
    __syncthreads();
    const uint32_t sK = sK0 + stage * KTile::kBytes, sV = sV0 + stage * KTile::kBytes;
    bool skip = false;  // staged mask: the whole tile is masked for every row of the block
    if (mask_staged) {
      const unsigned char* sm = sM0 + stage * Cfg::kMaskBytes;
      bits = 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const unsigned char* row = sm + (warp * 16 * MT + mt * 16 + hf * 8 + g) * BN;
#pragma unroll
          for (int c = 0; c < BN / 4; ++c) {
            const int col = (c >> 1) * 8 + 2 * t + (c & 1);
            if (row[col] && tile * BN + col < row_lim[mt][hf]) bits |= uint64_t(1) << ((mt * 2 + hf) * (BN / 4) + c);
          }
        }
      skip = !__syncthreads_or(bits != 0);
    }

    float acc_s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][n][e] = 0.f;
    if (warp_active && !skip) {
      // Full head-dim bucket: columns past E are zero in shared memory, and branch-free loops let the compiler
      // hoist the ldmatrix of step kk + 1 above the mma of step kk.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) QTile::lda(a[mt], sQ, warp * 16 * MT + mt * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          FragB<T> bb;
          KTile::ldb(bb, sK, np * 16, kk * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma(acc_s[mt][2 * np], a[mt], bb, 0);
            mma(acc_s[mt][2 * np + 1], a[mt], bb, 1);
          }
        }
      }
    }

    // Scale, mask, online softmax. Elementwise tests only where some element of the tile can fail them.
    const int j0 = tile * BN;
    const bool need_elem = has_mask || j0 + BN > n_full;
    if (warp_active && !skip) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float s = acc_s[mt][n][hf * 2 + e] * scale_log2;
              if (has_mask) {
                const int j = j0 + n * 8 + 2 * t + e;
                if (!((bits >> ((mt * 2 + hf) * (BN / 4) + n * 2 + e)) & 1)) {
                  s = -INFINITY;
                } else if (p.mask_kind == MaskKind::Additive) {
                  s += mask_bias(p, row_mask[mt][hf] + j * p.mask_st.c) * kLog2e;
                }
              } else if (need_elem) {
                if (j0 + n * 8 + 2 * t + e >= row_lim[mt][hf]) s = -INFINITY;
              }
              acc_s[mt][n][hf * 2 + e] = s;
              mx = fmaxf(mx, s);
            }
          }
          mx = warp_max4(mx);
          const float m_new = fmaxf(m_run[mt][hf], mx);
          // Fully-masked-so-far guard: with every logit -inf, shift by 0 so exp2 gives 0 rather than NaN.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m_run[mt][hf] - m_use);
          m_run[mt][hf] = m_new;
          l_run[mt][hf] *= alpha;
          // Once the running max settles, alpha is 1 for the whole warp: skip the O rescale.
          if (__any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
              acc_o[mt][dn][hf * 2] *= alpha;
              acc_o[mt][dn][hf * 2 + 1] *= alpha;
            }
          }
          float rs = 0.f;
#pragma unroll
          for (int n = 0; n < BN / 8; ++n) {
            const float p0 = exp2f(acc_s[mt][n][hf * 2] - m_use);
            const float p1 = exp2f(acc_s[mt][n][hf * 2 + 1] - m_use);
            rs += p0 + p1;
            if (has_dropout) {
              const int64_t bh = b * p.hq + row_h[mt][hf];
              const float2 k2 = drop.pair(static_cast<uint32_t>(bh), static_cast<uint32_t>(row_i[mt][hf]),
                                          static_cast<uint32_t>(j0 + n * 8 + 2 * t));
              acc_s[mt][n][hf * 2] = p0 * k2.x;
              acc_s[mt][n][hf * 2 + 1] = p1 * k2.y;
            } else {
              acc_s[mt][n][hf * 2] = p0;
              acc_s[mt][n][hf * 2 + 1] = p1;
            }
          }
          l_run[mt][hf] += rs;
        }
      }
    }

    if (warp_active && !skip) {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        FragA<T> a[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) a_from_c(a[mt], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          FragB<T> bb;
          KTile::ldb_t(bb, sV, kk * 16, dn * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma(acc_o[mt][2 * dn], a[mt], bb, 0);
            mma(acc_o[mt][2 * dn + 1], a[mt], bb, 1);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this stage: refill it with the tile after next
    int tile_after = tile_next < t_end ? next_tile(tile_next + 1, bits) : t_end;
    if (tile_after < t_end) load_tile(tile_after, stage);
    cp_async_commit();
    tile = tile_next;
    tile_next = tile_after;
    const uint64_t b = bits;
    bits = bits_next;
    bits_next = b;
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = warp_sum4(l_run[mt][hf]);
      if (!row_ok[mt][hf]) continue;
      // A row with no allowed key (and no sink) has l = 0: output 0 and lse -inf, never NaN.
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float m_use = m_run[mt][hf] == -INFINITY ? 0.f : m_run[mt][hf];
      const float lse = l > 0.f ? (m_use + log2f(l)) * kLn2 : -INFINITY;
      const int64_t bh = b * p.hq + row_h[mt][hf];
      const int i = row_i[mt][hf];
      if (p.num_splits == 1) {
        T* out = static_cast<T*>(p.out) + b * p.out_st.b + row_h[mt][hf] * p.out_st.h + i * p.out_st.r;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          const int c = dn * 8 + 2 * t;
          if (c < Ev) st2<T>(out + c, acc_o[mt][dn][hf * 2] * inv, acc_o[mt][dn][hf * 2 + 1] * inv);
        }
        if (t == 0) p.lse[bh * p.L + i] = lse;
      } else {
        const int64_t prow = (static_cast<int64_t>(blockIdx.z) * p.batch * p.hq + bh) * p.L + i;
        float* out = p.o_partial + prow * Ev;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          const int c = dn * 8 + 2 * t;
          if (c < Ev)
            *reinterpret_cast<float2*>(out + c) = make_float2(acc_o[mt][dn][hf * 2] * inv, acc_o[mt][dn][hf * 2 + 1] * inv);
        }
        if (t == 0) p.lse_partial[prow] = lse;
      }
    }
  }
}

// Merge of the split-key partials: lse = log(sum_s exp(lse_s) + exp(sink)), out = sum_s exp(lse_s - lse) out_s.
// One block per (batch * head, row) (grid-stride): thread s holds split s's lse, block reductions give the max and
// the sum, the weights go to shared memory, then threads take output columns (c = tid % 128) and split halves
// (tid / 128) so the partial outputs are read coalesced with many loads in flight. A decode row has up to 128
// splits: one warp per row walking them in sequence left the merge latency-bound (about three times the
// attention kernel itself at B = 1, S = 32k). At most tiles::kMaxSplits splits.
constexpr int kMaxSplits = tiles::kMaxSplits;

__device__ __forceinline__ float block_reduce_256(float x, bool is_max, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read from the previous reduction
  if ((threadIdx.x & 31) == 0) red[warp] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < 8; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

template <class T>
__global__ void __launch_bounds__(256) merge_splits_kernel(const __grid_constant__ AttnParams p) {
  __shared__ float red[8];
  __shared__ float weight[kMaxSplits];
  __shared__ float half_acc[128];
  const int64_t rows = p.batch * p.hq * p.L;
  const int ns = p.num_splits;
  const int t = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bh = row / p.L, i = row % p.L, b = bh / p.hq, h = bh % p.hq;
    const float ls = t < ns ? p.lse_partial[t * rows + row] : -INFINITY;
    const float sink = p.sinks ? p.sinks[h] : -INFINITY;
    const float mx = fmaxf(block_reduce_256(ls, true, red), sink);
    float lse = -INFINITY;
    if (mx != -INFINITY) {
      const float part = ls != -INFINITY ? __expf(ls - mx) : 0.f;
      const float sum = block_reduce_256(part, false, red) + (sink != -INFINITY ? __expf(sink - mx) : 0.f);
      lse = mx + __logf(sum);
    }
    if (t < ns) weight[t] = (lse != -INFINITY && ls != -INFINITY) ? __expf(ls - lse) : 0.f;
    __syncthreads();
    T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
    const int half = t >> 7;
    for (int c0 = 0; c0 < p.Ev; c0 += 128) {
      const int c = c0 + (t & 127);
      float acc = 0.f;
      if (c < p.Ev) {
        const float* src = p.o_partial + row * p.Ev + c;
#pragma unroll 8
        for (int s = half; s < ns; s += 2) acc += weight[s] * src[static_cast<int64_t>(s) * rows * p.Ev];
      }
      if (half == 1) half_acc[t & 127] = acc;
      __syncthreads();
      if (half == 0 && c < p.Ev) out[c] = from_float<T>(acc + half_acc[t]);
      __syncthreads();
    }
    if (t == 0) p.lse[row] = lse;
  }
}

// Launches the merge after a split-key forward.
template <class T>
inline cudaError_t launch_merge(const AttnParams& p, cudaStream_t stream) {
  const int64_t all_rows = p.batch * p.hq * p.L;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(all_rows, int64_t(1) << 20));
  merge_splits_kernel<T><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
