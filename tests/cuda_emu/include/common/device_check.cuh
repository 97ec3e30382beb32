#pragma once
// CPU stand-in for csrc/common/device_check.cuh: a failed check throws its message (the launch passes it on, torch
// raises it as a RuntimeError), where the GPU prints it and fails as a device-side assert.
#include <cstdio>
#include <stdexcept>

#define MK_DEVICE_CHECK(cond, fmt, ...)                               \
  do {                                                                \
    if (!(cond)) {                                                    \
      char mk_message[512];                                           \
      std::snprintf(mk_message, sizeof mk_message, fmt, __VA_ARGS__); \
      throw std::runtime_error(mk_message);                           \
    }                                                                 \
  } while (0)
