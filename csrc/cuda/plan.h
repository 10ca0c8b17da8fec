// The launch plan of a CUDA FLASH_ATTENTION call: which main loop, kind, tile and split count each pass gets.
// Plain host C++ (no CUDA header; built into every build), so every choice is unit-tested without a GPU
// (tests/test_plan.py through the sdpax::cuda_plan op, plan_op.cpp) and explain() shows it. launch.cu runs what it
// says.
#pragma once
#include <cstdint>
#include <string>

#include "common/params.h"
#include "cuda/tiles.h"

namespace sdpax {
namespace cuda {

// What the plan needs to know about the device and the build.
struct DeviceInfo {
  int cc_major = 0;          // compute capability major
  int num_sms = 0;           // multiprocessors
  bool build_sm90a = false;  // the build contains sm_90a code (the wgmma loops)
};

// Forward main loops: Mma (fwd/mma_kernel.h, every architecture) and Sm90 (fwd/sm90_kernel.h, wgmma + TMA).
enum class FwdLoop : int { Mma = 0, Sm90 = 1 };
// Backward main loops: Mma (bwd/mma_kernel.h), MmaWide (bwd/wide_kernel.h, 16-bit inputs), Sm90 (bwd/sm90_kernel.h).
enum class BwdLoop : int { Mma = 0, MmaWide = 1, Sm90 = 2 };

struct FwdPlan {
  FwdLoop loop = FwdLoop::Mma;
  FwdKind kind = FwdKind::Plain;
  int head_dim = 0;  // the head-dim bucket of the variant (tiles.h): 64, 128 or 256
  int bm = 0, bn = 0;
  int num_splits = 1;  // key ranges processed by separate blocks and merged by log-sum-exp
};

struct BwdPlan {
  BwdLoop loop = BwdLoop::Mma;
  BwdKind kind = BwdKind::Plain;
  int head_dim = 0;
  int bm = 0, bn = 0;
  bool dq_pass = false;      // deterministic mode: dQ by its own pass (bwd_dq_kernel), no atomics
  bool mma_fallback = true;  // Sm90 only: if a tensor map cannot be encoded, run the mma.sync loop instead
  int mask_rows = 0;         // rows per partial sum of a row-broadcast mask's gradient (the scratch's row slots)
};

// The head-dim bucket of a call (64, 128 or 256), or -1 above the largest.
int head_dim_bucket(int64_t head_dim);

// Throw c10::Error naming the problem when `loop` is MainLoop::Sm90 with strict set and the call cannot run the
// Hopper loop.
FwdPlan plan_fwd(const AttnParams& p, const DeviceInfo& dev, MainLoop loop = MainLoop::Auto, bool strict = false);
BwdPlan plan_bwd(const AttnParams& p, const DeviceInfo& dev, MainLoop loop = MainLoop::Auto, bool strict = false);

// Query rows per partial sum of a row-broadcast mask's gradient (the deterministic scratch's row slots).
int bwd_mask_rows(int64_t head_dim, ScalarKind dtype);

// The Hopper backward's general kind takes bool masks with 16-byte aligned rows, without dropout or a mask
// gradient (bwd/sm90_kernel.h); the rest of the general kind runs the mma.sync loops.
bool bwd_sm90_general_ok(const AttnParams& p);

}  // namespace cuda
}  // namespace sdpax
