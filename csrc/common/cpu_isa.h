#pragma once
// Which compiled copy of a CPU kernel to run: the widest instruction set this CPU has, lowered (never
// raised) by ATEN_CPU_CAPABILITY=default|avx2, the switch ATen's own CPU kernels obey.
namespace markovkit {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // kAvx2: AVX2 + FMA; kAvx512: + AVX-512F

CpuIsa cpu_isa();  // computed once per process

}  // namespace markovkit
