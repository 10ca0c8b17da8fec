// Hopper synchronisation primitives: mbarriers (shared-memory 64-bit barriers with a phase bit and a transaction
// count; the producer arms a stage's "full" barrier with the bytes it will receive, the copies complete the
// transaction, consumers wait on the phase parity and "empty" barriers carry the release back), named barriers
// among subsets of a block, and setmaxnreg (moving registers between warpgroups).
#pragma once
#include <cstdint>

#include "cuda/prims/arch.h"

namespace sdpax {
namespace cuda {

// Whether a setmaxnreg split (consumer warpgroups at `consumer_regs`, one producer warpgroup at `producer_regs`) fits
// the registers a block of `threads` gets at launch under __launch_bounds__(threads, 1): 65536 / threads rounded down
// to a multiple of 8, per thread. setmaxnreg.inc waits until the registers it asks for are free in the block's pool,
// so a split above the allocation never returns (the kernel hangs).
constexpr bool setmaxnreg_fits(int threads, int consumers, int consumer_regs, int producer_regs) {
  return consumers * consumer_regs + (threads - consumers) * producer_regs <= threads * (65536 / threads / 8 * 8);
}

#ifdef SDPAX_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Barrier among `count` threads (a multiple of 32) under id `id` (0 is __syncthreads'), so that the consumer
// warpgroups can synchronize without the producer warp.
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Barrier as above that also returns whether `pred` was true in any participating thread.
__device__ __forceinline__ bool named_barrier_or(int id, int count, bool pred) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbarrier.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"(static_cast<uint32_t>(pred)), "r"(id), "r"(count)
      : "memory");
  return r != 0;
}
// Barrier as above that returns whether `pred` was true in every participating thread.
__device__ __forceinline__ bool named_barrier_and(int id, int count, bool pred) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbarrier.red.and.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"(static_cast<uint32_t>(pred)), "r"(id), "r"(count)
      : "memory");
  return r != 0;
}
// Register budget per thread of the executing warpgroup (takes effect only under a launch-bound register cap).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#else
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {}
__device__ __forceinline__ void mbar_init(uint32_t, int) {}
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void mbar_expect_tx(uint32_t, uint32_t) {}
__device__ __forceinline__ void mbar_arrive(uint32_t) {}
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) {}
__device__ __forceinline__ void named_barrier(int, int) {}
__device__ __forceinline__ bool named_barrier_or(int, int, bool pred) { return pred; }
__device__ __forceinline__ bool named_barrier_and(int, int, bool pred) { return pred; }
#endif

}  // namespace cuda
}  // namespace sdpax
