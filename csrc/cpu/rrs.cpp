// Rotated Runtime Smooth (RRS) on CPU: the integer GEMM applies one activation scale per
// (token, group of K channels) to each group's partial sum (activation.smooth in the
// checkpoint format, the quantizer's --smooth runtime).
//
// Math (identical to quarot::smooth_quantize / quarot::smooth_int_linear, the PyTorch
// reference ops in vllm_quarot/runtime/ops/reference.py):
//   v     = (Hadamard(x) when R4 is fused, else x) in float32, gathered in the order perm
//   m_g   = max_{j in g} |v_j|, s_g = max(m_g, 1e-12)   the smoothing factor of group g
//   a     = max(max_g(m_g / s_g) · clip/qmax, 1e-12)    the smoothed row's per-token scale
//   scale_g = a · s_g, code_j = clamp(round_half_even(v_j / scale_g), -qmax-1, qmax)
//   out   = ((Σ_g float(Σ_{k in g} code·w) · scale_g) · w_scale[n]) + bias[n]
// in float32, in this order, without FMA contraction (built with -ffp-contract=off; the
// vector kernels use separate multiply and add instructions).
//
// Integer factors (levels L > 0, activation.smooth.factor_levels):
//   t_g = m_g · clip/qmax, base = max(max_g t_g / L, 1e-12), f_g = clamp(rne(t_g / base), 1, L)
//   code_j = clamp(rne(v_j / (base · f_g)), -qmax-1, qmax) · f_g   (int8: |code| ≤ 128)
// one scale (base) and one code sum per row; the plain GEMM of quarot_cpu.cpp runs them.
//
// Next to quarot_cpu.cpp: its own vector GEMM, sharing the online Hadamard (hadamard.h),
// the run-time ISA choice (isa.h) and, for M >= 16 with groups of multiples of 64 on AMX
// machines, quarot_cpu.cpp's AMX driver with an RRS epilogue (amx.h). Weights are 4-bit
// codes, stored unsigned (w + 8) in blocks of 16 output channels × 8 k, input columns
// in the smoothing order (perm), so that vpdpbusd (u8 × s8) applies directly:
//   [N/16][K/8][16 channels × 4 bytes]; byte b of channel j holds k = 8i + b (low
//   nibble) and k = 8i + 4 + b (high nibble).
// The offset is removed per group with the group's code sum: Σ(w+8)·a − 8·Σa.
//
// Register tiles: AVX512-VNNI 4 rows × 32 channels, or 2 × 64 when M <= 2 (8 int32 +
// 8 float accumulators in zmm: the float ones stay in registers across the groups, so a
// group boundary costs one subtract, convert, multiply and add per accumulator); AVX2
// 2 rows × 16 channels (maddubs on nibbles ≤ 15: no int16 saturation; on 2 rows the pair
// sums are added in int16 over 4 k-steps, exact); scalar code reads the same bytes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "amx.h"
#include "hadamard.h"
#include "isa.h"

