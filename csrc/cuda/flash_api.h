// Host glue of the CUDA FLASH_ATTENTION backend (see csrc/dispatch.h): tensors in, AttnParams and the launch plan
// to the kernels (cuda/launch.h).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/op_args.h"

namespace sdpax {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a);

}  // namespace cuda
}  // namespace sdpax
