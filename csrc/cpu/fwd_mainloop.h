// The forward main loop shared by the tiled forward (flash_fwd.cpp) and the decode path (flash_decode.cpp):
// a set of query rows of one KV head against a range of key tiles.
//   S = Q K^T (GEMM) -> scale + mask + causal edge / window -> online softmax (softmax.h)
//   -> acc = alpha acc + P V (GEMM)
// The rows may come from several query heads of the group (decode folds the G heads x L rows of a KV head into
// one tile, so each K/V tile is read once for all of them). K^T and V are packed once per KV head per thread,
// lazily tile by tile, and shared by every query head of the group (GQA without copies). Tiles past the causal
// diagonal or outside a sliding window are never visited and tiles the mask hides entirely skip both GEMMs.
#pragma once
#include <vector>

#include "cpu/gemv.h"
#include "cpu/kernel.h"
#include "cpu/mask.h"
#include "cpu/softmax.h"
#include "cpu/tile.h"

namespace sdpax::cpu {

// Tile sizes: query rows x keys. Measured on Sapphire Rapids (2 threads): tall query tiles amortise the packed
// K^T / V tiles in the AMX / FMA micro-kernels; with D <= 64 the QK^T GEMM is shallow, so bfloat16 on AMX (C is
// the compute type) takes wider key tiles to keep the tiles busy, while D = 128 prefers 128 keys (the score tile
// stays in L2 next to K and V).
struct Blocks {
  int64_t m, n;
};

template <class C>
Blocks fwd_blocks(const AttnParams& p) {
  if (p.L <= kDecodeMaxL) return {256, 512};  // decode: a few rows, so wide key tiles cost little L2
  // float32 D = 128 without causal: 256-key tiles halve the GEMM calls per row (L = 1024 / 2048: 2-5% faster
  // in side-by-side runs, within 3% of the noise, never slower); causal keeps 128 so diagonal tiles waste less.
  const bool banded = p.causal != Causal::None || p.win_left >= 0 || p.win_right >= 0;
  const bool wide_f32 = p.dtype == ScalarKind::Float && p.E > 96 && !banded;
  const int64_t n = (kVnni<C> && p.E <= 64) || wide_f32 ? 256 : 128;
  // Causal or windowed: the diagonal tiles are computed whole and partly masked, so shorter query tiles waste less.
  return {banded ? 128 : 256, n};
}

// Keys [begin, end) that query rows [i_first, i_last] may see (empty: none); begin is a multiple of the key tile bn.
struct KeyRange {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
inline KeyRange visible_keys(const AttnParams& p, int64_t bn, int64_t i_first, int64_t i_last) {
  const int64_t end = std::clamp<int64_t>(key_end(p, i_last), 0, p.S);
  const int64_t first = std::clamp<int64_t>(key_begin(p, i_first), 0, p.S);
  if (first >= end) return {0, 0};
  return {first / bn * bn, end};
}

// Whether M query rows of a KV head read K and V in place (gemv.h) instead of packing them: a few decode rows, unit
// column strides. See gemv.h for why; it walks a key tile as runs of rows, so it takes paged keys
// (AttnParams::kv_pages) of any page size.
template <class C>
bool direct_rows(const AttnParams& p, int64_t M) {
  return p.L <= kDecodeMaxL && M <= kDirectMaxRows<C> && p.k_st.c == 1 && p.v_st.c == 1;
}

// Whether paged keys can be read in place by the tiled paths too: every key tile lies inside one page.
template <class C>
bool tiles_in_pages(const AttnParams& p) {
  return p.kv_page % fwd_blocks<C>(p).n == 0;
}

// A fresh id per kernel call (flash_fwd.cpp): per-thread packed K/V is keyed by it.
uint64_t next_call_id();

// Per-thread state: packed K^T / V of the current KV head, the rows of the current tile and the tile buffers.
struct FwdLocal {
  uint64_t call = ~uint64_t(0);
  int64_t b = -1, hkv = -1;
  std::vector<char> packed;
  Scratch kt, v, q, qf, s, pm, acc, dropf;
  std::vector<int64_t> row_h, row_i;  // query head and row of each tile row
  std::vector<float> m, l;
  TileMask mask;
};

// T: the element type of q/k/v/out; C: the type GEMM operands are packed in (dispatch_dtype).
template <class T, class C>
struct FwdMainloop {
  const AttnParams& p;
  const uint64_t call_id;  // per-thread packed K/V is never reused across calls
  const int64_t bm, bn, G, Ep, n_kv_tiles;
  const Dropout drop;
  const bool cache_kv;

