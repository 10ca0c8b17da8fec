// Host glue of the fused CPU kernels: validates a call, turns its tensors into AttnParams (views, never copies of
// q/k/v/mask), allocates the outputs and runs the kernel. The only file of csrc/cpu that sees at::Tensor.
#include "cpu/host.h"

#include "common/inputs.h"
#include "cpu/kernel.h"
#include "gen/limits.h"

namespace sdpax::cpu {

namespace {

void check_flash(const at::Tensor& q, const Canonical& c) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "sdpax: FLASH_ATTENTION on CPU supports ", kDtypes, ", got ", q.scalar_type(),
              " (float64 runs on MATH)");
  TORCH_CHECK(std::min(c.E, c.Ev) >= kMinHeadDim && std::max(c.E, c.Ev) <= kMaxHeadDim &&
                  c.E % kHeadDimMultiple == 0 && c.Ev % kHeadDimMultiple == 0,
              "sdpax: FLASH_ATTENTION on CPU supports head dims from ", num(kMinHeadDim), " to ", num(kMaxHeadDim),
              ", got ", num(c.E), " / ", num(c.Ev));
}

// A checked forward call: its canonical views, its float32 sinks, and the params that point into both.
struct FlashCall {
  Canonical c;
  std::optional<at::Tensor> sinks_f;
  AttnParams p;
};
FlashCall flash_call(const FwdArgs& a) {
  check_inputs(a);
  Canonical c = canonicalize(a);
  check_flash(a.q, c);
  std::optional<at::Tensor> sinks_f = sinks_f32(a.sinks);
  const AttnParams p = make_params(c, c.q, c.k, c.v, sinks_f, a);  // data pointers: they survive the moves
  return {std::move(c), std::move(sinks_f), p};
}

// Allocates out and lse for the canonical call c, binds them to p, runs `run(out, lse)` when there are output
// elements and returns both in the caller's layout.
template <class Run>
std::tuple<at::Tensor, at::Tensor> with_outputs(const Canonical& c, const at::Tensor& q, AttnParams& p, Run&& run) {
  at::Tensor out = at::empty({c.B, c.Hq, c.L, c.Ev}, q.options());
  at::Tensor lse = at::empty({c.B, c.Hq, c.L}, q.options().dtype(at::kFloat));
  bind_forward(p, out, lse);
  if (out.numel() > 0) run(out, lse);
  return {uncanonical(out, q, c.Ev), uncanonical(lse, q, -1)};
}

// The forward kernel for the call's query length: the decode kernel for a few rows, else the tiled one.
void run_forward(const AttnParams& p) {
  if (p.L <= kDecodeMaxL) run_decode(p);
  else run_fwd(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd(const FwdArgs& a) {
  FlashCall call = flash_call(a);
  const Canonical& c = call.c;
  const std::optional<at::Tensor>& sinks_f = call.sinks_f;
  AttnParams& p = call.p;
  return with_outputs(c, a.q, p, [&](at::Tensor& out, at::Tensor& lse) {
    if (c.S == 0) {
      // No keys at all: every row is fully masked (or sees only its sink).
      out.zero_();
      if (sinks_f) {
        lse.copy_(sinks_f->view({1, c.Hq, 1}).expand_as(lse));
      } else {
        lse.fill_(-std::numeric_limits<float>::infinity());
      }
    } else {
      run_forward(p);
    }
  });
}

std::optional<std::tuple<at::Tensor, at::Tensor>> flash_fwd_paged(const FwdArgs& a, const PagedKV& kv) {
  // The decode kernel's direct path reads keys row by row, so there a key tile may span pages; the packing paths
  // read a tile from one place, so they take pages that hold whole tiles. Other calls (and a sequence without
  // keys) gather their pages.
  if (a.mask || kv.S == 0) return std::nullopt;
  FlashCall call = flash_call(a);
  AttnParams& p = call.p;
  p.S = kv.S;
  p.k = kv.k_pages.data_ptr();
  p.v = kv.v_pages.data_ptr();
  p.k_st = strides4(kv.k_pages.permute({0, 2, 1, 3}));  // (P, Hkv, page, E): batch stride = page stride
  p.v_st = strides4(kv.v_pages.permute({0, 2, 1, 3}));
  p.kv_pages = kv.pages.data_ptr<int32_t>();
  p.kv_page = kv.k_pages.size(1);
  if (!reads_pages_in_place(p)) return std::nullopt;
  return with_outputs(call.c, a.q, p, [&](at::Tensor&, at::Tensor&) { run_forward(p); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_bwd(const BwdArgs& a) {
  check_inputs(a);
  const at::Tensor &q = a.f.q, &k = a.f.k, &v = a.f.v, &grad_out = a.grad_out, &out = a.out, &lse = a.lse;
  const std::optional<at::Tensor>&mask = a.f.mask, &sinks = a.f.sinks;
  TORCH_CHECK(!(a.mask_grad && mask && mask->scalar_type() != at::kBool),
              "sdpax: the gradient of attn_mask is computed by the MATH backend only; FLASH_ATTENTION cannot "
              "produce it");
  const Canonical c = canonicalize(a.f);
  check_flash(q, c);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == c.B * c.Hq * c.L,
              "sdpax: lse must be the float32 log-sum-exp of the forward, shape ",
              shape(q.sizes().slice(0, q.dim() - 1)));
  const auto sinks_f = sinks_f32(sinks);
  AttnParams p = make_params(c, c.q, c.k, c.v, sinks_f, a.f);
  // Kernel inputs from the forward: viewed 4-D, copied only if the caller passed non-viewable layouts.
  const at::Tensor out4 = out.reshape({c.B, c.Hq, c.L, c.Ev});
  const at::Tensor dout4 = grad_out.to(q.scalar_type()).reshape({c.B, c.Hq, c.L, c.Ev});
  const at::Tensor lse3 = lse.reshape({c.B, c.Hq, c.L}).contiguous();
  at::Tensor dq = at::empty({c.B, c.Hq, c.L, c.E}, q.options());
  at::Tensor dk = at::empty({c.B, c.Hkv, c.S, c.E}, q.options());
  at::Tensor dv = at::empty({c.B, c.Hkv, c.S, c.Ev}, q.options());
  at::Tensor dsinks_bh = at::zeros({c.B, c.Hq}, q.options().dtype(at::kFloat));
  bind_forward(p, out4, lse3);
  bind_backward(p, dout4, dk, dv);
  p.dq = dq.data_ptr();
  p.dq_st = strides4(dq);
  p.dsinks_bh = sinks ? dsinks_bh.data_ptr<float>() : nullptr;
  if (c.S == 0 || c.L == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else if (dq.numel() + dk.numel() + dv.numel() > 0) {
    run_bwd(p);
  }
  at::Tensor dsinks = sinks ? dsinks_bh.sum(0).to(sinks->scalar_type()) : at::empty({0}, q.options());
  return {uncanonical(dq, q, c.E), dk.reshape(k.sizes()), dv.reshape(v.sizes()), at::empty({0}, q.options()),
          dsinks};
}

}  // namespace sdpax::cpu
