// FA2-style backward on CPU.
//
// A task is a KV head (batch, kv head), or a chunk of its key tiles when there are fewer than two KV heads per
// thread. A task owns dK and dV of its key tiles and accumulates the dQ^T of the G query heads of the group
// (chunks leave partial dQ^T that are summed per head afterwards), so no two threads write the same gradient.
// Per task:
//   prepack Q, dO of all G*L query rows (in the two layouts the GEMMs need), Delta = rowsum(dO * O), lse
//   for each key tile j (kBlockN keys):            dK_j, dV_j accumulators (float)
//     for each query tile i it can see (kBlockM rows of one query head; causal / fully masked tiles skipped):
//       S^T  = K_j Q_i^T           P^T = exp(S^T * scale + bias - lse)   (recomputed, never stored)
//       dP^T = V_j dO_i^T          dS^T = P^T * (dP^T - Delta)           (dropout: same Philox mask as forward)
//       dV_j += P_drop^T dO_i      dK_j += dS^T Q_i      dQ_i^T += K_j^T dS^T
// Working in the transposed (key-major) orientation makes every GEMM operand either prepacked once or produced
// row-major by the elementwise pass, so no per-tile transposes are needed. Extra memory per thread:
// O(G * L * D) for the prepacked rows and dQ^T, O(kBlockN * D) per key tile.
#include <vector>

#include "cpu/kernel.h"
#include "cpu/mask.h"
#include "cpu/softmax.h"
#include "cpu/tile.h"

namespace sdpax::cpu {

namespace {

constexpr int64_t kBlockM = 128; // query rows per tile (one query head)
constexpr int64_t kBlockN = 128;  // keys per tile

struct BwdLocal {
  Scratch qtb, qb, dotb, dob, delta, lse, dqt;
  Scratch ka, va, kta, dk, dv;
  Scratch st, dpt, pa, dsa, dsb, fbuf, tb, tf, dqrow;
  TileMask mask;
};

// T: the element type of the tensors; C: the type GEMM operands are packed in (dispatch_dtype).
template <class T, class C>
struct BwdKernel {
  const AttnParams& p;
  const int64_t G, GL, Ep, Evp, q_tiles, kv_tiles;
  const Dropout drop;

  explicit BwdKernel(const AttnParams& params)
      : p(params), G(params.hq / params.hkv), GL(G * params.L), Ep(padk<C>(params.E)), Evp(padk<C>(params.Ev)),
        q_tiles((params.L + kBlockM - 1) / kBlockM), kv_tiles((params.S + kBlockN - 1) / kBlockN), drop(params) {}

  // Prepacked layouts of the rows of query tile qt (over g, then tiles of one head).
  int64_t qt_stride() const { return kBlockM * std::max(Ep, Evp) + 64; }

  void prepack(BwdLocal& loc, int64_t b, int64_t hkv, bool write_sinks) const {
    const int64_t nqt = G * q_tiles;
    C* qtb = loc.qtb.get<C>(nqt * qt_stride());
    C* qb = loc.qb.get<C>(nqt * qt_stride());
    C* dotb = loc.dotb.get<C>(nqt * qt_stride());
    C* dob = loc.dob.get<C>(nqt * qt_stride());
    float* delta = loc.delta.get<float>(GL);
    float* lse = loc.lse.get<float>(GL);
    thread_local std::vector<float> orow, grow;
    orow.resize(p.Ev);
    grow.resize(p.Ev);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hkv * G + g;
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
      const T* o = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h;
      const T* d = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h;
      for (int64_t t = 0; t < q_tiles; ++t) {
        const int64_t i0 = t * kBlockM, M = std::min(kBlockM, p.L - i0);
        const int64_t off = (g * q_tiles + t) * qt_stride();
        pack_b_cols(q + i0 * p.q_st.r, p.q_st.r, p.q_st.c, p.E, M, qtb + off);
        pack_b_rows(q + i0 * p.q_st.r, p.q_st.r, p.q_st.c, M, p.E, qb + off);
        pack_b_cols(d + i0 * p.dout_st.r, p.dout_st.r, p.dout_st.c, p.Ev, M, dotb + off);
        pack_b_rows(d + i0 * p.dout_st.r, p.dout_st.r, p.dout_st.c, M, p.Ev, dob + off);
      }
      float sink_term = 0.f;
      for (int64_t i = 0; i < p.L; ++i) {
        load_row(o + i * p.out_st.r, p.out_st.c, p.Ev, p.Ev, orow.data());
        load_row(d + i * p.dout_st.r, p.dout_st.c, p.Ev, p.Ev, grow.data());
        float dl = 0.f;
        for (int64_t e = 0; e < p.Ev; ++e) dl += orow[e] * grow[e];
        const float l = p.lse[(b * p.hq + h) * p.L + i];
        delta[g * p.L + i] = dl;
        // Kept in log2 units (grad_row works there). A row that saw nothing has lse -inf; +inf makes every
        // recomputed probability exp2(x - inf) = 0.
        lse[g * p.L + i] = l == kNegInf ? std::numeric_limits<float>::infinity() : l * kLog2e;
        if (p.sinks && l != kNegInf) sink_term += std::exp(p.sinks[h] - l) * dl;
      }
      if (p.dsinks_bh && write_sinks) p.dsinks_bh[b * p.hq + h] = -sink_term;
    }
  }

