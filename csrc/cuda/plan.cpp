#include "cuda/plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "gen/variants.h"

namespace sdpax {
namespace cuda {

namespace {

bool windowed(const AttnParams& p) { return p.win_left >= 0 || p.win_right >= 0; }

// A mask or dropout: the general kind of every loop.
bool masked(const AttnParams& p) { return p.mask_kind != MaskKind::None || p.dropout_p > 0.0; }

// The mma.sync loops' general kind also takes a sliding window and a score softcap; of the Hopper loops, the
// forward's plain kind takes a window (its causal edge test takes the window's beginning too), nothing else does.
bool general(const AttnParams& p) { return masked(p) || windowed(p) || p.softcap > 0.f; }

// Whether the variant table (csrc/variants.py) has this Hopper variant.
bool has_sm90_variant(ScalarKind dtype, int d, bool bwd, int kind) {
  for (const Variant& v : kVariants)
    if (v.pass == (bwd ? Pass::bwd_sm90 : Pass::fwd_sm90) && v.dtype == dtype && v.head_dim == d &&
        static_cast<int>(v.general) == kind && !v.decode)
      return true;
  return false;
}

// Why the Hopper loop cannot take this call on this device (empty: it can); `table_says` is the variant table's
// answer for the call's dtype, head dim and kind.
std::string sm90_unavailable(const AttnParams& p, const DeviceInfo& dev, bool table_says, bool takes_window) {
  if (!dev.build_sm90a) return "this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)";
  if (dev.cc_major != 9) return "the device is not compute capability 9.x";
  if (p.seqs != nullptr) return "packed variable-length batches run the mma.sync loops";
  if (p.drop_origin) return "the Hopper loops take no dropout origin (the mma.sync loops do)";
  if (!table_says) return "the Hopper loop has no variant for this dtype, head dim and kind (csrc/variants.py)";
  if (p.softcap > 0.f) return "the Hopper loops take no score softcap (the mma.sync general kind does)";
  if (windowed(p) && !takes_window)
    return "this Hopper loop takes no sliding window with a mask, dropout or in the backward (the mma.sync general "
           "kind does)";
  return "";
}

void refuse_sm90(const char* pass, const std::string& why) {
  TORCH_CHECK(false, "sdpax: sdpax.cuda_main_loop(", pass, "=\"sm90\", strict=True), but the Hopper ", pass,
              " loop cannot run this call: ", why);
}

}  // namespace

int head_dim_bucket(int64_t head_dim) {
  for (int b : kHeadDims)
    if (head_dim <= b) return b;
  return -1;
}

bool bwd_sm90_general_ok(const AttnParams& p) {
  return p.mask_kind == MaskKind::Bool && p.dropout_p == 0.0 && p.dmask == nullptr && p.mask_st.c == 1 &&
         reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && (p.mask_st.r | p.mask_st.h | p.mask_st.b) % 16 == 0;
}

FwdPlan plan_fwd(const AttnParams& p, const DeviceInfo& dev, MainLoop loop, bool strict) {
  FwdPlan plan;
  const int64_t rows = (p.hq / p.hkv) * p.L;
  const bool decode_rows = rows <= tiles::kDecodeRows;
  const FwdKind mma_kind = general(p) ? FwdKind::General : (decode_rows ? FwdKind::Decode : FwdKind::Plain);
  // A sliding window alone runs the Hopper loop's plain kind (decode-sized calls keep the mma.sync loops).
  const bool sm90_window = windowed(p) && !masked(p) && !decode_rows;
  const FwdKind sm90_kind = sm90_window ? FwdKind::Plain : mma_kind;
  const int d = plan.head_dim = head_dim_bucket(std::max(p.E, p.Ev));
  const std::string why_not =
      sm90_unavailable(p, dev, has_sm90_variant(p.dtype, d, false, static_cast<int>(sm90_kind)), sm90_window);
  if (loop == MainLoop::Sm90 && strict && !why_not.empty()) refuse_sm90("forward", why_not);
  plan.loop = loop != MainLoop::Mma && why_not.empty() ? FwdLoop::Sm90 : FwdLoop::Mma;
  plan.kind = plan.loop == FwdLoop::Sm90 ? sm90_kind : mma_kind;
  if (plan.loop == FwdLoop::Sm90) {
    plan.bm = tiles::kFwdSm90BM;
    plan.bn = tiles::fwd_sm90_bn(d);
  } else {
    const bool f32 = p.dtype == ScalarKind::Float;
    plan.bm = tiles::fwd_bm(f32, d, plan.kind);
    plan.bn = tiles::fwd_bn(f32, d, plan.kind);
  }
  const int64_t blocks = (rows + plan.bm - 1) / plan.bm * p.batch * p.hkv;
  const int64_t n_tiles = (p.S + plan.bn - 1) / plan.bn;
  if (blocks >= dev.num_sms || n_tiles < 8) return plan;
  // Enough blocks to fill the machine several times over (one-warp decode blocks: 16 per multiprocessor), with at
  // least 4 key tiles per split so the merge stays cheap.
  const int64_t target = (plan.kind == FwdKind::Decode ? 16 : 8) * static_cast<int64_t>(dev.num_sms);
  const int64_t want = (target + blocks - 1) / blocks;
  plan.num_splits = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({want, n_tiles / 4, int64_t(tiles::kMaxSplits)})));
  return plan;
}

