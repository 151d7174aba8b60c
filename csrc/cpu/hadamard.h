// Online Hadamard x @ (H_K ⊗ H_2^p) / sqrt(n) on one float32 row, shared by the linear
// layers (R4, fused into quantization) and the KV4 cache (R3 on keys and queries); and
// the row maximum |x| both activation quantizers (per token, RRS per group) start from.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace quarot_cpu {

// Loops are written once (always_inline) and compiled into each ISA's wrapper
// (AVX512, AVX2, baseline x86-64), so that they vectorize on the CPU at hand.
#define QUAROT_INLINE inline __attribute__((always_inline))

// H_16 (Sylvester): entry (r, j) = (-1)^popcount(r & j).
struct H16 {
  float m[16][16];
  constexpr H16() : m() {
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 16; ++j) m[r][j] = (__builtin_popcount(r & j) & 1) ? -1.f : 1.f;
  }
};
static constexpr H16 kH16{};

// The first four butterfly stages (strides 1..8, which do not vectorize) of every 16
// elements of v[0, p) (p a multiple of 16) as one 16×16 product each: y = Σ_r v[r]·H16[r]
// in r order, one FMA per term. h16_blocks (quarot_cpu.cpp) runs it with 16-lane
// AVX-512 or two 8-lane AVX2 FMAs per term on the CPU at hand — the same FMAs lane by
// lane as this scalar loop, which compilers leave scalar once it is inlined.
static QUAROT_INLINE void h16_blocks_scalar(float* v, int64_t p) {
  for (int64_t i = 0; i < p; i += 16) {
    float y[16] = {};
    for (int r = 0; r < 16; ++r) {
      const float x = v[i + r];
      for (int j = 0; j < 16; ++j) y[j] = std::fma(x, kH16.m[r][j], y[j]);
    }
    std::memcpy(v + i, y, sizeof(y));
  }
}
void h16_blocks(float* v, int64_t p);

// Unnormalised Walsh–Hadamard transform of v[0, p), p a power of two.
static QUAROT_INLINE void fwht(float* v, int64_t p) {
  int64_t h = 1;
  if (p >= 16) {
    h16_blocks(v, p);
    h = 16;
  }
  for (; h < p; h *= 2)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

// buf: n floats (in/out); tmp: n floats of scratch; had_t: H_Kᵀ [kh, kh] row-major.
static QUAROT_INLINE void hadamard_row(float* buf, float* tmp, int64_t n, const float* had_t,
                                       int64_t kh) {
  const int64_t p = n / kh;
  for (int64_t c = 0; c < kh; ++c) fwht(buf + c * p, p);
  if (kh > 1) {
    // tmp[c·p + b] = Σ_a H[a, c] · buf[a·p + b]; had_t = Hᵀ (row c contiguous).
    // Columns in chunks of 32 (all kh source rows of a chunk stay in L1: 22 KB at
    // kh = 172), 8 outputs c at a time held in registers (16 zmm).
    constexpr int64_t kB = 32, kC = 8;
    const int64_t chunk = std::min(p, kB);
    for (int64_t b0 = 0; b0 < p; b0 += chunk) {
      int64_t c = 0;
      if (chunk == kB)
        for (; c + kC <= kh; c += kC) {
          float acc[kC][kB] = {};
          for (int64_t a = 0; a < kh; ++a) {
            const float* src = buf + a * p + b0;
            for (int64_t r = 0; r < kC; ++r) {
              const float h = had_t[(c + r) * kh + a];
              for (int64_t j = 0; j < kB; ++j) acc[r][j] = std::fma(h, src[j], acc[r][j]);
            }
          }
          for (int64_t r = 0; r < kC; ++r)
            std::memcpy(tmp + (c + r) * p + b0, acc[r], sizeof(acc[r]));
        }
      for (; c < kh; ++c) {
        float acc[kB] = {};
        for (int64_t a = 0; a < kh; ++a)
          for (int64_t j = 0; j < chunk; ++j)
            acc[j] = std::fma(had_t[c * kh + a], buf[a * p + b0 + j], acc[j]);
        std::memcpy(tmp + c * p + b0, acc, chunk * sizeof(float));
      }
    }
    std::memcpy(buf, tmp, n * sizeof(float));
  }
  const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) buf[i] *= s;
}

// Checks had_k (float32 [K, K], n = K·2^p) and returns K; 0 when absent.
int64_t check_had(const c10::optional<at::Tensor>& had_k, int64_t n);

// H_Kᵀ as hadamard_row wants it (row c contiguous); empty for kh = 0.
std::vector<float> transposed(const float* had, int64_t kh);

// max |v_i| over n floats: the scalar loop, and the same on 16 lanes (max is
// order-independent, so both give the same float).
static QUAROT_INLINE float absmax_scalar(const float* v, int64_t n) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  return amax;
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline float absmax_avx512(
    const float* v, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
  float amax = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  return amax;
}

}  // namespace quarot_cpu
