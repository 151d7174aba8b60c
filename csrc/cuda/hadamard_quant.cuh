// Fused online Hadamard transform + per-token symmetric quantization.
//
// Math (vllm_quarot.hadamard.hadamard_transform, then quant.quantize_per_token):
//   n = K * P, P a power of two, H_K the ±1 K×K factor (had_k, unnormalised)
//   f = FWHT of each of the K contiguous chunks of P values       (Sylvester order)
//   y[c*P + b] = sum_a H_K[a, c] * f[a*P + b]                      (dense K×K mix)
//   y = round_to_dtype(y / sqrt(n))      -- quarot::hadamard returns x.dtype
//   scale = max(amax(|y|) * (clip / qmax), 1e-12); q = clamp(rint(y / scale), -qmax-1, qmax)
//
// One CTA per row (grid-stride over rows). The row lives in float32 in shared memory (or,
// when 2n floats do not fit the device's opt-in shared memory, in a per-CTA slice of a
// global scratch buffer that stays in L2):
//   1. load 8 contiguous values per thread (16 B vector loads) and apply the first three
//      butterfly stages (strides 1, 2, 4) in registers;
//   2. remaining stages as radix-8/4/2 passes over the buffer (one __syncthreads each);
//   3. K > 1: the K×K mix into a second buffer. H_K is held as sign bits in shared memory
//      (bit c of word a*W + c/32 set when H_K[a, c] < 0, built with __ballot_sync), and
//      each thread produces 4 outputs c0..c0+3 of one column b, so every value read
//      from shared memory feeds 4 sign-adds;
//   4. block max-reduction of |y|, then quantization with vector stores of the codes
//      (bits = 4: 8 codes -> one uint32, low nibble = even column; bits = 8: int8).
// Without had_k the row goes straight to step 4.
#pragma once

#include "quarot_common.cuh"

namespace quarot_cuda {

struct HadQuantParams {
  const void* x;          // [M, n] contiguous, dtype T
  const float* had;       // [K, K] float32 (nullptr: no K factor)
  uint8_t* codes;         // [M, n] int8 (bits 8) or [M, n/2] packed int4 (bits 4)
  float* scales;          // [M]
  float* scratch;         // [gridDim.x, 2n] when !use_smem
  int M, n, K, W;         // W = ceil(K / 32) sign words per row of H_K
  int log2P;              // P = n / K
  int bits, qmax;
  float mult;             // clip_ratio / qmax, as float32 (what torch multiplies by)
  float norm;             // 1/sqrt(n) as float32
  bool do_had, use_smem, vec;
};

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]);

template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// 16-bit types: four packed pairs per 16-byte load, each widened to float2.
__device__ __forceinline__ float2 pair_to_float2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 h) {
  return __bfloat1622float2(h);
}

template <typename Pair>
__device__ __forceinline__ void load8_pairs(const void* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    Pair h;
    *reinterpret_cast<uint32_t*>(&h) = w[i];
    const float2 f = pair_to_float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float (&v)[8]) {
  load8_pairs<__half2>(p, v);
}

template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float (&v)[8]) {
  load8_pairs<__nv_bfloat162>(p, v);
}

// One radix-R pass over every chunk of P = 2^log2P values: strides h, 2h, ..., (R/2)h.
template <int R, int THREADS>
__device__ __forceinline__ void fwht_pass(float* buf, int n, int log2P, int logh) {
  constexpr int r = R == 8 ? 3 : (R == 4 ? 2 : 1);
  const int h = 1 << logh;
  const int groups = n >> r;
  const int gpc_log = log2P - r;  // log2 of the groups per chunk
  for (int g = threadIdx.x; g < groups; g += THREADS) {
    const int c = g >> gpc_log;
    const int rem = g & ((1 << gpc_log) - 1);
    const int lo = rem & (h - 1);
    const int hi = rem >> logh;
    const int base = (c << log2P) + (hi << (logh + r)) + lo;
    float v[R];
#pragma unroll
    for (int j = 0; j < R; ++j) v[j] = buf[base + j * h];
    butterflies<R>(v, R);
#pragma unroll
    for (int j = 0; j < R; ++j) buf[base + j * h] = v[j];
  }
}

