#pragma once
// Qualifiers for code shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MK_HOST_DEVICE inline
#endif
