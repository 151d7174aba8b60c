// W4A4 GEMM: packed int4 activations [M, K/2] × packed int4 weights [N, K/2] (both row
// major, two codes per byte, low nibble = even column), int32 accumulation, epilogue
//   out[m, n] = ((float(acc) * w_scale[n]) * a_scale[m] + bias[n])  -> out dtype
// in the order quarot::int_linear computes it.
//
// Three kernels:
//  * w4a4_gemm_tc_kernel  (M > 16): CTA tile (64·WM)×(32·WN)×128, WM×WN warps of 64×32,
//    a 4-stage cp.async pipeline into XOR-swizzled shared memory, ldmatrix.x4 fragment
//    loads and mma_s4_k64 (INT4 tensor cores on sm_8x, int8 ones on sm_90).
//  * w4a4_gemv_kernel     (M <= 16, decode): weights are read once, straight from global
//    memory into B fragments (16 B per thread per 128-wide k block); the same k block of
//    the (tiny) activations comes from L1/L2. KSPLIT warps split K, reduced in shared
//    memory. Memory bound on the weights, as decode is.
//  * w4a4_simt_kernel     (K % 32 != 0 or unaligned pointers): one thread per output.
#pragma once

#include "quarot_common.cuh"

namespace quarot_cuda {

struct GemmParams {
  const uint8_t* a;       // [M, K/2]
  const float* a_scale;   // [M]
  const uint8_t* w;       // [N, K/2]
  const float* w_scale;   // [N]
  const float* bias;      // [N] or nullptr
  void* out;              // [M, N]
  int M, N, K;
};

template <typename OutT>
__device__ __forceinline__ float epilogue(const GemmParams& p, int acc, int m, int n) {
  // explicit roundings: no FMA contraction, so the result is bit-identical to torch's
  float v = __fmul_rn(static_cast<float>(acc), p.w_scale[n]);
  v = __fmul_rn(v, p.a_scale[m]);
  if (p.bias != nullptr) v = __fadd_rn(v, p.bias[n]);
  return v;
}

// Stores (m, n) and (m, n + 1) (n even); the pair as one 2-element store when it can.
template <typename OutT>
__device__ __forceinline__ void store_pair(const GemmParams& p, int m, int n, int acc0,
                                           int acc1) {
  if (m >= p.M || n >= p.N) return;
  OutT* o = static_cast<OutT*>(p.out) + static_cast<size_t>(m) * p.N + n;
  const OutT v0 = from_float<OutT>(epilogue<OutT>(p, acc0, m, n));
  if (n + 1 < p.N) {
    const OutT v1 = from_float<OutT>(epilogue<OutT>(p, acc1, m, n + 1));
    if ((p.N & 1) == 0 && sizeof(OutT) == 2) {
      // 4-byte aligned: (m*N + n) is even
      const uint32_t lo = *reinterpret_cast<const uint16_t*>(&v0);
      const uint32_t hi = *reinterpret_cast<const uint16_t*>(&v1);
      *reinterpret_cast<uint32_t*>(o) = lo | (hi << 16);
    } else {
      o[0] = v0;
      o[1] = v1;
    }
  } else {
    o[0] = v0;
  }
}

// ---------------------------------------------------------------- tensor-core GEMM

constexpr int kBK = 128;       // codes of k per pipeline stage
constexpr int kBKB = kBK / 2;  // bytes per row per stage (4 chunks of 16 B)
constexpr int kStages = 4;

// Byte offset of 16-byte chunk `ch` (0..3) of tile row `r` in a [rows][64 B] stage tile.
// The XOR swizzle makes the 8 rows × 16 B that one ldmatrix 8x8 matrix reads hit 8
// different 16-byte bank groups: slot = (r & 1) * 4 + (ch ^ ((r >> 1) & 3)).
__device__ __forceinline__ int swz(int r, int ch) {
  return r * kBKB + ((ch ^ ((r >> 1) & 3)) << 4);
}

template <int WM, int WN>
constexpr int gemm_smem_bytes() {
  return kStages * (64 * WM + 32 * WN) * kBKB;
}

template <int WM, int WN, typename OutT>
__global__ void __launch_bounds__(WM * WN * 32)
    w4a4_gemm_tc_kernel(const GemmParams p) {
  constexpr int BM = 64 * WM, BN = 32 * WN, THREADS = WM * WN * 32;
  constexpr int MT = 4, NT = 4;  // m16 and n8 tiles per warp (warp tile 64 × 32)
  constexpr int STAGE_BYTES = (BM + BN) * kBKB;
  extern __shared__ uint4 smem_u4[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_u4);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int KB = p.K >> 1;  // bytes per row; a multiple of 16 (K % 32 == 0)
  const int KT = (p.K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* st = smem + stage * STAGE_BYTES;
#pragma unroll
    for (int c = tid; c < (BM + BN) * 4; c += THREADS) {
      const int row = c >> 2, ch = c & 3;
      const bool is_a = row < BM;
      const int r = is_a ? row : row - BM;
      const int grow = (is_a ? m0 : n0) + r;
      const int kbyte = kt * kBKB + ch * 16;
      const bool valid = grow < (is_a ? p.M : p.N) && kbyte < KB;
      const uint8_t* base = is_a ? p.a : p.w;
      const uint8_t* src = valid ? base + static_cast<size_t>(grow) * KB + kbyte : base;
      cp_async16(st + (is_a ? 0 : BM * kBKB) + swz(r, ch), src, valid);
    }
  };

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix row/chunk of this lane: matrix j = lane / 8, row-in-matrix = lane % 8
  const int lj = lane >> 3, lr = lane & 7;

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_stage(nk % kStages, nk);
      cp_async_commit();
    }
    const uint8_t* sa = smem + (kt % kStages) * STAGE_BYTES;
    const uint8_t* sb = sa + BM * kBKB;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {  // two k64 steps per stage
      FragA fa[MT];
      FragB fb[NT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // matrices: 0 = rows 0-7 chunk 2ks, 1 = rows 8-15 chunk 2ks,
        //           2 = rows 0-7 chunk 2ks+1, 3 = rows 8-15 chunk 2ks+1
        const int r = wm * 64 + mt * 16 + lr + (lj & 1) * 8;
        uint32_t x[4];
        ldmatrix_x4(x, sa + swz(r, 2 * ks + (lj >> 1)));
        fa[mt] = make_frag_a(x[0], x[1], x[2], x[3]);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // matrices: 0 = n rows 0-7 chunk 2ks, 1 = n rows 0-7 chunk 2ks+1,
        //           2 = n rows 8-15 chunk 2ks, 3 = n rows 8-15 chunk 2ks+1
        const int r = wn * 32 + np * 16 + lr + (lj >> 1) * 8;
        uint32_t x[4];
        ldmatrix_x4(x, sb + swz(r, 2 * ks + (lj & 1)));
        fb[2 * np] = make_frag_b(x[0], x[1]);
        fb[2 * np + 1] = make_frag_b(x[2], x[3]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_s4_k64(acc[mt][nt], fa[mt], fb[nt]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + wm * 64 + mt * 16 + g;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = n0 + wn * 32 + nt * 8 + 2 * t;
      store_pair<OutT>(p, m, n, acc[mt][nt][0], acc[mt][nt][1]);
      store_pair<OutT>(p, m + 8, n, acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
}

// ---------------------------------------------------------------- decode GEMV (M <= 16)
//
// Per 128-code k block (64 bytes of each row) thread (g = lane/4, t = lane%4) loads the
// 16 bytes [16t, 16t+16) = words 4t..4t+3 of activation rows g and g+8 and of weight rows
// n0+g (one per n8 tile). Two MMAs consume them:
//   MMA 0: A = {a_g.x, a_g8.x, a_g.y, a_g8.y}, B = {w.x, w.y}
//   MMA 1: A = {a_g.z, a_g8.z, a_g.w, a_g8.w}, B = {w.z, w.w}
// In both, A register 0 / B register 0 hold the same word (4t or 4t+2) and A register 2 /
// B register 1 the same word (4t+1 or 4t+3): a consistent k permutation, and every word
// of the block is used exactly once.

constexpr int kGemvSplit = 8;  // warps per CTA, splitting K
constexpr int kGemvNT = 2;     // n8 tiles per CTA

__device__ __forceinline__ uint4 ldg_u4(const uint8_t* ptr, bool pred) {
  return pred ? __ldg(reinterpret_cast<const uint4*>(ptr)) : make_uint4(0, 0, 0, 0);
}

// Weights are streamed once: do not keep them in L1.
__device__ __forceinline__ uint4 ldg_u4_stream(const uint8_t* ptr, bool pred) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (pred) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(ptr));
  }
  return r;
}

template <typename OutT>
__global__ void __launch_bounds__(kGemvSplit * 32) w4a4_gemv_kernel(const GemmParams p) {
  constexpr int NT = kGemvNT;
  __shared__ int red[kGemvSplit][NT][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * NT * 8;
  const int KB = p.K >> 1;
  const int nkb = (p.K + kBK - 1) / kBK;

  int acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;

  const bool row_lo = g < p.M, row_hi = g + 8 < p.M;
  const uint8_t* a_lo = p.a + static_cast<size_t>(row_lo ? g : 0) * KB + t * 16;
  const uint8_t* a_hi = p.a + static_cast<size_t>(row_hi ? g + 8 : 0) * KB + t * 16;
  const uint8_t* wrow[NT];
  bool nvalid[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = n0 + j * 8 + g;
    nvalid[j] = n < p.N;
    wrow[j] = p.w + static_cast<size_t>(nvalid[j] ? n : 0) * KB + t * 16;
  }

  // Two k blocks per iteration, all loads issued before the MMAs.
  for (int kb = warp; kb < nkb; kb += 2 * kGemvSplit) {
    const int kb2 = kb + kGemvSplit;
    const bool v1 = kb * kBKB + t * 16 < KB;  // chunks are all-valid or all-invalid
    const bool v2 = kb2 < nkb && kb2 * kBKB + t * 16 < KB;
    uint4 w1[NT], w2[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      w1[j] = ldg_u4_stream(wrow[j] + kb * kBKB, v1 && nvalid[j]);
      w2[j] = ldg_u4_stream(wrow[j] + kb2 * kBKB, v2 && nvalid[j]);
    }
    const uint4 al1 = ldg_u4(a_lo + kb * kBKB, v1 && row_lo);
    const uint4 ah1 = ldg_u4(a_hi + kb * kBKB, v1 && row_hi);
    const uint4 al2 = ldg_u4(a_lo + kb2 * kBKB, v2 && row_lo);
    const uint4 ah2 = ldg_u4(a_hi + kb2 * kBKB, v2 && row_hi);
    const FragA f10 = make_frag_a(al1.x, ah1.x, al1.y, ah1.y);
    const FragA f11 = make_frag_a(al1.z, ah1.z, al1.w, ah1.w);
    const FragA f20 = make_frag_a(al2.x, ah2.x, al2.y, ah2.y);
    const FragA f21 = make_frag_a(al2.z, ah2.z, al2.w, ah2.w);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mma_s4_k64(acc[j], f10, make_frag_b(w1[j].x, w1[j].y));
      mma_s4_k64(acc[j], f11, make_frag_b(w1[j].z, w1[j].w));
      mma_s4_k64(acc[j], f20, make_frag_b(w2[j].x, w2[j].y));
      mma_s4_k64(acc[j], f21, make_frag_b(w2[j].z, w2[j].w));
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][j][e][lane] = acc[j][e];
  __syncthreads();
  if (warp < NT) {  // warp j finishes n8 tile j
    const int j = warp;
    int s[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[e] = 0;
#pragma unroll
      for (int w = 0; w < kGemvSplit; ++w) s[e] += red[w][j][e][lane];
    }
    const int n = n0 + j * 8 + 2 * t;
    store_pair<OutT>(p, g, n, s[0], s[1]);
    store_pair<OutT>(p, g + 8, n, s[2], s[3]);
  }
}

// ---------------------------------------------------------------- generic fallback

template <typename OutT>
__global__ void w4a4_simt_kernel(const GemmParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.M) * p.N) return;
  const int m = static_cast<int>(idx / p.N), n = static_cast<int>(idx % p.N);
  const int KB = p.K >> 1;
  const uint8_t* a = p.a + static_cast<size_t>(m) * KB;
  const uint8_t* w = p.w + static_cast<size_t>(n) * KB;
  int acc = 0;
  for (int j = 0; j < KB; ++j) {
    const uint32_t x = a[j], y = w[j];
    acc += s4_lo(x) * s4_lo(y) + s4_hi(x) * s4_hi(y);
  }
  static_cast<OutT*>(p.out)[static_cast<size_t>(m) * p.N + n] =
      from_float<OutT>(epilogue<OutT>(p, acc, m, n));
}

}  // namespace quarot_cuda
