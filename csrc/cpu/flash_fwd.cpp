// Tiled online-softmax forward on CPU: scheduling of the main loop (fwd_mainloop.h) over query tiles.
//
// Work is split into tasks (batch, kv head, chunk of query tiles); a task walks the G query heads of its KV head
// and their query tiles (Blocks::m rows of one head), each against every key tile it can see. Whole KV heads are
// tasks when there are enough of them, so each thread packs a head's K/V once; otherwise query tiles are chunked
// so both threads stay busy. Tasks are taken longest first (causal chunks near the end cost more). Extra memory
// per thread: the packed K/V of one head plus O(Blocks::m * (Blocks::n + D)).
#include <vector>

#include "cpu/fwd_mainloop.h"
#include "cpu/kernel.h"

namespace sdpax::cpu {

namespace {

// Identifies one kernel call, so per-thread packed K/V is never reused across calls.
std::atomic<uint64_t> g_call_id{0};

struct Task {
  int64_t b, hkv, tile_begin, tile_end, cost;
};

// Key tiles that query rows [i_first, i_last] visit (fwd_mainloop.h skips the rest).
int64_t kv_tiles_for(const AttnParams& p, int64_t bn, int64_t i_first, int64_t i_last) {
  return (visible_keys(p, bn, i_first, i_last).size() + bn - 1) / bn;
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
        for (int64_t t = t0; t < t1; ++t) cost += kv_tiles_for(p, bl.n, t * bl.m, std::min(p.L, (t + 1) * bl.m) - 1);
        tasks.push_back({b, h, t0, t1, cost});
      }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

template <class T, class C>
struct FwdKernel {
  const FwdMainloop<T, C> main;
  explicit FwdKernel(const AttnParams& p, uint64_t id) : main(p, id, /*cache=*/true) {}

  void operator()() const {
    const AttnParams& p = main.p;
    const std::vector<Task> tasks = make_tasks(p, {main.bm, main.bn});
    run_tasks(static_cast<int64_t>(tasks.size()), kVnni<C>, [&](int64_t ti) {
      thread_local FwdLocal loc;
      const Task& task = tasks[ti];
      float* acc = loc.acc.get<float>(main.bm * (p.Ev + 2));
      float* m = acc + main.bm * p.Ev;
      float* l = m + main.bm;
      for (int64_t g = 0; g < main.G; ++g)
        for (int64_t t = task.tile_begin; t < task.tile_end; ++t) {
          const int64_t i0 = t * main.bm, M = std::min(main.bm, p.L - i0);
          loc.row_h.assign(M, task.hkv * main.G + g);
          loc.row_i.resize(M);
          for (int64_t r = 0; r < M; ++r) loc.row_i[r] = i0 + r;
          main.run(loc, task.b, task.hkv, M, 0, p.S, acc, m, l);
          main.finish(loc, task.b, M, acc, m, l);
        }
    });
  }
};

}  // namespace

void run_fwd(const AttnParams& p) {
  const uint64_t id = next_call_id();
  dispatch_dtype(p.dtype, [&](auto t, auto c) {
    FwdKernel<decltype(t), decltype(c)>(p, id)();
  });
}

uint64_t next_call_id() { return g_call_id.fetch_add(1); }

}  // namespace sdpax::cpu
