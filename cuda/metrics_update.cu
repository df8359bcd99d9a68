// CUDA update for classification metrics: one launch per update (two for the binary/multilabel
// 'auto' logits rule), no host synchronisation, accumulation in place into the float64 state.
// Design notes and measured versions: bench/GPU_NOTES.md.
//
// Binary / multilabel: one lane per element, counters privatised in shared memory when they fit
// and flushed with one global atomic per non-zero counter per block. Multiclass: see the
// section below.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cmath>
#include <mutex>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "metrics/row_math.h"
#include "metrics/update.h"

namespace stepscope::metrics {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

enum TargetKind : int { kI64 = 0, kI32 = 1, kU8 = 2 };

struct Params {
  const void* preds;
  const void* target;
  double* state;
  int64_t n, c, d;             // canonical [N, C, D] (multilabel/binary: C = L)
  int64_t sN, sC, sD;          // preds strides
  int64_t tN, tC, tD;          // target strides (multiclass: tC unused)
  int target_kind;
  bool has_ignore;
  int64_t ignore_index;
  int input_kind;              // InputKind
  const int* range_flags;      // binary/multilabel auto rule: per-block "saw a value outside [0, 1]"
  int num_range_flags;
  float threshold;
  int num_topk;
  int64_t topk[kMaxTopK];
  Layout lay;
  bool smem_dense;             // binary/multilabel: O(C) counters privatised in shared memory
  bool smem_confmat;           // (unused by them: no confusion matrix)
  // multiclass
  int group;                   // tile kernel: lanes per row
  int64_t mc_tile_rows;        // tile kernel: rows per tile
  bool mc_cm_smem;             // the C x C counters live in shared memory (implies tp/pred/target)
  bool mc_cls_smem;            // tp/pred/target counters live in shared memory
  int mc_counter_bytes;        // dynamic shared memory taken by those counters (16-byte multiple)
};

__device__ __forceinline__ int64_t load_target(const void* t, int64_t off, int kind) {
  switch (kind) {
    case kI64:
      return static_cast<const int64_t*>(t)[off];
    case kI32:
      return static_cast<const int32_t*>(t)[off];
    default:
      return static_cast<const uint8_t*>(t)[off];
  }
}

// Shared-memory image: uint32 counters mirroring state[0, dense), then (optionally) C*C
// confusion counters, then float sums of confidence per ECE slot.
struct Smem {
  uint32_t* cnt;
  uint32_t* cm;
  float* conf;
};

__device__ __forceinline__ Smem smem_view(const Params& p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem s;
  s.cnt = reinterpret_cast<uint32_t*>(smem_raw);
  const int64_t dense = p.smem_dense ? p.lay.dense : 0;
  s.cm = s.cnt + dense;
  s.conf = reinterpret_cast<float*>(s.cm + (p.smem_confmat ? p.lay.classes * p.lay.classes : 0));
  return s;
}

__device__ __forceinline__ void count(const Params& p, const Smem& s, int64_t idx, uint32_t v) {
  if (v == 0) return;
  if (p.smem_dense) {
    atomicAdd(&s.cnt[idx], v);
  } else {
    atomicAdd(&p.state[idx], static_cast<double>(v));
  }
}


__device__ __forceinline__ void add_conf(const Params& p, const Smem& s, int bin, float conf) {
  if (p.smem_dense) {
    atomicAdd(&s.conf[bin], conf);
  } else {
    atomicAdd(&p.state[p.lay.ece_conf + bin], static_cast<double>(conf));
  }
}

__device__ void smem_init(const Params& p, const Smem& s) {
  const int64_t n_cnt = (p.smem_dense ? p.lay.dense : 0) + (p.smem_confmat ? p.lay.classes * p.lay.classes : 0);
  for (int64_t i = threadIdx.x; i < n_cnt; i += blockDim.x) s.cnt[i] = 0;
  if (p.smem_dense && threadIdx.x < kEceSlots) s.conf[threadIdx.x] = 0.0f;
  __syncthreads();
}

__device__ void smem_flush(const Params& p, const Smem& s, double loss) {
  // Loss: warp sum in float64, one global atomic per warp.
  for (int off = 16; off > 0; off >>= 1) loss += __shfl_xor_sync(kFullMask, loss, off);
  if ((threadIdx.x & 31) == 0 && loss != 0.0) atomicAdd(&p.state[p.lay.loss], loss);
  __syncthreads();
  if (p.smem_dense) {
    for (int64_t i = threadIdx.x; i < p.lay.dense; i += blockDim.x) {
      if (s.cnt[i] != 0) atomicAdd(&p.state[i], static_cast<double>(s.cnt[i]));
    }
    if (threadIdx.x < kEceSlots && s.conf[threadIdx.x] != 0.0f) {
      atomicAdd(&p.state[p.lay.ece_conf + threadIdx.x], static_cast<double>(s.conf[threadIdx.x]));
    }
  }
  if (p.smem_confmat) {
    const int64_t cc = p.lay.classes * p.lay.classes;
    for (int64_t i = threadIdx.x; i < cc; i += blockDim.x) {
      if (s.cm[i] != 0) atomicAdd(&p.state[p.lay.confmat + i], static_cast<double>(s.cm[i]));
    }
  }
}

// ================================================================ multiclass
//
// One row = one sample's C scores. Each lane keeps a running state over its share of a row
// (max, its first index, sum of exp(x - max), target rank, a poison sum that turns NaN on a
// non-finite value, min for the 'auto' rule) and lanes merge states by shuffles: one read of the
// logits. Values are pushed in chunks of K already in registers, so the loads of a chunk are all
// in flight before the first use. Three kernels share this:
//   tile     contiguous rows (the [rows, C] block is one array; channels-last segmentation
//            too), C up to a few thousand: the block streams tiles of whole rows through
//            shared memory with 16-byte loads, prefetching the next tile into registers while
//            it reduces the current one; G lanes per row, G chosen from C.
//   row      long rows with unit class stride (C >= 256 that does not tile): one block per row,
//            16-byte loads where the row start is aligned, U of them in flight per lane.
//   strided  anything else (segmentation [N, C, d...] with classes strided, transposed preds):
//            one lane per row, so that neighbouring lanes read neighbouring rows, K loads in flight.
// Per-row counters: per-class ones in shared memory (the C x C matrix itself when small, which
// then gives tp, predicted and target counts at the flush), fixed-address ones in registers,
// flushed once per block.

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kTileBytes = 16 * 1024;     // one tile of whole rows in shared memory
constexpr int kTileVecsPerThread = kTileBytes / 16 / kThreads;
constexpr int kTileRowsMax = 1024;        // targets of one tile: kTileRowsMax / kThreads per lane
constexpr int kTileTargetsPerThread = kTileRowsMax / kThreads;
constexpr int kStridedChunk = 8;
constexpr int kRowUnroll = 4;

// Where the multiclass kernels count: derived from Params on the host.
enum ReadMode : int { kReadLogits = 0, kReadProbs = 1, kReadAuto = 2 };

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct Lane {
  float m;         // running max
  float s;         // sum of exp(x - m)
  int32_t arg;     // first index of m
  int32_t above;   // classes ranked above the target
  float poison;    // sum of x * 0: NaN iff some value was not finite
  float mn;        // running min ('auto' rule)
};

__device__ __forceinline__ Lane lane_identity() {
  return Lane{-INFINITY, 0.0f, INT_MAX, 0, 0.0f, INFINITY};
}

// Pushes K values x[k] at class indices j0 + k * dj (ascending).
template <int K, bool kSumExp>
__device__ __forceinline__ void lane_push(Lane& a, const float (&x)[K], int32_t j0, int32_t dj, float xt, int32_t t) {
  float cm = x[0];
  int32_t ca = j0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int32_t j = j0 + k * dj;
    a.poison = fmaf(x[k], 0.0f, a.poison);
    a.mn = fminf(a.mn, x[k]);
    a.above += (x[k] > xt) | ((x[k] == xt) & (j < t));
    if (k > 0 && x[k] > cm) {
      cm = x[k];
      ca = j;
    }
  }
  if (cm > a.m) {  // strictly: the lower index keeps a tie
    if (kSumExp) a.s *= fast_exp2((a.m - cm) * kLog2e);
    a.m = cm;
    a.arg = ca;
  }
  if (kSumExp) {
    const float ml = a.m * kLog2e;
    float e = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) e += fast_exp2(fmaf(x[k], kLog2e, -ml));
    a.s += e;
  }
}

