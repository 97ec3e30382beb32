// Glue for selective_scan_fwd / selective_scan_bwd / selective_state_update: checks, params, partial
// buffers and their fixed-order reductions, stream; CPU and CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/backend.h"
#include "common/torch_checks.h"
#include "scan/scan_params.h"

namespace markovkit {
namespace {

constexpr int64_t kCpuBlk = 16;  // channels per CPU backward task

// Device, contiguity and dtype of an optional or required argument.
void check_arg(const at::Tensor& t, const char* name, const at::Tensor& u, at::ScalarType dtype) {
  check_same_device(t, name, u, "u");
  check_dtype(t, name, {dtype});
  check_contiguous(t, name);
}

at::ScalarType weight_type(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// B or C: constant (dim, dstate) in the weight type, or per step (batch, groups, dstate, seqlen) in u's dtype.
bool check_BC(const at::Tensor& t, const char* name, const at::Tensor& u, int64_t dstate, int64_t* groups) {
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  if (t.dim() == 2) {
    check_arg(t, name, u, weight_type(u));
    check_shape(t, name, {dim, dstate});
    return false;
  }
  TORCH_CHECK(t.dim() == 4, name, ": expected shape (dim, dstate) = (", dim, ", ", dstate,
              ") or (batch, groups, dstate, seqlen), got ", t.sizes());
  check_arg(t, name, u, u.scalar_type());
  const int64_t g = t.size(1);
  TORCH_CHECK(g >= 1 && dim % g == 0, name, ": expected a number of groups dividing dim = ", dim, ", got ", g);
  check_shape(t, name, {batch, g, dstate, L});
  TORCH_CHECK(*groups == 0 || *groups == g, name, ": expected ", *groups, " groups (as the other of B, C), got ", g);
  *groups = g;
  return true;
}

void check_cu_seqlens_values(const at::Tensor& cu, int64_t L) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK(c[0] == 0 && c[n - 1] == L, "cu_seqlens: expected to start at 0 and end at seqlen = ", L,
              ", got ", c[0], " and ", c[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(c[i] >= c[i - 1], "cu_seqlens: expected non-decreasing offsets, got ", c[i - 1], " then ", c[i],
                " at index ", i);
  }
}

// The decode step's state_batch_indices on the CPU (CUDA checks them on the device): rows < state_rows, the
// non-negative ones distinct.
template <typename index_t>
void check_state_rows(const at::Tensor& rows, int64_t state_rows) {
  const index_t* r = rows.data_ptr<index_t>();
  std::vector<int64_t> first(state_rows, -1);  // the batch element that took each row
  for (int64_t b = 0; b < rows.numel(); ++b) {
    const int64_t row = r[b];
    if (row < 0) continue;
    TORCH_CHECK(row < state_rows, "state_batch_indices: expected rows < ", state_rows, " (state.size(0)), got ", row);
    TORCH_CHECK(first[row] < 0, "state_batch_indices: expected distinct rows, got ", row, " at indices ", first[row],
                " and ", b);
    first[row] = b;
  }
}

// Checks every input of the scan and fills the params' sizes, flags and input pointers.
ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                       bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                       const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(u.dim() == 3, "u: expected shape (batch, dim, seqlen), got ", u.sizes());
  const at::ScalarType itype = u.scalar_type();
  dtype_of(u, "u");
  check_contiguous(u, "u");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_arg(delta, "delta", u, itype);
  check_shape(delta, "delta", u.sizes());
  const at::ScalarType wtype = weight_type(u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "A: expected shape (dim, dstate) with dim = ", dim, ", got ",
              A.sizes());
  check_arg(A, "A", u, wtype);
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kScanMaxDstate, "A: expected dstate in [1, ", kScanMaxDstate, "], got ", N);
  // the CUDA backward keeps a chunk of states in shared memory: float64 fits up to 128 states
  TORCH_CHECK(!(!runs_cpu_kernel(u) && itype == at::kDouble && N > 128),
              "A: expected dstate <= 128 for float64 inputs on CUDA, got ", N);
  int64_t groups = 0;
  const bool var_B = check_BC(B, "B", u, N, &groups);
  const bool var_C = check_BC(C, "C", u, N, &groups);
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&delta_bias, "delta_bias"}}) {
    if (!*t) continue;
    check_arg(**t, name, u, wtype);
    check_shape(**t, name, {dim});
  }
  if (z) {
    check_arg(*z, "z", u, itype);
    check_shape(*z, "z", u.sizes());
  }
  int64_t nseq = batch;
  if (cu_seqlens) {
    check_same_device(*cu_seqlens, "cu_seqlens", u, "u");
    check_dtype(*cu_seqlens, "cu_seqlens", {at::kInt});
    check_contiguous(*cu_seqlens, "cu_seqlens");
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2,
                "cu_seqlens: expected shape (nseq + 1,) with nseq >= 1, got ", cu_seqlens->sizes());
    TORCH_CHECK(batch == 1, "u: expected batch 1 with cu_seqlens (sequences packed along seqlen), got batch ",
                batch);
    TORCH_CHECK(L <= INT32_MAX, "cu_seqlens: its int32 offsets address at most 2^31 - 1 packed positions, got ",
                "seqlen = ", L);
    nseq = cu_seqlens->size(0) - 1;
    // on CUDA the passes check the values on the device (scan_check_kernel.cu): no host sync
    if (runs_cpu_kernel(u)) check_cu_seqlens_values(*cu_seqlens, L);
  }
  if (initial_state) {
    check_arg(*initial_state, "initial_state", u, wtype);
    check_shape(*initial_state, "initial_state", {nseq, dim, N});
  }
  ScanParams p{};
  p.batch = batch;
  p.dim = dim;
  p.seqlen = L;
  p.dstate = N;
  p.groups = groups == 0 ? 1 : groups;
  p.n_chunks = (L + kScanChunk - 1) / kScanChunk;
  p.nseq = nseq;
  p.itype = dtype_of(u, "u");
  p.var_B = var_B;
  p.var_C = var_C;
  p.softplus = delta_softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.A = A.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.D = ptr_or_null(D);
  p.z = ptr_or_null(z);
  p.delta_bias = ptr_or_null(delta_bias);
  p.h0 = ptr_or_null(initial_state);
  p.cu_seqlens = cu_seqlens ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  return p;
}

