// CUDA kernels of the Gillespie simulators. The per-path code is the CPU kernels' (mjp.h): both devices produce the
// same paths.
//
// CTMCs (grid and events records): each thread runs several paths back to back in one loop whose body is one jump
// (ctmc_kernel). Reaction networks: one thread per path. With >= 32 paths per process a block covers a chunk of
// the paths of one process and stages the network and that process's rate constants in shared memory (when they
// fit in 48 KiB; else it reads them from global memory); blocks stride over (process, chunk) pairs. With fewer
// paths, threads run over the flat (process, path) index and read the parameters from global memory (L1), so
// that warps stay full.
#include <algorithm>

#include "mjp/mjp.h"

namespace markovkit {
namespace {

constexpr int64_t kMaxStagedBytes = 48 * 1024;
constexpr int64_t kMaxThreads = 256;
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr int64_t kMinBlockPaths = 32;  // fewer paths per process: the flat reaction kernel
constexpr int64_t kPathsPerThread = 8;  // CTMC kernel
constexpr int64_t kFullThreads = int64_t{1} << 18;

// Paths of a process split into `chunks` blocks of `threads` (a multiple of 32) with little idle tail.
struct Plan {
  int64_t chunks;
  int threads;
  unsigned grid;
};

Plan plan_for(int64_t B, int64_t P) {
  const int64_t chunks = std::max<int64_t>((P + kMaxThreads - 1) / kMaxThreads, 1);
  const int64_t per = (P + chunks - 1) / chunks;
  const int threads = static_cast<int>(std::max<int64_t>((per + 31) / 32 * 32, 32));
  return {chunks, threads, static_cast<unsigned>(std::min(B * chunks, kMaxGrid))};
}

__global__ void ctmc_exit_kernel(CtmcParams p) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < p.n_q * p.S) p.exit[row] = mjp_row_sum(p.rates + row * p.S, p.S, row % p.S);
}

unsigned flat_grid(int64_t n) {
  return static_cast<unsigned>(std::min((n + kMaxThreads - 1) / kMaxThreads, kMaxGrid));
}

// Thread j runs the paths j, j + T, j + 2T, ... (flat index b * P + path; T threads in all), a thread whose path
// is done starting its next one inside the same loop body: the threads of a warp keep jumping in step, each on its
// own path, instead of idling until the warp's longest path (jump counts vary from path to path) ends, as with
// one path per thread. Rates and exit rates come from global memory (L1: the threads of a warp mostly share a
// process). Path: CtmcGridPath<Out> or CtmcEventsPath<Out>.
template <typename Path>
__device__ Path ctmc_path(const CtmcParams& p, int64_t i) {
  const int64_t b = i / p.P;
  const int64_t qb = p.n_q == 1 ? 0 : b;
  return Path(p, p.rates + qb * p.S * p.S, p.exit + qb * p.S, b, i % p.P);
}

template <typename Path>
__global__ void ctmc_kernel(CtmcParams p) {
  const int64_t n = p.B * p.P, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  Path path = ctmc_path<Path>(p, i);
  for (;;) {
    if (path.step()) continue;
    i += stride;
    if (i >= n) return;
    path = ctmc_path<Path>(p, i);
  }
}

// Blocks of ctmc_kernel for n paths: kPathsPerThread paths a thread, but at least kFullThreads threads while there
// are as many paths (an H100 holds 132 SMs x 1024 threads of this kernel at once at its 56 registers a thread).
unsigned ctmc_blocks(int64_t n) {
  const int64_t threads = std::max(std::min(n, kFullThreads), (n + kPathsPerThread - 1) / kPathsPerThread);
  return static_cast<unsigned>(std::min((threads + kMaxThreads - 1) / kMaxThreads, kMaxGrid));
}

template <typename Path>
void ctmc_launch(const CtmcParams& p, cudaStream_t stream) {
  ctmc_kernel<Path><<<ctmc_blocks(p.B * p.P), kMaxThreads, 0, stream>>>(p);
}

