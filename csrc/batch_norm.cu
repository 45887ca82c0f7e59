// BatchNorm (+ residual add + activation) primitives of the `cuda` backend; the contract (same signatures,
// semantics and output dtypes) is fastnets/reference/batch_norm.py:
//   bn_stats            per-channel mean and invstd = rsqrt(biased var + eps)
//   bn_apply            y = act(x * scale[c] + shift[c] [+ residual])
//   bn_backward_reduce  per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(v)
//   bn_backward_apply   dx = a[c] * g [+ b[c] * (x - mean[c]) + d[c]], and g itself when asked
// act is an activation code of csrc/activations.cuh. relu's gradient is masked by the saved output
// (y <= 0 -> 0, as threshold_backward); codes above relu recompute v = x * scale[c] + shift[c]
// [+ residual] in the backward (scale, shift and, when the forward had one, the residual are then given).
// The vectorized paths of float32/float16/bfloat16 are compiled once per activation (the ops' ACT template
// parameter, dispatch_act in common.cuh); the scalar fallbacks and float64 switch on the code at run time.
//
// x is dense and seen as (N, C, S) in memory (NCHW; S = product of the spatial sizes, 1 for 2-D input)
// or (N, S, C) (channels_last). dy, y and residual have x's layout. Per-channel vectors are in the
// accumulation type acc_t: float64 for float64 activations, float32 otherwise.
//
// Reductions (stats, backward_reduce) are two-stage and deterministic (no atomics): a tiled kernel
// writes one partial State per (split, channel) into a [fields, splits, C] buffer, then a finalize
// kernel merges the splits of each channel. The tiling code is shared by both reductions through an
// `Op` (what to load, how to accumulate, what to write); see the comment above each kernel. Every grid,
// block and shared-memory size comes from the launch plans of launch_plans.h (plan::bn_reduce,
// plan::bn_elementwise), which tests/test_cuda_launch_plans.py checks against the GPU's limits.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "activations.cuh"
#include "common.cuh"

namespace fastnets {
namespace bn {
namespace {

// ---------------------------------------------------------------------------------------------------
// Device helpers

// Correctly rounded, as div_rn (common.cuh): invstd lands in an output as it is.
__device__ __forceinline__ float rsqrt_rn(float v) { return __frsqrt_rn(v); }
__device__ __forceinline__ double rsqrt_rn(double v) { return 1.0 / sqrt(v); }

// Welford state (count, mean, sum of squared deviations). Merging is Chan's formula, used at every level
// (thread, warp, block, splits), so no level ever forms E[x^2] - E[x]^2. The count is kept in T: per
// thread it stays far below 2^24, and in merges only its ratios matter.
template <typename T>
struct Welford {
  using acc = T;
  static constexpr int kFields = 3;
  T n, mean, m2;

  __device__ __forceinline__ static Welford zero() { return Welford{T(0), T(0), T(0)}; }

  __device__ __forceinline__ void add(T x) {
    n += T(1);
    const T delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }
  // add(x) for a state whose new count n1 and its reciprocal inv the caller computed once for several states
  // that count the same rows (reduce_cl_kernel's V channels): one reciprocal per row instead of V divisions.
  __device__ __forceinline__ void add_counted(T x, T n1, T inv) {
    n = n1;
    const T delta = x - mean;
    mean += delta * inv;
    m2 += delta * (x - mean);
  }

  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == T(0)) return;
    if (n == T(0)) {  // exact copy: no rounding of o.mean through o.n / o.n
      *this = o;
      return;
    }
    const T total = n + o.n;
    const T delta = o.mean - mean;
    const T w = o.n / total;
    mean += delta * w;
    m2 += o.m2 + delta * delta * n * w;
    n = total;
  }

  __device__ __forceinline__ Welford shfl_xor(int lane_mask) const {
    return Welford{__shfl_xor_sync(kFullMask, n, lane_mask), __shfl_xor_sync(kFullMask, mean, lane_mask),
                   __shfl_xor_sync(kFullMask, m2, lane_mask)};
  }

  // Partials live in a [kFields, splits, C] buffer; `total` = splits * C.
  __device__ __forceinline__ void store(T* buf, int64_t idx, int64_t total) const {
    buf[idx] = n;
    buf[total + idx] = mean;
    buf[2 * total + idx] = m2;
  }
  __device__ __forceinline__ static Welford load(const T* buf, int64_t idx, int64_t total) {
    return Welford{buf[idx], buf[total + idx], buf[2 * total + idx]};
  }
};

// Two plain sums (backward_reduce): sum g and sum g * (x - mean).
template <typename T>
struct Sums {
  using acc = T;
  static constexpr int kFields = 2;
  T a, b;

