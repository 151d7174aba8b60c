// Fast CPU kernels for QuaRot linear layers: fused online Hadamard + per-token
// quantization, and an integer GEMM over 4- or 8-bit weights repacked at load time.
//
// Math (identical to the PyTorch reference ops in vllm_quarot/runtime/ops/reference.py):
//   codes = clamp(round_half_even(x / s), -qmax-1, qmax), s = max(amax|x|·clip/qmax, eps)
//   out   = Σ_g (Σ_k codes·w)[g] · w_scale[n, g] · s[m] + bias[n]
// The weights are stored unsigned (w + 8 for 4 bits, w + 128 for 8 bits) so that the
// AVX512-VNNI instruction vpdpbusd (u8 × s8 → s32) applies directly; the offset is
// removed afterwards with the per-row sums of the activation codes: Σ(w+o)·a − o·Σa.
//
// Repacked weight layout, blocks of 16 output channels (N padded to 16):
//   4 bits: [N/16][K/8][16 channels × 4 bytes]; byte b of channel j holds
//           k = 8i + b (low nibble) and k = 8i + 4 + b (high nibble).
//   8 bits: [N/16][K/4][16 channels × 4 bytes]; byte b of channel j holds k = 4i + b.
// One 64-byte row is one zmm: 16 int32 lanes, each a 4-byte dot product with a
// broadcast group of 4 activation codes.
//
// Dispatch: AMX-INT8 (GEMMs of M >= 16 rows; AVX512-VNNI for the rest), AVX512-VNNI,
// AVX2 (maddubs on nibbles) or portable scalar, chosen from the CPU at load time;
// VLLM_QUAROT_CPU_ISA=amx|avx512_vnni|avx2|scalar forces one (tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "hadamard.h"
#include "isa.h"

namespace quarot_cpu {

using at::Tensor;

// ----------------------------------------------------------------------------
// ISA selection

static const char* isa_name(int isa) {
  switch (isa) {
    case kAmx: return "amx";
    case kAvx512Vnni: return "avx512_vnni";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

// AMX: the CPU has AMX-TILE and AMX-INT8, the OS saves tile state (XCR0 bits 17, 18),
// and Linux grants this process the tile data permission (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; idempotent, once per process).
static bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  }();
  return ok;
}

bool cpu_has(int isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kAmx: return cpu_has(kAvx512Vnni) && amx_usable();
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
}

static int parse_isa(const std::string& name) {
  for (int isa : {kAmx, kAvx512Vnni, kAvx2, kScalar})
    if (name == isa_name(isa)) return isa;
  TORCH_CHECK(false, "quarot_cpu: unknown ISA '", name,
              "' (expected amx, avx512_vnni, avx2 or scalar)");
}

static int initial_isa() {
  if (const char* env = std::getenv("VLLM_QUAROT_CPU_ISA")) {
    int isa = parse_isa(env);
    TORCH_CHECK(cpu_has(isa), "VLLM_QUAROT_CPU_ISA=", env, " but this CPU lacks it");
    return isa;
  }
  for (int isa : {kAmx, kAvx512Vnni, kAvx2})
    if (cpu_has(isa)) return isa;
  return kScalar;
}

static std::atomic<int> g_isa{initial_isa()};

int current_isa() {
  const int isa = g_isa.load();
  return isa == kAmx ? kAvx512Vnni : isa;
}

bool amx_enabled() { return g_isa.load() == kAmx; }

std::string isa() { return isa_name(g_isa.load()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int isa : {kAmx, kAvx512Vnni, kAvx2, kScalar})
    if (cpu_has(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::string set_isa(const std::string& name) {
  int isa = parse_isa(name);
  TORCH_CHECK(cpu_has(isa), "quarot_cpu: this CPU does not support ", name);
  return isa_name(g_isa.exchange(isa));
}

// ----------------------------------------------------------------------------
// Online Hadamard (hadamard.h) arguments.

int64_t check_had(const c10::optional<Tensor>& had_k, int64_t n) {
  if (!had_k.has_value()) return 0;
  const Tensor& h = *had_k;
  TORCH_CHECK(h.dim() == 2 && h.size(0) == h.size(1) && h.scalar_type() == at::kFloat &&
                  h.is_contiguous(),
              "quarot_cpu: had_k must be a contiguous float32 square matrix");
  const int64_t kh = h.size(0);
  TORCH_CHECK(kh > 0 && n % kh == 0, "quarot_cpu: size ", n, " is not a multiple of K=", kh);
  const int64_t p = n / kh;
  TORCH_CHECK((p & (p - 1)) == 0, "quarot_cpu: size ", n, " / K=", kh, " is not a power of two");
  return kh;
}

__attribute__((target("avx512f"))) static void h16_blocks_avx512(float* v, int64_t p) {
  for (int64_t i = 0; i < p; i += 16) {
    __m512 y = _mm512_setzero_ps();
    for (int r = 0; r < 16; ++r)
      y = _mm512_fmadd_ps(_mm512_set1_ps(v[i + r]), _mm512_loadu_ps(kH16.m[r]), y);
    _mm512_storeu_ps(v + i, y);
  }
}

__attribute__((target("avx2,fma"))) static void h16_blocks_avx2(float* v, int64_t p) {
  for (int64_t i = 0; i < p; i += 16) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int r = 0; r < 16; ++r) {
      const __m256 x = _mm256_set1_ps(v[i + r]);
      lo = _mm256_fmadd_ps(x, _mm256_loadu_ps(kH16.m[r]), lo);
      hi = _mm256_fmadd_ps(x, _mm256_loadu_ps(kH16.m[r] + 8), hi);
    }
    _mm256_storeu_ps(v + i, lo);
    _mm256_storeu_ps(v + i + 8, hi);
  }
}

void h16_blocks(float* v, int64_t p) {
  const int isa = current_isa();
  if (isa == kAvx512Vnni) h16_blocks_avx512(v, p);
  else if (isa == kAvx2) h16_blocks_avx2(v, p);
  else h16_blocks_scalar(v, p);
}

std::vector<float> transposed(const float* had, int64_t kh) {
  std::vector<float> t(kh * kh);
  for (int64_t a = 0; a < kh; ++a)
    for (int64_t c = 0; c < kh; ++c) t[c * kh + a] = had[a * kh + c];
  return t;
}

// Vector pieces of row_body: each returns/does exactly what the scalar loop after it
// would (max of |x| is order-independent; x / s, round half to even and the clamp are
// the same IEEE operations lane by lane). The generic versions are the scalar loops
// (the AVX2 and scalar wrappers keep them); the AVX-512 wrapper gets intrinsics.
// (absmax_scalar / absmax_avx512: hadamard.h, shared with the RRS quantizer.)
//
// Codes and per-group code sums of one row; false where this build has no vector path.
__attribute__((target("avx512f,avx512bw,avx512vl"))) static bool quantize_avx512(
    const float* buf, int64_t k, float s, float lo, float hi, int64_t groups, int8_t* q,
    int32_t* asum) {
  const int64_t gs = k / groups;
  const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 16) {
      const int64_t left = (g + 1) * gs - i;
      const __mmask16 mk = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, buf + i), vs);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
      const __m512i c = _mm512_maskz_mov_epi32(mk, _mm512_cvtps_epi32(v));
      sum = _mm512_add_epi32(sum, c);
      _mm_mask_storeu_epi8(q + i, mk, _mm512_cvtepi32_epi8(c));
    }
    asum[g] = _mm512_reduce_add_epi32(sum);
  }
  return true;
}