// Calls fn(Out{}) for the integer type Out of the state outputs.
template <typename Fn>
void with_state_type(StateType t, const Fn& fn) {
  switch (t) {
    case StateType::kUInt8: return fn(uint8_t{});
    case StateType::kInt16: return fn(int16_t{});
    case StateType::kInt32: return fn(int32_t{});
  }
}

__global__ void reactions_flat_kernel(ReactionParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.B * p.P; i += stride) {
    const int64_t b = i / p.P;
    reaction_grid_path(p, p.reactants, p.change, p.rates + b * p.rates_stride, p.affects, b, i % p.P);
  }
}

__global__ void reactions_kernel(ReactionParams p, int64_t chunks, bool staged) {
  extern __shared__ double smem[];  // staged: k (R,), then alpha and nu (R, N) as int32, then affects (R, R)
  const int64_t RN = p.R * p.N;
  double* k_smem = smem;
  int32_t* alpha_smem = reinterpret_cast<int32_t*>(smem + p.R);
  int32_t* nu_smem = alpha_smem + RN;
  uint8_t* affects_smem = reinterpret_cast<uint8_t*>(nu_smem + RN);
  if (staged) {
    for (int64_t j = threadIdx.x; j < RN; j += blockDim.x) {
      alpha_smem[j] = p.reactants[j];
      nu_smem[j] = p.change[j];
    }
    for (int64_t j = threadIdx.x; j < p.R * p.R; j += blockDim.x) affects_smem[j] = p.affects[j];
  }
  for (int64_t blk = blockIdx.x; blk < p.B * chunks; blk += gridDim.x) {
    const int64_t b = blk / chunks;
    const int32_t* alpha = p.reactants;
    const int32_t* nu = p.change;
    const uint8_t* affects = p.affects;
    const double* k = p.rates + b * p.rates_stride;
    if (staged) {
      __syncthreads();  // the previous iteration's paths no longer read k_smem
      for (int64_t j = threadIdx.x; j < p.R; j += blockDim.x) k_smem[j] = k[j];
      __syncthreads();
      alpha = alpha_smem;
      nu = nu_smem;
      affects = affects_smem;
      k = k_smem;
    }
    const int64_t path = (blk % chunks) * blockDim.x + threadIdx.x;
    if (path < p.P) reaction_grid_path(p, alpha, nu, k, affects, b, path);
  }
}

}  // namespace

void ctmc_exit_rates_cuda(const CtmcParams& p, cudaStream_t stream) {
  const int64_t rows = p.n_q * p.S;
  if (rows == 0) return;
  ctmc_exit_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(p);
}

void ctmc_grid_cuda(const CtmcParams& p, cudaStream_t stream) {
  if (p.B * p.P == 0) return;
  with_state_type(p.state_type, [&](auto out) { ctmc_launch<CtmcGridPath<decltype(out)>>(p, stream); });
}

void ctmc_events_cuda(const CtmcParams& p, cudaStream_t stream) {
  if (p.B * p.P == 0) return;
  with_state_type(p.state_type, [&](auto out) { ctmc_launch<CtmcEventsPath<decltype(out)>>(p, stream); });
}

void reactions_grid_cuda(const ReactionParams& p, cudaStream_t stream) {
  if (p.B * p.P == 0) return;
  if (p.P < kMinBlockPaths) {
    reactions_flat_kernel<<<flat_grid(p.B * p.P), kMaxThreads, 0, stream>>>(p);
    return;
  }
  const Plan plan = plan_for(p.B, p.P);
  const int64_t bytes = p.R * static_cast<int64_t>(sizeof(double) + 2 * sizeof(int32_t) * p.N + p.R);
  const bool staged = bytes <= kMaxStagedBytes;
  reactions_kernel<<<plan.grid, plan.threads, staged ? bytes : 0, stream>>>(p, plan.chunks, staged);
}

}  // namespace markovkit
