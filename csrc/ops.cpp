// The sdpax operator schemas: the one TORCH_LIBRARY(sdpax) block. Implementations register per dispatch key
// elsewhere (math/: CompositeExplicitAutograd, cpu/: CPU, cuda/: CUDA); fake kernels and autograd live in
// python/sdpax/_ops.py.
//
// Shared arguments:
//   causal    0 none, 1 upper-left (query i sees keys j <= i), 2 lower-right (j <= i + S - L)
//   scale     multiplies q.k^T; sinks are not scaled
//   sinks     optional (Hq,) logits that join each row's softmax denominator and carry no value
//   rng       {seed, offset} int64 on the query's device, read only when dropout_p > 0; the keep/drop decision is
//             a Philox function of (seed, offset, batch*head, i, j), so bwd regenerates the fwd mask. Or
//             {seed, offset, row0, col0}: element (i, j) takes the decision of (i + row0, j + col0), so a call on a
//             block of a larger problem drops what the whole would (MATH and CPU; sdpax.distributed)
//   backend   bits 0-3: 0 MATH, 1 FLASH_ATTENTION (the fused kernel of the input's device); bits 4-8: the CUDA
//             main loops sdpax.cuda_main_loop asks for (common/op_args.h)
//   softcap   0: none; c > 0: scaled scores s -> c tanh(s / c) before the mask and causal limit (not the sinks)
//   window_left, window_right
//             a sliding window (-1: unbounded on that side): query i sees keys j with
//             d(i) - window_left <= j <= d(i) + window_right, d(i) = i (upper-left) or i + S - L (lower-right).
//             With causal != 0 the window takes the causal alignment and the causal edge is its right edge
//             (window_right must be -1); with causal = 0 it is lower-right aligned (FlashAttention's convention)
#include <torch/library.h>

TORCH_LIBRARY(sdpax, m) {
  m.def(
      "fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, int causal, float scale, "
      "bool enable_gqa, Tensor? sinks, Tensor? rng, int backend, float softcap=0.0, "
      "int window_left=-1, int window_right=-1) -> (Tensor out, Tensor lse)");
  // grad_mask is returned only when mask_grad is set and attn_mask is additive (else an empty tensor);
  // grad_sinks is empty when sinks is None.
  m.def(
      "bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor out, Tensor lse, "
      "float dropout_p, int causal, float scale, bool enable_gqa, Tensor? sinks, Tensor? rng, int backend, "
      "bool mask_grad, float softcap=0.0, int window_left=-1, int window_right=-1) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_mask, "
      "Tensor grad_sinks)");
  // Variable-length (packed) attention, csrc/common/varlen.h: query (Tq, Hq, E), key / value (Tk, Hkv, E / Ev), or
  // pages (P, page, Hkv, E / Ev) read through block_table (int32, (N, max_pages)) with seqused_k keys each; the
  // other arguments as fwd's, per sequence (causal and the window are aligned within each sequence). lse is
  // (Hq, Tq). Sequence b drops what a dense call on it alone with rng {seed, offset + b} would.
  m.def(
      "varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seq_q, Tensor? cu_seq_k, SymInt max_q, "
      "SymInt max_k, float dropout_p, int causal, float scale, bool enable_gqa, Tensor? sinks, Tensor? rng, "
      "int backend, float softcap=0.0, int window_left=-1, int window_right=-1, Tensor? seqused_k=None, "
      "Tensor? block_table=None) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor cu_seq_q, Tensor cu_seq_k, "
      "SymInt max_q, SymInt max_k, Tensor out, Tensor lse, float dropout_p, int causal, float scale, bool enable_gqa, "
      "Tensor? sinks, Tensor? rng, int backend, float softcap=0.0, int window_left=-1, int window_right=-1) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_sinks)");
  // The dropout keep mask (bool, (bh, L, S)) that every backend applies for this rng; for tests and debugging.
  m.def("dropout_keep_mask(Tensor rng, int bh, int L, int S, float dropout_p) -> Tensor");
  // The launch plan of a CUDA FLASH_ATTENTION call on a described device (csrc/cuda/plan_op.cpp); explain() and
  // the plan's tests read it.
  m.def(
      "cuda_plan(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, int causal, "
      "bool enable_gqa, int backend, bool mask_grad, bool deterministic, int[] device, int window_left=-1, "
      "int window_right=-1, float softcap=0.0) -> int[]");
}
