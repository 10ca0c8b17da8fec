// Plain-data description of one attention call, shared by every fused kernel (CPU and CUDA).
// Kernel code sees only this struct: no torch header is included here.
//
// Layout convention: every tensor is described as 4-D (batch, head, row, column) with element strides, after the
// host glue has flattened any number of leading batch dimensions into `batch`. Broadcast dimensions of the mask
// have stride 0, so a (B, 1, 1, S) padding mask and a dense (B, H, L, S) mask are read by the same code.
#pragma once
#include <cstdint>

// The key-range helpers below run in host code and in CUDA kernels alike.
#if defined(__CUDACC__)
#define SDPAX_HOST_DEVICE __host__ __device__
#else
#define SDPAX_HOST_DEVICE
#endif

namespace sdpax {

// Causal alignment. Upper-left: query i sees keys j <= i. Lower-right: query i sees keys j <= i + (S - L).
enum class Causal : int64_t { None = 0, UpperLeft = 1, LowerRight = 2 };

enum class MaskKind : int { None = 0, Bool = 1, Additive = 2 };

enum class ScalarKind : int { Float = 0, Double = 1, BFloat16 = 2, Half = 3, Bool = 4 };

// Backend ids as they travel through the op schema (the Python SDPBackend enum uses the same numbers).
enum class Backend : int64_t { Math = 0, Flash = 1 };

// The CUDA main loop a call asks for (sdpax.cuda_main_loop): Auto lets the launch plan choose; Sm90 and Mma pin
// the Hopper (wgmma) or the mma.sync loop where the plan has that choice.
enum class MainLoop : int { Auto = 0, Sm90 = 1, Mma = 2 };

struct Strides4 {
  int64_t b, h, r, c;  // batch, head, row, column
};

struct AttnParams {
  int64_t batch = 0;  // product of all leading batch dimensions
  int64_t hq = 0, hkv = 0;
  int64_t L = 0, S = 0;  // query length, key length
  int64_t E = 0, Ev = 0;  // q/k head dim, v head dim
  ScalarKind dtype = ScalarKind::Float;

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides4 q_st{}, k_st{}, v_st{};

  void* out = nullptr;  // (batch, hq, L, Ev)
  Strides4 out_st{};
  float* lse = nullptr;  // (batch, hq, L), contiguous; -inf for a row with no allowed key and no sink

  MaskKind mask_kind = MaskKind::None;
  ScalarKind mask_dtype = ScalarKind::Bool;  // Bool, Float, or the input dtype for an additive mask
  const void* mask = nullptr;
  Strides4 mask_st{};  // broadcast to (batch, hq, L, S): stride 0 on broadcast dims

  Causal causal = Causal::None;
  float scale = 1.f;
  const float* sinks = nullptr;  // (hq,) float32, or nullptr; a logit joining the softmax denominator only

  double dropout_p = 0.0;
  const int64_t* rng = nullptr;  // {seed, offset}; host pointer on CPU, device pointer on CUDA

  // Backward only.
  const void* dout = nullptr;
  Strides4 dout_st{};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 dq_st{}, dk_st{}, dv_st{};
  float* dsinks = nullptr;  // (hq,) float32 accumulator
  // CPU backward: per-(batch, head) terms of dsinks, (batch, hq) float32, written without races and summed over the
  // batch by the host (deterministic). nullptr when unused.
  float* dsinks_bh = nullptr;