// One row: load as float32, optional Hadamard, then (when codes is set) quantize.
template <typename T, bool kVec512>
static QUAROT_INLINE void row_body(const T* x, int64_t k, const float* had, int64_t kh,
                                   float* buf, float* tmp, T* y, int bits, float ratio,
                                   const float* static_scale, int64_t groups, int8_t* q,
                                   float* scale, int32_t* asum) {
  for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(x[i]);
  if (had) hadamard_row(buf, tmp, k, had, kh);
  if (y) {
    for (int64_t i = 0; i < k; ++i) y[i] = static_cast<T>(buf[i]);
    return;
  }
  const int qmax = (1 << (bits - 1)) - 1;
  const float lo = static_cast<float>(-qmax - 1), hi = static_cast<float>(qmax);
  float s;
  if (static_scale) {
    s = *static_scale;
  } else {
    const float amax = kVec512 ? absmax_avx512(buf, k) : absmax_scalar(buf, k);
    s = std::max(amax * ratio, 1e-12f);
  }
  *scale = s;
  const int64_t gs = k / groups;
  if (kVec512 && quantize_avx512(buf, k, s, lo, hi, groups, q, asum)) return;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t sum = 0;
    for (int64_t i = g * gs; i < (g + 1) * gs; ++i) {
      float v = std::nearbyint(buf[i] / s);
      v = std::min(std::max(v, lo), hi);
      q[i] = static_cast<int8_t>(v);
      sum += static_cast<int32_t>(v);
    }
    asum[g] = sum;
  }
}

#define QUAROT_ROW_ARGS                                                                      \
  const T *x, int64_t k, const float *had, int64_t kh, float *buf, float *tmp, T *y, int bits, \
      float ratio, const float *static_scale, int64_t groups, int8_t *q, float *scale,       \
      int32_t *asum
#define QUAROT_ROW_CALL x, k, had, kh, buf, tmp, y, bits, ratio, static_scale, groups, q, scale, asum

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static void row_avx512(QUAROT_ROW_ARGS) {
  row_body<T, true>(QUAROT_ROW_CALL);
}
template <typename T>
__attribute__((target("avx2,fma,f16c"))) static void row_avx2(QUAROT_ROW_ARGS) {
  row_body<T, false>(QUAROT_ROW_CALL);
}
template <typename T>
static void row_scalar(QUAROT_ROW_ARGS) {
  row_body<T, false>(QUAROT_ROW_CALL);
}

template <typename T>
static void run_rows(const T* x, int64_t m, int64_t k, const float* had, int64_t kh, T* y,
                     int bits, double clip, const float* static_scale, int64_t groups,
                     int8_t* codes, float* scales, int32_t* asums) {
  const int isa = current_isa();
  auto* fn = isa == kAvx512Vnni ? &row_avx512<T> : isa == kAvx2 ? &row_avx2<T> : &row_scalar<T>;
  const float ratio = bits ? static_cast<float>(clip / ((1 << (bits - 1)) - 1)) : 0.f;
  const std::vector<float> had_t = transposed(had, kh);
  if (had) had = had_t.data();
  at::parallel_for(0, m, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(k), tmp(had ? k : 0);
    for (int64_t r = r0; r < r1; ++r)
      fn(x + r * k, k, had, kh, buf.data(), tmp.data(), y ? y + r * k : nullptr, bits, ratio,
         static_scale, groups, codes ? codes + r * k : nullptr, scales ? scales + r : nullptr,
         asums ? asums + r * groups : nullptr);
  });
}

// ----------------------------------------------------------------------------
// Fused (Hadamard +) per-token quantization.

std::tuple<Tensor, Tensor, Tensor> quantize(const Tensor& x, const c10::optional<Tensor>& had_k,
                                            int64_t bits, double clip_ratio,
                                            const c10::optional<Tensor>& static_scale,
                                            int64_t groups) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quarot_cpu.quantize: x must be contiguous 2-D");
  TORCH_CHECK(bits >= 2 && bits <= 8, "quarot_cpu.quantize: bits must be in [2, 8]");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(groups >= 1 && k % groups == 0, "quarot_cpu.quantize: groups must divide ", k);
  const int64_t kh = check_had(had_k, k);
  const float* ss = nullptr;
  if (static_scale.has_value()) {
    TORCH_CHECK(static_scale->numel() == 1 && static_scale->scalar_type() == at::kFloat,
                "quarot_cpu.quantize: static_scale must be one float32");
    ss = static_scale->data_ptr<float>();
  }
  Tensor codes = at::empty({m, k}, x.options().dtype(at::kChar));
  Tensor scales = at::empty({m, 1}, x.options().dtype(at::kFloat));
  Tensor asums = at::empty({m, groups}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize", [&] {
    run_rows<scalar_t>(x.data_ptr<scalar_t>(), m, k, kh ? had_k->data_ptr<float>() : nullptr,
                       kh, nullptr, bits, clip_ratio, ss, groups, codes.data_ptr<int8_t>(),
                       scales.data_ptr<float>(), asums.data_ptr<int32_t>());
  });
  return {codes, scales, asums};
}

Tensor hadamard(const Tensor& x, const Tensor& had_k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quarot_cpu.hadamard: x must be contiguous 2-D");
  const int64_t m = x.size(0), n = x.size(1);
  const int64_t kh = check_had(had_k, n);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hadamard", [&] {
    run_rows<scalar_t>(x.data_ptr<scalar_t>(), m, n, had_k.data_ptr<float>(), kh,
                       out.data_ptr<scalar_t>(), 0, 1.0, nullptr, 1, nullptr, nullptr, nullptr);
  });
  return out;
}

// ----------------------------------------------------------------------------
// Weight repacking.

static constexpr int64_t kNB = 16;   // output channels per block (one zmm of int32)
static constexpr int64_t kTileN = 4; // blocks per register tile (64 channels)
static constexpr int64_t kTileM = 4; // activation rows per register tile

static int64_t kstep(int64_t bits) { return bits == 4 ? 8 : 4; }

Tensor repack_weight(const Tensor& codes, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "quarot_cpu.repack_weight: bits must be 4 or 8");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "quarot_cpu.repack_weight: codes must be int8 [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1), ks = kstep(bits);
  TORCH_CHECK(k % ks == 0, "quarot_cpu.repack_weight: K=", k, " must be a multiple of ", ks);
  const int64_t nblk = (n + kNB - 1) / kNB, kblk = k / ks;
  Tensor c = codes.contiguous();
  Tensor out = at::empty({nblk, kblk, 64}, codes.options().dtype(at::kByte));
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int off = bits == 4 ? 8 : 128;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kb = 0; kb < kblk; ++kb)
        for (int64_t j = 0; j < kNB; ++j)
          for (int64_t b = 0; b < 4; ++b) {
            const int64_t row = nb * kNB + j;
            uint8_t v = 0;
            if (row < n) {
              const int8_t* w = src + row * k + kb * ks;
              if (bits == 4)
                v = static_cast<uint8_t>((w[b] + off) | ((w[4 + b] + off) << 4));
              else
                v = static_cast<uint8_t>(w[b] + off);
            } else if (bits == 4) {
              v = static_cast<uint8_t>(off | (off << 4));  // code 0
            } else {
              v = static_cast<uint8_t>(off);
            }
            dst[((nb * kblk + kb) * kNB + j) * 4 + b] = v;
          }
  });
  return out;
}

