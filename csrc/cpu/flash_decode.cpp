// Forward for short query lengths (L <= kDecodeMaxL), the decode step of a language model.
//
// With a handful of query rows the work is bound by reading K and V, so each KV head's keys are streamed exactly
// once for all G * L query rows of its group (GQA rows share every K/V load), in blocks of kBlock keys widened to
// float32 in L1, with the dot products and the P V update in AVX-512 FMAs (no packing for a GEMM library).
// When there are fewer KV heads than twice the threads, the key sequence is also split into chunks; each chunk
// leaves (acc, running max, denominator) per row and a merge pass combines them by log-sum-exp.
#include <vector>

#include "cpu/kernel.h"
#include "cpu/mask.h"
#include "cpu/softmax.h"
#include "cpu/tile.h"

namespace sdpax::cpu {

namespace {

constexpr int64_t kBlock = 64;
constexpr int64_t kMinChunk = 512;

struct DecodeLocal {
  Scratch qf, kf, vf, s, pb, acc, dropf;
  std::vector<float> m, l;
  TileMask mask;
};

template <class T>
struct DecodeKernel {
  const AttnParams& p;
  const int64_t G, R, heads, chunks, chunk_len;
  const Dropout drop;
  float* partial;  // per (head, chunk): R x (Ev + 2): acc, then m, l

  DecodeKernel(const AttnParams& params, int64_t n_chunks, float* partial_buf)
      : p(params), G(params.hq / params.hkv), R(G * params.L), heads(params.batch * params.hkv), chunks(n_chunks),
        chunk_len((params.S + n_chunks - 1) / n_chunks), drop(params), partial(partial_buf) {}

  int64_t row_stride() const { return p.Ev + 2; }


  // Keys [s0, s1) of KV head (b, hkv): leaves unnormalised acc, m and l per row in the given buffers.
  void run_chunk(DecodeLocal& loc, int64_t b, int64_t hkv, int64_t s0, int64_t s1, float* acc, float* m, float* l) const {
    const int64_t E = p.E, Ev = p.Ev;
    float* qf = loc.qf.get<float>(R * E);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hkv * G + r / p.L, i = r % p.L;
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + i * p.q_st.r;
      load_row(q, p.q_st.c, E, E, qf + r * E);
    }
    float* kf = loc.kf.get<float>(kBlock * E);
    float* vf = loc.vf.get<float>(kBlock * Ev);
    float* s = loc.s.get<float>(R * kBlock);
    float* pb = loc.pb.get<float>(R * kBlock);
    std::fill(acc, acc + R * Ev, 0.f);
    std::fill(m, m + R, kNegInf);
    std::fill(l, l + R, 0.f);
    const bool masked = p.mask_kind != MaskKind::None;
    if (masked) {
      loc.mask.set_rows(p, R, [&](int64_t r, int64_t& bb, int64_t& hh, int64_t& ii) {
        bb = b;
        hh = hkv * G + r / p.L;
        ii = r % p.L;
      });
    }
    const RowMask no_mask;
    float* dropf = drop.on ? loc.dropf.get<float>(kBlock) : nullptr;
    // Causal: the last query row sees the most keys.
    const int64_t visible = std::min(s1, causal_limit(p.causal, p.L - 1, p.L, p.S));
    const T* kbase = static_cast<const T*>(p.k) + b * p.k_st.b + hkv * p.k_st.h;
    const T* vbase = static_cast<const T*>(p.v) + b * p.v_st.b + hkv * p.v_st.h;

