// Variant dispatch: run-time dtype / head dim / mask kind -> the template instantiation listed in the generated
// gen/variants.h (from csrc/cuda/variants.py). Kernels are instantiated in their own translation units.
//
// Forward main loop: on a compute-capability-9 device, in a build that contains sm_90a code (SDPAX_BUILD_SM90A,
// set by setup.py), a (dtype, head dim, kind) listed as fwd_sm90 in the table runs the wgmma main loop
// (fwd_sm90.h); everything else runs fwd_kernel.h (mma.sync), which every architecture has.
// Backward main loop: likewise, a (dtype, head dim, kind) listed as bwd_sm90 runs bwd_sm90.h on such a device
// unless the call is in deterministic mode; everything else runs bwd_wide.h / bwd_kernel.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/bwd_kernel.h"
#include "cuda/bwd_sm90.h"
#include "cuda/bwd_wide.h"
#include "cuda/fwd_kernel.h"
#include "cuda/fwd_sm90.h"
#include "cuda/launch.h"
#include "cuda/gen/variants.h"

namespace sdpax {
namespace cuda {

#define SDPAX_DECLARE(pass, ctype, kind, d, flag) \
  extern template cudaError_t run_##pass<ctype, d, flag>(const AttnParams&, cudaStream_t);
// The declaration of run_fwd takes an int kind and run_bwd a bool; `flag` is written accordingly by variants.py.
SDPAX_CUDA_VARIANTS(SDPAX_DECLARE)
#undef SDPAX_DECLARE

namespace {

int bucket(int64_t head_dim) {
  for (int b : SDPAX_CUDA_FWD_HEAD_DIMS)
    if (head_dim <= b) return b;
  return -1;
}

bool general(const AttnParams& p) { return p.mask_kind != MaskKind::None || p.dropout_p > 0.0; }

// SDPAX_CUDA_FWD_SM90=0 turns the Hopper main loop off (read on every call, so a benchmark can time both main
// loops in one process: benchmarks/cuda_sm90.py).
// SDPAX_CUDA_BWD_SM90=0 does the same for the backward main loop; =force makes a call that the table gives to the
// sm90 backward fail instead of falling back to the mma.sync loop when its tensor maps cannot be encoded (tests).
bool env_enabled(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

#ifdef SDPAX_BUILD_SM90A
// Compute capability major of the current device, looked up once per device.
bool device_is_sm90() {
  static int major[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major[dev] == 0) {
    int m = -1;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) m = -1;
    major[dev] = m;
  }
  return major[dev] == 9;
}

// Whether the table lists an sm90 forward (bwd = false; kind: 0 plain / 1 general) or backward (bwd = true; kind:
// general or not) of this dtype and head-dim bucket.
bool has_sm90(const AttnParams& p, int d, bool bwd, int kind) {
  bool found = false;
#define SDPAX_CASE_fwd(ctype, kind_, dd, flag)
#define SDPAX_CASE_bwd(ctype, kind_, dd, flag)
#define SDPAX_CASE_fwd_sm90(ctype, kind_, dd, flag) \
  found = found || (!bwd && p.dtype == ScalarKind::kind_ && d == dd && kind == static_cast<int>(flag));
#define SDPAX_CASE_bwd_sm90(ctype, kind_, dd, flag) \
  found = found || (bwd && p.dtype == ScalarKind::kind_ && d == dd && kind == static_cast<int>(flag));
#define SDPAX_CASE(pass, ctype, kind_, dd, flag) SDPAX_CASE_##pass(ctype, kind_, dd, flag)
  SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_fwd
#undef SDPAX_CASE_bwd
#undef SDPAX_CASE_fwd_sm90
#undef SDPAX_CASE_bwd_sm90
#undef SDPAX_CASE
  return found;
}

bool use_sm90(const AttnParams& p, int d, int fwd_kind) {
  return has_sm90(p, d, false, fwd_kind) && device_is_sm90() && env_enabled("SDPAX_CUDA_FWD_SM90");
}

// The sm90 backward adds dQ by float atomics: deterministic mode keeps the mma.sync loop and its dQ pass. Of the
// general kind it takes bool masks without dropout.
bool use_sm90_bwd(const AttnParams& p, int d, bool gen) {
  return !p.deterministic && (!gen || bwd_sm90_general_ok(p)) && has_sm90(p, d, true, gen) && device_is_sm90() &&
         env_enabled("SDPAX_CUDA_BWD_SM90");
}
#else
bool use_sm90(const AttnParams&, int, int) { return false; }  // no sm_90a code in this build
bool use_sm90_bwd(const AttnParams&, int, bool) { return false; }
#endif

}  // namespace

namespace {

// Block rows and keys per tile of the forward variant that runs this call.
template <class T>
void tile_of(int kind, int d, int64_t& bm, int64_t& bn) {
#define SDPAX_TILE(K, DD)     \
  if (kind == K && d == DD) { \
    bm = FwdCfg<T, DD, K>::kBM; \
    bn = FwdCfg<T, DD, K>::kBN; \
    return;                   \
  }
  SDPAX_TILE(0, 64) SDPAX_TILE(0, 128) SDPAX_TILE(0, 256)
  SDPAX_TILE(1, 64) SDPAX_TILE(1, 128) SDPAX_TILE(1, 256)
  SDPAX_TILE(2, 64) SDPAX_TILE(2, 128) SDPAX_TILE(2, 256)
#undef SDPAX_TILE
}

}  // namespace

FwdPlan plan_fwd(const AttnParams& p, int num_sms) {
  FwdPlan plan;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  plan.kind = general(p) ? 1 : (rows <= FwdCfg<float, 64, 2>::kBM ? 2 : 0);  // 16 rows for every variant
  const int d = bucket(std::max(p.E, p.Ev));
  int64_t bm = 0, bn = 0;
  plan.sm90 = use_sm90(p, d, plan.kind);
  if (plan.sm90) {
    // The sm90 variants at d64 and d128 tile alike (only the kind matters); d256 on its own tiles.
    if (d == 256) {
      bm = plan.kind == 0 ? FwdSm90Cfg<256, 0>::kBM : FwdSm90Cfg<256, 1>::kBM;
      bn = plan.kind == 0 ? FwdSm90Cfg<256, 0>::kBN : FwdSm90Cfg<256, 1>::kBN;
    } else {
      bm = plan.kind == 0 ? FwdSm90Cfg<128, 0>::kBM : FwdSm90Cfg<128, 1>::kBM;
      bn = plan.kind == 0 ? FwdSm90Cfg<128, 0>::kBN : FwdSm90Cfg<128, 1>::kBN;
    }
  } else if (p.dtype == ScalarKind::Float) {
    tile_of<float>(plan.kind, d, bm, bn);
  } else {
    tile_of<__half>(plan.kind, d, bm, bn);  // bfloat16 and float16 share their tiles
  }
  const int64_t blocks = (rows + bm - 1) / bm * p.batch * p.hkv;
  const int64_t n_tiles = (p.S + bn - 1) / bn;
  if (blocks >= num_sms || n_tiles < 8) return plan;
  // Enough blocks to fill the machine several times over (one-warp decode blocks: 16 per multiprocessor), with at
  // least 4 key tiles per split so the merge stays cheap.
  const int64_t target = (plan.kind == 2 ? 16 : 8) * static_cast<int64_t>(num_sms);
  const int64_t want = (target + blocks - 1) / blocks;
  plan.num_splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, n_tiles / 4, int64_t(kMaxSplits)})));
  return plan;
}

