// Tiled online-softmax forward on CPU.
//
// Work is split into tasks (batch, kv head, chunk of query tiles); a task walks the G query heads of its KV head
// and their query tiles (Blocks::m rows), and for each tile the key tiles (Blocks::n keys) it can see:
//   S = Q K^T (GEMM) -> scale + mask bias + causal limit -> online softmax (running max / denominator, P as the
//   GEMM type) -> acc = alpha * acc + P V (GEMM)
// K^T and V are packed once per KV head per thread, lazily tile by tile, and shared by every query head of the
// group (GQA without copies). Causal tiles past the diagonal are never visited and masks that hide a whole tile
// skip both GEMMs. Extra memory per thread: the packed K/V of one head plus O(Blocks::m * (Blocks::n + D)).
#include <vector>

#include "cpu/kernel.h"
#include "cpu/mask.h"
#include "cpu/softmax.h"
#include "cpu/tile.h"

namespace sdpax::cpu {

namespace {

// Tile sizes: query rows x keys. Measured on Sapphire Rapids (2 threads): tall query tiles amortise the packed
// K^T / V tiles in the AMX / FMA micro-kernels; with D <= 64 the QK^T GEMM is shallow, so bfloat16 takes wider key
// tiles to keep the tiles busy, while D = 128 prefers 128 keys (the score tile stays in L2 next to K and V).
struct Blocks {
  int64_t m, n;
};

Blocks fwd_blocks(const AttnParams& p) {
  return {256, p.dtype == ScalarKind::BFloat16 && p.E <= 64 ? 256 : 128};
}

// Identifies one kernel call, so per-thread packed K/V is never reused across calls.
std::atomic<uint64_t> g_call_id{0};

struct Task {
  int64_t b, hkv, tile_begin, tile_end, cost;
};

int64_t kv_tiles_for(const AttnParams& p, int64_t bn, int64_t i_last) {
  const int64_t lim = std::min(p.S, causal_limit(p.causal, i_last, p.L, p.S));
  return lim <= 0 ? 0 : (lim + bn - 1) / bn;
}

// Tasks sorted by decreasing cost: whole heads when there are plenty, otherwise chunks of query tiles so both
// threads stay busy (causal chunks near the end of the sequence cost more and go first).
std::vector<Task> make_tasks(const AttnParams& p, Blocks bl) {
  const int64_t heads = p.batch * p.hkv;
  const int64_t q_tiles = (p.L + bl.m - 1) / bl.m;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::min(q_tiles, std::max<int64_t>(1, (want + heads - 1) / heads));
  const int64_t per = (q_tiles + chunks - 1) / chunks;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.hkv; ++h)
      for (int64_t t0 = 0; t0 < q_tiles; t0 += per) {
        const int64_t t1 = std::min(q_tiles, t0 + per);
        int64_t cost = 0;
        for (int64_t t = t0; t < t1; ++t) cost += kv_tiles_for(p, bl.n, std::min(p.L, (t + 1) * bl.m) - 1);
        tasks.push_back({b, h, t0, t1, cost});
      }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

// Per-thread state: packed K^T / V of the current KV head and the tile buffers.
struct FwdLocal {
  uint64_t call = ~uint64_t(0);
  int64_t b = -1, hkv = -1;
  std::vector<char> packed;
  Scratch kt, v, q, s, pm, acc, dropf;
  std::vector<float> m, l;
  TileMask mask;
};

template <class T>
struct FwdKernel {
  using C = typename ComputeOf<T>::type;
  const AttnParams& p;
  const uint64_t call_id;
  const int64_t bm, bn, G, Ep, n_kv_tiles;
  const Dropout drop;

  FwdKernel(const AttnParams& params, uint64_t id)
      : p(params), call_id(id), bm(fwd_blocks(params).m), bn(fwd_blocks(params).n), G(params.hq / params.hkv),
        Ep(padk<C>(params.E)), n_kv_tiles((params.S + bn - 1) / bn), drop(params) {}


  const C* kt_tile(FwdLocal& loc, int64_t t) const { return loc.kt.get<C>(0) + t * Ep * bn; }
  const C* v_tile(FwdLocal& loc, int64_t t) const { return loc.v.get<C>(0) + t * bn * p.Ev; }

