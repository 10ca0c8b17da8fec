// Variable-length (packed) attention: sdpax::varlen_fwd / varlen_bwd (schemas in csrc/ops.cpp).
//
// q is (Tq, Hq, E), k / v (Tk, Hkv, E / Ev) with sequence b at rows [cu_q[b], cu_q[b + 1]) and
// [cu_k[b], cu_k[b + 1]); or k / v a pool of pages (P, page, Hkv, E / Ev) read through block_table (forward only).
// Each sequence is one dense call of the backend on views into the packed tensors (no padding, no copy of q/k/v
// except the gather of a paged sequence), so every dense feature holds per sequence with the dense semantics.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/op_args.h"

namespace sdpax {

struct VarlenArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& cu_q;
  const std::optional<at::Tensor>& cu_k;
  int64_t max_q, max_k;
  double dropout_p;
  int64_t causal;
  double scale;
  bool enable_gqa;
  const std::optional<at::Tensor>& sinks;
  const std::optional<at::Tensor>& rng;
  BackendChoice backend;
  double softcap;
  int64_t window_left, window_right;
  const std::optional<at::Tensor>& seqused_k;
  const std::optional<at::Tensor>& block_table;
};

// Sequence b: queries [q0, q0 + L) of q, keys [k0, k0 + S) of k (for a paged cache, S keys through its pages).
struct SeqSpan {
  int64_t q0, L, k0, S;
};

// Validates the call (shapes, dtypes, devices, the offsets, the maxima, the pages) and returns the sequences.
std::vector<SeqSpan> varlen_spans(const VarlenArgs& a);

using DenseFwd = std::tuple<at::Tensor, at::Tensor> (*)(const FwdArgs&);
// A dense call that reads a paged sequence's keys in place (the FwdArgs' k / v: its first page as (1, Hkv, page,
// E), for the checks), or nullopt where it cannot; the pages are then gathered for DenseFwd.
using PagedFwd = std::optional<std::tuple<at::Tensor, at::Tensor>> (*)(const FwdArgs&, const PagedKV&);
using DenseBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(const BwdArgs&);
using VarlenGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv, dsinks
// The whole packed call in one go (a backend whose kernels read the packed layout), or nullopt where it cannot.
using PackedFwd = std::optional<std::tuple<at::Tensor, at::Tensor>> (*)(const VarlenArgs&,
                                                                          const std::vector<SeqSpan>&);
using PackedBwd = std::optional<VarlenGrads> (*)(const VarlenArgs&, const std::vector<SeqSpan>&,
                                                 const at::Tensor& grad_out, const at::Tensor& out,
                                                 const at::Tensor& lse);

// (out (Tq, Hq, Ev), lse (Hq, Tq)): `packed` when given and able, else one dense call per sequence (`paged`, when
// given, first for paged ones).
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const VarlenArgs& a, DenseFwd dense, PagedFwd paged = nullptr,
                                              PackedFwd packed = nullptr);
// (dq, dk, dv, dsinks): `packed` when given and able, else one dense backward per sequence; no pages, no seqused_k
// (as torch's varlen_attn).
VarlenGrads varlen_bwd(const VarlenArgs& a, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                       DenseBwd dense, PackedBwd packed = nullptr);

}  // namespace sdpax
