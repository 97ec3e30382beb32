#pragma once
// CPU stand-ins for csrc/attention/swa_wgmma.cuh, from the PTX ISA's definitions: shared-memory operands read
// through their descriptors (128-byte swizzle on the address bits, K-major or MN-major), accumulator and register
// A layouts as documented there. A wgmma runs at the wait that completes its commit group, so a kernel that reads
// its accumulators, or overwrites its shared-memory operands, before that wait gets wrong results here too; one
// that changes its register A operand before then, or waits with wgmma issued but not committed (the hardware
// would not wait for them), raises an error. With MK_EMU_ORDER=reverse a wgmma runs when issued, so one issued
// before its operands are in reads stale data.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/swa_mma.cuh"  // the stand-in: element<T>, and cp_async.cuh's thread_queue

namespace markovkit {

namespace emu_detail {

// The descriptor's start address holds the offset from the block's dynamic shared memory (14 bits of 16 bytes).
inline unsigned char* smem_base() { return static_cast<unsigned char*>(mk_emu::dynamic_smem()); }

// what: a literal (a std::string parameter would build one per call, and the element reads call this)
inline void wgmma_check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("cuda_emu wgmma: ") + what);
}

struct Desc {
  const unsigned char* start;
  uint32_t lbo, sbo;
};

inline Desc decode(uint64_t desc) {
  wgmma_check(desc >> 62 == 1, "descriptor without 128-byte swizzling");
  wgmma_check((desc >> 49 & 7) == 0, "descriptor with a base offset");
  return {smem_base() + ((desc & 0x3fff) << 4), static_cast<uint32_t>(desc >> 16 & 0x3fff) << 4,
          static_cast<uint32_t>(desc >> 32 & 0x3fff) << 4};
}

// The 16-bit element at a linear (unswizzled) address: the 128-byte swizzle XORs address bits [4, 7) with [7, 10).
template <typename T>
float swizzled(const unsigned char* linear) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(linear);
  const unsigned char* at = reinterpret_cast<const unsigned char*>(a ^ ((a >> 7 & 7) << 4));
  uint16_t bits;
  std::memcpy(&bits, at, sizeof(bits));
  return element<T>(bits, 0);
}

// K-major element (row r, k) of an operand: rows 8 apart by SBO, 128 bytes apart within 8; k contiguous.
template <typename T>
float k_major_at(const Desc& d, int r, int k) {
  wgmma_check(reinterpret_cast<uintptr_t>(d.start) % 128 + 32 <= 128, "K-major k range crosses a 128-byte row");
  return swizzled<T>(d.start + (r / 8) * d.sbo + (r % 8) * 128 + 2 * k);
}

// MN-major element (k, col n): columns in groups of 64 by LBO, k rows 8 apart by SBO, 128 bytes apart within 8.
template <typename T>
float mn_major_at(const Desc& d, int k, int n) {
  return swizzled<T>(d.start + (n / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + 2 * (n % 64));
}

struct PendingWgmma {
  float* d;  // n / 8 fragments of four
  int n;
  bool accumulate, a_in_regs;
  int group;  // commit group, numbered per thread from 0; -1 until committed
  uint64_t a_desc, b_desc;
  float a_rows[2][16];      // a_in_regs: A(row g, k) and A(row g + 8, k) of this lane
  const uint32_t* a_regs;   // a_in_regs: this lane's A registers, which must keep a_issued until the wgmma completes
  uint32_t a_issued[4];
  bool b_mn_major;
  float (*read_k)(const Desc&, int, int);
  float (*read_mn)(const Desc&, int, int);
};

// This lane's accumulator elements: fragment i element e is row 16 (warp % 4) + g + 8 (e / 2) of the warpgroup's
// 64, col 8 i + 2 t + e % 2.
inline void run(const PendingWgmma& w) {
  if (w.a_in_regs) {
    wgmma_check(std::memcmp(w.a_regs, w.a_issued, sizeof(w.a_issued)) == 0,
                "A operand registers changed before the wgmma completed");
  }
  const unsigned tid = mk_emu::thread_idx().x, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = 16 * static_cast<int>(tid / 32 % 4) + static_cast<int>(g);
  const Desc b = decode(w.b_desc);
  const Desc a = w.a_in_regs ? Desc{} : decode(w.a_desc);
  for (int i = 0; i < w.n / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int row = row0 + 8 * (e / 2), col = 8 * i + 2 * static_cast<int>(t) + e % 2;
      float acc = 0.0f;
      for (int k = 0; k < 16; ++k) {
        const float av = w.a_in_regs ? w.a_rows[e / 2][k] : w.read_k(a, row, k);
        const float bv = w.b_mn_major ? w.read_mn(b, k, col) : w.read_k(b, col, k);
        acc += av * bv;
      }
      float& d = w.d[4 * i + e];
      d = w.accumulate ? d + acc : acc;
    }
  }
}

