// Every markovkit op schema, in one place; the kernels register their implementations per dispatch key
// next to their glue (csrc/<family>/<family>.cpp). The pybind11 module _C carries the build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <array>

#include "common/philox.h"

TORCH_LIBRARY(markovkit, m) {
  // --- random: the Philox4x32-10 stream (csrc/random) ---
  m.def("philox_uniform(Tensor like, int seed, int offset=0) -> Tensor");
  m.def("philox_normal(Tensor like, int seed, int offset=0) -> Tensor");
  // --- scan: selective scan (csrc/scan) ---
  // --- attention: sliding-window attention (csrc/attention) ---
  // --- mafbm: Markov-approximate fractional Brownian motion (csrc/mafbm) ---
  m.def("mafbm_step(Tensor x, Tensor y, Tensor drift, Tensor diffusion, Tensor omega, Tensor drop, Tensor phi, "
        "Tensor factor, float dt, Tensor? control=None, Tensor? noise=None, int seed=0, int step=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mafbm_step_backward(Tensor grad_x_next, Tensor grad_y_next, Tensor grad_kl, Tensor y, Tensor diffusion, "
        "Tensor omega, Tensor drop, Tensor phi, Tensor factor, float dt, Tensor? control, Tensor? noise, int seed, "
        "int step) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mafbm_simulate(Tensor x0, Tensor omega, Tensor drop, Tensor factor, Tensor? factor0, int n_steps, "
        "float dt, float theta, float mu, float sigma, int save_every, int seed) -> Tensor");
  m.def("mafbm_simulate_backward(Tensor grad_out, Tensor x0, Tensor omega, Tensor drop, Tensor factor, "
        "Tensor? factor0, int n_steps, float dt, float theta, float mu, float sigma, int save_every, int seed) "
        "-> Tensor");
  // --- mjp: Markov jump processes (csrc/mjp) ---
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MARKOVKIT_VERSION;
  info["torch_version"] = MARKOVKIT_TORCH_VERSION;
#ifdef MARKOVKIT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = MARKOVKIT_CUDA_ARCHS;
  return info;
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
  m.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 of a 128-bit counter under a 64-bit key");
}