  __device__ __forceinline__ static Sums zero() { return Sums{T(0), T(0)}; }
  __device__ __forceinline__ void merge(const Sums& o) {
    a += o.a;
    b += o.b;
  }
  __device__ __forceinline__ Sums shfl_xor(int lane_mask) const {
    return Sums{__shfl_xor_sync(kFullMask, a, lane_mask), __shfl_xor_sync(kFullMask, b, lane_mask)};
  }
  __device__ __forceinline__ void store(T* buf, int64_t idx, int64_t total) const {
    buf[idx] = a;
    buf[total + idx] = b;
  }
  __device__ __forceinline__ static Sums load(const T* buf, int64_t idx, int64_t total) {
    return Sums{buf[idx], buf[total + idx]};
  }
};

// Butterfly merge: every lane of the (full) warp ends with the merge of all 32 lanes.
template <typename State>
__device__ __forceinline__ State warp_reduce(State s) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) s.merge(s.shfl_xor(m));
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Reduction ops. Interface used by the tiled kernels:
//   State, Item, scalar_t, acc_t
//   load<V>(i, items)    the V consecutive elements at flat index i (all inputs of the op)
//   Ctx, context(c)      per-channel data (mean, scale, shift for backward_reduce), loaded once per thread
//   add(state, item, ctx)
//   add_row<V>(states, items, ctxs)   add() for the V channels of one channels_last row (one state each)
//   Final, final()       what the finalize kernel writes per channel (an object that does not depend on the
//                        activation, so that one finalize kernel serves every ACT)

// The outputs of stats: mean and invstd per channel.
template <typename acc_t_>
struct StatsFinal {
  using acc_t = acc_t_;
  using State = Welford<acc_t>;
  acc_t* __restrict__ mean_out;
  acc_t* __restrict__ invstd_out;
  acc_t eps;
  __device__ __forceinline__ void finalize(const State& s, int64_t c) const {
    mean_out[c] = s.mean;
    invstd_out[c] = rsqrt_rn(div_rn(s.m2, s.n) + eps);  // biased variance
  }
};

// The outputs of backward_reduce: sum g and sum g * (x - mean) per channel.
template <typename acc_t_>
struct SumsFinal {
  using acc_t = acc_t_;
  using State = Sums<acc_t>;
  acc_t* __restrict__ sum_g_out;
  acc_t* __restrict__ sum_gxmu_out;
  __device__ __forceinline__ void finalize(const State& s, int64_t c) const {
    sum_g_out[c] = s.a;
    sum_gxmu_out[c] = s.b;
  }
};

template <typename scalar_t_, typename acc_t_>
struct StatsOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using State = Welford<acc_t>;
  struct Item {
    acc_t x;
  };
  using Final = StatsFinal<acc_t>;
  static constexpr int kUnroll = 4;  // rows in flight per thread in the tiled kernels' loops
  const scalar_t* __restrict__ x;
  Final out;
  using Ctx = acc_t;

  template <int V>
  __device__ __forceinline__ void load(int64_t i, Item (&it)[V]) const {
    const Pack<scalar_t, V> p = load_pack<V>(x + i);
#pragma unroll
    for (int k = 0; k < V; ++k) it[k].x = static_cast<acc_t>(p.v[k]);
  }
  __device__ __forceinline__ acc_t context(int64_t) const { return acc_t(0); }
  __device__ __forceinline__ void add(State& s, const Item& it, Ctx) const { s.add(it.x); }
  // The V states have counted the same rows: their counts are equal, so 1 / n is formed once for the row.
  template <int V>
  __device__ __forceinline__ void add_row(State (&st)[V], const Item (&it)[V], const Ctx (&)[V]) const {
    const acc_t n1 = st[0].n + acc_t(1);
    const acc_t inv = acc_t(1) / n1;
#pragma unroll
    for (int k = 0; k < V; ++k) st[k].add_counted(it[k].x, n1, inv);
  }
};

// ACT: the activation code, or act::kDynamic for the run-time `code`.
template <typename scalar_t_, typename acc_t_, int ACT>
struct BackwardReduceOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using State = Sums<acc_t>;
  struct Item {
    acc_t g, x, r;
  };
  struct Ctx {
    acc_t mean, scale, shift;
  };
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ y;         // read only when act == relu
  const scalar_t* __restrict__ residual;  // read only when act > relu and the forward had one
  const acc_t* __restrict__ scale;        // act > relu only
  const acc_t* __restrict__ shift;
  const acc_t* __restrict__ mean;
  using Final = SumsFinal<acc_t>;
  // Rows in flight per thread: 4 for identity (dy, x per row); 2 where a row also loads y or the residual
  // and the activation's gradient adds live values (four rows of 3 vectors held 100 registers).
  static constexpr int kUnroll = ACT == act::kIdentity ? 4 : 2;
  Final out;
  int code;  // activation code (read when ACT is kDynamic)
  acc_t act_param;

  __device__ __forceinline__ int act() const { return act::code_of<ACT>(code); }

  template <int V>
  __device__ __forceinline__ void load(int64_t i, Item (&it)[V]) const {
    const int code = act();
    const Pack<scalar_t, V> dv = load_pack<V>(dy + i);
    const Pack<scalar_t, V> xv = load_pack<V>(x + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      it[k].g = static_cast<acc_t>(dv.v[k]);
      it[k].x = static_cast<acc_t>(xv.v[k]);
      it[k].r = acc_t(0);
    }
    if (code == act::kRelu) {
      const Pack<scalar_t, V> yv = load_pack<V>(y + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        // The mask comes from the saved output, as torch's threshold_backward: 0 where y <= 0.
        if (act::relu_masks(static_cast<acc_t>(yv.v[k]))) it[k].g = acc_t(0);
      }
    } else if (code > act::kRelu && residual != nullptr) {
      const Pack<scalar_t, V> rv = load_pack<V>(residual + i);
#pragma unroll
      for (int k = 0; k < V; ++k) it[k].r = static_cast<acc_t>(rv.v[k]);
    }
  }
  __device__ __forceinline__ Ctx context(int64_t c) const {
    if (act() > act::kRelu) return Ctx{mean[c], scale[c], shift[c]};
    return Ctx{mean[c], acc_t(0), acc_t(0)};
  }
  __device__ __forceinline__ void add(State& s, const Item& it, const Ctx& cx) const {
    const int code = act();
    acc_t g = it.g;
    if (code > act::kRelu) g = act::backward(g, it.x * cx.scale + cx.shift + it.r, code, act_param);
    s.a += g;
    s.b += g * (it.x - cx.mean);
  }
  template <int V>
  __device__ __forceinline__ void add_row(State (&st)[V], const Item (&it)[V], const Ctx (&cx)[V]) const {
#pragma unroll
    for (int k = 0; k < V; ++k) add(st[k], it[k], cx[k]);
  }
};

