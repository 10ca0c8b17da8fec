// Packed variable-length batches in the mma.sync loops (common/params.h `seqs`). A kernel decodes its block's
// batch index from the grid as for a dense call whose L and S are the longest sequence's, then works on the view
// below: the block's sequence as a dense call of batch 1 over its own rows. The main loops, tile limits, causal
// and window alignment, dropout and epilogues then need no code of their own for packed batches; blocks past
// their sequence's rows or keys exit before any barrier.
#pragma once
#include <cstdint>

#include "common/params.h"

namespace sdpax {
namespace cuda {

template <class P>
__device__ __forceinline__ P* moved(P* ptr, int64_t elems) {
  return ptr != nullptr ? ptr + elems : ptr;
}

// Sequence b of a packed call (b becomes 0: the view's only batch), or p itself for a dense call. T: the element
// type of q, k, v, out, dout, dq, dk and dv. kPacked is a template argument of the kernels (the launch picks the
// variant by p.seqs) so that a dense kernel carries none of the view's registers: the moved pointers and lengths
// cost the general kinds spills where they sit at the 255-register limit.
template <class T, bool kPacked>
__device__ __forceinline__ AttnParams seq_view(const AttnParams& p, int64_t& b) {
  AttnParams s = p;
  if constexpr (kPacked) {
    const int4 r = reinterpret_cast<const int4*>(p.seqs)[b];  // {q0, L, k0, S}
    const int64_t q0 = r.x, k0 = r.z;
    s.L = r.y;
    s.S = r.w;
    s.q = moved(static_cast<const T*>(p.q), q0 * p.q_st.r);
    s.out = moved(static_cast<T*>(p.out), q0 * p.out_st.r);
    s.dout = moved(static_cast<const T*>(p.dout), q0 * p.dout_st.r);
    s.dq = moved(static_cast<T*>(p.dq), q0 * p.dq_st.r);
    s.k = moved(static_cast<const T*>(p.k), k0 * p.k_st.r);
    s.v = moved(static_cast<const T*>(p.v), k0 * p.v_st.r);
    s.dk = moved(static_cast<T*>(p.dk), k0 * p.dk_st.r);
    s.dv = moved(static_cast<T*>(p.dv), k0 * p.dv_st.r);
    s.lse = moved(p.lse, q0);
    s.delta = moved(p.delta, q0);
    s.dq_accum = moved(p.dq_accum, q0 * p.E);
    s.lse_partial = moved(p.lse_partial, q0);
    s.o_partial = moved(p.o_partial, q0 * p.Ev);
    s.kv_pages = moved(p.kv_pages, b * p.kv_table_cols);
    s.rng_seq = b;
    b = 0;
  }
  return s;
}

// Row i of head bh's log-sum-exp, Delta and dq_accum rows (a packed call's heads hold every packed query row).
__device__ __forceinline__ int64_t lse_row(const AttnParams& p, int64_t bh, int64_t i) { return bh * p.head_rows + i; }

// The rows of lse (and of one split's partials): every (batch, head, row), or every (head, packed row).
__host__ __device__ __forceinline__ int64_t lse_rows(const AttnParams& p) {
  return (p.seqs != nullptr ? 1 : p.batch) * p.hq * p.head_rows;
}

// The params of the passes that go row by row whatever the sequence (Delta, the split merge): a packed call as one
// batch of every packed query row.
inline AttnParams all_rows(const AttnParams& p) {
  AttnParams r = p;
  if (p.seqs != nullptr) {
    r.seqs = nullptr;
    r.batch = 1;
    r.L = p.head_rows;
  }
  return r;
}

}  // namespace cuda
}  // namespace sdpax
