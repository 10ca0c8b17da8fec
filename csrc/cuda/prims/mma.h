// Warp-level building blocks of the CUDA kernels: tensor-core mma.sync with fp32 accumulate, ldmatrix, cp.async,
// the swizzled shared-memory tile layout and the operand fragments the kernels are written against. sm80
// instructions, so the same code runs on sm80 and sm90. A Hopper main loop (wgmma + TMA) would replace the users of
// this file, not mask.h / the softmax / the host glue.
//
// The kernels multiply in steps of 16 along k: an A fragment covers a 16x16 (m x k) block, a B fragment two
// 8-column n-tiles x k16, and mma(c, a, b, h) adds A times n-tile h to a 16x8 float accumulator. How a step runs
// depends on the element type:
//   bfloat16 / float16: one mma.m16n8k16.
//   float: split TF32 ("3xTF32"). Each operand is split as x = hi + lo with hi = tf32(x), lo = tf32(x - hi), and a
//     k8 step adds lo*hi + hi*lo + hi*hi (mma.m16n8k8.tf32) in fp32; the dropped lo*lo term is ~2^-22 relative, so
//     the products have float32-level error (plain TF32 would be ~2^-11: not float32 attention) while running on
//     tensor cores at a third of the TF32 rate, still several times what FFMA (SIMT) kernels reach.
//     The six mma of a k16 step sum into a fresh zeroed accumulator, added into c with ordinary float adds. The
//     tensor cores' float32 accumulation is not round-to-nearest (published measurements: addends aligned to the
//     largest exponent, c included, and truncated), so chaining every mma through c costs a same-signed fraction of
//     an ulp of |c| per mma; over the long chains (O += P V over the keys, dV and dK over the queries, and also S
//     and dP over the head dim) that reached 4x torch's float32 error at L = 128 and 29x at L = 4096. With a fresh
//     accumulator the truncation is relative to one step's partial sum and c sees round-to-nearest adds only: measured 0.3-1.2x torch's RMS error, for about 4 FADD per 6 mma.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), which the rest of the code relies on:
//   A 16x16 (row-major):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8  (k x n):      b0 (k=2t..2t+1, n=g)  b1 (k=2t+8.., n=g)
//   C 16x8:               c0,c1 (g, 2t..2t+1)   c2,c3 (g+8, 2t..2t+1)
// so the C fragments of two neighbouring n-tiles, rounded to 16 bits, are exactly the A fragment of a k16 step
// (the FlashAttention-2 trick that keeps P in registers between the two matrix products).
// mma.m16n8k8.tf32 has A a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4), B b0 (k=t, n=g) b1 (k=t+4, n=g) and
// the same C layout. A C n-tile holds columns 2t, 2t+1, not t, t+4; since a product sums over k in any order, the
// float path numbers k within each k8 step as (t -> 2t, t+4 -> 2t+1): C fragments are then A fragments as they
// are, and every operand read along k from shared memory (ldb_t, lda_t) reads rows 2t and 2t+1 to match.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace sdpax {
namespace cuda {

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x = hi + lo, both TF32 (round to nearest): hi carries the top 11 mantissa bits, lo the next 11.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <class T>
__device__ __forceinline__ float2 unpack2(uint32_t w);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&w));
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}

// Two neighbouring elements (x at dst[0], y at dst[1]; dst 2-element aligned), rounded to T.
template <class T>
__device__ __forceinline__ void st2(T* dst, float x, float y) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float2*>(dst) = make_float2(x, y);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x, y);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The inverse of ldmatrix_x4 (sm90): lane l gives the row address of matrix l / 8, register k holds matrix k's
// elements (l / 4, 2 (l % 4) ..+1), which is the C / A fragment layout.
__device__ __forceinline__ void stmatrix_x4(const uint32_t (&r)[4], uint32_t addr) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}

__device__ __forceinline__ void sts_u32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
}

__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float x;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x) : "r"(addr));
  return x;
}

