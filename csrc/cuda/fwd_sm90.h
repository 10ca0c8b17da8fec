// Hopper (sm90a) forward main loop: the same attention as fwd_kernel.h (row packing for GQA, causal tile skipping,
// sinks, split keys, the fully-masked-row guard, the epilogue), with both matrix products on wgmma.
//
// One block computes BM = 64 * kWG rows of one (batch, kv head); warpgroup w owns rows 64w..64w+63. Per key tile:
//   S = Q K^T     wgmma m64 n(BN) k16, Q and K from 128-byte-swizzled shared memory (K-major descriptors)
//   online softmax on S in registers (scale, causal bound, running max / sum, rescale of O)
//   O += P V      wgmma m64 n(D) k16, P from registers (the S accumulators rounded to 16 bits are P's A fragments),
//                 V from shared memory as the N-major (transposed) B operand: V is stored [key][head dim] exactly
//                 like K, no transpose is ever written.
// K/V tiles stream through a kStages-deep cp.async pipeline loaded by all threads; each tile is published with
// cp.async.wait + fence.proxy.async (wgmma reads through the async proxy) + a block barrier. Within a warpgroup,
// the softmax of tile j + 1 runs while the tensor cores compute P(j) V(j) (see the loop).
//
// The kernel body exists only in the sm_90a compilation (SDPAX_SM90A_DEVICE); the host launches it only on
// compute capability 9.x when the build contains sm_90a (launch.cu).
#pragma once
#include "cuda/mask.h"
#include "cuda/mma.h"
#include "cuda/wgmma.h"

namespace sdpax {
namespace cuda {

template <int D, int kKind>
struct FwdSm90Cfg {
  static constexpr int kWG = 2;  // warpgroups of 64 rows
  static constexpr int kBM = 64 * kWG;
  static constexpr int kBN = 128;  // keys per tile: the n of S's wgmma and the k extent of P V
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kStages = 3;  // K/V tiles resident: j (P V), j + 1 (Q K^T), j + 2 (landing)
  using QTile = Sw128Tile<kBM, D>;
  using KTile = Sw128Tile<kBN, D>;  // K and V stages share the layout
  // + 1024: the dynamic shared-memory base is rounded up to the 1024-byte alignment the swizzle atoms need.
  static constexpr int kSmem = QTile::kBytes + 2 * kStages * KTile::kBytes + 1024;
};

template <class T, int D, int kKind>
__global__ void __launch_bounds__(FwdSm90Cfg<D, kKind>::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ AttnParams p) {
#ifdef SDPAX_SM90A_DEVICE
  using Cfg = FwdSm90Cfg<D, kKind>;
  using QTile = typename Cfg::QTile;
  using KTile = typename Cfg::KTile;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = Cfg::kThreads, kStages = Cfg::kStages;
  static_assert(kKind == 0, "the sm90 main loop implements the plain kind");
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sK0 = sQ + QTile::kBytes;                  // K stage s at sK0 + s * KTile::kBytes
  const uint32_t sV0 = sK0 + kStages * KTile::kBytes;       // V stage s at sV0 + s * KTile::kBytes

  const int tid = threadIdx.x, wg = tid >> 7, wwarp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int G = static_cast<int>(p.hq / p.hkv);
  const int L = static_cast<int>(p.L), S = static_cast<int>(p.S);
  const int rows = G * L;
  const int m_blocks = (rows + BM - 1) / BM;
  const int m_block = m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks);  // heaviest causal blocks first
  const int64_t bhk = blockIdx.x / m_blocks;
  const int64_t b = bhk / p.hkv;
  const int hk = static_cast<int>(bhk % p.hkv);
  const int m0 = m_block * BM;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);

  // Query positions covered by the block (conservative when it spans two heads of a GQA group).
  const int r_last = min(m0 + BM, rows) - 1;
  const bool one_head = m0 / L == r_last / L;
  const int i_min = one_head ? m0 % L : 0;
  const int i_max = one_head ? r_last % L : L - 1;
  const int n_end = row_limit(p, i_max);           // keys >= n_end are invisible to every row of the block
  const int n_full = min(row_limit(p, i_min), S);  // keys < n_full pass causal/bounds for every row
  const int n_tiles = (n_end + BN - 1) / BN;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = static_cast<int>(blockIdx.z) * per_split;
  const int t_end = min(n_tiles, t_begin + per_split);

  // The two rows this thread holds in the accumulators: packed row m0 + 64 wg + 16 wwarp + 8 hf + g.
  int row_i[2], row_h[2], row_lim[2];
  bool row_ok[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = m0 + wg * 64 + wwarp * 16 + hf * 8 + g;
    row_ok[hf] = r < rows;
    const int rr = r < rows ? r : 0;
    row_h[hf] = hk * G + rr / L;
    row_i[hf] = rr % L;
    row_lim[hf] = row_limit(p, row_i[hf]);
  }

  // Q tile (zero rows past the end, zero columns past E), in the same cp.async group as the first K/V tile.
  {
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
  }
  auto load_kv = [&](uint32_t dst, const void* base, const Strides4& st, int cols, int tile) {
    const T* src0 = static_cast<const T*>(base) + b * st.b + static_cast<int64_t>(hk) * st.h;
    for (int idx = tid; idx < BN * (D / 8); idx += NT) {
      const int r = idx / (D / 8), c = idx % (D / 8);
      const int j = tile * BN + r;
      const bool ok = j < S && c * 8 < cols;
      cp_async16(dst + KTile::offset(r, c), ok ? src0 + static_cast<int64_t>(j) * st.r + c * 8 : src0, ok);
    }
  };
  auto load_tile = [&](int tile, int stage) {
    load_kv(sK0 + stage * KTile::kBytes, p.k, p.k_st, E, tile);
    load_kv(sV0 + stage * KTile::kBytes, p.v, p.v_st, Ev, tile);
  };

