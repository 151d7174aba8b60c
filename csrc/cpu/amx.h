// AMX tile configuration, shared by the GEMM (quarot_cpu.cpp) and the peak
// microbenchmark (peak.cpp).
#pragma once

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

}  // namespace quarot_cpu
