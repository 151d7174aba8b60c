// What this CPU can do at most, for the instruction sequences the GEMM uses
// (benchmarks/cpu_peak.py prints them; benchmarks/cpu_layers.py divides by them):
//   avx2_maddubs  vpmaddubsw + vpmaddwd + vpaddd on ymm: 32 u8×s8 MACs per triple
//   avx2_maddubs_i16  vpmaddubsw + vpaddw: the same products summed in int16, widened by
//                 one vpmaddwd per 4 k-steps (amortised away here): the AVX2 GEMM's 4-bit
//                 and 8-bit weights on tiles of 2+ rows (quarot_cpu.cpp, dot_avx2_w*_i16)
//   avx512_vnni   vpdpbusd zmm: 64 u8×s8 MACs per instruction
//   amx_int8      tdpbsud on 16×64 by 64×16 byte tiles: 16384 s8×u8 MACs per instruction
// and the read bandwidth of a buffer (streaming the weights of a decode step).
// Each loop has enough independent accumulators to hide the instruction's latency,
// runs on `threads` OpenMP threads at once, and returns MACs (bytes) per second.

#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "amx.h"
#include "isa.h"

namespace quarot_cpu {

namespace {

using Clock = std::chrono::steady_clock;

// Each returns a value that depends on every accumulator, so nothing is optimised away.
// The AVX2 loops have the GEMM's shape: one weight vector (opaque to the compiler each
// iteration, so no product is hoisted) times kAcc distinct activation broadcasts, one
// accumulator each (the rows of a tile). (Until 0.15.2 six weight vectors were pinned by
// the barrier: the register pressure spilled, and on Zen 3 that read half of the rate the
// GEMM itself reached.) I16: vpaddw in place of vpmaddwd + vpaddd.
template <bool I16>
__attribute__((target("avx2"))) int64_t loop_maddubs(int64_t iters) {
  constexpr int kAcc = 6;
  __m256i acc[kAcc], a[kAcc];
  __m256i w = _mm256_set1_epi8(7);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int j = 0; j < kAcc; ++j)
    acc[j] = _mm256_setzero_si256(), a[j] = _mm256_set1_epi8(j % 2 ? -(j + 1) : j + 1);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(w));  // free at run time
    for (int j = 0; j < kAcc; ++j) {
      const __m256i p = _mm256_maddubs_epi16(w, a[j]);
      acc[j] = I16 ? _mm256_add_epi16(acc[j], p)
                   : _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, ones));
    }
  }
  __m256i s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_epi32(s, acc[j]);
  return _mm256_extract_epi32(s, 0) | 1;  // int16 sums wrap (only the time counts)
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) int64_t loop_vnni(int64_t iters) {
  constexpr int kAcc = 12;  // latency 5 × 2 ports
  __m512i acc[kAcc];
  __m512i w = _mm512_set1_epi8(7), a = _mm512_set1_epi8(-3);
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_epi32(j);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+v"(w), "+v"(a));
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], w, a);
  }
  __m512i s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_epi32(s, acc[j]);
  return _mm512_reduce_add_epi32(s);
}

__attribute__((target("avx512f,amx-tile,amx-int8"))) int64_t loop_amx(int64_t iters) {
  TileCfg cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  alignas(64) int8_t a[16 * 64];
  alignas(64) int32_t c[16 * 16];
  for (int i = 0; i < 16 * 64; ++i) a[i] = static_cast<int8_t>(i % 7 - 3);
  amx_load_config(cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, a, 64);
  for (int64_t i = 0; i < iters; ++i) {  // 4 independent C tiles (2×2 blocking)
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 4, 7);
    _tile_dpbsud(2, 5, 6);
    _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  amx_release();
  return c[0];
}

// Sums the bytes' 64-bit lanes: one pass over [p, p + n) with 4 independent vectors.
__attribute__((target("avx512f"))) int64_t read_avx512(const uint8_t* p, int64_t n) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    s0 = _mm512_add_epi64(s0, _mm512_load_si512(p + i));
    s1 = _mm512_add_epi64(s1, _mm512_load_si512(p + i + 64));
    s2 = _mm512_add_epi64(s2, _mm512_load_si512(p + i + 128));
    s3 = _mm512_add_epi64(s3, _mm512_load_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1),
                                                  _mm512_add_epi64(s2, s3)));
}

__attribute__((target("avx2"))) int64_t read_avx2(const uint8_t* p, int64_t n) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  return _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
         _mm256_extract_epi64(s, 3);
}

int64_t macs_per_iter(const std::string& seq) {
  if (seq == "avx2_maddubs" || seq == "avx2_maddubs_i16") return 6 * 32;
  if (seq == "avx512_vnni") return 12 * 64;
  if (seq == "amx_int8") return 4 * 16 * 16 * 64;
  TORCH_CHECK(false, "quarot_cpu.peak: unknown sequence '", seq,
              "' (avx2_maddubs, avx2_maddubs_i16, avx512_vnni, amx_int8)");
}

}  // namespace

bool cpu_has(int isa);  // quarot_cpu.cpp (for amx: also asks Linux for the tile permission)

// MACs per second of `seq` on `threads` threads together, each running `iters` loop
// iterations (the wall time of the slowest thread counts).
double peak(const std::string& seq, int64_t threads, int64_t iters) {
  const int64_t per = macs_per_iter(seq);
  const int need = seq == "amx_int8" ? kAmx : seq == "avx512_vnni" ? kAvx512Vnni : kAvx2;
  TORCH_CHECK(cpu_has(need), "quarot_cpu.peak: this CPU cannot run ", seq);
  TORCH_CHECK(threads >= 1 && iters >= 1, "quarot_cpu.peak: threads and iters must be >= 1");
  int64_t sink = 0;
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    if (seq == "avx2_maddubs") sink += loop_maddubs<false>(iters);
    else if (seq == "avx2_maddubs_i16") sink += loop_maddubs<true>(iters);
    else if (seq == "avx512_vnni") sink += loop_vnni(iters);
    else sink += loop_amx(iters);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  TORCH_CHECK(sink != 0x7fffffffffffffffLL, "unreachable");
  return static_cast<double>(per) * iters * threads / s;
}

// Bytes per second reading `buf` (64-byte aligned uint8) once on `threads` threads,
// each its own contiguous slice, `passes` times over.
double read_bandwidth(const at::Tensor& buf, int64_t threads, int64_t passes) {
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(buf.data_ptr()) % 64 == 0,
              "quarot_cpu.read_bandwidth: buf must be contiguous 64-byte aligned uint8");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel();
  const bool avx512 = cpu_has(kAvx512Vnni);
  int64_t sink = 0;
  const auto t0 = Clock::now();
  for (int64_t r = 0; r < passes; ++r) {
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t chunk = (n / nt) / 256 * 256;
      const uint8_t* q = p + t * chunk;
      sink += avx512 ? read_avx512(q, chunk) : read_avx2(q, chunk);
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  TORCH_CHECK(sink != 0x7fffffffffffffffLL, "unreachable");
  return static_cast<double>(n / threads / 256 * 256 * threads) * passes / s;
}

}  // namespace quarot_cpu

TORCH_LIBRARY_FRAGMENT(quarot_cpu, m) {
  m.def("peak(str seq, int threads, int iters) -> float", &quarot_cpu::peak);
  m.def("read_bandwidth(Tensor buf, int threads, int passes) -> float",
        &quarot_cpu::read_bandwidth);
}