// ---------------------------------------------------------------------------------------------------
// Reduction kernels (stage 1). Each writes, for its split blockIdx.y, one State per channel it covers
// to partial[field][blockIdx.y * C + c]; every (split, channel) pair is written by exactly one block.

// (N, S, C) layout, and NCHW with S == 1 (the same memory): rows = N * S rows of C contiguous channels.
// Block (bx, by), bx * by = 256: threadIdx.x owns V consecutive channels (coalesced across lanes; one
// 16-byte load per row when V > 1, which needs C % V == 0), threadIdx.y and grid.y split the rows.
// Grid (ceil(C / (bx * V)), splits). The by partial states of a channel are merged by a tree in shared
// memory (by is a power of two).
template <typename Op, int V>
__global__ void __launch_bounds__(plan::kBnReduceThreads) reduce_cl_kernel(Op op, int64_t rows, int64_t C,
                                                         typename Op::acc_t* __restrict__ partial) {
  using State = typename Op::State;
  using Item = typename Op::Item;
  using acc_t = typename Op::acc_t;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  State* red = reinterpret_cast<State*>(smem_raw);

  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * V;
  const bool active = c0 < C;  // with V > 1, C % V == 0: a vector is entirely in or out

  State st[V];
  typename Op::Ctx ctx[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    st[k] = State::zero();
    ctx[k] = op.context(active ? c0 + k : 0);
  }
  if (active) {
    const int64_t row_step = int64_t(gridDim.y) * by;
#pragma unroll Op::kUnroll
    for (int64_t r = int64_t(blockIdx.y) * by + ty; r < rows; r += row_step) {
      Item it[V];
      op.template load<V>(r * C + c0, it);
      op.template add_row<V>(st, it, ctx);
    }
  }

  const int64_t total = int64_t(gridDim.y) * C;
  for (int k = 0; k < V; ++k) {
    red[ty * bx + tx] = st[k];
    __syncthreads();
    for (int h = by / 2; h > 0; h >>= 1) {
      if (ty < h) {
        State s = red[ty * bx + tx];
        s.merge(red[(ty + h) * bx + tx]);
        red[ty * bx + tx] = s;
      }
      __syncthreads();
    }
    if (ty == 0 && active) red[tx].store(partial, int64_t(blockIdx.y) * C + c0 + k, total);
    __syncthreads();  // red is rewritten for the next k
  }
}

// NCHW with small planes (1 < S <= plan::kBnTileMax = 1024), e.g. N x 2048 x 7 x 7. A block covers a tile of cb
// consecutive channels; for one sample n their cb * S elements are contiguous, so thread t reads element
// t of that segment (coalesced) for every row n of its split: it always sees channel c0 + t / S.
// Block: round_up(CB * S, 32) threads (<= 1024); grid (ceil(C / CB), splits), splits over n.
// Then the S states of each channel are merged in shared memory, one warp per channel.
template <typename Op>
__global__ void __launch_bounds__(plan::kBnTileMax) reduce_nchw_tile_kernel(Op op, int64_t N, int64_t C, int S, int CB,
                                                                     typename Op::acc_t* __restrict__ partial) {
  using State = typename Op::State;
  using Item = typename Op::Item;
  using acc_t = typename Op::acc_t;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  State* red = reinterpret_cast<State*>(smem_raw);

  const int64_t c0 = int64_t(blockIdx.x) * CB;
  const int cb = static_cast<int>(C - c0 < CB ? C - c0 : CB);
  const int seg = cb * S;  // valid threads in this tile
  const int t = threadIdx.x;

  State st = State::zero();
  if (t < seg) {
    const typename Op::Ctx ctx = op.context(c0 + t / S);
    const int64_t row_stride = C * S;
    const int64_t first = c0 * S + t;
#pragma unroll Op::kUnroll
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
      Item it[1];
      op.template load<1>(n * row_stride + first, it);
      op.add(st, it[0], ctx);
    }
  }
  red[t] = st;
  __syncthreads();

  const int lane = t % kWarp;
  const int64_t total = int64_t(gridDim.y) * C;
  // Warp w merges channels w, w + warps, ...: k32 = 32 * k steps by blockDim.x (a multiple of 32), an add of a
  // constant-bank operand, where a step of blockDim.x / 32 kept in a register was spilled at 32 registers.
  for (int k32 = t - lane; k32 < cb * kWarp; k32 += blockDim.x) {  // warp-uniform loop: the shuffles see a full warp
    const int k = k32 / kWarp;
    State s = State::zero();
    for (int j = lane; j < S; j += kWarp) s.merge(red[k * S + j]);
    s = warp_reduce(s);
    if (lane == 0) s.store(partial, int64_t(blockIdx.y) * C + c0 + k, total);
  }
}

