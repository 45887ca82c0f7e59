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
// All offsets are int64. No atomics: results are deterministic. Tensor data moves in 16-byte vectors where
// the layout allows (C % V == 0 channels_last, S % V == 0 for the NCHW reduction, aligned pointers); every
// grid, block and shared-memory size is launch_plans.h's (plan::se_reduce, plan::se_excite, plan::se_apply).
//
// The excite kernel keeps its activation a run-time argument: it is applied once per hidden unit and
// gate, outside the kernel's loops, so compiling one kernel per activation would only grow the library.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "activations.cuh"
#include "common.cuh"

namespace fastnets {
namespace se {
namespace {

// ---------------------------------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// The warp sums of acc[0 .. BN - 1], sum k returned to lane k (BN <= 32; lanes from BN on get sum 0).
template <int BN, typename T>
__device__ __forceinline__ T lane_sums(const T (&acc)[BN], int lane) {
  T mine = acc[0];
  mine = warp_sum(mine);
#pragma unroll
  for (int k = 1; k < BN; ++k) {
    const T v = warp_sum(acc[k]);
    if (lane == k) mine = v;
  }
  return mine;
}

// The sigmoid gate: act::dsigmoid (activations.cuh), 1 / (1 + e) through a faithfully rounded reciprocal (drcp).

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Adds the terms of the V elements at flat index i to a[k]: x (pool) or, when GRAD, g * x with g = 0 where
// the ReLU masks (y <= 0, as threshold_backward) and dy elsewhere (0 * NaN stays NaN, as torch computes it).
// One vector load per tensor.
template <bool GRAD, int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_terms(acc_t (&a)[V], const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y, int64_t i,
                                          bool relu) {
  const Pack<scalar_t, V> xv = load_pack<V>(x + i);
  if constexpr (!GRAD) {
#pragma unroll
    for (int k = 0; k < V; ++k) a[k] += static_cast<acc_t>(xv.v[k]);
  } else {
    const Pack<scalar_t, V> dv = load_pack<V>(dy + i);
    Pack<scalar_t, V> yv{};
    if (relu) yv = load_pack<V>(y + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t g = (relu && act::relu_masks(static_cast<acc_t>(yv.v[k]))) ? acc_t(0) : static_cast<acc_t>(dv.v[k]);
      a[k] += g * static_cast<acc_t>(xv.v[k]);
    }
  }
}

// Writes the total of (n, c) for one split: the final value (divided by S when `mean`) when splits == 1.
template <typename acc_t>
__device__ __forceinline__ void store_total(acc_t* __restrict__ out, acc_t tot, int64_t n, int64_t c, int64_t split,
                                            int64_t splits, int64_t C, int64_t S, bool mean) {
  if (mean) tot = div_rn(tot, static_cast<acc_t>(S));
  out[(n * splits + split) * C + c] = tot;
}

// ---------------------------------------------------------------------------------------------------
// Reductions over space (plan::se_reduce)

// NCHW: one warp per (plane n * C + c, split) item, grid-stride over the items: the plane is S contiguous
// elements, the lanes stride the split's range with V-element loads (V > 1: S % V == 0, s_per_split a
// multiple of V), U vectors in flight per lane.
template <typename scalar_t, typename acc_t, int V, bool GRAD>
__global__ void __launch_bounds__(plan::kSeReduceThreads)
    reduce_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                       acc_t* __restrict__ out, int64_t items, int64_t C, int64_t S, int64_t splits,
                       int64_t s_per_split, bool relu, bool mean) {
  constexpr int kWarps = plan::kSeReduceThreads / kWarp;
  constexpr int U = V > 1 ? 2 : 4;
  constexpr int64_t kStride = int64_t(kWarp) * V;
  const int lane = threadIdx.x % kWarp;
  for (int64_t item = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp; item < items;
       item += int64_t(gridDim.x) * kWarps) {  // uniform over the warp
    const int64_t plane = item / splits;
    const int64_t split = item - plane * splits;
    const int64_t s0 = split * s_per_split;
    const int64_t s1 = imin(S, s0 + s_per_split);
    const int64_t base = plane * S;
    acc_t a[U][V] = {};
    int64_t s = s0 + int64_t(lane) * V;
    for (; s + (U - 1) * kStride < s1; s += U * kStride) {
#pragma unroll
      for (int u = 0; u < U; ++u) add_terms<GRAD, V>(a[u], x, dy, y, base + s + u * kStride, relu);
    }
    for (; s < s1; s += kStride) add_terms<GRAD, V>(a[0], x, dy, y, base + s, relu);
    acc_t tot = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) tot += a[u][k];
    }
    tot = warp_sum(tot);
    if (lane == 0) store_total(out, tot, plane / C, plane % C, split, splits, C, S, mean);
  }
}

