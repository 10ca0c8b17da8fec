// The bulk tensor copy engine (TMA): one box of a tensor map (encoded by the host, launch_sm90.h) into shared
// memory, completing a transaction on an mbarrier (sync.h).
#pragma once
#include <cstdint>

#include "cuda/prims/arch.h"

namespace sdpax {
namespace cuda {

#ifdef SDPAX_SM90A_DEVICE
// One box of a 4-D tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
#else
__device__ __forceinline__ void tma_load_4d(uint32_t, const void*, uint32_t, int, int, int, int) {}
#endif

}  // namespace cuda
}  // namespace sdpax
