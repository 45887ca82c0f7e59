// Squeeze-and-excitation primitives of the `cuda` backend; the contract is fastnets/reference/squeeze_excite.py,
// the Python side is fastnets/cuda_kernels/squeeze_excite.py (which allocates every output, so that the
// test suite's NaN poisoning covers these kernels too):
//   se_reduce       pool (sum or mean over space of x) or backward_reduce (sum over space of g * x,
//                   g = relu ? (y <= 0 ? 0 : dy) : dy), into out [N, C] or partial sums out [N, splits, C]
//   se_excite       hidden = inner_act(pooled @ w1.T + b1) [N, R], gate = gate(hidden @ w2.T + b2) [N, C]
//                   (inner_act: an activation code of activations.cuh; gate: 0 sigmoid, 1 hardsigmoid)
//   se_apply        forward:  out = [relu](x * gate[n, c] [+ residual])
//                   backward: g = relu ? (y <= 0 ? 0 : dy) : dy (threshold_backward); out = g * gate[n, c] [+ gp[n, c]]; g_out = g
//
// x is 4-D and dense, (N, C, S) in memory (NCHW, S = H * W) or (N, S, C) (channels_last); dy, y, residual
// and the outputs have x's layout. [N, C] / [N, R] vectors are in acc_t: float64 for float64 x, float32
// otherwise. Weights (w1 [R, C], w2 [C, R], contiguous) are acc_t or, with float32 vectors, float16/bfloat16.
// All offsets are int64. No atomics: results are deterministic.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>


#include "activations.cuh"
#include "common.cuh"

namespace fastnets {
namespace se {
namespace {

constexpr int kThreads = 256;
constexpr int kClChannels = 32;  // channels_last reduction block: 32 channels x 8 spatial rows
constexpr int kClRows = kThreads / kClChannels;
constexpr int kExciteMaxSamples = 4;  // samples per block of the excite kernel: 4, 2 or 1
constexpr int kExciteThreads = 512;

// ---------------------------------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// The sigmoid gate: act::dsigmoid (activations.cuh), 1 / (1 + e) through the correctly rounded reciprocal.

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// One term of a reduction: x (pool) or g * x (backward).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t reduce_term(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                             const scalar_t* __restrict__ y, int64_t i, bool grad, bool relu) {
  const acc_t xv = static_cast<acc_t>(x[i]);
  if (!grad) return xv;
  // g = 0 where the ReLU masks, then g * x as torch computes it (0 * NaN stays NaN)
  const acc_t g = (relu && act::relu_masks(static_cast<acc_t>(y[i]))) ? acc_t(0) : static_cast<acc_t>(dy[i]);
  return g * xv;
}

// Writes the total of (n, c) for one split: the final value (divided by S when `mean`) when splits == 1.
template <typename acc_t>
__device__ __forceinline__ void store_total(acc_t* __restrict__ out, acc_t tot, int64_t n, int64_t c, int64_t split,
                                            int64_t splits, int64_t C, int64_t S, bool mean) {
  if (mean) tot = div_rn(tot, static_cast<acc_t>(S));
  out[(n * splits + split) * C + c] = tot;
}

// ---------------------------------------------------------------------------------------------------
// Reductions over space

// NCHW: one warp per (plane n * C + c, split): the plane is S contiguous elements, the lanes stride it.
template <typename scalar_t, typename acc_t>
__global__ void reduce_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                   const scalar_t* __restrict__ y, acc_t* __restrict__ out, int64_t planes, int64_t C,
                                   int64_t S, int64_t splits, int64_t s_per_split, bool grad, bool relu, bool mean) {
  const int lane = threadIdx.x % kWarp;
  const int64_t work = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (work >= planes * splits) return;  // uniform over the warp
  const int64_t plane = work / splits;
  const int64_t split = work - plane * splits;
  const int64_t s0 = split * s_per_split;
  const int64_t s1 = imin(S, s0 + s_per_split);
  const int64_t base = plane * S;
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t s = s0 + lane;
  for (; s + 3 * kWarp < s1; s += 4 * kWarp) {  // four independent loads in flight per lane
    a0 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s, grad, relu);
    a1 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s + kWarp, grad, relu);
    a2 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s + 2 * kWarp, grad, relu);
    a3 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s + 3 * kWarp, grad, relu);
  }
  for (; s < s1; s += kWarp) a0 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s, grad, relu);
  const acc_t tot = warp_sum((a0 + a1) + (a2 + a3));
  if (lane == 0) store_total(out, tot, plane / C, plane % C, split, splits, C, S, mean);
}

