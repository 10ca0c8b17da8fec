// The Hopper forward's consumer warpgroups (0, 1: rows 64w..64w+63 of the row block), per key tile:
//   S = Q K^T     wgmma m64 n(BN) k16, Q and K from 128-byte-swizzled shared memory (K-major descriptors)
//   online softmax on S in registers (scale, causal bound, mask, running max / sum, dropout; softmax.h)
//   O += P V      wgmma m64 n(D) k16, P from registers (the S accumulators rounded to 16 bits are P's A fragments),
//                 V from shared memory as the N-major (transposed) B operand: V is stored [key][head dim] exactly
//                 like K, no transpose is ever written.
// Within a warpgroup, the softmax of tile j + 1 runs while the tensor cores compute P(j) V(j); the two warpgroups
// drift apart, so one's softmax also overlaps the other's matrix products.
#pragma once
#include <type_traits>

#include "cuda/fwd/epilogue.h"
#include "cuda/fwd/sm90_block.h"
#include "cuda/fwd/softmax.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
struct FwdSm90Consumer {
  using Block = FwdSm90Block<T, D, kKind>;
  using Cfg = typename Block::Cfg;
  using QTile = typename Block::QTile;
  using KTile = typename Block::KTile;
  static constexpr bool kGeneral = Block::kGeneral;
  static constexpr int BM = Block::BM, BN = Block::BN, NT = Block::NT, kStages = Block::kStages;
  // Softmax paths, one main loop each (main_loop): kPathDefault (no mask, or a staged bool mask: the plain kind's
  // only path), kPathDropout, and kPathElementwise (masks read from global memory element by element, with or
  // without dropout). One loop with every path inline spanned ~75 KB of instructions, the cold paths' invariants
  // hoisted into registers and spilled.
  static constexpr int kPathDefault = 0, kPathDropout = 1, kPathElementwise = 2;
  static_assert(!kGeneral || BN == 128 || BN == 64, "at most four 32-bit mask words per row");

  Block& k;
  const AttnParams& p;
  const int wg_bar;  // this warpgroup's named barrier
  // The two rows this thread holds in the accumulators: packed row m0 + 64 wg + 16 wwarp + 8 hf + g.
  int row_i[2], row_h[2], row_lim[2], row_lo[2];  // keys [row_lo, row_lim) pass causal / window / bounds
  bool row_ok[2];
  const bool with_sinks;
  float m_run[2], l_run[2];
  float acc_o[D / 2];
  const float scale_log2;
  // With a positive scale (every real call: 1 / sqrt(E) by default) the tests and the row max run on the unscaled
  // S and the scale enters the exponent's FFMA: max(s c) = c max(s) exactly for c > 0 (rounding is monotone), and
  // -inf c = -inf. That saves an FMUL per element (and the select no longer waits for one): 64 of the 619
  // instructions per tile and warp of the bool-mask consumers. A zero, negative or NaN scale (-inf 0 is NaN; a
  // negative scale reverses the max) scales first.
  const bool raw_scale;
  // Descriptor bases: this warpgroup's 64 Q rows (of the row block's Q buffer, set per row block); K/V stage 0
  // (stage s adds s * KTile::kBytes to the address, which sits in the low descriptor bits: no carry into the other
  // fields for shared-memory addresses < 256 KB).
  uint64_t q_desc;
  const uint64_t k_desc, v_desc;

  __device__ __forceinline__ explicit FwdSm90Consumer(Block& block)
      : k(block),
        p(block.p),
        wg_bar(kBarWarpgroup0 + block.wg),
        with_sinks(block.p.sinks != nullptr && block.p.num_splits == 1),
        scale_log2(block.p.scale * kLog2e),
        raw_scale(block.p.scale * kLog2e > 0.f),
        q_desc(sw128_desc(block.sQ + block.wg * 64 * 128, 16, 1024)),
        k_desc(sw128_desc(block.sK0, 16, 1024)),
        v_desc(sw128_desc(block.sV0, KTile::kBlockBytes, 1024)) {}

