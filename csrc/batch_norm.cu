// BatchNorm (+ residual add + activation) primitives of the `cuda` backend; the contract (same signatures,
// semantics and output dtypes) is fastnets/reference/batch_norm.py:
//   bn_stats            per-channel mean and invstd = rsqrt(biased var + eps)
//   bn_apply            y = act(x * scale[c] + shift[c] [+ residual])
//   bn_backward_reduce  per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(v)
//   bn_backward_apply   dx = a[c] * g [+ b[c] * (x - mean[c]) + d[c]], and g itself when asked
// act is an activation code of csrc/activations.cuh. relu's gradient is masked by the saved output
// (y <= 0 -> 0, as threshold_backward); codes above relu recompute v = x * scale[c] + shift[c]
// [+ residual] in the backward (scale, shift and, when the forward had one, the residual are then given).
//
// x is dense and seen as (N, C, S) in memory (NCHW; S = product of the spatial sizes, 1 for 2-D input)
// or (N, S, C) (channels_last). dy, y and residual have x's layout. Per-channel vectors are in the
// accumulation type acc_t: float64 for float64 activations, float32 otherwise.
//
// Reductions (stats, backward_reduce) are two-stage and deterministic (no atomics): a tiled kernel
// writes one partial State per (split, channel) into a [fields, splits, C] buffer, then a finalize
// kernel merges the splits of each channel. The tiling code is shared by both reductions through an
// `Op` (what to load, how to accumulate, what to write); see the comment above each kernel.
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
//   finalize(state, c)   writes the outputs of channel c

template <typename scalar_t_, typename acc_t_>
struct StatsOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using State = Welford<acc_t>;
  struct Item {
    acc_t x;
  };
  const scalar_t* __restrict__ x;
  acc_t* __restrict__ mean_out;
  acc_t* __restrict__ invstd_out;
  acc_t eps;
  using Ctx = acc_t;

  template <int V>
  __device__ __forceinline__ void load(int64_t i, Item (&it)[V]) const {
    const Pack<scalar_t, V> p = load_pack<V>(x + i);
#pragma unroll
    for (int k = 0; k < V; ++k) it[k].x = static_cast<acc_t>(p.v[k]);
  }
  __device__ __forceinline__ acc_t context(int64_t) const { return acc_t(0); }
  __device__ __forceinline__ void add(State& s, const Item& it, Ctx) const { s.add(it.x); }
  __device__ __forceinline__ void finalize(const State& s, int64_t c) const {
    mean_out[c] = s.mean;
    invstd_out[c] = rsqrt_rn(div_rn(s.m2, s.n) + eps);  // biased variance
  }
};