// channels_last: a block of 32 consecutive channels x 8 spatial rows of one (sample, split); the warp
// (one row) reads 32 consecutive channels; the 8 rows are merged in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void reduce_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                 const scalar_t* __restrict__ y, acc_t* __restrict__ out, int64_t C, int64_t S,
                                 int64_t c_blocks, int64_t splits, int64_t s_per_split, bool grad, bool relu,
                                 bool mean) {
  __shared__ acc_t part[kClRows][kClChannels + 1];
  int64_t b = blockIdx.x;
  const int64_t split = b % splits;
  b /= splits;
  const int64_t cb = b % c_blocks;
  const int64_t n = b / c_blocks;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = cb * kClChannels + tx;
  const int64_t s0 = split * s_per_split;
  const int64_t s1 = imin(S, s0 + s_per_split);
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  if (c < C) {
    const int64_t base = n * S * C + c;
    int64_t s = s0 + ty;
    for (; s + 3 * kClRows < s1; s += 4 * kClRows) {
      a0 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s * C, grad, relu);
      a1 += reduce_term<scalar_t, acc_t>(x, dy, y, base + (s + kClRows) * C, grad, relu);
      a2 += reduce_term<scalar_t, acc_t>(x, dy, y, base + (s + 2 * kClRows) * C, grad, relu);
      a3 += reduce_term<scalar_t, acc_t>(x, dy, y, base + (s + 3 * kClRows) * C, grad, relu);
    }
    for (; s < s1; s += kClRows) a0 += reduce_term<scalar_t, acc_t>(x, dy, y, base + s * C, grad, relu);
  }
  part[ty][tx] = (a0 + a1) + (a2 + a3);
  __syncthreads();
  if (ty == 0 && c < C) {
    acc_t tot = 0;
#pragma unroll
    for (int r = 0; r < kClRows; ++r) tot += part[r][tx];
    store_total(out, tot, n, c, split, splits, C, S, mean);
  }
}

// ---------------------------------------------------------------------------------------------------
// Excite: BN samples per block, one warp per output unit, lanes over the input dimension (coalesced rows
// of w1 [R, C] and w2 [C, R]). Layer 1 writes `hidden`; after the block barrier, layer 2 reads it back
// (global writes before __syncthreads are visible to the whole block). Each block reads both weight
// matrices once: BN trades that L2 traffic against the number of blocks (see launch_excite).

template <typename acc_t, typename w_t, int BN>
__global__ void excite_kernel(const acc_t* __restrict__ pooled, const w_t* __restrict__ w1,
                              const w_t* __restrict__ b1, const w_t* __restrict__ w2, const w_t* __restrict__ b2,
                              acc_t* hidden, acc_t* __restrict__ gate, int64_t N, int64_t C, int64_t R,
                              int inner_act, acc_t inner_param, int gate_fn) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int nb = static_cast<int>(imin(BN, N - n0));

  for (int64_t r = warp; r < R; r += nwarps) {
    acc_t acc[BN];
#pragma unroll
    for (int k = 0; k < BN; ++k) acc[k] = 0;
    const w_t* wr = w1 + r * C;
#pragma unroll 4
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t w = static_cast<acc_t>(wr[c]);
#pragma unroll
      for (int k = 0; k < BN; ++k) {
        if (k < nb) acc[k] += w * pooled[(n0 + k) * C + c];
      }
    }
    const acc_t bias = static_cast<acc_t>(b1[r]);
