#pragma once
// Checks of input values that the host could only read after a sync (offsets a kernel indexes with): a kernel checks
// them, and a failed check prints what was expected and what came (a printf format and its arguments), then fails as
// a device-side assert, as torch's own index checks do: torch raises "CUDA error: device-side assert triggered" at
// the next call that synchronizes, and the context is lost, so no later kernel runs on the bad values. The
// emulator's stand-in (tests/cuda_emu/include/common) throws the message instead.
#include <cassert>
#include <cstdio>

#if defined(NDEBUG)
// glibc's assert.h declares __assert_fail only without NDEBUG (release builds define it); the CUDA device runtime
// has it either way. Declared as glibc does, so files built with and without NDEBUG agree (as torch's Macros.h).
extern "C" {
#if defined(__CUDA_ARCH__)
__host__ __device__
#endif
    void
    __assert_fail(const char* assertion, const char* file, unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
}
#endif

#define MK_DEVICE_CHECK(cond, fmt, ...)                   \
  do {                                                    \
    if (!(cond)) {                                        \
      printf(fmt "\n", __VA_ARGS__);                      \
      __assert_fail(#cond, __FILE__, __LINE__, __func__); \
    }                                                     \
  } while (0)
