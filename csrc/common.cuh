// What every .cu file of fastnets._C shares: device helpers (warp constants, 16-byte packs, NaN-keeping relu,
// correctly rounded division), the dtype dispatch, and the host-side checks, each raising a RuntimeError that
// names the op and the argument.
//
// fastnets._C is built on the LibTorch stable ABI (setup.py: TORCH_TARGET_VERSION = torch 2.10): only
// torch/csrc/stable and torch/headeronly headers, so that one binary loads on every torch from 2.10 on.
// Nothing here may include ATen, c10 (other than through torch/headeronly) or torch/library.h.
//
// The ops are registered in their own namespace, `fastnets_cuda` (torch.ops.fastnets_cuda.*): they are the
// cuda backend's internal primitives, called only by fastnets/cuda_kernels/, never by users, whose ops are
// the Python-registered torch.ops.fastnets.*.
//
// Who allocates outputs (one rule for every op):
//   - an op whose schema returns tensors allocates them here, with new_output() (NaN-poisoned under the
//     test suite, as fastnets._checks.new_output), e.g. bn_*;
//   - an op whose schema marks an argument as written (`Tensor(a!) out`) returns nothing and writes into
//     the caller's tensor, which it checks first (check_like_x / check_vec), e.g. se_*. The Python
//     side allocates those with fastnets._checks.new_output.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include "activations.cuh"
#include "launch_plans.h"

namespace fastnets {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------
// Device helpers

// 16-byte (or smaller) vector of V elements, as ATen's aligned_vector: one load/store instruction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// ReLU that propagates NaN like torch.relu (fmax would turn NaN into 0).
template <typename T>
__device__ __forceinline__ T relu_nan(T v) {
  return v < T(0) ? T(0) : v;
}

// setup.py compiles with --use_fast_math; the few results that land in outputs as they are (variance,
// invstd, means) are computed correctly rounded, like torch does.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

// The accumulation type of scalar_t on CUDA, as at::acc_type<scalar_t, true>: double for double, float
// for float, half and bfloat16.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---------------------------------------------------------------------------------------------------
// Element-wise kernels shared by BatchNorm (apply, backward_apply) and squeeze-excite (scale, its backward).
// Their launch plans are plan::rows_elementwise and plan::planes_elementwise (launch_plans.h). An Op has
//   Chan            the per-channel data one element needs (scale and shift, the gate, ...), in registers
//   chan(q)         loads it for channel index q (BatchNorm: the channel c; squeeze-excite: n * C + c)
//   run<V>(i, at)   handles the V consecutive elements at flat index i, element k with per-channel data at(k)
//                   (a getter, so that the planes kernel selects between two channels where each value is used
//                   instead of materialising V copies of Chan in registers)
// Tensor data moves in V-element (16-byte) vectors; per-channel data is loaded once per work item (rows) or
// once per vector (planes), never per element.

// channels_last: `groups` groups of `rows` rows of C contiguous elements (BatchNorm: one group, every row;
// squeeze-excite: a group per sample). Thread (tx, ty) owns channels c0 .. c0 + V - 1 and, per work item
// (group, chunk of chunk_len rows) of its blockIdx.y stride, loads their Chan once, then walks rows ty,
// ty + blockDim.y, ... of the chunk. The channel index of (group g, channel c) is g * group_chan + c.
template <typename Op, int V>
__global__ void __launch_bounds__(plan::kElementwiseThreads)
    rows_elementwise_kernel(Op op, int64_t groups, int64_t rows, int64_t C, int64_t chunks, int64_t chunk_len,
                            int64_t group_chan) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;  // with V > 1, C % V == 0: a vector is entirely in or out
  const int64_t items = groups * chunks;
  const int64_t i_step = int64_t(blockDim.y) * C;
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    const int64_t g = plan::group_of_item(item, chunks);
    const int64_t r0 = (item - g * chunks) * chunk_len;
    const int64_t r1 = r0 + chunk_len < rows ? r0 + chunk_len : rows;
    typename Op::Chan ch[V];
#pragma unroll
    for (int k = 0; k < V; ++k) ch[k] = op.chan(g * group_chan + c0 + k);
    int64_t i = (g * rows + r0 + threadIdx.y) * C + c0;
    const auto at = [&](int k) { return ch[k]; };
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y, i += i_step) op.template run<V>(i, at);
  }
}

