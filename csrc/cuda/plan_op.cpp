// sdpax::cuda_plan: the launch plan (plan.h) of a CUDA FLASH_ATTENTION call as data, for explain() and for the
// plan's unit tests, which run without a GPU: the device is described by the caller. Built into every build.
#include <torch/library.h>

#include <vector>

#include "common/inputs.h"
#include "cuda/plan.h"

namespace sdpax {
namespace cuda {
namespace {

// device: {compute capability major, multiprocessors, build has sm_90a code (0 / 1)}. Returns {forward loop,
// forward kind, head-dim bucket, rows, keys, splits, backward loop, backward kind, rows, keys, dQ pass, mma.sync
// fallback} with the enums' values (plan.h, tiles.h).
std::vector<int64_t> cuda_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double dropout_p, int64_t causal,
                               bool enable_gqa, int64_t backend, bool mask_grad, bool deterministic,
                               at::IntArrayRef device, int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(device.size() == 3, "sdpax: cuda_plan's device is {compute capability major, SMs, has sm_90a}");
  const std::optional<at::Tensor> none;
  // The params as the host entry builds them (without dropout: there is no rng to point at), then what the plan
  // reads beyond them.
  const FwdArgs a{q, k, v, mask, 0.0, causal, 1.0, enable_gqa, none, none, decode_backend(backend), softcap,
                  window_left, window_right};
  const Canonical c = canonicalize(a);
  AttnParams p = make_params(c, c.q, c.k, c.v, none, a);
  p.dropout_p = dropout_p;
  p.deterministic = deterministic;
  static float dmask_marker;  // only compared with nullptr: a float mask's gradient is wanted
  if (mask_grad && c.mask && c.mask->scalar_type() != at::kBool) p.dmask = &dmask_marker;
  const DeviceInfo dev{static_cast<int>(device[0]), static_cast<int>(device[1]), device[2] != 0};
  const FwdPlan f = plan_fwd(p, dev, a.backend.fwd_loop, a.backend.strict);
  const BwdPlan b = plan_bwd(p, dev, a.backend.bwd_loop, a.backend.strict);
  return {static_cast<int64_t>(f.loop), static_cast<int64_t>(f.kind), f.head_dim, f.bm, f.bn, f.num_splits,
          static_cast<int64_t>(b.loop), static_cast<int64_t>(b.kind), b.bm, b.bn, b.dq_pass, b.mma_fallback};
}

}  // namespace
}  // namespace cuda
}  // namespace sdpax

TORCH_LIBRARY_IMPL(sdpax, CompositeExplicitAutograd, m) { m.impl("cuda_plan", &sdpax::cuda::cuda_plan); }