BwdPlan plan_bwd(const AttnParams& p, const DeviceInfo& dev, MainLoop loop, bool strict) {
  BwdPlan plan;
  const bool gen = general(p);
  plan.kind = gen ? BwdKind::General : BwdKind::Plain;
  const int d = plan.head_dim = head_dim_bucket(std::max(p.E, p.Ev));
  std::string why_not = sm90_unavailable(p, dev, has_sm90_variant(p.dtype, d, true, gen), false);
  // The Hopper backward adds dQ by float atomics; deterministic mode keeps the mma.sync loops and their dQ pass.
  if (why_not.empty() && p.deterministic) why_not = "deterministic algorithms are enabled (dQ by atomics)";
  if (why_not.empty() && gen && !bwd_sm90_general_ok(p))
    why_not = "of the general kind it takes only bool masks with 16-byte aligned rows, no dropout, no mask gradient";
  if (loop == MainLoop::Sm90 && strict && !why_not.empty()) refuse_sm90("backward", why_not);
  const bool f32 = p.dtype == ScalarKind::Float;
  if (loop != MainLoop::Mma && why_not.empty()) {
    plan.loop = BwdLoop::Sm90;
    plan.bm = tiles::kBwdSm90BM;
    plan.bn = tiles::bwd_sm90_bn(d);
    plan.mma_fallback = !(loop == MainLoop::Sm90 && strict);
  } else if (tiles::bwd_wide(f32, d)) {
    plan.loop = BwdLoop::MmaWide;
    plan.bm = tiles::bwd_wide_bm(d, plan.kind);
    plan.bn = tiles::bwd_wide_bn(d);
  } else {
    plan.bm = tiles::bwd_bm(f32, d, plan.kind);
    plan.bn = tiles::bwd_bn(f32, d);
  }
  plan.dq_pass = p.deterministic;
  return plan;
}

int bwd_mask_rows(int64_t head_dim, ScalarKind dtype) {
  // The mask gradient exists only in the general kind, which the mma.sync loops compute: the wide kernel sums a
  // row-broadcast mask's gradient per query warp, bwd_kernel per tile.
  const bool f32 = dtype == ScalarKind::Float;
  const int d = head_dim_bucket(head_dim);
  return tiles::bwd_wide(f32, d) ? tiles::bwd_wide_warp_rows(d, BwdKind::General)
                                 : tiles::bwd_bm(f32, d, BwdKind::General);
}

}  // namespace cuda
}  // namespace sdpax