template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* red) {
  constexpr int NW = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < NW ? red[lane] : 0.f;
    w = warp_max(w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  return red[32];
}

template <typename T>
__device__ __forceinline__ float finalize(float v, const HadQuantParams& p) {
  return p.do_had ? round_to<T>(v * p.norm) : v;
}

__device__ __forceinline__ int quantize_sym(float v, float scale, int qmax) {
  float q = rintf(__fdiv_rn(v, scale));  // round half to even, like torch.round
  q = fminf(fmaxf(q, static_cast<float>(-qmax - 1)), static_cast<float>(qmax));
  return static_cast<int>(q);
}

// Dynamic shared memory: [red: 36 floats][sign words: K*W, padded to 4][buf: n][buf2: n]
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS)
    hadamard_quant_kernel(const HadQuantParams p) {
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  float* red = smem;
  uint32_t* hs = reinterpret_cast<uint32_t*>(smem + 36);
  const bool mix = p.do_had && p.K > 1;
  const int hs_words = mix ? p.K * p.W : 0;
  const int n = p.n;
  float* buf = p.use_smem ? smem + 36 + ((hs_words + 3) & ~3)
                          : p.scratch + static_cast<size_t>(blockIdx.x) * 2 * n;
  float* buf2 = buf + n;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = 1 << p.log2P;

  // H_K sign bits, one warp per 32-column word (coalesced reads of had).
  if (mix) {
    for (int wi = warp; wi < hs_words; wi += THREADS / 32) {
      const int a = wi / p.W, c = (wi - a * p.W) * 32 + lane;
      const bool neg = c < p.K && p.had[a * p.K + c] < 0.f;
      const uint32_t word = __ballot_sync(0xffffffffu, neg);
      if (lane == 0) hs[wi] = word;
    }
  }

  for (int row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = static_cast<const T*>(p.x) + static_cast<size_t>(row) * n;

    // 1. load (+ strides 1, 2, 4 of the FWHT)
    int logh = 0;
    if (p.vec) {
      for (int g = tid; g < (n >> 3); g += THREADS) {
        float v[8];
        load8<T>(xr + g * 8, v);
        if (p.do_had) butterflies<8>(v, P);
        float4* d = reinterpret_cast<float4*>(buf + g * 8);
        d[0] = make_float4(v[0], v[1], v[2], v[3]);
        d[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
      logh = p.log2P < 3 ? p.log2P : 3;
    } else {
      for (int i = tid; i < n; i += THREADS) buf[i] = to_float(xr[i]);
    }
    __syncthreads();

    float* y = buf;
    if (p.do_had) {
      // 2. remaining FWHT stages
      while (logh < p.log2P) {
        const int r = p.log2P - logh;
        if (r >= 3) {
          fwht_pass<8, THREADS>(buf, n, p.log2P, logh);
          logh += 3;
        } else if (r == 2) {
          fwht_pass<4, THREADS>(buf, n, p.log2P, logh);
          logh += 2;
        } else {
          fwht_pass<2, THREADS>(buf, n, p.log2P, logh);
          logh += 1;
        }
        __syncthreads();
      }
      // 3. dense K×K mix: y[c*P + b] = sum_a H_K[a, c] f[a*P + b]
      if (mix) {
        const int KG = (p.K + 3) >> 2;
        for (int it = tid; it < KG * P; it += THREADS) {
          const int cg = it >> p.log2P, b = it & (P - 1), c0 = cg * 4;
          const uint32_t* hw = hs + (c0 >> 5);
          const int sh = c0 & 31;
          float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
          for (int a = 0; a < p.K; ++a) {
            const float v = buf[(a << p.log2P) + b];
            const uint32_t bits = hw[a * p.W] >> sh;
            acc0 += (bits & 1u) ? -v : v;
            acc1 += (bits & 2u) ? -v : v;
            acc2 += (bits & 4u) ? -v : v;
            acc3 += (bits & 8u) ? -v : v;
          }
          buf2[(c0 << p.log2P) + b] = acc0;
          if (c0 + 1 < p.K) buf2[((c0 + 1) << p.log2P) + b] = acc1;
          if (c0 + 2 < p.K) buf2[((c0 + 2) << p.log2P) + b] = acc2;
          if (c0 + 3 < p.K) buf2[((c0 + 3) << p.log2P) + b] = acc3;
        }
        __syncthreads();
        y = buf2;
      }
    }

    // 4. per-token scale
    float amax = 0.f;
    if (p.vec) {
      for (int g = tid; g < (n >> 3); g += THREADS) {
        const float4 a = reinterpret_cast<const float4*>(y + g * 8)[0];
        const float4 b = reinterpret_cast<const float4*>(y + g * 8)[1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(finalize<T>(v[i], p)));
      }
    } else {
      for (int i = tid; i < n; i += THREADS) amax = fmaxf(amax, fabsf(finalize<T>(y[i], p)));
    }
    amax = block_max<THREADS>(amax, red);
    const float scale = fmaxf(amax * p.mult, 1e-12f);
    if (tid == 0) p.scales[row] = scale;

    // codes
    if (p.vec) {
      for (int g = tid; g < (n >> 3); g += THREADS) {
        const float4 a = reinterpret_cast<const float4*>(y + g * 8)[0];
        const float4 b = reinterpret_cast<const float4*>(y + g * 8)[1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        int q[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = quantize_sym(finalize<T>(v[i], p), scale, p.qmax);
        if (p.bits == 4) {
          uint32_t w = 0;
#pragma unroll
          for (int i = 0; i < 8; ++i) w |= (static_cast<uint32_t>(q[i]) & 0xFu) << (4 * i);
          reinterpret_cast<uint32_t*>(p.codes + static_cast<size_t>(row) * (n >> 1))[g] = w;
        } else {
          uint32_t lo = 0, hi = 0;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            lo |= (static_cast<uint32_t>(q[i]) & 0xFFu) << (8 * i);
            hi |= (static_cast<uint32_t>(q[i + 4]) & 0xFFu) << (8 * i);
          }
          reinterpret_cast<uint2*>(p.codes + static_cast<size_t>(row) * n)[g] =
              make_uint2(lo, hi);
        }
      }
    } else if (p.bits == 4) {
      uint8_t* cr = p.codes + static_cast<size_t>(row) * (n >> 1);
      for (int j = tid; j < (n >> 1); j += THREADS) {
        const int q0 = quantize_sym(finalize<T>(y[2 * j], p), scale, p.qmax);
        const int q1 = quantize_sym(finalize<T>(y[2 * j + 1], p), scale, p.qmax);
        cr[j] = static_cast<uint8_t>((q0 & 0xF) | ((q1 & 0xF) << 4));
      }
    } else {
      int8_t* cr = reinterpret_cast<int8_t*>(p.codes) + static_cast<size_t>(row) * n;
      for (int i = tid; i < n; i += THREADS)
        cr[i] = static_cast<int8_t>(quantize_sym(finalize<T>(y[i], p), scale, p.qmax));
    }
    __syncthreads();  // buffers and red are reused by the next row
  }
}

}  // namespace quarot_cuda