  // CUDA only (additions for the split-key decode path and the backward workspaces).
  int num_splits = 1;            // key ranges processed by separate blocks, merged by log-sum-exp
  float* o_partial = nullptr;    // (num_splits, batch*hq, L, Ev) float32, normalised per split
  float* lse_partial = nullptr;  // (num_splits, batch*hq, L) float32
  const float* delta = nullptr;  // (batch*hq, L): rowsum(dout * out), float32
  float* dq_accum = nullptr;     // (batch, hq, L, E) float32, unscaled dS @ K accumulated by atomics
  // Deterministic backward (torch.use_deterministic_algorithms): no dq_accum atomics; a separate pass owns each
  // query tile and writes dq (scaled, input dtype) once, and dmask goes to a per-writer float32 scratch.
  bool deterministic = false;
  // Float mask gradient dS (unscaled), float32, indexed (b, h, row slot, j) through dmask_st (nullptr: not wanted).
  // dmask_tile_rows: the mask is broadcast over L, so a key's gradient is first summed over the query rows of one
  // slot of bwd_tile_rows rows (row slot = i / those rows). dmask_atomic: several writers share an element
  // (stride 0 on broadcast dims).
  float* dmask = nullptr;
  Strides4 dmask_st{};
  bool dmask_tile_rows = false;
  bool dmask_atomic = false;

  // Score softcap: scores s = scale q.k become softcap * tanh(s / softcap) before the mask and causal limit; 0:
  // none. Kept last so that the CUDA kernels, which do not take softcapped calls, see the same layout.
  float softcap = 0.f;
  // Dropout origin (rng = {seed, offset, row0, col0}, CPU only): element (bh, i, j) draws the decision of
  // (bh, i + row0, j + col0), so a call on a block of a larger problem drops what the whole problem would.
  int64_t drop_row0 = 0, drop_col0 = 0;
  // CUDA: rng holds an origin {seed, offset, row0, col0} in device memory, read by the kernels (cuda/mask.h).
  bool drop_origin = false;
  // Sliding window (csrc/ops.cpp), -1: unbounded on that side. With causal != None the causal edge is the right
  // edge (win_right is -1); with causal == None the window is lower-right aligned.
  int64_t win_left = -1, win_right = -1;
  // Paged keys and values (a KV cache read in place; CPU, csrc/cpu/host.cpp): key j is row j % kv_page of
  // page kv_pages[j / kv_page] of k and v, whose batch strides k_st.b / v_st.b are then the page strides (batch 1).
  // nullptr: k and v are dense.
  const int32_t* kv_pages = nullptr;
  int64_t kv_page = 0;
  // A packed paged call (CUDA): kv_pages is the block table on the device, sequence b's pages at
  // kv_pages + b * kv_table_cols (the kernels' sequence view applies it).
  int64_t kv_table_cols = 0;
  // A packed variable-length batch (varlen_attn, jagged nested tensors; CUDA): batch index b is sequence b, whose
  // queries are rows [q0, q0 + L_b) of q / out / lse and keys rows [k0, k0 + S_b) of k / v, with
  // seqs[4b .. 4b + 3] = {q0, L_b, k0, S_b} (device memory); the tensors' batch strides are 0 and L / S above are
  // the longest sequence's. The kernels see each sequence as a dense call of batch 1 (cuda/varlen.h). nullptr: dense.
  const int32_t* seqs = nullptr;
  // Rows of one head in lse, delta and dq_accum: L, or every packed query row of a varlen call.
  int64_t head_rows = 0;
  // Added to rng[1]: sequence b of a packed batch drops what a dense call on it alone at offset + b would.
  int64_t rng_seq = 0;
};

// The diagonal that the causal edge and a window are aligned to: query i's diagonal key is i + diag_shift.
SDPAX_HOST_DEVICE inline int64_t diag_shift(const AttnParams& p) {
  return p.causal == Causal::UpperLeft ? 0 : p.S - p.L;
}

// Query row i may see keys [key_begin(p, i), key_end(p, i)), before clamping to [0, S): the causal edge or the
// window's right edge bounds the end, the window's left edge the beginning. Both grow with i.
SDPAX_HOST_DEVICE inline int64_t key_end(const AttnParams& p, int64_t i) {
  if (p.causal != Causal::None) return i + diag_shift(p) + 1;
  if (p.win_right >= 0) return i + diag_shift(p) + p.win_right + 1;
  return p.S;
}
SDPAX_HOST_DEVICE inline int64_t key_begin(const AttnParams& p, int64_t i) {
  return p.win_left >= 0 ? i + diag_shift(p) - p.win_left : 0;
}

}  // namespace sdpax
