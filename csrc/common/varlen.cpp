#include "common/varlen.h"

#include "common/inputs.h"

namespace sdpax {

namespace {

bool is_index_type(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// A 1-D integer tensor on the query's device, as host int64 values (a device-to-host copy on CUDA).
std::vector<int64_t> host_values(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 1 && is_index_type(t.scalar_type()), "sdpax: ", name,
              " must be a 1-D int32 or int64 tensor, got shape ", shape(t.sizes()), " and dtype ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "sdpax: ", name, " must be on the query's device ", q.device(), ", got ",
              t.device());
  const at::Tensor h = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

// Offsets of N sequences packed into `total` rows: N + 1 values from 0 to total, never decreasing.
std::vector<int64_t> offsets(const at::Tensor& cu, const char* name, int64_t total, const at::Tensor& q) {
  std::vector<int64_t> o = host_values(cu, name, q);
  TORCH_CHECK(!o.empty(), "sdpax: ", name, " must hold N + 1 offsets (N >= 0 sequences), got none");
  TORCH_CHECK(o.front() == 0, "sdpax: ", name, " must start at 0, got ", num(o.front()));
  for (size_t b = 1; b < o.size(); ++b) {
    TORCH_CHECK(o[b] >= o[b - 1], "sdpax: ", name, " must not decrease, but offset ", num(int64_t(b)), " is ",
                num(o[b]), " after ", num(o[b - 1]));
  }
  TORCH_CHECK(o.back() == total, "sdpax: ", name, " ends at ", num(o.back()), " but the packed tensor has ",
              num(total), " rows");
  return o;
}

// (T, H, D) rows [t0, t0 + n) as the (1, H, n, D) view a dense call takes.
at::Tensor seq4(const at::Tensor& t, int64_t t0, int64_t n) {
  return t.narrow(0, t0, n).permute({1, 0, 2}).unsqueeze(0);
}

// The keys (or values) of sequence b as (1, H, S, D): a view of the packed tensor, or its pages gathered into
// `buf` (pages, page, H, D), one buffer for every sequence of the call (fresh memory per sequence cost more in page
// faults than the copy itself).
at::Tensor seq_keys(const VarlenArgs& a, const at::Tensor& t, const SeqSpan& s, int64_t b, at::Tensor& buf) {
  if (!a.block_table) return seq4(t, s.k0, s.S);
  const int64_t page = t.size(1), pages = (s.S + page - 1) / page;
  const at::Tensor idx = a.block_table->select(0, b).narrow(0, 0, pages).to(at::kLong);
  at::Tensor rows = buf.narrow(0, 0, pages);
  at::index_select_out(rows, t, 0, idx);
  return seq4(rows.view({pages * page, t.size(2), t.size(3)}), 0, s.S);
}

// The gather buffer of seq_keys for the largest sequence of a paged call (empty otherwise).
at::Tensor page_buffer(const VarlenArgs& a, const at::Tensor& t, const std::vector<SeqSpan>& spans) {
  if (!a.block_table) return at::Tensor();
  const int64_t page = t.size(1);
  int64_t pages = 0;
  for (const SeqSpan& s : spans) pages = std::max(pages, (s.S + page - 1) / page);
  return at::empty({pages, page, t.size(2), t.size(3)}, t.options());
}

// Sequence b draws the dropout of a dense call on it alone with rng {seed, offset + b, ...}.
std::optional<at::Tensor> seq_rng(const VarlenArgs& a, int64_t b) {
  if (!(a.dropout_p > 0.0) || !a.rng) return a.rng;
  at::Tensor r = a.rng->clone();
  r.select(0, 1).add_(b);
  return r;
}

FwdArgs seq_args(const VarlenArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& rng) {
  static const std::optional<at::Tensor> kNoMask;
  return FwdArgs{q, k, v, kNoMask, a.dropout_p, a.causal, a.scale, a.enable_gqa, a.sinks, rng, a.backend,
                 a.softcap, a.window_left, a.window_right};
}

}  // namespace

std::vector<SeqSpan> varlen_spans(const VarlenArgs& a) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const bool paged = a.block_table.has_value();
  const int64_t kv_dim = paged ? 4 : 3;
  TORCH_CHECK(q.dim() == 3 && k.dim() == kv_dim && v.dim() == kv_dim, "sdpax: varlen attention takes packed query ",
              "(Tq, Hq, E) and key / value ", paged ? "pages (P, page, Hkv, E)" : "(Tk, Hkv, E)", ", got shapes ",
              shape(q.sizes()), ", ", shape(k.sizes()), " and ", shape(v.sizes()));
  TORCH_CHECK(k.sizes().slice(0, kv_dim - 1) == v.sizes().slice(0, kv_dim - 1),
              "sdpax: key and value must have the same leading dims, got ", shape(k.sizes()), " and ",
              shape(v.sizes()));
  TORCH_CHECK(a.max_q >= 0 && a.max_k >= 0, "sdpax: max_q and max_k must be >= 0, got ", num(a.max_q), " and ",
              num(a.max_k));
  const std::vector<int64_t> oq = offsets(a.cu_q, "cu_seq_q", q.size(0), q);
  const int64_t n = static_cast<int64_t>(oq.size()) - 1;
  std::vector<int64_t> ok, used;
  if (!paged) {
    TORCH_CHECK(a.cu_k.has_value(), "sdpax: cu_seq_k is required unless a block_table gives the keys");
    ok = offsets(*a.cu_k, "cu_seq_k", k.size(0), q);
    TORCH_CHECK(static_cast<int64_t>(ok.size()) == n + 1, "sdpax: cu_seq_q and cu_seq_k must describe the same ",
                "number of sequences, got ", num(n), " and ", num(int64_t(ok.size()) - 1));
  }
  if (a.seqused_k) {
    used = host_values(*a.seqused_k, "seqused_k", q);
    TORCH_CHECK(static_cast<int64_t>(used.size()) == n, "sdpax: seqused_k must have one entry per sequence (",
                num(n), "), got ", num(int64_t(used.size())));
  }
  std::vector<int64_t> table;
  int64_t table_cols = 0;
  if (paged) {
    const at::Tensor& bt = *a.block_table;
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == n && bt.scalar_type() == at::kInt, "sdpax: block_table must be an ",
                "int32 tensor (N, max_pages) with N = ", num(n), " sequences, got shape ", shape(bt.sizes()),
                " and dtype ", bt.scalar_type());
    TORCH_CHECK(bt.device() == q.device(), "sdpax: block_table must be on the query's device ", q.device(),
                ", got ", bt.device());
    TORCH_CHECK(a.seqused_k.has_value(), "sdpax: a block_table needs seqused_k (the keys each sequence uses)");
    const at::Tensor h = bt.to(at::kCPU, at::kLong).contiguous();
    table.assign(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
    table_cols = bt.size(1);
  }
  std::vector<SeqSpan> spans(n);
  for (int64_t b = 0; b < n; ++b) {
    SeqSpan& s = spans[b];
    s.q0 = oq[b];
    s.L = oq[b + 1] - oq[b];
    if (paged) {
      const int64_t page = k.size(1), cap = table_cols * page;
      s.k0 = 0;
      s.S = used[b];
      TORCH_CHECK(s.S >= 0 && s.S <= cap, "sdpax: seqused_k[", num(b), "] = ", num(s.S), " is outside [0, ",
                  num(cap), "], the keys its block_table row can hold");
      for (int64_t p = 0; p < (s.S + page - 1) / page; ++p) {
        const int64_t id = table[b * table_cols + p];
        TORCH_CHECK(id >= 0 && id < k.size(0), "sdpax: block_table[", num(b), ", ", num(p), "] = ", num(id),
                    " is not a page of the pool (", num(k.size(0)), " pages)");
      }
    } else {
      s.k0 = ok[b];
      s.S = ok[b + 1] - ok[b];
      if (a.seqused_k) {
        TORCH_CHECK(used[b] >= 0 && used[b] <= s.S, "sdpax: seqused_k[", num(b), "] = ", num(used[b]),
                    " is outside [0, ", num(s.S), "], the keys of that sequence");
        s.S = used[b];
      }
    }
    TORCH_CHECK(s.L <= a.max_q, "sdpax: sequence ", num(b), " has ", num(s.L), " queries, more than max_q = ",
                num(a.max_q));
    TORCH_CHECK(s.S <= a.max_k, "sdpax: sequence ", num(b), " has ", num(s.S), " keys, more than max_k = ",
                num(a.max_k));
  }
  return spans;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const VarlenArgs& a, DenseFwd dense, PagedFwd paged, PackedFwd packed) {
  const std::vector<SeqSpan> spans = varlen_spans(a);
  if (packed) {
    if (auto res = packed(a, spans)) return *res;
  }
  const at::Tensor& q = a.q;
  const int64_t ev = a.v.size(-1);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({q.size(0), q.size(1), ev}, q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_type));
  at::Tensor kbuf = page_buffer(a, a.k, spans), vbuf = page_buffer(a, a.v, spans);
  for (int64_t b = 0; b < static_cast<int64_t>(spans.size()); ++b) {
    const SeqSpan& s = spans[b];
    if (s.L == 0) continue;
    const at::Tensor qb = seq4(q, s.q0, s.L);
    std::optional<std::tuple<at::Tensor, at::Tensor>> res;
    if (paged && a.block_table && s.S > 0) {  // in place: the first page stands for the keys in the checks
      const at::Tensor pages = a.block_table->select(0, b).narrow(0, 0, (s.S + a.k.size(1) - 1) / a.k.size(1))
                                   .to(at::kCPU).contiguous();
      res = paged(seq_args(a, qb, seq4(a.k[0], 0, a.k.size(1)), seq4(a.v[0], 0, a.v.size(1)), seq_rng(a, b)),
                  PagedKV{a.k, a.v, pages, s.S});
    }
    if (!res) res = dense(seq_args(a, qb, seq_keys(a, a.k, s, b, kbuf), seq_keys(a, a.v, s, b, vbuf), seq_rng(a, b)));
    auto& [o, l] = *res;
    seq4(out, s.q0, s.L).copy_(o);
    lse.narrow(1, s.q0, s.L).copy_(l.select(0, 0));
  }
  return {out, lse};
}

