// Forward for short query lengths (L <= kDecodeMaxL), the decode step of a language model.
//
// The G * L query rows of a KV head (all query heads of its group) form one tile of the forward main loop
// (fwd_mainloop.h), so every K/V tile is read and packed once for the whole group and the GEMMs see G * L rows
// instead of L. When there are fewer KV heads than twice the threads, the key sequence is split into chunks as
// well; each chunk leaves (acc, running max, denominator) per row and a merge pass combines them by log-sum-exp.
#include <vector>

#include "cpu/fwd_mainloop.h"
#include "cpu/kernel.h"

namespace sdpax::cpu {

namespace {

constexpr int64_t kMinChunk = 512;  // keys; shorter chunks cost more in merging than they gain in balance

template <class C>
int64_t main_row_tiles(const AttnParams& p) {
  return ((p.hq / p.hkv) * p.L + fwd_blocks<C>(p).m - 1) / fwd_blocks<C>(p).m;
}

template <class T, class C>
struct DecodeKernel {
  const FwdMainloop<T, C> main;
  const AttnParams& p;
  const int64_t R, row_tiles, heads, chunks;
  const KeyRange keys;  // the keys some row may see: the chunks split only these
  const int64_t chunk_len;
  float* partial;  // per (head, row tile, chunk): bm x (Ev + 2): acc, then m, l

  DecodeKernel(const AttnParams& params, uint64_t id, int64_t n_chunks, float* partial_buf)
      : main(params, id, /*cache=*/(main_row_tiles<C>(params) > 1)), p(params), R(main.G * params.L),
        row_tiles((R + main.bm - 1) / main.bm), heads(params.batch * params.hkv), chunks(n_chunks),
        keys(visible_keys(params, main.bn, 0, params.L - 1)),
        chunk_len(round_up((keys.end - keys.begin + n_chunks - 1) / n_chunks, main.bn)), partial(partial_buf) {}

  int64_t slot() const { return main.bm * (p.Ev + 2); }

  // Rows [r0, r0 + M) of the folded (query head, row) list of KV head hkv.
  void set_rows(FwdLocal& loc, int64_t hkv, int64_t r0, int64_t M) const {
    loc.row_h.resize(M);
    loc.row_i.resize(M);
    for (int64_t r = 0; r < M; ++r) {
      loc.row_h[r] = hkv * main.G + (r0 + r) / p.L;
      loc.row_i[r] = (r0 + r) % p.L;
    }
  }

  void operator()() const {
    const int64_t n_tasks = heads * row_tiles * chunks;
    run_tasks(n_tasks, kVnni<C>, [&](int64_t t) {
      thread_local FwdLocal loc;
      const int64_t c = t % chunks, rt = (t / chunks) % row_tiles, head = t / (chunks * row_tiles);
      const int64_t b = head / p.hkv, hkv = head % p.hkv;
      const int64_t r0 = rt * main.bm, M = std::min(main.bm, R - r0);
      const int64_t s0 = keys.begin + c * chunk_len, s1 = std::min(keys.end, s0 + chunk_len);
      set_rows(loc, hkv, r0, M);
      float* acc = chunks == 1 ? loc.acc.get<float>(slot()) : partial + t * slot();
      float* m = acc + main.bm * p.Ev;
      float* l = m + main.bm;
      main.run(loc, b, hkv, M, s0, s1, acc, m, l);
      if (chunks == 1) main.finish(loc, b, M, acc, m, l);
    });
    if (chunks == 1) return;
    // Merge the chunks of each (head, row tile): rescale each to the common max and add.
    run_tasks(heads * row_tiles, false, [&](int64_t hr) {
      thread_local FwdLocal loc;
      const int64_t head = hr / row_tiles, rt = hr % row_tiles;
      const int64_t r0 = rt * main.bm, M = std::min(main.bm, R - r0);
      set_rows(loc, head % p.hkv, r0, M);
      float* acc = loc.acc.get<float>(slot());
      float* m = acc + main.bm * p.Ev;
      float* l = m + main.bm;
      std::fill(acc, acc + M * p.Ev, 0.f);
      for (int64_t r = 0; r < M; ++r) {
        float mx = kNegInf;
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, partial[(hr * chunks + c) * slot() + main.bm * p.Ev + r]);
        m[r] = mx;
        l[r] = 0.f;
        if (mx == kNegInf) continue;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* part = partial + (hr * chunks + c) * slot();
          const float mc = part[main.bm * p.Ev + r];
          if (mc == kNegInf) continue;
          const float w = std::exp2(mc - mx);  // m is in log2 units
          l[r] += w * part[main.bm * p.Ev + main.bm + r];
          const Vec vw(w);
          for (int64_t e = 0; e < p.Ev; e += Vec::size()) {
            const int64_t cnt = std::min<int64_t>(Vec::size(), p.Ev - e);
            (Vec::loadu(acc + r * p.Ev + e, cnt) + vw * Vec::loadu(part + r * p.Ev + e, cnt))
                .store(acc + r * p.Ev + e, cnt);
          }
        }
      }
      main.finish(loc, head / p.hkv, M, acc, m, l);
    });
  }
};

template <class T, class C>
void decode(const AttnParams& p) {
  const uint64_t id = next_call_id();
  const Blocks bl = fwd_blocks<C>(p);
  const int64_t heads = p.batch * p.hkv;
  const int64_t R = (p.hq / p.hkv) * p.L;
  const int64_t row_tiles = (R + bl.m - 1) / bl.m;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (heads * row_tiles < 2 * threads)
    chunks = std::min((2 * threads + heads * row_tiles - 1) / (heads * row_tiles),
                      std::max<int64_t>(1, visible_keys(p, bl.n, 0, p.L - 1).size() / kMinChunk));
  thread_local Scratch partial;
  float* part = chunks > 1 ? partial.get<float>(heads * row_tiles * chunks * bl.m * (p.Ev + 2)) : nullptr;
  DecodeKernel<T, C>(p, id, chunks, part)();
}

}  // namespace

bool reads_pages_in_place(const AttnParams& p) {
  bool in_place = false;
  dispatch_dtype(p.dtype, [&](auto, auto c) {
    using C = decltype(c);
    // The decode kernel's direct path: all rows of a KV head in one row tile (direct rows <= bm), any page size.
    in_place = direct_rows<C>(p, (p.hq / p.hkv) * p.L) || tiles_in_pages<C>(p);
  });
  return in_place;
}

void run_decode(const AttnParams& p) {
  dispatch_dtype(p.dtype, [&](auto t, auto c) {
    decode<decltype(t), decltype(c)>(p);
  });
}

}  // namespace sdpax::cpu
