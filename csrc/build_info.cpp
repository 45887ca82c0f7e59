// fastnets_cuda::build_info() -> str: what this extension was compiled for, so that a mismatch with the
// GPU at hand (an arch that was not built, an older runtime) can be reported instead of guessed.
//
// The same facts, with the stable-ABI target and the torch it was built with, are also kept as a plain
// string in the library (kBuildStamp), which fastnets/_extension.py reads from the file WITHOUT loading it:
// on a torch too old for the ABI target, loading would only fail with an "undefined symbol".
#include <string>

#include <cuda_runtime_api.h>  // CUDART_VERSION

#include <torch/csrc/stable/library.h>

#ifndef FASTNETS_CUDA_ARCHS
#define FASTNETS_CUDA_ARCHS "unknown"
#endif
#ifndef FASTNETS_BUILD_STAMP
#define FASTNETS_BUILD_STAMP "unknown"
#endif

namespace {

// Kept in .rodata even though nothing reads it at run time.
[[gnu::used]] const char kBuildStamp[] = "FASTNETS_BUILD_STAMP{" FASTNETS_BUILD_STAMP "}";

std::string build_info() {
  return std::string("archs=") + FASTNETS_CUDA_ARCHS + " cuda_runtime=" + std::to_string(CUDART_VERSION);
}

}  // namespace

// The one definition of the extension's namespace (the .cu files add fragments to it): the internal ops of
// the cuda backend, apart from the user-facing torch.ops.fastnets ops that the Python package registers.
STABLE_TORCH_LIBRARY(fastnets_cuda, m) {
  m.def("build_info() -> str");
}

// No tensor arguments, hence no dispatch key: CompositeExplicitAutograd kernels also serve that case.
STABLE_TORCH_LIBRARY_IMPL(fastnets_cuda, CompositeExplicitAutograd, m) {
  m.impl("build_info", TORCH_BOX(&build_info));
}
