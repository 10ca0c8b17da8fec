// Launch of a planned call: the plan (plan.h: main loop, kind, head-dim bucket) -> its variant through the
// generated dispatch (gen/dispatch.h, from csrc/variants.py); each variant is instantiated in its own translation
// unit. Also the dQ finish pass and the device lookup the plan needs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/launch.h"
#include "cuda/prims/mma.h"  // pack2
#include "gen/dispatch.h"

namespace sdpax {
namespace cuda {

DeviceInfo current_device() {
  static DeviceInfo info[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return DeviceInfo{};
  if (info[dev].num_sms == 0) {
    DeviceInfo d;
    if (cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return DeviceInfo{};
#ifdef SDPAX_BUILD_SM90A
    d.build_sm90a = true;
#endif
    info[dev] = d;
  }
  return info[dev];
}

cudaError_t launch_fwd(const AttnParams& p, const FwdPlan& plan, cudaStream_t stream) {
  return plan.loop == FwdLoop::Sm90 ? dispatch_fwd_sm90(p, plan.head_dim, plan.kind, stream)
                                    : dispatch_fwd(p, plan.head_dim, plan.kind, stream);
}

// dQ from the atomics' float accumulator. One pass: reading the accumulator, scaling it in place and converting
// it (two passes: 3 x 4 + 2 bytes per element, 0.16 ms of a 1.3 ms bool-mask forward + backward at d128 L4k,
// B = 4, H = 16) moved 1.75 times the bytes of this kernel's 4 + 2. Four elements per thread (n is a multiple of 8:
// E is), float4 in, 8 or 16 bytes out.
template <class T>
__global__ void __launch_bounds__(256) dq_finish_kernel(const float4* __restrict__ acc, T* dq, int64_t n4,
                                                        float scale) {
  for (int64_t i = blockIdx.x * int64_t(256) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * 256) {
    const float4 a = acc[i];
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(dq)[i] = make_float4(a.x * scale, a.y * scale, a.z * scale, a.w * scale);
    } else {
      reinterpret_cast<uint2*>(dq)[i] =
          make_uint2(pack2<T>(a.x * scale, a.y * scale), pack2<T>(a.z * scale, a.w * scale));
    }
  }
}

cudaError_t launch_dq_finish(const float* dq_accum, void* dq, ScalarKind dtype, int64_t n, float scale,
                             cudaStream_t stream) {
  if (n % 4 != 0 || reinterpret_cast<uintptr_t>(dq_accum) % 16 != 0 || reinterpret_cast<uintptr_t>(dq) % 16 != 0)
    return cudaErrorInvalidValue;
  const int64_t n4 = n / 4;
  if (n4 == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n4 + 255) / 256, int64_t(1) << 20));
  const float4* acc = reinterpret_cast<const float4*>(dq_accum);
  switch (dtype) {
    case ScalarKind::Float:
      dq_finish_kernel<float><<<grid, 256, 0, stream>>>(acc, static_cast<float*>(dq), n4, scale);
      break;
    case ScalarKind::Half:
      dq_finish_kernel<__half><<<grid, 256, 0, stream>>>(acc, static_cast<__half*>(dq), n4, scale);
      break;
    case ScalarKind::BFloat16:
      dq_finish_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(acc, static_cast<__nv_bfloat16*>(dq), n4, scale);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_bwd(const AttnParams& p, const BwdPlan& plan, float* delta, cudaStream_t stream) {
  AttnParams q = p;
  q.delta = delta;
  const bool general = plan.kind == BwdKind::General;
  if (plan.loop == BwdLoop::Sm90) {
    const cudaError_t err = dispatch_bwd_sm90(q, plan.head_dim, general, stream);
    // cudaErrorNotSupported: a tensor map could not be encoded and nothing was launched; the mma.sync loop runs
    // unless the plan forbids it (sdpax.cuda_main_loop(backward="sm90", strict=True)).
    if (err != cudaErrorNotSupported || !plan.mma_fallback) return err;
  }
  // The mma.sync loops: run_bwd picks bwd_wide or bwd_kernel by the same tile table as the plan.
  return dispatch_bwd(q, plan.head_dim, general, stream);
}

}  // namespace cuda
}  // namespace sdpax
