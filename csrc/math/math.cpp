#include "math/math.h"

#include <limits>

#include "common/inputs.h"

// Philox over tensors: words are uint32 values held in int64 tensors. These overloads must be visible before the
// generic round function is defined, so they are declared ahead of philox.h.
namespace sdpax {
at::Tensor philox_wrap32(const at::Tensor& x);
void philox_mulhilo(uint32_t m, const at::Tensor& x, at::Tensor& hi, at::Tensor& lo);
}  // namespace sdpax
#include "common/philox.h"

namespace sdpax {

constexpr int64_t kMask32 = 0xffffffffLL;

at::Tensor philox_wrap32(const at::Tensor& x) { return x.bitwise_and(kMask32); }

// 32x32 -> 64-bit product split in 16-bit halves so that no intermediate leaves the int64 range.
void philox_mulhilo(uint32_t m, const at::Tensor& x, at::Tensor& hi, at::Tensor& lo) {
  const int64_t mm = m;
  at::Tensor a = x.bitwise_and(0xffff).mul(mm);  // < 2^48
  at::Tensor b = x.bitwise_right_shift(16).mul(mm);  // < 2^48
  hi = b.add(a.bitwise_right_shift(16)).bitwise_right_shift(16);
  lo = a.add(b.bitwise_and(0xffff).bitwise_left_shift(16)).bitwise_and(kMask32);
}

namespace math {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// a @ b of 4-D tensors; a product with an empty operand (head dim 0, no keys) has no terms: zeros, without a GEMM.
at::Tensor matmul4(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return at::zeros({a.size(0), a.size(1), a.size(2), b.size(3)}, a.options());
  return at::matmul(a, b);
}

// Query heads per key/value head. No key/value heads means no query heads either (check_inputs): any G folds
// the empty head dimension, and 1 avoids dividing by zero.
int64_t group_size(const Canonical& c) { return c.Hkv > 0 ? c.Hq / c.Hkv : 1; }

// Scaled (and softcapped) scores with the mask, the causal edge and the window applied: (B, Hq, L, S) in the accumulation
// dtype. GQA: the G query heads of a group are folded into the row dimension, so K is never repeated.
// cap_grad (softcap > 0 only): d(softcap tanh(s / softcap)) / ds = 1 - tanh^2, for the backward.
at::Tensor scores(const Canonical& c, const at::Tensor& qf, const at::Tensor& kf, const FwdArgs& a,
                  at::Tensor* cap_grad = nullptr) {
  const double scale = a.scale, softcap = a.softcap;
  const int64_t G = group_size(c);
  at::Tensor s = matmul4(qf.reshape({c.B, c.Hkv, G * c.L, c.E}), kf.transpose(-2, -1));
  s = s.mul_(scale).view({c.B, c.Hq, c.L, c.S});
  if (softcap > 0.0) {
    s.div_(softcap).tanh_();
    if (cap_grad) *cap_grad = at::rsub(s.square(), 1.0);
    s.mul_(softcap);
  }
  if (c.mask) {
    if (c.mask->scalar_type() == at::kBool) {
      s.masked_fill_(c.mask->logical_not(), -kInf);
    } else {
      s.add_(c.mask->to(s.scalar_type()));
    }
  }
  // The causal edge or window: key j - diagonal key of row i (i + shift) must lie in [-left, right].
  const int64_t right = a.causal != 0 ? 0 : a.window_right;
  if (right >= 0 || a.window_left >= 0) {
    auto opts = s.options().dtype(at::kLong);
    const int64_t shift = a.causal == static_cast<int64_t>(Causal::UpperLeft) ? 0 : c.S - c.L;
    at::Tensor d = at::arange(c.S, opts).unsqueeze(0) - at::arange(c.L, opts).unsqueeze(1).add_(shift);
    if (right >= 0) s.masked_fill_(d.gt(right), -kInf);
    if (a.window_left >= 0) s.masked_fill_(d.lt(-a.window_left), -kInf);
  }
  return s;
}

at::Tensor sink_logits(const Canonical& c, const std::optional<at::Tensor>& sinks, at::ScalarType acc) {
  return sinks->to(acc).view({1, c.Hq, 1});
}

// Row softmax of the scores with the sink logits in the denominator; returns (P, lse). P is computed as
// exp(s - max) / denom rather than exp(s - lse), which would cost |lse| ulps of accuracy. A row with no allowed key
// and no sink has denom 0: its P is set to 0 (output 0, zero gradients) and its lse is -inf. NaN logits stay NaN.
std::tuple<at::Tensor, at::Tensor> softmax_with_sinks(const Canonical& c, const at::Tensor& s,
                                                      const std::optional<at::Tensor>& sinks) {
  at::Tensor row_max = c.S > 0 ? s.amax(-1) : at::full(s.sizes().slice(0, 3), -kInf, s.options());
  if (sinks) row_max = at::maximum(row_max, sink_logits(c, sinks, s.scalar_type()));
  row_max.masked_fill_(row_max.eq(-kInf), 0.0);  // every logit -inf: keep the shift finite
  at::Tensor p = (s - row_max.unsqueeze(-1)).exp_();
  at::Tensor denom = p.sum(-1);
  if (sinks) denom.add_((sink_logits(c, sinks, s.scalar_type()) - row_max).exp());
  p.div_(denom.unsqueeze(-1)).masked_fill_(denom.eq(0).unsqueeze(-1), 0.0);
  return {p, denom.log().add_(row_max)};
}

at::Tensor keep_for(const Canonical& c, const at::Tensor& rng, double p) {
  return dropout_keep_mask(rng, c.B * c.Hq, c.L, c.S, p).view({c.B, c.Hq, c.L, c.S});
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor dropout_keep_mask(const at::Tensor& rng, int64_t bh, int64_t L, int64_t S, double dropout_p) {
  TORCH_CHECK((rng.numel() == 2 || rng.numel() == 4) && rng.scalar_type() == at::kLong,
              "sdpax: rng must be an int64 tensor {seed, offset} or {seed, offset, row0, col0}");
  TORCH_CHECK(bh >= 0 && L >= 0 && S >= 0, "sdpax: dropout_keep_mask sizes must be non-negative");
  auto opts = rng.options();
  at::Tensor seed = rng.select(0, 0), offset = rng.select(0, 1);
  at::Tensor key0 = seed.bitwise_and(kMask32);
  at::Tensor key1 = seed.bitwise_right_shift(32).bitwise_and(kMask32);
  // One Philox call per group of four keys serves them all. With an origin (row0, col0), element (i, j) takes the
  // decision of (i + row0, j + col0); the origin stays a tensor (no device sync), so every column gets its own
  // call and keeps the word of its lane (j + col0) % 4.
  const bool origin = rng.numel() == 4;
  const int64_t n_ctr = origin ? S : (S + 3) / 4;
  at::Tensor col = origin ? at::arange(S, opts).add(rng.select(0, 3)) : at::Tensor();
  at::Tensor rows = at::arange(L, opts);
  if (origin) rows = rows.add(rng.select(0, 2)).bitwise_and(kMask32);
  at::Tensor groups = origin ? col.div(4, "floor").bitwise_and(kMask32) : at::arange(n_ctr, opts);
  at::Tensor ctr[4] = {groups.view({1, 1, n_ctr}), rows.view({1, L, 1}), at::arange(bh, opts).view({bh, 1, 1}),
                       offset.bitwise_and(kMask32).view({1, 1, 1})};
  philox4x32_10(ctr, key0, key1);
  std::vector<at::Tensor> words;
  for (auto& w : ctr) words.push_back(w.expand({bh, L, n_ctr}));
  at::Tensor r = at::stack(words, -1);
  r = origin ? r.gather(-1, col.remainder(4).view({1, 1, S, 1}).expand({bh, L, S, 1})).squeeze(-1)
             : r.view({bh, L, 4 * n_ctr}).narrow(-1, 0, S);
  return r.ge(static_cast<int64_t>(dropout_threshold(dropout_p)));
}

std::tuple<at::Tensor, at::Tensor> fwd(const FwdArgs& a) {
  check_inputs(a);
  const at::Tensor& q = a.q;
  const std::optional<at::Tensor>&sinks = a.sinks, &rng = a.rng;
  const double dropout_p = a.dropout_p;
  const Canonical c = canonicalize(a);
  const auto acc = acc_type(q);
  if (c.B * c.Hq * c.L == 0) {
    // No rows (no batch, heads or queries): nothing to compute.
    return {uncanonical(at::empty({c.B, c.Hq, c.L, c.Ev}, q.options()), q, c.Ev),
            uncanonical(at::empty({c.B, c.Hq, c.L}, q.options().dtype(acc)), q, -1)};
  }
  at::Tensor s = scores(c, c.q.to(acc), c.k.to(acc), a);

  auto [p, lse] = softmax_with_sinks(c, s, sinks);
  if (dropout_p > 0.0) p.mul_(keep_for(c, *rng, dropout_p)).mul_(dropout_scale(dropout_p));

  const int64_t G = group_size(c);
  at::Tensor o = matmul4(p.view({c.B, c.Hkv, G * c.L, c.S}), c.v.to(acc)).view({c.B, c.Hq, c.L, c.Ev});
  return {uncanonical(o.to(q.scalar_type()), q, c.Ev), uncanonical(lse, q, -1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const BwdArgs& a) {
  check_inputs(a);
  const at::Tensor &q = a.f.q, &k = a.f.k, &v = a.f.v, &grad_out = a.grad_out;
  const std::optional<at::Tensor>&mask = a.f.mask, &sinks = a.f.sinks, &rng = a.f.rng;
  const double dropout_p = a.f.dropout_p, scale = a.f.scale;
  const bool mask_grad = a.mask_grad;
  const Canonical c = canonicalize(a.f);
  const auto acc = acc_type(q);
  if (c.B * c.Hq * c.L == 0) {  // no rows (see fwd): every gradient is zero
    const bool additive = mask_grad && mask && mask->scalar_type() != at::kBool;
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v),
            additive ? at::zeros_like(*mask) : at::empty({0}, q.options()),
            sinks ? at::zeros_like(*sinks) : at::empty({0}, q.options())};
  }
  const int64_t G = group_size(c);
  at::Tensor qf = c.q.to(acc), kf = c.k.to(acc), vf = c.v.to(acc);
  // MATH recomputes the softmax from the scores (the saved lse is for the fused kernels): it is the reference.
  at::Tensor cap_grad;
  auto [p, lse4] = softmax_with_sinks(c, scores(c, qf, kf, a.f, &cap_grad), sinks);
  at::Tensor dout = grad_out.reshape({c.B, c.Hkv, G * c.L, c.Ev}).to(acc);

  at::Tensor keep;
  const double dscale = dropout_scale(dropout_p);
  if (dropout_p > 0.0) keep = keep_for(c, *rng, dropout_p);
  at::Tensor p_dropped = dropout_p > 0.0 ? p * keep * dscale : p;
  at::Tensor dv = matmul4(p_dropped.view({c.B, c.Hkv, G * c.L, c.S}).transpose(-2, -1), dout);
  at::Tensor dp = matmul4(dout, vf.transpose(-2, -1)).view({c.B, c.Hq, c.L, c.S});
  if (dropout_p > 0.0) dp.mul_(keep).mul_(dscale);
  at::Tensor delta = (p * dp).sum(-1, /*keepdim=*/true);  // = rowsum(dO * O) before rounding O
  at::Tensor ds = p.mul_(dp.sub_(delta));                   // p is not needed after this
  // The mask is added after the cap: its gradient is ds; q and k see ds through the cap's derivative.
  at::Tensor ds3 = (cap_grad.defined() ? ds * cap_grad : ds).view({c.B, c.Hkv, G * c.L, c.S});
  at::Tensor dq = matmul4(ds3, kf).mul_(scale).view({c.B, c.Hq, c.L, c.E});
  at::Tensor dk = matmul4(ds3.transpose(-2, -1), qf.reshape({c.B, c.Hkv, G * c.L, c.E})).mul_(scale);

  at::Tensor dmask = at::empty({0}, q.options());
  if (mask_grad && mask && mask->scalar_type() != at::kBool) {
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end() - 1);
    full.push_back(c.S);
    dmask = ds.view(full).sum_to_size(mask->sizes()).to(mask->scalar_type());
  }
  at::Tensor dsinks = at::empty({0}, q.options());
  if (sinks) {
    at::Tensor p_sink = (sink_logits(c, sinks, acc) - lse4).exp();  // (B, Hq, L); lse is finite with a sink
    dsinks = (p_sink * delta.squeeze(-1)).sum(at::IntArrayRef{0, 2}).neg().to(sinks->scalar_type());
  }
  return {uncanonical(dq.to(q.scalar_type()), q, c.E), dk.to(k.scalar_type()).reshape(k.sizes()),
          dv.to(v.scalar_type()).reshape(v.sizes()), dmask, dsinks};
}

}  // namespace math
}  // namespace sdpax