// 16-byte global -> shared copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// Bytes of a and b (a's bytes 0..3, b's 4..7) picked by the four 4-bit selectors of sel (prmt's generic form); a
// selector with bit 3 set gives 0xff or 0 by the picked byte's bit 7 (sign replication). The mask producers use it to
// pack bytes (fwd/sm90_kernel.h) and to widen flags into 16-bit lanes (bwd/sm90_kernel.h).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// 16-byte copy of which only the first `bytes` (0..16) are read; the rest of the destination is zero-filled.
__device__ __forceinline__ void cp_async16_partial(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// 4-byte variant (per-row scalars such as lse and Delta), zero-filled when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Operand fragments of one k16 step (see the top of the file): A covers 16x16 (m x k), B two n-tiles x k16.
template <class T>
struct FragA {
  uint32_t r[4];
};
template <class T>
struct FragB {
  uint32_t r[4];  // b0, b1 of n-tile 0, then of n-tile 1
};
template <>
struct FragA<float> {
  uint32_t hi[2][4], lo[2][4];  // [k8 half][a0..a3]
};
template <>
struct FragB<float> {
  uint32_t hi[2][2][2], lo[2][2][2];  // [n-tile][k8 half][b0, b1]
};

// c (16x8) += A * (n-tile h of B).
template <class T>
__device__ __forceinline__ void mma(float (&c)[4], const FragA<T>& a, const FragB<T>& b, int h) {
  mma16816<T>(c, a.r, b.r[2 * h], b.r[2 * h + 1]);
}
__device__ __forceinline__ void mma(float (&c)[4], const FragA<float>& a, const FragB<float>& b, int h) {
  float t[4] = {0.f, 0.f, 0.f, 0.f};  // this step's sum (see the top of the file: never chain mma through c)
#pragma unroll
  for (int s = 0; s < 2; ++s) {  // small terms first; lo*lo is below float32 rounding
    mma1688_tf32(t, a.lo[s], b.hi[h][s][0], b.hi[h][s][1]);
    mma1688_tf32(t, a.hi[s], b.lo[h][s][0], b.lo[h][s][1]);
    mma1688_tf32(t, a.hi[s], b.hi[h][s][0], b.hi[h][s][1]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] += t[e];
}

// The A fragment of a k16 step from the float C fragments of two neighbouring 16x8 n-tiles (P or dS kept in
// registers between two products).
template <class T>
__device__ __forceinline__ void a_from_c(FragA<T>& a, const float (&c0)[4], const float (&c1)[4]) {
  a.r[0] = pack2<T>(c0[0], c0[1]);
  a.r[1] = pack2<T>(c0[2], c0[3]);
  a.r[2] = pack2<T>(c1[0], c1[1]);
  a.r[3] = pack2<T>(c1[2], c1[3]);
}
__device__ __forceinline__ void a_from_c(FragA<float>& a, const float (&c0)[4], const float (&c1)[4]) {
  // k order (t -> 2t, t + 4 -> 2t + 1): a0 = c0 (g, 2t), a1 = c2 (g+8, 2t), a2 = c1 (g, 2t+1), a3 = c3.
  split_tf32(c0[0], a.hi[0][0], a.lo[0][0]);
  split_tf32(c0[2], a.hi[0][1], a.lo[0][1]);
  split_tf32(c0[1], a.hi[0][2], a.lo[0][2]);
  split_tf32(c0[3], a.hi[0][3], a.lo[0][3]);
  split_tf32(c1[0], a.hi[1][0], a.lo[1][0]);
  split_tf32(c1[2], a.hi[1][1], a.lo[1][1]);
  split_tf32(c1[1], a.hi[1][2], a.lo[1][2]);
  split_tf32(c1[3], a.hi[1][3], a.lo[1][3]);
}

// A ROWS x COLS tile of T in shared memory, stored as 16-byte chunks with the chunk index XORed by the row (mod 8):
// the 8 row addresses of one ldmatrix phase then hit 8 different bank groups, and so do the float path's scalar
// reads of rows 2t / 2t + 1 (t = 0..3) at 8 consecutive columns.
template <int ROWS, int COLS, class T>
struct SmemTile {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = COLS / kVec;                       // chunks per row
  static constexpr int kSwz = kChunks >= 8 ? 7 : kChunks - 1;
  static constexpr int kBytes = ROWS * COLS * static_cast<int>(sizeof(T));
  static_assert(COLS % 16 == 0, "tile columns must be a multiple of 16");
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((row * kChunks + (chunk ^ (row & kSwz))) * 16);
  }
  __device__ __forceinline__ static uint32_t elem(int row, int col) {
    return offset(row, col / kVec) + (col % kVec) * static_cast<uint32_t>(sizeof(T));
  }
  // ldmatrix_x4 lane address of matrices (r,c) (r+8,c) (r,c+8) (r+8,c+8) in units of 16 bytes: an A operand of
  // the k-chunk at c0 stored row-major.
  __device__ __forceinline__ static uint32_t a_addr(uint32_t base, int r0, int c0, int lane) {
    return base + offset(r0 + (lane & 15), c0 / kVec + (lane >> 4));
  }
  // Matrices (n,k) (n,k+1 chunk) (n+8,k) (n+8,k+1 chunk): b0, b1 of n-tiles n and n + 8 stored [n][k].
  __device__ __forceinline__ static uint32_t b_addr(uint32_t base, int n0, int k0, int lane) {
    return base + offset(n0 + (lane & 7) + ((lane >> 4) << 3), k0 / kVec + ((lane >> 3) & 1));
  }

  // A operand of the k16 step at (r0, c0), stored [m][k].
  __device__ __forceinline__ static void lda(FragA<T>& a, uint32_t base, int r0, int c0, int lane) {
    if constexpr (kF32) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t raw[4];
        ldmatrix_x4(raw, a_addr(base, r0, c0 + 8 * s, lane));
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(__uint_as_float(raw[e]), a.hi[s][e], a.lo[s][e]);
      }
    } else {
      ldmatrix_x4(a.r, a_addr(base, r0, c0, lane));
    }
  }
  // B operands of n-tiles n0, n0 + 8 and the k16 step at k0, stored [n][k] (K for Q K^T).
  __device__ __forceinline__ static void ldb(FragB<T>& b, uint32_t base, int n0, int k0, int lane) {
    if constexpr (kF32) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t raw[4];
        ldmatrix_x4(raw, b_addr(base, n0, k0 + 8 * s, lane));
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(__uint_as_float(raw[e]), b.hi[e >> 1][s][e & 1], b.lo[e >> 1][s][e & 1]);
      }
    } else {
      ldmatrix_x4(b.r, b_addr(base, n0, k0, lane));
    }
  }
  // Float path, scalar reads of element (k0 + 2t + e, n0 + g) with k0, n0 multiples of 8 (known after unrolling):
  // with a multiple of 8 chunks per row the swizzle XOR only touches the low 3 chunk bits, so the byte offset is
  // a constant of (k0, n0) plus (kn_lane(e) ^ constant): two per-thread registers serve every read.
  __device__ __forceinline__ static uint32_t kn_lane(int lane, int e) {
    const int g = lane >> 2, r = 2 * (lane & 3) + e;  // row within the 8-row group
    return static_cast<uint32_t>(r * kChunks * 16 + (g & 3) * 4) | static_cast<uint32_t>(((g >> 2) ^ r) << 4);
  }
  __device__ __forceinline__ static uint32_t kn_addr(uint32_t base, int k0, int n0, uint32_t lane_off) {
    const int chunk = n0 / 4;
    return base + static_cast<uint32_t>(k0 * kChunks * 16 + (chunk & ~7) * 16) + (lane_off ^ ((chunk & 7) << 4));
  }
  // The same operands stored [k][n] (V, dO, Q, K when k runs along rows).
  __device__ __forceinline__ static void ldb_t(FragB<T>& b, uint32_t base, int k0, int n0, int lane) {
    if constexpr (kF32) {
      static_assert(kChunks % 8 == 0, "float tiles read along k need a multiple of 32 columns");
      const uint32_t w[2] = {kn_lane(lane, 0), kn_lane(lane, 1)};
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            split_tf32(lds_f32(kn_addr(base, k0 + 8 * s, n0 + 8 * h, w[e])), b.hi[h][s][e], b.lo[h][s][e]);
    } else {
      ldmatrix_x4_trans(b.r, a_addr(base, k0, n0, lane));
    }
  }
  // An A operand stored transposed, [k][m] (dS^T for dQ = dS K).
  __device__ __forceinline__ static void lda_t(FragA<T>& a, uint32_t base, int k0, int m0, int lane) {
    if constexpr (kF32) {
      static_assert(kChunks % 8 == 0, "float tiles read along k need a multiple of 32 columns");
      const uint32_t w[2] = {kn_lane(lane, 0), kn_lane(lane, 1)};
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e)  // a0 (g, k 2t) a1 (g+8, 2t) a2 (g, 2t+1) a3 (g+8, 2t+1)
          split_tf32(lds_f32(kn_addr(base, k0 + 8 * s, m0 + 8 * (e & 1), w[e >> 1])), a.hi[s][e], a.lo[s][e]);
    } else {
      ldmatrix_x4_trans(a.r, b_addr(base, k0, m0, lane));
    }
  }
  // Loops that keep one lane address per operand: lane_addr = a_addr / b_addr at a row that is a multiple of 8 in
  // a tile at a 128-byte aligned base with at least 8 chunks per row. The operand dr rows further (a multiple of 8)
  // and dc chunks further, where dc shares no bit below 8 with the lane's chunk, is then one XOR and one immediate
  // away: the row's swizzle bits stay, and the chunk's low bits add without carry.
  __device__ __forceinline__ static uint32_t moved(uint32_t lane_addr, int dr, int dc) {
    static_assert(kSwz == 7, "moved: at least 8 chunks per row");
    return (lane_addr ^ static_cast<uint32_t>((dc & 7) << 4)) + static_cast<uint32_t>(((dc & ~7) + dr * kChunks) * 16);
  }
  // A 16-bit A fragment written back as the 16x16 block at (r0, c0), stored [m][k] (the inverse of lda).
  __device__ __forceinline__ static void sta(const FragA<T>& a, uint32_t base, int r0, int c0, int lane) {
    static_assert(!kF32, "sta: 16-bit tiles only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    stmatrix_x4(a.r, a_addr(base, r0, c0, lane));
#else
    const int g = lane >> 2, c = c0 + 2 * (lane & 3);
    sts_u32(base + elem(r0 + g, c), a.r[0]);
    sts_u32(base + elem(r0 + g + 8, c), a.r[1]);
    sts_u32(base + elem(r0 + g, c + 8), a.r[2]);
    sts_u32(base + elem(r0 + g + 8, c + 8), a.r[3]);
#endif
  }
  // Elements (row, col) and (row, col + 1), col even, rounded to T.
  __device__ __forceinline__ static void st2(unsigned char* base, int row, int col, float x, float y) {
    cuda::st2<T>(reinterpret_cast<T*>(base + elem(row, col)), x, y);
  }
};

__device__ __forceinline__ float warp_max4(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float warp_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace cuda
}  // namespace sdpax