template <bool kSumExp>
__device__ __forceinline__ Lane lane_merge(const Lane& a, const Lane& b) {
  Lane r;
  r.poison = a.poison + b.poison;
  r.above = a.above + b.above;
  r.mn = fminf(a.mn, b.mn);
  const bool tb = b.m > a.m || (b.m == a.m && b.arg < a.arg);
  r.m = tb ? b.m : a.m;
  r.arg = tb ? b.arg : a.arg;
  if (kSumExp) {
    // An empty side has s = 0 and m = -inf: skip it rather than form exp(-inf - -inf).
    const float ea = a.s > 0.0f ? a.s * fast_exp2((a.m - r.m) * kLog2e) : 0.0f;
    const float eb = b.s > 0.0f ? b.s * fast_exp2((b.m - r.m) * kLog2e) : 0.0f;
    r.s = ea + eb;
  } else {
    r.s = 0.0f;
  }
  return r;
}

template <bool kSumExp>
__device__ __forceinline__ Lane shfl_merge(Lane st, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    Lane o;
    o.m = __shfl_xor_sync(kFullMask, st.m, off, width);
    o.s = __shfl_xor_sync(kFullMask, st.s, off, width);
    o.arg = __shfl_xor_sync(kFullMask, st.arg, off, width);
    o.above = __shfl_xor_sync(kFullMask, st.above, off, width);
    o.poison = __shfl_xor_sync(kFullMask, st.poison, off, width);
    o.mn = __shfl_xor_sync(kFullMask, st.mn, off, width);
    st = lane_merge<kSumExp>(st, o);
  }
  return st;
}