  void ensure_packed(FwdLocal& loc, int64_t b, int64_t hkv, int64_t t) const {
    if (loc.call != call_id || loc.b != b || loc.hkv != hkv) {
      loc.call = call_id;
      loc.b = b;
      loc.hkv = hkv;
      loc.packed.assign(n_kv_tiles, 0);
      loc.kt.get<C>(n_kv_tiles * Ep * bn);
      loc.v.get<C>(n_kv_tiles * bn * p.Ev);
    }
    if (loc.packed[t]) return;
    const int64_t j0 = t * bn, n = std::min(bn, p.S - j0);
    const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hkv * p.k_st.h + j0 * p.k_st.r;
    const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hkv * p.v_st.h + j0 * p.v_st.r;
    pack_b_cols(k, p.k_st.r, p.k_st.c, p.E, n, const_cast<C*>(kt_tile(loc, t)));
    pack_b_rows(v, p.v_st.r, p.v_st.c, n, p.Ev, const_cast<C*>(v_tile(loc, t)));
    loc.packed[t] = 1;
  }

  void run_tile(FwdLocal& loc, int64_t b, int64_t hkv, int64_t g, int64_t i0) const {
    const int64_t h = hkv * G + g;
    const int64_t M = std::min(bm, p.L - i0);
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + i0 * p.q_st.r;
    C* qa = loc.q.get<C>(bm * Ep);
    pack_a(q, p.q_st.r, p.q_st.c, M, p.E, Ep, qa);
    float* s = loc.s.get<float>(bm * bn);
    C* pm = loc.pm.get<C>(bm * bn);
    float* acc = loc.acc.get<float>(bm * p.Ev);
    std::fill(acc, acc + M * p.Ev, 0.f);
    loc.m.assign(M, kNegInf);
    loc.l.assign(M, 0.f);
    const bool masked = p.mask_kind != MaskKind::None;
    if (masked) {
      loc.mask.set_rows(p, M, [&](int64_t r, int64_t& bb, int64_t& hh, int64_t& ii) {
        bb = b;
        hh = h;
        ii = i0 + r;
      });
    }
    const RowMask no_mask;
    float* dropf = drop.on ? loc.dropf.get<float>(bn) : nullptr;
    const int64_t bh = b * p.hq + h;

    const int64_t tiles = kv_tiles_for(p, bn, i0 + M - 1);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t j0 = t * bn, n = std::min(bn, p.S - j0);
      const int64_t np = padk<C>(n);
      if (masked && loc.mask.load(p, j0, n)) continue;
      ensure_packed(loc, b, hkv, t);
      gemm(M, n, Ep, qa, Ep, kt_tile(loc, t), n, s, bn, false);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = i0 + r;
        const int64_t lim = std::clamp<int64_t>(causal_limit(p.causal, i, p.L, p.S) - j0, 0, n);
        if (dropf) drop.factors(bh, i, j0, n, dropf);
        const float alpha = softmax_row(s + r * bn, n, np, p.scale * kLog2e, masked ? loc.mask.row_masks[r] : no_mask,
                                        lim, dropf, loc.m[r], loc.l[r], pm + r * np);
        if (alpha != 1.f) scale_row(acc + r * p.Ev, p.Ev, alpha);
      }
      gemm(M, p.Ev, np, pm, np, v_tile(loc, t), p.Ev, acc, p.Ev, true);
    }

    T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i0 * p.out_st.r;
    float* lse = p.lse + bh * p.L + i0;
    const float* sink = p.sinks ? p.sinks + h : nullptr;
    for (int64_t r = 0; r < M; ++r)
      lse[r] = finish_row(acc + r * p.Ev, p.Ev, loc.m[r], loc.l[r], sink, out + r * p.out_st.r, p.out_st.c);
  }

  void operator()() const {
    const std::vector<Task> tasks = make_tasks(p, {bm, bn});
    run_tasks(static_cast<int64_t>(tasks.size()), kVnni<C>, [&](int64_t ti) {
      thread_local FwdLocal loc;
      const Task& task = tasks[ti];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = task.tile_begin; t < task.tile_end; ++t) run_tile(loc, task.b, task.hkv, g, t * bm);
    });
  }
};

}  // namespace

void flash_fwd(const AttnParams& p) {
  const uint64_t id = g_call_id.fetch_add(1);
  switch (p.dtype) {
    case ScalarKind::Float: FwdKernel<float>(p, id)(); break;
    case ScalarKind::BFloat16: FwdKernel<BF16>(p, id)(); break;
    case ScalarKind::Half: FwdKernel<F16>(p, id)(); break;
    default: TORCH_CHECK(false, "sdpax: the CPU flash kernel supports float32, bfloat16 and float16");
  }
}

}  // namespace sdpax::cpu
