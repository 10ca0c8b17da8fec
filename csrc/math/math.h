// MATH backend: attention as a composite of ATen ops. It runs on every device the dispatcher serves, keeps
// float32 intermediates for half/bfloat16 (float64 for float64) and is the reference the fused kernels match.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/op_args.h"

namespace sdpax::math {

std::tuple<at::Tensor, at::Tensor> fwd(const FwdArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const BwdArgs& a);

// Bool (bh, L, S): true where the element is kept.
at::Tensor dropout_keep_mask(const at::Tensor& rng, int64_t bh, int64_t L, int64_t S, double dropout_p);

}  // namespace sdpax::math
