// Shared device helpers of the QuaRot CUDA kernels: type conversion, warp reductions,
// cp.async / ldmatrix wrappers and the int4 tensor-core MMA (with its Hopper fallback).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace quarot_cuda {

// ------------------------------------------------------------------ type conversion
// Explicit intrinsics only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v rounded (to nearest even) to T and back: what `.to(T)` followed by `.float()` does.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ------------------------------------------------------------------ warp reductions

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// ------------------------------------------------------------------ async copies

// 16-byte global -> shared copy; when !pred nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
#else
  *reinterpret_cast<uint4*>(smem) =
      pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices: lanes 8j..8j+7 give the row addresses of matrix j, and lane l
// receives in r[j] the 32-bit word (l % 4) of row (l / 4) of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// ------------------------------------------------------------------ int4 MMA
//
// One warp-wide D[16x8] += A[16x64] * B[64x8] over signed 4-bit codes (int32 accumulate).
// Fragments follow PTX's mma.m16n8k64 .s4 layout (g = lane / 4, t = lane % 4), each
// register holding 8 codes with the first in bits 0..3 (i.e. our packed byte order):
//   a[0]: row g,   k 8t..8t+7      a[1]: row g+8, k 8t..8t+7
//   a[2]: row g,   k 32+8t..+7     a[3]: row g+8, k 32+8t..+7
//   b[0]: col g,   k 8t..8t+7      b[1]: col g,   k 32+8t..+7
//   d[0], d[1]: row g, cols 2t, 2t+1;   d[2], d[3]: row g+8, cols 2t, 2t+1
// Since the products are summed over k, any k permutation applied identically to A and B
// gives the same result; the callers rely on that to load fragments in whatever order is
// cheapest.
//
// sm_80/86/89 run it as one INT4 tensor-core instruction. Hopper (sm_90) has no s4 MMA:
// each register is split into its even and odd codes sign-extended to int8, and the two
// halves go through mma.m16n8k32 .s8 (the s8 fragment layout is the s4 one with 4 codes
// per register, so "even codes of register i" is again a consistent k permutation).

// 8 signed nibbles -> int8x4 of the even ones (codes 0, 2, 4, 6) and of the odd ones.
// Per byte: u in [0, 15] -> ((u ^ 8) + 0x78) ^ 0x80 == sign-extended u, never carrying
// into the next byte (max 0x0F + 0x78 = 0x87).
__device__ __forceinline__ uint32_t s4_even_to_s8(uint32_t w) {
  return (((w & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
}
__device__ __forceinline__ uint32_t s4_odd_to_s8(uint32_t w) {
  return ((((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
}

__device__ __forceinline__ void mma_s8_m16n8k32(int (&d)[4], uint32_t a0, uint32_t a1,
                                                uint32_t a2, uint32_t a3, uint32_t b0,
                                                uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Operand fragments in the form the MMA of this architecture consumes: raw s4 registers
// on sm_8x, [even | odd] int8 registers on sm_90+ (unpacked once per fragment, then
// reused by every MMA that shares it).
struct FragA {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r[8];
#else
  uint32_t r[4];
#endif
};
struct FragB {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r[4];
#else
  uint32_t r[2];
#endif
};

__device__ __forceinline__ FragA make_frag_a(uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3) {
  FragA f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  f.r[0] = s4_even_to_s8(a0);
  f.r[1] = s4_even_to_s8(a1);
  f.r[2] = s4_even_to_s8(a2);
  f.r[3] = s4_even_to_s8(a3);
  f.r[4] = s4_odd_to_s8(a0);
  f.r[5] = s4_odd_to_s8(a1);
  f.r[6] = s4_odd_to_s8(a2);
  f.r[7] = s4_odd_to_s8(a3);
#else
  f.r[0] = a0;
  f.r[1] = a1;
  f.r[2] = a2;
  f.r[3] = a3;
#endif
  return f;
}

__device__ __forceinline__ FragB make_frag_b(uint32_t b0, uint32_t b1) {
  FragB f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  f.r[0] = s4_even_to_s8(b0);
  f.r[1] = s4_even_to_s8(b1);
  f.r[2] = s4_odd_to_s8(b0);
  f.r[3] = s4_odd_to_s8(b1);
#else
  f.r[0] = b0;
  f.r[1] = b1;
#endif
  return f;
}

// d += A * B over 64 codes of k (see the layout above).
__device__ __forceinline__ void mma_s4_k64(int (&d)[4], const FragA& a, const FragB& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  mma_s8_m16n8k32(d, a.r[0], a.r[1], a.r[2], a.r[3], b.r[0], b.r[1]);  // even codes
  mma_s8_m16n8k32(d, a.r[4], a.r[5], a.r[6], a.r[7], b.r[2], b.r[3]);  // odd codes
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
#else
  __trap();
#endif
}

// Signed value of the low / high nibble of a byte.
__device__ __forceinline__ int s4_lo(uint32_t byte) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(byte << 4))) >> 4;
}
__device__ __forceinline__ int s4_hi(uint32_t byte) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(byte))) >> 4;
}

// Butterflies of strides 1..R/2 over R values held in registers (Sylvester order:
// (a, b) -> (a + b, a - b), a the lower index). `limit` skips strides >= limit.
template <int R>
__device__ __forceinline__ void butterflies(float (&v)[R], int limit) {
#pragma unroll
  for (int s = 1; s < R; s <<= 1) {
    if (s >= limit) break;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if ((j & s) == 0) {
        const float a = v[j], b = v[j + s];
        v[j] = a + b;
        v[j + s] = a - b;
      }
    }
  }
}

}  // namespace quarot_cuda
