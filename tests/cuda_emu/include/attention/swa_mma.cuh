#pragma once
// CPU stand-ins for csrc/attention/swa_mma.cuh, from the PTX ISA's definitions of the instructions: every lane
// publishes its operands, then computes its own part of the warp-wide result.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cp_async.cuh"  // the stand-in (its thread_queue serves the wgmma stand-in too)

namespace markovkit {

namespace emu_detail {

// Element `half` (0: low 16 bits, 1: high) of a 32-bit register holding two T, as float.
template <typename T>
float element(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T v;
  std::memcpy(&v, &bits, sizeof(v));
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

struct MmaOperands {
  uint32_t a[4], b[2];
};

}  // namespace emu_detail

// D = A B + D for one m16n8k16 tile (A 16 x 16 row-major, B 16 x 8, float accumulation). Fragments (lane = 4 g + t):
// A register r holds rows g + 8 (r % 2), cols 2 t + 8 (r / 2) + {0, 1}; B register r holds k = 2 t + 8 r + {0, 1}
// of column g; D element i is row g + 8 (i / 2), col 2 t + i % 2.
template <typename T>
void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using emu_detail::element;
  const mk_emu::WarpView<emu_detail::MmaOperands> all =
      mk_emu::warp_gather(emu_detail::MmaOperands{{a[0], a[1], a[2], a[3]}, {b0, b1}});
  const unsigned lane = mk_emu::lane(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = 0.f;
    for (unsigned k = 0; k < 16; ++k) {
      const emu_detail::MmaOperands pa = all[4 * (row % 8) + (k % 8) / 2];
      const emu_detail::MmaOperands pb = all[4 * col + (k % 8) / 2];
      acc += element<T>(pa.a[row / 8 + 2 * (k / 8)], k % 2) * element<T>(pb.b[k / 8], k % 2);
    }
    d[i] += acc;
  }
}

// ldmatrix .x4 (.trans with kTrans): lane 8 m + r gives the address of row r of 8 x 8 matrix m; register m of
// lane 4 r + w receives row r, elements 2 w and 2 w + 1 of matrix m (of its transpose with kTrans).
template <bool kTrans>
void ldmatrix_x4(const uint16_t* row, uint32_t (&r)[4]) {
  const mk_emu::WarpView<const uint16_t*> rows = mk_emu::warp_gather(row);
  const unsigned lane = mk_emu::lane(), i = lane / 4, j = 2 * (lane % 4);
  for (unsigned m = 0; m < 4; ++m) {
    const uint16_t lo = kTrans ? rows[8 * m + j][i] : rows[8 * m + i][j];
    const uint16_t hi = kTrans ? rows[8 * m + j + 1][i] : rows[8 * m + i][j + 1];
    r[m] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
}

}  // namespace markovkit
