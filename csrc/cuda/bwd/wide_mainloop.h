// The matrix products of one step of the wide-tile backward loop (bwd/wide_kernel.h), each on its own warp tile of the
// 8 warps; P^T and dS^T travel between them through shared memory.
//   S^T, dP^T (BN x BM):  warp (wk, wn) computes 32 keys x WQ queries
//   dV, dK    (BN x D):   warp (wk, wn) accumulates 32 keys x DC columns in registers for the whole block
//   dQ        (BM x D):   warp (qm, c) computes 32 rows x QC columns, then float atomics (epilogue.h)
// Operands are read by ldmatrix from lane addresses set once per thread (SmemTile::a_addr / b_addr) and moved by
// constants (SmemTile::moved); the Q / dO ones also by the buffer offset q_buf of the step.
// Helpers take the kernel's per-thread state by const reference, as the lambdas they were captured it: taken by
// value, the inlined arithmetic is canonicalized differently and ptxas's output of the spill-bound kinds moves.
#pragma once
#include "cuda/prims/mma.h"

namespace sdpax {
namespace cuda {

// c (+)= A B^T over the head dim: A = the 32 rows of K (or V) at lane address a_base, B = WQ rows of Q (or dO) at
// b_base, both [row][head dim].
template <class T, class KTile, class QTile, int D, int WQ>
__device__ __forceinline__ void wide_product(float (&c)[2][WQ / 8][4], uint32_t a_base, uint32_t b_base) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA<T> a[2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) ldmatrix_x4(a[mt].r, KTile::moved(a_base, mt * 16, 2 * kk));
#pragma unroll
    for (int np = 0; np < WQ / 16; ++np) {
      FragB<T> bb;
      ldmatrix_x4(bb.r, QTile::moved(b_base, np * 16, 2 * kk));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma(c[mt][2 * np], a[mt], bb, 0);
        mma(c[mt][2 * np + 1], a[mt], bb, 1);
      }
    }
  }
}

// S^T = K Q^T and dP^T = V dO^T in one k loop (BwdWideCfg::kFuseSdP): the same instructions per product, twice the
// independent chains. V is KTile::kBytes after K, dO QTile::kBytes after Q.
template <class T, class KTile, class QTile, int D, int WQ>
__device__ __forceinline__ void wide_product2(float (&st)[2][WQ / 8][4], float (&dpt)[2][WQ / 8][4],
                                              const uint32_t& lane_k, const uint32_t& lane_q, const uint32_t& q_buf) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA<T> a[2], av[2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      ldmatrix_x4(a[mt].r, KTile::moved(lane_k, mt * 16, 2 * kk));
      ldmatrix_x4(av[mt].r, KTile::moved(lane_k, mt * 16, 2 * kk) + KTile::kBytes);
    }
#pragma unroll
    for (int np = 0; np < WQ / 16; ++np) {
      FragB<T> bq, bd;
      ldmatrix_x4(bq.r, QTile::moved(lane_q + q_buf, np * 16, 2 * kk));
      ldmatrix_x4(bd.r, QTile::moved(lane_q + q_buf, np * 16, 2 * kk) + QTile::kBytes);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma(st[mt][2 * np], a[mt], bq, 0);
        mma(st[mt][2 * np + 1], a[mt], bq, 1);
        mma(dpt[mt][2 * np], av[mt], bd, 0);
        mma(dpt[mt][2 * np + 1], av[mt], bd, 1);
      }
    }
  }
}

// P^T and dS^T of this warp's 32 keys x WQ queries to shared memory (16-bit, [key][query]: the A operands of dV / dK
// and, read transposed, of dQ); dS^T is PTile::kBytes after P^T.
template <class T, class PTile, int WQ>
__device__ __forceinline__ void wide_store_pds(const float (&st)[2][WQ / 8][4], const float (&dpt)[2][WQ / 8][4],
                                               uint32_t lane_ps, uint32_t sP, uint32_t sS, int wk, int wn, int lane) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int kk = 0; kk < WQ / 16; ++kk) {
      FragA<T> ap, as;
      a_from_c(ap, st[mt][2 * kk], st[mt][2 * kk + 1]);
      a_from_c(as, dpt[mt][2 * kk], dpt[mt][2 * kk + 1]);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      stmatrix_x4(ap.r, PTile::moved(lane_ps, mt * 16, 2 * kk));
      stmatrix_x4(as.r, PTile::moved(lane_ps, mt * 16, 2 * kk) + PTile::kBytes);
      (void)sP, (void)sS, (void)wk, (void)wn, (void)lane;
#else
      PTile::sta(ap, sP, wk * 32 + mt * 16, wn * WQ + kk * 16, lane);
      PTile::sta(as, sS, wk * 32 + mt * 16, wn * WQ + kk * 16, lane);
      (void)lane_ps;
#endif
    }
}

// dV += P^T dO, dK += dS^T Q on this warp's 32 keys x DC columns (P^T / dS^T at lane_pa, dO / Q of the step's buffer
// at lane_qt + q_buf, read transposed).
template <class T, class PTile, class QTile, int BM, int DC>
__device__ __forceinline__ void wide_dkdv(float (&acc_dv)[2][DC / 8][4], float (&acc_dk)[2][DC / 8][4],
                                          uint32_t lane_pa, uint32_t lane_qt, uint32_t q_buf) {
#pragma unroll
  for (int kk = 0; kk < BM / 16; ++kk) {
    FragA<T> ap[2], as[2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      ldmatrix_x4(ap[mt].r, PTile::moved(lane_pa, mt * 16, 2 * kk));
      ldmatrix_x4(as[mt].r, PTile::moved(lane_pa, mt * 16, 2 * kk) + PTile::kBytes);
    }
#pragma unroll
    for (int dn = 0; dn < DC / 16; ++dn) {
      FragB<T> bd, bq;
      ldmatrix_x4_trans(bd.r, QTile::moved(lane_qt + q_buf, kk * 16, 2 * dn) + QTile::kBytes);
      ldmatrix_x4_trans(bq.r, QTile::moved(lane_qt + q_buf, kk * 16, 2 * dn));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma(acc_dv[mt][2 * dn], ap[mt], bd, 0);
        mma(acc_dv[mt][2 * dn + 1], ap[mt], bd, 1);
        mma(acc_dk[mt][2 * dn], as[mt], bq, 0);
        mma(acc_dk[mt][2 * dn + 1], as[mt], bq, 1);
      }
    }
  }
}

// dQ (32 rows x QC columns of this warp) = dS K over the BN keys: dS^T at lane_st read transposed as A, K at lane_kt
// read transposed as B.
template <class T, class PTile, class KTile, int BN, int QC>
__device__ __forceinline__ void wide_dq(float (&acc_dq)[2][QC / 8][4], uint32_t lane_st, uint32_t lane_kt) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int dn = 0; dn < QC / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dq[mt][dn][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    FragA<T> a[2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) ldmatrix_x4_trans(a[mt].r, PTile::moved(lane_st, kk * 16, 2 * mt));
#pragma unroll
    for (int dn = 0; dn < QC / 16; ++dn) {
      FragB<T> bk;
      ldmatrix_x4_trans(bk.r, KTile::moved(lane_kt, kk * 16, 2 * dn));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma(acc_dq[mt][2 * dn], a[mt], bk, 0);
        mma(acc_dq[mt][2 * dn + 1], a[mt], bk, 1);
      }
    }
  }
}

}  // namespace cuda
}  // namespace sdpax
