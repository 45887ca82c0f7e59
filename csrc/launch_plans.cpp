// fastnets_cuda::launch_plan(str kind, int[] args) -> str: the launch plans of launch_plans.h, exactly as the
// launchers use them, for tests/test_cuda_launch_plans.py (which checks them against the GPU's limits
// without a GPU). The argument lists per kind and the text format are documented in launch_plans.h.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/headeronly/util/Exception.h>

#include "launch_plans.h"

namespace {

std::string launch_plan(std::string kind, std::vector<int64_t> args) {
  try {
    return fastnets::plan::describe(kind, args);
  } catch (const std::invalid_argument& e) {
    STD_TORCH_CHECK(false, "fastnets_cuda::", e.what());
  }
  return {};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(fastnets_cuda, m) {
  m.def("launch_plan(str kind, int[] args) -> str");
}

// No tensor arguments, hence no dispatch key: CompositeExplicitAutograd serves the call (as build_info).
STABLE_TORCH_LIBRARY_IMPL(fastnets_cuda, CompositeExplicitAutograd, m) {
  m.impl("launch_plan", TORCH_BOX(&launch_plan));
}
