// The CPU FLASH_ATTENTION host entries (see csrc/dispatch.h): tensors in, AttnParams to the kernels (kernel.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/op_args.h"

namespace sdpax::cpu {

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a);
// A call over a paged sequence (varlen_attn with a block_table), its keys read in place from the pages; nullopt
// where the kernels cannot (reads_pages_in_place, cpu/kernel.h): the pages are gathered instead.
std::optional<std::tuple<at::Tensor, at::Tensor>> flash_fwd_paged(const FwdArgs& a, const PagedKV& kv);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a);

}  // namespace sdpax::cpu