  // One key row of the transposed tile: P^T = exp(S^T * scale + bias + key_bias - lse) (zero before column r0, the
  // causal start; lse2 is the log-sum-exp in log2 units), P_drop^T = P^T * keep factors, dS^T = P^T * (dP^T *
  // factors - Delta), written as C with zero padding up to Mp. With a softcap S^T is the capped score and dS^T is
  // taken through the cap: times 1 - t^2, t = S^T * scale / softcap (softcap_tile).
  void grad_row(const float* srow, const float* dprow, const float* bias, float key_bias, const float* f,
                const float* lse2, const float* delta, int64_t r0, int64_t M, int64_t Mp, C* prow, C* dsrow) const {
    std::fill(prow, prow + r0, C(0.f));
    std::fill(dsrow, dsrow + r0, C(0.f));
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 vs = _mm512_set1_ps(p.scale * kLog2e), vl2e = _mm512_set1_ps(kLog2e);
    const __m512 vkb = _mm512_set1_ps(key_bias * kLog2e);
    const bool capped = p.softcap > 0.f;
    const __m512 vt = _mm512_set1_ps(capped ? p.scale / p.softcap : 0.f), vone = _mm512_set1_ps(1.f);
    auto run = [&](auto hw_tag) {
      constexpr bool kHw = decltype(hw_tag)::value;
      // (P_drop^T, dS^T) of rows [r, r + 16) in lanes k.
      auto step = [&](int64_t r, __mmask16 k, __m512& pd, __m512& ds) SDPAX_INLINE_LAMBDA {
        // log2 domain: x = s * scale * log2e + bias * log2e - lse2
        __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, srow + r), vs, _mm512_maskz_loadu_ps(k, lse2 + r));
        if (bias) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, bias + r), vl2e, x);
        if (key_bias != 0.f) x = _mm512_add_ps(x, vkb);
        const __m512 pr = exp2_512<kExpDegree<C>>(x, k);
        __m512 dp = _mm512_maskz_loadu_ps(k, dprow + r);
        pd = pr;
        if (f) {
          const __m512 fv = _mm512_maskz_loadu_ps(k, f + r);
          pd = _mm512_mul_ps(pr, fv);
          dp = _mm512_mul_ps(dp, fv);
        }
        ds = _mm512_mul_ps(pr, _mm512_sub_ps(dp, _mm512_maskz_loadu_ps(k, delta + r)));
        if (capped) {
          const __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, srow + r), vt);
          ds = _mm512_mul_ps(ds, _mm512_fnmadd_ps(t, t, vone));
        }
      };
      int64_t r = r0;
      for (; r + 32 <= M; r += 32) {  // full chunks: no tail mask, paired conversions
        __m512 pd0, ds0, pd1, ds1;
        step(r, 0xffff, pd0, ds0);
        step(r + 16, 0xffff, pd1, ds1);
        store2_c<C, kHw>(prow + r, pd0, pd1);
        store2_c<C, kHw>(dsrow + r, ds0, ds1);
      }
      for (; r < M; r += 16) {
        const __mmask16 k = tail_mask(M - r);
        __m512 pd, ds;
        step(r, k, pd, ds);
        store_c<C, kHw>(prow + r, pd, k);
        store_c<C, kHw>(dsrow + r, ds, k);
      }
    };
    if (cpu_has_bf16()) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
