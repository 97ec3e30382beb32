// Glue for sliding_window_attention_fwd / _bwd: input checks, params, stream; CPU and CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "attention/swa_params.h"
#include "common/backend.h"
#include "common/torch_checks.h"

namespace markovkit {
namespace {

void check_dtypes(const at::Tensor& q) {
  if (runs_cpu_kernel(q)) {
    check_dtype(q, "q", {at::kFloat, at::kDouble});  // the Python wrapper upcasts bfloat16 / float16
  } else {
    check_dtype(q, "q", {at::kHalf, at::kBFloat16});
  }
}

// q: (batch, seqlen, heads, headdim), k, v: (batch, seqlen, kv_heads, headdim).
SwaShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, int64_t sink,
                      double scale) {
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dims (batch, seqlen, heads, headdim), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected 4 dims (batch, seqlen, kv_heads, headdim), got shape ", k.sizes());
  check_dtypes(q);
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_same_device(*t, name, q, "q");
    check_same_dtype(*t, name, q, "q");
  }
  check_shape(v, "v", k.sizes());
  const int64_t batch = q.size(0), seqlen = q.size(1), heads = q.size(2), headdim = q.size(3);
  const int64_t kv_heads = k.size(2);
  check_shape(k, "k", {batch, seqlen, kv_heads, headdim});
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "k: expected kv_heads dividing heads = ", heads, ", got ",
              kv_heads);
  TORCH_CHECK(headdim == 32 || headdim == 64 || headdim == 96 || headdim == 128 || headdim == 256,
              "q: expected headdim 32, 64, 96, 128 or 256, got ", headdim);
  TORCH_CHECK(window >= 1, "window: expected >= 1 (keys seen including self), got ", window);
  TORCH_CHECK(sink >= 0, "sink: expected >= 0, got ", sink);
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "softmax_scale: expected a finite positive number, got ", scale);
  if (!runs_cpu_kernel(q)) {
    TORCH_CHECK(batch * heads <= 65535, "q: expected batch * heads <= 65535 on CUDA (grid limit), got ",
                batch * heads);
    TORCH_CHECK(seqlen < (int64_t{1} << 31) - 256, "q: expected seqlen < 2^31 - 256 on CUDA (32-bit positions), got ",
                seqlen);
  }
  // a window or sink of seqlen or more admits what seqlen does (every earlier key): the same op, with every
  // position, window and sink of a CUDA launch in 32 bits
  const int64_t window_c = std::min(window, std::max<int64_t>(seqlen, 1)), sink_c = std::min(sink, seqlen);
  return {batch, seqlen, heads, kv_heads, headdim, window_c, sink_c, scale, dtype_of(q, "q")};
}

#ifdef MARKOVKIT_WITH_CUDA
// Compute capability of the current device, 10 major + minor.
int device_cc() {
  return 10 * device_attribute(cudaDevAttrComputeCapabilityMajor) + device_attribute(cudaDevAttrComputeCapabilityMinor);
}

// The kernels' shared memory at this headdim fits the current device's per-block opt-in limit.
void check_cuda_smem(const SwaShape& s, int cc, bool backward) {
  const int64_t need = swa_cuda_smem_bytes(s.headdim, cc, backward);
  const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK(need <= limit, "q: headdim ", s.headdim, " needs ", need, " bytes of shared memory per block in the ",
              backward ? "backward" : "forward", " kernels, this device allows ", limit);
}
#endif

// t contiguous, and 16-byte aligned for the CUDA kernels' vector loads.
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (!runs_cpu_kernel(c) && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// float32 statistics, float64 for float64 inputs.
at::ScalarType stat_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> swa_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           int64_t window, int64_t sink, double scale) {
  const SwaShape s = check_inputs(q_in, k_in, v_in, window, sink, scale);
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.seqlen}, q.options().dtype(stat_type(q)));
  if (q.numel() == 0) return {out, lse};
  SwaFwdParams p{s, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), 0};
  MK_LAUNCH(q, swa_forward_cpu(p), (p.cc = device_cc(), check_cuda_smem(s, p.cc, false), swa_forward_cuda(p, stream)));
  return {out, lse};
}

// dout, out: like q; lse (and dlse when given): (batch, heads, seqlen).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd(const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse,
                                                       const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& out,
                                                       const at::Tensor& lse_in, int64_t window, int64_t sink,
                                                       double scale) {
  const SwaShape s = check_inputs(q_in, k_in, v_in, window, sink, scale);
  const at::ScalarType st = stat_type(q_in);
  for (auto [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out, "out"}}) {
    check_same_device(*t, name, q_in, "q");
    check_shape(*t, name, q_in.sizes());
    check_dtype(*t, name, {q_in.scalar_type()});
  }
  check_same_device(lse_in, "lse", q_in, "q");
  check_shape(lse_in, "lse", {s.batch, s.heads, s.seqlen});
  check_dtype(lse_in, "lse", {st});
  at::Tensor dlse_dense;
  if (dlse.has_value()) {
    check_same_device(*dlse, "dlse", q_in, "q");
    check_shape(*dlse, "dlse", {s.batch, s.heads, s.seqlen});
    check_dtype(*dlse, "dlse", {st});
    dlse_dense = dlse->contiguous();
  }
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
  const at::Tensor o = dense(out), dout = dense(dout_in), lse = lse_in.contiguous();
  at::Tensor delta = at::empty({s.batch, s.heads, s.seqlen}, lse.options());  // the kernels' workspace
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  SwaBwdParams p{s, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), dout.data_ptr(), lse.data_ptr(),
                 dlse_dense.defined() ? dlse_dense.data_ptr() : nullptr, delta.data_ptr(), dq.data_ptr(),
                 dk.data_ptr(), dv.data_ptr(), 0};
  MK_LAUNCH(q, swa_backward_cpu(p), (p.cc = device_cc(), check_cuda_smem(s, p.cc, true), swa_backward_cuda(p, stream)));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(markovkit, CPU, m) {
  m.impl("sliding_window_attention_fwd", &swa_fwd);
  m.impl("sliding_window_attention_bwd", &swa_bwd);
}

#ifdef MARKOVKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(markovkit, CUDA, m) {
  m.impl("sliding_window_attention_fwd", &swa_fwd);
  m.impl("sliding_window_attention_bwd", &swa_bwd);
}
#endif

}  // namespace markovkit