  const bool with_sinks = p.sinks != nullptr && p.num_splits == 1;
  float m_run[2], l_run[2];
  float acc_o[D / 2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    // A sink is one more logit in the denominator: start the running max at it with weight 1 (counted once).
    m_run[hf] = with_sinks ? p.sinks[row_h[hf]] * kLog2e : -INFINITY;
    l_run[hf] = with_sinks && t == 0 ? 1.f : 0.f;
  }
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
  const float scale_log2 = p.scale * kLog2e;

  // Descriptor bases: this warpgroup's 64 Q rows; K/V stage 0 (stage s adds s * KTile::kBytes to the address,
  // which sits in the low descriptor bits: no carry into the other fields for shared-memory addresses < 256 KB).
  const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 128, 16, 1024);
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
  // Scale, causal bound and online softmax of S in place (s then holds P in fp32); the factor that rescales O is
  // returned per row half and applied by the caller once O is no longer being accumulated into.
  auto softmax = [&](float (&s)[BN / 2], int tile, float (&alpha)[2]) {
    // Elementwise tests only where some element of the tile can fail them.
    const int j0 = tile * BN;
    const bool need_elem = j0 + BN > n_full;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = s[n * 4 + hf * 2 + e] * scale_log2;
          if (need_elem && j0 + n * 8 + 2 * t + e >= row_lim[hf]) v = -INFINITY;
          s[n * 4 + hf * 2 + e] = v;
          mx = fmaxf(mx, v);
        }
      }
      mx = warp_max4(mx);
      const float m_new = fmaxf(m_run[hf], mx);
      // Fully-masked-so-far guard: with every logit -inf, shift by 0 so exp2 gives 0 rather than NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[hf] = exp2f(m_run[hf] - m_use);
      m_run[hf] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2f(s[n * 4 + hf * 2 + e] - m_use);
          s[n * 4 + hf * 2 + e] = pe;
          rs += pe;
        }
      }
      l_run[hf] = l_run[hf] * alpha[hf] + rs;
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
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
  auto wait_tile = [&]() {
    fence_proxy_async();  // make this thread's cp.async writes visible to wgmma's async proxy
    __syncthreads();
  };

  // Pipeline (per warpgroup; the block barrier once per tile publishes tile j + 1 and frees tile j's stage):
  //   issue S(j+1) = Q K(j+1)^T; issue O += P(j) V(j); wait S(j+1); softmax(j+1) while P(j) V(j) runs on the
  //   tensor cores; wait O; rescale O; refill the stage of tile j with tile j + kStages.
  // kStages = 3 gives each load a whole iteration to land.
  int tile = t_begin;
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    if (tile + st < t_end) load_tile(tile + st, st);
    cp_async_commit();
  }
  // The steady-state loop has no data-dependent branch between a wgmma's issue and its wait: ptxas tracks the
  // in-flight groups through straight-line code only, and serializes every wgmma of the kernel (C7514) when it
  // cannot prove that the accumulators read after wait_group<1> belong to the completed group.
  if (tile < t_end) {
    float s[BN / 2];
    uint32_t pa[BN / 16][4];
    float alpha[2];
    cp_async_wait<kStages - 1>();
    wait_tile();
    wgmma_fence();
    issue_s(s, 0);
    wgmma_wait<0>();
    reg_fence(s);
    softmax(s, tile, alpha);
    to_a(s, pa);
    int stage = 0;
    for (; tile + 1 < t_end; ++tile) {
      const int next_stage = stage + 1 == kStages ? 0 : stage + 1;
      cp_async_wait<kStages - 2>();  // tile + 1's group is complete; tile + 2's may still be in flight
      wait_tile();
      wgmma_fence();
      issue_s(s, next_stage);
      const uint64_t vd = v_desc + ((stage * KTile::kBytes) >> 4);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_tb<D, T>(acc_o, pa[kk], vd + ((kk * 16 * 128) >> 4));
      wgmma_commit();
      wgmma_wait<1>();  // S(j+1) done; P(j) V(j) may still run
      reg_fence(s);
      softmax(s, tile + 1, alpha);
      wgmma_wait<0>();
      reg_fence(acc_o);
      reg_fence_u32(pa);  // the P fragments stay untouched until the wgmma that reads them is complete
      __syncthreads();    // every warpgroup is done with this stage: refill it with the tile kStages ahead
      if (tile + kStages < t_end) load_tile(tile + kStages, stage);
      cp_async_commit();
      rescale_o(alpha);
      to_a(s, pa);
      stage = next_stage;
    }
    // Last tile: P V only.
    const uint64_t vd = v_desc + ((stage * KTile::kBytes) >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_tb<D, T>(acc_o, pa[kk], vd + ((kk * 16 * 128) >> 4));
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc_o);
    reg_fence_u32(pa);
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = warp_sum4(l_run[hf]);
    if (!row_ok[hf]) continue;
    // A row with no allowed key (and no sink) has l = 0: output 0 and lse -inf, never NaN.
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float m_use = m_run[hf] == -INFINITY ? 0.f : m_run[hf];
    const float lse = l > 0.f ? (m_use + log2f(l)) * kLn2 : -INFINITY;
    const int64_t bh = b * p.hq + row_h[hf];
    const int i = row_i[hf];
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.out_st.b + row_h[hf] * p.out_st.h + i * p.out_st.r;
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
#endif
}

}  // namespace cuda
}  // namespace sdpax