  FwdMainloop(const AttnParams& params, uint64_t id, bool cache)
      : p(params), call_id(id), bm(fwd_blocks<C>(params).m), bn(fwd_blocks<C>(params).n), G(params.hq / params.hkv),
        Ep(padk<C>(params.E)), n_kv_tiles((params.S + bn - 1) / bn), drop(params), cache_kv(cache) {}

  // Packed K^T / V of key tile t. With cache_kv (a thread runs several row tiles of a KV head) every tile has its
  // own slot and is packed once per head; without (decode: one row tile per head) one slot is reused, so a long
  // key sequence is never copied out of cache.
  int64_t slot(int64_t t) const { return cache_kv ? t : 0; }
  const C* kt_tile(FwdLocal& loc, int64_t t) const { return loc.kt.get<C>(0) + slot(t) * Ep * bn; }
  // float32 V with unit column stride is already a row-major B operand: used in place.
  bool v_in_place() const { return std::is_same_v<T, C> && !kVnni<C> && p.v_st.c == 1; }
  const C* v_tile(FwdLocal& loc, int64_t b, int64_t hkv, int64_t t) const {
    if (v_in_place()) return reinterpret_cast<const C*>(key_rows(p.v, p.v_st, b, hkv, t * bn));
    return loc.v.get<C>(0) + slot(t) * bn * p.Ev;
  }
  // Key row j0 of KV head (b, hkv) of k or v; paged keys (batch 1): in its page, the rows after it contiguous up to
  // the page's end (a whole tile when tiles_in_pages).
  const T* key_rows(const void* base, const Strides4& st, int64_t b, int64_t hkv, int64_t j0) const {
    const T* h = static_cast<const T*>(base) + hkv * st.h;
    if (!p.kv_pages) return h + b * st.b + j0 * st.r;
    return h + p.kv_pages[j0 / p.kv_page] * st.b + (j0 % p.kv_page) * st.r;
  }
  int64_t v_ld() const { return v_in_place() ? p.v_st.r : p.Ev; }
  bool direct(int64_t M) const { return direct_rows<C>(p, M); }

  void ensure_packed(FwdLocal& loc, int64_t b, int64_t hkv, int64_t t) const {
    const int64_t slots = cache_kv ? n_kv_tiles : 1;
    if (loc.call != call_id || loc.b != b || loc.hkv != hkv) {
      loc.call = call_id;
      loc.b = b;
      loc.hkv = hkv;
      loc.packed.assign(n_kv_tiles, 0);
      loc.kt.get<C>(slots * Ep * bn);
      loc.v.get<C>(slots * bn * p.Ev);
    }
    if (cache_kv && loc.packed[t]) return;
    const int64_t j0 = t * bn, n = std::min(bn, p.S - j0);
    pack_b_cols(key_rows(p.k, p.k_st, b, hkv, j0), p.k_st.r, p.k_st.c, p.E, n, const_cast<C*>(kt_tile(loc, t)));
    if (!v_in_place())
      pack_b_rows(key_rows(p.v, p.v_st, b, hkv, j0), p.v_st.r, p.v_st.c, n, p.Ev, const_cast<C*>(v_tile(loc, b, hkv, t)));
    loc.packed[t] = 1;
  }