// channels_last: thread (tx, ty) owns channels c0 .. c0 + V - 1 (one V-element load per row); per (n, split)
// item of its blockIdx.y stride, the blockDim.y thread rows stride the split's spatial rows, then a tree
// over ty in shared memory (part[k][thread], blockDim.y a power of two) gives the block's V totals.
template <typename scalar_t, typename acc_t, int V, bool GRAD>
__global__ void __launch_bounds__(plan::kSeReduceThreads)
    reduce_cl_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                     acc_t* __restrict__ out, int64_t N, int64_t C, int64_t S, int64_t splits, int64_t s_per_split,
                     bool relu, bool mean) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* part = reinterpret_cast<acc_t*>(smem_raw);  // [V][blockDim.x * blockDim.y]
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int nt = bx * by, t = ty * bx + tx;
  const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * V;
  const bool active = c0 < C;  // with V > 1, C % V == 0: a vector is entirely in or out
  const int64_t items = N * splits;
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {  // uniform over the block
    const int64_t n = item / splits;
    const int64_t split = item - n * splits;
    const int64_t s0 = split * s_per_split;
    const int64_t s1 = imin(S, s0 + s_per_split);
    acc_t a[V] = {};
    if (active) {
      const int64_t row_step = int64_t(by) * C;
      int64_t i = (n * S + s0 + ty) * C + c0;
#pragma unroll 4
      for (int64_t s = s0 + ty; s < s1; s += by, i += row_step) add_terms<GRAD, V>(a, x, dy, y, i, relu);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) part[k * nt + t] = a[k];
    __syncthreads();
    for (int h = by / 2; h > 0; h >>= 1) {
      if (ty < h) {
#pragma unroll
        for (int k = 0; k < V; ++k) part[k * nt + t] += part[k * nt + t + h * bx];
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < V; ++k) store_total(out, part[k * nt + tx], n, c0 + k, split, splits, C, S, mean);
    }
    __syncthreads();  // part is rewritten for the next item
  }
}

// ---------------------------------------------------------------------------------------------------
// Excite: BN samples per block, one warp per output unit, lanes over the input dimension (coalesced rows
// of w1 [R, C] and w2 [C, R]). Layer 1 writes `hidden`; after the block barrier, layer 2 reads it back
// (global writes before __syncthreads are visible to the whole block). Each block reads both weight
// matrices once per group of BN samples: BN trades that L2 traffic against the number of blocks
// (plan::se_excite). Blocks stride over the sample groups (a group's hidden rows are its own, so the next
// group's layer 1 does not race with this one's layer 2).