#ifdef MARKOVKIT_WITH_CUDA
// What the CUDA launchers plan with, of the current device.
void set_device_facts(ScanParams& p) {
  p.sm_count = device_attribute(cudaDevAttrMultiProcessorCount);
  p.smem_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}
#endif

// Returns (out, last_state, chunk_states).
std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens) {
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens);
  const auto wopts = u.options().dtype(weight_type(u));
  at::Tensor out = at::empty_like(u);
  at::Tensor last_state = at::empty({p.nseq, p.dim, p.dstate}, wopts);
  // flat: an axis of n_chunks can be 1, and a size-1 axis makes torch.export specialise seqlen to one chunk
  at::Tensor chunk_states = at::empty({p.batch * p.dim * p.n_chunks * p.dstate}, wopts);
  p.out = out.data_ptr();
  p.last_state = last_state.data_ptr();
  p.chunk_states = chunk_states.data_ptr();
  MK_LAUNCH(u, scan_fwd_cpu(p), (set_device_facts(p), scan_fwd_cuda(p, stream)));
  return {out, last_state, chunk_states};
}

// Sums part (outer, K, inner) over K in order into out (outer, inner).
void reduce_into(const at::Tensor& part, const at::Tensor& out, int64_t outer, int64_t K, int64_t inner) {
  ScanReduceParams r{part.data_ptr(), out.data_ptr(), outer, K, inner, dtype_of(part, "part"),
                     dtype_of(out, "out")};
  MK_LAUNCH(part, scan_reduce_cpu(r), scan_reduce_cuda(r, stream));
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); dz is empty (0,) without z.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                   const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                   const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens,
                   const at::Tensor& chunk_states, const at::Tensor& dout,
                   const std::optional<at::Tensor>& dlast_state) {
  ScanParams f = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens);
  const at::ScalarType wtype = weight_type(u);
  check_arg(chunk_states, "chunk_states", u, wtype);
  check_shape(chunk_states, "chunk_states", {f.batch * f.dim * f.n_chunks * f.dstate});
  f.chunk_states = chunk_states.data_ptr();
  check_arg(dout, "dout", u, u.scalar_type());
  check_shape(dout, "dout", u.sizes());
  if (dlast_state) {
    check_arg(*dlast_state, "dlast_state", u, wtype);
    check_shape(*dlast_state, "dlast_state", {f.nseq, f.dim, f.dstate});
  }
  const int64_t N = f.dstate, L = f.seqlen;
  const auto wopts = u.options().dtype(wtype);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  at::Tensor dz = z ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dh0 = at::empty({f.nseq, f.dim, N}, wopts);
  ScanBwdParams q{f, dout.data_ptr(), ptr_or_null(dlast_state), kCpuBlk, 0, du.data_ptr(), ddelta.data_ptr(),
                  z ? dz.data_ptr() : nullptr, dh0.data_ptr()};