    for (int64_t j0 = s0; j0 < visible; j0 += kBlock) {
      const int64_t n = std::min(kBlock, s1 - j0);
      if (masked && loc.mask.load(p, j0, n)) continue;
      pack_a(kbase + j0 * p.k_st.r, p.k_st.r, p.k_st.c, n, E, E, kf);
      pack_a(vbase + j0 * p.v_st.r, p.v_st.r, p.v_st.c, n, Ev, Ev, vf);
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = qf + r * E;
        float* sr = s + r * kBlock;
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = kf + j * E;
          Vec d(0.f);
          int64_t e = 0;
          for (; e + Vec::size() <= E; e += Vec::size()) d = at::vec::fmadd(Vec::loadu(qr + e), Vec::loadu(kj + e), d);
          float dot = d.reduce_add();
          for (; e < E; ++e) dot += qr[e] * kj[e];
          sr[j] = dot;
        }
        const int64_t i = r % p.L, h = hkv * G + r / p.L;
        const int64_t lim = std::clamp<int64_t>(causal_limit(p.causal, i, p.L, p.S) - j0, 0, n);
        if (dropf) drop.factors(b * p.hq + h, i, j0, n, dropf);
        float* pr = pb + r * kBlock;
        const float alpha =
            softmax_row(sr, n, n, p.scale * kLog2e, masked ? loc.mask.row_masks[r] : no_mask, lim, dropf, m[r], l[r],
                        pr);
        float* ar = acc + r * Ev;
        int64_t c = 0;
        for (; c + Vec::size() <= Ev; c += Vec::size()) {
          Vec a = Vec::loadu(ar + c) * Vec(alpha);
          for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(pr[j]), Vec::loadu(vf + j * Ev + c), a);
          a.store(ar + c);
        }
        for (; c < Ev; ++c) {
          float a = ar[c] * alpha;
          for (int64_t j = 0; j < n; ++j) a += pr[j] * vf[j * Ev + c];
          ar[c] = a;
        }
      }
    }
  }

  void finish(int64_t b, int64_t hkv, float* acc, const float* m, const float* l) const {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hkv * G + r / p.L, i = r % p.L;
      T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
      p.lse[(b * p.hq + h) * p.L + i] =
          finish_row(acc + r * p.Ev, p.Ev, m[r], l[r], p.sinks ? p.sinks + h : nullptr, out, p.out_st.c);
    }
  }

  void operator()() const {
    run_tasks(heads * chunks, false, [&](int64_t t) {
      thread_local DecodeLocal loc;
      const int64_t head = t / chunks, c = t % chunks;
      const int64_t b = head / p.hkv, hkv = head % p.hkv;
      const int64_t s0 = c * chunk_len, s1 = std::min(p.S, s0 + chunk_len);
      if (chunks == 1) {
        float* acc = loc.acc.get<float>(R * (p.Ev + 2));
        run_chunk(loc, b, hkv, s0, s1, acc, acc + R * p.Ev, acc + R * p.Ev + R);
        finish(b, hkv, acc, acc + R * p.Ev, acc + R * p.Ev + R);
      } else {
        float* part = partial + t * R * row_stride();
        run_chunk(loc, b, hkv, s0, s1, part, part + R * p.Ev, part + R * p.Ev + R);
      }
    });
    if (chunks == 1) return;
    // Merge the chunks of each head: rescale each to the common max and add.
    run_tasks(heads, false, [&](int64_t head) {
      thread_local DecodeLocal loc;
      float* acc = loc.acc.get<float>(R * (p.Ev + 2));
      float* m = acc + R * p.Ev;
      float* l = m + R;
      std::fill(acc, acc + R * p.Ev, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        float mx = kNegInf;
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, partial[(head * chunks + c) * R * row_stride() + R * p.Ev + r]);
        m[r] = mx;
        l[r] = 0.f;
        if (mx == kNegInf) continue;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* part = partial + (head * chunks + c) * R * row_stride();
          const float mc = part[R * p.Ev + r];
          if (mc == kNegInf) continue;
          const float w = std::exp2(mc - mx);  // m is in log2 units
          l[r] += w * part[R * p.Ev + R + r];
          for (int64_t e = 0; e < p.Ev; ++e) acc[r * p.Ev + e] += w * part[r * p.Ev + e];
        }
      }
      finish(head / p.hkv, head % p.hkv, acc, m, l);
    });
  }
};

template <class T>
void decode(const AttnParams& p) {
  const int64_t heads = p.batch * p.hkv;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (heads < 2 * threads) chunks = std::min((2 * threads + heads - 1) / heads, std::max<int64_t>(1, p.S / kMinChunk));
  const int64_t R = (p.hq / p.hkv) * p.L;
  thread_local Scratch partial;
  float* part = chunks > 1 ? partial.get<float>(heads * chunks * R * (p.Ev + 2)) : nullptr;
  DecodeKernel<T>(p, chunks, part)();
}

}  // namespace

void flash_decode(const AttnParams& p) {
  switch (p.dtype) {
    case ScalarKind::Float: decode<float>(p); break;
    case ScalarKind::BFloat16: decode<BF16>(p); break;
    case ScalarKind::Half: decode<F16>(p); break;
    default: TORCH_CHECK(false, "sdpax: the CPU flash kernel supports float32, bfloat16 and float16");
  }
}

}  // namespace sdpax::cpu
