// The CPU FLASH_ATTENTION host entries (see csrc/dispatch.h): tensors in, AttnParams to the kernels (kernel.h).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/op_args.h"

namespace sdpax::cpu {

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a);

}  // namespace sdpax::cpu