// NCHW with large planes (S > 1024). One channel per block (grid.x = C); the channel's N planes are
// cut into chunks of chunk_len elements (a multiple of V), and each work item (n, chunk) is read by one
// warp, lanes striding the contiguous chunk with V-element loads (V > 1 needs S % V == 0 and an aligned
// base). Items are dealt to warps round-robin: warp w of split blockIdx.y takes items
// blockIdx.y * 8 + w, then + gridDim.y * 8. Block: 256 threads; grid (C, splits).
constexpr int kPlaneWarps = plan::kBnPlaneWarps;

template <typename Op, int V>
__global__ void __launch_bounds__(kPlaneWarps * kWarp)
    reduce_nchw_plane_kernel(Op op, int64_t N, int64_t C, int64_t S, int64_t nchunks, int64_t chunk_len,
                             typename Op::acc_t* __restrict__ partial) {
  using State = typename Op::State;
  using Item = typename Op::Item;
  using acc_t = typename Op::acc_t;
  __shared__ State red[kPlaneWarps];

  const int64_t c = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const typename Op::Ctx ctx = op.context(c);

  State st = State::zero();
  const int64_t items = N * nchunks;
  for (int64_t item = int64_t(blockIdx.y) * kPlaneWarps + warp; item < items;
       item += int64_t(gridDim.y) * kPlaneWarps) {
    const int64_t n = item / nchunks;
    const int64_t begin = (item - n * nchunks) * chunk_len;
    const int64_t end = begin + chunk_len < S ? begin + chunk_len : S;
    const int64_t base = (n * C + c) * S;
#pragma unroll Op::kUnroll
    for (int64_t s = begin + int64_t(lane) * V; s < end; s += int64_t(kWarp) * V) {
      Item it[V];
      op.template load<V>(base + s, it);
#pragma unroll
      for (int k = 0; k < V; ++k) op.add(st, it[k], ctx);
    }
  }
  st = warp_reduce(st);
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (warp == 0) {
    State s = lane < kPlaneWarps ? red[lane] : State::zero();
    s = warp_reduce(s);
    if (lane == 0) s.store(partial, int64_t(blockIdx.y) * C + c, int64_t(gridDim.y) * C);
  }
}

// Stage 2: one warp per channel merges that channel's `splits` partial states, then writes the outputs.
constexpr int kFinalizeWarps = plan::kBnFinalizeWarps;

template <typename Final>
__global__ void __launch_bounds__(kFinalizeWarps * kWarp)
    reduce_finalize_kernel(Final op, const typename Final::acc_t* __restrict__ partial, int64_t C, int64_t splits) {
  using State = typename Final::State;
  const int64_t c = int64_t(blockIdx.x) * kFinalizeWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // warp-uniform
  const int64_t total = splits * C;
  State s = State::zero();
  for (int64_t j = lane; j < splits; j += kWarp) s.merge(State::load(partial, j * C + c, total));
  s = warp_reduce(s);
  if (lane == 0) op.finalize(s, c);
}

// ---------------------------------------------------------------------------------------------------
// Element-wise ops (apply, backward_apply), run by common.cuh's rows_elementwise_kernel (channels_last)
// and planes_elementwise_kernel (NCHW): Chan is the per-channel data of one channel, loaded by chan(c)
// once per work item or vector; run<V>(i, ch) handles the V consecutive elements at flat index i.

template <typename scalar_t_, typename acc_t_, int ACT>
struct ApplyOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  struct Chan {
    acc_t scale, shift;
  };
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  const scalar_t* __restrict__ residual;  // read only when has_residual
  scalar_t* __restrict__ y;
  bool has_residual;
  int code;  // activation code (read when ACT is kDynamic)
  acc_t act_param;

  __device__ __forceinline__ Chan chan(int64_t c) const { return Chan{scale[c], shift[c]}; }

  template <int V, typename At>
  __device__ __forceinline__ void run(int64_t i, const At& at) const {
    const int act = act::code_of<ACT>(code);
    const Pack<scalar_t, V> xv = load_pack<V>(x + i);
    Pack<scalar_t, V> rv;
    if (has_residual) rv = load_pack<V>(residual + i);
    Pack<scalar_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t v = static_cast<acc_t>(xv.v[k]) * at(k).scale + at(k).shift;
      if (has_residual) v += static_cast<acc_t>(rv.v[k]);
      v = act::forward(v, act, act_param);
      out.v[k] = static_cast<scalar_t>(v);
    }
    store_pack<V>(y + i, out);
  }
};

