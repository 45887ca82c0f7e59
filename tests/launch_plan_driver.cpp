// The launch plans of csrc/launch_plans.h compiled on their own (no CUDA, no torch), for
// tests/test_cuda_launch_plans.py: reads lines "kind arg arg ..." on stdin and prints, per line, the plan text
// fastnets_cuda::launch_plan returns for the same arguments (or "error <message>"), then "end".
#include <cstdint>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "launch_plans.h"

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string kind;
    in >> kind;
    std::vector<int64_t> args;
    int64_t v;
    while (in >> v) args.push_back(v);
    try {
      std::cout << fastnets::plan::describe(kind, args);
    } catch (const std::exception& e) {
      std::cout << "error " << e.what() << "\n";
    }
    std::cout << "end\n" << std::flush;
  }
  return 0;
}
