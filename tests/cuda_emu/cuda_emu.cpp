// The fiber scheduler behind cuda_emu.h: one fiber (a stack and a saved context) per CUDA thread of the running block.
#include "cuda_emu.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mk_emu {
namespace {

void fiber_main();

#if defined(__x86_64__)
// A switch pushes the callee-saved registers (System V x86-64: rbp, rbx, r12-r15, the MXCSR and the x87 control
// word) on the running stack, stores the stack pointer in *from, loads to and pops the same from there. glibc's
// swapcontext also saves the signal mask with a system call every switch: two thirds of the emulator's time.
extern "C" __attribute__((visibility("hidden"))) void mk_emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl mk_emu_switch
  .hidden mk_emu_switch
  .type mk_emu_switch, @function
mk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mk_emu_switch, . - mk_emu_switch
)");

struct Context {
  void* sp = nullptr;
  const void* stack = nullptr;  // its stack, for AddressSanitizer (the scheduler's learned at its first switch)
  size_t stack_bytes = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's fake frames of the context while switched away
};

Context* g_left = nullptr;  // the context the last switch left

// AddressSanitizer follows a stack switch only when told: before, the stack entered and where to keep the fake
// frames of the one left (none when it ends); after, the fake frames of the one entered, and the bounds of the one
// left (how the scheduler's become known).
void entered(void* fake_stack) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, &g_left->stack, &g_left->stack_bytes);
#else
  (void)fake_stack;
#endif
}

void switch_context(Context& from, const Context& to, bool from_ends = false) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(from_ends ? nullptr : &from.fake_stack, to.stack, to.stack_bytes);
#else
  (void)from_ends;
#endif
  g_left = &from;
  mk_emu_switch(&from.sp, to.sp);
  entered(from.fake_stack);
}

// A context that starts fiber_main on stack[0, bytes): the frame mk_emu_switch pops, returning into fiber_main as if
// called (a null return address above: fiber_main never returns).
void start_context(Context& c, char* stack, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(stack, bytes);  // the redzones of the frames an earlier fiber left here
#endif
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  std::fill(top - 8, top - 2, uint64_t{0});  // r15 .. rbp
  top[-9] = mxcsr | uint64_t{fpcw} << 32;
  c = Context{top - 9, stack, bytes};
}
#else
// Elsewhere: ucontext (AddressSanitizer intercepts swapcontext).
struct Context {
  ucontext_t uc;
};

void entered(void*) {}

void switch_context(Context& from, const Context& to, bool = false) { swapcontext(&from.uc, &to.uc); }

void start_context(Context& c, char* stack, size_t bytes) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_main, 0);
}
#endif

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kDefaultDynamicSmem = 48 << 10;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr unsigned kMaxThreads = 1024;

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  Context ctx;
  State state;
  dim3 idx;
  unsigned linear;
  unsigned exchanges = 0;  // warp exchanges so far: their parity picks the set of slots
};

struct Block {
  std::vector<Fiber> fibers;
  Context scheduler;
  Fiber* current = nullptr;
  size_t pass_begin = 0, pass_lanes = 0;  // the warp pass running: its first fiber, its lanes
  bool reverse = false;                    // lanes (and warps) in reverse order
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  dim3 block_idx, block_dim, grid_dim;
  alignas(16) unsigned char exchange[2][kMaxThreads / 32][32][kSlotBytes];  // two sets of slots per warp
  std::vector<unsigned char> smem;
};

Block& blk() {
  static Block b;
  return b;
}

// The fibers' stacks, kMaxThreads of them, mapped once (pages are backed as touched) and never unmapped: memory
// that had been a stack keeps AddressSanitizer's poison of the frames left on it.
char* stacks() {
  static char* const base = [] {
    void* p = mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
    return static_cast<char*>(p);
  }();
  return base;
}

std::vector<void (*)(bool)>& exit_hooks() {
  static std::vector<void (*)(bool)> hooks;
  return hooks;
}

