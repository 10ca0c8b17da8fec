#include "common/inputs.h"

#include <cmath>
#include <cstdio>
#include <string>

namespace sdpax {

namespace {

int64_t heads_of(const at::Tensor& t) { return t.dim() >= 3 ? t.size(-3) : 1; }

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

BackendChoice decode_backend(int64_t id) {
  const int64_t backend = id & 0xf, fwd_loop = (id >> 4) & 3, bwd_loop = (id >> 6) & 3;
  TORCH_CHECK(id >= 0 && id < (1 << 9) && (backend == 0 || backend == 1) && fwd_loop < 3 && bwd_loop < 3,
              "sdpax: unknown backend id ", num(id),
              " (bits 0-3: 0 MATH, 1 FLASH_ATTENTION; bits 4-5 / 6-7: the forward / backward CUDA main loop, 0 auto, "
              "1 sm90, 2 mma; bit 8: strict)");
  BackendChoice b;
  b.backend = static_cast<Backend>(backend);
  b.fwd_loop = static_cast<MainLoop>(fwd_loop);
  b.bwd_loop = static_cast<MainLoop>(bwd_loop);
  b.strict = (id >> 8) & 1;
  return b;
}

void check_inputs(const FwdArgs& a) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const std::optional<at::Tensor>&mask = a.mask, &sinks = a.sinks, &rng = a.rng;
  const double dropout_p = a.dropout_p;
  const int64_t causal = a.causal;
  const bool enable_gqa = a.enable_gqa;
  TORCH_CHECK(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2,
              "Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: ", num(q.dim()),
              " key.dim: ", num(k.dim()), " and value.dim: ", num(v.dim()), " instead.");
  TORCH_CHECK(q.dim() == k.dim() && q.dim() == v.dim(), "sdpax: query, key and value must have the same rank, got ",
              num(q.dim()), ", ", num(k.dim()), " and ", num(v.dim()));
  TORCH_CHECK(is_float_type(q.scalar_type()),
              "sdpax: query, key and value must be floating point (float64, float32, bfloat16, float16), got ",
              q.scalar_type());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "sdpax: query, key and value must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "sdpax: query, key and value must be on the same device, got ", q.device(), ", ", k.device(), " and ",
              v.device());
  const int64_t r = q.dim();
  for (int64_t d = 0; d + 3 < r; ++d) {
    TORCH_CHECK(q.size(d) == k.size(d) && q.size(d) == v.size(d),
                "sdpax: query, key and value must have the same batch dimensions, got query ", shape(q.sizes()),
                ", key ", shape(k.sizes()), ", value ", shape(v.sizes()));
  }
  TORCH_CHECK(q.size(-1) == k.size(-1), "sdpax: query and key must have the same head dimension (last dim), got ",
              num(q.size(-1)), " and ", num(k.size(-1)));
  TORCH_CHECK(k.size(-2) == v.size(-2), "sdpax: key and value must have the same sequence length (dim -2), got ",
              num(k.size(-2)), " and ", num(v.size(-2)));
  const int64_t hq = heads_of(q), hk = heads_of(k), hv = heads_of(v);
  TORCH_CHECK(hk == hv, "sdpax: key and value must have the same number of heads, got ", num(hk), " and ",
              num(hv));
  if (!enable_gqa) {
    TORCH_CHECK(hq == hk, "sdpax: query has ", num(hq), " heads but key/value have ", num(hk),
                "; pass enable_gqa=True for grouped-query attention");
  } else {
    TORCH_CHECK((hk > 0 && hq % hk == 0) || hq == 0, "sdpax: with enable_gqa the number of query heads (", num(hq),
                ") must be divisible by the number of key/value heads (", num(hk), ")");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "sdpax: dropout_p must be in [0, 1], got ", num(dropout_p));
  TORCH_CHECK(a.softcap >= 0.0 && std::isfinite(a.softcap),
              "sdpax: softcap must be a finite number > 0 (0: none), got ", num(a.softcap));
  TORCH_CHECK(causal >= 0 && causal <= 2, "sdpax: causal must be 0 (none), 1 (upper-left) or 2 (lower-right), got ",
              num(causal));
  TORCH_CHECK(a.window_left >= -1 && a.window_right >= -1,
              "sdpax: window sizes must be >= 0, or -1 for unbounded, got (", num(a.window_left), ", ",
              num(a.window_right), ")");
  TORCH_CHECK(causal == 0 || a.window_right == -1,
              "sdpax: with a causal variant the causal edge is the window's right edge; window_right must be -1, "
              "got ", num(a.window_right));
  if (mask) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat || m.scalar_type() == q.scalar_type(),
                "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: ",
                m.scalar_type(), " and  query.dtype: ", q.scalar_type(), " instead.");
    TORCH_CHECK(m.device() == q.device(), "sdpax: attn_mask must be on the query's device ", q.device(), ", got ",
                m.device());
    TORCH_CHECK(causal == 0, "sdpax: attn_mask and a causal variant cannot be combined; pass one of them");
    std::vector<int64_t> target(q.sizes().begin(), q.sizes().end() - 1);
    target.push_back(k.size(-2));
    bool ok = m.dim() <= static_cast<int64_t>(target.size());
    for (int64_t i = 1; ok && i <= m.dim(); ++i) {
      const int64_t ms = m.size(-i), ts = target[target.size() - i];
      ok = ms == ts || ms == 1;
    }
    TORCH_CHECK(ok, "sdpax: attn_mask of shape ", shape(m.sizes()), " is not broadcastable to the attention shape ",
                shape(target), " (N, ..., Hq, L, S)");
  }
  if (sinks) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == hq, "sdpax: sinks must have shape (Hq,) = (", num(hq),
                ",), got ", shape(sinks->sizes()));
    TORCH_CHECK(sinks->device() == q.device(), "sdpax: sinks must be on the query's device ", q.device(), ", got ",
                sinks->device());
    TORCH_CHECK(is_float_type(sinks->scalar_type()), "sdpax: sinks must be floating point, got ",
                sinks->scalar_type());
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng && (rng->numel() == 2 || rng->numel() == 4) && rng->scalar_type() == at::kLong,
                "sdpax: dropout_p > 0 needs rng, an int64 tensor {seed, offset} or {seed, offset, row0, col0}");
    TORCH_CHECK(rng->device() == q.device(), "sdpax: rng must be on the query's device");
  }
}