namespace quarot_cpu {
namespace rrs {

using at::Tensor;

constexpr int64_t kNB = 16;  // output channels per weight block
constexpr int64_t kF = 64;   // row stride of a tile's float results (up to 4 blocks)
constexpr float kEps = 1e-12f;

// ----------------------------------------------------------------------------
// Quantization of one row.

// The smoothing factors, the row's scale and the codes of v (one row, in the smoothing
// order): scalar code, and the same operations on 16 lanes below.
static QUAROT_INLINE void groups_scalar(const float* v, int64_t groups, int64_t gs, float ratio,
                                        int bits, float* gbuf, int8_t* q, float* scale,
                                        int32_t* asum) {
  float ymax = 0.f;  // max over the groups of m_g / s_g: the smoothed row's max |y|
  for (int64_t g = 0; g < groups; ++g) {
    const float mg = absmax_scalar(v + g * gs, gs);
    const float s = std::max(mg, kEps);
    gbuf[g] = s;
    ymax = std::max(ymax, mg / s);
  }
  const float a = std::max(ymax * ratio, kEps);
  const int qmax = (1 << (bits - 1)) - 1;
  const float lo = static_cast<float>(-qmax - 1), hi = static_cast<float>(qmax);
  for (int64_t g = 0; g < groups; ++g) {
    const float sc = a * gbuf[g];
    const float* vg = v + g * gs;
    int8_t* qg = q + g * gs;
    int32_t sum = 0;
    for (int64_t i = 0; i < gs; ++i) {
      float c = std::nearbyint(vg[i] / sc);
      c = std::min(std::max(c, lo), hi);
      qg[i] = static_cast<int8_t>(c);
      sum += static_cast<int32_t>(c);
    }
    asum[g] = sum;
    scale[g] = sc;
  }
}

// Integer factors (levels > 0): one row's codes × factors, its base scale and code sum.
static QUAROT_INLINE void groups_int_scalar(const float* v, int64_t groups, int64_t gs,
                                            float ratio, int bits, int levels, float* gbuf,
                                            int8_t* q, float* scale, int32_t* asum) {
  float tmax = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    gbuf[g] = absmax_scalar(v + g * gs, gs) * ratio;
    tmax = std::max(tmax, gbuf[g]);
  }
  const float base = std::max(tmax / static_cast<float>(levels), kEps);
  const int qmax = (1 << (bits - 1)) - 1;
  const float lo = static_cast<float>(-qmax - 1), hi = static_cast<float>(qmax);
  const float flv = static_cast<float>(levels);
  int32_t sum = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const float f = std::min(std::max(std::nearbyint(gbuf[g] / base), 1.f), flv);
    const float sc = base * f;
    const int32_t fi = static_cast<int32_t>(f);
    const float* vg = v + g * gs;
    int8_t* qg = q + g * gs;
    for (int64_t i = 0; i < gs; ++i) {
      float c = std::nearbyint(vg[i] / sc);
      c = std::min(std::max(c, lo), hi);
      const int32_t ci = static_cast<int32_t>(c) * fi;
      qg[i] = static_cast<int8_t>(ci);
      sum += ci;
    }
  }
  *scale = base;
  *asum = sum;
}

// gs a multiple of 16: IEEE division, round half to even (vrndscaleps = nearbyint),
// clamp; maxima are order-independent, so every result is the scalar code's.
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void groups_avx512(
    const float* v, int64_t groups, int64_t gs, float ratio, int bits, float* gbuf, int8_t* q,
    float* scale, int32_t* asum) {
  float ymax = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const float mg = absmax_avx512(v + g * gs, gs);
    const float s = std::max(mg, kEps);
    gbuf[g] = s;
    ymax = std::max(ymax, mg / s);
  }
  const float a = std::max(ymax * ratio, kEps);
  const int qmax = (1 << (bits - 1)) - 1;
  const __m512 lo = _mm512_set1_ps(static_cast<float>(-qmax - 1));
  const __m512 hi = _mm512_set1_ps(static_cast<float>(qmax));
  for (int64_t g = 0; g < groups; ++g) {
    const float sc = a * gbuf[g];
    const __m512 scv = _mm512_set1_ps(sc);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < gs; i += 16) {
      __m512 c = _mm512_div_ps(_mm512_loadu_ps(v + g * gs + i), scv);
      c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      c = _mm512_min_ps(_mm512_max_ps(c, lo), hi);
      const __m512i ci = _mm512_cvtps_epi32(c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * gs + i), _mm512_cvtepi32_epi8(ci));
      sum = _mm512_add_epi32(sum, ci);
    }
    asum[g] = _mm512_reduce_add_epi32(sum);
    scale[g] = sc;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void groups_int_avx512(
    const float* v, int64_t groups, int64_t gs, float ratio, int bits, int levels, float* gbuf,
    int8_t* q, float* scale, int32_t* asum) {
  float tmax = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    gbuf[g] = absmax_avx512(v + g * gs, gs) * ratio;
    tmax = std::max(tmax, gbuf[g]);
  }
  const float base = std::max(tmax / static_cast<float>(levels), kEps);
  const int qmax = (1 << (bits - 1)) - 1;
  const __m512 lo = _mm512_set1_ps(static_cast<float>(-qmax - 1));
  const __m512 hi = _mm512_set1_ps(static_cast<float>(qmax));
  const float flv = static_cast<float>(levels);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const float f = std::min(std::max(std::nearbyint(gbuf[g] / base), 1.f), flv);
    const __m512 scv = _mm512_set1_ps(base * f);
    const __m512 fv = _mm512_set1_ps(f);
    for (int64_t i = 0; i < gs; i += 16) {
      __m512 c = _mm512_div_ps(_mm512_loadu_ps(v + g * gs + i), scv);
      c = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      c = _mm512_min_ps(_mm512_max_ps(c, lo), hi);
      const __m512i ci = _mm512_cvtps_epi32(_mm512_mul_ps(c, fv));  // exact: |c·f| <= 128
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * gs + i), _mm512_cvtepi32_epi8(ci));
      sum = _mm512_add_epi32(sum, ci);
    }
  }
  *scale = base;
  *asum = _mm512_reduce_add_epi32(sum);
}

