// Host glue of the CUDA FLASH_ATTENTION backend (see csrc/dispatch.h): tensors in, AttnParams and the launch plan
// to the kernels (cuda/launch.h).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "common/op_args.h"
#include "common/varlen.h"

namespace sdpax {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a);
// A packed variable-length batch in one launch per pass (common/varlen.h PackedFwd / PackedBwd).
std::optional<std::tuple<at::Tensor, at::Tensor>> flash_varlen_fwd(const VarlenArgs& a,
                                                                   const std::vector<SeqSpan>& spans);
std::optional<VarlenGrads> flash_varlen_bwd(const VarlenArgs& a, const std::vector<SeqSpan>& spans,
                                            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse);

}  // namespace cuda
}  // namespace sdpax
