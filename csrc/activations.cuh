// The fused activations on the device (codes and semantics: fastnets/activations.py). The kernels' fast
// paths take the code as a template parameter ACT (common.cuh's dispatch_act instantiates one kernel per
// activation), so the switch below folds away and only that activation is compiled into their loops; the
// scalar fallbacks and float64 take ACT = kDynamic and switch on the run-time code (one kernel for every
// activation). Formulas restate aten's forward and backward kernels, NaN
// handling and the gradient at each kink included; comparisons are written so that NaN takes torch's
// branch. setup.py compiles with --use_fast_math: the exponentials are the fast ones, the sigmoid's
// reciprocal is faithfully rounded (drcp: 0 at e = inf, NaN for NaN).
#pragma once

namespace fastnets {
namespace act {

enum Code : int {
  kIdentity = 0,
  kRelu = 1,
  kRelu6 = 2,
  kLeakyRelu = 3,
  kSilu = 4,
  kHardswish = 5,
  kGelu = 6,
  kGeluTanh = 7,
  kNumCodes = 8,
  kDynamic = -1,  // a template argument ACT: the code is known at run time only
};

// The code a kernel instantiated for ACT runs: ACT itself (a compile-time constant, so every switch on it
// folds), or the run-time code when ACT is kDynamic.
template <int ACT>
__device__ __forceinline__ int code_of(int runtime_code) {
  return ACT == kDynamic ? runtime_code : ACT;
}

enum GateCode : int { kSigmoid = 0, kHardsigmoid = 1 };

// The one precision dispatch of the formulas below (T is the accumulation type, float or double): float
// takes the fast exponential and a faithfully rounded reciprocal (drcp), double the plain functions. Overloads,
// not a template, so that any other T fails to compile instead of silently taking the double branch.
__device__ __forceinline__ float dexp(float v) { return __expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float derf(float v) { return erff(v); }
__device__ __forceinline__ double derf(double v) { return erf(v); }
// 1 / v for the sigmoid's denominator v = 1 + e >= 1 (or inf, NaN). Not __frcp_rn: its slow path (denormal
// and huge operands) is a called subroutine, and the call's stack frame is a spill in every loop that takes
// it (the audit's cuda-no-spills budget). In this domain the hardware reciprocal (rcp.approx, < 1 ulp) refined
// by one Newton step is faithfully rounded (within 1 ulp of the correctly rounded result); inf gives exactly 0
// (where the Newton step alone would give NaN) and NaN stays NaN.
__device__ __forceinline__ float drcp(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  const float refined = fmaf(r, fmaf(-v, r, 1.0f), r);
  return isinf(v) ? 0.0f : refined;
}
__device__ __forceinline__ double drcp(double v) { return 1.0 / v; }

template <typename T>
__device__ __forceinline__ T dsigmoid(T z) {
  return drcp(T(1) + dexp(-z));
}

// (1 + tanh z, 1 - tanh^2 z) from e = exp(-2|z|), without cancellation; exact limits at +-inf.
template <typename T>
__device__ __forceinline__ void tanh_parts(T z, T& one_plus_t, T& sech2) {
  const T e = dexp(T(-2) * (z < T(0) ? -z : z));
  const T t = (T(1) - e) / (T(1) + e);
  one_plus_t = z < T(0) ? T(2) * e / (T(1) + e) : T(1) + t;
  sech2 = T(4) * e / ((T(1) + e) * (T(1) + e));
}

constexpr double kSqrt1_2 = 0.7071067811865476;   // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.3989422804014327;  // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kKappa = 0.044715;

template <typename T>
__device__ __forceinline__ T forward(T v, int act, T param) {
  switch (act) {
    case kRelu:
      return v < T(0) ? T(0) : v;  // NaN stays NaN (fmax would turn it into 0)
    case kRelu6:
      return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
    case kLeakyRelu:
      return v > T(0) ? v : v * param;
    case kSilu:
      return v * dsigmoid(v);
    case kHardswish: {
      T t = v + T(3);
      t = t < T(0) ? T(0) : (t > T(6) ? T(6) : t);
      return v * t / T(6);
    }
    case kGelu:
      return T(0.5) * v * (T(1) + derf(v * T(kSqrt1_2)));
    case kGeluTanh: {
      T opt, sech2;
      tanh_parts(T(kSqrt2OverPi) * (v + T(kKappa) * v * v * v), opt, sech2);
      return T(0.5) * v * opt;
    }
    default:
      return v;
  }
}

// relu's gradient from the saved output, as threshold_backward(grad, result, 0): 0 where y <= 0.
template <typename T>
__device__ __forceinline__ bool relu_masks(T y) {
  return y <= T(0);
}

// g * act'(v) for the activations whose gradient needs the pre-activation (codes > kRelu).
template <typename T>
__device__ __forceinline__ T backward(T g, T v, int act, T param) {
  switch (act) {
    case kRelu6:  // hardtanh_backward(0, 6): 0 at both kinks
      return (v <= T(0) || v >= T(6)) ? T(0) : g;
    case kLeakyRelu:  // slope at 0 and for NaN
      return v > T(0) ? g : g * param;
    case kSilu: {
      const T s = dsigmoid(v);
      return g * s * (T(1) + v * (T(1) - s));
    }
    case kHardswish:  // 0 for x <= -3, x / 3 + 0.5 below 3, 1 from 3 on (and for NaN)
      return v <= T(-3) ? T(0) : (v < T(3) ? g * (v / T(3) + T(0.5)) : g);
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + derf(v * T(kSqrt1_2)));
      const T pdf = dexp(T(-0.5) * v * v) * T(kInvSqrt2Pi);
      return g * (cdf + v * pdf);
    }
    case kGeluTanh: {
      const T v2 = v * v;
      T opt, sech2;
      tanh_parts(T(kSqrt2OverPi) * (v + T(kKappa) * v2 * v), opt, sech2);
      const T right = T(0.5) * v * sech2 * T(kSqrt2OverPi) * (T(1) + T(3 * kKappa) * v2);
      return g * (T(0.5) * opt + right);
    }
    default:
      return g;
  }
}

// Squeeze-excite gates: sigmoid, hardsigmoid = relu6(x + 3) / 6.
template <typename T>
__device__ __forceinline__ T gate_forward(T z, int gate) {
  if (gate == kHardsigmoid) {
    T t = z + T(3);
    t = t < T(0) ? T(0) : (t > T(6) ? T(6) : t);
    return t / T(6);
  }
  return dsigmoid(z);
}

}  // namespace act
}  // namespace fastnets
