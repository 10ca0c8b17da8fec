// CPU registrations: MATH or the fused CPU kernels (FLASH_ATTENTION), chosen by the backend id of the call.
#include <torch/library.h>

#include "dispatch.h"
#include "cpu/host.h"

TORCH_LIBRARY_IMPL(sdpax, CPU, m) {
  m.impl("fwd", &sdpax::fwd_entry<&sdpax::cpu::flash_fwd>);
  m.impl("bwd", &sdpax::bwd_entry<&sdpax::cpu::flash_bwd>);
  m.impl("varlen_fwd", &sdpax::varlen_fwd_entry<&sdpax::cpu::flash_fwd, &sdpax::cpu::flash_fwd_paged>);
  m.impl("varlen_bwd", &sdpax::varlen_bwd_entry<&sdpax::cpu::flash_bwd>);
}