#else
    for (int64_t r = r0; r < M; ++r) {
      const float x = (srow[r] * p.scale + (bias ? bias[r] : 0.f) + key_bias) * kLog2e - lse2[r];
      const float pr = std::exp2(x);
      const float fr = f ? f[r] : 1.f;
      prow[r] = static_cast<C>(pr * fr);
      const float t = p.softcap > 0.f ? srow[r] * p.scale / p.softcap : 0.f;
      dsrow[r] = static_cast<C>(pr * (dprow[r] * fr - delta[r]) * (1.f - t * t));
    }
#endif
    std::fill(prow + M, prow + Mp, C(0.f));
    std::fill(dsrow + M, dsrow + Mp, C(0.f));
  }

  // Key tile t against query tile (g, qt): accumulates into dk/dv (key-major) and dQ^T.
  void pair(BwdLocal& loc, int64_t b, int64_t hkv, int64_t g, int64_t qt, int64_t t, const C* ka, const C* va,
            const C* kta, float* dk, float* dv, float* dqt) const {
    const int64_t h = hkv * G + g;
    const int64_t i0 = qt * kBlockM, M = std::min(kBlockM, p.L - i0), Mp = padk<C>(M);
    const int64_t j0 = t * kBlockN, width = std::min(kBlockN, p.S - j0);
    // The whole tile is past the causal edge of its last row, or before the window of its first row.
    if (key_end(p, i0 + M - 1) <= j0 || key_begin(p, i0) >= j0 + width) return;
    const bool masked = p.mask_kind != MaskKind::None;
    if (masked) {
      loc.mask.set_rows(p, M, [&](int64_t r, int64_t& bb, int64_t& hh, int64_t& ii) {
        bb = b;
        hh = h;
        ii = i0 + r;
      });
      if (loc.mask.load(p, j0, width)) return;
    }
    // Keys past the last one the mask lets through (a padded tail, rounded up to 32) have P = dS = 0: they are
    // left out of all five GEMMs. kta keeps the whole tile's leading dimension.
    const int64_t n = masked ? std::min(width, round_up(loc.mask.visible_end, 32)) : width, np = padk<C>(n);
    const int64_t kta_ld = padk<C>(width);
    const int64_t off = (g * q_tiles + qt) * qt_stride();
    float* st = loc.st.get<float>(kBlockN * kBlockM);
    float* dpt = loc.dpt.get<float>(kBlockN * kBlockM);
    gemm(n, M, Ep, ka, Ep, loc.qtb.get<C>(0) + off, M, st, kBlockM, false);
    gemm(n, M, Evp, va, Evp, loc.dotb.get<C>(0) + off, M, dpt, kBlockM, false);
    if (p.softcap > 0.f) softcap_tile(st, n, M, kBlockM, p.scale, p.softcap);

    float* fbuf = nullptr;
    if (drop.on) {
      fbuf = loc.fbuf.get<float>(kBlockM * kBlockN);
      for (int64_t r = 0; r < M; ++r) drop.factors(b * p.hq + h, i0 + r, j0, n, fbuf + r * kBlockN);
    }
    const float* lse = loc.lse.get<float>(0) + g * p.L + i0;
    const float* delta = loc.delta.get<float>(0) + g * p.L + i0;
    C* pa = loc.pa.get<C>(kBlockN * (kBlockM + 2));
    C* dsa = loc.dsa.get<C>(kBlockN * (kBlockM + 2));
    // The mask in key-major order: one value per key row when all query rows share the mask row, else the
    // tile's bias rows transposed (both vectorised; the elementwise pass then reads contiguous rows).
    const bool uniform = masked && loc.mask.uniform();
    float* bt = nullptr;
    if (masked && !uniform) {
      float* rows = loc.tb.get<float>(2 * kBlockM * kBlockN);
      bt = rows + kBlockM * kBlockN;
      for (int64_t r = 0; r < M; ++r) row_bias(loc.mask.row_masks[r], n, rows + r * n);
      transpose32(reinterpret_cast<const uint32_t*>(rows), n, M, n, reinterpret_cast<uint32_t*>(bt), kBlockM);
    }
    float* tf = loc.tf.get<float>(kBlockM);
    // Key j is seen by the rows i with key_begin(i) <= j < key_end(i): both edges grow by one per row, so these
    // are the rows [j - (key_end(0) - 1), j - key_begin(0)] of the tile.
    const int64_t end0 = key_end(p, 0) - 1, begin0 = key_begin(p, 0);
    const bool edge = p.causal != Causal::None || p.win_right >= 0, windowed = p.win_left >= 0;
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      int64_t r0 = edge ? std::clamp<int64_t>(j - end0 - i0, 0, M) : 0;
      const int64_t r1 = windowed ? std::clamp<int64_t>(j - begin0 - i0 + 1, r0, M) : M;
      const float key_bias = uniform ? loc.mask.row_masks[0].at(jj) : 0.f;
      if (key_bias == kNegInf) r0 = M;  // this key is hidden from every row of the tile
      if (fbuf)
        for (int64_t r = r0; r < r1; ++r) tf[r] = fbuf[r * kBlockN + jj];
      // Rows [r1, M) are past the window: grad_row zeroes them as padding.
      grad_row(st + jj * kBlockM, dpt + jj * kBlockM, bt ? bt + jj * kBlockM : nullptr, key_bias,
               fbuf ? tf : nullptr, lse, delta, std::min(r0, r1), r1, Mp, pa + jj * Mp, dsa + jj * Mp);
    }
    if (np > n) {
      std::fill(pa + n * Mp, pa + np * Mp, C(0.f));
      std::fill(dsa + n * Mp, dsa + np * Mp, C(0.f));
    }
    gemm(n, p.Ev, Mp, pa, Mp, loc.dob.get<C>(0) + off, p.Ev, dv, p.Ev, true);
    gemm(n, p.E, Mp, dsa, Mp, loc.qb.get<C>(0) + off, p.E, dk, p.E, true);
    // dQ^T (E x M) += K^T (E x n) dS^T (n x M): dS^T as a B operand (VNNI pairs of key rows for bfloat16).
    const C* dsb = dsa;
    int64_t ldb = Mp;
    if constexpr (kVnni<C>) {
      C* vn = loc.dsb.get<C>(np * M);
      for (int64_t k = 0; k < np; k += 2)
        vnni_pair(reinterpret_cast<const uint16_t*>(dsa + k * Mp), reinterpret_cast<const uint16_t*>(dsa + (k + 1) * Mp),
                  M, reinterpret_cast<uint16_t*>(vn + k * M));
      dsb = vn;
      ldb = M;
    }
    gemm(p.E, M, np, kta, kta_ld, dsb, ldb, dqt + (g * q_tiles + qt) * p.E * kBlockM, kBlockM, true);
  }

  // dQ^T accumulators: one E x kBlockM block per query tile, so the dQ GEMM writes a compact C.
  int64_t dq_size() const { return G * q_tiles * p.E * kBlockM; }

  // Key tiles [t0, t1) of KV head (b, hkv): writes their dK / dV and accumulates dQ^T into dqt.
  void head_chunk(BwdLocal& loc, int64_t b, int64_t hkv, int64_t t0, int64_t t1, bool first_chunk, float* dqt) const {
    prepack(loc, b, hkv, first_chunk);
    std::fill(dqt, dqt + dq_size(), 0.f);
    C* ka = loc.ka.get<C>(kBlockN * Ep);
    C* va = loc.va.get<C>(kBlockN * Evp);
    C* kta = loc.kta.get<C>(p.E * (kBlockN + 2));
    float* dk = loc.dk.get<float>(kBlockN * p.E);
    float* dv = loc.dv.get<float>(kBlockN * p.Ev);
    const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hkv * p.k_st.h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hkv * p.v_st.h;
    T* dkout = static_cast<T*>(p.dk) + b * p.dk_st.b + hkv * p.dk_st.h;
    T* dvout = static_cast<T*>(p.dv) + b * p.dv_st.b + hkv * p.dv_st.h;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kBlockN, n = std::min(kBlockN, p.S - j0), np = padk<C>(n);
      pack_a(k + j0 * p.k_st.r, p.k_st.r, p.k_st.c, n, p.E, Ep, ka);
      pack_a(v + j0 * p.v_st.r, p.v_st.r, p.v_st.c, n, p.Ev, Evp, va);
      pack_a_transposed(k + j0 * p.k_st.r, p.k_st.r, p.k_st.c, n, p.E, np, kta);
      std::fill(dk, dk + n * p.E, 0.f);
      std::fill(dv, dv + n * p.Ev, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t qt = 0; qt < q_tiles; ++qt) pair(loc, b, hkv, g, qt, t, ka, va, kta, dk, dv, dqt);
      write_rows(dk, n, p.E, p.scale, dkout + j0 * p.dk_st.r, p.dk_st.r, p.dk_st.c);
      write_rows(dv, n, p.Ev, 1.f, dvout + j0 * p.dv_st.r, p.dv_st.r, p.dv_st.c);
    }
  }

  // dQ^T of KV head (b, hkv) back to rows: transpose each query tile's block, scale and convert.
  void write_dq(BwdLocal& loc, int64_t b, int64_t hkv, const float* dqt) const {
    float* rows = loc.dqrow.get<float>(kBlockM * p.E);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hkv * G + g;
      for (int64_t qt = 0; qt < q_tiles; ++qt) {
        const int64_t i0 = qt * kBlockM, M = std::min(kBlockM, p.L - i0);
        transpose32(reinterpret_cast<const uint32_t*>(dqt + (g * q_tiles + qt) * p.E * kBlockM), kBlockM, p.E, M,
                    reinterpret_cast<uint32_t*>(rows), p.E);
        write_rows(rows, M, p.E, p.scale, static_cast<T*>(p.dq) + b * p.dq_st.b + h * p.dq_st.h + i0 * p.dq_st.r,
                   p.dq_st.r, p.dq_st.c);
      }
    }
  }

  // dst row r = src row r (cols floats) * scale, as T.
  static void write_rows(float* src, int64_t rows, int64_t cols, float scale, T* dst, int64_t rs, int64_t cs) {
    for (int64_t r = 0; r < rows; ++r) {
      float* x = src + r * cols;
      if (scale != 1.f) scale_row(x, cols, scale);
      if (cs == 1) {
        convert_n(x, dst + r * rs, cols);
      } else {
        for (int64_t c = 0; c < cols; ++c) dst[r * rs + c * cs] = static_cast<T>(x[c]);
      }
    }
  }

  // With at least two KV heads per thread each task is a whole head. With fewer (MQA, a single sequence), the
  // key tiles of a head are split into chunks: each chunk owns its dK / dV rows and leaves a partial dQ^T in
  // `partial`, summed per head afterwards (fixed order, so the result does not depend on the thread count's
  // scheduling).
  void operator()(int64_t chunks, float* partial) const {
    const int64_t heads = p.batch * p.hkv;
    const int64_t per = (kv_tiles + chunks - 1) / chunks;
    run_tasks(heads * chunks, kVnni<C>, [&](int64_t t) {
      thread_local BwdLocal loc;
      const int64_t head = t / chunks, c = t % chunks;
      const int64_t b = head / p.hkv, hkv = head % p.hkv;
      const int64_t t0 = std::min(kv_tiles, c * per), t1 = std::min(kv_tiles, t0 + per);
      float* dqt = chunks == 1 ? loc.dqt.get<float>(dq_size()) : partial + t * dq_size();
      head_chunk(loc, b, hkv, t0, t1, c == 0, dqt);
      if (chunks == 1) write_dq(loc, b, hkv, dqt);
    });
    if (chunks == 1) return;
    run_tasks(heads, false, [&](int64_t head) {
      thread_local BwdLocal loc;
      float* sum = partial + head * chunks * dq_size();
      for (int64_t c = 1; c < chunks; ++c) {
        const float* part = sum + c * dq_size();
        for (int64_t x = 0; x < dq_size(); x += Vec::size()) {
          const int64_t cnt = std::min<int64_t>(Vec::size(), dq_size() - x);
          (Vec::loadu(sum + x, cnt) + Vec::loadu(part + x, cnt)).store(sum + x, cnt);
        }
      }
      write_dq(loc, head / p.hkv, head % p.hkv, sum);
    });
  }
};

template <class T, class C>
void bwd(const AttnParams& p) {
  const BwdKernel<T, C> kernel{p};
  const int64_t heads = p.batch * p.hkv;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (heads < 2 * threads) chunks = std::min(kernel.kv_tiles, (2 * threads + heads - 1) / heads);
  thread_local Scratch partial;
  float* part = chunks > 1 ? partial.get<float>(heads * chunks * kernel.dq_size()) : nullptr;
  kernel(chunks, part);
}

}  // namespace

void run_bwd(const AttnParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto c) {
    bwd<decltype(t), decltype(c)>(p);
  });
}

}  // namespace sdpax::cpu
