// Per-device entry points of the sdpax ops. The backend id in the schema is chosen by the Python selector
// (python/sdpax/_select.py, which also explains why a backend cannot run); here it only routes to MATH or to the
// device's fused kernel. A device without a fused kernel passes nullptr and refuses FLASH with a reason.
#pragma once
#include <ATen/ATen.h>
#include <string>

#include "common/params.h"
#include "math/math.h"

namespace sdpax {

using FwdFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, double, int64_t, double, bool,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, int64_t, double, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool);

inline void check_backend(int64_t backend, bool have_flash, const char* device) {
  TORCH_CHECK(backend == static_cast<int64_t>(Backend::Math) || backend == static_cast<int64_t>(Backend::Flash),
              "sdpax: unknown backend id ", std::to_string(backend), " (0 MATH, 1 FLASH_ATTENTION)");
  TORCH_CHECK(backend == static_cast<int64_t>(Backend::Math) || have_flash,
              "sdpax: FLASH_ATTENTION has no ", device, " kernel in this build");
}

template <FwdFn Flash>
std::tuple<at::Tensor, at::Tensor> fwd_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal,
                                             double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
                                             const std::optional<at::Tensor>& rng, int64_t backend) {
  check_backend(backend, Flash != nullptr, q.device().str().c_str());
  if constexpr (Flash != nullptr) {
    if (backend == static_cast<int64_t>(Backend::Flash))
      return Flash(q, k, v, mask, dropout_p, causal, scale, enable_gqa, sinks, rng);
  }
  return math::fwd(q, k, v, mask, dropout_p, causal, scale, enable_gqa, sinks, rng);
}

template <BwdFn Flash>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_entry(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& rng, int64_t backend, bool mask_grad) {
  check_backend(backend, Flash != nullptr, q.device().str().c_str());
  if constexpr (Flash != nullptr) {
    if (backend == static_cast<int64_t>(Backend::Flash))
      return Flash(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks, rng, mask_grad);
  }
  return math::bwd(grad_out, q, k, v, mask, out, lse, dropout_p, causal, scale, enable_gqa, sinks, rng, mask_grad);
}

}  // namespace sdpax