// Shared-memory counters of the multiclass kernels. ECE slots for two readings (0: the mode's,
// or logits under 'auto'; 1: probabilities under 'auto'); per-class counters in `cls` (tp,
// predicted, target: 3C) unless the C x C matrix `cm` is kept here, which implies them.
struct McSmem {
  uint32_t ece_n[2][kEceSlots];
  uint32_t ece_hit[2][kEceSlots];
  float ece_conf[2][kEceSlots];
  uint32_t topk[kMaxTopK];
  int last_block;
  int outside;
};

struct McCounts {
  uint32_t valid = 0, ignored = 0, invalid = 0, nonfinite = 0;
  double loss[2] = {0.0, 0.0};
  bool outside = false;  // 'auto': this lane saw a value outside [0, 1] (NaN included)
};

struct McView {
  uint32_t* cls;  // [3C] or nullptr
  uint32_t* cm;   // [C*C] or nullptr
};

__device__ __forceinline__ McView mc_view(const Params& p, unsigned char* dyn) {
  McView v;
  v.cm = p.mc_cm_smem ? reinterpret_cast<uint32_t*>(dyn) : nullptr;
  v.cls = p.mc_cls_smem ? reinterpret_cast<uint32_t*>(dyn) : nullptr;
  return v;
}

__device__ void mc_init(const Params& p, McSmem& sm, const McView& v) {
  for (int i = threadIdx.x; i < 2 * kEceSlots; i += blockDim.x) {
    (&sm.ece_n[0][0])[i] = 0;
    (&sm.ece_hit[0][0])[i] = 0;
    (&sm.ece_conf[0][0])[i] = 0.0f;
  }
  const int64_t n = v.cm ? p.c * p.c : (v.cls ? 3 * p.c : 0);
  uint32_t* base = v.cm ? v.cm : v.cls;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) base[i] = 0;
  if (threadIdx.x < kMaxTopK) sm.topk[threadIdx.x] = 0;
  if (threadIdx.x == 0) sm.outside = 0;
  __syncthreads();
}

__device__ __forceinline__ void add_reading(McSmem& sm, McCounts& c, int r, double loss, float conf, bool hit) {
  const int bin = ece_bin(conf);
  c.loss[r] += loss;
  atomicAdd(&sm.ece_n[r][bin], 1u);
  atomicAdd(&sm.ece_conf[r][bin], conf);
  if (hit) atomicAdd(&sm.ece_hit[r][bin], 1u);
}

// One finished row (t valid). `skip_probs`: the 'auto' batch is known to be logits.
template <int kMode>
__device__ __forceinline__ void count_row(const Params& p, McSmem& sm, const McView& v, McCounts& c, const Lane& st,
                                          int64_t t, float xt, bool skip_probs) {
  if (!(st.poison == 0.0f)) {
    ++c.nonfinite;
    c.outside = true;
    return;
  }
  if (kMode == kReadAuto) c.outside = c.outside || st.mn < 0.0f || st.m > 1.0f;
  const int64_t pred = st.arg;
  const bool hit = pred == t;
  ++c.valid;
  // Top-k hits: one shared atomic per converged group of lanes (registers are short here).
  const unsigned converged = __activemask();
  const bool leader = (threadIdx.x & 31) == __ffs(converged) - 1;
  for (int i = 0; i < p.num_topk; ++i) {
    const unsigned hits = __ballot_sync(converged, st.above < p.topk[i]);
    if (leader && hits) atomicAdd(&sm.topk[i], static_cast<uint32_t>(__popc(hits)));
  }
  if (v.cm) {
    atomicAdd(&v.cm[t * p.c + pred], 1u);
  } else {
    if (v.cls) {
      if (hit) atomicAdd(&v.cls[t], 1u);
      atomicAdd(&v.cls[p.c + pred], 1u);
      atomicAdd(&v.cls[2 * p.c + t], 1u);
    } else {
      if (hit) atomicAdd(&p.state[p.lay.tp + t], 1.0);
      atomicAdd(&p.state[p.lay.pred + pred], 1.0);
      atomicAdd(&p.state[p.lay.target + t], 1.0);
    }
    if (p.lay.confmat >= 0) atomicAdd(&p.state[p.lay.confmat + t * p.c + pred], 1.0);
  }
  if (kMode != kReadProbs) {
    add_reading(sm, c, 0, static_cast<double>(logf(st.s)) + static_cast<double>(st.m) - static_cast<double>(xt),
                1.0f / st.s, hit);
  }
  if (kMode == kReadProbs) {
    add_reading(sm, c, 0, -static_cast<double>(logf(xt)), st.m, hit);
  } else if (kMode == kReadAuto && !skip_probs && !c.outside) {
    add_reading(sm, c, 1, -static_cast<double>(logf(xt)), st.m, hit);
  }
}