#ifdef MARKOVKIT_WITH_CUDA
  if (!runs_cpu_kernel(u)) {
    const c10::cuda::CUDAGuard guard(u.device());
    set_device_facts(q.f);
    const ScanBwdLaunch launch = scan_bwd_cuda_launch(q);
    TORCH_CHECK(launch.smem <= q.f.smem_optin, "selective_scan backward on CUDA: dstate ", N, " with ",
                u.scalar_type(), " inputs needs ", (launch.smem + 1023) / 1024,
                " KB of shared memory per block; this GPU allows ", q.f.smem_optin / 1024, " KB");
    q.blk = launch.blk;
  }
#endif
  const int64_t dpg = f.dim / f.groups, blk = q.blk, nblk = (dpg + blk - 1) / blk;
  q.nblk = nblk;
  TORCH_CHECK(runs_cpu_kernel(u) || f.batch * f.groups * nblk <= INT32_MAX, "selective_scan backward on CUDA: ",
              "expected at most 2^31 - 1 thread blocks, got batch * groups * ceil(dim / groups / ", blk, ") = ",
              f.batch * f.groups * nblk, " (batch ", f.batch, "): split the batch");
  at::Tensor dA_part = at::empty({f.batch, f.dim, N}, wopts);
  at::Tensor dD_part = at::empty({f.batch, f.dim}, wopts), dbias_part = at::empty({f.batch, f.dim}, wopts);
  // per-step partials, every element written once: time-major on the CPU
  auto BC_part = [&](bool var) {
    if (!var) return at::empty({f.batch, f.dim, N}, wopts);
    return runs_cpu_kernel(u) ? at::empty({f.batch, f.groups, nblk, L, N}, wopts)
                      : at::empty({f.batch, f.groups, nblk, N, L}, wopts);
  };
  at::Tensor dB_part = BC_part(f.var_B), dC_part = BC_part(f.var_C);
  q.dA_part = dA_part.data_ptr();
  q.dD_part = dD_part.data_ptr();
  q.dbias_part = dbias_part.data_ptr();
  q.dB_part = dB_part.data_ptr();
  q.dC_part = dC_part.data_ptr();
  MK_LAUNCH(u, scan_bwd_cpu(q), scan_bwd_cuda(q, stream));

  at::Tensor dA = at::empty_like(A), dD = at::empty({f.dim}, wopts), dbias = at::empty({f.dim}, wopts);
  reduce_into(dA_part, dA, 1, f.batch, f.dim * N);
  reduce_into(dD_part, dD, 1, f.batch, f.dim);
  reduce_into(dbias_part, dbias, 1, f.batch, f.dim);
  auto BC_grad = [&](const at::Tensor& part, const at::Tensor& X, bool var) {
    at::Tensor g = at::empty_like(X);
    if (var && runs_cpu_kernel(u)) {
      at::Tensor sum = at::empty({f.batch, f.groups, L, N}, wopts);
      reduce_into(part, sum, f.batch * f.groups, nblk, L * N);
      g.copy_(sum.transpose(2, 3));
    } else if (var) {
      reduce_into(part, g, f.batch * f.groups, nblk, N * L);
    } else {
      reduce_into(part, g, 1, f.batch, f.dim * N);
    }
    return g;
  };
  at::Tensor dB = BC_grad(dB_part, B, f.var_B), dC = BC_grad(dC_part, C, f.var_C);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dh0};
}