void check_inputs(const BwdArgs& a) {
  check_inputs(a.f);
  TORCH_CHECK(a.grad_out.sizes() == a.out.sizes(), "sdpax: grad_out shape ", shape(a.grad_out.sizes()),
              " does not match the output shape ", shape(a.out.sizes()));
}

Canonical canonicalize(const FwdArgs& a) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const std::optional<at::Tensor>& mask = a.mask;
  Canonical c;
  const int64_t r = q.dim();
  c.L = q.size(-2);
  c.E = q.size(-1);
  c.S = k.size(-2);
  c.Ev = v.size(-1);
  c.Hq = heads_of(q);
  c.Hkv = heads_of(k);
  c.B = 1;
  for (int64_t d = 0; d + 3 < r; ++d) c.B *= q.size(d);
  auto to4 = [&](const at::Tensor& t, int64_t h) {
    if (t.dim() == 4) return t;
    if (t.dim() == 3) return t.unsqueeze(0);
    if (t.dim() == 2) return t.unsqueeze(0).unsqueeze(0);
    return t.reshape({c.B, h, t.size(-2), t.size(-1)});  // a view unless the batch dims cannot be merged
  };
  c.q = to4(q, c.Hq);
  c.k = to4(k, c.Hkv);
  c.v = to4(v, c.Hkv);
  if (mask) {
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end() - 1);
    full.push_back(c.S);
    c.mask = to4(mask->expand(full), c.Hq);
  }
  return c;
}

AttnParams make_params(const Canonical& c, const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                       const std::optional<at::Tensor>& sinks_f32, const FwdArgs& a) {
  const double dropout_p = a.dropout_p, scale = a.scale;
  const int64_t causal = a.causal;
  const std::optional<at::Tensor>& rng = a.rng;
  AttnParams p;
  p.batch = c.B;
  p.hq = c.Hq;
  p.hkv = c.Hkv;
  p.L = c.L;
  p.S = c.S;
  p.head_rows = c.L;
  p.E = c.E;
  p.Ev = c.Ev;
  p.dtype = scalar_kind(q4.scalar_type());
  p.q = q4.data_ptr();
  p.k = k4.data_ptr();
  p.v = v4.data_ptr();
  p.q_st = strides4(q4);
  p.k_st = strides4(k4);
  p.v_st = strides4(v4);
  if (c.mask) {  // (B, Hq, L, S) view with stride 0 on broadcast dims
    p.mask_kind = c.mask->scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    p.mask_dtype = scalar_kind(c.mask->scalar_type());
    p.mask = c.mask->data_ptr();
    p.mask_st = strides4(*c.mask);
  }
  p.causal = static_cast<Causal>(causal);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(a.softcap);
  p.win_left = a.window_left;
  p.win_right = a.window_right;
  p.sinks = sinks_f32 ? sinks_f32->data_ptr<float>() : nullptr;
  p.dropout_p = dropout_p;
  p.rng = dropout_p > 0.0 ? rng->data_ptr<int64_t>() : nullptr;
  p.drop_origin = dropout_p > 0.0 && rng->numel() == 4;
  if (p.drop_origin && rng->device().is_cpu()) {
    p.drop_row0 = p.rng[2];
    p.drop_col0 = p.rng[3];
  }
  return p;
}

std::optional<at::Tensor> sinks_f32(const std::optional<at::Tensor>& sinks) {
  if (!sinks) return std::nullopt;
  return sinks->to(at::kFloat).contiguous();
}

void bind_forward(AttnParams& p, const at::Tensor& out4, const at::Tensor& lse) {
  p.out = const_cast<void*>(out4.data_ptr());
  p.out_st = strides4(out4);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
}

void bind_backward(AttnParams& p, const at::Tensor& dout4, const at::Tensor& dk, const at::Tensor& dv) {
  p.dout = dout4.data_ptr();
  p.dout_st = strides4(dout4);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dk_st = strides4(dk);
  p.dv_st = strides4(dv);
}

at::Tensor uncanonical(const at::Tensor& t4, const at::Tensor& like_query, int64_t last_dim) {
  std::vector<int64_t> shape(like_query.sizes().begin(), like_query.sizes().end() - 1);
  if (last_dim >= 0) shape.push_back(last_dim);
  // 4-d inputs: already that shape (a view would cost as much as the rest of a decode step's host work).
  return t4.sizes() == at::IntArrayRef(shape) ? t4 : t4.reshape(shape);
}

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Half;
    case at::kBool: return ScalarKind::Bool;
    default: TORCH_CHECK(false, "sdpax: unsupported dtype ", t);
  }
}

std::string num(int64_t x) { return std::to_string(x); }

std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

std::string shape(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

Strides4 strides4(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "sdpax internal: expected a 4-D tensor");
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace sdpax