// dst[i] = src[perm[i]]: 16 lanes per vgatherdps (4x the scalar loop at K = 576).
__attribute__((target("avx512f"))) static void gather_avx512(const float* src, const int32_t* perm,
                                                           float* dst, int64_t k) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_i32gather_ps(_mm512_loadu_si512(perm + i), src, 4));
  for (; i < k; ++i) dst[i] = src[perm[i]];
}

template <typename T, bool AVX512>
static QUAROT_INLINE void row_body(const T* x, int64_t k, const float* had_t, int64_t kh,
                                   const int32_t* perm, float* buf, float* tmp, float* gbuf,
                                   int bits, float ratio, int64_t gs, int levels, int8_t* q,
                                   float* scale, int32_t* asum) {
  float* v = buf;
  for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(x[i]);
  if (had_t) hadamard_row(buf, tmp, k, had_t, kh);
  if (perm) {  // the float row in the smoothing order
    if (AVX512) {
      gather_avx512(buf, perm, tmp, k);
    } else {
      float* __restrict t = tmp;
      const float* __restrict b = buf;
      for (int64_t i = 0; i < k; ++i) t[i] = b[perm[i]];
    }
    v = tmp;
  }
  if (levels > 0) {
    if (AVX512 && gs % 16 == 0)
      groups_int_avx512(v, k / gs, gs, ratio, bits, levels, gbuf, q, scale, asum);
    else
      groups_int_scalar(v, k / gs, gs, ratio, bits, levels, gbuf, q, scale, asum);
  } else if (AVX512 && gs % 16 == 0) {
    groups_avx512(v, k / gs, gs, ratio, bits, gbuf, q, scale, asum);
  } else {
    groups_scalar(v, k / gs, gs, ratio, bits, gbuf, q, scale, asum);
  }
}

#define RRS_ROW_ARGS                                                                    \
  const T *x, int64_t k, const float *had_t, int64_t kh, const int32_t *perm, float *buf, \
      float *tmp, float *gbuf, int bits, float ratio, int64_t gs, int levels, int8_t *q,   \
      float *scale, int32_t *asum
#define RRS_ROW_CALL x, k, had_t, kh, perm, buf, tmp, gbuf, bits, ratio, gs, levels, q, scale, asum

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static void row_avx512(RRS_ROW_ARGS) {
  row_body<T, true>(RRS_ROW_CALL);
}
template <typename T>
__attribute__((target("avx2,fma,f16c"))) static void row_avx2(RRS_ROW_ARGS) {
  row_body<T, false>(RRS_ROW_CALL);
}
template <typename T>
static void row_scalar(RRS_ROW_ARGS) {
  row_body<T, false>(RRS_ROW_CALL);
}