// One decode step: state (batch, dim, dstate), or (rows, dim, dstate) with state_batch_indices (batch,), updated in
// place; returns out (batch, dim).
at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                  const std::optional<at::Tensor>& state_batch_indices) {
  TORCH_CHECK(x.dim() == 2, "x: expected shape (batch, dim), got ", x.sizes());
  dtype_of(x, "x");
  check_contiguous(x, "x");
  const int64_t batch = x.size(0), dim = x.size(1);
  const at::ScalarType itype = x.scalar_type(), wtype = weight_type(x);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "A: expected shape (dim, dstate) with dim = ", dim, ", got ",
              A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kScanMaxDstate, "A: expected dstate in [1, ", kScanMaxDstate, "], got ", N);
  check_same_device(A, "A", x, "x");
  check_dtype(A, "A", {wtype});
  check_contiguous(A, "A");
  check_same_device(state, "state", x, "x");
  check_dtype(state, "state", {wtype});
  check_contiguous(state, "state");
  const std::optional<at::Tensor>& rows = state_batch_indices;
  if (rows) {
    check_same_device(*rows, "state_batch_indices", x, "x");
    check_dtype(*rows, "state_batch_indices", {at::kInt, at::kLong});
    check_contiguous(*rows, "state_batch_indices");
    check_shape(*rows, "state_batch_indices", {batch});
    TORCH_CHECK(state.dim() == 3 && state.size(1) == dim && state.size(2) == N,
                "state: expected shape (rows, dim, dstate) = (rows, ", dim, ", ", N, "), got ", state.sizes());
    if (runs_cpu_kernel(x)) {  // on CUDA the step kernels check them on the device: no host sync
      rows->scalar_type() == at::kInt ? check_state_rows<int32_t>(*rows, state.size(0))
                                      : check_state_rows<int64_t>(*rows, state.size(0));
    }
  } else {
    check_shape(state, "state", {batch, dim, N});
  }
  TORCH_CHECK(!(state.requires_grad() && at::GradMode::is_enabled()),
              "state: expected a tensor that does not require grad (the decode step updates it in place and has no "
              "derivative: pass state.detach() or step under torch.no_grad()), got one that requires grad");
  check_same_device(dt, "dt", x, "x");
  check_dtype(dt, "dt", {itype});
  check_contiguous(dt, "dt");
  check_shape(dt, "dt", x.sizes());
  TORCH_CHECK(B.dim() == 3, "B: expected shape (batch, groups, dstate), got ", B.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "B: expected a number of groups dividing dim = ", dim, ", got ",
              groups);
  for (const auto& [t, name] : {std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    check_same_device(*t, name, x, "x");
    check_dtype(*t, name, {itype});
    check_contiguous(*t, name);
    check_shape(*t, name, {batch, groups, N});
  }
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&dt_bias, "dt_bias"}}) {
    if (!*t) continue;
    check_same_device(**t, name, x, "x");
    check_dtype(**t, name, {wtype});
    check_contiguous(**t, name);
    check_shape(**t, name, {dim});
  }
  if (z) {
    check_same_device(*z, "z", x, "x");
    check_dtype(*z, "z", {itype});
    check_contiguous(*z, "z");
    check_shape(*z, "z", x.sizes());
  }
  at::Tensor out = at::empty_like(x);
  ScanStepParams p{batch, dim, N, groups, dtype_of(x, "x"), dt_softplus, state.data_ptr(), ptr_or_null(rows),
                   rows && rows->scalar_type() == at::kLong, state.size(0), x.data_ptr(), dt.data_ptr(), A.data_ptr(),
                   B.data_ptr(), C.data_ptr(), ptr_or_null(D), ptr_or_null(z), ptr_or_null(dt_bias), out.data_ptr()};
  MK_LAUNCH(x, scan_step_cpu(p), scan_step_cuda(p, stream));
  state.unsafeGetTensorImpl()->bump_version();  // as torch's in-place ops: earlier saves of state are stale now
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(markovkit, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("selective_state_update", &selective_state_update);
}

#ifdef MARKOVKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(markovkit, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("selective_state_update", &selective_state_update);
}
#endif

}  // namespace markovkit
