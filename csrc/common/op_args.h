// The arguments of one sdpax::fwd / sdpax::bwd call as one struct, built once from the schema's positional
// arguments (csrc/dispatch.h) and passed down unchanged: validation, MATH and each device's host entry.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/params.h"

namespace sdpax {

// The schema's `backend` integer: bits 0-3 the backend (Backend), bits 4-5 the forward MainLoop, bits 6-7 the
// backward MainLoop, bit 8 strict (a call planned for the Hopper loop fails instead of falling back to mma.sync
// when its tensor maps cannot be encoded). python/sdpax/_select.py writes it (backend_id).
struct BackendChoice {
  Backend backend = Backend::Math;
  MainLoop fwd_loop = MainLoop::Auto, bwd_loop = MainLoop::Auto;
  bool strict = false;
};
// Throws c10::Error naming the problem for an id that is none of the above.
BackendChoice decode_backend(int64_t id);

struct FwdArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& mask;
  double dropout_p;
  int64_t causal;  // Causal as the schema's integer
  double scale;
  bool enable_gqa;
  const std::optional<at::Tensor>& sinks;
  const std::optional<at::Tensor>& rng;
  BackendChoice backend;
  double softcap = 0.0;  // 0: none; else scores s -> softcap * tanh(s / softcap) before the mask
  int64_t window_left = -1, window_right = -1;  // sliding window (csrc/ops.cpp); -1: unbounded
};

// One sequence's keys and values in a paged KV cache (varlen_attn with a block_table): the pages (P, page, Hkv, E)
// of k and v, the sequence's pages in order (int32, on the host) and its key count S.
struct PagedKV {
  const at::Tensor& k_pages;
  const at::Tensor& v_pages;
  const at::Tensor& pages;
  int64_t S;
};

struct BwdArgs {
  FwdArgs f;  // the forward's arguments, as saved by autograd
  const at::Tensor& grad_out;
  const at::Tensor& out;
  const at::Tensor& lse;
  bool mask_grad;
};

}  // namespace sdpax
