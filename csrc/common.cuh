// What every .cu file of fastnets._C shares: device helpers (warp constants, 16-byte packs, NaN-keeping relu,
// correctly rounded division) and the host-side checks, each raising a RuntimeError that names the op and
// the argument.
//
// Who allocates outputs (one rule for every op):
//   - an op whose schema returns tensors allocates them here, with new_output() (NaN-poisoned under the
//     test suite, as fastnets._checks.new_output), e.g. cuda_bn_*;
//   - an op whose schema marks an argument as written (`Tensor(a!) out`) returns nothing and writes into
//     the caller's tensor, which it checks first (check_like_x / check_vec), e.g. cuda_se_*. The Python
//     side allocates those with fastnets._checks.new_output.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <ATen/core/Tensor.h>

namespace fastnets {

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

// ---------------------------------------------------------------------------------------------------
// Host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The accumulation dtype of x's per-channel vectors: float64 for float64 x, float32 otherwise.
inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dy, y, residual, outputs: x's shape, dtype, device and strides (those of size-1 dims are free).
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has shape ", x.sizes());
  for (int64_t d = 0; d < x.dim(); ++d) {
    TORCH_CHECK(x.size(d) == 1 || t.stride(d) == x.stride(d), op, ": ", name, " must have x's strides ",
                x.strides(), ", got ", t.strides());
  }
}

// A contiguous tensor of the given shape and dtype on `dev`.
inline void check_vec(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                      const at::Device& dev, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An output the op allocated (see the rule at the top). With FASTNETS_POISON_OUTPUTS=1 (the test suite
// sets it) it starts as NaN, so an element a kernel forgot to write cannot pass by luck.
inline bool poison_outputs() {
  const char* v = std::getenv("FASTNETS_POISON_OUTPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline at::Tensor new_output(at::Tensor out) {
  if (poison_outputs() && out.numel() > 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastnets
