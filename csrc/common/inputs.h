// Host-side input handling shared by every backend: validation of an op call and the 4-D canonical views.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "common/op_args.h"
#include "common/params.h"

namespace sdpax {

// The inputs of one call, viewed as 4-D (batch, head, row, column) without copying where strides allow.
struct Canonical {
  at::Tensor q, k, v;       // (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
  std::optional<at::Tensor> mask;  // expanded to (B, Hq, L, S); stride 0 on broadcast dims
  int64_t B, Hq, Hkv, L, S, E, Ev;
};

// Throws c10::Error with a message naming the problem when the call is invalid.
void check_inputs(const FwdArgs& a);
// check_inputs plus the backward's own argument: grad_out must have the output's shape.
void check_inputs(const BwdArgs& a);

Canonical canonicalize(const FwdArgs& a);

// The kernel-facing description of a call: shapes, pointers and strides of the 4-D q/k/v given (the canonical
// views, or aligned copies a kernel asked for) and of c.mask, plus the scalar arguments. Outputs and backward
// fields are left to the caller. sinks_f32: the sinks as contiguous float32, if any.
AttnParams make_params(const Canonical& c, const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                       const std::optional<at::Tensor>& sinks_f32, const FwdArgs& a);

// The sinks as the contiguous float32 tensor make_params points at (kept alive by the caller), if any.
std::optional<at::Tensor> sinks_f32(const std::optional<at::Tensor>& sinks);

// Output / saved-forward fields of the params: out (B, Hq, L, Ev) and its float32 log-sum-exp (B * Hq * L,
// contiguous); for the backward also dout (like out) and the dK, dV outputs (B, Hkv, S, E / Ev). dQ and the
// device-specific scratch are left to the caller.
void bind_forward(AttnParams& p, const at::Tensor& out4, const at::Tensor& lse);
void bind_backward(AttnParams& p, const at::Tensor& dout4, const at::Tensor& dk, const at::Tensor& dv);

// The view of a tensor of shape (B', Hq, L, X) with B' the flattened batch, as the original rank.
at::Tensor uncanonical(const at::Tensor& t4, const at::Tensor& like_query, int64_t last_dim);

ScalarKind scalar_kind(at::ScalarType t);

// Numbers and shapes as text for error messages. Messages never stream integers or doubles into an ostream:
// with GCC 13 and torch 2.11's wheels that instantiation crashed inside the extension (seen on the H100 machine),
// while std::to_string is safe everywhere.
std::string num(int64_t x);
std::string num(double x);
std::string shape(at::IntArrayRef s);
Strides4 strides4(const at::Tensor& t);

}  // namespace sdpax
