// The split-key merge, shared by both forward main loops: a forward with num_splits > 1 writes per-split partial
// outputs and log-sum-exps (epilogue.h), and this pass combines them into the output and its lse.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>

#include "common/params.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/tiles.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

// Merge of the split-key partials: lse = log(sum_s exp(lse_s) + exp(sink)), out = sum_s exp(lse_s - lse) out_s.
// One block per (batch * head, row) (grid-stride): thread s holds split s's lse, block reductions give the max and
// the sum, the weights go to shared memory, then threads take output columns (c = tid % 128) and split halves
// (tid / 128) so the partial outputs are read coalesced with many loads in flight. A decode row has up to 128
// splits: one warp per row walking them in sequence left the merge latency-bound (about three times the
// attention kernel itself at B = 1, S = 32k). At most tiles::kMaxSplits splits.
constexpr int kMaxSplits = tiles::kMaxSplits;

__device__ __forceinline__ float block_reduce_256(float x, bool is_max, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read from the previous reduction
  if ((threadIdx.x & 31) == 0) red[warp] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < 8; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

template <class T>
__global__ void __launch_bounds__(256) merge_splits_kernel(const __grid_constant__ AttnParams p) {
  __shared__ float red[8];
  __shared__ float weight[kMaxSplits];
  __shared__ float half_acc[128];
  const int64_t rows = p.batch * p.hq * p.L;
  const int ns = p.num_splits;
  const int t = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bh = row / p.L, i = row % p.L, b = bh / p.hq, h = bh % p.hq;
    const float ls = t < ns ? p.lse_partial[t * rows + row] : -INFINITY;
    const float sink = p.sinks ? p.sinks[h] : -INFINITY;
    const float mx = fmaxf(block_reduce_256(ls, true, red), sink);
    float lse = -INFINITY;
    if (mx != -INFINITY) {
      const float part = ls != -INFINITY ? __expf(ls - mx) : 0.f;
      const float sum = block_reduce_256(part, false, red) + (sink != -INFINITY ? __expf(sink - mx) : 0.f);
      lse = mx + __logf(sum);
    }
    if (t < ns) weight[t] = (lse != -INFINITY && ls != -INFINITY) ? __expf(ls - lse) : 0.f;
    __syncthreads();
    T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
    const int half = t >> 7;
    for (int c0 = 0; c0 < p.Ev; c0 += 128) {
      const int c = c0 + (t & 127);
      float acc = 0.f;
      if (c < p.Ev) {
        const float* src = p.o_partial + row * p.Ev + c;
#pragma unroll 8
        for (int s = half; s < ns; s += 2) acc += weight[s] * src[static_cast<int64_t>(s) * rows * p.Ev];
      }
      if (half == 1) half_acc[t & 127] = acc;
      __syncthreads();
      if (half == 0 && c < p.Ev) out[c] = from_float<T>(acc + half_acc[t]);
      __syncthreads();
    }
    if (t == 0) p.lse[row] = lse;
  }
}

// Launches the merge after a split-key forward (a packed call's rows as one batch: the merge is per row).
template <class T>
inline cudaError_t launch_merge(const AttnParams& p, cudaStream_t stream) {
  const AttnParams rows = all_rows(p);
  const int64_t n = rows.batch * rows.hq * rows.L;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(n, int64_t(1) << 20));
  merge_splits_kernel<T><<<grid, 256, 0, stream>>>(rows);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sdpax
