// The launch plan of every CUDA C++ kernel of fastnets._C: grid, block, dynamic shared memory and the
// kernel's __launch_bounds__, as pure host functions of the shapes and of two device numbers (SM count,
// threads per SM). The launchers in the .cu files call them and launch exactly what they return; the
// internal op fastnets_cuda::launch_plan (launch_plans.cpp) returns the same plans to Python, where
// tests/test_cuda_launch_plans.py checks them against the GPU's limits (tests/launch_limits.py) for normal
// and extreme shapes without a GPU.
//
// Plain C++17, no CUDA and no torch header: the test also compiles this file on its own with the host
// compiler (tests/launch_plan_driver.cpp), so that a change here is checked even before the extension is
// rebuilt (and the mutation check can plant bugs in it).
//
// Every grid dimension a plan returns is within the GPU's limits for every shape the ops accept: the
// kernels loop (grid-stride) over whatever work a capped grid does not cover.
#pragma once

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// The index arithmetic the kernels share with this file (PlaneCursor, group_of_item) runs on both sides: on the
// device in the kernels, on the host in the test driver, which walks it against plain division.
#if defined(__CUDACC__)
#define FASTNETS_HOST_DEVICE __host__ __device__
#else
#define FASTNETS_HOST_DEVICE
#endif

namespace fastnets {
namespace plan {

constexpr int kWarp = 32;
constexpr int64_t kInt32Max = 2147483647;
constexpr int64_t kGridXMax = 2147483647;  // blocks in x
constexpr int64_t kGridYZMax = 65535;      // blocks in y and z

// Threads per block. Each is also its kernels' __launch_bounds__ (the .cu files use these constants).
constexpr int kElementwiseThreads = 256;  // rows_elementwise_kernel, planes_elementwise_kernel (bn and se)
constexpr int kBnReduceThreads = 256;     // bn reduce_cl_kernel
constexpr int kBnTileMax = 1024;          // bn reduce_nchw_tile_kernel: threads and elements of one tile
constexpr int kBnPlaneWarps = 8;          // bn reduce_nchw_plane_kernel: 8 warps
constexpr int kBnFinalizeWarps = 8;       // bn reduce_finalize_kernel: one warp per channel
constexpr int kSeReduceThreads = 256;     // se reduce_nchw_kernel (one warp per plane), reduce_cl_kernel
constexpr int kSeExciteThreads = 512;     // se excite_kernel
constexpr int kSeExciteMaxSamples = 4;    // samples per excite block: 4, 2 or 1

// The two numbers of the device the plans depend on (cudaDevAttrMultiProcessorCount,
// cudaDevAttrMaxThreadsPerMultiProcessor).
struct Device {
  int64_t sms = 1;
  int64_t max_threads_per_sm = 2048;
};

struct Launch {
  const char* kernel = "";  // the kernel's name in its namespace, e.g. "bn::reduce_cl_kernel"
  int64_t grid[3] = {1, 1, 1};
  int block[3] = {1, 1, 1};
  int64_t smem = 0;  // dynamic shared memory, bytes
  int bound = 0;     // the kernel's __launch_bounds__ (max threads per block)
  int threads() const { return block[0] * block[1] * block[2]; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// One full wave at the thread-count occupancy limit (register limits may lower it; a second partial wave
// then costs little for these memory-bound kernels).
inline int64_t target_blocks(const Device& d, int threads_per_block) {
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(d.max_threads_per_sm / threads_per_block, 32));
  return std::max<int64_t>(1, d.sms) * per_sm;
}

// How many splits to cut `units` units of work into: at most `wanted` (and the grid.y limit), every split
// getting the same number of units (ceil(units / splits)) so no block idles at the end.
inline int64_t balanced_splits(int64_t units, int64_t wanted) {
  wanted = std::max<int64_t>(1, std::min<int64_t>(wanted, kGridYZMax));
  const int64_t per = ceil_div(std::max<int64_t>(units, 1), wanted);
  return std::max<int64_t>(1, ceil_div(units, per));
}

// Elements per 16-byte vector.
inline int vec_of(int elem_bytes) { return 16 / elem_bytes; }

// ---------------------------------------------------------------------------------------------------
// Element-wise kernels (common.cuh), shared by BatchNorm and squeeze-excite.

// rows_elementwise_kernel: `groups` groups of `rows` rows of C contiguous elements (channels_last: a
// group is a sample for squeeze-excite, the whole tensor for BatchNorm). Thread (tx, ty) of block
// (bx, by) owns `vec` consecutive channels (loads their per-channel data once per work item) and walks
// rows ty, ty + by, ... of a work item = (group, chunk of chunk_len rows). Grid (channel blocks,
// min(items, 65535)); blockIdx.y strides over the items.
struct RowsElementwise {
  int vec = 1;
  int64_t chunks = 1, chunk_len = 1;
  Launch launch;
};

inline RowsElementwise rows_elementwise(int64_t groups, int64_t rows, int64_t C, int vec, const Device& d) {
  RowsElementwise p;
  p.vec = vec;
  const int64_t cols = ceil_div(C, vec);
  const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cols)));
  const int by = kElementwiseThreads / bx;
  const int64_t gx = ceil_div(cols, bx);
  // About four waves of blocks in all; a chunk is at least `by` rows (one per thread row).
  const int64_t wanted_items = std::max<int64_t>(1, ceil_div(target_blocks(d, kElementwiseThreads) * 4, gx));
  const int64_t per_group = std::max<int64_t>(1, std::min(ceil_div(rows, by), ceil_div(wanted_items, groups)));
  p.chunk_len = std::max<int64_t>(1, ceil_div(rows, per_group));
  p.chunks = ceil_div(rows, p.chunk_len);
  // With chunks > 1 a group has fewer chunks than wanted_items / groups, so items < 2 * wanted_items: far
  // below 2^31, which group_of_item's 32-bit division needs (tests/test_cuda_launch_plans.py checks it).
  const int64_t items = groups * p.chunks;
  Launch& l = p.launch;
  l.kernel = "rows_elementwise_kernel";
  l.grid[0] = gx;
  l.grid[1] = std::max<int64_t>(1, std::min(items, kGridYZMax));
  l.block[0] = bx;
  l.block[1] = by;
  l.bound = kElementwiseThreads;
  return p;
}