// NCHW: `numel` elements in planes of S; plane p has channel index p % M (BatchNorm: M = C; squeeze-excite:
// M = N * C). Grid-stride over vectors of V elements; a vector spans at most two planes (S >= V), so each
// vector loads the Chan of its first plane and, only when it crosses into the next, of that one too. The
// plane and the offset in it are found once per thread (32-bit division, plan::PlaneCursor) and then carried
// along by additions of the host-split step (plan::PlanesStep): no 64-bit division on the device. The
// numel % V tail elements, all in the last plane, are handled one per thread by the first threads of the grid.
template <typename Op, int V>
__global__ void __launch_bounds__(plan::kElementwiseThreads)
    planes_elementwise_kernel(Op op, int64_t numel, int64_t S, int64_t M, plan::PlanesStep step) {
  using Chan = typename Op::Chan;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / V;

  const int64_t tail = numel - nvec * V;
  if (tid < tail) {
    const Chan one = op.chan(step.tail_chan);
    op.template run<1>(nvec * V + tid, [&](int) { return one; });
  }

  if (tid >= nvec) return;
  int64_t i = tid * V;
  plan::PlaneCursor at;
  at.start(i, S, M);
  for (int64_t v = tid; v < nvec; v += nthreads, i += step.elems) {
    const Chan lo = op.chan(at.q);
    const int cut = at.cut(S, V);  // elements k < cut are in plane q, the others in the next
    Chan hi = lo;
    if (V > 1 && cut < V) hi = op.chan(at.next(M));
    op.template run<V>(i, [&](int k) { return k < cut ? lo : hi; });
    at.advance(step, S, M);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host helpers

using plan::ceil_div;

inline dim3 grid_of(const plan::Launch& l) {
  return dim3(static_cast<unsigned>(l.grid[0]), static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]));
}
inline dim3 block_of(const plan::Launch& l) {
  return dim3(static_cast<unsigned>(l.block[0]), static_cast<unsigned>(l.block[1]), static_cast<unsigned>(l.block[2]));
}

