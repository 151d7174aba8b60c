// Run-time choice of the instruction set the CPU kernels use (see quarot_cpu.cpp).
#pragma once

#include <cstdint>

namespace quarot_cpu {

// The dispatch paths, by name: "amx" (AMX-INT8 tiles for GEMMs of M >= 16 rows whose
// weight groups are multiples of 64 wide, AVX512-VNNI for everything else),
// "avx512_vnni", "avx2", "scalar".
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

// The vector path chosen at load (best the CPU has, or VLLM_QUAROT_CPU_ISA), or by
// set_isa(): kAvx512Vnni, kAvx2 or kScalar. Under "amx" this is kAvx512Vnni (every
// kernel but the large-M GEMM runs AVX-512) and amx_enabled() is true.
int current_isa();
bool amx_enabled();

// AVX2 tiles of 2+ rows (quarot_cpu.cpp's dot_avx2_w4_i16, rrs.cpp's tile_avx2) add
// vpmaddubsw's pair sums in int16 over this many k-steps of 8 before one vpmaddwd widens
// them. Exact: a weight nibble is ≤ 15 and an activation code in [-128, 127], so one
// k-step (two vpmaddubsw, each a sum of two products) adds at most 2·2·15·128 = 7680 in
// magnitude to an int16 lane, and 4 k-steps at most 30720 < 32768.
inline constexpr int64_t kAvx2I16Steps = 4;

}  // namespace quarot_cpu