// The group (sample) of work item `item` of rows_elementwise_kernel, item / chunks, in 32-bit division: a 64-bit
// division on the device is a called subroutine, whose stack frame the audit counts as spills. The plan keeps
// items < 2^31 whenever chunks > 1 (rows_elementwise); with one chunk per group the item is the group.
FASTNETS_HOST_DEVICE inline int64_t group_of_item(int64_t item, int64_t chunks) {
  return chunks == 1 ? item : int64_t(static_cast<uint32_t>(item) / static_cast<uint32_t>(chunks));
}

// planes_elementwise_kernel: the tensor as `numel` elements in planes of S (NCHW), plane p of channel index
// p % M, grid-stride over vectors of `vec` elements (a vector spans at most two planes, which needs S >= vec),
// the numel % vec tail one element per thread. Every 64-bit division of the walk is done here, on the host:
// the grid-stride step split into whole planes and a remainder, and the channel of the last plane (which
// holds the whole tail, as tail < vec <= S). A thread's start, below 2^31 (the grid is capped so), needs
// only 32-bit division (PlaneCursor::start).
struct PlanesStep {
  int64_t elems = 0;      // elements a thread advances per iteration: grid threads * vec
  int64_t q = 0;          // (elems / S) % M: channel indices advanced
  int64_t r = 0;          // elems % S: offset advanced within a plane
  int64_t tail_chan = 0;  // (numel / S - 1) % M: the channel of the numel % vec tail elements
};

