// Host glue of the CUDA FLASH_ATTENTION backend: tensors in, AttnParams to the kernels (cuda/launch.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace sdpax {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal,
                                             double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
                                             const std::optional<at::Tensor>& rng);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& rng, bool mask_grad);

}  // namespace cuda
}  // namespace sdpax