// The first runnable lane at or after position j of the warp pass (in its order), or null.
Fiber* runnable_from(Block& b, size_t j) {
  for (const size_t n = b.pass_lanes; j < n; ++j) {
    Fiber& f = b.fibers[b.pass_begin + (b.reverse ? n - 1 - j : j)];
    if (f.state == State::kRunnable) return &f;
  }
  return nullptr;
}

// The context a lane that stops switches to: the next runnable lane of the warp's pass (made current), or the
// scheduler when none is left. One switch per lane, not one there and one back.
Context& next_context(Block& b) {
  const size_t k = b.current->linear - b.pass_begin;
  Fiber* f = runnable_from(b, (b.reverse ? b.pass_lanes - 1 - k : k) + 1);
  if (f == nullptr) return b.scheduler;
  b.current = f;
  return f->ctx;
}

void fiber_main() {
  entered(nullptr);
  Block& b = blk();
  bool completed = true;
  try {
    (*b.body)();
  } catch (...) {
    completed = false;
    if (!b.error) b.error = std::current_exception();
  }
  for (void (*fn)(bool) : exit_hooks()) fn(completed);
  Fiber* f = b.current;
  f->state = State::kDone;
  switch_context(f->ctx, next_context(b), true);
}

// Away (to the next lane of the warp pass, or the scheduler) until the barrier this fiber waits at is released.
void wait(State s) {
  Block& b = blk();
  Fiber* f = b.current;
  f->state = s;
  switch_context(f->ctx, next_context(b));
}

std::string describe(const Block& b) {
  size_t at_block = 0, at_warp = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.state == State::kBlockBarrier;
    at_warp += f.state == State::kWarpBarrier;
    done += f.state == State::kDone;
  }
  return "block (" + std::to_string(b.block_idx.x) + ", " + std::to_string(b.block_idx.y) + ", " +
         std::to_string(b.block_idx.z) + "): " + std::to_string(at_block) + " threads at __syncthreads, " +
         std::to_string(at_warp) + " at a warp operation, " + std::to_string(done) + " exited";
}

// Releases warp w's barrier when every live lane of it waits there. False when it could not.
bool release_warp(Block& b, size_t w) {
  const size_t end = std::min(b.fibers.size(), w * 32 + 32);
  bool all = true, any = false;
  for (size_t i = w * 32; i < end; ++i) {
    const State s = b.fibers[i].state;
    if (s == State::kDone) continue;
    all = all && s == State::kWarpBarrier;
    any = any || s == State::kWarpBarrier;
  }
  if (!(any && all)) return false;
  for (size_t i = w * 32; i < end; ++i)
    if (b.fibers[i].state == State::kWarpBarrier) b.fibers[i].state = State::kRunnable;
  return true;
}

// Releases the block barrier when every live thread waits at it. False when it could not.
bool release_block(Block& b) {
  bool all = true, any = false;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    all = all && f.state == State::kBlockBarrier;
    any = any || f.state == State::kBlockBarrier;
  }
  if (!(any && all)) return false;
  for (Fiber& f : b.fibers)
    if (f.state == State::kBlockBarrier) f.state = State::kRunnable;
  return true;
}

// Runs warp w as far as it goes: its lanes up to their next barrier, through every warp operation, until they
// wait at the block barrier or exit. True when a lane ran.
bool run_warp(Block& b, size_t w) {
  b.pass_begin = w * 32;
  b.pass_lanes = std::min(b.fibers.size(), b.pass_begin + 32) - b.pass_begin;
  bool ran = false;
  do {
    if (Fiber* f = runnable_from(b, 0)) {  // it, then the rest of the pass (next_context)
      b.current = f;
      switch_context(b.scheduler, f->ctx);
      ran = true;
    }
  } while (!b.error && release_warp(b, w));
  return ran;
}