// The position of a planes walk: q, the channel index of the plane holding element i; r, i's offset in it.
struct PlaneCursor {
  int64_t q = 0, r = 0;
  // At element i < 2^31: when S > i the plane is 0; otherwise S <= i and the plane index are below 2^31.
  FASTNETS_HOST_DEVICE void start(int64_t i, int64_t S, int64_t M) {
    const int64_t p = S > i ? 0 : int64_t(static_cast<uint32_t>(i) / static_cast<uint32_t>(S));
    r = i - p * S;
    q = p < M ? p : int64_t(static_cast<uint32_t>(p) % static_cast<uint32_t>(M));
  }
  // Of the vec elements from here, those before cut() are in plane q, the others in the next, of channel next().
  FASTNETS_HOST_DEVICE int cut(int64_t S, int vec) const { return S - r < vec ? static_cast<int>(S - r) : vec; }
  FASTNETS_HOST_DEVICE int64_t next(int64_t M) const { return q + 1 == M ? 0 : q + 1; }
  // Advance by step.elems elements: r < S and q < M stay true with one carry and one wrap.
  FASTNETS_HOST_DEVICE void advance(const PlanesStep& step, int64_t S, int64_t M) {
    r += step.r;
    q += step.q;
    if (r >= S) {
      r -= S;
      q += 1;
    }
    if (q >= M) q -= M;
  }
};

struct PlanesElementwise {
  int vec = 1;
  PlanesStep step;
  Launch launch;
};

inline PlanesElementwise planes_elementwise(int64_t numel, int64_t S, int64_t M, int vec, const Device& d) {
  PlanesElementwise p;
  p.vec = vec;
  const int64_t nvec = numel / vec;
  // About four waves, and every thread's first vector below 2^31 (PlaneCursor::start).
  const int64_t max_blocks = std::min(target_blocks(d, kElementwiseThreads) * 4,
                                      kInt32Max / (int64_t(kElementwiseThreads) * vec));
  Launch& l = p.launch;
  l.kernel = "planes_elementwise_kernel";
  l.grid[0] = std::max<int64_t>(1, std::min(ceil_div(std::max(nvec, numel - nvec * vec), kElementwiseThreads),
                                            max_blocks));
  l.block[0] = kElementwiseThreads;
  l.bound = kElementwiseThreads;
  p.step.elems = l.grid[0] * kElementwiseThreads * vec;
  if (S > 0 && M > 0) {  // (an empty tensor launches nothing)
    p.step.q = (p.step.elems / S) % M;
    p.step.r = p.step.elems % S;
    p.step.tail_chan = numel >= S ? (numel / S - 1) % M : 0;
  }
  return p;
}

// ---------------------------------------------------------------------------------------------------
// BatchNorm (csrc/batch_norm.cu). x is (N, C, S) in memory (NCHW) or (N, S, C) (channels_last).

// The element-wise ops of BatchNorm (apply, backward_apply) and squeeze-excite (se_apply): channels_last (and
// S == 1, the same memory) by rows, NCHW by planes.
struct SplitElementwise {
  bool rows = false;
  RowsElementwise by_rows;
  PlanesElementwise by_planes;
  const Launch& launch() const { return rows ? by_rows.launch : by_planes.launch; }
  int vec() const { return rows ? by_rows.vec : by_planes.vec; }
};

// `groups` groups of `group_rows` rows of C channels when by rows, planes of S with channel index p % (groups * C)
// when by planes; vec_ok: every tensor pointer the op reads or writes is 16-byte aligned.
inline SplitElementwise split_elementwise(int64_t groups, int64_t group_rows, int64_t N, int64_t C, int64_t S,
                                          bool channels_last, bool vec_ok, int elem_bytes, const Device& d) {
  const int VEC = vec_of(elem_bytes);
  SplitElementwise p;
  p.rows = channels_last || S == 1;
  if (p.rows) {
    p.by_rows = rows_elementwise(groups, group_rows, C, (vec_ok && C % VEC == 0) ? VEC : 1, d);
  } else {
    p.by_planes = planes_elementwise(N * C * S, S, groups * C, (vec_ok && S >= VEC) ? VEC : 1, d);
  }
  return p;
}

// BatchNorm's apply / backward_apply: one group of every row (the per-channel data is the same for all).
using BnElementwise = SplitElementwise;
inline BnElementwise bn_elementwise(int64_t N, int64_t C, int64_t S, bool channels_last, bool vec_ok, int elem_bytes,
                                    const Device& d) {
  return split_elementwise(1, N * S, N, C, S, channels_last, vec_ok, elem_bytes, d);
}