#pragma unroll
    for (int k = 0; k < BN; ++k) {
      const acc_t v = warp_sum(acc[k]);
      if (lane == 0 && k < nb) hidden[(n0 + k) * R + r] = act::forward(v + bias, inner_act, inner_param);
    }
  }
  __syncthreads();
  for (int64_t c = warp; c < C; c += nwarps) {
    acc_t acc[BN];
#pragma unroll
    for (int k = 0; k < BN; ++k) acc[k] = 0;
    const w_t* wc = w2 + c * R;
#pragma unroll 4
    for (int64_t r = lane; r < R; r += kWarp) {
      const acc_t w = static_cast<acc_t>(wc[r]);
#pragma unroll
      for (int k = 0; k < BN; ++k) {
        if (k < nb) acc[k] += w * hidden[(n0 + k) * R + r];
      }
    }
    const acc_t bias = static_cast<acc_t>(b2[c]);
#pragma unroll
    for (int k = 0; k < BN; ++k) {
      const acc_t v = warp_sum(acc[k]);
      if (lane == 0 && k < nb) gate[(n0 + k) * C + c] = act::gate_forward(v + bias, gate_fn);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Elementwise pass: each thread takes V consecutive elements (one 16-byte load per tensor when VEC), works
// out the (n, c) of the first one with one division, then steps through the others.

struct ApplyFlags {
  bool grad, has_add, relu, write_g, channels_last;
};

template <typename scalar_t, typename acc_t, int V, bool VEC>
__global__ void apply_kernel(const scalar_t* __restrict__ src, const acc_t* __restrict__ gate,
                             const scalar_t* __restrict__ aux, const acc_t* __restrict__ gp,
                             scalar_t* __restrict__ out, scalar_t* __restrict__ g_out, int64_t numel, int64_t C,
                             int64_t S, ApplyFlags f) {
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i0 >= numel) return;
  // Position of i0: NCHW: plane = n * C + c (the gate index) and s; channels_last: n, s, c.
  int64_t plane = 0, n = 0, s = 0, c = 0;
  if (numel <= 0xffffffffLL) {  // 32-bit divisions when they suffice (64-bit ones are emulated)
    const uint32_t i = static_cast<uint32_t>(i0), S32 = static_cast<uint32_t>(S), C32 = static_cast<uint32_t>(C);
    if (!f.channels_last) {
      plane = i / S32;
      s = i - static_cast<uint32_t>(plane) * S32;
    } else {
      const uint32_t q = i / C32;
      c = i - q * C32;
      n = q / S32;
      s = q - static_cast<uint32_t>(n) * S32;
    }
  } else if (!f.channels_last) {
    plane = i0 / S;
    s = i0 - plane * S;
  } else {
    const int64_t q = i0 / C;
    c = i0 - q * C;
    n = q / S;
    s = q - n * S;
  }
  scalar_t v[V], a[V], o[V], g[V];
  const bool load_aux = f.grad ? f.relu : f.has_add;
  if (VEC) {
    const Pack<scalar_t, V> pv = *reinterpret_cast<const Pack<scalar_t, V>*>(src + i0);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = pv.v[k];
    if (load_aux) {
      const Pack<scalar_t, V> pa = *reinterpret_cast<const Pack<scalar_t, V>*>(aux + i0);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = pa.v[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const bool in = i0 + k < numel;
      v[k] = in ? src[i0 + k] : scalar_t(0);
      a[k] = (in && load_aux) ? aux[i0 + k] : scalar_t(0);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t gi = f.channels_last ? n * C + c : plane;
    const bool in = VEC || i0 + k < numel;
    if (in) {
      const acc_t gt = gate[gi];
      if (f.grad) {
        scalar_t gv = v[k];
        if (f.relu && act::relu_masks(static_cast<acc_t>(a[k]))) gv = scalar_t(0);
        g[k] = gv;
        acc_t r = static_cast<acc_t>(gv) * gt;
        if (f.has_add) r += gp[gi];
        o[k] = static_cast<scalar_t>(r);
      } else {
        acc_t r = static_cast<acc_t>(v[k]) * gt;
        if (f.has_add) r += static_cast<acc_t>(a[k]);
        if (f.relu) r = relu_nan(r);
        o[k] = static_cast<scalar_t>(r);
      }
    } else {
      o[k] = scalar_t(0);
      g[k] = scalar_t(0);
    }
    // step to the next element
    if (!f.channels_last) {
      if (++s == S) {
        s = 0;
        ++plane;
      }
    } else if (++c == C) {
      c = 0;
      if (++s == S) {
        s = 0;
        ++n;
      }
    }
  }
  const bool write_g = f.grad && f.write_g;
  if (VEC) {
    Pack<scalar_t, V> po;
#pragma unroll
    for (int k = 0; k < V; ++k) po.v[k] = o[k];
    *reinterpret_cast<Pack<scalar_t, V>*>(out + i0) = po;
    if (write_g) {
      Pack<scalar_t, V> pg;
#pragma unroll
      for (int k = 0; k < V; ++k) pg.v[k] = g[k];
      *reinterpret_cast<Pack<scalar_t, V>*>(g_out + i0) = pg;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (i0 + k < numel) {
        out[i0 + k] = o[k];
        if (write_g) g_out[i0 + k] = g[k];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: checks and launches

// x: 4-D, non-empty, and as fastnets::check_x (common.cuh) says.
void check_se_x(const Tensor& x, bool channels_last, const char* op) {
  STD_TORCH_CHECK(x.defined(), op, ": x is undefined");
  STD_TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", str_of(x.sizes()));
  STD_TORCH_CHECK(x.numel() > 0, op, ": x must be non-empty, got shape ", str_of(x.sizes()));
  fastnets::check_x(x, channels_last, op);
}

void se_reduce(const Tensor& x, const std::optional<Tensor>& dy, const std::optional<Tensor>& y,
               const Tensor& out, bool channels_last, bool relu, bool mean) {
  const char* op = "fastnets_cuda::se_reduce";
  check_se_x(x, channels_last, op);
  const bool grad = dy.has_value();
  if (grad) check_like_x(*dy, "dy", x, op);
  STD_TORCH_CHECK(!(grad && relu) || y.has_value(), op, ": y (the forward output) is required when relu");
  if (grad && relu) check_like_x(*y, "y", x, op);
  STD_TORCH_CHECK(!(grad && mean), op, ": mean applies to pooling only");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2) * x.size(3);
  STD_TORCH_CHECK(out.dim() == 2 || out.dim() == 3, op, ": out must be [N, C] or [N, splits, C]");
  const int64_t splits = out.dim() == 3 ? out.size(1) : 1;
  STD_TORCH_CHECK(splits >= 1 && splits <= S, op, ": splits must be in [1, H * W], got ", splits);
  STD_TORCH_CHECK(!(mean && splits > 1), op, ": mean needs a single split");
  if (out.dim() == 2) {
    check_vec(out, "out", {N, C}, acc_type_of(x), x, op);
  } else {
    check_vec(out, "out", {N, splits, C}, acc_type_of(x), x, op);
  }
  const int64_t s_per_split = ceil_div(S, splits);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = cptr<scalar_t>(x);
    const scalar_t* dyp = grad ? cptr<scalar_t>(*dy) : xp;
    const scalar_t* yp = (grad && relu) ? cptr<scalar_t>(*y) : xp;
    acc_t* op_out = static_cast<acc_t*>(out.data_ptr());
    if (!channels_last) {
      const int64_t work = N * C * splits;
      const int64_t blocks = ceil_div(work, kThreads / kWarp);
      STD_TORCH_CHECK(blocks <= 0x7fffffff, op, ": too many blocks: ", blocks);
      reduce_nchw_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          xp, dyp, yp, op_out, N * C, C, S, splits, s_per_split, grad, relu, mean);
    } else {
      const int64_t c_blocks = ceil_div(C, kClChannels);
      const int64_t blocks = N * c_blocks * splits;
      STD_TORCH_CHECK(blocks <= 0x7fffffff, op, ": too many blocks: ", blocks);
      reduce_cl_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), dim3(kClChannels, kClRows), 0, stream>>>(
          xp, dyp, yp, op_out, C, S, c_blocks, splits, s_per_split, grad, relu, mean);
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename acc_t, typename w_t>
void launch_excite(const Tensor& pooled, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                   const Tensor& b2, const Tensor& hidden, const Tensor& gate, int inner_act,
                   double inner_param, int gate_fn) {
  const int64_t N = pooled.size(0), C = pooled.size(1), R = w1.size(0);
  const acc_t ip = static_cast<acc_t>(inner_param);
  // The most samples per block that still leaves about one block per two SMs or more.
  const int64_t sms = device_limits(pooled.get_device_index()).sms;
  int bn = kExciteMaxSamples;
  while (bn > 1 && ceil_div(N, bn) * 2 < sms) bn /= 2;
  const int64_t blocks = ceil_div(N, bn);
  STD_TORCH_CHECK(blocks <= 0x7fffffff, "fastnets_cuda::se_excite: too many samples: ", N);
  const cudaStream_t stream = current_stream(pooled);
  const auto* pp = static_cast<const acc_t*>(pooled.const_data_ptr());
  const auto* w1p = static_cast<const w_t*>(w1.const_data_ptr());
  const auto* b1p = static_cast<const w_t*>(b1.const_data_ptr());
  const auto* w2p = static_cast<const w_t*>(w2.const_data_ptr());
  const auto* b2p = static_cast<const w_t*>(b2.const_data_ptr());
  auto* hp = static_cast<acc_t*>(hidden.data_ptr());
  auto* gp = static_cast<acc_t*>(gate.data_ptr());
  const auto grid = static_cast<unsigned>(blocks);
  if (bn == 4) {
    excite_kernel<acc_t, w_t, 4><<<grid, kExciteThreads, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
                                                                        gate_fn);
  } else if (bn == 2) {
    excite_kernel<acc_t, w_t, 2><<<grid, kExciteThreads, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
                                                                        gate_fn);
  } else {
    excite_kernel<acc_t, w_t, 1><<<grid, kExciteThreads, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
                                                                        gate_fn);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void se_excite(const Tensor& pooled, const Tensor& w1, const Tensor& b1, const Tensor& w2,
               const Tensor& b2, const Tensor& hidden, const Tensor& gate, int64_t inner_act,
               double inner_param, int64_t gate_fn) {
  const char* op = "fastnets_cuda::se_excite";
  STD_TORCH_CHECK(inner_act >= 0 && inner_act < act::kNumCodes, op, ": inner_act must be an activation code in [0, ",
              act::kNumCodes, "), got ", inner_act);
  STD_TORCH_CHECK(gate_fn == act::kSigmoid || gate_fn == act::kHardsigmoid, op,
              ": gate must be 0 (sigmoid) or 1 (hardsigmoid), got ", gate_fn);
  const int ia = static_cast<int>(inner_act), gf = static_cast<int>(gate_fn);
  STD_TORCH_CHECK(pooled.defined() && pooled.is_cuda(), op, ": pooled must be a CUDA tensor");
  const auto acc = pooled.scalar_type();
  STD_TORCH_CHECK(acc == ScalarType::Float || acc == ScalarType::Double, op, ": pooled must be float32 or float64, got ", acc);
  STD_TORCH_CHECK(pooled.dim() == 2 && pooled.size(0) > 0 && pooled.size(1) > 0, op, ": pooled must be [N, C], got ",
              str_of(pooled.sizes()));
  const int64_t N = pooled.size(0), C = pooled.size(1);
  STD_TORCH_CHECK(w1.dim() == 2 && w1.size(0) > 0, op, ": w1 must be [R, C], got ", str_of(w1.sizes()));
  const int64_t R = w1.size(0);
  const auto wt = w1.scalar_type();
  const bool w_ok = wt == acc || (acc == ScalarType::Float && (wt == ScalarType::Half || wt == ScalarType::BFloat16));
  STD_TORCH_CHECK(w_ok, op, ": weights must be ", acc, " (or float16/bfloat16 with float32 pooled), got ", wt);
  const Tensor& dev = pooled;  // the device every other tensor must be on
  check_vec(pooled, "pooled", {N, C}, acc, dev, op);
  check_vec(w1, "w1", {R, C}, wt, dev, op);
  check_vec(b1, "b1", {R}, wt, dev, op);
  check_vec(w2, "w2", {C, R}, wt, dev, op);
  check_vec(b2, "b2", {C}, wt, dev, op);
  check_vec(hidden, "hidden", {N, R}, acc, dev, op);
  check_vec(gate, "gate", {N, C}, acc, dev, op);
  const torch::stable::accelerator::DeviceGuard guard(pooled.get_device_index());
  if (acc == ScalarType::Double) {
    launch_excite<double, double>(pooled, w1, b1, w2, b2, hidden, gate, ia, inner_param, gf);
  } else if (wt == ScalarType::Float) {
    launch_excite<float, float>(pooled, w1, b1, w2, b2, hidden, gate, ia, inner_param, gf);
  } else if (wt == ScalarType::Half) {
    launch_excite<float, Half>(pooled, w1, b1, w2, b2, hidden, gate, ia, inner_param, gf);
  } else {
    launch_excite<float, BFloat16>(pooled, w1, b1, w2, b2, hidden, gate, ia, inner_param, gf);
  }
}

void se_apply(const Tensor& src, const Tensor& gate, const std::optional<Tensor>& aux,
              const std::optional<Tensor>& gp, const Tensor& out, const std::optional<Tensor>& g_out,
              bool channels_last, bool grad, bool relu) {
  const char* op = "fastnets_cuda::se_apply";
  check_se_x(src, channels_last, op);
  const int64_t N = src.size(0), C = src.size(1), S = src.size(2) * src.size(3);
  const auto acc = acc_type_of(src);
  check_vec(gate, "gate", {N, C}, acc, src, op);
  check_like_x(out, "out", src, op);
  ApplyFlags f{grad, false, relu, g_out.has_value(), channels_last};
  if (grad) {
    STD_TORCH_CHECK(!relu || aux.has_value(), op, ": y (the forward output) is required when relu");
    if (relu) check_like_x(*aux, "y", src, op);
    f.has_add = gp.has_value();
    if (f.has_add) check_vec(*gp, "gp", {N, C}, acc, src, op);
    if (f.write_g) check_like_x(*g_out, "g_out", src, op);
  } else {
    STD_TORCH_CHECK(!gp.has_value() && !g_out.has_value(), op, ": gp and g_out are backward-only");
    f.has_add = aux.has_value();
    if (f.has_add) check_like_x(*aux, "residual", src, op);
  }
  const bool load_aux = grad ? relu : f.has_add;
  const int64_t numel = src.numel();
  const torch::stable::accelerator::DeviceGuard guard(src.get_device_index());
  const cudaStream_t stream = current_stream(src);
  dispatch_floating(src.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* sp = cptr<scalar_t>(src);
    const scalar_t* ap = load_aux ? cptr<scalar_t>(*aux) : sp;
    scalar_t* op_out = static_cast<scalar_t*>(out.data_ptr());
    scalar_t* gop = f.write_g ? static_cast<scalar_t*>(g_out->data_ptr()) : op_out;
    const acc_t* gtp = static_cast<const acc_t*>(gate.const_data_ptr());
    const acc_t* gpp = f.has_add && grad ? static_cast<const acc_t*>(gp->const_data_ptr()) : gtp;
    const bool vec = numel % V == 0 && aligned16(sp) && aligned16(ap) && aligned16(op_out) && aligned16(gop);
    const int64_t blocks = ceil_div(ceil_div(numel, V), kThreads);
    STD_TORCH_CHECK(blocks <= 0x7fffffff, op, ": too many blocks: ", blocks);
    if (vec) {
      apply_kernel<scalar_t, acc_t, V, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          sp, gtp, ap, gpp, op_out, gop, numel, C, S, f);
    } else {
      apply_kernel<scalar_t, acc_t, V, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          sp, gtp, ap, gpp, op_out, gop, numel, C, S, f);
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace se
}  // namespace fastnets

STABLE_TORCH_LIBRARY_FRAGMENT(fastnets_cuda, m) {
  m.def(
      "se_reduce(Tensor x, Tensor? dy, Tensor? y, Tensor(a!) out, bool channels_last, bool relu, "
      "bool mean) -> ()");
  m.def(
      "se_excite(Tensor pooled, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor(a!) hidden, "
      "Tensor(b!) gate, int inner_act=1, float inner_param=0., int gate=0) -> ()");
  m.def(
      "se_apply(Tensor src, Tensor gate, Tensor? aux, Tensor? gp, Tensor(a!) out, Tensor(b!)? g_out, "
      "bool channels_last, bool grad, bool relu) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(fastnets_cuda, CUDA, m) {
  m.impl("se_reduce", TORCH_BOX(&fastnets::se::se_reduce));
  m.impl("se_excite", TORCH_BOX(&fastnets::se::se_excite));
  m.impl("se_apply", TORCH_BOX(&fastnets::se::se_apply));
}