// A skipped row (ignored or invalid target): counted only. The 'auto' rule looks at the rows that
// count, as torchmetrics' calibration does (it drops ignored rows before its range check).
__device__ __forceinline__ void count_skipped(McCounts& c, bool ignored) {
  if (ignored) {
    ++c.ignored;
  } else {
    ++c.invalid;
  }
}

__device__ __forceinline__ uint32_t warp_sum(uint32_t x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ void add_if(double* dst, double v) {
  if (v != 0.0) atomicAdd(dst, v);
}

// End of a block: counters to the state. Under 'auto' a block that saw a value outside [0, 1]
// knows the batch is logits and adds that reading to the state; the others park both readings
// in the pending scratch, and the last block to finish folds the right one in and clears it.
template <int kMode>
__device__ void mc_flush(const Params& p, McSmem& sm, const McView& v, McCounts& c) {
  const Layout& lay = p.lay;
  const bool block_outside = kMode == kReadAuto && __syncthreads_or(c.outside);
  if (kMode != kReadAuto) __syncthreads();
  const bool lane0 = (threadIdx.x & 31) == 0;
  {
    const uint32_t a = warp_sum(c.valid), b = warp_sum(c.ignored), d = warp_sum(c.invalid), e = warp_sum(c.nonfinite);
    if (lane0) {
      add_if(&p.state[lay.valid], a);
      add_if(&p.state[lay.ignored], b);
      add_if(&p.state[lay.invalid], d);
      add_if(&p.state[lay.nonfinite], e);
    }
    if (threadIdx.x < p.num_topk) add_if(&p.state[lay.topk + threadIdx.x], sm.topk[threadIdx.x]);
  }
  double* dst[2] = {p.state + lay.loss, nullptr};
  if (kMode == kReadAuto && !block_outside) {
    dst[0] = p.state + lay.pending;
    dst[1] = p.state + lay.pending + kReadingLen;
  }
  const int readings = kMode == kReadAuto && !block_outside ? 2 : 1;
  for (int r = 0; r < readings; ++r) {
    const double l = warp_sum(c.loss[r]);
    if (lane0) add_if(dst[r], l);
    for (int i = threadIdx.x; i < kEceSlots; i += blockDim.x) {
      add_if(dst[r] + 1 + i, sm.ece_n[r][i]);
      add_if(dst[r] + 1 + kEceSlots + i, sm.ece_conf[r][i]);
      add_if(dst[r] + 1 + 2 * kEceSlots + i, sm.ece_hit[r][i]);
    }
  }
  const int64_t C = p.c;
  if (v.cm) {
    for (int64_t i = threadIdx.x; i < C * C; i += blockDim.x) {
      if (lay.confmat >= 0) add_if(&p.state[lay.confmat + i], v.cm[i]);
    }
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
      uint32_t row = 0, col = 0;
      for (int64_t j = 0; j < C; ++j) {
        row += v.cm[k * C + j];
        col += v.cm[j * C + k];
      }
      add_if(&p.state[lay.tp + k], v.cm[k * C + k]);
      add_if(&p.state[lay.target + k], row);
      add_if(&p.state[lay.pred + k], col);
    }
  } else if (v.cls) {
    for (int64_t i = threadIdx.x; i < 3 * C; i += blockDim.x) add_if(&p.state[lay.tp + i], v.cls[i]);
  }
  if (kMode != kReadAuto) return;
  auto* flag = reinterpret_cast<unsigned long long*>(p.state + lay.pending + 2 * kReadingLen);
  auto* done = reinterpret_cast<unsigned long long*>(p.state + lay.pending + 2 * kReadingLen + 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (block_outside) atomicOr(flag, 1ull);
    __threadfence();
    sm.last_block = atomicAdd(done, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!sm.last_block) return;
  __threadfence();
  const bool logits = atomicAdd(flag, 0ull) != 0;
  double* pend = p.state + lay.pending;
  for (int i = threadIdx.x; i < kReadingLen; i += blockDim.x) {
    const double x = atomicAdd(pend + (logits ? 0 : kReadingLen) + i, 0.0);
    add_if(&p.state[lay.loss + i], x);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kPendingLen; i += blockDim.x) pend[i] = 0.0;
}

__device__ __forceinline__ int64_t target_code(const Params& p, int64_t t) {
  // >= 0: a valid class; -1: ignored; -2: out of range.
  if (p.has_ignore && t == p.ignore_index) return -1;
  return t >= 0 && t < p.c ? t : -2;
}

template <typename scalar_t>
__device__ __forceinline__ float to_f(scalar_t x) {
  return static_cast<float>(x);
}

// ---------------------------------------------------------------- tile kernel
template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kThreads, 3) mc_tile_kernel(const Params p) {
  constexpr bool kSumExp = kMode != kReadProbs;
  constexpr int kVec = 16 / sizeof(scalar_t);
  __shared__ McSmem sm;
  extern __shared__ __align__(16) unsigned char dyn[];
  const McView v = mc_view(p, dyn);
  mc_init(p, sm, v);
  uint4* tile = reinterpret_cast<uint4*>(dyn + p.mc_counter_bytes);
  int32_t* codes = reinterpret_cast<int32_t*>(dyn + p.mc_counter_bytes + kTileBytes);

  const int64_t C = p.c, rows = p.n * p.d, E = rows * C;
  const int64_t R = p.mc_tile_rows;
  const int64_t ntiles = (rows + R - 1) / R;
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  const uint4* P4 = static_cast<const uint4*>(p.preds);
  const int G = p.group;
  const int gi = threadIdx.x / G, li = threadIdx.x % G;
  const int rows_per_pass = kThreads / G;

  uint4 buf[kTileVecsPerThread];
  int64_t tg[kTileTargetsPerThread];
  auto load = [&](int64_t tl) {
    const int64_t r0 = tl * R, r1 = min(r0 + R, rows);
    const int64_t va = r0 * C / kVec, vb = (r1 * C + kVec - 1) / kVec;
#pragma unroll
    for (int u = 0; u < kTileVecsPerThread; ++u) {
      const int64_t vi = va + threadIdx.x + u * kThreads;
      if (vi < vb) {
        if ((vi + 1) * kVec <= E) {
          buf[u] = __ldcs(P4 + vi);
        } else {  // the array's last, partial vector
          scalar_t part[kVec];
          for (int e = 0; e < kVec; ++e) part[e] = vi * kVec + e < E ? P[vi * kVec + e] : scalar_t(0);
          memcpy(&buf[u], part, 16);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kTileTargetsPerThread; ++k) {
      const int64_t r = r0 + threadIdx.x + k * kThreads;
      if (r < r1) {
        const int64_t n = r / p.d, d = r - n * p.d;
        tg[k] = load_target(p.target, n * p.tN + d * p.tD, p.target_kind);
      }
    }
  };
  auto store = [&](int64_t tl) {
    const int64_t r0 = tl * R, r1 = min(r0 + R, rows);
    const int64_t va = r0 * C / kVec, vb = (r1 * C + kVec - 1) / kVec;
#pragma unroll
    for (int u = 0; u < kTileVecsPerThread; ++u) {
      const int64_t vi = va + threadIdx.x + u * kThreads;
      if (vi < vb) tile[vi - va] = buf[u];
    }
#pragma unroll
    for (int k = 0; k < kTileTargetsPerThread; ++k) {
      const int64_t r = threadIdx.x + k * kThreads;
      if (r0 + r < r1) codes[r] = static_cast<int32_t>(target_code(p, tg[k]));
    }
  };

  McCounts c;
  bool seen = false;  // 'auto': the block saw a value outside [0, 1]
  int64_t tl = blockIdx.x;
  if (tl < ntiles) load(tl);
  for (; tl < ntiles; tl += gridDim.x) {
    store(tl);
    __syncthreads();
    if (tl + gridDim.x < ntiles) load(tl + gridDim.x);
    const int64_t r0 = tl * R, nr = min(r0 + R, rows) - r0;
    const scalar_t* first = reinterpret_cast<const scalar_t*>(tile) + (r0 * C - (r0 * C / kVec) * kVec);
    for (int64_t base = 0; base < nr; base += rows_per_pass) {
      const int64_t rl = base + gi;
      const bool active = rl < nr;
      const int32_t code = active ? codes[rl] : -3;
      const bool scan = code >= 0;
      const scalar_t* row = first + rl * C;
      const float xt = code >= 0 ? to_f(row[code]) : 0.0f;
      Lane st = lane_identity();
      if (scan) {
        constexpr int K = 4;
        int32_t j = li;
        for (; j + (K - 1) * G < C; j += K * G) {
          float x[K];
#pragma unroll
          for (int k = 0; k < K; ++k) x[k] = to_f(row[j + k * G]);
          lane_push<K, kSumExp>(st, x, j, G, xt, code);
        }
        for (; j < C; j += G) {
          const float x[1] = {to_f(row[j])};
          lane_push<1, kSumExp>(st, x, j, G, xt, code);
        }
      }
      st = shfl_merge<kSumExp>(st, G);
      if (li == 0 && active) {
        if (code >= 0) {
          count_row<kMode>(p, sm, v, c, st, code, xt, seen);
        } else {
          count_skipped(c, code == -1);
        }
      }
    }
    if (kMode == kReadAuto) {
      seen = __syncthreads_or(c.outside || seen);
    } else {
      __syncthreads();
    }
  }
  mc_flush<kMode>(p, sm, v, c);
}

// ---------------------------------------------------------------- row kernel (long rows)
template <typename scalar_t, int kMode, int kVec>
__global__ void __launch_bounds__(kThreads, 4) mc_row_kernel(const Params p) {
  constexpr bool kSumExp = kMode != kReadProbs;
  __shared__ McSmem sm;
  __shared__ Lane warps[kThreads / 32];
  extern __shared__ __align__(16) unsigned char dyn[];
  const McView v = mc_view(p, dyn);
  mc_init(p, sm, v);
  struct alignas(sizeof(scalar_t) * kVec) Pack {
    scalar_t x[kVec];
  };
  const int64_t C = p.c, rows = p.n * p.d;
  const int64_t nvec = C / kVec;
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  McCounts c;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / p.d, d = r - n * p.d;
    const int64_t code = target_code(p, load_target(p.target, n * p.tN + d * p.tD, p.target_kind));
    const scalar_t* row = P + n * p.sN + d * p.sD;
    const bool scan = code >= 0;
    Lane st = lane_identity();
    const float xt = code >= 0 ? to_f(row[code]) : 0.0f;
    const int32_t t = static_cast<int32_t>(code);
    if (scan) {
      const Pack* rv = reinterpret_cast<const Pack*>(row);
      int64_t i = threadIdx.x;
      for (; i + (kRowUnroll - 1) * kThreads < nvec; i += kRowUnroll * kThreads) {
        Pack pk[kRowUnroll];
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) pk[u] = rv[i + u * kThreads];
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) {
          float x[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) x[e] = to_f(pk[u].x[e]);
          lane_push<kVec, kSumExp>(st, x, static_cast<int32_t>((i + u * kThreads) * kVec), 1, xt, t);
        }
      }
      for (; i < nvec; i += kThreads) {
        const Pack pk = rv[i];
        float x[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = to_f(pk.x[e]);
        lane_push<kVec, kSumExp>(st, x, static_cast<int32_t>(i * kVec), 1, xt, t);
      }
      for (int64_t j = nvec * kVec + threadIdx.x; j < C; j += kThreads) {
        const float x[1] = {to_f(row[j])};
        lane_push<1, kSumExp>(st, x, static_cast<int32_t>(j), 1, xt, t);
      }
    }
    st = shfl_merge<kSumExp>(st, 32);
    if (lane == 0) warps[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kThreads / 32 ? warps[lane] : lane_identity();
      st = shfl_merge<kSumExp>(st, 32);
      if (lane == 0) {
        if (code >= 0) {
          count_row<kMode>(p, sm, v, c, st, code, xt, sm.outside != 0);
        } else {
          count_skipped(c, code == -1);
        }
        if (kMode == kReadAuto && c.outside) sm.outside = 1;
      }
    }
    __syncthreads();
  }
  mc_flush<kMode>(p, sm, v, c);
}