// Scales [N, G] -> [G, N padded to 16], zero padded, so one group's 16 lanes are contiguous.
Tensor repack_scale(const Tensor& scale) {
  TORCH_CHECK(scale.dim() == 2, "quarot_cpu.repack_scale: scale must be [N, G]");
  const int64_t n = scale.size(0), npad = (n + kNB - 1) / kNB * kNB;
  Tensor out = at::zeros({scale.size(1), npad}, scale.options().dtype(at::kFloat));
  out.narrow(1, 0, n).copy_(scale.t());
  return out;
}

// ----------------------------------------------------------------------------
// Integer micro-kernels. Each computes, for MR rows and NB blocks (16·NB channels),
// the int32 dot products of one K range [k0, k1) into acc[MR][64] (plain memory).
// w points at block 0's row for k = 0; blocks are wstride bytes apart.

// The vector dot kernels stream NB blocks of weights, 64 bytes of each per k-step; a
// software prefetch kPrefetchBytes ahead in each stream raised a 1.1B batch-1 decode
// step's linear layers (every layer read once, from DRAM) from ~79 % to ~83 % of the
// read bandwidth on AVX-512 and from ~69 % to ~75 % on AVX2 (benchmarks/cpu_layers.py
// --decode 1.1b, Sapphire Rapids); a prefetch past a buffer's end is harmless.
static constexpr int64_t kPrefetchBytes = 4096;
template <int NB>
static QUAROT_INLINE void prefetch_blocks(const uint8_t* w, int64_t wstride, int64_t off) {
  for (int jb = 0; jb < NB; ++jb)
    _mm_prefetch(reinterpret_cast<const char*>(w + jb * wstride + off + kPrefetchBytes),
                 _MM_HINT_T0);
}

template <int MR, int NB>
static void dot_scalar(const int8_t* a, int64_t lda, const uint8_t* w, int64_t wstride,
                       int64_t k0, int64_t k1, int64_t bits, int32_t* acc) {
  const int64_t ks = kstep(bits);
  for (int m = 0; m < MR; ++m)
    for (int64_t c = 0; c < NB * kNB; ++c) acc[m * 64 + c] = 0;
  for (int64_t k = k0; k < k1; k += ks) {
    for (int jb = 0; jb < NB; ++jb) {
      const uint8_t* wk = w + jb * wstride + (k / ks) * 64;
      for (int64_t j = 0; j < kNB; ++j)
        for (int b = 0; b < 4; ++b) {
          const uint8_t v = wk[j * 4 + b];
          for (int m = 0; m < MR; ++m) {
            const int8_t* am = a + m * lda + k;
            int32_t& dst = acc[m * 64 + jb * kNB + j];
            if (bits == 4)
              dst += static_cast<int32_t>(v & 0xF) * am[b] + static_cast<int32_t>(v >> 4) * am[4 + b];
            else
              dst += static_cast<int32_t>(v) * am[b];
          }
        }
    }
  }
}

static inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 4-bit weights on AVX2 for tiles of 2+ rows (batched decode, prefill): vpmaddubsw's
// pair sums are added in int16 over kAvx2I16Steps k-steps before one vpmaddwd widens them to
// int32. The widening otherwise takes every other slot of the vector multipliers (the
// same pipes run both): benchmarks/cpu_peak.py's avx2_maddubs_i16 against avx2_maddubs.
// Exact (the bound: isa.h, kAvx2I16Steps) — the same integers as dot_scalar.
// Blocks one after another (each block's K range in one stream), MR rows × 16 channels of
// int16 sums in 8 registers, the k-step's 64 weight bytes unpacked into 4 (and the mask and
// one row's two activation broadcasts: 15 of 16 ymm); the int32 sums go to acc after each
// run of k-steps.
template <int MR, int NB>
__attribute__((target("avx2,fma"))) static void dot_avx2_w4_i16(const int8_t* a, int64_t lda,
                                                                const uint8_t* w,
                                                                int64_t wstride, int64_t k0,
                                                                int64_t k1, int32_t* acc) {
  constexpr int64_t ks = 8;  // kstep(4)
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int jb = 0; jb < NB; ++jb) {
    const uint8_t* wb = w + jb * wstride;
    int32_t* accb = acc + jb * kNB;
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(accb + m * 64 + 8 * h),
                            _mm256_setzero_si256());
    for (int64_t kr = k0; kr < k1; kr += kAvx2I16Steps * ks) {
      const int64_t kend = std::min(k1, kr + kAvx2I16Steps * ks);
      __m256i s[MR][2];
      for (int m = 0; m < MR; ++m) s[m][0] = s[m][1] = _mm256_setzero_si256();
      for (int64_t k = kr; k < kend; k += ks) {
        const uint8_t* wk = wb + (k / ks) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchBytes), _MM_HINT_T0);
        __m256i lo[2], hi[2];  // both halves unpacked first: one broadcast per row serves both
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * h));
          lo[h] = _mm256_and_si256(v, mask);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        }
        for (int m = 0; m < MR; ++m) {
          const int8_t* am = a + m * lda + k;
          const __m256i a0 = _mm256_set1_epi32(load_i32(am)), a1 = _mm256_set1_epi32(load_i32(am + 4));
          for (int h = 0; h < 2; ++h) {
            s[m][h] = _mm256_add_epi16(s[m][h], _mm256_maddubs_epi16(lo[h], a0));
            s[m][h] = _mm256_add_epi16(s[m][h], _mm256_maddubs_epi16(hi[h], a1));
          }
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < 2; ++h) {
          __m256i* dst = reinterpret_cast<__m256i*>(accb + m * 64 + 8 * h);
          _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst),
                                                    _mm256_madd_epi16(s[m][h], ones)));
        }
    }
  }
}

