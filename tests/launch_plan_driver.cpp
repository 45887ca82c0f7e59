// The launch plans of csrc/launch_plans.h compiled on their own (no CUDA, no torch), for
// tests/test_cuda_launch_plans.py: reads lines "kind arg arg ..." on stdin and prints, per line, the plan text
// fastnets_cuda::launch_plan returns for the same arguments (or "error <message>"), then "end".
//
// Two more kinds run the kernels' shared index arithmetic on the host against plain 64-bit division:
//   planes_walk P S M vec sms tpsm       every thread of planes_elementwise_kernel's grid-stride walk
//                                        over P planes of S (plan::PlaneCursor, plan::PlanesStep): the channel
//                                        of every element of every vector, and of the tail elements
//   rows_items  groups rows C vec sms tpsm   plan::group_of_item for every work item of rows_elementwise_kernel
//   cursor_start i S M                   plan::PlaneCursor::start(i, S, M): prints "ok q r"
// the first two printing "ok <elements or items checked>" or the first mismatch.
#include <cstdint>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "launch_plans.h"

using namespace fastnets::plan;

std::string planes_walk(const std::vector<int64_t>& a) {
  const int64_t S = a[1], M = a[2], numel = a[0] * S;
  const int vec = static_cast<int>(a[3]);
  const PlanesElementwise p = planes_elementwise(numel, S, M, vec, Device{a[4], a[5]});
  const int64_t nthreads = p.launch.grid[0] * p.launch.block[0];
  const int64_t nvec = numel / vec;
  std::ostringstream out;
  int64_t checked = 0;
  auto chan = [&](int64_t i) { return (i / S) % M; };
  for (int64_t tid = 0; tid < nthreads; ++tid) {
    if (tid < numel - nvec * vec) {  // the tail, as the kernel
      const int64_t i = nvec * vec + tid;
      if (p.step.tail_chan != chan(i)) {
        out << "error tail element " << i << ": channel " << p.step.tail_chan << ", want " << chan(i) << "\n";
        return out.str();
      }
      ++checked;
    }
    if (tid >= nvec) continue;
    int64_t i = tid * vec;
    PlaneCursor at;
    at.start(i, S, M);
    for (int64_t v = tid; v < nvec; v += nthreads, i += p.step.elems) {
      const int cut = at.cut(S, vec);
      for (int k = 0; k < vec; ++k) {
        const int64_t got = k < cut ? at.q : at.next(M);
        if (got != chan(i + k) || (k == 0 && at.r != i % S)) {
          out << "error thread " << tid << " element " << i + k << ": channel " << got << " offset " << at.r
              << ", want " << chan(i + k) << " offset " << (i % S) << "\n";
          return out.str();
        }
        ++checked;
      }
      at.advance(p.step, S, M);
    }
  }
  if (checked != numel) {
    out << "error checked " << checked << " of " << numel << " elements\n";
    return out.str();
  }
  out << "ok " << checked << "\n";
  return out.str();
}

std::string rows_items(const std::vector<int64_t>& a) {
  const int64_t groups = a[0], rows = a[1], C = a[2];
  const RowsElementwise p = rows_elementwise(groups, rows, C, static_cast<int>(a[3]), Device{a[4], a[5]});
  const int64_t items = groups * p.chunks;
  std::ostringstream out;
  for (int64_t item = 0; item < items; ++item) {
    if (group_of_item(item, p.chunks) != item / p.chunks) {
      out << "error item " << item << " of " << items << " (chunks " << p.chunks << "): group "
          << group_of_item(item, p.chunks) << ", want " << item / p.chunks << "\n";
      return out.str();
    }
  }
  out << "ok " << items << "\n";
  return out.str();
}

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
      if (kind == "planes_walk" && args.size() == 6) {
        std::cout << planes_walk(args);
      } else if (kind == "cursor_start" && args.size() == 3) {
        PlaneCursor at;
        at.start(args[0], args[1], args[2]);
        std::cout << "ok " << at.q << " " << at.r << "\n";
      } else if (kind == "rows_items" && args.size() == 6) {
        std::cout << rows_items(args);
      } else {
        std::cout << describe(kind, args);
      }
    } catch (const std::exception& e) {
      std::cout << "error " << e.what() << "\n";
    }
    std::cout << "end\n" << std::flush;
  }
  return 0;
}
