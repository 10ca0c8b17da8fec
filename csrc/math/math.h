// MATH backend: attention as a composite of ATen ops. It runs on every device the dispatcher serves, keeps
// float32 intermediates for half/bfloat16 (float64 for float64) and is the reference the fused kernels match.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace sdpax::math {

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal,
                                       double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
                                       const std::optional<at::Tensor>& rng);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& rng, bool mask_grad);

// Bool (bh, L, S): true where the element is kept.
at::Tensor dropout_keep_mask(const at::Tensor& rng, int64_t bh, int64_t L, int64_t S, double dropout_p);

}  // namespace sdpax::math