// Warp by warp (in reverse order, the last first): each runs through its warp operations up to the block
// barrier before the next starts, so data one warp writes and another reads without a block barrier between
// shows, whatever warp operations the two pass.
void run_block(Block& b, unsigned threads) {
  b.fibers.assign(threads, Fiber{});
  std::fill(b.smem.begin(), b.smem.end(), 0xff);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.idx = dim3(i % b.block_dim.x, i / b.block_dim.x % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y));
    f.state = State::kRunnable;
    start_context(f.ctx, stacks() + i * kStackBytes, kStackBytes);
  }
  const size_t warps = (threads + 31) / 32;
  for (;;) {
    bool ran = false;
    for (size_t k = 0; k < warps && !b.error; ++k) ran = run_warp(b, b.reverse ? warps - 1 - k : k) || ran;
    if (b.error) std::rethrow_exception(b.error);
    if (ran || release_block(b)) continue;
    bool all_done = true;
    for (const Fiber& f : b.fibers) all_done = all_done && f.state == State::kDone;
    if (all_done) return;
    throw std::runtime_error("cuda_emu: barrier deadlock in " + describe(b));
  }
}

bool g_enabled = false;

std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

std::map<const void*, std::string>& kernel_names() {
  static std::map<const void*, std::string> names;
  return names;
}

std::vector<std::pair<std::string, unsigned>>& launches() {
  static std::vector<std::pair<std::string, unsigned>> log;
  return log;
}

}  // namespace

bool reverse_order() {
  const char* v = std::getenv("MK_EMU_ORDER");
  return v && std::string(v) == "reverse";
}

bool enabled() { return g_enabled; }
void set_enabled(bool on) { g_enabled = on; }

const dim3& thread_idx() { return blk().current->idx; }
const dim3& block_idx() { return blk().block_idx; }
const dim3& block_dim() { return blk().block_dim; }
const dim3& grid_dim() { return blk().grid_dim; }
unsigned lane() { return blk().current->linear % 32; }
void* dynamic_smem() { return blk().smem.data(); }

void sync_block() { wait(State::kBlockBarrier); }

void at_thread_exit(void (*fn)(bool completed)) {
  std::vector<void (*)(bool)>& hooks = exit_hooks();
  if (std::find(hooks.begin(), hooks.end(), fn) == hooks.end()) hooks.push_back(fn);
}
void sync_warp() { wait(State::kWarpBarrier); }

const unsigned char* warp_exchange(const void* mine, size_t bytes) {
  Block& b = blk();
  const unsigned l = b.current->linear, set = b.current->exchanges++ % 2;
  std::memcpy(b.exchange[set][l / 32][l % 32], mine, bytes);
  sync_warp();
  return &b.exchange[set][l / 32][0][0];
}

void name_kernel(const void* kernel, const char* name) { kernel_names().emplace(kernel, name); }

std::vector<std::pair<std::string, unsigned>> take_launches() { return std::exchange(launches(), {}); }

size_t max_dynamic_smem() {
  const char* n = std::getenv("MK_EMU_SMEM");
  return n == nullptr ? 227 << 10 : std::strtoul(n, nullptr, 10);
}

bool set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > max_dynamic_smem()) return false;
  smem_limits()[kernel] = static_cast<size_t>(bytes);
  return true;
}

void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64)
    throw std::runtime_error("cuda_emu: invalid block (" + std::to_string(block.x) + ", " +
                             std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cuda_emu: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                             ", " + std::to_string(grid.z) + ")");
  const auto raised = smem_limits().find(kernel);
  const size_t limit = raised == smem_limits().end() ? kDefaultDynamicSmem : raised->second;
  if (smem_bytes > limit)
    throw std::runtime_error("cuda_emu: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, over " +
                             "the kernel's limit of " + std::to_string(limit) +
                             " (48 KB unless cudaFuncSetAttribute raised it, at most the device's opt-in limit)");
  const auto named = kernel_names().find(kernel);
  launches().emplace_back(named == kernel_names().end() ? "?" : named->second, grid.x * grid.y * grid.z);
  Block& b = blk();
  b.body = &body;
  b.error = nullptr;
  b.block_dim = block;
  b.grid_dim = grid;
  // allocated to its size at each launch: a vector kept from a larger launch has room past the end, where
  // AddressSanitizer would not see a kernel read or write past its shared memory
  b.smem = std::vector<unsigned char>(smem_bytes, 0xff);
  b.reverse = reverse_order();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block(b, threads);
      }
}

}  // namespace mk_emu