// 8-bit weights (u = w + 128 = 16·hi + lo), tiles of 2+ rows: the low and the high
// nibbles' pair sums each added in int16 over kI16Steps8 k-steps (one k-step adds at most
// 2·15·128 = 3840 to a lane, 8 k-steps 30720 < 32768: exact), then widened, the high
// sums shifted by 4. Each 32-byte half of a block row in its own pass (8 channels:
// MR × 2 int16 sums in 8 registers).
static constexpr int64_t kI16Steps8 = 8;
template <int MR, int NB>
__attribute__((target("avx2,fma"))) static void dot_avx2_w8_i16(const int8_t* a, int64_t lda,
                                                                const uint8_t* w,
                                                                int64_t wstride, int64_t k0,
                                                                int64_t k1, int32_t* acc) {
  constexpr int64_t ks = 4;  // kstep(8)
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int jb = 0; jb < NB; ++jb) {
    const uint8_t* wb = w + jb * wstride;
    for (int h = 0; h < 2; ++h) {
      int32_t* acch = acc + jb * kNB + 8 * h;
      for (int m = 0; m < MR; ++m)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acch + m * 64), _mm256_setzero_si256());
      for (int64_t kr = k0; kr < k1; kr += kI16Steps8 * ks) {
        const int64_t kend = std::min(k1, kr + kI16Steps8 * ks);
        __m256i sl[MR], sh[MR];
        for (int m = 0; m < MR; ++m) sl[m] = sh[m] = _mm256_setzero_si256();
        for (int64_t k = kr; k < kend; k += ks) {
          const uint8_t* wk = wb + (k / ks) * 64;
          if (h == 0)
            _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchBytes), _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * h));
          const __m256i lo = _mm256_and_si256(v, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int m = 0; m < MR; ++m) {
            const __m256i a0 = _mm256_set1_epi32(load_i32(a + m * lda + k));
            sl[m] = _mm256_add_epi16(sl[m], _mm256_maddubs_epi16(lo, a0));
            sh[m] = _mm256_add_epi16(sh[m], _mm256_maddubs_epi16(hi, a0));
          }
        }
        for (int m = 0; m < MR; ++m) {
          __m256i* dst = reinterpret_cast<__m256i*>(acch + m * 64);
          const __m256i wide = _mm256_add_epi32(
              _mm256_madd_epi16(sl[m], ones), _mm256_slli_epi32(_mm256_madd_epi16(sh[m], ones), 4));
          _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), wide));
        }
      }
    }
  }
}

// One row (batch-1 decode): vpmaddubsw + vpmaddwd + vpaddd per k-step. Two ymm halves
// (channels 0-7, 8-15) per block. maddubs(u8 nibble ≤ 15, s8) pairs stay within int16;
// 8-bit weights are split into nibbles: u = 16·hi + lo.
template <int NB>
__attribute__((target("avx2,fma"))) static void dot_avx2_row(const int8_t* a, const uint8_t* w,
                                                             int64_t wstride, int64_t k0,
                                                             int64_t k1, int64_t bits,
                                                             int32_t* acc) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i r[NB][2];
  for (int jb = 0; jb < NB; ++jb) r[jb][0] = r[jb][1] = _mm256_setzero_si256();
  const int64_t ks = kstep(bits);
  for (int64_t k = k0; k < k1; k += ks) {
    prefetch_blocks<NB>(w, wstride, (k / ks) * 64);
    const __m256i a0 = _mm256_set1_epi32(load_i32(a + k));
    for (int jb = 0; jb < NB; ++jb) {
      const uint8_t* wk = w + jb * wstride + (k / ks) * 64;
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32 * h));
        const __m256i lo = _mm256_and_si256(v, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        __m256i s;
        if (bits == 4) {
          const __m256i a1 = _mm256_set1_epi32(load_i32(a + k + 4));
          s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), ones),
                               _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), ones));
        } else {
          s = _mm256_add_epi32(
              _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), ones),
              _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi, a0), ones), 4));
        }
        r[jb][h] = _mm256_add_epi32(r[jb][h], s);
      }
    }
  }
  for (int jb = 0; jb < NB; ++jb)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + jb * kNB + 8 * h), r[jb][h]);
}

// One row (batch-1 decode) streams from memory at the bandwidth's pace either way; the
// int16 sums serve the compute-bound tiles of 2+ rows.
template <int MR, int NB>
static void dot_avx2(const int8_t* a, int64_t lda, const uint8_t* w, int64_t wstride,
                     int64_t k0, int64_t k1, int64_t bits, int32_t* acc) {
  if constexpr (MR == 1) {
    dot_avx2_row<NB>(a, w, wstride, k0, k1, bits, acc);
  } else if (bits == 4) {
    dot_avx2_w4_i16<MR, NB>(a, lda, w, wstride, k0, k1, acc);
  } else {
    dot_avx2_w8_i16<MR, NB>(a, lda, w, wstride, k0, k1, acc);
  }
}

template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void dot_vnni(
    const int8_t* a, int64_t lda, const uint8_t* w, int64_t wstride, int64_t k0, int64_t k1,
    int64_t bits, int32_t* acc) {
  __m512i r[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int jb = 0; jb < NB; ++jb) r[m][jb] = _mm512_setzero_si512();
  if (bits == 4) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int64_t k = k0; k < k1; k += 8) {
      __m512i lo[NB], hi[NB];
      prefetch_blocks<NB>(w, wstride, k * 8);
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
  } else {
    for (int64_t k = k0; k < k1; k += 4) {
      __m512i v[NB];
      prefetch_blocks<NB>(w, wstride, k * 16);
      for (int jb = 0; jb < NB; ++jb) v[jb] = _mm512_loadu_si512(w + jb * wstride + k * 16);
      for (int m = 0; m < MR; ++m) {
        const __m512i a0 = _mm512_set1_epi32(load_i32(a + m * lda + k));
        for (int jb = 0; jb < NB; ++jb) r[m][jb] = _mm512_dpbusd_epi32(r[m][jb], v[jb], a0);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int jb = 0; jb < NB; ++jb) _mm512_storeu_si512(acc + m * 64 + jb * kNB, r[m][jb]);
}

using DotFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t,
                       int32_t*);

template <int MR>
static DotFn pick_nb(int isa, int64_t nb) {
#define QUAROT_NB(fn)                                   \
  switch (nb) {                                         \
    case 1: return fn<MR, 1>;                           \
    case 2: return fn<MR, 2>;                           \
    case 3: return fn<MR, 3>;                           \
    default: return fn<MR, 4>;                          \
  }
  if (isa == kAvx512Vnni) QUAROT_NB(dot_vnni)
  if (isa == kAvx2) QUAROT_NB(dot_avx2)
  QUAROT_NB(dot_scalar)
#undef QUAROT_NB
}

static DotFn pick_dot(int isa, int64_t mr, int64_t nb) {
  switch (mr) {
    case 1: return pick_nb<1>(isa, nb);
    case 2: return pick_nb<2>(isa, nb);
    case 3: return pick_nb<3>(isa, nb);
    default: return pick_nb<4>(isa, nb);
  }
}

// ----------------------------------------------------------------------------
// Epilogue, shared by every path. Per K-group g, a tile's int32 partial sums become float:
//   facc[r][c] (+)= (acc[r][c] − off·asum[r][g]) · w_scale[g][c]
// and after the last group: out[r][c] = facc[r][c] · a_scale[r] (+ bias[c]). The same
// float operations in the same order as quarot::int_linear, hence bit-exact.
// Hook for Rotated Runtime Smooth: a float factor per (row, K-group) multiplies the
// group's term in the first line, where w_scale[g][c] is applied (see csrc/README.md).
struct Epi {
  const float* a_scale;  // [M]
  const int32_t* asums;  // [M, G]
  const float* w_scale;  // [G, npad]
  const float* bias;     // [N] or null
  int64_t groups, npad, n;
  int32_t off;  // 8 (4-bit weights stored w + 8) or 128 (8-bit)
  // Rotated Runtime Smooth (rrs.cpp): one activation scale per (row, group) [M, G],
  // applied to each group's sum; w_scale is then per channel [N] and a_scale unused
  const float* row_gscale = nullptr;
};