  // Rows loc.row_h / loc.row_i [0, M) (M <= bm) of KV head (b, hkv) against keys [s0, s1), s0 a multiple of bn.
  // Leaves the unnormalised accumulator (M x Ev), the running max (log2 units) and denominator per row.
  void run(FwdLocal& loc, int64_t b, int64_t hkv, int64_t M, int64_t s0, int64_t s1, float* acc, float* m,
           float* l) const {
    const bool in_place = direct(M);
    const int64_t E16 = round_up(p.E, 16);
    C* qa = loc.q.get<C>(bm * Ep);
    float* qf = in_place ? loc.qf.get<float>(round_up(M, 4) * E16) : nullptr;  // zero-padded rows and columns
    if (in_place) std::fill(qf, qf + round_up(M, 4) * E16, 0.f);
    int64_t visible_begin = p.S, visible_end = 0;
    for (int64_t r = 0; r < M; ++r) {
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + loc.row_h[r] * p.q_st.h + loc.row_i[r] * p.q_st.r;
      if (in_place) {
        load_row(q, p.q_st.c, p.E, p.E, qf + r * E16);
      } else {
        load_row(q, p.q_st.c, p.E, Ep, qa + r * Ep);
      }
      visible_begin = std::min(visible_begin, key_begin(p, loc.row_i[r]));
      visible_end = std::max(visible_end, key_end(p, loc.row_i[r]));
    }
    // Keys [j0, j0 + n) as runs of rows contiguous in memory: fn(offset in the tile, count, K rows, V rows). Dense:
    // one run; paged: one per page the tile touches.
    auto key_runs = [&](int64_t j0, int64_t n, auto&& fn) {
      for (int64_t o = 0; o < n;) {
        const int64_t j = j0 + o, c = p.kv_pages ? std::min(n - o, p.kv_page - j % p.kv_page) : n - o;
        fn(o, c, key_rows(p.k, p.k_st, b, hkv, j), key_rows(p.v, p.v_st, b, hkv, j));
        o += c;
      }
    };
    float* s = loc.s.get<float>(bm * bn);
    C* pm = loc.pm.get<C>(bm * bn);
    std::fill(acc, acc + M * p.Ev, 0.f);
    std::fill(m, m + M, kNegInf);
    std::fill(l, l + M, 0.f);
    const bool masked = p.mask_kind != MaskKind::None;
    if (masked) {
      loc.mask.set_rows(p, M, [&](int64_t r, int64_t& bb, int64_t& hh, int64_t& ii) {
        bb = b;
        hh = loc.row_h[r];
        ii = loc.row_i[r];
      });
    }
    const RowMask no_mask;
    float* dropf = drop.on ? loc.dropf.get<float>(bn) : nullptr;
    const float scale2 = p.scale * kLog2e;

    // Key tiles wholly before every row's window or past every row's causal edge are never visited.
    const int64_t begin = std::max(s0, std::max<int64_t>(visible_begin, 0) / bn * bn), end = std::min(s1, visible_end);
    for (int64_t j0 = begin; j0 < end; j0 += bn) {
      const int64_t t = j0 / bn, width = std::min(bn, p.S - j0);
      if (masked && loc.mask.load(p, j0, width)) continue;
      // Keys past the last one the mask lets through (a padded tail) take no part in the GEMMs or the softmax;
      // the cut is rounded up to 32 keys so the GEMM shapes stay few and aligned (one JIT kernel each).
      const int64_t n = masked ? std::min(width, round_up(loc.mask.visible_end, 32)) : width, np = padk<C>(n);
      if (in_place) {
        key_runs(j0, n, [&](int64_t o, int64_t c, const T* k, const T*) {
          scores_direct(M, c, p.E, qf, k, p.k_st.r, s + o, bn);
        });
      } else {
        ensure_packed(loc, b, hkv, t);
        gemm(M, n, Ep, qa, Ep, kt_tile(loc, t), width, s, bn, false);
      }
      if (p.softcap > 0.f) softcap_tile(s, M, n, bn, p.scale, p.softcap);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = loc.row_i[r];
        const int64_t lo = key_begin(p, i) - j0, lim = std::clamp<int64_t>(key_end(p, i) - j0, 0, n);
        if (dropf) drop.factors(b * p.hq + loc.row_h[r], i, j0, n, dropf);
        const float alpha = softmax_row(s + r * bn, n, np, scale2, masked ? loc.mask.row_masks[r] : no_mask, lo,
                                        lim, dropf, m[r], l[r], pm + r * np);
        if (alpha != 1.f) scale_row(acc + r * p.Ev, p.Ev, alpha);
      }
      if (in_place) {
        key_runs(j0, n, [&](int64_t o, int64_t c, const T*, const T* v) {
          pv_direct(M, p.Ev, c, pm + o, np, v, p.v_st.r, acc, p.Ev);
        });
      } else {
        gemm(M, p.Ev, np, pm, np, v_tile(loc, b, hkv, t), v_ld(), acc, p.Ev, true);
      }
    }
  }

  // Normalises the rows and writes out and lse (m and l are overwritten).
  void finish(FwdLocal& loc, int64_t b, int64_t M, float* acc, float* m, float* l) const {
    for (int64_t r = 0; r < M; ++r) {
      const int64_t h = loc.row_h[r], i = loc.row_i[r];
      T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
      finish_row(acc + r * p.Ev, p.Ev, m[r], l[r], p.sinks ? p.sinks + h : nullptr, out, p.out_st.c);
    }
    lse_rows(m, l, M);
    for (int64_t r = 0; r < M; ++r) p.lse[(b * p.hq + loc.row_h[r]) * p.L + loc.row_i[r]] = l[r];
  }
};

}  // namespace sdpax::cpu