static const int32_t* check_perm(const c10::optional<Tensor>& perm, int64_t k) {
  if (!perm.has_value()) return nullptr;
  const Tensor& p = *perm;
  TORCH_CHECK(p.dim() == 1 && p.size(0) == k && p.scalar_type() == at::kInt && p.is_contiguous(),
              "quarot_cpu.rrs: perm must be a contiguous int32 [", k, "] permutation");
  std::vector<char> seen(k, 0);
  const int32_t* d = p.data_ptr<int32_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(d[i] >= 0 && d[i] < k && !seen[d[i]], "quarot_cpu.rrs: perm is not a permutation");
    seen[d[i]] = 1;
  }
  return d;
}

std::tuple<Tensor, Tensor, Tensor> quantize(const Tensor& x, const c10::optional<Tensor>& had_k,
                                            const c10::optional<Tensor>& perm, int64_t bits,
                                            double clip_ratio, int64_t group_size,
                                            int64_t levels) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quarot_cpu.rrs_quantize: x must be contiguous 2-D");
  TORCH_CHECK(bits >= 2 && bits <= 8, "quarot_cpu.rrs_quantize: bits must be in [2, 8]");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(group_size >= 1 && k % group_size == 0, "quarot_cpu.rrs_quantize: group size ",
              group_size, " must divide K=", k);
  const int64_t groups = k / group_size;
  TORCH_CHECK(levels >= 0 && levels * (1 << (bits - 1)) <= 128,
              "quarot_cpu.rrs_quantize: levels ", levels, " at ", bits,
              " bits: codes times the factor must stay int8");
  const int64_t ogroups = levels ? 1 : groups;  // scales and code sums per row
  const int64_t kh = check_had(had_k, k);
  const std::vector<float> had_t = transposed(kh ? had_k->data_ptr<float>() : nullptr, kh);
  const float* had = kh ? had_t.data() : nullptr;
  const int32_t* pm = check_perm(perm, k);
  Tensor codes = at::empty({m, k}, x.options().dtype(at::kChar));
  Tensor scales = at::empty({m, ogroups}, x.options().dtype(at::kFloat));
  Tensor asums = at::empty({m, ogroups}, x.options().dtype(at::kInt));
  const float ratio = static_cast<float>(clip_ratio / ((1 << (bits - 1)) - 1));
  const int isa = current_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rrs_quantize", [&] {
    auto* fn = isa == kAvx512Vnni ? &row_avx512<scalar_t>
               : isa == kAvx2     ? &row_avx2<scalar_t>
                                  : &row_scalar<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int8_t* cp = codes.data_ptr<int8_t>();
    float* sp = scales.data_ptr<float>();
    int32_t* ap = asums.data_ptr<int32_t>();
    at::parallel_for(0, m, 4, [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(k), tmp(k), gbuf(groups);
      for (int64_t r = r0; r < r1; ++r)
        fn(xp + r * k, k, had, kh, pm, buf.data(), tmp.data(), gbuf.data(),
           static_cast<int>(bits), ratio, group_size, static_cast<int>(levels), cp + r * k,
           sp + r * ogroups, ap + r * ogroups);
    });
  });
  return {codes, scales, asums};
}

// ----------------------------------------------------------------------------
// Weight repacking (once at load).