template <typename scalar_t_, typename acc_t_>
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
  acc_t* __restrict__ sum_g_out;
  acc_t* __restrict__ sum_gxmu_out;
  int code;  // activation code
  acc_t act_param;

  template <int V>
  __device__ __forceinline__ void load(int64_t i, Item (&it)[V]) const {
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
    if (code > act::kRelu) return Ctx{mean[c], scale[c], shift[c]};
    return Ctx{mean[c], acc_t(0), acc_t(0)};
  }
  __device__ __forceinline__ void add(State& s, const Item& it, const Ctx& cx) const {
    acc_t g = it.g;
    if (code > act::kRelu) g = act::backward(g, it.x * cx.scale + cx.shift + it.r, code, act_param);
    s.a += g;
    s.b += g * (it.x - cx.mean);
  }
  __device__ __forceinline__ void finalize(const State& s, int64_t c) const {
    sum_g_out[c] = s.a;
    sum_gxmu_out[c] = s.b;
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
__global__ void __launch_bounds__(256) reduce_cl_kernel(Op op, int64_t rows, int64_t C,
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
#pragma unroll 4
    for (int64_t r = int64_t(blockIdx.y) * by + ty; r < rows; r += row_step) {
      Item it[V];
      op.template load<V>(r * C + c0, it);
#pragma unroll
      for (int k = 0; k < V; ++k) op.add(st[k], it[k], ctx[k]);
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

// NCHW with small planes (1 < S <= kTileMax), e.g. N x 2048 x 7 x 7. A block covers a tile of cb
// consecutive channels; for one sample n their cb * S elements are contiguous, so thread t reads element
// t of that segment (coalesced) for every row n of its split: it always sees channel c0 + t / S.
// Block: round_up(CB * S, 32) threads (<= kTileMax); grid (ceil(C / CB), splits), splits over n.
// Then the S states of each channel are merged in shared memory, one warp per channel.
constexpr int kTileMax = 1024;

template <typename Op>
__global__ void __launch_bounds__(kTileMax) reduce_nchw_tile_kernel(Op op, int64_t N, int64_t C, int S, int CB,
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
#pragma unroll 4
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
      Item it[1];
      op.template load<1>(n * row_stride + first, it);
      op.add(st, it[0], ctx);
    }
  }
  red[t] = st;
  __syncthreads();

  const int warp = t / kWarp, lane = t % kWarp, nwarps = blockDim.x / kWarp;
  const int64_t total = int64_t(gridDim.y) * C;
  for (int k = warp; k < cb; k += nwarps) {  // warp-uniform loop: the shuffles see a full warp
    State s = State::zero();
    for (int j = lane; j < S; j += kWarp) s.merge(red[k * S + j]);
    s = warp_reduce(s);
    if (lane == 0) s.store(partial, int64_t(blockIdx.y) * C + c0 + k, total);
  }
}

// NCHW with large planes (S > kTileMax). One channel per block (grid.x = C); the channel's N planes are
// cut into chunks of chunk_len elements (a multiple of V), and each work item (n, chunk) is read by one
// warp, lanes striding the contiguous chunk with V-element loads (V > 1 needs S % V == 0 and an aligned
// base). Items are dealt to warps round-robin: warp w of split blockIdx.y takes items
// blockIdx.y * 8 + w, then + gridDim.y * 8. Block: 256 threads; grid (C, splits).
constexpr int kPlaneWarps = 8;

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
#pragma unroll 4
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
constexpr int kFinalizeWarps = 8;

template <typename Op>
__global__ void __launch_bounds__(kFinalizeWarps * kWarp)
    reduce_finalize_kernel(Op op, const typename Op::acc_t* __restrict__ partial, int64_t C, int64_t splits) {
  using State = typename Op::State;
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
// Elementwise ops (apply, backward_apply). Interface: run<V>(i, ch) handles the V consecutive elements
// at flat index i, element k being in channel ch[k].

template <typename scalar_t_, typename acc_t_>
struct ApplyOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  const scalar_t* __restrict__ x;
  const acc_t* __restrict__ scale;
  const acc_t* __restrict__ shift;
  const scalar_t* __restrict__ residual;  // read only when has_residual
  scalar_t* __restrict__ y;
  bool has_residual;
  int code;  // activation code
  acc_t act_param;

  template <int V>
  __device__ __forceinline__ void run(int64_t i, const int64_t (&ch)[V]) const {
    const Pack<scalar_t, V> xv = load_pack<V>(x + i);
    Pack<scalar_t, V> rv;
    if (has_residual) rv = load_pack<V>(residual + i);
    Pack<scalar_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t v = static_cast<acc_t>(xv.v[k]) * scale[ch[k]] + shift[ch[k]];
      if (has_residual) v += static_cast<acc_t>(rv.v[k]);
      v = act::forward(v, code, act_param);
      out.v[k] = static_cast<scalar_t>(v);
    }
    store_pack<V>(y + i, out);
  }
};

template <typename scalar_t_, typename acc_t_>
struct BackwardApplyOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
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
  int code;  // activation code
  acc_t act_param;
  bool train, write_g;

  template <int V>
  __device__ __forceinline__ void run(int64_t i, const int64_t (&ch)[V]) const {
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
        const int64_t c = ch[k];
        acc_t v = static_cast<acc_t>(xv.v[k]) * scale[c] + shift[c];
        if (residual != nullptr) v += static_cast<acc_t>(rv.v[k]);
        gs[k] = act::backward(gs[k], v, code, act_param);
        g.v[k] = static_cast<scalar_t>(gs[k]);
      }
    }
    Pack<scalar_t, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = ch[k];
      acc_t v = gs[k] * a[c];
      if (train) v = v + (static_cast<acc_t>(xv.v[k]) - mean[c]) * b[c] + d[c];
      out.v[k] = static_cast<scalar_t>(v);
    }
    store_pack<V>(dx + i, out);
    if (write_g) store_pack<V>(g_out + i, g);
  }
};

// Grid-stride over vectors of V elements; element i is in channel (i / inner) % C, inner = S for NCHW
// and 1 for channels_last. The channel is found by division once per thread and then carried along by
// additions (the loop step is constant), so the hot loop has no 64-bit division. The numel % V tail
// elements are handled one per thread by the first threads of the grid.
constexpr int kElementwiseThreads = 256;

