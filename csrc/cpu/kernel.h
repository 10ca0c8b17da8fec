// Entry points of the fused CPU kernels. They read and write only through AttnParams (no at::Tensor); the host
// glue in host.cpp builds the params, allocates the outputs and picks the entry point.
#pragma once
#include "common/params.h"

namespace sdpax::cpu {

// Tiled online-softmax forward: fills p.out and p.lse.
void run_fwd(const AttnParams& p);

// Short query lengths (L <= kDecodeMaxL): reads K/V once per KV head for all query rows of its group, splitting
// the key sequence across threads when there are few KV heads, and merges the pieces by log-sum-exp.
constexpr int64_t kDecodeMaxL = 8;
void run_decode(const AttnParams& p);
// Whether run_decode / run_fwd read paged keys (AttnParams::kv_pages) in place: the decode kernel's direct path
// walks any page size; the packing paths need each key tile inside one page.
bool reads_pages_in_place(const AttnParams& p);

// FA2-style backward: recomputes P from p.lse, Delta = rowsum(dO * O); fills p.dq, p.dk, p.dv and (with sinks)
// the per-(batch, head) terms p.dsinks_bh. p.out and p.lse are the forward's outputs.
void run_bwd(const AttnParams& p);

}  // namespace sdpax::cpu
