// Per-device entry points of the sdpax ops. The backend id in the schema is chosen by the Python selector
// (python/sdpax/_select.py, which also explains why a backend cannot run); here it only routes to MATH or to the
// device's fused kernel. A device without a fused kernel passes nullptr and refuses FLASH with a reason.
#pragma once
#include <ATen/ATen.h>

#include "common/op_args.h"
#include "common/varlen.h"
#include "math/math.h"

namespace sdpax {

using FwdResult = std::tuple<at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FwdFn = FwdResult (*)(const FwdArgs&);
using BwdFn = BwdResult (*)(const BwdArgs&);

inline BackendChoice checked_backend(int64_t id, bool have_flash, const at::Tensor& q) {
  const BackendChoice b = decode_backend(id);
  TORCH_CHECK(b.backend == Backend::Math || have_flash, "sdpax: FLASH_ATTENTION has no ", q.device().str(),
              " kernel in this build");
  return b;
}

// What a call's backend runs: the device's fused entry (Flash) for FLASH_ATTENTION, MATH's otherwise.
template <auto Flash, class Fn>
Fn backend_fn(const BackendChoice& b, Fn math) {
  if constexpr (Flash != nullptr) {
    if (b.backend == Backend::Flash) return Flash;
  }
  return math;
}

template <FwdFn Flash>
FwdResult fwd_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal, double scale,
                    bool enable_gqa, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& rng,
                    int64_t backend, double softcap, int64_t window_left, int64_t window_right) {
  const FwdArgs a{q, k, v, mask, dropout_p, causal, scale, enable_gqa, sinks, rng,
                  checked_backend(backend, Flash != nullptr, q), softcap, window_left, window_right};
  return backend_fn<Flash>(a.backend, &math::fwd)(a);
}

template <BwdFn Flash>
BwdResult bwd_entry(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
                    double dropout_p, int64_t causal, double scale, bool enable_gqa,
                    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& rng, int64_t backend,
                    bool mask_grad, double softcap, int64_t window_left, int64_t window_right) {
  const BwdArgs a{{q, k, v, mask, dropout_p, causal, scale, enable_gqa, sinks, rng,
                   checked_backend(backend, Flash != nullptr, q), softcap, window_left, window_right},
                  grad_out, out, lse, mask_grad};
  return backend_fn<Flash>(a.f.backend, &math::bwd)(a);
}

// Variable-length calls: the backend's packed entry where it has one, else one dense call per sequence on the chosen
// backend (common/varlen.h).
template <FwdFn Flash, PagedFwd FlashPaged = nullptr, PackedFwd FlashPacked = nullptr>
FwdResult varlen_fwd_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                           const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double dropout_p,
                           int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
                           const std::optional<at::Tensor>& rng, int64_t backend, double softcap, int64_t window_left,
                           int64_t window_right, const std::optional<at::Tensor>& seqused_k,
                           const std::optional<at::Tensor>& block_table) {
  const VarlenArgs a{q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, enable_gqa, sinks, rng,
                     checked_backend(backend, Flash != nullptr, q), softcap, window_left, window_right, seqused_k,
                     block_table};
  const bool flash = a.backend.backend == Backend::Flash;
  return varlen_fwd(a, backend_fn<Flash>(a.backend, &math::fwd), flash ? FlashPaged : nullptr,
                    flash ? FlashPacked : nullptr);
}

template <BwdFn Flash, PackedBwd FlashPacked = nullptr>
VarlenGrads varlen_bwd_entry(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const at::Tensor& out, const at::Tensor& lse,
    double dropout_p, int64_t causal, double scale, bool enable_gqa, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& rng, int64_t backend, double softcap, int64_t window_left,
    int64_t window_right) {
  const std::optional<at::Tensor> cu_k_opt = cu_k, none;
  const VarlenArgs a{q, k, v, cu_q, cu_k_opt, max_q, max_k, dropout_p, causal, scale, enable_gqa, sinks, rng,
                     checked_backend(backend, Flash != nullptr, q), softcap, window_left, window_right, none, none};
  return varlen_bwd(a, grad_out, out, lse, backend_fn<Flash>(a.backend, &math::bwd),
                    a.backend.backend == Backend::Flash ? FlashPacked : nullptr);
}

}  // namespace sdpax