// float -> T for a run of outputs, as c10's conversions round (bf16: nearest even, NaN
// -> 0x7FC0), written branch-free so that the loop vectorizes.
static QUAROT_INLINE void store_out(const float* v, int64_t w, float* o) {
  for (int64_t c = 0; c < w; ++c) o[c] = v[c];
}
static QUAROT_INLINE void store_out(const float* v, int64_t w, c10::BFloat16* o) {
  uint16_t* d = reinterpret_cast<uint16_t*>(o);
  for (int64_t c = 0; c < w; ++c) {
    uint32_t u;
    std::memcpy(&u, v + c, 4);
    const uint16_t r = static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFFu) >> 16);
    d[c] = v[c] != v[c] ? static_cast<uint16_t>(0x7FC0) : r;
  }
}
static QUAROT_INLINE void store_out(const float* v, int64_t w, c10::Half* o) {
  for (int64_t c = 0; c < w; ++c) o[c] = static_cast<c10::Half>(v[c]);
}
static QUAROT_INLINE void store_out(const float* v, int64_t w, double* o) {
  for (int64_t c = 0; c < w; ++c) o[c] = v[c];
}

// acc: mr × nc int32 (row stride lda); facc: float scratch (row stride ldf), used only
// when groups > 1; rows r0.., channels c0...
template <typename T>
static QUAROT_INLINE void epi_body(const Epi& e, const int32_t* acc, int64_t lda, float* facc,
                                   int64_t ldf, int64_t r0, int64_t mr, int64_t c0, int64_t nc,
                                   int64_t g, T* out) {
  const float* ws = e.w_scale + g * e.npad + c0;
  const float* b = e.bias ? e.bias + c0 : nullptr;
  const bool last = g == e.groups - 1;
  for (int64_t r = 0; r < mr; ++r) {
    const int32_t corr = e.off * e.asums[(r0 + r) * e.groups + g];
    const int32_t* ar = acc + r * lda;
    float* fr = facc + r * ldf;
    if (!last) {
      if (g == 0)
        for (int64_t c = 0; c < nc; ++c) fr[c] = static_cast<float>(ar[c] - corr) * ws[c];
      else
        for (int64_t c = 0; c < nc; ++c) fr[c] += static_cast<float>(ar[c] - corr) * ws[c];
      continue;
    }
    const float s = e.a_scale[r0 + r];
    T* o = out + (r0 + r) * e.n + c0;
    float v[64];
    for (int64_t c0b = 0; c0b < nc; c0b += 64) {  // chunks of 64: a vectorizable temp
      const int64_t w = std::min<int64_t>(64, nc - c0b);
      if (g == 0)
        for (int64_t c = 0; c < w; ++c) v[c] = static_cast<float>(ar[c0b + c] - corr) * ws[c0b + c];
      else
        for (int64_t c = 0; c < w; ++c)
          v[c] = fr[c0b + c] + static_cast<float>(ar[c0b + c] - corr) * ws[c0b + c];
      for (int64_t c = 0; c < w; ++c) v[c] *= s;
      if (b)
        for (int64_t c = 0; c < w; ++c) v[c] += b[c0b + c];
      store_out(v, w, o + c0b);
    }
  }
}

#define QUAROT_EPI_ARGS                                                                   \
  const Epi &e, const int32_t *acc, int64_t lda, float *facc, int64_t ldf, int64_t r0, \
      int64_t mr, int64_t c0, int64_t nc, int64_t g, T *out
#define QUAROT_EPI_CALL e, acc, lda, facc, ldf, r0, mr, c0, nc, g, out

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static void epi_avx512(QUAROT_EPI_ARGS) {
  epi_body<T>(QUAROT_EPI_CALL);
}

// 16 float results into float or bf16 outputs (bf16: round to nearest even, NaN ->
// 0x7FC0, as c10 converts), the lanes of mk only.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) static QUAROT_INLINE void store16(
    T* o, __mmask16 mk, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(o, mk, v);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias16 = _mm512_add_epi32(
        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, bias16), 16);
    h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), h, _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(o), mk, _mm512_cvtepi32_epi16(h));
  }
}

// Lanes [c, c + 16) of a row of nc outputs that exist, and their group sums in float:
// int32 sum − corr (the stored-weight offset times the row's code sum).
__attribute__((target("avx512f,avx512bw,avx512vl"))) static QUAROT_INLINE __mmask16 lanes16(
    int64_t nc, int64_t c) {
  return nc - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nc - c)) - 1);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) static QUAROT_INLINE __m512 sums16(
    const int32_t* ar, __mmask16 mk, __m512i corr) {
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_maskz_loadu_epi32(mk, ar), corr));
}

// The same operations on 16 lanes at a time, for float and bf16 outputs (the models'
// dtypes): int32 − corr → float, × w_scale, (+ the earlier groups' sum), × a_scale,
// + bias, then round to nearest even into bf16 (NaN -> 0x7FC0) as c10 does.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void epi_avx512_vec(QUAROT_EPI_ARGS) {
  const float* ws = e.w_scale + g * e.npad + c0;
  const float* b = e.bias ? e.bias + c0 : nullptr;
  const bool last = g == e.groups - 1;
  for (int64_t r = 0; r < mr; ++r) {
    const __m512i corr = _mm512_set1_epi32(e.off * e.asums[(r0 + r) * e.groups + g]);
    const __m512 s = _mm512_set1_ps(e.a_scale[r0 + r]);
    const int32_t* ar = acc + r * lda;
    float* fr = facc + r * ldf;
    T* o = out + (r0 + r) * e.n + c0;
    for (int64_t c = 0; c < nc; c += 16) {
      const __mmask16 mk = lanes16(nc, c);
      __m512 v = _mm512_mul_ps(sums16(ar + c, mk, corr), _mm512_maskz_loadu_ps(mk, ws + c));
      if (g > 0) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, fr + c), v);
      if (!last) {
        _mm512_mask_storeu_ps(fr + c, mk, v);
        continue;
      }
      v = _mm512_mul_ps(v, s);
      if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, b + c));
      store16<T>(o + c, mk, v);
    }
  }
}
template <typename T>
__attribute__((target("avx2,fma,f16c"))) static void epi_avx2(QUAROT_EPI_ARGS) {
  epi_body<T>(QUAROT_EPI_CALL);
}
template <typename T>
static void epi_scalar(QUAROT_EPI_ARGS) {
  epi_body<T>(QUAROT_EPI_CALL);
}

template <typename T>
using EpiFn = void (*)(QUAROT_EPI_ARGS);

template <typename T>
static EpiFn<T> pick_epi(int isa) {
  if (isa == kAvx512Vnni) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)
      return &epi_avx512_vec<T>;
    return &epi_avx512<T>;
  }
  return isa == kAvx2 ? &epi_avx2<T> : &epi_scalar<T>;
}

