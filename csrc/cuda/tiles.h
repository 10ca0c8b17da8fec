// The tile table of every CUDA main loop: rows (BM) and keys (BN) per block and the kinds each loop has. The
// kernels' Cfg structs read their tiles from here and so does the host's launch plan (plan.cpp, plain C++ built
// into every build, so the plan is unit-tested on machines without a GPU). No CUDA header here.
#pragma once

namespace sdpax {
namespace cuda {

// Forward kinds. General: an attention mask or dropout is present. Decode: plain, with at most 16 query rows per
// (batch, kv head) (the GQA group's rows packed), one-warp blocks, keys split across blocks.
enum class FwdKind : int { Plain = 0, General = 1, Decode = 2 };
// Backward kinds: General as in the forward.
enum class BwdKind : int { Plain = 0, General = 1 };

namespace tiles {

// ---- mma.sync forward (fwd/mma_kernel.h); f32: float inputs (split TF32), else 16-bit ----
// 4 warps, so that two blocks share a multiprocessor and hide each other's barriers and load latency (decode: 1).
constexpr int fwd_warps(FwdKind k) { return k == FwdKind::Decode ? 1 : 4; }
// 16-row m-tiles per warp. float tiles take twice the shared memory and split operands twice the registers: two
// m-tiles only at d64.
constexpr int fwd_m_tiles(bool f32, int d, FwdKind k) {
  return k == FwdKind::Decode ? 1 : (d <= (f32 ? 64 : 128) ? 2 : 1);
}
constexpr int fwd_bm(bool f32, int d, FwdKind k) { return fwd_warps(k) * 16 * fwd_m_tiles(f32, d, k); }
// Keys per tile. 16-bit d128: 64 for the plain kind (5% faster than 32 on the H100); the general kind keeps 32,
// which holds its spills down (64 was 6% slower there). d256: 32 keeps two stages of K/V in 96 KB. float: half the
// keys where the tiles would otherwise not fit (d128: 96 KB, two blocks per multiprocessor; d256: 16 keys, 128 KB,
// which the 163 KB of an sm80 block also holds).
constexpr int fwd_bn(bool f32, int d, FwdKind k) {
  return f32 ? (d == 64 ? (k == FwdKind::Plain ? 64 : 32) : (d == 128 ? 32 : 16))
             : (k == FwdKind::Decode ? 32 : (d == 64 ? 64 : (d == 128 && k == FwdKind::Plain ? 64 : 32)));
}
// Query rows (GQA group rows packed) up to which a plain call is a decode call: one decode block's rows.
constexpr int kDecodeRows = fwd_bm(false, 64, FwdKind::Decode);
static_assert(fwd_bm(true, 64, FwdKind::Decode) == kDecodeRows && fwd_bm(false, 256, FwdKind::Decode) == kDecodeRows,
              "every decode variant takes the same rows");

// Split-key forward: at most this many key ranges per row, merged by log-sum-exp (the merge keeps one weight per
// split in shared memory).
constexpr int kMaxSplits = 128;

// ---- Hopper forward (fwd/sm90_kernel.h): two consumer warpgroups of 64 rows; plain and general kinds ----
constexpr int kFwdSm90BM = 128;
// d256: 64-key tiles. Q is 64 KB and a 128-key K or V stage 64 KB, so 128-key tiles would leave room for one stage
// of each; 64 keys fit two stages of each, and a consumer thread holds O (128) + S (32) + P (16) registers
// instead of 128 + 64 + 32.
constexpr int fwd_sm90_bn(int d) { return d == 256 ? 64 : 128; }

// ---- mma.sync backward (bwd/mma_kernel.h, bwd/wide_kernel.h) ----
// The wide-key kernel (bwd/wide_kernel.h) serves 16-bit inputs; float keeps bwd/mma_kernel.h.
constexpr bool bwd_wide(bool f32, int d) { return !f32 && (d <= 128 || d == 256); }
// bwd_kernel: 8 warps x 16 keys (dQ atomics per flop fall as 1 / BN); float above d64: 4 warps, so that K, V and
// the Q / dO buffers (twice the bytes) stay within the 136 KB an sm80 block can have. Above d128 two warps share
// 16 keys, each keeping half the dK / dV columns.
constexpr int bwd_warps(bool f32, int d) { return f32 && d > 64 ? 4 : 8; }
constexpr int bwd_col_split(int d) { return d > 128 ? 2 : 1; }
constexpr int bwd_bn(bool f32, int d) { return bwd_warps(f32, d) / bwd_col_split(d) * 16; }
// Queries per inner step: 64 rows halve the re-reads of the warp's K / V fragments and the block barriers per flop;
// the general kind at d128 keeps 32 (64 spills beside its mask and dropout state); float tiles are twice the bytes
// and keep 32.
constexpr int bwd_bm(bool f32, int d, BwdKind k) {
  return f32 ? 32 : (d <= 64 || (d <= 128 && k == BwdKind::Plain) ? 64 : 32);
}
// bwd_wide: 8 warps; dK + dV of a block cost 2 BN D / 256 float registers per thread: 128 at d128 with 128 keys,
// and d256 takes 64 keys for the same 128. Queries per step: 128 at plain d64, else 64 (the general kind at d64
// spilled with 128 beside its mask bits and dropout state).
constexpr int kBwdWideWarps = 8;
constexpr int bwd_wide_bn(int d) { return d <= 128 ? 128 : 64; }
constexpr int bwd_wide_bm(int d, BwdKind k) { return d <= 64 && k == BwdKind::Plain ? 128 : 64; }
// Query rows per warp of S^T / dP^T: the rows a row-broadcast mask's gradient is first summed over.
constexpr int bwd_wide_warp_rows(int d, BwdKind k) {
  return bwd_wide_bm(d, k) / (kBwdWideWarps / (bwd_wide_bn(d) / 32));
}
// Deterministic mode's dQ pass (bwd/mma_kernel.h, bwd_dq_kernel): 4 warps of 16 rows.
constexpr int kBwdDqBM = 64;
constexpr int bwd_dq_bn(bool f32, int d) { return d <= 128 && !f32 ? 64 : 32; }

// ---- Hopper backward (bwd/sm90_kernel.h): two consumer warpgroups of 64 keys (d256: 64 keys shared by both) ----
constexpr int kBwdSm90BM = 64;
constexpr int bwd_sm90_bn(int d) { return d == 256 ? 64 : 128; }

}  // namespace tiles
}  // namespace cuda
}  // namespace sdpax