// The mask gradient (the one user of the tile rows) exists only in the general kind. The wide kernel sums a
// row-broadcast mask's gradient per query warp (kMaskRows = half its tile), bwd_kernel per tile.
template <class T>
static int bwd_tile_rows_of(int64_t head_dim) {
  switch (bucket(head_dim)) {
    case 64: return BwdWideCfg<T, 64, true>::kUse ? BwdWideCfg<T, 64, true>::kMaskRows : BwdCfg<T, 64, true>::kBM;
    case 128: return BwdWideCfg<T, 128, true>::kUse ? BwdWideCfg<T, 128, true>::kMaskRows : BwdCfg<T, 128, true>::kBM;
    default: return BwdWideCfg<T, 256, true>::kUse ? BwdWideCfg<T, 256, true>::kMaskRows : BwdCfg<T, 256, true>::kBM;
  }
}

int bwd_tile_rows(int64_t head_dim, ScalarKind dtype) {
  // bfloat16 and float16 share their tiles
  return dtype == ScalarKind::Float ? bwd_tile_rows_of<float>(head_dim) : bwd_tile_rows_of<__half>(head_dim);
}


cudaError_t launch_fwd(const AttnParams& p, const FwdPlan& plan, cudaStream_t stream) {
  const int d = bucket(std::max(p.E, p.Ev));
  const int fwd_kind = plan.kind;
#define SDPAX_CASE_fwd(ctype, kind, dd, flag)                                       \
  if (!plan.sm90 && p.dtype == ScalarKind::kind && d == dd && fwd_kind == flag) \
    return run_fwd<ctype, dd, flag>(p, stream);
#define SDPAX_CASE_fwd_sm90(ctype, kind, dd, flag)                                 \
  if (plan.sm90 && p.dtype == ScalarKind::kind && d == dd && fwd_kind == flag) \
    return run_fwd_sm90<ctype, dd, flag>(p, stream);
#define SDPAX_CASE_bwd(ctype, kind, dd, flag)
#define SDPAX_CASE_bwd_sm90(ctype, kind, dd, flag)
#define SDPAX_CASE(pass, ctype, kind, dd, flag) SDPAX_CASE_##pass(ctype, kind, dd, flag)
  SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_fwd
#undef SDPAX_CASE_fwd_sm90
#undef SDPAX_CASE_bwd
#undef SDPAX_CASE_bwd_sm90
  return cudaErrorInvalidValue;
}

