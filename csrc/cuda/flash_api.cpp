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
at::Tensor vector_ready(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  bool ok = t.stride(3) == 1 || t.size(3) <= 1;
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % vec == 0;
  return ok ? t : t.contiguous();
}

void check_supported(const FwdArgs& a, int64_t E, int64_t Ev) {
  const at::Tensor& q = a.q;
  TORCH_CHECK(a.dropout_p == 0.0 || a.rng->numel() == 2, "sdpax: the CUDA FLASH_ATTENTION kernels take no dropout "
              "origin (rng {seed, offset, row0, col0}); use the MATH backend");
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a) {
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
  at::Tensor out = at::empty({c.B, c.Hq, c.L, c.Ev}, q.options());
  at::Tensor lse = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, a);
  bind_forward(p, out, lse);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a) {
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
  at::Tensor dk = at::empty({c.B, c.Hkv, c.S, c.E}, q.options());
  at::Tensor dv = at::empty({c.B, c.Hkv, c.S, c.Ev}, q.options());
  at::Tensor delta = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));
  // dQ: float32 atomics into dq_accum, or (deterministic) written once per element by its own pass.
  at::Tensor dq_accum, dq;
  if (deterministic) dq = at::empty({c.B, c.Hq, c.L, c.E}, q.options());
  else dq_accum = at::empty({c.B, c.Hq, c.L, c.E}, q.options().dtype(at::kFloat));  // zeroed by the Delta pre-pass

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, a.f);
  bind_forward(p, o4, lse_f);
  bind_backward(p, do4, dk, dv);
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

}  // namespace cuda
}  // namespace sdpax
