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
// Host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Device attributes, read once per device (cudaDeviceGetAttribute is cheap but not free).
struct DeviceLimits {
  int sms = 0, max_threads_per_sm = 0;
};

inline DeviceLimits device_limits(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceLimits cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && cache[device].sms > 0) return cache[device];
  DeviceLimits l;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&l.max_threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  if (device >= 0 && device < kMaxDevices) cache[device] = l;
  return l;
}

}  // namespace fastnets