  // Q rows of row block qb into Q buffer buf (zero rows past the end, zero columns past E), one cp.async group.
  // Each warpgroup loads only its own 64 rows (the only ones its wgmma read), so a warpgroup barrier publishes them.
  __device__ __forceinline__ void load_q(const FwdBlock& qb, int buf) const {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = k.tid & 127; idx < 64 * (D / 8); idx += 128) {
      const int r = k.wg * 64 + idx / (D / 8), c = idx % (D / 8);
      const int pr = qb.m0 + r;
      const bool ok = pr < k.rows && c * 8 < k.E;
      const T* src = q;
      if (ok) src = q + qb.b * p.q_st.b + static_cast<int64_t>(qb.hk * k.G + pr / k.L) * p.q_st.h +
                    static_cast<int64_t>(pr % k.L) * p.q_st.r + c * 8;
      cp_async16(k.sQ + buf * QTile::kBytes + QTile::offset(r, c), src, ok);
    }
    cp_async_commit();
  }
  // The whole Q tile by all consumer threads (one row block per thread block), published to both warpgroups.
  __device__ __forceinline__ void load_q_all() const {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = k.tid; idx < BM * (D / 8); idx += NT) {
      const int r = idx / (D / 8), c = idx % (D / 8);
      const int pr = k.m0 + r;
      const bool ok = pr < k.rows && c * 8 < k.E;
      const T* src = q;
      if (ok) src = q + k.b * p.q_st.b + static_cast<int64_t>(k.hk * k.G + pr / k.L) * p.q_st.h +
                    static_cast<int64_t>(pr % k.L) * p.q_st.r + c * 8;
      cp_async16(k.sQ + QTile::offset(r, c), src, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();  // Q written by cp.async, read by wgmma
    named_barrier(kBarConsumersQ, NT);
  }

  // Packed mask of this thread's rows (allowed: causal/bounds pass and the mask is true), shifted right by 2t so
  // that bit 8m + e of bits[hf][w] is key tile * BN + 32w + 8m + 2t + e of row half hf (accumulator n = 4w + m).
  __device__ __forceinline__ void mask_bits(int stage, uint32_t (&bits)[2][4]) const {
    const uint4* sm = reinterpret_cast<const uint4*>(k.smem_m0 + stage * Cfg::kBitsBytes);
    const int r = k.wg * 64 + k.wwarp * 16 + k.g;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const uint4 w = sm[r + 8 * hf];
      bits[hf][0] = w.x >> (2 * k.t);
      bits[hf][1] = w.y >> (2 * k.t);
      bits[hf][2] = w.z >> (2 * k.t);
      bits[hf][3] = w.w >> (2 * k.t);
    }
  }
  // Whether this thread's bits of the tile are all set (the words past BN / 32 are zero and not looked at).
  __device__ __forceinline__ static bool all_set(const uint32_t (&bits)[2][4]) {
    uint32_t a = 0x03030303u;
#pragma unroll
    for (int w = 0; w < BN / 32; ++w) a &= bits[0][w] & bits[1][w];
    return a == 0x03030303u;
  }

  // S = Q K^T of one tile into s (fp32, 64 x BN per warpgroup), issued and committed, not waited for.
  __device__ __forceinline__ void issue_s(float (&s)[BN / 2], int stage) const {
    const uint64_t kd = k_desc + ((stage * KTile::kBytes) >> 4);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // k16 step kk: 64-column block kk / 4, 32-byte step kk % 4 inside the swizzled 128-byte rows.
      const uint32_t qoff = ((kk >> 2) * QTile::kBlockBytes + (kk & 3) * 32) >> 4;
      const uint32_t koff = ((kk >> 2) * KTile::kBlockBytes + (kk & 3) * 32) >> 4;
      wgmma_ss<BN, T>(s, q_desc + qoff, kd + koff, kk > 0);
    }
    wgmma_commit();
  }
  // O += P V of one tile (P in registers), issued, not committed.
  __device__ __forceinline__ void issue_pv(const uint32_t (&pa)[BN / 16][4], int stage) {
    const uint64_t vd = v_desc + ((stage * KTile::kBytes) >> 4);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs_tb<D, T>(acc_o, pa[kk], vd + ((kk * 16 * 128) >> 4));
  }
  // The last pending P V of a pipeline (tile n - 1 in V stage cur; nothing left to overlap it with): issue and wait.
  __device__ __forceinline__ void last_pv(uint32_t (&pa)[BN / 16][4], int cur, int n) {
    mbar_wait(k.bar_vfull0 + 8 * cur, ((n - 1) / kStages) & 1);
    wgmma_fence();
    issue_pv(pa, cur);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc_o);
    reg_fence_u32(pa);
  }
  // This warp is done with K stage st (and its mask bits) and, with kWithV, with V stage v_cur. A compile-time
  // choice: with a run-time test here ptxas sinks both arrivals past the next tile's rescale, and the producer,
  // getting its stages back late, stalls the short (d64) tiles measurably.
  template <bool kWithV>
  __device__ __forceinline__ void release(int st, int v_cur) const {
    __syncwarp();
    if (k.lane == 0) {
      mbar_arrive(k.bar_empty0 + 8 * st);
      if constexpr (kWithV) mbar_arrive(k.bar_vempty0 + 8 * v_cur);
    }
  }

  template <int kPath>
  __device__ __forceinline__ void mask_tile(float (&s)[BN / 2], int j0, const uint32_t (&bits)[2][4]) const;
  template <int kPath>
  __device__ __forceinline__ void dropout_tile(float (&s)[BN / 2], int j0, int hf) const;

  // Scale, mask and online softmax of S in place (s then holds P in fp32, dropout applied); the factor that
  // rescales O is returned per row half and applied by the caller once O is no longer being accumulated into.
  template <int kPath>
  __device__ __forceinline__ void softmax(float (&s)[BN / 2], int tile, const uint32_t (&bits)[2][4],
                                          float (&alpha)[2]) {
    const int j0 = tile * BN;
    // The factor still to apply in the exponent (1: s is already in log2 units).
    const bool raw = kPath != kPathElementwise && raw_scale;
    const float c = raw ? scale_log2 : 1.f;
    if (kPath != kPathElementwise && !raw) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] *= scale_log2;
    }
    mask_tile<kPath>(s, j0, bits);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n * 4 + hf * 2], s[n * 4 + hf * 2 + 1]));
      mx = warp_max4(mx) * c;  // in log2 units
      const float m_use = softmax_rescale(m_run[hf], mx, alpha[hf]);
      float rs = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        const float p0 = exp2f(fmaf(s[n * 4 + hf * 2], c, -m_use));
        const float p1 = exp2f(fmaf(s[n * 4 + hf * 2 + 1], c, -m_use));
        rs += p0 + p1;  // the denominator counts every key; dropout scales only what reaches P V
        s[n * 4 + hf * 2] = p0;
        s[n * 4 + hf * 2 + 1] = p1;
      }
      if (kPath == kPathDropout || (kPath == kPathElementwise && k.has_dropout)) dropout_tile<kPath>(s, j0, hf);
      l_run[hf] = l_run[hf] * alpha[hf] + rs;
    }
  }
  __device__ __forceinline__ void rescale_o(const float (&alpha)[2]) {
    // Once the running max settles, alpha is 1 for the whole warp: skip the O rescale.
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      acc_o[dn * 4] *= alpha[0];
      acc_o[dn * 4 + 1] *= alpha[0];
      acc_o[dn * 4 + 2] *= alpha[1];
      acc_o[dn * 4 + 3] *= alpha[1];
    }
  }
  // P (fp32 in s) rounded to 16 bits: the A fragment of k16 step n / 2 is (row g, keys 2t..) in registers 0 / 2
  // and (row g + 8, ..) in 1 / 3.
  __device__ __forceinline__ static void to_a(const float (&s)[BN / 2], uint32_t (&pa)[BN / 16][4]) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      pa[n >> 1][(n & 1) * 2] = pack2<T>(s[n * 4], s[n * 4 + 1]);
      pa[n >> 1][(n & 1) * 2 + 1] = pack2<T>(s[n * 4 + 2], s[n * 4 + 3]);
    }
  }

  // The key tile of published index n (the i-th of the row block) in K stage st, or -1 at the end of the row
  // block: the general kind reads what the producer published (it drops tiles, then publishes -1); the plain kind
  // knows its tiles and waits only for one that exists.
  __device__ __forceinline__ int next_tile(int n, int st, int i) const {
    if constexpr (kGeneral) {
      mbar_wait(k.bar_full0 + 8 * st, (n / kStages) & 1);
      return k.tile_of_stage[st];
    } else {
      if (i >= k.t_end - k.t_begin) return -1;
      mbar_wait(k.bar_full0 + 8 * st, (n / kStages) & 1);
      return k.t_begin + i;
    }
  }

  // The first tile of a pipeline (in K stage st; no P V to overlap with): S, the release of its K stage, softmax.
  template <int kPath>
  __device__ __forceinline__ void first(float (&s)[BN / 2], uint32_t (&pa)[BN / 16][4], float (&alpha)[2], int st,
                                        int tile, const uint32_t (&bits)[2][4]) {
    wgmma_fence();
    issue_s(s, st);
    wgmma_wait<0>();
    reg_fence(s);
    release<false>(st, 0);
    softmax<kPath>(s, tile, bits, alpha);
    to_a(s, pa);
  }
  // One steady-state step: S(nxt) = Q K(st)^T and O += P(cur) V(cur) issued together, the softmax of S(nxt) while
  // P V runs on the tensor cores, then the release of K(st) and V(cur). The caller rescales O and rounds P.
  template <int kPath>
  __device__ __forceinline__ void step(float (&s)[BN / 2], uint32_t (&pa)[BN / 16][4], float (&alpha)[2], int st,
                                       int cur, int n, int tile, const uint32_t (&bits)[2][4]) {
    mbar_wait(k.bar_vfull0 + 8 * cur, ((n - 1) / kStages) & 1);  // published before K(nxt): almost always in
    wgmma_fence();
    issue_s(s, st);
    issue_pv(pa, cur);
    wgmma_commit();
    wgmma_wait<1>();  // S(nxt) done; P(cur) V(cur) may still run
    reg_fence(s);
    softmax<kPath>(s, tile, bits, alpha);
    wgmma_wait<0>();
    reg_fence(acc_o);
    reg_fence_u32(pa);  // the P fragments stay untouched until the wgmma that reads them is complete
    release<true>(st, cur);
  }

  template <int kPath>
  __device__ __forceinline__ void main_loop();
  __device__ __forceinline__ void run_blocks();

  // This thread's rows of the row block in k.blk, and their running max / sum at the start.
  __device__ __forceinline__ void set_rows() {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = k.m0 + k.wg * 64 + k.wwarp * 16 + hf * 8 + k.g;
      row_ok[hf] = r < k.rows;
      const int rr = r < k.rows ? r : 0;
      row_h[hf] = k.hk * k.G + rr / k.L;
      row_i[hf] = rr % k.L;
      row_lim[hf] = row_limit(p, row_i[hf]);
      row_lo[hf] = row_begin(p, row_i[hf]);
      softmax_start(p, row_h[hf], with_sinks, k.t, m_run[hf], l_run[hf]);
    }
  }
  __device__ __forceinline__ void set_block(int u, int kk) {
    k.blk = k.block_of(u, kk);
    k.b = k.blk.b;
    k.hk = k.blk.hk;
    k.m0 = k.blk.m0;
    k.n_full = k.blk.n_full;
    k.lo_full = k.blk.lo_full;
    k.t_begin = k.blk.t_begin;
    k.t_end = k.blk.t_end;
    set_rows();
  }
  __device__ __forceinline__ void zero_o() {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
  }
  // Normalise and store the rows (eh, ei, eok) of batch eb from their running max em and sum el.
  __device__ __forceinline__ void epilogue(int64_t eb, const int (&eh)[2], const int (&ei)[2], const bool (&eok)[2],
                                           const float (&em)[2], const float (&el)[2]) const {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      fwd_store_row<T, D>(p, eb, eh[hf], ei[hf], eok[hf], em[hf], el[hf], k.t,
                          [&](int dn, int e) { return acc_o[dn * 4 + hf * 2 + e]; });
  }

  __device__ __forceinline__ void run() {
    if constexpr (Cfg::kMulti) {
      run_blocks();
    } else {
      // One row block per thread block (the launch gives the other kinds one unit each).
      set_rows();
      load_q_all();
      zero_o();
      if constexpr (kGeneral) {
        if (k.has_mask && !k.mask_staged)
          main_loop<kPathElementwise>();
        else if (k.has_dropout)
          main_loop<kPathDropout>();
        else
          main_loop<kPathDefault>();
      } else {
        main_loop<kPathDefault>();
      }
      epilogue(k.b, row_h, row_i, row_ok, m_run, l_run);
    }
  }
};

// This tile's per-element test (the elementwise path also scales to log2 units and adds the bias). The kind of
// test is chosen once per tile and warp (uniform branches around straight-line code): a test chosen inside the
// element loop put branches and reconvergence points between the elements, and ptxas then ran them one after
// another (~10 instructions and a BSSY/BSYNC per element, ~2400 static instructions per 64-key tile against ~450
// for the plain kind's 128-key tile).
template <class T, int D, FwdKind kKind>
template <int kPath>
__device__ __forceinline__ void FwdSm90Consumer<T, D, kKind>::mask_tile(float (&s)[BN / 2], int j0,
                                                                        const uint32_t (&bits)[2][4]) const {
  const int t = k.t;
  if (kPath == kPathElementwise) {
    // Masks read from global memory element by element (additive, or bool rows not 16-byte aligned). The row
    // offsets are recomputed here rather than kept live through the loop (registers).
    int64_t row_mask[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) row_mask[hf] = k.b * p.mask_st.b + row_h[hf] * p.mask_st.h + row_i[hf] * p.mask_st.r;
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
  } else if (k.mask_staged && !__all_sync(0xffffffffu, all_set(bits))) {
    // Packed bits (causal and bounds included). A warp whose bits are all set takes the unmasked branch below: the
    // common case for padding masks and for the inner tiles of block-structured masks.
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n * 4 + i] = (bits[i >> 1][n >> 2] >> (8 * (n & 3) + (i & 1))) & 1u ? s[n * 4 + i] : -INFINITY;
      }
    }
  } else if (!k.mask_staged && j0 + BN > k.n_full) {
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
  if (!kGeneral && j0 < k.lo_full) {
    // A sliding window's beginning (the plain kind; cuda/plan.cpp): only tiles that start before the keys every
    // row of the block may see.
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + n * 8 + 2 * t + (i & 1);
        s[n * 4 + i] = j >= row_lo[i >> 1] ? s[n * 4 + i] : -INFINITY;
      }
    }
  }
}

// Dropout of row half hf of the tile's P. Keys 8n + 2t + e use the random words of key group 2n + t / 2 (words
// 2(t & 1) + e), so lanes t and t ^ 1 need the same Philox block: each computes the one for n = 2m + (t & 1), keeps
// its half and hands the other half to its partner (half the Philox work, the same words as Dropout::pair).
template <class T, int D, FwdKind kKind>
template <int kPath>
__device__ __forceinline__ void FwdSm90Consumer<T, D, kKind>::dropout_tile(float (&s)[BN / 2], int j0, int hf) const {
  const int t = k.t;
  const Dropout& drop = k.drop;
  const uint32_t bh = static_cast<uint32_t>(k.b * p.hq + row_h[hf]), ri = static_cast<uint32_t>(row_i[hf]);
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

// Pipeline of one row block. Published tile n sits in K stage n % kStages behind its full barrier (phase
// n / kStages), its V in V stage n % kStages; `cur` is the tile whose P is in registers (P V pending), `nxt` the
// one whose Q K^T is issued next. Per warpgroup and tile:
//   wait K full(nxt), V full(cur); issue S(nxt) = Q K(nxt)^T; issue O += P(cur) V(cur); wait S(nxt);
//   softmax(nxt) while P(cur) V(cur) runs on the tensor cores; wait O; release K(nxt), V(cur); rescale O.
// No block barrier in the loop. The steady-state loop has no data-dependent branch between a wgmma's issue and its
// wait: ptxas tracks the in-flight groups through straight-line code only, and serializes every wgmma of the
// kernel (C7514) when it cannot prove that the accumulators read after wait_group<1> belong to the completed group.
template <class T, int D, FwdKind kKind>
template <int kPath>
__device__ __forceinline__ void FwdSm90Consumer<T, D, kKind>::main_loop() {
  int n = 0;    // published index of the tile whose Q K^T is next
  int cur = 0;  // its stage; then the stage of the pending P V
  int tile = next_tile(n, cur, 0);
  if (tile < 0) return;
  float s[BN / 2];
  uint32_t pa[BN / 16][4];
  float alpha[2];
  uint32_t bits[2][4] = {};
  if (k.mask_staged) mask_bits(cur, bits);
  first<kPath>(s, pa, alpha, cur, tile, bits);
  for (++n;; ++n) {
    const int st = cur + 1 == kStages ? 0 : cur + 1;
    tile = next_tile(n, st, n);
    if (tile < 0) break;
    if (k.mask_staged) mask_bits(st, bits);
    step<kPath>(s, pa, alpha, st, cur, n, tile, bits);
    rescale_o(alpha);
    to_a(s, pa);
    cur = st;
  }
  last_pv(pa, cur, n);  // last tile: P V only
}

// The row blocks of this thread block as one pipeline (kMulti: the plain kind, one softmax path): the Q K^T of a
// row block's first key tile is issued with the P V of the previous block's last tile, its softmax runs while that
// P V does, and the previous block's epilogue follows (after the wait that completes its O). Per block, only the
// epilogue's stores and one warpgroup barrier (the next Q) stay outside the overlap; the pipeline fills and drains
// once per thread block. Q of the it-th block sits in buffer it % 2; the one after it is loaded once the block
// before it has stopped reading its buffer. Every row block of a thread block with several has at least one key
// tile (launch_fwd_sm90.h); a lone block may have none.
template <class T, int D, FwdKind kKind>
__device__ __forceinline__ void FwdSm90Consumer<T, D, kKind>::run_blocks() {
  int u = blockIdx.x, kk = 0, it = 0;
  set_block(u, kk);
  zero_o();
  load_q(k.blk, 0);
  {
    int u2 = u, k2 = kk;
    k.advance(u2, k2);
    if (u2 < k.work.units)
      load_q(k.block_of(u2, k2), 1);
    else
      cp_async_commit();  // (an empty group: the wait below leaves exactly one in flight)
  }
  cp_async_wait<1>();
  fence_proxy_async();  // Q written by cp.async, read by wgmma
  named_barrier(wg_bar, 128);
  q_desc = sw128_desc(k.sQ + k.wg * 64 * 128, 16, 1024);
  if (k.t_end <= k.t_begin) {  // a lone row block that sees no key, or an empty key split (t_begin past the tiles)
    epilogue(k.b, row_h, row_i, row_ok, m_run, l_run);
    return;
  }
  float s[BN / 2];
  uint32_t pa[BN / 16][4];
  float alpha[2];
  const uint32_t no_bits[2][4] = {};
  // The finished block's epilogue data while the next one's first tile runs.
  int64_t e_b = 0;
  int e_h[2] = {0, 0}, e_i[2] = {0, 0};
  bool e_ok[2] = {false, false};
  float e_m[2] = {0.f, 0.f}, e_l[2] = {0.f, 0.f};
  mbar_wait(k.bar_full0, 0);
  first<kPathDefault>(s, pa, alpha, 0, k.t_begin, no_bits);
  int cur = 0, i = 1;  // stage of the pending P V; index of the next tile in its row block
  int n = 1;           // published index of the next tile
  for (;; ++n, ++i) {
    const int st = cur + 1 == kStages ? 0 : cur + 1;
    const bool fresh = i == k.t_end - k.t_begin;  // the next tile opens the next row block
    if (fresh) {
      k.advance(u, kk);
      if (u >= k.work.units) break;
      ++it;
      e_b = k.b;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        e_h[hf] = row_h[hf];
        e_i[hf] = row_i[hf];
        e_ok[hf] = row_ok[hf];
        e_m[hf] = m_run[hf];
        e_l[hf] = l_run[hf];
      }
      set_block(u, kk);
      i = 0;
      cp_async_wait<0>();
      fence_proxy_async();
      // This block's Q rows are in; every warp of the warpgroup is past the previous block's last Q K^T.
      named_barrier(wg_bar, 128);
      q_desc = sw128_desc(k.sQ + (it & 1) * QTile::kBytes + k.wg * 64 * 128, 16, 1024);
    }
    const int tile = k.t_begin + i;
    mbar_wait(k.bar_full0 + 8 * st, (n / kStages) & 1);
    step<kPathDefault>(s, pa, alpha, st, cur, n, tile, no_bits);
    if (fresh) {
      epilogue(e_b, e_h, e_i, e_ok, e_m, e_l);
      zero_o();
      // The finished block's Q buffer takes the block after this one.
      int u2 = u, k2 = kk;
      k.advance(u2, k2);
      if (u2 < k.work.units) load_q(k.block_of(u2, k2), (it + 1) & 1);
    } else {
      rescale_o(alpha);
    }
    to_a(s, pa);
    cur = st;
  }
  last_pv(pa, cur, n);  // last tile of the last row block: P V only
  epilogue(k.b, row_h, row_i, row_ok, m_run, l_run);
}

}  // namespace cuda
}  // namespace sdpax