template <typename scalar_t_, typename acc_t_, int ACT>
struct BackwardApplyOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  // b, d, mean are read only when train; scale, shift only when act > relu (else they stay 0).
  struct Chan {
    acc_t a, b, d, mean, scale, shift;
  };
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;         // read only when train or act > relu
  const scalar_t* __restrict__ y;         // read only when act == relu
  const scalar_t* __restrict__ residual;  // read only when act > relu and the forward had one
  const acc_t* __restrict__ scale;        // act > relu only
  const acc_t* __restrict__ shift;
  const acc_t* __restrict__ a;
  const acc_t* __restrict__ b;
  const acc_t* __restrict__ d;
  const acc_t* __restrict__ mean;
  scalar_t* __restrict__ dx;
  scalar_t* __restrict__ g_out;  // written only when write_g
  int code;  // activation code (read when ACT is kDynamic)
  acc_t act_param;
  bool train, write_g;

  __device__ __forceinline__ int act() const { return act::code_of<ACT>(code); }

  __device__ __forceinline__ Chan chan(int64_t c) const {
    Chan ch{a[c], acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (train) {
      ch.b = b[c];
      ch.d = d[c];
      ch.mean = mean[c];
    }
    if (act() > act::kRelu) {
      ch.scale = scale[c];
      ch.shift = shift[c];
    }
    return ch;
  }

  template <int V, typename At>
  __device__ __forceinline__ void run(int64_t i, const At& at) const {
    const int code = act();
    Pack<scalar_t, V> g = load_pack<V>(dy + i);
    if (code == act::kRelu) {
      const Pack<scalar_t, V> yv = load_pack<V>(y + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (act::relu_masks(static_cast<acc_t>(yv.v[k]))) g.v[k] = static_cast<scalar_t>(0);
      }
    }
    Pack<scalar_t, V> xv;
    if (train || code > act::kRelu) xv = load_pack<V>(x + i);
    acc_t gs[V];  // g in acc_t: for act > relu it is dy * act'(v), rounded once when stored
#pragma unroll
    for (int k = 0; k < V; ++k) gs[k] = static_cast<acc_t>(g.v[k]);
    if (code > act::kRelu) {
      Pack<scalar_t, V> rv;
      if (residual != nullptr) rv = load_pack<V>(residual + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t v = static_cast<acc_t>(xv.v[k]) * at(k).scale + at(k).shift;
        if (residual != nullptr) v += static_cast<acc_t>(rv.v[k]);
        gs[k] = act::backward(gs[k], v, code, act_param);
        g.v[k] = static_cast<scalar_t>(gs[k]);
      }
    }
    Pack<scalar_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t v = gs[k] * at(k).a;
      if (train) v = v + (static_cast<acc_t>(xv.v[k]) - at(k).mean) * at(k).b + at(k).d;
      out.v[k] = static_cast<scalar_t>(v);
    }
    store_pack<V>(dx + i, out);
    if (write_g) store_pack<V>(g_out + i, g);
  }
};

// ---------------------------------------------------------------------------------------------------
// Host side: checks

struct Dims {
  int64_t N, C, S;
};

// x as fastnets::check_x (common.cuh) says, with a channel count the launch plans take (at most 2^31 - 1:
// the channel blocks of a grid's x dimension, tests/test_cuda_launch_plans.py).
void check_bn_x(const Tensor& x, bool channels_last, const char* op) {
  check_x(x, channels_last, op);
  STD_TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), op, ": too many channels: ", x.size(1));
}

// Per-channel vector: C elements in the accumulation dtype, on x's device. Returned contiguous.
Tensor channel_vector(const Tensor& v, const char* name, const Tensor& x, const char* op) {
  STD_TORCH_CHECK(v.defined(), op, ": ", name, " is undefined");
  STD_TORCH_CHECK(same_device(v, x), op, ": ", name, " is on ", device_of(v), " but x is on ", device_of(x));
  STD_TORCH_CHECK(v.scalar_type() == acc_type_of(x), op, ": ", name, " must be ", acc_type_of(x), " for ",
              x.scalar_type(), " x, got ", v.scalar_type());
  STD_TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",), got ", str_of(v.sizes()));
  return torch::stable::contiguous(v);
}

Dims dims_of(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return {N, C, S};
}

// ---------------------------------------------------------------------------------------------------
// Host side: launchers. The plans (grid, block, shared memory, path, vector width) are launch_plans.h's.

// Which kernel variants a launcher instantiates for an Op: every one (float64, and stats, which has no
// activation), the vectorized fast paths only (an Op compiled for one activation), or the scalar
// fallbacks only (the act::kDynamic Op of float32/float16/bfloat16). The plan picks the variant at run
// time; dispatch_variant below picks the Op that has it.
enum class Variants { kAll, kVectorized, kScalar };

[[noreturn]] inline void variant_not_compiled(const char* what) {
  STD_TORCH_CHECK(false, "fastnets_cuda: internal error: ", what, " was not compiled for this op variant");
  std::abort();
}

// f(ACT, VARIANTS) as integral constants: float64 -> (kDynamic, kAll); a fast plan -> (the activation,
// kVectorized); otherwise (kDynamic, kScalar).
template <typename scalar_t, typename F>
void dispatch_variant(bool fast, int64_t code, F&& f) {
  using all = std::integral_constant<Variants, Variants::kAll>;
  using vectorized = std::integral_constant<Variants, Variants::kVectorized>;
  using scalar = std::integral_constant<Variants, Variants::kScalar>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(std::integral_constant<int, act::kDynamic>{}, all{});
  } else if (fast) {
    dispatch_act(static_cast<int>(code), [&](auto a) { f(a, vectorized{}); });
  } else {
    f(std::integral_constant<int, act::kDynamic>{}, scalar{});
  }
}

bool reduce_is_fast(const plan::BnReduce& p) { return p.vec > 1 || p.path == plan::BnReduce::kTile; }

