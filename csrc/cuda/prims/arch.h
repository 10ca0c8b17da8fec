// Which device code is being compiled. SDPAX_SM90A_DEVICE: the sm_90a pass (wgmma, TMA, setmaxnreg exist only
// there); the Hopper primitives compile to empty stubs in every other pass, and the host launches the Hopper
// kernels only on a compute-capability-9 device of a build that contains sm_90a code (cuda/plan.cpp).
#pragma once

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SDPAX_SM90A_DEVICE 1
#endif