// ---------------------------------------------------------------- strided kernel (lane per row)
template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kThreads, 4) mc_strided_kernel(const Params p) {
  constexpr bool kSumExp = kMode != kReadProbs;
  constexpr int K = kStridedChunk;
  __shared__ McSmem sm;
  extern __shared__ __align__(16) unsigned char dyn[];
  const McView v = mc_view(p, dyn);
  mc_init(p, sm, v);
  const int64_t C = p.c, rows = p.n * p.d;
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  McCounts c;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = r / p.d, d = r - n * p.d;
    const int64_t code = target_code(p, load_target(p.target, n * p.tN + d * p.tD, p.target_kind));
    const scalar_t* row = P + n * p.sN + d * p.sD;
    const bool scan = code >= 0;
    Lane st = lane_identity();
    const float xt = code >= 0 ? to_f(row[code * p.sC]) : 0.0f;
    const int32_t t = static_cast<int32_t>(code);
    if (scan) {
      int64_t j = 0;
      for (; j + K <= C; j += K) {
        float x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = to_f(row[(j + k) * p.sC]);
        lane_push<K, kSumExp>(st, x, static_cast<int32_t>(j), 1, xt, t);
      }
      for (; j < C; ++j) {
        const float x[1] = {to_f(row[j * p.sC])};
        lane_push<1, kSumExp>(st, x, static_cast<int32_t>(j), 1, xt, t);
      }
    }
    if (code >= 0) {
      count_row<kMode>(p, sm, v, c, st, code, xt, false);
    } else {
      count_skipped(c, code == -1);
    }
  }
  mc_flush<kMode>(p, sm, v, c);
}

