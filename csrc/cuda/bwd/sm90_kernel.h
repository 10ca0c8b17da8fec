// Hopper (sm90a) backward main loop at head dims 64 and 128 (plain and general kind) and 256 (plain kind),
// 16-bit inputs, non-deterministic dQ (float atomics): the plain kind (no mask; causal of either alignment, GQA,
// sinks through lse) and, of the general kind, bool masks without dropout (bwd_sm90_general_ok). Everything else
// runs bwd/wide_kernel.h / bwd/mma_kernel.h (launch.cu decides per call).
//
// One block per (key block, batch, kv head), as bwd_wide: it walks the G query heads of the GQA group and their
// query tiles of BM = 64 rows (tiles wholly above the causal diagonal are never visited), and keeps dK / dV of its
// keys in registers for the whole walk, so dK / dV are written once, without atomics. Three warpgroups:
//   consumers (warpgroups 0, 1; cuda/bwd/sm90_consumer.h, d256: sm90_consumer_d256.h): per query tile S^T and
//     dP^T by wgmma, P^T and dS^T, dV += P^T dO and dK += dS^T Q by wgmma, dQ += dS K by wgmma and float atomics;
//   producer (warpgroup 2; cuda/bwd/sm90_producer.h): K and V once, then per query tile Q, dO (TMA), lse, Delta
//     and (general kind) the bool mask tile packed for the consumers, into a ring of stages with full / empty
//     mbarriers; it alone decides which tiles the consumers see.
// The block context both roles share (shared-memory layout, the block's keys and query tiles, named barriers) is
// cuda/bwd/sm90_block.h. The kernel body exists only in the sm_90a compilation (SDPAX_SM90A_DEVICE).
#pragma once
#include "cuda/bwd/sm90_block.h"
#include "cuda/bwd/sm90_consumer.h"
#include "cuda/bwd/sm90_consumer_d256.h"
#include "cuda/bwd/sm90_producer.h"

namespace sdpax {
namespace cuda {

template <class T, int D, bool kGeneral>
__global__ void __launch_bounds__(BwdSm90Cfg<D, kGeneral>::kThreads, 1)
    bwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ BwdTmaMaps maps) {
#ifdef SDPAX_SM90A_DEVICE
  using Cfg = BwdSm90Cfg<D, kGeneral>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const BwdSm90Block<T, D, kGeneral> blk(p, maps, smem);
  if (blk.tid == 0) blk.init_barriers();
  __syncthreads();  // barriers initialised before anyone waits on them
  // One if / else by role, as setmaxnreg asks: the producer warpgroup follows the consumer warpgroups.
  if (blk.tid >= Cfg::kConsumers) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    BwdSm90Producer<T, D, kGeneral>(blk).run();
    return;
  }
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  if constexpr (D == 256) {
    BwdSm90ConsumerD256<T>(blk).run();
  } else {
    BwdSm90Consumer<T, D, kGeneral>(blk).run();
  }
#endif
}

}  // namespace cuda
}  // namespace sdpax