Tensor repack_weight(const Tensor& codes, const c10::optional<Tensor>& perm) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "quarot_cpu.rrs_repack_weight: codes must be int8 [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(k % 8 == 0, "quarot_cpu.rrs_repack_weight: K=", k, " must be a multiple of 8");
  Tensor c = codes.contiguous();
  TORCH_CHECK(n == 0 || (c.min().item<int8_t>() >= -8 && c.max().item<int8_t>() <= 7),
              "quarot_cpu.rrs_repack_weight: codes must be 4-bit (in [-8, 7])");
  const int32_t* pm = check_perm(perm, k);
  const int64_t nblk = (n + kNB - 1) / kNB, kblk = k / 8;
  Tensor out = at::empty({nblk, kblk, 64}, codes.options().dtype(at::kByte));
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kb = 0; kb < kblk; ++kb)
        for (int64_t j = 0; j < kNB; ++j)
          for (int64_t b = 0; b < 4; ++b) {
            const int64_t row = nb * kNB + j;
            uint8_t v = 8 | (8 << 4);  // code 0 in padded channels
            if (row < n) {
              const int64_t k0 = kb * 8 + b, k1 = kb * 8 + 4 + b;
              const int8_t* w = src + row * k;
              const int lo = w[pm ? pm[k0] : k0] + 8, hi = w[pm ? pm[k1] : k1] + 8;
              v = static_cast<uint8_t>(lo | (hi << 4));
            }
            dst[((nb * kblk + kb) * kNB + j) * 4 + b] = v;
          }
  });
  return out;
}

// ----------------------------------------------------------------------------
// Tile kernels: rows [0, MR) of a (codes at a, row stride lda; scales xs and code sums
// asum at row stride groups) × NB blocks of 16 channels (w: block 0 at k = 0, blocks
// wstride bytes apart) -> f[MR][kF] float32 = Σ_g float(partial_g − 8·asum) · xs.

template <int MR, int NB>
static void tile_scalar(const int8_t* a, int64_t lda, const float* xs, const int32_t* asum,
                        int64_t groups, int64_t gs, const uint8_t* w, int64_t wstride, float* f) {
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NB * kNB; ++c) f[m * kF + c] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t acc[MR][NB * kNB] = {};
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 8)
      for (int jb = 0; jb < NB; ++jb) {
        const uint8_t* wk = w + jb * wstride + k * 8;
        for (int j = 0; j < kNB; ++j)
          for (int b = 0; b < 4; ++b) {
            const uint8_t v = wk[j * 4 + b];
            for (int m = 0; m < MR; ++m) {
              const int8_t* am = a + m * lda + k;
              acc[m][jb * kNB + j] += static_cast<int32_t>(v & 0xF) * am[b] +
                                      static_cast<int32_t>(v >> 4) * am[4 + b];
            }
          }
      }
    for (int m = 0; m < MR; ++m) {
      const int32_t corr = 8 * asum[m * groups + g];
      const float sc = xs[m * groups + g];
      for (int c = 0; c < NB * kNB; ++c) {
        const float p = static_cast<float>(acc[m][c] - corr) * sc;
        f[m * kF + c] = f[m * kF + c] + p;
      }
    }
  }
}

static inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile_vnni(
    const int8_t* a, int64_t lda, const float* xs, const int32_t* asum, int64_t groups,
    int64_t gs, const uint8_t* w, int64_t wstride, float* f) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int jb = 0; jb < NB; ++jb) facc[m][jb] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i r[MR][NB];
    for (int m = 0; m < MR; ++m)
      for (int jb = 0; jb < NB; ++jb) r[m][jb] = _mm512_setzero_si512();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
      __m512i lo[NB], hi[NB];
      for (int jb = 0; jb < NB; ++jb) {
        const __m512i v = _mm512_loadu_si512(w + jb * wstride + k * 8);
        lo[jb] = _mm512_and_si512(v, mask);
        hi[jb] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      }
      for (int m = 0; m < MR; ++m) {
        const __m512i a0 = _mm512_set1_epi32(load_i32(a + m * lda + k));
        const __m512i a1 = _mm512_set1_epi32(load_i32(a + m * lda + k + 4));
        for (int jb = 0; jb < NB; ++jb) {
          r[m][jb] = _mm512_dpbusd_epi32(r[m][jb], lo[jb], a0);
          r[m][jb] = _mm512_dpbusd_epi32(r[m][jb], hi[jb], a1);
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i corr = _mm512_set1_epi32(8 * asum[m * groups + g]);
      const __m512 sc = _mm512_set1_ps(xs[m * groups + g]);
      for (int jb = 0; jb < NB; ++jb) {
        const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(r[m][jb], corr)), sc);
        facc[m][jb] = _mm512_add_ps(facc[m][jb], p);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int jb = 0; jb < NB; ++jb) _mm512_storeu_ps(f + m * kF + jb * kNB, facc[m][jb]);
}

