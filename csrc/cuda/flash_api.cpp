#include "cuda/flash_api.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "common/inputs.h"
#include "cuda/launch.h"
#include "gen/limits.h"
#include "math/math.h"

namespace sdpax {
namespace cuda {

namespace {

// The kernels copy rows with 16-byte vector loads: the last dim must be contiguous and every other stride and the
// base pointer 16-byte aligned. (B, L, H, E)-transposed views qualify as they are; anything else is copied.
bool rows_aligned(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  bool ok = t.stride(3) == 1 || t.size(3) <= 1;
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % vec == 0;
  return ok;
}
at::Tensor vector_ready(const at::Tensor& t) { return rows_aligned(t) ? t : t.contiguous(); }

void check_supported(const FwdArgs& a, int64_t E, int64_t Ev) {
  const at::Tensor& q = a.q;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf || q.scalar_type() == at::kFloat,
              "sdpax: the CUDA FLASH_ATTENTION kernels take ", kDtypes, " inputs, got ", q.scalar_type(),
              "; use the MATH backend");
  TORCH_CHECK(std::min(E, Ev) >= kMinHeadDim && E % kHeadDimMultiple == 0 && Ev % kHeadDimMultiple == 0 &&
                  std::max(E, Ev) <= kMaxHeadDim,
              "sdpax: the CUDA FLASH_ATTENTION kernels need head dims that are multiples of ", num(kHeadDimMultiple),
              " from ", num(kMinHeadDim), " to ", num(kMaxHeadDim), ", got ", num(E), " and ", num(Ev),
              "; use the MATH backend");
}

// The float mask's gradient is dS summed over the dims the mask is broadcast along. The kernel writes dS into a
// float32 buffer over (b, h, row slot, j): mask-shaped (stride 0 on broadcast dims, float atomics) normally; in
// deterministic mode a scratch with one writer per element (all batches and heads; rows, or one partial sum per
// query tile when the mask is broadcast over rows), summed here in a fixed order. A full-shape mask has one
// writer per element either way. Broadcast is judged from the mask's sizes, not its strides: an expanded view
// passed as the mask still gets a gradient per element.
// A mask broadcast over keys (..., L, 1) needs no kernel writes: a row's dS sums to
// sum_j P_ij (dP_ij - Delta_i) = Delta_i (1 - sum_j P_ij) = Delta_i p_sink_i (0 without sinks), exactly, whereas
// summing the kernel's dS would leave Delta's own rounding (from the rounded O) as an O(1e-3) residue on a
// gradient that is zero.
struct MaskGrad {
  at::Tensor buf;
  bool bcast[4] = {false, false, false, false};  // canonical dims (B, Hq, L, S) the mask is broadcast along
};

MaskGrad plan_mask_grad(const Canonical& c, const at::Tensor& q, const at::Tensor& mask, bool deterministic,
                        AttnParams& p) {
  MaskGrad g;
  const int64_t full[4] = {c.B, c.Hq, c.L, c.S};
  const int64_t md = mask.dim(), lead = q.dim() - 3;
  bool lead_ones = true;  // all leading batch dims of the mask are 1 (or absent)
  for (int64_t d = 0; d < md - 3; ++d) lead_ones = lead_ones && mask.size(d) == 1;
  g.bcast[0] = lead > 0 && lead_ones;
  g.bcast[1] = md < 3 || mask.size(-3) == 1;
  g.bcast[2] = md < 2 || mask.size(-2) == 1;
  g.bcast[3] = md < 1 || mask.size(-1) == 1;
  bool any = false;
  for (int d = 0; d < 4; ++d) any = any || (g.bcast[d] = g.bcast[d] && full[d] > 1);
  if (g.bcast[3]) return g;  // closed form on the host (flash_bwd)
  const auto f32 = q.options().dtype(at::kFloat);
  p.dmask_tile_rows = g.bcast[2];
  if (!any) {
    g.buf = at::zeros({c.B, c.Hq, c.L, c.S}, f32);
    p.dmask_st = strides4(g.buf);
  } else if (!deterministic) {
    std::vector<int64_t> sizes(full, full + 4);
    for (int d = 0; d < 4; ++d) sizes[d] = g.bcast[d] ? 1 : full[d];
    g.buf = at::zeros(sizes, f32);
    p.dmask_st = strides4(g.buf.expand({c.B, c.Hq, c.L, c.S}));
    p.dmask_atomic = true;
  } else {
    const int64_t bm = bwd_mask_rows(std::max(c.E, c.Ev), p.dtype);
    g.buf = at::zeros({c.B, c.Hq, g.bcast[2] ? (c.L + bm - 1) / bm : c.L, c.S}, f32);
    p.dmask_st = strides4(g.buf);
  }
  p.dmask = g.buf.data_ptr<float>();
  return g;
}

at::Tensor fold_mask_grad(const MaskGrad& g, const at::Tensor& q, const at::Tensor& mask) {
  at::Tensor t = g.buf;
  for (int64_t d = 0; d < 4; ++d)
    if (g.bcast[d] && t.size(d) > 1) t = t.sum(d, /*keepdim=*/true);
  std::vector<int64_t> shp;
  for (int64_t d = 0; d + 3 < q.dim(); ++d) shp.push_back(t.size(0) == 1 ? 1 : q.size(d));
  if (q.dim() >= 3) shp.push_back(t.size(1));
  shp.push_back(t.size(2));
  shp.push_back(t.size(3));
  return t.reshape(shp).sum_to_size(mask.sizes()).to(mask.scalar_type());
}

// A packed variable-length batch as one call of the kernels: a (1, H, T, D) view of each packed tensor, and per
// sequence {q0, L, k0, S} on the device (common/params.h `seqs`).
struct Packed {
  at::Tensor seqs;  // (N, 4) int32
  int64_t n = 0, max_q = 0, max_k = 0;
  // A paged KV cache (forward only): the page pools as (P, Hkv, page, E) views and the block table (N, max_pages).
  at::Tensor k_pages, v_pages, table;
};

Packed pack(const std::vector<SeqSpan>& spans, const at::Tensor& q) {
  Packed pk;
  pk.n = static_cast<int64_t>(spans.size());
  at::Tensor h = at::empty({pk.n, 4}, at::TensorOptions().dtype(at::kInt));
  int32_t* d = h.data_ptr<int32_t>();
  for (const SeqSpan& s : spans) {
    *d++ = static_cast<int32_t>(s.q0);
    *d++ = static_cast<int32_t>(s.L);
    *d++ = static_cast<int32_t>(s.k0);
    *d++ = static_cast<int32_t>(s.S);
    pk.max_q = std::max(pk.max_q, s.L);
    pk.max_k = std::max(pk.max_k, s.S);
  }
  pk.seqs = h.to(q.device());
  return pk;
}

// The params of a packed call: batch index b is sequence b (cuda/varlen.h); L and S the longest sequence's.
void bind_packed(AttnParams& p, const Packed& pk) {
  p.batch = pk.n;
  p.L = pk.max_q;
  p.S = pk.max_k;
  p.seqs = pk.seqs.data_ptr<int32_t>();
  if (pk.table.defined()) {  // keys through the pages (common/params.h kv_pages); the k / v given were one page
    p.k = pk.k_pages.data_ptr();
    p.v = pk.v_pages.data_ptr();
    p.k_st = strides4(pk.k_pages);
    p.v_st = strides4(pk.v_pages);
    p.kv_pages = pk.table.data_ptr<int32_t>();
    p.kv_page = pk.k_pages.size(2);
    p.kv_table_cols = pk.table.size(1);
  }
}

// (T, H, D) as the (1, H, T, D) view the dense host glue takes.
at::Tensor as4(const at::Tensor& t) { return t.permute({1, 0, 2}).unsqueeze(0); }

// An output of a packed call: (T, H, D) memory, as4 view.
at::Tensor packed_empty(int64_t rows, int64_t heads, int64_t dim, const at::TensorOptions& o) {
  return as4(at::empty({rows, heads, dim}, o));
}

std::tuple<at::Tensor, at::Tensor> fwd_impl(const FwdArgs& a, const Packed* pk) {
  check_inputs(a);
  const at::Tensor& q = a.q;
  const Canonical c = canonicalize(a);
  check_supported(a, c.E, c.Ev);
  // Empty inputs (no rows, or no keys: every row is 0 and its lse -inf, or its sink) have nothing to tile; MATH
  // computes them from the same arguments, as the backward below does (the plan says so: FwdLoop::None).
  if (c.B * c.Hq * c.L == 0 || c.S == 0) return math::fwd(a);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q4 = vector_ready(c.q), k4 = vector_ready(c.k), v4 = vector_ready(c.v);
  const std::optional<at::Tensor> sinks_f = sinks_f32(a.sinks);
  at::Tensor out = pk ? packed_empty(c.L, c.Hq, c.Ev, q.options()) : at::empty({c.B, c.Hq, c.L, c.Ev}, q.options());
  at::Tensor lse = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, a);
  bind_forward(p, out, lse);
  if (pk) bind_packed(p, *pk);
  const FwdPlan plan = plan_fwd(p, current_device(), a.backend.fwd_loop, a.backend.strict);
  p.num_splits = plan.num_splits;
  at::Tensor o_partial, lse_partial;
  if (p.num_splits > 1) {
    o_partial = at::empty({p.num_splits, c.B * c.Hq, c.L, c.Ev}, lse.options());
    lse_partial = at::empty({p.num_splits, c.B * c.Hq, c.L}, lse.options());
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(launch_fwd(p, plan, at::cuda::getCurrentCUDAStream()));
  return {uncanonical(out, q, c.Ev), uncanonical(lse, q, -1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(const BwdArgs& a, const Packed* pk) {
  check_inputs(a);
  const at::Tensor &q = a.f.q, &k = a.f.k, &v = a.f.v, &grad_out = a.grad_out, &out = a.out, &lse = a.lse;
  const std::optional<at::Tensor>&mask = a.f.mask, &sinks = a.f.sinks;
  const Canonical c = canonicalize(a.f);
  check_supported(a.f, c.E, c.Ev);
  // Empty inputs are computed by MATH from the same saved tensors.
  if (c.B * c.Hq * c.L == 0 || c.S == 0) return math::bwd(a);
  const c10::cuda::CUDAGuard guard(q.device());
  // torch.use_deterministic_algorithms(True): bitwise-reproducible gradients (no float atomics).
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const at::Tensor q4 = vector_ready(c.q), k4 = vector_ready(c.k), v4 = vector_ready(c.v);
  const at::Tensor do4 = vector_ready(grad_out.reshape({c.B, c.Hq, c.L, c.Ev}));
  const at::Tensor o4 = out.reshape({c.B, c.Hq, c.L, c.Ev});
  const at::Tensor lse_f = lse.reshape({c.B * c.Hq * c.L}).to(at::kFloat).contiguous();
  const std::optional<at::Tensor> sinks_f = sinks_f32(sinks);
  at::Tensor dk = pk ? packed_empty(c.S, c.Hkv, c.E, q.options()) : at::empty({c.B, c.Hkv, c.S, c.E}, q.options());
  at::Tensor dv = pk ? packed_empty(c.S, c.Hkv, c.Ev, q.options()) : at::empty({c.B, c.Hkv, c.S, c.Ev}, q.options());
  at::Tensor delta = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));
  // dQ: float32 atomics into dq_accum, or (deterministic) written once per element by its own pass.
  at::Tensor dq_accum, dq;
  if (deterministic)
    dq = pk ? packed_empty(c.L, c.Hq, c.E, q.options()) : at::empty({c.B, c.Hq, c.L, c.E}, q.options());
  else dq_accum = at::empty({c.B, c.Hq, c.L, c.E}, q.options().dtype(at::kFloat));  // zeroed by the Delta pre-pass

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, a.f);
  bind_forward(p, o4, lse_f);
  bind_backward(p, do4, dk, dv);
  if (pk) bind_packed(p, *pk);
  p.deterministic = deterministic;
  if (deterministic) {
    p.dq = dq.data_ptr();
    p.dq_st = strides4(dq);
  } else {
    p.dq_accum = dq_accum.data_ptr<float>();
  }
  const bool wants_dmask = a.mask_grad && mask && mask->scalar_type() != at::kBool;
  // The kernels write dS after the softcap's derivative; the mask's gradient is dS before it.
  TORCH_CHECK(!(wants_dmask && a.f.softcap > 0.0), "sdpax: the CUDA FLASH_ATTENTION kernels do not compute the "
              "gradient of attn_mask together with a softcap; use the MATH backend");
  MaskGrad mg;
  if (wants_dmask) mg = plan_mask_grad(c, q, *mask, deterministic, p);
  const BwdPlan plan = plan_bwd(p, current_device(), a.f.backend.bwd_loop, a.f.backend.strict);
  C10_CUDA_CHECK(launch_bwd(p, plan, delta.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));

  if (!deterministic) {
    dq = q.scalar_type() == at::kFloat ? dq_accum : at::empty(dq_accum.sizes(), q.options());
    C10_CUDA_CHECK(launch_dq_finish(dq_accum.data_ptr<float>(), dq.data_ptr(), p.dtype, dq_accum.numel(), p.scale,
                                    at::cuda::getCurrentCUDAStream()));
  }
  // d lse / d sink_h = p_sink, the sink's probability; Delta_i p_sink_i per row (B, Hq, L).
  at::Tensor sink_rows;
  if (sinks) sink_rows = (sinks_f->view({1, c.Hq, 1}) - lse_f.view({c.B, c.Hq, c.L})).exp_().mul_(delta);
  at::Tensor dmask = at::empty({0}, q.options());
  if (wants_dmask) {
    if (mg.bcast[3])  // broadcast over keys: the closed form above
      mg.buf = (sinks ? sink_rows : at::zeros_like(delta)).view({c.B, c.Hq, c.L, 1});
    dmask = fold_mask_grad(mg, q, *mask);
  }
  at::Tensor dsinks = at::empty({0}, q.options());
  // dsinks_h = -sum_{b,i} p_sink * Delta_i (as in MATH).
  if (sinks) dsinks = sink_rows.sum(at::IntArrayRef{0, 2}).neg_().to(sinks->scalar_type());
  return {uncanonical(dq, q, c.E), dk.reshape(k.sizes()), dv.reshape(v.sizes()), dmask, dsinks};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a) { return fwd_impl(a, nullptr); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a) {
  return bwd_impl(a, nullptr);
}

// Packed batches: one launch per pass over the (1, H, T, D) views, every sequence found by its block (the kernels'
// sequence view). No rows or no keys at all: the per-sequence path (MATH for empty sequences) is as cheap.
std::optional<std::tuple<at::Tensor, at::Tensor>> flash_varlen_fwd(const VarlenArgs& a,
                                                                   const std::vector<SeqSpan>& spans) {
  if (a.q.size(0) == 0) return std::nullopt;
  Packed pk = pack(spans, a.q);
  if (pk.max_q == 0 || pk.max_k == 0) return std::nullopt;
  static const std::optional<at::Tensor> kNoMask;
  at::Tensor q4 = as4(a.q), k4, v4;
  if (a.block_table) {
    // The pools (P, page, Hkv, E) read in place, as (P, Hkv, page, E): the kernels' 16-byte row copies need their
    // strides and base aligned, else the per-sequence path gathers the pages. The first page stands for the keys
    // in the checks.
    pk.k_pages = a.k.permute({0, 2, 1, 3});
    pk.v_pages = a.v.permute({0, 2, 1, 3});
    if (!rows_aligned(pk.k_pages) || !rows_aligned(pk.v_pages)) return std::nullopt;
    pk.table = a.block_table->contiguous();
    k4 = pk.k_pages.narrow(0, 0, 1);
    v4 = pk.v_pages.narrow(0, 0, 1);
  } else {
    k4 = as4(a.k);
    v4 = as4(a.v);
  }
  auto [out, lse] = fwd_impl(FwdArgs{q4, k4, v4, kNoMask, a.dropout_p, a.causal, a.scale, a.enable_gqa, a.sinks,
                                     a.rng, a.backend, a.softcap, a.window_left, a.window_right},
                             &pk);
  return std::make_tuple(out.squeeze(0).permute({1, 0, 2}), lse.squeeze(0));
}

std::optional<VarlenGrads> flash_varlen_bwd(const VarlenArgs& a, const std::vector<SeqSpan>& spans,
                                            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse) {
  if (a.q.size(0) == 0) return std::nullopt;
  const Packed pk = pack(spans, a.q);
  if (pk.max_q == 0 || pk.max_k == 0) return std::nullopt;
  static const std::optional<at::Tensor> kNoMask;
  const at::Tensor q4 = as4(a.q), k4 = as4(a.k), v4 = as4(a.v);
  const FwdArgs f{q4, k4, v4, kNoMask, a.dropout_p, a.causal, a.scale, a.enable_gqa, a.sinks,
                  a.rng, a.backend, a.softcap, a.window_left, a.window_right};
  auto [dq, dk, dv, dmask, dsinks] = bwd_impl(BwdArgs{f, as4(grad_out), as4(out), lse.unsqueeze(0), false}, &pk);
  const auto unpack = [](const at::Tensor& t) { return t.squeeze(0).permute({1, 0, 2}); };
  return std::make_tuple(unpack(dq), unpack(dk), unpack(dv), dsinks);
}

}  // namespace cuda
}  // namespace sdpax
