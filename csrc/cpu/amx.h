// AMX tile configuration, shared by the GEMM (quarot_cpu.cpp) and the peak
// microbenchmark (peak.cpp); the RRS entry into the AMX GEMM (rrs.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace quarot_cpu {

// Palette 1: 8 tiles of at most 16 rows × 64 bytes.
struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// ldtilecfg with the whole 64-byte struct as the asm operand (GCC 12's
// _tile_loadconfig names only its first 8 bytes, so the compiler may drop the other
// stores and the instruction faults on a garbage configuration).
static inline void amx_load_config(const TileCfg& cfg) {
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

static inline void amx_release() { __asm__ volatile("tilerelease" ::: "memory"); }

// Rotated Runtime Smooth's GEMM (rrs.cpp) on the AMX driver of quarot_cpu.cpp: the RRS
// repack is the 4-bit layout of the column-permuted codes, so the same tiles run it; the
// epilogue applies xs [M, G] to each group's sum, then w_scale [N] (+ bias). For M >= 16
// and group sizes that are multiples of 64, when amx_enabled(): amx_gemm_applies().
bool amx_gemm_applies(int64_t m, int64_t k, int64_t groups);
#define RRS_AMX_ARGS(T)                                                                   \
  const int8_t *a, const float *xs, const int32_t *asums, int64_t m, int64_t k,       \
      int64_t groups, const uint8_t *w, const float *w_scale, const float *bias, int64_t n, \
      T *out
template <typename T>
void rrs_gemm_amx(RRS_AMX_ARGS(T));

// The plain per-token GEMM (quarot_cpu.cpp): RRS with integer smoothing factors
// (rrs.cpp) quantizes into per-token codes and runs it.
at::Tensor gemm(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& asums,
                const at::Tensor& w_packed, const at::Tensor& w_scale_t,
                const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits,
                at::ScalarType out_dtype);

}  // namespace quarot_cpu