// stats / backward_reduce: a tiled stage 1 writing [fields, splits, C] partial states, then a finalize
// kernel merging the splits of each channel. Three stage-1 paths (see the kernels in batch_norm.cu):
//   rows  (channels_last, or S == 1): reduce_cl_kernel, block (bx, by), bx * by = 256, grid (gx, splits)
//   tile  (NCHW, 1 < S <= 1024): reduce_nchw_tile_kernel, cb channels per block, grid (ceil(C / cb), splits)
//   plane (NCHW, S > 1024): reduce_nchw_plane_kernel, one channel per block column, grid (C, splits)
struct BnReduce {
  enum Path { kRows = 0, kTile = 1, kPlane = 2 };
  Path path = kRows;
  int vec = 1;
  int64_t splits = 1;
  int cb = 0;                            // tile: channels per block
  int64_t nchunks = 1, chunk_len = 0;    // plane: each of the N planes of a channel cut into nchunks chunks
  Launch main, finalize;
};

// state_bytes: sizeof the reduction's per-thread state (Welford: 3 acc_t, sums: 2 acc_t).
inline BnReduce bn_reduce(int64_t N, int64_t C, int64_t S, bool channels_last, bool vec_ok, int elem_bytes,
                          int state_bytes, const Device& d) {
  const int VEC = vec_of(elem_bytes);
  BnReduce p;
  Launch& l = p.main;
  if (channels_last || S == 1) {
    p.path = BnReduce::kRows;
    const int64_t rows = N * S;
    p.vec = (vec_ok && C % VEC == 0) ? VEC : 1;
    const int64_t cols = ceil_div(C, p.vec);
    const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cols)));
    const int by = kBnReduceThreads / bx;
    const int64_t gx = ceil_div(cols, bx);
    // Enough splits of the rows to fill the GPU; the unit of work is `by` rows (one per thread row).
    p.splits = balanced_splits(ceil_div(rows, by), ceil_div(target_blocks(d, kBnReduceThreads), gx));
    l.kernel = "bn::reduce_cl_kernel";
    l.grid[0] = gx;
    l.grid[1] = p.splits;
    l.block[0] = bx;
    l.block[1] = by;
    l.smem = int64_t(state_bytes) * kBnReduceThreads;
    l.bound = kBnReduceThreads;
  } else if (S <= kBnTileMax) {
    p.path = BnReduce::kTile;
    p.cb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(C, kBnTileMax / S)));
    const int threads = static_cast<int>(ceil_div(int64_t(p.cb) * S, kWarp) * kWarp);
    const int64_t gx = ceil_div(C, p.cb);
    p.splits = balanced_splits(N, ceil_div(target_blocks(d, threads), gx));
    l.kernel = "bn::reduce_nchw_tile_kernel";
    l.grid[0] = gx;
    l.grid[1] = p.splits;
    l.block[0] = threads;
    l.smem = int64_t(state_bytes) * threads;
    l.bound = kBnTileMax;
  } else {
    p.path = BnReduce::kPlane;
    p.vec = (vec_ok && S % VEC == 0) ? VEC : 1;
    constexpr int threads = kBnPlaneWarps * kWarp;
    const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(ceil_div(target_blocks(d, threads), C), kGridYZMax));
    // Cut planes into chunks only when the N planes alone leave warps idle, and never below 4 loads per
    // lane (a chunk of at least 4 * 32 * vec elements).
    const int64_t max_chunks = std::max<int64_t>(1, S / (4 * kWarp * p.vec));
    p.nchunks = std::min(max_chunks, std::max<int64_t>(1, ceil_div(wanted * kBnPlaneWarps, N)));
    p.chunk_len = ceil_div(ceil_div(S, p.nchunks), p.vec) * p.vec;
    p.nchunks = ceil_div(S, p.chunk_len);
    p.splits = balanced_splits(ceil_div(N * p.nchunks, kBnPlaneWarps), wanted);
    l.kernel = "bn::reduce_nchw_plane_kernel";
    l.grid[0] = C;
    l.grid[1] = p.splits;
    l.block[0] = threads;
    l.bound = threads;
  }
  Launch& f = p.finalize;
  f.kernel = "bn::reduce_finalize_kernel";
  f.grid[0] = ceil_div(C, kBnFinalizeWarps);
  f.block[0] = kBnFinalizeWarps * kWarp;
  f.bound = kBnFinalizeWarps * kWarp;
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Squeeze-excite (csrc/squeeze_excite.cu). x is 4-D, (N, C, S) or (N, S, C) in memory.