// Calls f(std::integral_constant<int, CODE>{}) for the activation code: the kernels' fast paths are compiled
// once per activation (no switch in their loops). The scalar fallbacks and float64 instead take
// act::kDynamic and switch on the code at run time (one kernel for every code); see dispatch_variant in
// batch_norm.cu.
template <typename F>
void dispatch_act(int code, F&& f) {
  switch (code) {
    case act::kIdentity: f(std::integral_constant<int, act::kIdentity>{}); break;
    case act::kRelu: f(std::integral_constant<int, act::kRelu>{}); break;
    case act::kRelu6: f(std::integral_constant<int, act::kRelu6>{}); break;
    case act::kLeakyRelu: f(std::integral_constant<int, act::kLeakyRelu>{}); break;
    case act::kSilu: f(std::integral_constant<int, act::kSilu>{}); break;
    case act::kHardswish: f(std::integral_constant<int, act::kHardswish>{}); break;
    case act::kGelu: f(std::integral_constant<int, act::kGelu>{}); break;
    case act::kGeluTanh: f(std::integral_constant<int, act::kGeluTanh>{}); break;
    default: STD_TORCH_CHECK(false, "fastnets: unknown activation code ", code);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The accumulation dtype of x's per-channel vectors: float64 for float64 x, float32 otherwise.
inline ScalarType acc_type_of(const Tensor& x) {
  return x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Calls f(scalar_t{}) for x's floating dtype (float32, float16, bfloat16, float64), as
// AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...); any other dtype raises.
template <typename F>
void dispatch_floating(ScalarType st, const char* op, F&& f) {
  switch (st) {
    case ScalarType::Float:
      f(float{});
      break;
    case ScalarType::Double:
      f(double{});
      break;
    case ScalarType::Half:
      f(Half{});
      break;
    case ScalarType::BFloat16:
      f(BFloat16{});
      break;
    default:
      STD_TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// "[2, 3, 4]", as torch prints sizes and strides in its messages.
inline std::string str_of(torch::headeronly::IntHeaderOnlyArrayRef v) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << "]";
  return s.str();
}

inline std::string device_of(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  if (t.is_cpu()) return "cpu";
  return "a non-CUDA device";
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.is_cpu() == b.is_cpu() && a.get_device_index() == b.get_device_index();
}

inline bool same_sizes(torch::headeronly::IntHeaderOnlyArrayRef a, torch::headeronly::IntHeaderOnlyArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// x: defined, on a CUDA device, a floating dtype the kernels take, and dense in (N, C, spatial) order
// (channels_last false) or (N, spatial, C) order; strides of size-1 dims are free, as in torch's
// is_contiguous(memory_format).
inline void check_x(const Tensor& x, bool channels_last, const char* op) {
  STD_TORCH_CHECK(x.defined(), op, ": x is undefined");
  STD_TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", device_of(x));
  const auto st = x.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16 ||
                      st == ScalarType::Double,
                  op, ": x must be float32, float16, bfloat16 or float64, got ", st);
  STD_TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dims (N, C, ...), got shape ", str_of(x.sizes()));
  const int64_t nd = x.dim();
  std::vector<int64_t> expected(nd);
  int64_t run = 1;
  if (!channels_last) {
    for (int64_t d = nd - 1; d >= 0; --d) {
      expected[d] = run;
      run *= x.size(d);
    }
  } else {
    expected[1] = 1;
    run = x.size(1);
    for (int64_t d = nd - 1; d >= 2; --d) {
      expected[d] = run;
      run *= x.size(d);
    }
    expected[0] = run;
  }
  for (int64_t d = 0; d < nd; ++d) {
    STD_TORCH_CHECK(x.size(d) == 1 || x.stride(d) == expected[d], op, ": x must be dense in ",
                    channels_last ? "channels_last (N, spatial, C)" : "contiguous (N, C, spatial)",
                    " order as channels_last=", channels_last, " says; got shape ", str_of(x.sizes()),
                    " and strides ", str_of(x.strides()));
  }
}

// dy, y, residual, outputs: x's shape, dtype, device and strides (those of size-1 dims are free).
inline void check_like_x(const Tensor& t, const char* name, const Tensor& x, const char* op) {
  STD_TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  STD_TORCH_CHECK(same_device(t, x), op, ": ", name, " is on ", device_of(t), " but x is on ", device_of(x));
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                  " but x has dtype ", x.scalar_type());
  STD_TORCH_CHECK(same_sizes(t.sizes(), x.sizes()), op, ": ", name, " has shape ", str_of(t.sizes()),
                  " but x has shape ", str_of(x.sizes()));
  for (int64_t d = 0; d < x.dim(); ++d) {
    STD_TORCH_CHECK(x.size(d) == 1 || t.stride(d) == x.stride(d), op, ": ", name, " must have x's strides ",
                    str_of(x.strides()), ", got ", str_of(t.strides()));
  }
}

// A contiguous tensor of the given shape and dtype on `like`'s device.
inline void check_vec(const Tensor& t, const char* name, std::vector<int64_t> shape, ScalarType dtype,
                      const Tensor& like, const char* op) {
  STD_TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  STD_TORCH_CHECK(same_device(t, like), op, ": ", name, " is on ", device_of(t), " but x is on ",
                  device_of(like));
  STD_TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  STD_TORCH_CHECK(same_sizes(t.sizes(), shape), op, ": ", name, " must have shape ", str_of(shape), ", got ",
                  str_of(t.sizes()));
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An output the op allocated (see the rule at the top). With FASTNETS_POISON_OUTPUTS=1 (the test suite
// sets it) it starts as NaN, so an element a kernel forgot to write cannot pass by luck.
inline bool poison_outputs() {
  const char* v = std::getenv("FASTNETS_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline Tensor new_output(Tensor out) {
  if (poison_outputs() && out.numel() > 0) torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
  return out;
}

// A new [sizes] tensor of dtype on x's device.
inline Tensor new_empty_like_device(const Tensor& x, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(x, sizes, dtype);
}

// The current CUDA stream of x's device (torch's, so that the kernels order with its other work).
inline cudaStream_t current_stream(const Tensor& x) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(x.get_device_index(), &s));
  return static_cast<cudaStream_t>(s);
}

// The device numbers the launch plans take (launch_plans.h), read once per device (cudaDeviceGetAttribute
// is cheap but not free).
inline plan::Device plan_device(int device) {
  constexpr int kMaxDevices = 64;
  static plan::Device cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && cache[device].sms > 0 && cache[device].max_threads_per_sm > 0) {
    return cache[device];
  }
  int sms = 0, tpsm = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&tpsm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const plan::Device d{sms, tpsm};
  if (device >= 0 && device < kMaxDevices) cache[device] = d;
  return d;
}

}  // namespace fastnets