// dQ from the atomics' float accumulator. One pass: reading the accumulator, scaling it in place and converting
// it (two passes: 3 x 4 + 2 bytes per element, 0.16 ms of a 1.3 ms bool-mask forward + backward at d128 L4k,
// B = 4, H = 16) moved 1.75 times the bytes of this kernel's 4 + 2. Four elements per thread (n is a multiple of 8:
// E is), float4 in, 8 or 16 bytes out.
template <class T>
__global__ void __launch_bounds__(256) dq_finish_kernel(const float4* __restrict__ acc, T* dq, int64_t n4,
                                                        float scale) {
  for (int64_t i = blockIdx.x * int64_t(256) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * 256) {
    const float4 a = acc[i];
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(dq)[i] = make_float4(a.x * scale, a.y * scale, a.z * scale, a.w * scale);
    } else {
      reinterpret_cast<uint2*>(dq)[i] = make_uint2(pack2<T>(a.x * scale, a.y * scale), pack2<T>(a.z * scale, a.w * scale));
    }
  }
}

cudaError_t launch_dq_finish(const float* dq_accum, void* dq, ScalarKind dtype, int64_t n, float scale,
                             cudaStream_t stream) {
  if (n % 4 != 0 || reinterpret_cast<uintptr_t>(dq_accum) % 16 != 0 || reinterpret_cast<uintptr_t>(dq) % 16 != 0)
    return cudaErrorInvalidValue;
  const int64_t n4 = n / 4;
  if (n4 == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n4 + 255) / 256, int64_t(1) << 20));
  const float4* acc = reinterpret_cast<const float4*>(dq_accum);
  switch (dtype) {
    case ScalarKind::Float: dq_finish_kernel<float><<<grid, 256, 0, stream>>>(acc, static_cast<float*>(dq), n4, scale); break;
    case ScalarKind::Half: dq_finish_kernel<__half><<<grid, 256, 0, stream>>>(acc, static_cast<__half*>(dq), n4, scale); break;
    case ScalarKind::BFloat16:
      dq_finish_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(acc, static_cast<__nv_bfloat16*>(dq), n4, scale);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_bwd(const AttnParams& p, float* delta, cudaStream_t stream) {
  AttnParams q = p;
  q.delta = delta;
  const int d = bucket(std::max(p.E, p.Ev));
  const bool gen = general(p);
  if (use_sm90_bwd(p, d, gen)) {
    cudaError_t err = cudaErrorInvalidValue;
#define SDPAX_CASE_fwd(ctype, kind, dd, flag)
#define SDPAX_CASE_fwd_sm90(ctype, kind, dd, flag)
#define SDPAX_CASE_bwd(ctype, kind, dd, flag)
#define SDPAX_CASE_bwd_sm90(ctype, kind, dd, flag) \
  if (p.dtype == ScalarKind::kind && d == dd && gen == flag) err = run_bwd_sm90<ctype, dd, flag>(q, stream);
    SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_bwd_sm90
#undef SDPAX_CASE_bwd
    // cudaErrorNotSupported: a tensor map could not be encoded and nothing was launched; the mma.sync loop runs.
    if (err != cudaErrorNotSupported || env_is("SDPAX_CUDA_BWD_SM90", "force")) return err;
  }
#define SDPAX_CASE_bwd(ctype, kind, dd, flag) \
  if (p.dtype == ScalarKind::kind && d == dd && gen == flag) return run_bwd<ctype, dd, flag>(q, stream);
#define SDPAX_CASE_bwd_sm90(ctype, kind, dd, flag)
  SDPAX_CUDA_VARIANTS(SDPAX_CASE)
#undef SDPAX_CASE_fwd
#undef SDPAX_CASE_fwd_sm90
#undef SDPAX_CASE_bwd
#undef SDPAX_CASE_bwd_sm90
#undef SDPAX_CASE
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sdpax
