// Hopper (sm90a) forward: the same attention as the mma.sync forward (mma_kernel.h: row packing for GQA, causal
// tile skipping, masks, dropout, sinks, split keys, the fully-masked-row guard, the epilogue), with both matrix
// products on wgmma.
//
// One block computes BM = 128 rows of one (batch, kv head) with three warpgroups:
//   consumers (warpgroups 0, 1; sm90_consumer.h): S = Q K^T, the online softmax, O += P V, the epilogue;
//   producer (warpgroup 2; sm90_producer.h): streams K and V tiles through TMA into two rings of stages (K, V), each
//     stage guarded by full/empty mbarriers: K(j) is released once S(j) is done, V(j) once P(j) V(j) is, so a K
//     stage frees one step earlier than a joint K/V stage would (two stages of each give a tile a whole step to
//     land, which is what lets the general kind keep 128-key tiles at d128 beside its mask buffers); with a bool
//     mask it also loads the mask tile, drops tiles that no row may see and hands the consumers the rest packed to
//     one bit per element (causal and bounds included), with the K stage.
// The plain kind at d64 (kMulti) runs a persistent grid: each block walks pairs of row blocks (FwdSm90Work) as one
// pipeline, so short sequences do not pay a block's launch, set-up, Q / first K/V latency and drain per 128 rows.
//
// The kernel body exists only in the sm_90a compilation (SDPAX_SM90A_DEVICE); the host launches it only on
// compute capability 9.x when the build contains sm_90a (cuda/plan.cpp).
#pragma once
#include "cuda/fwd/sm90_block.h"
#include "cuda/fwd/sm90_consumer.h"
#include "cuda/fwd/sm90_producer.h"

namespace sdpax {
namespace cuda {

template <class T, int D, FwdKind kKind>
__global__ void __launch_bounds__(FwdSm90Cfg<D, kKind>::kThreads, 1)
    fwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ FwdTmaMaps maps,
                    const __grid_constant__ FwdSm90Work work) {
#ifdef SDPAX_SM90A_DEVICE
  using Cfg = FwdSm90Cfg<D, kKind>;
  extern __shared__ __align__(1024) unsigned char smem[];
  FwdSm90Block<T, D, kKind> block(p, maps, work, smem);
  if (block.tid == 0) block.init_barriers();
  __syncthreads();  // barriers initialised before anyone waits on them
  // One if / else by role, as setmaxnreg asks: the producer warpgroup follows the consumer warpgroups.
  if (block.tid >= Cfg::kConsumers) {
    FwdSm90Producer<T, D, kKind> producer(block);
    producer.run();
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    FwdSm90Consumer<T, D, kKind> consumer(block);
    consumer.run();
  }
#endif
}

}  // namespace cuda
}  // namespace sdpax