// Auto rule, launch 1 of 2: each block records whether it saw a value outside [0, 1] (NaN
// included). No memset needed: every block writes its own flag.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) range_flags_kernel(const Params p, int* flags) {
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  const int64_t total = p.n * p.c * p.d;
  int outside = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / (p.c * p.d), rem = i - n * p.c * p.d, l = rem / p.d, d = rem - l * p.d;
    const float x = static_cast<float>(P[n * p.sN + l * p.sC + d * p.sD]);
    outside |= !(x >= 0.0f && x <= 1.0f);
  }
  outside = __syncthreads_or(outside);
  if (threadIdx.x == 0) flags[blockIdx.x] = outside;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) elementwise_update_kernel(const Params p) {
  const Smem s = smem_view(p);
  smem_init(p, s);
  const Layout& lay = p.lay;
  bool logits = p.input_kind == static_cast<int>(InputKind::kLogits);
  if (p.input_kind == static_cast<int>(InputKind::kAuto)) {
    int any = 0;
    for (int i = threadIdx.x; i < p.num_range_flags; i += blockDim.x) any |= p.range_flags[i];
    logits = __syncthreads_or(any) != 0;
  }
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  const int64_t per_n = p.c * p.d;
  const int64_t total = p.n * per_n;
  const bool per_label_valid = lay.valid_len > 1;
  double loss = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / per_n, rem = i - n * per_n, l = rem / p.d, d = rem - l * p.d;
    const int64_t y = load_target(p.target, n * p.tN + l * p.tC + d * p.tD, p.target_kind);
    if (p.has_ignore && y == p.ignore_index) {
      count(p, s, lay.ignored, 1);
      continue;
    }
    if (y != 0 && y != 1) {
      count(p, s, lay.invalid, 1);
      continue;
    }
    const float x = static_cast<float>(P[n * p.sN + l * p.sC + d * p.sD]);
    if (!is_finite_bits(x)) {
      count(p, s, lay.nonfinite, 1);
      continue;
    }
    const ElementResult r = binary_element(x, logits, p.threshold, y);
    count(p, s, lay.tp + l, r.pred && y);
    count(p, s, lay.pred + l, r.pred);
    count(p, s, lay.target + l, static_cast<uint32_t>(y));
    count(p, s, lay.valid + (per_label_valid ? l : 0), 1);
    loss += r.loss;
    const int bin = ece_bin(r.prob);
    count(p, s, lay.ece_count + bin, 1);
    add_conf(p, s, bin, r.prob);
    count(p, s, lay.ece_acc + bin, static_cast<uint32_t>(y));
  }
  smem_flush(p, s, loss);
}