// Runs the two-stage reduction of `op` over x's (N, C, S) elements as plan `p` says.
template <Variants W, typename Op>
void launch_reduce(const Op& op, const plan::BnReduce& p, const Dims& dm, const Tensor& x) {
  using State = typename Op::State;
  using acc_t = typename Op::acc_t;
  constexpr int VEC = 16 / sizeof(typename Op::scalar_t);
  constexpr bool kVec = W != Variants::kScalar, kScalar = W != Variants::kVectorized;
  const int64_t N = dm.N, C = dm.C, S = dm.S;
  const cudaStream_t stream = current_stream(x);
  Tensor partial = new_empty_like_device(x, {State::kFields * p.splits * C}, acc_type_of(x));
  acc_t* part = mptr<acc_t>(partial);
  const plan::Launch& l = p.main;
  const dim3 grid = grid_of(l), block = block_of(l);

  if (p.path == plan::BnReduce::kRows) {
    if (p.vec == VEC && VEC > 1) {
      if constexpr (kVec) {
        reduce_cl_kernel<Op, VEC><<<grid, block, l.smem, stream>>>(op, N * S, C, part);
      } else {
        variant_not_compiled("reduce_cl_kernel<VEC>");
      }
    } else {
      if constexpr (kScalar) {
        reduce_cl_kernel<Op, 1><<<grid, block, l.smem, stream>>>(op, N * S, C, part);
      } else {
        variant_not_compiled("reduce_cl_kernel<1>");
      }
    }
  } else if (p.path == plan::BnReduce::kTile) {
    if constexpr (kVec) {
      reduce_nchw_tile_kernel<Op><<<grid, block, l.smem, stream>>>(op, N, C, static_cast<int>(S), p.cb, part);
    } else {
      variant_not_compiled("reduce_nchw_tile_kernel");
    }
  } else {
    if (p.vec == VEC && VEC > 1) {
      if constexpr (kVec) {
        reduce_nchw_plane_kernel<Op, VEC>
            <<<grid, block, l.smem, stream>>>(op, N, C, S, p.nchunks, p.chunk_len, part);
      } else {
        variant_not_compiled("reduce_nchw_plane_kernel<VEC>");
      }
    } else {
      if constexpr (kScalar) {
        reduce_nchw_plane_kernel<Op, 1><<<grid, block, l.smem, stream>>>(op, N, C, S, p.nchunks, p.chunk_len, part);
      } else {
        variant_not_compiled("reduce_nchw_plane_kernel<1>");
      }
    }
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  const plan::Launch& f = p.finalize;
  reduce_finalize_kernel<typename Op::Final>
      <<<grid_of(f), block_of(f), f.smem, stream>>>(op.out, part, C, p.splits);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs an element-wise op over x's elements as plan `p` says (rows for channels_last, planes for NCHW).
template <Variants W, typename Op>
void launch_elementwise(const Op& op, const plan::BnElementwise& p, int64_t numel, const Dims& dm,
                        cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(typename Op::scalar_t);
  constexpr bool kVec = W != Variants::kScalar, kScalar = W != Variants::kVectorized;
  const plan::Launch& l = p.launch();
  const dim3 grid = grid_of(l), block = block_of(l);
  const bool vec = p.vec() == VEC && VEC > 1;
  if (p.rows) {
    const plan::RowsElementwise& r = p.by_rows;
    const int64_t rows = dm.N * dm.S;
    if (vec) {
      if constexpr (kVec) {
        rows_elementwise_kernel<Op, VEC><<<grid, block, l.smem, stream>>>(op, 1, rows, dm.C, r.chunks, r.chunk_len, 0);
      } else {
        variant_not_compiled("rows_elementwise_kernel<VEC>");
      }
    } else {
      if constexpr (kScalar) {
        rows_elementwise_kernel<Op, 1><<<grid, block, l.smem, stream>>>(op, 1, rows, dm.C, r.chunks, r.chunk_len, 0);
      } else {
        variant_not_compiled("rows_elementwise_kernel<1>");
      }
    }
  } else {
    if (vec) {
      if constexpr (kVec) {
        planes_elementwise_kernel<Op, VEC><<<grid, block, l.smem, stream>>>(op, numel, dm.S, dm.C, p.by_planes.step);
      } else {
        variant_not_compiled("planes_elementwise_kernel<VEC>");
      }
    } else {
      if constexpr (kScalar) {
        planes_elementwise_kernel<Op, 1><<<grid, block, l.smem, stream>>>(op, numel, dm.S, dm.C, p.by_planes.step);
      } else {
        variant_not_compiled("planes_elementwise_kernel<1>");
      }
    }
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

plan::Device device_of_guard() {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));  // the DeviceGuard's: x's device
  return plan_device(device);
}

// ---------------------------------------------------------------------------------------------------
// Ops

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x, bool channels_last, double eps) {
  const char* op = "fastnets_cuda::bn_stats";
  check_bn_x(x, channels_last, op);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Dims dm = dims_of(x);
  Tensor mean = new_output(new_empty_like_device(x, {dm.C}, acc_type_of(x)));
  Tensor invstd = new_output(new_empty_like_device(x, {dm.C}, acc_type_of(x)));
  if (dm.C == 0) return {mean, invstd};
  if (x.numel() == 0) {  // torch.var_mean of nothing is NaN
    torch::stable::fill_(mean, std::numeric_limits<double>::quiet_NaN());
    torch::stable::fill_(invstd, std::numeric_limits<double>::quiet_NaN());
    return {mean, invstd};
  }
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    using Op = StatsOp<scalar_t, acc_t>;
    const Op sop{cptr<scalar_t>(x), {mptr<acc_t>(mean), mptr<acc_t>(invstd), static_cast<acc_t>(eps)}};
    const plan::BnReduce p = plan::bn_reduce(dm.N, dm.C, dm.S, channels_last, aligned16(x.const_data_ptr()),
                                             sizeof(scalar_t), sizeof(typename Op::State), device_of_guard());
    launch_reduce<Variants::kAll>(sop, p, dm, x);
  });
  return {mean, invstd};
}