template <typename T>
PendingWgmma pending(float* d, int n, uint64_t b) {
  PendingWgmma w{};
  w.group = -1;
  w.d = d;
  w.n = n;
  w.b_desc = b;
  w.read_k = &k_major_at<T>;
  w.read_mn = &mn_major_at<T>;
  return w;
}

inline void issue(const PendingWgmma& w) {
  if (mk_emu::reverse_order()) {
    run(w);
  } else {
    thread_queue<PendingWgmma>().push_back(w);
  }
}

}  // namespace emu_detail

inline uint64_t smem_desc(const void* start, uint32_t lbo, uint32_t sbo) {
  const ptrdiff_t offset = static_cast<const unsigned char*>(start) - emu_detail::smem_base();
  emu_detail::wgmma_check(offset >= 0 && offset < (1 << 18) && offset % 16 == 0,
                          "start address outside the dynamic shared memory or not 16-byte aligned");
  emu_detail::wgmma_check(lbo % 16 == 0 && sbo % 16 == 0 && lbo < (1u << 18) && sbo < (1u << 18),
                          "LBO / SBO not 16-byte multiples below 256 KB");
  return static_cast<uint64_t>(offset >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 |
         static_cast<uint64_t>(sbo >> 4) << 32 | uint64_t{1} << 62;
}

inline void wgmma_fence() {}
inline void fence_proxy_async() {}

template <int N>
void fence_operands(float (&)[N][4]) {}

inline void wgmma_commit() {
  std::vector<emu_detail::PendingWgmma>& mine = emu_detail::thread_queue<emu_detail::PendingWgmma>();
  int group = 0;
  for (const emu_detail::PendingWgmma& w : mine) group = w.group >= group ? w.group + 1 : group;
  for (emu_detail::PendingWgmma& w : mine) w.group = w.group < 0 ? group : w.group;
}

// Runs the wgmma of all but the newest N committed groups, in issue order. Warp-synchronous, as the instruction
// (.sync.aligned): no lane goes on before every lane of its warp has its share of those products, so a lane that
// then overwrites a shared-memory operand cannot change what another lane of the warp reads.
template <int N>
void wgmma_wait() {
  std::vector<emu_detail::PendingWgmma>& mine = emu_detail::thread_queue<emu_detail::PendingWgmma>();
  int newest = -1;
  for (const emu_detail::PendingWgmma& w : mine) {
    emu_detail::wgmma_check(w.group >= 0, "wait with an uncommitted wgmma");
    newest = w.group > newest ? w.group : newest;
  }
  std::vector<emu_detail::PendingWgmma> left;
  for (const emu_detail::PendingWgmma& w : mine) {
    if (w.group > newest - N) {
      left.push_back(w);
    } else {
      emu_detail::run(w);
    }
  }
  mine = left;
  mk_emu::sync_warp();
}

template <typename T, int N, bool kMnMajorB>
void wgmma_ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate) {
  emu_detail::PendingWgmma w = emu_detail::pending<T>(&d[0][0], N, b);
  w.accumulate = accumulate;
  w.a_desc = a;
  w.b_mn_major = kMnMajorB;
  emu_detail::issue(w);
}

// A register r of lane 4 g + t holds rows g + 8 (r % 2), k = 2 t + 8 (r / 2) + {0, 1}.
template <typename T, int N, bool kMnMajorB>
void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
  struct Regs {
    uint32_t r[4];
  };
  const mk_emu::WarpView<Regs> all = mk_emu::warp_gather(Regs{{a[0], a[1], a[2], a[3]}});
  emu_detail::PendingWgmma w = emu_detail::pending<T>(&d[0][0], N, b);
  const unsigned g = mk_emu::lane() / 4;
  for (int half = 0; half < 2; ++half) {
    for (int k = 0; k < 16; ++k) {
      const Regs from = all[4 * g + (k % 8) / 2];
      w.a_rows[half][k] = emu_detail::element<T>(from.r[half + 2 * (k / 8)], k % 2);
    }
  }
  w.accumulate = accumulate;
  w.a_in_regs = true;
  w.a_regs = a;
  std::memcpy(w.a_issued, a, sizeof(w.a_issued));
  w.b_mn_major = kMnMajorB;
  emu_detail::issue(w);
}

}  // namespace markovkit