template <typename acc_t, typename w_t, int BN>
__global__ void __launch_bounds__(plan::kSeExciteThreads)
    excite_kernel(const acc_t* __restrict__ pooled, const w_t* __restrict__ w1, const w_t* __restrict__ b1,
                  const w_t* __restrict__ w2, const w_t* __restrict__ b2, acc_t* hidden, acc_t* __restrict__ gate,
                  int64_t N, int64_t C, int64_t R, int inner_act, acc_t inner_param, int gate_fn) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN; n0 < N; n0 += static_cast<int64_t>(gridDim.x) * BN) {
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
      // Lane k takes sample k's sum, so the activation runs once, on lanes 0 .. nb - 1 together, instead of
      // BN times in a row (BN inlined activations held 64 registers and spilled).
      const acc_t v = lane_sums<BN>(acc, lane);
      if (lane < nb) hidden[(n0 + lane) * R + r] = act::forward(v + static_cast<acc_t>(b1[r]), inner_act, inner_param);
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
      const acc_t v = lane_sums<BN>(acc, lane);
      if (lane < nb) gate[(n0 + lane) * C + c] = act::gate_forward(v + static_cast<acc_t>(b2[c]), gate_fn);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Element-wise ops, run by common.cuh's rows_elementwise_kernel (channels_last: a group per sample, the
// gate of (n, c0 .. c0 + V - 1) loaded once per work item) and planes_elementwise_kernel (NCHW: the gate
// index is the plane n * C + c, loaded once per vector).

// scale: out = [relu](src * gate [+ residual])
template <typename scalar_t_, typename acc_t_>
struct ScaleOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  struct Chan {
    acc_t gate;
  };
  const scalar_t* __restrict__ src;
  const acc_t* __restrict__ gate;
  const scalar_t* __restrict__ residual;  // read only when has_add
  scalar_t* __restrict__ out;
  bool has_add, relu;

  __device__ __forceinline__ Chan chan(int64_t q) const { return Chan{gate[q]}; }

  template <int V, typename At>
  __device__ __forceinline__ void run(int64_t i, const At& at) const {
    const Pack<scalar_t, V> v = load_pack<V>(src + i);
    Pack<scalar_t, V> a;
    if (has_add) a = load_pack<V>(residual + i);
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t r = static_cast<acc_t>(v.v[k]) * at(k).gate;
      if (has_add) r += static_cast<acc_t>(a.v[k]);
      if (relu) r = relu_nan(r);
      o.v[k] = static_cast<scalar_t>(r);
    }
    store_pack<V>(out + i, o);
  }
};

// scale's backward: g = relu ? (y <= 0 ? 0 : dy) : dy (threshold_backward); out = g * gate [+ gp]; g_out = g
template <typename scalar_t_, typename acc_t_>
struct ScaleBackwardOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  struct Chan {
    acc_t gate, gp;
  };
  const scalar_t* __restrict__ dy;
  const acc_t* __restrict__ gate;
  const scalar_t* __restrict__ y;  // read only when relu
  const acc_t* __restrict__ gp;    // read only when has_gp
  scalar_t* __restrict__ out;
  scalar_t* __restrict__ g_out;  // written only when write_g
  bool has_gp, relu, write_g;

  __device__ __forceinline__ Chan chan(int64_t q) const { return Chan{gate[q], has_gp ? gp[q] : acc_t(0)}; }

  template <int V, typename At>
  __device__ __forceinline__ void run(int64_t i, const At& at) const {
    Pack<scalar_t, V> g = load_pack<V>(dy + i);
    if (relu) {
      const Pack<scalar_t, V> yv = load_pack<V>(y + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (act::relu_masks(static_cast<acc_t>(yv.v[k]))) g.v[k] = scalar_t(0);
      }
    }
    Pack<scalar_t, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t r = static_cast<acc_t>(g.v[k]) * at(k).gate;
      if (has_gp) r += at(k).gp;
      o.v[k] = static_cast<scalar_t>(r);
    }
    store_pack<V>(out + i, o);
    if (write_g) store_pack<V>(g_out + i, g);
  }
};

// ---------------------------------------------------------------------------------------------------
// Host side: checks and launches

