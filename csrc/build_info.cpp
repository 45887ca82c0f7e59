// fastnets::cuda_build_info() -> str: what this extension was compiled for, so that a mismatch with the
// GPU at hand (an arch that was not built, an older runtime) can be reported instead of guessed.
#include <string>

#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>

#ifndef FASTNETS_CUDA_ARCHS
#define FASTNETS_CUDA_ARCHS "unknown"
#endif

namespace {

std::string cuda_build_info() {
  return std::string("archs=") + FASTNETS_CUDA_ARCHS + " cuda_runtime=" + std::to_string(CUDART_VERSION);
}

}  // namespace

// No tensor arguments, so the op is registered as a catch-all kernel: it runs without a dispatch key.
TORCH_LIBRARY_FRAGMENT(fastnets, m) {
  m.def("cuda_build_info() -> str", &cuda_build_info);
}