VarlenGrads varlen_bwd(const VarlenArgs& a, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                       DenseBwd dense, PackedBwd packed) {
  TORCH_CHECK(!a.block_table && !a.seqused_k, "sdpax: varlen attention with a block_table or seqused_k is forward "
              "only (a KV cache being read); it has no backward");
  const std::vector<SeqSpan> spans = varlen_spans(a);
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({q.size(0), q.size(1), v.size(-1)}),
              "sdpax: grad_out and out must have the output's shape (Tq, Hq, Ev), got ", shape(grad_out.sizes()),
              " and ", shape(out.sizes()));
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
              "sdpax: lse must be the forward's (Hq, Tq) log-sum-exp, got shape ", shape(lse.sizes()));
  if (packed) {
    if (auto res = packed(a, spans, grad_out, out, lse)) return *res;
  }
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor dsinks = a.sinks ? at::zeros({q.size(1)}, q.options().dtype(at::kFloat)) : at::empty({0}, q.options());
  for (int64_t b = 0; b < static_cast<int64_t>(spans.size()); ++b) {
    const SeqSpan& s = spans[b];
    if (s.L == 0 || s.S == 0) continue;  // no key: zero gradients, and the sinks' term is 0 (no value mixed in)
    const at::Tensor qb = seq4(q, s.q0, s.L), kb = seq4(k, s.k0, s.S), vb = seq4(v, s.k0, s.S);
    const std::optional<at::Tensor> rng = seq_rng(a, b);
    const BwdArgs ba{seq_args(a, qb, kb, vb, rng), seq4(grad_out, s.q0, s.L), seq4(out, s.q0, s.L),
                     lse.narrow(1, s.q0, s.L).unsqueeze(0), false};
    auto [gq, gk, gv, gmask, gs] = dense(ba);
    seq4(dq, s.q0, s.L).copy_(gq);
    seq4(dk, s.k0, s.S).copy_(gk);
    seq4(dv, s.k0, s.S).copy_(gv);
    if (a.sinks) dsinks.add_(gs.to(at::kFloat));
  }
  if (a.sinks) dsinks = dsinks.to(a.sinks->scalar_type());
  return {dq, dk, dv, dsinks};
}

}  // namespace sdpax