template <typename Op, int V>
__global__ void __launch_bounds__(kElementwiseThreads)
    elementwise_kernel(Op op, int64_t numel, int64_t inner, int64_t C) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / V;

  const int64_t tail = numel - nvec * V;
  if (tid < tail) {
    const int64_t i = nvec * V + tid;
    const int64_t ch[1] = {(i / inner) % C};
    op.template run<1>(i, ch);
  }

  if (tid >= nvec) return;
  int64_t i = tid * V;
  int64_t q = i / inner;
  int64_t r = i - q * inner;  // position inside the current run of `inner` same-channel elements
  int64_t c = q % C;
  const int64_t step = nthreads * V;
  const int64_t step_q = step / inner;
  const int64_t step_r = step - step_q * inner;
  const int64_t step_c = step_q % C;
  for (int64_t v = tid; v < nvec; v += nthreads) {
    int64_t ch[V];
    int64_t rr = r, cc = c;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ch[k] = cc;
      if (++rr == inner) {
        rr = 0;
        cc = (cc + 1 == C) ? 0 : cc + 1;
      }
    }
    op.template run<V>(i, ch);
    // Advance (r, c) by `step` elements: r < inner and c < C stay true with one carry and one wrap.
    i += step;
    r += step_r;
    c += step_c;
    if (r >= inner) {
      r -= inner;
      c += 1;
    }
    if (c >= C) c -= C;
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: checks

struct Dims {
  int64_t N, C, S;
};

// x as fastnets::check_x (common.cuh) says, with a channel count that fits the kernels' int32 grid math.
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
// Host side: launchers

int target_blocks(int threads_per_block) {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));  // the DeviceGuard's: x's device
  const DeviceLimits prop = device_limits(device);
  // One full wave at the thread-count occupancy limit (register limits may lower it; a second
  // partial wave then costs little for these memory-bound kernels).
  const int per_sm = std::max(1, std::min(prop.max_threads_per_sm / threads_per_block, 32));
  return prop.sms * per_sm;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// How many splits to cut `units` units of work into: at most `wanted` (and 65535, the grid.y limit), with
// every split getting the same number of units (ceil(units / splits)) so no block idles at the end.
int64_t balanced_splits(int64_t units, int64_t wanted) {
  wanted = std::max<int64_t>(1, std::min<int64_t>(wanted, 65535));
  const int64_t per = ceil_div(units, wanted);
  return std::max<int64_t>(1, ceil_div(units, per));
}

// Runs the two-stage reduction of `op` over x's (N, C, S) elements. `vec_ok`: every pointer the op
// loads from is 16-byte aligned.
template <typename Op>
void launch_reduce(const Op& op, const Dims& dm, bool channels_last, bool vec_ok, const Tensor& x) {
  using State = typename Op::State;
  using acc_t = typename Op::acc_t;
  constexpr int VEC = 16 / sizeof(typename Op::scalar_t);
  const int64_t N = dm.N, C = dm.C, S = dm.S;
  const cudaStream_t stream = current_stream(x);
  Tensor partial;
  int64_t splits = 1;

  if (channels_last || S == 1) {
    const int64_t rows = N * S;
    const int V = (vec_ok && C % VEC == 0) ? VEC : 1;
    const int64_t cols = ceil_div(C, V);
    const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cols)));
    const int by = 256 / bx;
    const int64_t gx = ceil_div(cols, bx);
    // Enough splits of the rows to fill the GPU; the unit of work is `by` rows (one per thread row).
    splits = balanced_splits(ceil_div(rows, by), ceil_div(target_blocks(256), gx));
    partial = new_empty_like_device(x, {State::kFields * splits * C}, acc_type_of(x));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
    const dim3 block(bx, by);
    const size_t smem = sizeof(State) * 256;
    if (V == VEC) {
      reduce_cl_kernel<Op, VEC><<<grid, block, smem, stream>>>(op, rows, C, mptr<acc_t>(partial));
    } else {
      reduce_cl_kernel<Op, 1><<<grid, block, smem, stream>>>(op, rows, C, mptr<acc_t>(partial));
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (S <= kTileMax) {
    const int CB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(C, kTileMax / S)));
    const int threads = static_cast<int>(ceil_div(int64_t(CB) * S, kWarp) * kWarp);
    const int64_t gx = ceil_div(C, CB);
    splits = balanced_splits(N, ceil_div(target_blocks(threads), gx));
    partial = new_empty_like_device(x, {State::kFields * splits * C}, acc_type_of(x));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
    const size_t smem = sizeof(State) * threads;
    reduce_nchw_tile_kernel<Op><<<grid, threads, smem, stream>>>(op, N, C, static_cast<int>(S), CB,
                                                                  mptr<acc_t>(partial));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int V = (vec_ok && S % VEC == 0) ? VEC : 1;
    constexpr int threads = kPlaneWarps * kWarp;
    const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(ceil_div(target_blocks(threads), C), 65535));
    // Cut planes into chunks only when the N planes alone leave warps idle, and never below 4 loads per
    // lane (a chunk of at least 4 * 32 * V elements).
    const int64_t max_chunks = std::max<int64_t>(1, S / (4 * kWarp * V));
    int64_t nchunks = std::min(max_chunks, std::max<int64_t>(1, ceil_div(wanted * kPlaneWarps, N)));
    const int64_t chunk_len = ceil_div(ceil_div(S, nchunks), V) * V;
    nchunks = ceil_div(S, chunk_len);
    splits = balanced_splits(ceil_div(N * nchunks, kPlaneWarps), wanted);
    partial = new_empty_like_device(x, {State::kFields * splits * C}, acc_type_of(x));
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(splits));
    if (V == VEC) {
      reduce_nchw_plane_kernel<Op, VEC>
          <<<grid, threads, 0, stream>>>(op, N, C, S, nchunks, chunk_len, mptr<acc_t>(partial));
    } else {
      reduce_nchw_plane_kernel<Op, 1>
          <<<grid, threads, 0, stream>>>(op, N, C, S, nchunks, chunk_len, mptr<acc_t>(partial));
    }
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t fblocks = ceil_div(C, kFinalizeWarps);
  reduce_finalize_kernel<Op><<<static_cast<unsigned>(fblocks), kFinalizeWarps * kWarp, 0, stream>>>(
      op, mptr<acc_t>(partial), C, splits);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op>