// AVX2, 2+ rows: the pair sums are added in int16 over runs of kAvx2I16Steps k-steps
// (isa.h: the bound that keeps them exact, shared with quarot_cpu.cpp's
// dot_avx2_w4_i16); vpmaddwd then widens once per run instead of once per k-step.

template <int MR, int NB>
__attribute__((target("avx2,fma"))) static void tile_avx2(const int8_t* a, int64_t lda,
                                                          const float* xs, const int32_t* asum,
                                                          int64_t groups, int64_t gs,
                                                          const uint8_t* w, int64_t wstride,
                                                          float* f) {
  // one block of 16 channels as two ymm halves (channels 0-7: bytes 0-31, 8-15: 32-63)
  static_assert(NB == 1, "the AVX2 tile is one block wide");
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[MR][2];
  for (int m = 0; m < MR; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i r[MR][2];
    for (int m = 0; m < MR; ++m) r[m][0] = r[m][1] = _mm256_setzero_si256();
    if constexpr (MR == 1) {  // one row (decode): bound by the weight stream, widen per k-step
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
        const uint8_t* wk = w + k * 8;
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * h));
          const __m256i lo = _mm256_and_si256(v, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          const __m256i a0 = _mm256_set1_epi32(load_i32(a + k));
          const __m256i a1 = _mm256_set1_epi32(load_i32(a + k + 4));
          const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), ones),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), ones));
          r[0][h] = _mm256_add_epi32(r[0][h], s);
        }
      }
    } else {  // 2+ rows: pair sums added in int16 over runs of k-steps, then widened
      for (int64_t kr = g * gs; kr < (g + 1) * gs; kr += kAvx2I16Steps * 8) {
        const int64_t kend = std::min((g + 1) * gs, kr + kAvx2I16Steps * 8);
        __m256i s[MR][2];
        for (int m = 0; m < MR; ++m) s[m][0] = s[m][1] = _mm256_setzero_si256();
        for (int64_t k = kr; k < kend; k += 8) {
          const uint8_t* wk = w + k * 8;
          __m256i lo[2], hi[2];
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * h));
            lo[h] = _mm256_and_si256(v, mask);
            hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          }
          for (int m = 0; m < MR; ++m) {
            const __m256i a0 = _mm256_set1_epi32(load_i32(a + m * lda + k));
            const __m256i a1 = _mm256_set1_epi32(load_i32(a + m * lda + k + 4));
            for (int h = 0; h < 2; ++h) {
              s[m][h] = _mm256_add_epi16(s[m][h], _mm256_maddubs_epi16(lo[h], a0));
              s[m][h] = _mm256_add_epi16(s[m][h], _mm256_maddubs_epi16(hi[h], a1));
            }
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int h = 0; h < 2; ++h)
            r[m][h] = _mm256_add_epi32(r[m][h], _mm256_madd_epi16(s[m][h], ones));
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m256i corr = _mm256_set1_epi32(8 * asum[m * groups + g]);
      const __m256 sc = _mm256_set1_ps(xs[m * groups + g]);
      for (int h = 0; h < 2; ++h) {
        const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r[m][h], corr)), sc);
        facc[m][h] = _mm256_add_ps(facc[m][h], p);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(f + m * kF + 8 * h, facc[m][h]);
}

using TileFn = void (*)(const int8_t*, int64_t, const float*, const int32_t*, int64_t, int64_t,
                        const uint8_t*, int64_t, float*);

struct TileShape {
  int64_t mr, nb;  // rows, 16-channel blocks per tile
};