// RRS epilogue (Epi::row_gscale), in the order of rrs.cpp's tiles and of the reference
// quarot::smooth_int_linear: f = 0 + Σ_g float(sum_g − 8·asum_g) · xs[r, g], then
// f · w_scale[c] (+ bias[c]).
template <typename T>
static QUAROT_INLINE void epi_rrs_body(const Epi& e, const int32_t* acc, int64_t lda, float* facc,
                                       int64_t ldf, int64_t r0, int64_t mr, int64_t c0,
                                       int64_t nc, int64_t g, T* out) {
  const bool last = g == e.groups - 1;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t rg = (r0 + r) * e.groups + g;
    const int32_t corr = e.off * e.asums[rg];
    const float xs = e.row_gscale[rg];
    const int32_t* ar = acc + r * lda;
    float* fr = facc + r * ldf;
    for (int64_t c = 0; c < nc; ++c) {
      const float p = static_cast<float>(ar[c] - corr) * xs;
      fr[c] = (g == 0 ? 0.f : fr[c]) + p;
    }
    if (!last) continue;
    T* o = out + (r0 + r) * e.n + c0;
    for (int64_t c = 0; c < nc; ++c) {
      float v = fr[c] * e.w_scale[c0 + c];
      if (e.bias) v = v + e.bias[c0 + c];
      o[c] = static_cast<T>(v);
    }
  }
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void epi_rrs_avx512(QUAROT_EPI_ARGS) {
  epi_rrs_body<T>(QUAROT_EPI_CALL);
}

// The same on 16 lanes (float and bf16 outputs; bf16 rounded as c10 does).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void epi_rrs_avx512_vec(
    QUAROT_EPI_ARGS) {
  const float* ws = e.w_scale + c0;
  const float* b = e.bias ? e.bias + c0 : nullptr;
  const bool last = g == e.groups - 1;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t rg = (r0 + r) * e.groups + g;
    const __m512i corr = _mm512_set1_epi32(e.off * e.asums[rg]);
    const __m512 xs = _mm512_set1_ps(e.row_gscale[rg]);
    const int32_t* ar = acc + r * lda;
    float* fr = facc + r * ldf;
    T* o = out + (r0 + r) * e.n + c0;
    for (int64_t c = 0; c < nc; c += 16) {
      const __mmask16 mk = lanes16(nc, c);
      const __m512 p = _mm512_mul_ps(sums16(ar + c, mk, corr), xs);
      __m512 v = _mm512_add_ps(g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, fr + c), p);
      if (!last) {
        _mm512_mask_storeu_ps(fr + c, mk, v);
        continue;
      }
      v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, ws + c));
      if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, b + c));
      store16<T>(o + c, mk, v);
    }
  }
}

template <typename T>
static EpiFn<T> pick_rrs_epi() {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)
    return &epi_rrs_avx512_vec<T>;
  return &epi_rrs_avx512<T>;
}

// Work items [0, n) handed out one at a time, in order, to whichever thread asks: on a
// shared machine a thread that loses its core holds back only its current item (static
// halves would make the other thread wait for the slower one at the join).
class ItemQueue {
 public:
  explicit ItemQueue(int64_t n) : n_(n) {}
  int64_t workers() const { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_)); }
  int64_t next() {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    return i < n_ ? i : -1;
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> next_{0};
};

// ----------------------------------------------------------------------------
// Vector GEMM driver (AVX512-VNNI, AVX2, scalar): register tiles of kTileM rows ×
// kTileN·16 channels; work items are (channel tile, chunk of row tiles), channel-major
// (consecutive items share a channel tile's weights), handed out by an ItemQueue.