int tile_group(int64_t C) {
  int g = 1;
  while (g < 32 && C > 16 * g) g <<= 1;  // about 16 values per lane before the shuffles
  return g;
}

// Resident blocks per SM for a kernel and its dynamic shared memory (cached: a host-side
// query, but the update runs every step).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, size_t smem) {
  static std::mutex mu;
  static std::vector<std::pair<std::pair<const void*, size_t>, int>> cache;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), smem);
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache) {
    if (e.first == key) return e.second;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  n = n < 1 ? 1 : n;
  cache.emplace_back(key, n);
  return n;
}

template <typename Kernel>
void launch(Kernel kernel, const Params& p, int64_t units, size_t smem, cudaStream_t stream) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm(kernel, smem);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, units)));
  kernel<<<blocks, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kMode>
void launch_multiclass(Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t C = p.c, rows = p.n * p.d;
  constexpr size_t kCmSmemMax = 16 * 1024, kClsSmemMax = 24 * 1024;
  p.mc_cm_smem = static_cast<size_t>(C * C) * 4 <= kCmSmemMax;
  p.mc_cls_smem = !p.mc_cm_smem && static_cast<size_t>(3 * C) * 4 <= kClsSmemMax;
  const size_t counters = p.mc_cm_smem ? C * C * 4 : (p.mc_cls_smem ? 3 * C * 4 : 0);
  p.mc_counter_bytes = static_cast<int>((counters + 15) / 16 * 16);
  const bool aligned = reinterpret_cast<uintptr_t>(p.preds) % 16 == 0;
  const bool contiguous_rows = p.sC == 1 && (p.d == 1 || p.sD == C) && (p.n == 1 || p.sN == C * p.d);
  const int64_t tile_rows = std::min<int64_t>(kTileRowsMax, (kTileBytes / static_cast<int64_t>(sizeof(scalar_t)) - 2 * kVec) / C);
  if (contiguous_rows && aligned && tile_rows >= 2) {
    p.mc_tile_rows = tile_rows;
    p.group = tile_group(C);
    const size_t smem = p.mc_counter_bytes + kTileBytes + kTileRowsMax * sizeof(int32_t);
    launch(mc_tile_kernel<scalar_t, kMode>, p, (rows + tile_rows - 1) / tile_rows, smem, stream);
  } else if (p.sC == 1 && C >= 256) {
    const bool vec = aligned && p.sN % kVec == 0 && (p.d == 1 || p.sD % kVec == 0);
    if (vec) {
      launch(mc_row_kernel<scalar_t, kMode, kVec>, p, rows, p.mc_counter_bytes, stream);
    } else {
      launch(mc_row_kernel<scalar_t, kMode, 1>, p, rows, p.mc_counter_bytes, stream);
    }
  } else {
    launch(mc_strided_kernel<scalar_t, kMode>, p, (rows + kThreads - 1) / kThreads, p.mc_counter_bytes, stream);
  }
}