void check_act(int64_t act_code, const char* op) {
  STD_TORCH_CHECK(act_code >= 0 && act_code < act::kNumCodes, op, ": act must be an activation code in [0, ", act::kNumCodes,
              "), got ", act_code);
}

Tensor bn_apply(const Tensor& x, const Tensor& scale, const Tensor& shift,
                    const std::optional<Tensor>& residual, int64_t act_code, double act_param, bool channels_last) {
  const char* op = "fastnets_cuda::bn_apply";
  check_bn_x(x, channels_last, op);
  check_act(act_code, op);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Tensor sc = channel_vector(scale, "scale", x, op);
  const Tensor sh = channel_vector(shift, "shift", x, op);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, op);
  Tensor y = new_output(torch::stable::empty_like(x));
  if (x.numel() == 0) return y;
  const Dims dm = dims_of(x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* res_ptr = has_res ? cptr<scalar_t>(*residual) : nullptr;
    const bool vec_ok = aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr()) && (!has_res || aligned16(res_ptr));
    const plan::BnElementwise p =
        plan::bn_elementwise(dm.N, dm.C, dm.S, channels_last, vec_ok, sizeof(scalar_t), device_of_guard());
    dispatch_variant<scalar_t>(p.vec() > 1, act_code, [&](auto a, auto w) {
      const ApplyOp<scalar_t, acc_t, decltype(a)::value> aop{
          cptr<scalar_t>(x), cptr<acc_t>(sc), cptr<acc_t>(sh), res_ptr, mptr<scalar_t>(y), has_res,
          static_cast<int>(act_code), static_cast<acc_t>(act_param)};
      launch_elementwise<decltype(w)::value>(aop, p, x.numel(), dm, current_stream(x));
    });
  });
  return y;
}

// The activation's inputs of a backward op: y for relu; scale, shift (and the residual, if any) above it.
struct ActInputs {
  bool relu, pre, has_res;
  Tensor sc, sh;
};

ActInputs check_act_inputs(int64_t act_code, const Tensor& x, const std::optional<Tensor>& y,
                           const std::optional<Tensor>& residual, const std::optional<Tensor>& scale,
                           const std::optional<Tensor>& shift, const char* op) {
  check_act(act_code, op);
  ActInputs ai{act_code == act::kRelu, act_code > act::kRelu, false, {}, {}};
  STD_TORCH_CHECK(!ai.relu || (y.has_value() && y->defined()), op, ": y (the forward output) is required for relu");
  if (ai.relu) check_like_x(*y, "y", x, op);
  if (ai.pre) {
    STD_TORCH_CHECK(scale.has_value() && scale->defined() && shift.has_value() && shift->defined(), op,
                ": scale and shift are required to recompute the pre-activation of activation code ", act_code);
    ai.sc = channel_vector(*scale, "scale", x, op);
    ai.sh = channel_vector(*shift, "shift", x, op);
    ai.has_res = residual.has_value() && residual->defined();
    if (ai.has_res) check_like_x(*residual, "residual", x, op);
  }
  return ai;
}

std::tuple<Tensor, Tensor> bn_backward_reduce(const Tensor& dy, const Tensor& x,
                                                      const std::optional<Tensor>& y,
                                                      const std::optional<Tensor>& residual,
                                                      const std::optional<Tensor>& scale,
                                                      const std::optional<Tensor>& shift, const Tensor& mean,
                                                      int64_t act_code, double act_param, bool channels_last) {
  const char* op = "fastnets_cuda::bn_backward_reduce";
  check_bn_x(x, channels_last, op);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_like_x(dy, "dy", x, op);
  const ActInputs ai = check_act_inputs(act_code, x, y, residual, scale, shift, op);
  const Tensor mu = channel_vector(mean, "mean", x, op);
  const Dims dm = dims_of(x);
  Tensor sum_g = new_output(new_empty_like_device(x, {dm.C}, acc_type_of(x)));
  Tensor sum_gxmu = new_output(new_empty_like_device(x, {dm.C}, acc_type_of(x)));
  if (dm.C == 0) return {sum_g, sum_gxmu};
  if (x.numel() == 0) {  // empty sums
    torch::stable::zero_(sum_g);
    torch::stable::zero_(sum_gxmu);
    return {sum_g, sum_gxmu};
  }
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* y_ptr = ai.relu ? cptr<scalar_t>(*y) : nullptr;
    const scalar_t* r_ptr = ai.has_res ? cptr<scalar_t>(*residual) : nullptr;
    const acc_t* sc_ptr = ai.pre ? cptr<acc_t>(ai.sc) : nullptr;
    const acc_t* sh_ptr = ai.pre ? cptr<acc_t>(ai.sh) : nullptr;
    const bool vec_ok = aligned16(dy.const_data_ptr()) && aligned16(x.const_data_ptr()) &&
                        (!ai.relu || aligned16(y_ptr)) && (!ai.has_res || aligned16(r_ptr));
    const plan::BnReduce p = plan::bn_reduce(dm.N, dm.C, dm.S, channels_last, vec_ok, sizeof(scalar_t),
                                             sizeof(Sums<acc_t>), device_of_guard());
    dispatch_variant<scalar_t>(reduce_is_fast(p), act_code, [&](auto a, auto w) {
      const BackwardReduceOp<scalar_t, acc_t, decltype(a)::value> rop{
          cptr<scalar_t>(dy), cptr<scalar_t>(x), y_ptr, r_ptr, sc_ptr, sh_ptr, cptr<acc_t>(mu),
          {mptr<acc_t>(sum_g), mptr<acc_t>(sum_gxmu)}, static_cast<int>(act_code), static_cast<acc_t>(act_param)};
      launch_reduce<decltype(w)::value>(rop, p, dm, x);
    });
  });
  return {sum_g, sum_gxmu};
}

