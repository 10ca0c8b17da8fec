#include "cuda/flash_api.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/inputs.h"
#include "cuda/launch.h"
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

void check_supported(const at::Tensor& q, int64_t E, int64_t Ev) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "sdpax: the CUDA FLASH_ATTENTION kernels take bfloat16 or float16 inputs, got ", q.scalar_type(),
              "; use the MATH backend");
  TORCH_CHECK(E % 8 == 0 && Ev % 8 == 0 && std::max(E, Ev) <= 256,
              "sdpax: the CUDA FLASH_ATTENTION kernels need head dims that are multiples of 8 and at most 256, got ",
              num(E), " and ", num(Ev), "; use the MATH backend");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal,
                                             double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
                                             const std::optional<at::Tensor>& rng) {
  check_inputs(q, k, v, mask, dropout_p, causal, sinks, enable_gqa, rng);
  const Canonical c = canonicalize(q, k, v, mask);
  check_supported(q, c.E, c.Ev);
  if (c.B * c.Hq * c.L == 0) return math::fwd(q, k, v, mask, dropout_p, causal, scale, enable_gqa, sinks, rng);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q4 = vector_ready(c.q), k4 = vector_ready(c.k), v4 = vector_ready(c.v);
  const std::optional<at::Tensor> sinks_f =
      sinks ? std::optional<at::Tensor>(sinks->to(at::kFloat).contiguous()) : std::nullopt;
  at::Tensor out = at::empty({c.B, c.Hq, c.L, c.Ev}, q.options());
  at::Tensor lse = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, dropout_p, causal, scale, rng);
  p.out = out.data_ptr();
  p.out_st = strides4(out);
  p.lse = lse.data_ptr<float>();
  const FwdPlan plan = plan_fwd(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& rng, bool mask_grad) {
  check_bwd_inputs(grad_out, out, q, k, v, mask, dropout_p, causal, sinks, enable_gqa, rng);
  const Canonical c = canonicalize(q, k, v, mask);
  check_supported(q, c.E, c.Ev);
  // Head dims above the fused backward's register budget, the additive-mask gradient and empty inputs are
  // computed by MATH from the same saved tensors. The Python selector gives a reason and routes calls that need
  // those gradients to MATH up front (_select.py: max_head_dim_backward, mask_grad), so this only serves direct
  // callers of torch.ops.sdpax.bwd with backend FLASH.
  const bool wants_dmask = mask_grad && mask && mask->scalar_type() != at::kBool;
  if (std::max(c.E, c.Ev) > bwd_max_head_dim() || wants_dmask || c.B * c.Hq * c.L == 0 || c.S == 0)
    return math::bwd(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks, rng, mask_grad);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q4 = vector_ready(c.q), k4 = vector_ready(c.k), v4 = vector_ready(c.v);
  const at::Tensor do4 = vector_ready(grad_out.reshape({c.B, c.Hq, c.L, c.Ev}));
  const at::Tensor o4 = out.reshape({c.B, c.Hq, c.L, c.Ev});
  const at::Tensor lse_f = lse.reshape({c.B * c.Hq * c.L}).to(at::kFloat).contiguous();
  const std::optional<at::Tensor> sinks_f =
      sinks ? std::optional<at::Tensor>(sinks->to(at::kFloat).contiguous()) : std::nullopt;
  at::Tensor dk = at::empty({c.B, c.Hkv, c.S, c.E}, q.options());
  at::Tensor dv = at::empty({c.B, c.Hkv, c.S, c.Ev}, q.options());
  at::Tensor dq_accum = at::zeros({c.B, c.Hq, c.L, c.E}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));

  AttnParams p = make_params(c, q4, k4, v4, sinks_f, dropout_p, causal, scale, rng);
  p.out = const_cast<void*>(o4.data_ptr());
  p.out_st = strides4(o4);
  p.lse = const_cast<float*>(lse_f.data_ptr<float>());
  p.dout = do4.data_ptr();
  p.dout_st = strides4(do4);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dk_st = strides4(dk);
  p.dv_st = strides4(dv);
  p.dq_accum = dq_accum.data_ptr<float>();
  C10_CUDA_CHECK(launch_bwd(p, delta.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));

  at::Tensor dq = dq_accum.mul_(scale).to(q.scalar_type());
  at::Tensor dsinks = at::empty({0}, q.options());
  if (sinks) {
    // d lse / d sink_h = p_sink; dsinks_h = -sum_{b,i} p_sink * Delta_i (as in MATH).
    at::Tensor p_sink = (sinks_f->view({1, c.Hq, 1}) - lse_f.view({c.B, c.Hq, c.L})).exp();
    dsinks = p_sink.mul_(delta).sum(at::IntArrayRef{0, 2}).neg_().to(sinks->scalar_type());
  }
  return {uncanonical(dq, q, c.E), dk.reshape(k.sizes()), dv.reshape(v.sizes()), at::empty({0}, q.options()),
          dsinks};
}

}  // namespace cuda
}  // namespace sdpax
