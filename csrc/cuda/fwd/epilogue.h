// The forward epilogue, shared by both forward main loops: one thread's share of one query row, normalised and
// stored with its log-sum-exp (or, with split keys, this split's partial output and lse, merged by merge.h).
#pragma once
#include "common/params.h"
#include "cuda/fwd/softmax.h"
#include "cuda/mask.h"
#include "cuda/prims/mma.h"
#include "cuda/varlen.h"

namespace sdpax {
namespace cuda {

// Row i of head h of batch b, held as column pairs dn * 8 + 2t, + 1 (dn < D / 8) by the row's four threads t:
// o(dn, e) is element e of pair dn, unnormalised; m the running max, l this thread's part of the running sum. Every
// thread of the warp calls it (the sum is reduced across the row's threads); `ok`: the row exists.
template <class T, int D, class O>
__device__ __forceinline__ void fwd_store_row(const AttnParams& p, int64_t b, int h, int i, bool ok, float m, float l,
                                              int t, const O& o) {
  const float lsum = warp_sum4(l);
  if (!ok) return;
  const SoftmaxRow r = softmax_finish(m, lsum);
  const int Ev = static_cast<int>(p.Ev);
  const int64_t bh = b * p.hq + h;
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (c < Ev) st2<T>(out + c, o(dn, 0) * r.inv, o(dn, 1) * r.inv);
    }
    if (t == 0) p.lse[lse_row(p, bh, i)] = r.lse;
  } else {
    const int64_t prow = static_cast<int64_t>(blockIdx.z) * lse_rows(p) + lse_row(p, bh, i);
    float* out = p.o_partial + prow * Ev;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (c < Ev) *reinterpret_cast<float2*>(out + c) = make_float2(o(dn, 0) * r.inv, o(dn, 1) * r.inv);
    }
    if (t == 0) p.lse_partial[prow] = r.lse;
  }
}

}  // namespace cuda
}  // namespace sdpax
