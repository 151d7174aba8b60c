// Run-time choice of the instruction set the CPU kernels use (see quarot_cpu.cpp).
#pragma once

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

}  // namespace quarot_cpu
