// MATH for every device without a device-specific registration (and Meta-free composite fallbacks): the
// composite implementation is the only backend there.
#include <torch/library.h>

#include "dispatch.h"

TORCH_LIBRARY_IMPL(sdpax, CompositeExplicitAutograd, m) {
  m.impl("fwd", &sdpax::fwd_entry<nullptr>);
  m.impl("bwd", &sdpax::bwd_entry<nullptr>);
  m.impl("varlen_fwd", &sdpax::varlen_fwd_entry<nullptr>);
  m.impl("varlen_bwd", &sdpax::varlen_bwd_entry<nullptr>);
  m.impl("dropout_keep_mask", &sdpax::math::dropout_keep_mask);
}