// VNNI: 4 rows × 2 blocks (8 int32 + 8 float zmm accumulators); decode-sized calls
// (M <= 2) take 2 rows × 4 blocks, so that each broadcast code serves 64 channels.
static TileShape tile_shape(int isa, int64_t m) {
  if (isa == kAvx512Vnni) return m <= 2 ? TileShape{2, 4} : TileShape{4, 2};
  if (isa == kAvx2) return {2, 1};
  return {4, 2};
}

static TileFn pick_tile(int isa, int64_t mr, int64_t nb) {
#define RRS_CASES(fn, NBV)                       \
  switch (mr) {                                  \
    case 1: return fn<1, NBV>;                   \
    case 2: return fn<2, NBV>;                   \
    case 3: return fn<3, NBV>;                   \
    default: return fn<4, NBV>;                  \
  }
  if (isa == kAvx512Vnni) {
    if (nb == 1) RRS_CASES(tile_vnni, 1)
    if (nb == 2) RRS_CASES(tile_vnni, 2)
    if (nb == 3) return mr == 1 ? tile_vnni<1, 3> : tile_vnni<2, 3>;
    return mr == 1 ? tile_vnni<1, 4> : tile_vnni<2, 4>;
  }
  if (isa == kAvx2) {
    if (mr == 1) return tile_avx2<1, 1>;
    return tile_avx2<2, 1>;
  }
  if (nb == 1) RRS_CASES(tile_scalar, 1)
  RRS_CASES(tile_scalar, 2)
#undef RRS_CASES
}

// ----------------------------------------------------------------------------
// GEMM driver: work items are (channel tile, chunk of 64 rows), channel-major, over
// torch's intra-op threads.

template <typename T>
static void gemm_impl(const int8_t* a, const float* xs, const int32_t* asums, int64_t m,
                      int64_t k, int64_t groups, const uint8_t* w, const float* w_scale,
                      const float* bias, int64_t n, T* out) {
  if (amx_gemm_applies(m, k, groups)) {
    rrs_gemm_amx<T>(a, xs, asums, m, k, groups, w, w_scale, bias, n, out);
    return;
  }
  const int isa = current_isa();
  const TileShape ts = tile_shape(isa, m);
  const int64_t nblk = (n + kNB - 1) / kNB;
  const int64_t ntiles = (nblk + ts.nb - 1) / ts.nb;
  const int64_t mtiles = (m + ts.mr - 1) / ts.mr;
  const int64_t mchunk = std::max<int64_t>(1, 64 / ts.mr);  // row tiles per work item
  const int64_t mchunks = (mtiles + mchunk - 1) / mchunk;
  const int64_t wstride = k / 8 * 64;  // bytes per block of 16 channels
  const int64_t gs = k / groups;
  at::parallel_for(0, ntiles * mchunks, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float f[4 * kF];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t nt = item / mchunks, mc = item % mchunks;
      const int64_t b0 = nt * ts.nb, nb = std::min(ts.nb, nblk - b0);
      const int64_t c0 = b0 * kNB, nc = std::min(nb * kNB, n - c0);
      const uint8_t* wt = w + b0 * wstride;
      const int64_t mt1 = std::min(mtiles, (mc + 1) * mchunk);
      for (int64_t mt = mc * mchunk; mt < mt1; ++mt) {
        const int64_t r0 = mt * ts.mr, mr = std::min(ts.mr, m - r0);
        pick_tile(isa, mr, nb)(a + r0 * k, k, xs + r0 * groups, asums + r0 * groups, groups, gs,
                               wt, wstride, f);
        for (int64_t r = 0; r < mr; ++r) {
          T* o = out + (r0 + r) * n + c0;
          for (int64_t c = 0; c < nc; ++c) {
            float v = f[r * kF + c] * w_scale[c0 + c];
            if (bias) v = v + bias[c0 + c];
            o[c] = static_cast<T>(v);
          }
        }
      }
    }
  });
}

