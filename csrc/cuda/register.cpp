// CUDA registrations: MATH stays available (backend 0); FLASH_ATTENTION (backend 1) runs the fused kernels.
#include <torch/library.h>

#include "dispatch.h"
#include "cuda/flash_api.h"

TORCH_LIBRARY_IMPL(sdpax, CUDA, m) {
  m.impl("fwd", &sdpax::fwd_entry<&sdpax::cuda::flash_fwd>);
  m.impl("bwd", &sdpax::bwd_entry<&sdpax::cuda::flash_bwd>);
  m.impl("varlen_fwd", &sdpax::varlen_fwd_entry<&sdpax::cuda::flash_fwd, nullptr, &sdpax::cuda::flash_varlen_fwd>);
  m.impl("varlen_bwd", &sdpax::varlen_bwd_entry<&sdpax::cuda::flash_bwd, &sdpax::cuda::flash_varlen_bwd>);
}