std::tuple<Tensor, Tensor> bn_backward_apply(const Tensor& dy, const Tensor& x,
                                                     const std::optional<Tensor>& y,
                                                     const std::optional<Tensor>& residual,
                                                     const std::optional<Tensor>& scale,
                                                     const std::optional<Tensor>& shift, const Tensor& a,
                                                     const Tensor& b, const Tensor& d, const Tensor& mean,
                                                     int64_t act_code, double act_param, bool train, bool write_g,
                                                     bool channels_last) {
  const char* op = "fastnets_cuda::bn_backward_apply";
  check_bn_x(x, channels_last, op);
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  check_like_x(dy, "dy", x, op);
  const ActInputs ai = check_act_inputs(act_code, x, y, residual, scale, shift, op);
  const Tensor av = channel_vector(a, "a", x, op);
  const Tensor bv = channel_vector(b, "b", x, op);
  const Tensor dv = channel_vector(d, "d", x, op);
  const Tensor mu = channel_vector(mean, "mean", x, op);
  Tensor dx = new_output(torch::stable::empty_like(x));
  // g is dy's dtype; an empty tensor (as the Python side returns None) when not asked for.
  Tensor g = write_g ? new_output(torch::stable::empty_like(x)) : torch::stable::new_empty(x, {0});
  if (x.numel() == 0) return {dx, g};
  const Dims dm = dims_of(x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* y_ptr = ai.relu ? cptr<scalar_t>(*y) : nullptr;
    const scalar_t* r_ptr = ai.has_res ? cptr<scalar_t>(*residual) : nullptr;
    const acc_t* sc_ptr = ai.pre ? cptr<acc_t>(ai.sc) : nullptr;
    const acc_t* sh_ptr = ai.pre ? cptr<acc_t>(ai.sh) : nullptr;
    scalar_t* g_ptr = write_g ? mptr<scalar_t>(g) : nullptr;
    const bool vec_ok = aligned16(dy.const_data_ptr()) && aligned16(x.const_data_ptr()) &&
                        aligned16(dx.const_data_ptr()) && (!ai.relu || aligned16(y_ptr)) &&
                        (!ai.has_res || aligned16(r_ptr)) && (!write_g || aligned16(g_ptr));
    const plan::BnElementwise p =
        plan::bn_elementwise(dm.N, dm.C, dm.S, channels_last, vec_ok, sizeof(scalar_t), device_of_guard());
    dispatch_variant<scalar_t>(p.vec() > 1, act_code, [&](auto a, auto w) {
      const BackwardApplyOp<scalar_t, acc_t, decltype(a)::value> bop{
          cptr<scalar_t>(dy), cptr<scalar_t>(x), y_ptr, r_ptr, sc_ptr, sh_ptr, cptr<acc_t>(av), cptr<acc_t>(bv),
          cptr<acc_t>(dv), cptr<acc_t>(mu), mptr<scalar_t>(dx), g_ptr, static_cast<int>(act_code),
          static_cast<acc_t>(act_param), train, write_g};
      launch_elementwise<decltype(w)::value>(bop, p, x.numel(), dm, current_stream(x));
    });
  });
  return {dx, g};
}

}  // namespace
}  // namespace bn
}  // namespace fastnets

STABLE_TORCH_LIBRARY_FRAGMENT(fastnets_cuda, m) {
  m.def("bn_stats(Tensor x, bool channels_last, float eps) -> (Tensor mean, Tensor invstd)");
  m.def(
      "bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, int act, float act_param, "
      "bool channels_last) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor dy, Tensor x, Tensor? y, Tensor? residual, Tensor? scale, Tensor? shift, "
      "Tensor mean, int act, float act_param, bool channels_last) -> (Tensor sum_g, Tensor sum_gxmu)");
  m.def(
      "bn_backward_apply(Tensor dy, Tensor x, Tensor? y, Tensor? residual, Tensor? scale, Tensor? shift, "
      "Tensor a, Tensor b, Tensor d, Tensor mean, int act, float act_param, bool train, bool write_g, "
      "bool channels_last) -> (Tensor dx, Tensor g)");
}

STABLE_TORCH_LIBRARY_IMPL(fastnets_cuda, CUDA, m) {
  m.impl("bn_stats", TORCH_BOX(&fastnets::bn::bn_stats));
  m.impl("bn_apply", TORCH_BOX(&fastnets::bn::bn_apply));
  m.impl("bn_backward_reduce", TORCH_BOX(&fastnets::bn::bn_backward_reduce));
  m.impl("bn_backward_apply", TORCH_BOX(&fastnets::bn::bn_backward_apply));
}