// se_reduce: sums over space of x (pool) or g * x (backward) per (n, split, c), `splits` splits of S.
//   NCHW: reduce_nchw_kernel, one warp per (plane, split) item, lanes striding the plane with vec-element
//         loads (vec > 1 needs S % vec == 0 and aligned pointers; s_per_split is then a multiple of vec);
//         grid (min(ceil(items / 8), 2^31 - 1)), grid-stride over the items.
//   channels_last: reduce_cl_kernel, thread (tx, ty) owns vec channels, the by thread rows stride the
//         split's rows, then a tree over ty in shared memory; grid (channel blocks, min(N * splits, 65535)),
//         blockIdx.y strides over the (n, split) items.
struct SeReduce {
  bool channels_last = false;
  int vec = 1;
  int64_t s_per_split = 1;
  Launch launch;
};

inline SeReduce se_reduce(int64_t N, int64_t C, int64_t S, int64_t splits, bool channels_last, bool vec_ok,
                          int elem_bytes, const Device& d) {
  (void)d;
  const int VEC = vec_of(elem_bytes);
  const int acc_bytes = elem_bytes == 8 ? 8 : 4;
  SeReduce p;
  p.channels_last = channels_last;
  Launch& l = p.launch;
  if (!channels_last) {
    p.vec = (vec_ok && S % VEC == 0) ? VEC : 1;
    p.s_per_split = ceil_div(ceil_div(S, splits), p.vec) * p.vec;
    const int64_t items = N * C * splits;
    l.kernel = "se::reduce_nchw_kernel";
    l.grid[0] = std::max<int64_t>(1, std::min(ceil_div(items, kSeReduceThreads / kWarp), kGridXMax));
    l.block[0] = kSeReduceThreads;
    l.bound = kSeReduceThreads;
  } else {
    p.vec = (vec_ok && C % VEC == 0) ? VEC : 1;
    p.s_per_split = ceil_div(S, splits);
    const int64_t cols = ceil_div(C, p.vec);
    const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cols)));
    l.kernel = "se::reduce_cl_kernel";
    l.grid[0] = ceil_div(cols, bx);
    l.grid[1] = std::max<int64_t>(1, std::min(N * splits, kGridYZMax));
    l.block[0] = bx;
    l.block[1] = kSeReduceThreads / bx;
    l.smem = int64_t(kSeReduceThreads) * p.vec * acc_bytes;
    l.bound = kSeReduceThreads;
  }
  return p;
}

// se_excite: `bn` samples per block (the most that still leaves about one block per two SMs), one warp per
// output unit; grid (min(ceil(N / bn), 2^31 - 1)), grid-stride over the sample groups.
struct SeExcite {
  int samples = 1;
  Launch launch;
};

inline SeExcite se_excite(int64_t N, const Device& d) {
  SeExcite p;
  int bn = kSeExciteMaxSamples;
  while (bn > 1 && ceil_div(N, bn) * 2 < d.sms) bn /= 2;
  p.samples = bn;
  Launch& l = p.launch;
  l.kernel = "se::excite_kernel";
  l.grid[0] = std::max<int64_t>(1, std::min(ceil_div(N, bn), kGridXMax));
  l.block[0] = kSeExciteThreads;
  l.bound = kSeExciteThreads;
  return p;
}

// se_apply (scale and its backward): a group is a sample, so the gate is loaded once per work item by rows;
// by planes the gate index is the plane.
using SeApply = SplitElementwise;
inline SeApply se_apply(int64_t N, int64_t C, int64_t S, bool channels_last, bool vec_ok, int elem_bytes,
                        const Device& d) {
  return split_elementwise(N, S, N, C, S, channels_last, vec_ok, elem_bytes, d);
}