// x: 4-D, non-empty, at most 2^31 - 1 channels, and as fastnets::check_x (common.cuh) says.
void check_se_x(const Tensor& x, bool channels_last, const char* op) {
  STD_TORCH_CHECK(x.defined(), op, ": x is undefined");
  STD_TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", str_of(x.sizes()));
  STD_TORCH_CHECK(x.numel() > 0, op, ": x must be non-empty, got shape ", str_of(x.sizes()));
  // the most channels the launch plans take (tests/test_cuda_launch_plans.py)
  STD_TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), op, ": too many channels: ", x.size(1));
  fastnets::check_x(x, channels_last, op);
}

template <bool GRAD, typename scalar_t, typename acc_t>
void launch_reduce(const plan::SeReduce& p, const scalar_t* xp, const scalar_t* dyp, const scalar_t* yp, acc_t* out,
                   int64_t N, int64_t C, int64_t S, int64_t splits, bool relu, bool mean, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const plan::Launch& l = p.launch;
  const dim3 grid = grid_of(l), block = block_of(l);
  const bool vec = p.vec == VEC && VEC > 1;
  if (!p.channels_last) {
    if (vec) {
      reduce_nchw_kernel<scalar_t, acc_t, VEC, GRAD><<<grid, block, l.smem, stream>>>(
          xp, dyp, yp, out, N * C * splits, C, S, splits, p.s_per_split, relu, mean);
    } else {
      reduce_nchw_kernel<scalar_t, acc_t, 1, GRAD><<<grid, block, l.smem, stream>>>(
          xp, dyp, yp, out, N * C * splits, C, S, splits, p.s_per_split, relu, mean);
    }
  } else {
    if (vec) {
      reduce_cl_kernel<scalar_t, acc_t, VEC, GRAD><<<grid, block, l.smem, stream>>>(
          xp, dyp, yp, out, N, C, S, splits, p.s_per_split, relu, mean);
    } else {
      reduce_cl_kernel<scalar_t, acc_t, 1, GRAD><<<grid, block, l.smem, stream>>>(
          xp, dyp, yp, out, N, C, S, splits, p.s_per_split, relu, mean);
    }
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
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
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  const bool use_y = grad && relu;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = cptr<scalar_t>(x);
    const scalar_t* dyp = grad ? cptr<scalar_t>(*dy) : xp;
    const scalar_t* yp = use_y ? cptr<scalar_t>(*y) : xp;
    acc_t* op_out = static_cast<acc_t*>(out.data_ptr());
    const bool vec_ok = aligned16(xp) && aligned16(dyp) && aligned16(yp);
    const plan::SeReduce p = plan::se_reduce(N, C, S, splits, channels_last, vec_ok, sizeof(scalar_t),
                                             plan_device(x.get_device_index()));
    if (grad) {
      launch_reduce<true>(p, xp, dyp, yp, op_out, N, C, S, splits, relu, mean, stream);
    } else {
      launch_reduce<false>(p, xp, dyp, yp, op_out, N, C, S, splits, relu, mean, stream);
    }
  });
}

