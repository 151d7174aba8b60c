// Run-time choice of the instruction set the CPU kernels use (see quarot_cpu.cpp).
#pragma once

namespace quarot_cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// The path chosen at load (best the CPU has, or VLLM_QUAROT_CPU_ISA), or by set_isa().
int current_isa();

}  // namespace quarot_cpu