Tensor gemm(const Tensor& codes, const Tensor& scales, const Tensor& asums, const Tensor& w_packed,
            const Tensor& w_scale, const c10::optional<Tensor>& bias, int64_t n,
            at::ScalarType out_dtype) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kChar,
              "quarot_cpu.rrs_gemm: codes must be contiguous int8 [M, K]");
  const int64_t m = codes.size(0), k = codes.size(1);
  const int64_t nblk = (n + kNB - 1) / kNB;
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.is_contiguous() &&
                  w_packed.dim() == 3 && w_packed.size(0) == nblk && w_packed.size(1) == k / 8 &&
                  w_packed.size(2) == 64 && k % 8 == 0,
              "quarot_cpu.rrs_gemm: packed weight ", w_packed.sizes(), " does not match N=", n,
              " K=", k);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == m && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous(),
              "quarot_cpu.rrs_gemm: scales must be contiguous float32 [M, G]");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups >= 1 && k % groups == 0 && (k / groups) % 8 == 0,
              "quarot_cpu.rrs_gemm: the group size K/G must be a multiple of 8");
  TORCH_CHECK(asums.scalar_type() == at::kInt && asums.is_contiguous() && asums.dim() == 2 &&
                  asums.size(0) == m && asums.size(1) == groups,
              "quarot_cpu.rrs_gemm: asums must be int32 [M, G]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n,
              "quarot_cpu.rrs_gemm: weight scale must be float32 with N elements (per channel)");
  Tensor ws = w_scale.contiguous();
  Tensor out = at::empty({m, n}, codes.options().dtype(out_dtype));
  Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "quarot_cpu.rrs_gemm: bias must have N elements");
    b = bias->to(at::kFloat).contiguous();
  }
  if (m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "rrs_gemm", [&] {
    gemm_impl<scalar_t>(codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                        asums.data_ptr<int32_t>(), m, k, groups, w_packed.data_ptr<uint8_t>(),
                        ws.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, n,
                        out.data_ptr<scalar_t>());
  });
  return out;
}

// The whole layer: (R4 Hadamard +) smoothed quantization, then the GEMM.
Tensor linear(const Tensor& x, const c10::optional<Tensor>& had_k,
              const c10::optional<Tensor>& perm, const Tensor& w_packed, const Tensor& w_scale,
              const c10::optional<Tensor>& bias, int64_t n, int64_t a_bits, double clip_ratio,
              int64_t group_size, int64_t levels) {
  auto [codes, scales, asums] = quantize(x.contiguous(), had_k, perm, a_bits, clip_ratio,
                                         group_size, levels);
  if (levels)  // integer factors: per-token codes, the plain GEMM (w_scale from repack_scale)
    return quarot_cpu::gemm(codes, scales, asums, w_packed, w_scale, bias, n, 4, x.scalar_type());
  return gemm(codes, scales, asums, w_packed, w_scale, bias, n, x.scalar_type());
}

}  // namespace rrs
}  // namespace quarot_cpu

TORCH_LIBRARY_FRAGMENT(quarot_cpu, m) {
  m.def(
      "rrs_quantize(Tensor x, Tensor? had_k, Tensor? perm, int bits, float clip_ratio, "
      "int group_size, int levels=0) -> (Tensor, Tensor, Tensor)");
  m.def("rrs_repack_weight(Tensor codes, Tensor? perm) -> Tensor",
        &quarot_cpu::rrs::repack_weight);
  m.def(
      "rrs_gemm(Tensor codes, Tensor scales, Tensor asums, Tensor w_packed, Tensor w_scale, "
      "Tensor? bias, int n, ScalarType out_dtype) -> Tensor");
  m.def(
      "rrs_linear(Tensor x, Tensor? had_k, Tensor? perm, Tensor w_packed, Tensor w_scale, "
      "Tensor? bias, int n, int a_bits, float clip_ratio, int group_size, int levels=0) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(quarot_cpu, CPU, m) {
  m.impl("rrs_quantize", &quarot_cpu::rrs::quantize);
  m.impl("rrs_gemm", &quarot_cpu::rrs::gemm);
  m.impl("rrs_linear", &quarot_cpu::rrs::linear);
}