template <typename acc_t, typename w_t>
void launch_excite(const Tensor& pooled, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                   const Tensor& b2, const Tensor& hidden, const Tensor& gate, int inner_act,
                   double inner_param, int gate_fn) {
  const int64_t N = pooled.size(0), C = pooled.size(1), R = w1.size(0);
  const acc_t ip = static_cast<acc_t>(inner_param);
  const plan::SeExcite p = plan::se_excite(N, plan_device(pooled.get_device_index()));
  const cudaStream_t stream = current_stream(pooled);
  const auto* pp = static_cast<const acc_t*>(pooled.const_data_ptr());
  const auto* w1p = static_cast<const w_t*>(w1.const_data_ptr());
  const auto* b1p = static_cast<const w_t*>(b1.const_data_ptr());
  const auto* w2p = static_cast<const w_t*>(w2.const_data_ptr());
  const auto* b2p = static_cast<const w_t*>(b2.const_data_ptr());
  auto* hp = static_cast<acc_t*>(hidden.data_ptr());
  auto* gp = static_cast<acc_t*>(gate.data_ptr());
  const dim3 grid = grid_of(p.launch), block = block_of(p.launch);
  if (p.samples == 4) {
    excite_kernel<acc_t, w_t, 4><<<grid, block, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
                                                             gate_fn);
  } else if (p.samples == 2) {
    excite_kernel<acc_t, w_t, 2><<<grid, block, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
                                                             gate_fn);
  } else {
    excite_kernel<acc_t, w_t, 1><<<grid, block, 0, stream>>>(pp, w1p, b1p, w2p, b2p, hp, gp, N, C, R, inner_act, ip,
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
  const bool write_g = g_out.has_value();
  bool has_add = false;
  if (grad) {
    STD_TORCH_CHECK(!relu || aux.has_value(), op, ": y (the forward output) is required when relu");
    if (relu) check_like_x(*aux, "y", src, op);
    has_add = gp.has_value();
    if (has_add) check_vec(*gp, "gp", {N, C}, acc, src, op);
    if (write_g) check_like_x(*g_out, "g_out", src, op);
  } else {
    STD_TORCH_CHECK(!gp.has_value() && !write_g, op, ": gp and g_out are backward-only");
    has_add = aux.has_value();
    if (has_add) check_like_x(*aux, "residual", src, op);
  }
  const bool load_aux = grad ? relu : has_add;
  const int64_t numel = src.numel();
  const torch::stable::accelerator::DeviceGuard guard(src.get_device_index());
  const cudaStream_t stream = current_stream(src);
  dispatch_floating(src.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* sp = cptr<scalar_t>(src);
    const scalar_t* ap = load_aux ? cptr<scalar_t>(*aux) : sp;
    scalar_t* op_out = static_cast<scalar_t*>(out.data_ptr());
    scalar_t* gop = write_g ? static_cast<scalar_t*>(g_out->data_ptr()) : op_out;
    const acc_t* gtp = static_cast<const acc_t*>(gate.const_data_ptr());
    const acc_t* gpp = has_add && grad ? static_cast<const acc_t*>(gp->const_data_ptr()) : gtp;
    const bool vec_ok = aligned16(sp) && aligned16(ap) && aligned16(op_out) && aligned16(gop);
    const plan::SeApply p = plan::se_apply(N, C, S, channels_last, vec_ok, sizeof(scalar_t),
                                           plan_device(src.get_device_index()));
    const plan::Launch& l = p.launch();
    const dim3 grid = grid_of(l), block = block_of(l);
    const bool vec = p.vec() == VEC && VEC > 1;
    auto launch = [&](const auto& eop) {
      using Op = std::decay_t<decltype(eop)>;
      if (p.rows) {
        const plan::RowsElementwise& r = p.by_rows;
        if (vec) {
          rows_elementwise_kernel<Op, VEC><<<grid, block, l.smem, stream>>>(eop, N, S, C, r.chunks, r.chunk_len, C);
        } else {
          rows_elementwise_kernel<Op, 1><<<grid, block, l.smem, stream>>>(eop, N, S, C, r.chunks, r.chunk_len, C);
        }
      } else if (vec) {
        planes_elementwise_kernel<Op, VEC><<<grid, block, l.smem, stream>>>(eop, numel, S, N * C, p.by_planes.step);
      } else {
        planes_elementwise_kernel<Op, 1><<<grid, block, l.smem, stream>>>(eop, numel, S, N * C, p.by_planes.step);
      }
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (grad) {
      launch(ScaleBackwardOp<scalar_t, acc_t>{sp, gtp, ap, gpp, op_out, gop, has_add, relu, write_g});
    } else {
      launch(ScaleOp<scalar_t, acc_t>{sp, gtp, ap, op_out, has_add, relu});
    }
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
