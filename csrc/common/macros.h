#pragma once
// Qualifiers for code shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#define MK_UNROLL _Pragma("unroll")
#else
#define MK_HOST_DEVICE inline
#define MK_UNROLL
#endif
