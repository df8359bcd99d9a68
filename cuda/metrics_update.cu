// CUDA update for classification metrics: one launch per update (two for the binary/multilabel
// 'auto' logits rule), no host synchronisation, accumulation in place into the float64 state.
//
// Multiclass: a group of G lanes (G divides 32) owns one sample row at a time. Each lane walks
// the row with 16-byte vector loads where the row is contiguous and aligned, keeping an online
// max / first-argmax / sum-exp / target-rank state (metrics/row_math.h), and the group merges
// the lanes' states with shuffles: one read of the logits, no second pass for log-sum-exp. Rows
// of segmentation outputs ([N, C, d...]: classes strided by D) use G = 1, so that consecutive
// lanes read consecutive pixels and every load is coalesced.
// Counters are privatised in shared memory when they fit (the O(C) part, and the C x C matrix
// when small) and flushed with one global atomic per non-zero counter per block; otherwise they
// go straight to global float64 atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "check.h"
#include "dispatch.h"
#include "metrics/row_math.h"
#include "metrics/update.h"

namespace stepscope::metrics {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTopK = 8;
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
  const int* range_flags;      // auto rule: per-block "saw a value outside [0, 1]" flags
  int num_range_flags;
  float threshold;
  int num_topk;
  int64_t topk[kMaxTopK];
  Layout lay;
  int group;                   // lanes per row (multiclass)
  bool smem_dense;             // O(C) counters privatised in shared memory
  bool smem_confmat;           // C x C counters privatised too
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

__device__ __forceinline__ void count_cell(const Params& p, const Smem& s, int64_t cell) {
  if (p.smem_confmat) {
    atomicAdd(&s.cm[cell], 1u);
  } else {
    atomicAdd(&p.state[p.lay.confmat + cell], 1.0);
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

template <bool kSumExp>
__device__ __forceinline__ RowState group_merge(RowState st, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) {
    RowState o;
    o.max = __shfl_xor_sync(kFullMask, st.max, off, group);
    o.sumexp = __shfl_xor_sync(kFullMask, st.sumexp, off, group);
    o.argmax = __shfl_xor_sync(kFullMask, st.argmax, off, group);
    o.above = __shfl_xor_sync(kFullMask, st.above, off, group);
    o.nonfinite = __shfl_xor_sync(kFullMask, static_cast<int>(st.nonfinite), off, group) != 0;
    st = row_merge<kSumExp>(st, o);
  }
  return st;
}

template <typename scalar_t, int kVec, bool kLogits>
__device__ __forceinline__ void scan_row(RowState& st, const scalar_t* row, const Params& p, int lane_in_group,
                                         float xt, int32_t t) {
  const int64_t C = p.c;
  if constexpr (kVec > 1) {
    struct alignas(16) Pack {
      scalar_t v[kVec];
    };
    for (int64_t j = static_cast<int64_t>(lane_in_group) * kVec; j < C; j += static_cast<int64_t>(p.group) * kVec) {
      const Pack pk = *reinterpret_cast<const Pack*>(row + j);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        row_push<kLogits>(st, static_cast<float>(pk.v[v]), static_cast<int32_t>(j + v), xt, t);
      }
    }
  } else {
    for (int64_t j = lane_in_group; j < C; j += p.group) {
      row_push<kLogits>(st, static_cast<float>(row[j * p.sC]), static_cast<int32_t>(j), xt, t);
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads) multiclass_update_kernel(const Params p) {
  const Smem s = smem_view(p);
  smem_init(p, s);
  const Layout& lay = p.lay;
  const bool logits = p.input_kind != static_cast<int>(InputKind::kProbs);
  const int lane = threadIdx.x & 31;
  const int G = p.group;
  const int lane_in_group = lane % G;
  const int groups_per_warp = 32 / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t rows = p.n * p.d;
  const scalar_t* P = static_cast<const scalar_t*>(p.preds);
  double loss = 0.0;

  // The loop bound depends on the warp only, so every lane reaches the group shuffles.
  for (int64_t base = warp * groups_per_warp; base < rows; base += warps * groups_per_warp) {
    const int64_t smp = base + lane / G;
    const bool active = smp < rows;
    const int64_t n = active ? smp / p.d : 0;
    const int64_t d = active ? smp - n * p.d : 0;
    const int64_t t = active ? load_target(p.target, n * p.tN + d * p.tD, p.target_kind) : 0;
    const bool ignored = active && p.has_ignore && t == p.ignore_index;
    const bool invalid = active && !ignored && (t < 0 || t >= p.c);
    const bool work = active && !ignored && !invalid;
    const scalar_t* row = P + n * p.sN + d * p.sD;
    const float xt = work ? static_cast<float>(row[t * p.sC]) : 0.0f;
    RowState st = row_identity();
    if (work) {
      if (logits) {
        scan_row<scalar_t, kVec, true>(st, row, p, lane_in_group, xt, static_cast<int32_t>(t));
      } else {
        scan_row<scalar_t, kVec, false>(st, row, p, lane_in_group, xt, static_cast<int32_t>(t));
      }
    }
    st = logits ? group_merge<true>(st, G) : group_merge<false>(st, G);
    if (lane_in_group != 0 || !active) continue;
    if (ignored) {
      count(p, s, lay.ignored, 1);
    } else if (invalid) {
      count(p, s, lay.invalid, 1);
    } else if (st.nonfinite) {
      count(p, s, lay.nonfinite, 1);
    } else {
      const SampleResult r = finish_row(st, xt, logits);
      const uint32_t hit = r.pred == t;
      count(p, s, lay.tp + t, hit);
      count(p, s, lay.pred + r.pred, 1);
      count(p, s, lay.target + t, 1);
      count(p, s, lay.valid, 1);
      if (lay.confmat >= 0) count_cell(p, s, t * p.c + r.pred);
      for (int i = 0; i < p.num_topk; ++i) count(p, s, lay.topk + i, r.rank < p.topk[i]);
      loss += r.loss;
      const int bin = ece_bin(r.conf);
      count(p, s, lay.ece_count + bin, 1);
      add_conf(p, s, bin, r.conf);
      count(p, s, lay.ece_acc + bin, hit);
    }
  }
  smem_flush(p, s, loss);
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

int lanes_per_row(int64_t C, int64_t D, int vec) {
  if (D > 1) return 1;  // segmentation: one lane per pixel keeps loads coalesced across lanes
  const int64_t chunks = (C + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g * 4 < chunks) g <<= 1;  // about four loads per lane before the shuffles
  return g;
}

void classification_update_cuda(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state,
                                int64_t task, int64_t num_classes, c10::IntArrayRef top_k,
                                std::optional<int64_t> ignore_index, double threshold, int64_t input_kind,
                                bool confusion_matrix) {
  const UpdateInputs in = prepare_update(preds, target, state, task, num_classes, top_k, ignore_index, threshold,
                                         input_kind, confusion_matrix);
  if (in.empty()) return;
  update_cuda(in, state);
}

}  // namespace

void update_cuda(const UpdateInputs& in, const at::Tensor& state) {
  const c10::cuda::CUDAGuard guard(in.preds.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  static_assert(kMaxTopK == 8, "make_layout allows 8 top_k values");

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
  p.has_ignore = in.cfg.has_ignore_index;
  p.ignore_index = in.cfg.ignore_index;
  p.input_kind = static_cast<int>(in.cfg.input);
  p.threshold = static_cast<float>(in.cfg.threshold);
  p.num_topk = static_cast<int>(in.cfg.top_k.size());
  for (int i = 0; i < p.num_topk; ++i) p.topk[i] = in.cfg.top_k[i];
  p.lay = in.lay;

  // Shared memory: privatise what fits in the default 48 KB per block.
  constexpr size_t kSmemBudget = 48 * 1024;
  const size_t dense_bytes = static_cast<size_t>(in.lay.dense) * 4 + kEceSlots * 4;
  const size_t cm_bytes = in.lay.confmat >= 0 ? static_cast<size_t>(in.lay.classes * in.lay.classes) * 4 : 0;
  p.smem_dense = dense_bytes <= kSmemBudget;
  p.smem_confmat = p.smem_dense && cm_bytes > 0 && dense_bytes + cm_bytes <= kSmemBudget;
  const size_t smem = (p.smem_dense ? dense_bytes : 0) + (p.smem_confmat ? cm_bytes : 0);
  // Enough blocks to fill the device a few times over; more would only add flush atomics.
  const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 4;

  STEPSCOPE_DISPATCH_PREDS(in.preds.scalar_type(), "classification_update_cuda", [&] {
    if (in.cfg.task == Task::kMulticlass) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec_ok = p.sC == 1 && p.d == 1 && in.c % kVec == 0 && p.sN % kVec == 0 &&
                          reinterpret_cast<uintptr_t>(p.preds) % 16 == 0;
      p.group = lanes_per_row(in.c, in.d, vec_ok ? kVec : 1);
      const int64_t rows_per_block = (kThreads / 32) * (32 / p.group);
      const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, (in.n * in.d + rows_per_block - 1) / rows_per_block));
      if (vec_ok) {
        multiclass_update_kernel<scalar_t, kVec><<<blocks, kThreads, smem, stream>>>(p);
      } else {
        multiclass_update_kernel<scalar_t, 1><<<blocks, kThreads, smem, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
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

TORCH_LIBRARY_IMPL(stepscope, CUDA, m) { m.impl("classification_update", &classification_update_cuda); }

}  // namespace stepscope::metrics