void launch_elementwise(const Op& op, int64_t numel, const Dims& dm, bool channels_last, bool vec_ok,
                        cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(typename Op::scalar_t);
  const int64_t inner = channels_last ? 1 : dm.S;
  const int V = vec_ok ? VEC : 1;
  const int64_t nvec = numel / V;
  // Grid-stride: a few waves at most, so each thread handles several vectors.
  const int64_t max_blocks = int64_t(target_blocks(kElementwiseThreads)) * 4;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(nvec, kElementwiseThreads), max_blocks));
  const unsigned grid = static_cast<unsigned>(blocks);
  if (V == VEC) {
    elementwise_kernel<Op, VEC><<<grid, kElementwiseThreads, 0, stream>>>(op, numel, inner, dm.C);
  } else {
    elementwise_kernel<Op, 1><<<grid, kElementwiseThreads, 0, stream>>>(op, numel, inner, dm.C);
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
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
    StatsOp<scalar_t, acc_t> sop{cptr<scalar_t>(x), mptr<acc_t>(mean),
                                 mptr<acc_t>(invstd), static_cast<acc_t>(eps)};
    launch_reduce(sop, dm, channels_last, aligned16(x.const_data_ptr()), x);
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
  check_x(x, channels_last, op);
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
    ApplyOp<scalar_t, acc_t> aop{cptr<scalar_t>(x), cptr<acc_t>(sc), cptr<acc_t>(sh),
                                 res_ptr, mptr<scalar_t>(y), has_res, static_cast<int>(act_code),
                                 static_cast<acc_t>(act_param)};
    const bool vec_ok = aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr()) && (!has_res || aligned16(res_ptr));
    launch_elementwise(aop, x.numel(), dm, channels_last, vec_ok, current_stream(x));
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
    BackwardReduceOp<scalar_t, acc_t> rop{cptr<scalar_t>(dy), cptr<scalar_t>(x), y_ptr, r_ptr,
                                          sc_ptr, sh_ptr, cptr<acc_t>(mu), mptr<acc_t>(sum_g),
                                          mptr<acc_t>(sum_gxmu), static_cast<int>(act_code),
                                          static_cast<acc_t>(act_param)};
    const bool vec_ok = aligned16(dy.const_data_ptr()) && aligned16(x.const_data_ptr()) &&
                        (!ai.relu || aligned16(y_ptr)) && (!ai.has_res || aligned16(r_ptr));
    launch_reduce(rop, dm, channels_last, vec_ok, x);
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
    BackwardApplyOp<scalar_t, acc_t> bop{cptr<scalar_t>(dy), cptr<scalar_t>(x), y_ptr, r_ptr,
                                         sc_ptr, sh_ptr, cptr<acc_t>(av), cptr<acc_t>(bv),
                                         cptr<acc_t>(dv), cptr<acc_t>(mu),
                                         mptr<scalar_t>(dx), g_ptr, static_cast<int>(act_code),
                                         static_cast<acc_t>(act_param), train, write_g};
    const bool vec_ok = aligned16(dy.const_data_ptr()) && aligned16(x.const_data_ptr()) &&
                        aligned16(dx.const_data_ptr()) && (!ai.relu || aligned16(y_ptr)) &&
                        (!ai.has_res || aligned16(r_ptr)) && (!write_g || aligned16(g_ptr));
    launch_elementwise(bop, x.numel(), dm, channels_last, vec_ok, current_stream(x));
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
