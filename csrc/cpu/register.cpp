#include <torch/library.h>

#include "common/dispatch.h"

TORCH_LIBRARY_IMPL(sdpax, CPU, m) {
  m.impl("fwd", &sdpax::fwd_entry<nullptr>);
  m.impl("bwd", &sdpax::bwd_entry<nullptr>);
}
