// Every markovkit op schema, in one place; the kernels register their implementations per dispatch key
// next to their glue (csrc/<family>/<family>.cpp). The pybind11 module _C carries the build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "build_facts.h"
#include "common/cpu_isa.h"
#include "common/philox.h"

TORCH_LIBRARY(markovkit, m) {
  // --- random: the Philox4x32-10 stream (csrc/random) ---
  m.def("philox_uniform(Tensor like, SymInt seed, SymInt offset=0) -> Tensor");
  m.def("philox_normal(Tensor like, SymInt seed, SymInt offset=0) -> Tensor");
  // --- scan: selective scan (csrc/scan) ---
  // selective_scan_fwd -> (out, last_state, chunk_states); the backward recomputes from chunk_states.
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? cu_seqlens) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); dz is empty without z.
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? cu_seqlens, "
        "Tensor chunk_states, Tensor dout, Tensor? dlast_state) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // one decode step; updates state (its rows state_batch_indices, when given) in place and returns out
  m.def("selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices=None) -> Tensor");
  // --- attention: sliding-window attention (csrc/attention) ---
  // window, sink SymInt: under torch.compile a new window is no new graph per value
  m.def("sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, SymInt window, SymInt sink, "
        "float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def("sliding_window_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, SymInt window, SymInt sink, float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // --- mafbm: Markov-approximate fractional Brownian motion (csrc/mafbm) ---
  m.def("mafbm_step(Tensor x, Tensor y, Tensor drift, Tensor diffusion, Tensor omega, Tensor drop, Tensor phi, "
        "Tensor factor, float dt, Tensor? control=None, Tensor? noise=None, SymInt seed=0, SymInt step=0, "
        "SymInt path_offset=0) -> (Tensor, Tensor, Tensor)");
  m.def("mafbm_step_backward(Tensor grad_x_next, Tensor grad_y_next, Tensor grad_kl, Tensor y, Tensor diffusion, "
        "Tensor omega, Tensor drop, Tensor phi, Tensor factor, float dt, Tensor? control, Tensor? noise, SymInt seed, "
        "SymInt step, SymInt path_offset=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mafbm_simulate(Tensor x0, Tensor omega, Tensor drop, Tensor factor, Tensor? factor0, int n_steps, "
        "float dt, float theta, float mu, float sigma, int save_every, SymInt seed, SymInt path_offset=0) -> Tensor");
  m.def("mafbm_simulate_backward(Tensor grad_out, Tensor x0, Tensor omega, Tensor drop, Tensor factor, "
        "Tensor? factor0, int n_steps, float dt, float theta, float mu, float sigma, int save_every, SymInt seed, "
        "SymInt path_offset=0) -> Tensor");
  // --- mjp: Markov jump processes (csrc/mjp) ---
  m.def("mjp_ctmc_grid(Tensor Q, Tensor? x0, Tensor? p0, Tensor t_grid, SymInt processes, SymInt paths, "
        "SymInt seed, SymInt process_offset=0, SymInt path_offset=0) -> Tensor");
  // t_end: a one-element float64 CPU tensor, so that a new horizon is no new graph under torch.compile
  m.def("mjp_ctmc_events(Tensor Q, Tensor? x0, Tensor? p0, Tensor t_end, SymInt processes, SymInt paths, "
        "SymInt max_events, SymInt seed, SymInt process_offset=0, SymInt path_offset=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mjp_reactions_grid(Tensor reactants, Tensor products, Tensor rates, Tensor x0, Tensor t_grid, SymInt seed, "
        "SymInt process_offset=0, SymInt path_offset=0) -> Tensor");
}

// The ops without a derivative (the backward ops, the decode step, the samplers): where an input requires grad,
// their floating outputs get a node that raises "derivative for markovkit::<op> is not implemented" when a
// backward reaches it (a double backward of the scan, the attention or the MA-fBM step; a loss through the decode
// step), in place of PyTorch's fallback, which only warns and leaves those gradients zero or None. It also refuses
// the decode step's in-place update of a leaf state that requires grad.
TORCH_LIBRARY_IMPL(markovkit, Autograd, m) {
  for (const char* op : {"philox_uniform", "philox_normal", "selective_scan_bwd", "selective_state_update",
                         "sliding_window_attention_bwd", "mafbm_step_backward", "mafbm_simulate",
                         "mafbm_simulate_backward", "mjp_ctmc_grid", "mjp_ctmc_events", "mjp_reactions_grid"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

#ifdef MARKOVKIT_CUDA_EMULATION
namespace mk_emu {
void set_enabled(bool on);
std::vector<std::pair<std::string, unsigned>> take_launches();
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MARKOVKIT_VERSION;
  info["torch_version"] = MARKOVKIT_TORCH_VERSION;
#if defined(MARKOVKIT_WITH_CUDA) && !defined(MARKOVKIT_CUDA_EMULATION)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = MARKOVKIT_CUDA_ARCHS;
#ifdef MARKOVKIT_CUDA_EMULATION
  info["cuda_emulation"] = true;
#else
  info["cuda_emulation"] = false;
#endif
  return info;
}

// The copy of the CPU kernels this process runs (common/cpu_isa.h): "default", "avx2" or "avx512".
std::string cpu_isa() {
  switch (markovkit::cpu_isa()) {
    case markovkit::CpuIsa::kAvx512: return "avx512";
    case markovkit::CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

// The raw generator, for known-answer tests of the header the kernels use.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
  const markovkit::Philox4 out = markovkit::philox4x32_10({{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "markovkit's compiled ops (registered under torch.ops.markovkit) and build facts";
  m.def("build_info", &build_info, "version, torch version built against, CUDA on/off, CUDA archs");
  m.def("cpu_isa", &cpu_isa, "the CPU kernels' instruction set in this process (ATEN_CPU_CAPABILITY lowers it)");
  m.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 of a 128-bit counter under a 64-bit key");
#ifdef MARKOVKIT_CUDA_EMULATION
  m.def("set_cuda_emulation", &mk_emu::set_enabled, "send CPU tensors through the CUDA kernels (emulation build)");
  m.def("take_emulated_launches", &mk_emu::take_launches, "the kernels launched since the last call (emulation)");
#endif
}