// The kernels' view of one update: pointers, sizes, strides and the configuration as plain values.
Params make_params(const UpdateInputs& in, const at::Tensor& state) {
  Params p{};
  p.preds = in.preds.const_data_ptr();
  p.target = in.target.const_data_ptr();
  p.state = state.data_ptr<double>();
  p.n = in.n;
  p.c = in.c;
  p.d = in.d;
  p.sN = in.preds.stride(0);
  p.sC = in.preds.stride(1);
  p.sD = in.preds.stride(2);
  p.tN = in.target.stride(0);
  if (in.cfg.task == Task::kMulticlass) {
    p.tD = in.target.stride(1);
  } else {
    p.tC = in.target.stride(1);
    p.tD = in.target.stride(2);
  }
  const auto tt = in.target.scalar_type();
  p.target_kind = tt == at::kLong ? kI64 : (tt == at::kInt ? kI32 : kU8);
  p.has_ignore = in.cfg.ignore_index.has_value();
  p.ignore_index = in.cfg.ignore_index.value_or(0);
  p.input_kind = static_cast<int>(in.cfg.input);
  p.threshold = static_cast<float>(in.cfg.threshold);
  p.num_topk = static_cast<int>(in.cfg.top_k.size());
  for (int i = 0; i < p.num_topk; ++i) p.topk[i] = in.cfg.top_k[i];
  p.lay = in.lay;
  return p;
}

}  // namespace

void update_cuda(const UpdateInputs& in, const at::Tensor& state) {
  const c10::cuda::CUDAGuard guard(in.preds.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  Params p = make_params(in, state);

  STEPSCOPE_DISPATCH_PREDS(in.preds.scalar_type(), "classification_update_cuda", [&] {
    if (in.cfg.task == Task::kMulticlass) {
      switch (in.cfg.input) {
        case InputKind::kAuto:
          launch_multiclass<scalar_t, kReadAuto>(p, stream);
          break;
        case InputKind::kLogits:
          launch_multiclass<scalar_t, kReadLogits>(p, stream);
          break;
        case InputKind::kProbs:
          launch_multiclass<scalar_t, kReadProbs>(p, stream);
          break;
      }
    } else {
      // Shared memory: privatise what fits in the default 48 KB per block.
      constexpr size_t kSmemBudget = 48 * 1024;
      const size_t dense_bytes = static_cast<size_t>(in.lay.dense) * 4 + kEceSlots * 4;
      p.smem_dense = dense_bytes <= kSmemBudget;
      p.smem_confmat = false;
      const size_t smem = p.smem_dense ? dense_bytes : 0;
      // Enough blocks to fill the device a few times over; more would only add flush atomics.
      const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 4;
      const int64_t total = in.n * in.c * in.d;
      const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, (total + kThreads - 1) / kThreads));
      at::Tensor flags;
      if (in.cfg.input == InputKind::kAuto) {
        flags = at::empty({blocks}, in.preds.options().dtype(at::kInt));
        p.range_flags = flags.const_data_ptr<int>();
        p.num_range_flags = blocks;
        range_flags_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(p, flags.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      elementwise_update_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace stepscope::metrics