template <typename T>
static void gemm_vector(const Epi& e, const int8_t* a, int64_t m, int64_t k, const uint8_t* w,
                        int64_t bits, T* out) {
  const int isa = current_isa();
  const EpiFn<T> epi = pick_epi<T>(isa);
  const int64_t nblk = e.npad / kNB, ntiles = (nblk + kTileN - 1) / kTileN;
  const int64_t mtiles = (m + kTileM - 1) / kTileM;
  const int64_t mchunk = 16;  // row tiles per work item (64 rows)
  const int64_t mchunks = (mtiles + mchunk - 1) / mchunk;
  const int64_t wstride = k / kstep(bits) * 64;  // bytes per block of 16 channels
  const int64_t gs = k / e.groups;
  ItemQueue queue(ntiles * mchunks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    alignas(64) int32_t acc[kTileM * 64];
    alignas(64) float facc[kTileM * 64];
    for (int64_t item; (item = queue.next()) >= 0;) {
      const int64_t nt = item / mchunks, mc = item % mchunks;
      const int64_t b0 = nt * kTileN, nb = std::min(kTileN, nblk - b0);
      const int64_t c0 = b0 * kNB, nc = std::min(nb * kNB, e.n - c0);
      const uint8_t* wt = w + b0 * wstride;
      const int64_t mt1 = std::min(mtiles, (mc + 1) * mchunk);
      for (int64_t mt = mc * mchunk; mt < mt1; ++mt) {
        const int64_t r0 = mt * kTileM, mr = std::min(kTileM, m - r0);
        const DotFn dot = pick_dot(isa, mr, nb);
        for (int64_t g = 0; g < e.groups; ++g) {
          dot(a + r0 * k, k, wt, wstride, g * gs, (g + 1) * gs, bits, acc);
          epi(e, acc, 64, facc, 64, r0, mr, c0, nc, g, out);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------
// AMX-INT8 driver, for M >= kAmxMinRows and group sizes that are multiples of 64.
//
// Tiles (tmm0-7): C00 C01 C10 C11 (int32, 16 rows × 16 channels each) = 32 rows × 32
// channels; A0 A1 (16 rows × 64 activation codes); B0 B1 (64 k × 16 channels in AMX's
// VNNI layout: row i holds k = 4i..4i+3 of each channel — exactly one 8-bit repacked
// block row, or the low / high nibbles of one 4-bit row, so 4-bit weights unpack with
// two AND and one shift per 64 bytes). tdpbsud multiplies the signed activation codes
// by the unsigned stored weights (w + 8, w + 128); the epilogue removes the offset.
//
// Blocking: the activation codes are first copied into 16-row × 64-k tiles, contiguous
// (no 4 KiB-strided rows that all fall into one L1 set), zero rows padding M to 16.
// Work items are (chunk of up to 128 rows, panel of 32 channels), chunk-major: a thread
// walks every panel of its chunk while the chunk's codes (≤ 1 MiB) stay in its L2.
// Within an item, K (per group) goes in blocks of kAmxKBlock k-steps: the panel's block
// of weights is unpacked once into a 16 KiB L1 buffer and every row-tile pair of the
// chunk runs over it, its C tiles parked in a chunk × 32 int32 buffer between blocks;
// after a group's last block the epilogue turns the chunk's sums into float.
// Threads take items from an ItemQueue: distinct 32-channel column ranges of the
// output, 64 bf16 bytes, one cache line per row.

static constexpr int64_t kAmxMinRows = 16;

// Rows per work item: ≤ 128 (the chunk's parked C, 16 KiB, and the unpacked B block,
// 16 KiB, share L1 with the streaming codes), codes of a chunk ≤ ~1 MiB (L2).
static int64_t amx_chunk(int64_t k) {
  return std::max<int64_t>(32, std::min<int64_t>(128, (1 << 20) / k / 32 * 32));
}

static void amx_config() {
  TileCfg cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  amx_load_config(cfg);
}

// The compiler does not know that the tile instructions (inline asm) read memory:
// fence ordinary stores (packed codes, unpacked panel) before them.
#define QUAROT_MEM_FENCE() __asm__ volatile("" ::: "memory")

// C tiles of one row-tile pair (packed codes: ap, the second tile astride bytes later)
// and one panel (b: [k-step][2 blocks][1024 bytes]) over ksteps k-steps (64 k each),
// starting from zero or from c (int32, row stride 128 bytes), stored back to c.
template <bool TWO_M, bool TWO_N>
static void amx_tile(const int8_t* ap, int64_t astride, const uint8_t* b, int64_t ksteps,
                     bool first, int32_t* c) {
  if (first) {
    _tile_zero(0);
    if (TWO_N) _tile_zero(1);
    if (TWO_M) _tile_zero(2);
    if (TWO_M && TWO_N) _tile_zero(3);
  } else {
    _tile_loadd(0, c, 128);
    if (TWO_N) _tile_loadd(1, c + 16, 128);
    if (TWO_M) _tile_loadd(2, c + 16 * 32, 128);
    if (TWO_M && TWO_N) _tile_loadd(3, c + 16 * 32 + 16, 128);
  }
  for (int64_t kt = 0; kt < ksteps; ++kt) {
    const uint8_t* bk = b + kt * 2048;
    _tile_loadd(4, ap + kt * 1024, 64);
    _tile_loadd(6, bk, 64);
    if (TWO_N) _tile_loadd(7, bk + 1024, 64);
    _tile_dpbsud(0, 4, 6);
    if (TWO_N) _tile_dpbsud(1, 4, 7);
    if (TWO_M) {
      _tile_loadd(5, ap + astride + kt * 1024, 64);
      _tile_dpbsud(2, 5, 6);
      if (TWO_N) _tile_dpbsud(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  if (TWO_N) _tile_stored(1, c + 16, 128);
  if (TWO_M) _tile_stored(2, c + 16 * 32, 128);
  if (TWO_M && TWO_N) _tile_stored(3, c + 16 * 32 + 16, 128);
}

using AmxTileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, bool, int32_t*);

static constexpr int64_t kAmxKBlock = 8;  // k-steps (of 64) per unpacked B block: 16 KiB

// k-steps [kt0, kt1) of a 4-bit panel of nbp blocks (16 channels each) ->
// [kt1 - kt0][2][16 rows × 64 bytes].
__attribute__((target("avx512f,avx512bw"))) static void amx_unpack4(const uint8_t* w,
                                                                  int64_t wstride, int64_t nbp,
                                                                  int64_t kt0, int64_t kt1,
                                                                  uint8_t* dst) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t kt = kt0; kt < kt1; ++kt)
    for (int64_t jb = 0; jb < nbp; ++jb) {
      const uint8_t* src = w + jb * wstride + kt * 8 * 64;
      uint8_t* d = dst + ((kt - kt0) * 2 + jb) * 1024;
      for (int i = 0; i < 8; ++i) {
        const __m512i v = _mm512_loadu_si512(src + 64 * i);
        _mm512_store_si512(d + 128 * i, _mm512_and_si512(v, mask));
        _mm512_store_si512(d + 128 * i + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
      }
    }
}

// 8-bit: the two blocks' 16-row groups interleaved -> [kt1 - kt0][2][1024 bytes].
static void amx_copy8(const uint8_t* w, int64_t wstride, int64_t nbp, int64_t kt0, int64_t kt1,
                      uint8_t* dst) {
  for (int64_t kt = kt0; kt < kt1; ++kt)
    for (int64_t jb = 0; jb < nbp; ++jb)
      std::memcpy(dst + ((kt - kt0) * 2 + jb) * 1024, w + jb * wstride + kt * 1024, 1024);
}

// Codes [M, K] -> [ceil(M/16)][K/64][16 rows × 64 bytes], zero rows past M.
static void amx_pack_a(const int8_t* a, int64_t m, int64_t k, int8_t* dst) {
  const int64_t mt = (m + 15) / 16, kts = k / 64;
  at::parallel_for(0, mt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t kt = 0; kt < kts; ++kt) {
        int8_t* d = dst + (t * kts + kt) * 1024;
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t row = t * 16 + r;
          if (row < m) std::memcpy(d + r * 64, a + row * k + kt * 64, 64);
          else std::memset(d + r * 64, 0, 64);
        }
      }
  });
}

template <typename T>
static void gemm_amx(const Epi& e, EpiFn<T> epi, const int8_t* a, int64_t m, int64_t k,
                     const uint8_t* w, int64_t bits, T* out) {
  const int64_t nblk = e.npad / kNB, npan = (nblk + 1) / 2;
  const int64_t chunk = amx_chunk(k), mchunks = (m + chunk - 1) / chunk;
  const int64_t wstride = k / kstep(bits) * 64;
  const int64_t kts = k / 64, gkt = kts / e.groups;  // k-steps in all, per group
  const int64_t astride = kts * 1024;                // bytes per packed 16-row tile
  std::unique_ptr<int8_t, decltype(&std::free)> ap(
      static_cast<int8_t*>(std::aligned_alloc(64, (m + 15) / 16 * astride)), &std::free);
  amx_pack_a(a, m, k, ap.get());
  QUAROT_MEM_FENCE();
  ItemQueue queue(mchunks * npan);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    // the chunk's C (int32, 32 channels a row), its float group sums, one unpacked B block
    std::unique_ptr<int32_t, decltype(&std::free)> cbuf(
        static_cast<int32_t*>(std::aligned_alloc(64, chunk * 32 * 4)), &std::free);
    std::unique_ptr<float, decltype(&std::free)> fbuf(
        static_cast<float*>(std::aligned_alloc(64, chunk * 32 * 4)), &std::free);
    alignas(64) uint8_t bblk[kAmxKBlock * 2048];
    amx_config();
    for (int64_t item; (item = queue.next()) >= 0;) {
      const int64_t mc = item / npan, p = item % npan;
      const int64_t b0 = 2 * p, nbp = std::min<int64_t>(2, nblk - b0);
      const int64_t c0 = b0 * kNB, nc = std::min(nbp * kNB, e.n - c0);
      const int64_t rc0 = mc * chunk, rc1 = std::min(m, rc0 + chunk);
      for (int64_t g = 0; g < e.groups; ++g) {
        // the group's k-steps in blocks: unpack a block (L1) once, run every row pair
        // of the chunk over it, C kept in cbuf between blocks
        for (int64_t kb = g * gkt; kb < (g + 1) * gkt; kb += kAmxKBlock) {
          const int64_t kb1 = std::min((g + 1) * gkt, kb + kAmxKBlock);
          if (bits == 4) amx_unpack4(w + b0 * wstride, wstride, nbp, kb, kb1, bblk);
          else amx_copy8(w + b0 * wstride, wstride, nbp, kb, kb1, bblk);
          QUAROT_MEM_FENCE();
          for (int64_t r0 = rc0; r0 < rc1; r0 += 32) {
            const bool two_m = rc1 - r0 > 16;
            const AmxTileFn fn = two_m ? (nbp == 2 ? &amx_tile<true, true> : &amx_tile<true, false>)
                                       : (nbp == 2 ? &amx_tile<false, true> : &amx_tile<false, false>);
            fn(ap.get() + (r0 / 16) * astride + kb * 1024, astride, bblk, kb1 - kb,
               kb == g * gkt, cbuf.get() + (r0 - rc0) * 32);
          }
        }
        epi(e, cbuf.get(), 32, fbuf.get(), 32, rc0, rc1 - rc0, c0, nc, g, out);
      }
    }
    amx_release();
  });
}

bool amx_gemm_applies(int64_t m, int64_t k, int64_t groups) {
  return amx_enabled() && m >= kAmxMinRows && (k / groups) % 64 == 0;
}

template <typename T>
static void gemm_impl(const int8_t* a, const float* a_scale, const int32_t* asums, int64_t m,
                      int64_t k, const uint8_t* w, const float* w_scale, int64_t groups,
                      int64_t npad, const float* bias, int64_t n, int64_t bits, T* out) {
  const Epi e{a_scale, asums, w_scale, bias, groups, npad, n, bits == 4 ? 8 : 128};
  if (amx_gemm_applies(m, k, groups))
    gemm_amx<T>(e, pick_epi<T>(kAvx512Vnni), a, m, k, w, bits, out);
  else
    gemm_vector<T>(e, a, m, k, w, bits, out);
}

template <typename T>
void rrs_gemm_amx(const int8_t* a, const float* xs, const int32_t* asums, int64_t m, int64_t k,
                  int64_t groups, const uint8_t* w, const float* w_scale, const float* bias,
                  int64_t n, T* out) {
  const int64_t npad = (n + kNB - 1) / kNB * kNB;
  Epi e{nullptr, asums, w_scale, bias, groups, npad, n, 8};
  e.row_gscale = xs;
  gemm_amx<T>(e, pick_rrs_epi<T>(), a, m, k, w, 4, out);
}
template void rrs_gemm_amx<float>(RRS_AMX_ARGS(float));
template void rrs_gemm_amx<double>(RRS_AMX_ARGS(double));
template void rrs_gemm_amx<c10::BFloat16>(RRS_AMX_ARGS(c10::BFloat16));
template void rrs_gemm_amx<c10::Half>(RRS_AMX_ARGS(c10::Half));

Tensor gemm(const Tensor& codes, const Tensor& scales, const Tensor& asums, const Tensor& w_packed,
            const Tensor& w_scale_t, const c10::optional<Tensor>& bias, int64_t n, int64_t bits,
            at::ScalarType out_dtype) {
  TORCH_CHECK(bits == 4 || bits == 8, "quarot_cpu.gemm: weight bits must be 4 or 8");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kChar,
              "quarot_cpu.gemm: codes must be contiguous int8 [M, K]");
  const int64_t m = codes.size(0), k = codes.size(1), ks = kstep(bits);
  const int64_t nblk = (n + kNB - 1) / kNB, npad = nblk * kNB;
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.is_contiguous() &&
                  w_packed.dim() == 3 && w_packed.size(0) == nblk && w_packed.size(1) == k / ks &&
                  w_packed.size(2) == 64,
              "quarot_cpu.gemm: packed weight ", w_packed.sizes(), " does not match N=", n,
              " K=", k, " bits=", bits);
  TORCH_CHECK(w_scale_t.scalar_type() == at::kFloat && w_scale_t.is_contiguous() &&
                  w_scale_t.dim() == 2 && w_scale_t.size(1) == npad,
              "quarot_cpu.gemm: weight scale must be float32 [G, N padded to 16]");
  const int64_t groups = w_scale_t.size(0);
  TORCH_CHECK(k % groups == 0 && (k / groups) % ks == 0,
              "quarot_cpu.gemm: group size must divide K and be a multiple of ", ks);
  TORCH_CHECK(asums.scalar_type() == at::kInt && asums.is_contiguous() && asums.size(0) == m &&
                  asums.size(1) == groups,
              "quarot_cpu.gemm: asums must be int32 [M, G]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == m,
              "quarot_cpu.gemm: scales must be float32 [M, 1]");
  Tensor out = at::empty({m, n}, codes.options().dtype(out_dtype));
  Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "quarot_cpu.gemm: bias must have N elements");
    b = bias->to(at::kFloat).contiguous();
  }
  Tensor sc = scales.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "gemm", [&] {
    gemm_impl<scalar_t>(codes.data_ptr<int8_t>(), sc.data_ptr<float>(), asums.data_ptr<int32_t>(),
                        m, k, w_packed.data_ptr<uint8_t>(), w_scale_t.data_ptr<float>(), groups,
                        npad, b.defined() ? b.data_ptr<float>() : nullptr, n, bits,
                        out.data_ptr<scalar_t>());
  });
  return out;
}