// ---------------------------------------------------------------------------------------------------
// The plans as text, for fastnets_cuda::launch_plan and the test driver: one line per launch,
//   <kernel> grid=<x>,<y>,<z> block=<x>,<y>,<z> smem=<bytes> bound=<threads> vec=<n> [key=value ...]
// `args` per kind (booleans as 0/1; elem_bytes = the activation dtype's size; sms, tpsm = the Device):
//   bn_elementwise  N C S channels_last vec_ok elem_bytes sms tpsm
//   bn_reduce       N C S channels_last vec_ok elem_bytes state_fields sms tpsm
//   se_reduce       N C S splits channels_last vec_ok elem_bytes sms tpsm
//   se_excite       N sms
//   se_apply        N C S channels_last vec_ok elem_bytes sms tpsm

inline void describe_launch(std::ostringstream& s, const Launch& l, int vec) {
  s << l.kernel << " grid=" << l.grid[0] << "," << l.grid[1] << "," << l.grid[2] << " block=" << l.block[0] << ","
    << l.block[1] << "," << l.block[2] << " smem=" << l.smem << " bound=" << l.bound << " vec=" << vec;
}

inline void describe_split(std::ostringstream& s, const SplitElementwise& p) {
  describe_launch(s, p.launch(), p.vec());
  if (p.rows) {
    s << " chunks=" << p.by_rows.chunks << " chunk_len=" << p.by_rows.chunk_len;
  } else {
    const PlanesStep& st = p.by_planes.step;
    s << " step=" << st.elems << " step_q=" << st.q << " step_r=" << st.r << " tail_chan=" << st.tail_chan;
  }
  s << "\n";
}

inline std::string describe(const std::string& kind, const std::vector<int64_t>& a) {
  auto need = [&](size_t n) {
    if (a.size() != n) {
      throw std::invalid_argument("launch_plan: " + kind + " takes " + std::to_string(n) + " arguments, got " +
                                  std::to_string(a.size()));
    }
  };
  auto elem = [&](int64_t b) {
    if (b != 2 && b != 4 && b != 8) throw std::invalid_argument("launch_plan: elem_bytes must be 2, 4 or 8");
    return static_cast<int>(b);
  };
  std::ostringstream s;
  if (kind == "bn_elementwise") {
    need(8);
    const BnElementwise p = bn_elementwise(a[0], a[1], a[2], a[3] != 0, a[4] != 0, elem(a[5]), Device{a[6], a[7]});
    describe_split(s, p);
  } else if (kind == "bn_reduce") {
    need(9);
    const int eb = elem(a[5]);
    if (a[6] != 2 && a[6] != 3) throw std::invalid_argument("launch_plan: state_fields must be 2 or 3");
    const int state_bytes = static_cast<int>(a[6]) * (eb == 8 ? 8 : 4);
    const BnReduce p = bn_reduce(a[0], a[1], a[2], a[3] != 0, a[4] != 0, eb, state_bytes, Device{a[7], a[8]});
    describe_launch(s, p.main, p.vec);
    s << " splits=" << p.splits << "\n";
    describe_launch(s, p.finalize, 1);
    s << "\n";
  } else if (kind == "se_reduce") {
    need(9);
    const SeReduce p = se_reduce(a[0], a[1], a[2], a[3], a[4] != 0, a[5] != 0, elem(a[6]), Device{a[7], a[8]});
    describe_launch(s, p.launch, p.vec);
    s << " s_per_split=" << p.s_per_split << "\n";
  } else if (kind == "se_excite") {
    need(2);
    const SeExcite p = se_excite(a[0], Device{a[1], 2048});
    describe_launch(s, p.launch, 1);
    s << " samples=" << p.samples << "\n";
  } else if (kind == "se_apply") {
    need(8);
    const SeApply p = se_apply(a[0], a[1], a[2], a[3] != 0, a[4] != 0, elem(a[5]), Device{a[6], a[7]});
    describe_split(s, p);
  } else {
    throw std::invalid_argument("launch_plan: unknown kind '" + kind +
                                "' (bn_elementwise, bn_reduce, se_reduce, se_excite, se_apply)");
  }
  return s.str();
}

}  // namespace plan
}  // namespace fastnets
