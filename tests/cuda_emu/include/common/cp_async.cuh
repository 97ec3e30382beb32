#pragma once
// CPU stand-in for csrc/common/cp_async.cuh.
#include <cstring>
#include <vector>

namespace markovkit {

// cp.async: each thread's copies are queued and done at its cp_async_wait_all (or its exit), so a kernel that reads a
// tile before the wait and the barrier after it reads stale or poisoned shared memory here too; with
// MK_EMU_ORDER=reverse they are done when issued, so one that overwrites a tile still in use reads the new data.
namespace emu_detail {

struct PendingCopy {
  void* smem;
  const void* gmem;  // nullptr: zeros
};

inline void copy_16(const PendingCopy& c) {
  if (c.gmem) {
    std::memcpy(c.smem, c.gmem, 16);
  } else {
    std::memset(c.smem, 0, 16);
  }
}

// The calling thread's queue of asynchronous operations (also the wgmma stand-in's).
template <typename Op>
std::vector<Op>& thread_queue() {
  static std::vector<std::vector<Op>> per_thread;
  const dim3 &t = mk_emu::thread_idx(), &b = mk_emu::block_dim();
  const size_t id = t.x + b.x * (t.y + static_cast<size_t>(b.y) * t.z);
  if (per_thread.size() <= id) per_thread.resize(id + 1);
  return per_thread[id];
}

// At a thread's exit its copies still queued are done (or, after an error, dropped), not left to the next block.
inline void finish_copies(bool completed) {
  std::vector<PendingCopy>& mine = thread_queue<PendingCopy>();
  if (completed) {
    for (const PendingCopy& c : mine) copy_16(c);
  }
  mine.clear();
}

}  // namespace emu_detail

inline void cp_async_16_or_zero(void* smem, const void* gmem, bool copy) {
  static const bool finished_at_exit = (mk_emu::at_thread_exit(&emu_detail::finish_copies), true);
  (void)finished_at_exit;
  const emu_detail::PendingCopy c{smem, copy ? gmem : nullptr};
  if (mk_emu::reverse_order()) {
    emu_detail::copy_16(c);
  } else {
    emu_detail::thread_queue<emu_detail::PendingCopy>().push_back(c);
  }
}

inline void cp_async_16(void* smem, const void* gmem) { cp_async_16_or_zero(smem, gmem, true); }

inline void cp_async_wait_all() {
  std::vector<emu_detail::PendingCopy>& mine = emu_detail::thread_queue<emu_detail::PendingCopy>();
  for (const emu_detail::PendingCopy& c : mine) emu_detail::copy_16(c);
  mine.clear();
}

}  // namespace markovkit