// The whole layer in one call: (Hadamard +) quantize, then the integer GEMM.
Tensor linear(const Tensor& x, const c10::optional<Tensor>& had_k, const Tensor& w_packed,
              const Tensor& w_scale_t, const c10::optional<Tensor>& bias, int64_t n,
              int64_t w_bits, int64_t a_bits, double clip_ratio,
              const c10::optional<Tensor>& static_scale) {
  auto [codes, scales, asums] =
      quantize(x.contiguous(), had_k, a_bits, clip_ratio, static_scale, w_scale_t.size(0));
  return gemm(codes, scales, asums, w_packed, w_scale_t, bias, n, w_bits, x.scalar_type());
}

}  // namespace quarot_cpu

TORCH_LIBRARY(quarot_cpu, m) {
  m.def("isa() -> str", &quarot_cpu::isa);
  m.def("supported_isas() -> str[]", &quarot_cpu::supported_isas);
  m.def("set_isa(str name) -> str", &quarot_cpu::set_isa);
  m.def("hadamard(Tensor x, Tensor had_k) -> Tensor");
  m.def(
      "quantize(Tensor x, Tensor? had_k, int bits, float clip_ratio, Tensor? static_scale, "
      "int groups) -> (Tensor, Tensor, Tensor)");
  m.def("repack_weight(Tensor codes, int bits) -> Tensor", &quarot_cpu::repack_weight);
  m.def("repack_scale(Tensor scale) -> Tensor", &quarot_cpu::repack_scale);
  m.def(
      "gemm(Tensor codes, Tensor scales, Tensor asums, Tensor w_packed, Tensor w_scale_t, "
      "Tensor? bias, int n, int bits, ScalarType out_dtype) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor? had_k, Tensor w_packed, Tensor w_scale_t, Tensor? bias, int n, "
      "int w_bits, int a_bits, float clip_ratio, Tensor? static_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(quarot_cpu, CPU, m) {
  m.impl("hadamard", &quarot_cpu::hadamard);
  m.impl("quantize", &quarot_cpu::quantize);
  m.impl("gemm", &quarot_cpu::gemm);
  m.impl("linear", &quarot_cpu::linear);
}
