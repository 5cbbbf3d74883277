// wid_kernels._C: the CUDA kernels (one translation unit: each takes 1-1.5 min to compile on 2 cores).
//
// Both ops are memory-bound, so each kernel makes one pass over DRAM with 16-byte vector loads
// where the row length and the addresses allow it, computing in fp32 (fp64 for fp64 tensors).
// Headers: c10/cuda only (ATen/cuda/CUDAContext.h would pull in cusparse.h, absent from some toolkits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <type_traits>

#include "wid_ops.h"

namespace wid {
namespace {

constexpr int kWarp = 32;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* __restrict__ base, int64_t i, T (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(base + i);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = pk.v[k];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ base, int64_t i, const T (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = in[k];
  *reinterpret_cast<Pack<T, V>*>(base + i) = pk;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total. `scratch`: 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < n_warps ? scratch[lane] : A(0));  // every warp reduces the same partials
}

// 16-byte vectors when the row length and every base address allow it, else scalar accesses.
template <typename T>
int vector_width(int64_t cols, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = 16 / sizeof(T);
  if (cols % kMax != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kMax;
}

int threads_for(int64_t cols, int vec) {
  const int64_t lanes = (cols + vec - 1) / vec;
  const int64_t rounded = (lanes + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(kWarp, rounded)));
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// ---------------------------------------------------------------- masked LayerNorm forward
// One block per row. The row is read three times (sum, centred squares, output) but only the first
// read comes from DRAM: a row is a few KB and stays in L1/L2.

template <typename T, typename A, int V>
__global__ void mln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, const A* __restrict__ gamma,
                               const A* __restrict__ beta, const uint8_t* __restrict__ keep,
                               const A* __restrict__ inv_count_dev, A inv_count_host, A eps, T* __restrict__ y,
                               A* __restrict__ mean_out, A* __restrict__ rstd_out, int64_t cols) {
  __shared__ A scratch[kWarp];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* rr = r ? r + row * cols : nullptr;
  T* yr = y + row * cols;
  const A inv_count = inv_count_dev ? *inv_count_dev : inv_count_host;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;

  A sum = 0;
  for (int64_t c = threadIdx.x * V; c < cols; c += stride) {
    T xv[V], rv[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<T, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A h = static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0));
      if (!keep || keep[c + k]) sum += h;
    }
  }
  const A mean = block_sum(sum, scratch) * inv_count;

  A sq = 0;
  for (int64_t c = threadIdx.x * V; c < cols; c += stride) {
    T xv[V], rv[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<T, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d = static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mean;
      if (!keep || keep[c + k]) sq += d * d;
    }
  }
  const A rstd = A(1) / sqrt(block_sum(sq, scratch) * inv_count + eps);

  for (int64_t c = threadIdx.x * V; c < cols; c += stride) {
    T xv[V], rv[V], out[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<T, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A v = (static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mean) * rstd;
      if (gamma) v *= gamma[c + k];
      if (beta) v += beta[c + k];
      out[k] = static_cast<T>(v);
    }
    store_pack<T, V>(yr, c, out);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------- masked LayerNorm backward
// Persistent blocks over rows. dh = rstd·(g − k·(Σg + x̂·Σg·x̂)/c), g = dy·γ. Each thread owns the same
// columns in every row, so its dγ/dβ partials accumulate without atomics or barriers: in shared
// memory when 2·cols fit, else in the block's row of the global partial buffer (reduced by torch).

template <typename T, typename A, int V>
__global__ void mln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                               const A* __restrict__ gamma, const uint8_t* __restrict__ keep,
                               const A* __restrict__ inv_count_dev, A inv_count_host, const A* __restrict__ mean,
                               const A* __restrict__ rstd, T* __restrict__ dh, A* __restrict__ partial, int64_t rows,
                               int64_t cols, bool shared_acc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ A scratch[kWarp];
  A* part = partial + static_cast<int64_t>(blockIdx.x) * 2 * cols;
  A* acc = shared_acc ? reinterpret_cast<A*>(smem_raw) : part;
  const A inv_count = inv_count_dev ? *inv_count_dev : inv_count_host;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t c = threadIdx.x * V; c < cols; c += stride)
#pragma unroll
    for (int k = 0; k < V; ++k) acc[c + k] = acc[cols + c + k] = A(0);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* rr = r ? r + row * cols : nullptr;
    const T* dyr = dy + row * cols;
    const A mu = mean[row], rs = rstd[row];
    A sum_g = 0, sum_gx = 0;
    for (int64_t c = threadIdx.x * V; c < cols; c += stride) {
      T xv[V], rv[V], dv[V];
      load_pack<T, V>(xr, c, xv);
      load_pack<T, V>(dyr, c, dv);
      if (rr) load_pack<T, V>(rr, c, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xh = (static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mu) * rs;
        const A d = static_cast<A>(dv[k]);
        const A g = gamma ? d * gamma[c + k] : d;
        sum_g += g;
        sum_gx += g * xh;
        acc[c + k] += d * xh;
        acc[cols + c + k] += d;
      }
    }
    sum_g = block_sum(sum_g, scratch) * inv_count;
    sum_gx = block_sum(sum_gx, scratch) * inv_count;
    T* dhr = dh + row * cols;
    for (int64_t c = threadIdx.x * V; c < cols; c += stride) {
      T xv[V], rv[V], dv[V], out[V];
      load_pack<T, V>(xr, c, xv);
      load_pack<T, V>(dyr, c, dv);
      if (rr) load_pack<T, V>(rr, c, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xh = (static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mu) * rs;
        const A d = static_cast<A>(dv[k]);
        const A g = gamma ? d * gamma[c + k] : d;
        const A corr = (keep && !keep[c + k]) ? A(0) : sum_g + xh * sum_gx;
        out[k] = static_cast<T>(rs * (g - corr));
      }
      store_pack<T, V>(dhr, c, out);
    }
  }
  if (shared_acc) {
    for (int64_t c = threadIdx.x * V; c < cols; c += stride)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        part[c + k] = acc[c + k];
        part[cols + c + k] = acc[cols + c + k];
      }
  }
}

// Two instantiations per kernel and dtype: scalar accesses, and 16-byte vectors of kMax elements.
template <int kMax, typename F>
void with_vector_width(int vec, F&& launch) {
  if (vec == 1) {
    launch(std::integral_constant<int, 1>{});
  } else {
    launch(std::integral_constant<int, kMax>{});
  }
}

std::tuple<at::Tensor, at::Tensor> mln_fwd_out_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                    const c10::optional<at::Tensor>& gamma,
                                                    const c10::optional<at::Tensor>& beta,
                                                    const c10::optional<at::Tensor>& keep, double eps, at::Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  LayerNormArgs a = prepare_layer_norm(x, residual, gamma, beta, keep, /*host_count=*/false);
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous() &&
                  y.device() == x.device(),
              "masked_layer_norm: out must be a contiguous tensor of x's shape, dtype and device");
  auto stats = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({a.rows}, stats), rstd = at::empty({a.rows}, stats);
  if (a.rows == 0) return {mean, rstd};
  TORCH_CHECK(a.rows <= INT32_MAX, "masked_layer_norm: too many rows for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_layer_norm_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* rp = a.residual.defined() ? a.residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(a.cols, {xp, rp, yp});
    with_vector_width<16 / sizeof(scalar_t)>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      mln_fwd_kernel<scalar_t, A, V><<<static_cast<unsigned>(a.rows), threads_for(a.cols, V), 0, stream>>>(
          xp, rp, a.gamma.defined() ? a.gamma.data_ptr<A>() : nullptr,
          a.beta.defined() ? a.beta.data_ptr<A>() : nullptr, a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr,
          a.inv_count_t.defined() ? a.inv_count_t.data_ptr<A>() : nullptr, static_cast<A>(a.inv_count),
          static_cast<A>(eps), yp, mean.data_ptr<A>(), rstd.data_ptr<A>(), a.cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_cuda(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& residual,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            const c10::optional<at::Tensor>& beta,
                                                            const c10::optional<at::Tensor>& keep, double eps) {
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto stats = mln_fwd_out_cuda(x, residual, gamma, beta, keep, eps, y);
  return {y, std::get<0>(stats), std::get<1>(stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& residual,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            const c10::optional<at::Tensor>& keep,
                                                            const at::Tensor& mean, const at::Tensor& rstd) {
  c10::cuda::CUDAGuard guard(x.device());
  LayerNormArgs a = prepare_layer_norm(x, residual, gamma, c10::nullopt, keep, /*host_count=*/false);
  TORCH_CHECK(dy.sizes() == x.sizes(), "masked_layer_norm_bwd: dy shape ", dy.sizes(), " != x shape ", x.sizes());
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor dy_c = dy.to(x.scalar_type()).contiguous();
  at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  TORCH_CHECK(mean_c.numel() == a.rows && rstd_c.numel() == a.rows,
              "masked_layer_norm_bwd: mean/rstd must have one entry per row");
  at::Tensor dh = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.rows == 0 || a.cols == 0) {
    at::Tensor zeros = at::zeros({a.cols}, x.options().dtype(acc));
    return {dh, zeros, zeros.clone()};
  }
  const int blocks = static_cast<int>(std::min<int64_t>(a.rows, 4 * sm_count(x.get_device())));
  at::Tensor partial = at::empty({blocks, 2, a.cols}, x.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_layer_norm_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* rp = a.residual.defined() ? a.residual.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dyp = dy_c.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    const size_t acc_bytes = 2 * static_cast<size_t>(a.cols) * sizeof(A);
    const bool shared_acc = acc_bytes <= 32 * 1024;
    const int vec = vector_width<scalar_t>(a.cols, {xp, rp, dyp, dhp});
    with_vector_width<16 / sizeof(scalar_t)>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      mln_bwd_kernel<scalar_t, A, V><<<blocks, threads_for(a.cols, V), shared_acc ? acc_bytes : 0, stream>>>(
          dyp, xp, rp, a.gamma.defined() ? a.gamma.data_ptr<A>() : nullptr,
          a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr,
          a.inv_count_t.defined() ? a.inv_count_t.data_ptr<A>() : nullptr, static_cast<A>(a.inv_count),
          mean_c.data_ptr<A>(), rstd_c.data_ptr<A>(), dhp, partial.data_ptr<A>(), a.rows, a.cols, shared_acc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // two separate reductions: the outputs must not alias (the schema promises fresh tensors)
  return {dh, partial.select(1, 0).sum(0), partial.select(1, 1).sum(0)};
}

// ---------------------------------------------------------------- WID-AdamW, multi-tensor
// One launch covers up to kMaxTensors tensors / kMaxBlocks chunks of kChunk elements, described in a
// by-value kernel argument (no host-to-device copy; stays under the 4 KB parameter limit).

constexpr int kMaxTensors = 16;
constexpr int kMaxBlocks = 256;
constexpr int64_t kChunk = 65536;
constexpr int kAdamThreads = 512;
enum : uint8_t { kHasKeep = 1, kByRow = 2, kAddParam = 4 };

struct AdamwBatch {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];
  void* v[kMaxTensors];
  const uint8_t* keep[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t cols[kMaxTensors];
  uint8_t flags[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(AdamwBatch) + 128 <= 4096, "kernel parameters must fit in 4 KB");

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kAdamThreads)
    adamw_kernel(AdamwBatch b, A lr, A beta1, A beta2, A eps, A decay, A pen_lo, A pen_hi, bool masks_active,
                 bool has_extra, bool authors_rule) {
  const int t = b.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(b.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = b.numel[t] < start + kChunk ? b.numel[t] : start + kChunk;
  T* __restrict__ p = static_cast<T*>(b.p[t]);
  const T* __restrict__ gr = static_cast<const T*>(b.g[t]);
  T* __restrict__ m = static_cast<T*>(b.m[t]);
  T* __restrict__ v = static_cast<T*>(b.v[t]);
  const uint8_t flags = b.flags[t];
  const uint8_t* __restrict__ keep = (flags & kHasKeep) ? b.keep[t] : nullptr;
  const bool by_row = flags & kByRow, add_param = flags & kAddParam;
  const int64_t cols = b.cols[t];
  const A one_b1 = A(1) - beta1, one_b2 = A(1) - beta2;
  // authors' rule: tensors under the rule get the pre-step injection (their whole first moment decays
  // once more); the additive variant adds the injection to AdamW's own update
  const bool pre_inject = masks_active && has_extra && authors_rule && keep;
  const bool post_inject = masks_active && has_extra && !authors_rule;

  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < end;
       i += static_cast<int64_t>(blockDim.x) * V) {
    T pv[V], gv[V], mv[V], vv[V];
    const bool full = i + V <= end;  // V > 1 only for batches whose addresses are 16-byte aligned
    if (V > 1 && full) {
      load_pack<T, V>(p, i, pv);
      load_pack<T, V>(gr, i, gv);
      load_pack<T, V>(m, i, mv);
      load_pack<T, V>(v, i, vv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool ok = i + k < end;
        pv[k] = ok ? p[i + k] : T(0);
        gv[k] = ok ? gr[i + k] : T(0);
        mv[k] = ok ? m[i + k] : T(0);
        vv[k] = ok ? v[i + k] : T(0);
      }
    }
    int64_t row = i / cols, col = i - row * cols;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const bool kept = !keep || (by_row ? keep[row] : keep[col]) != 0;
      const A pa = static_cast<A>(pv[k]), ga = static_cast<A>(gv[k]);
      A g;
      if (masks_active) {
        g = kept ? ga : pen_lo * pa;  // a select: an uncomputed (even NaN) pruned gradient cannot leak
      } else {
        g = add_param ? ga + pa : ga;
      }
      A ma = static_cast<A>(mv[k]);
      if (pre_inject) ma = beta1 * ma + (kept ? A(0) : one_b1 * (pen_hi * pa));
      ma = beta1 * ma + one_b1 * g;
      if (post_inject && !kept) ma += one_b1 * (pen_hi * pa);
      const A va = beta2 * static_cast<A>(vv[k]) + one_b2 * g * g;
      const A step = lr * (ma / (sqrt(va) + eps));
      pv[k] = static_cast<T>(authors_rule ? (pa - step) * decay : pa * decay - step);
      mv[k] = static_cast<T>(ma);
      vv[k] = static_cast<T>(va);
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
    if (V > 1 && full) {
      store_pack<T, V>(p, i, pv);
      store_pack<T, V>(m, i, mv);
      store_pack<T, V>(v, i, vv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (i + k < end) {
          p[i + k] = pv[k];
          m[i + k] = mv[k];
          v[i + k] = vv[k];
        }
      }
    }
  }
}

template <typename T>
void adamw_launch_all(const std::vector<const AdamwItem*>& items, double lr, double beta1, double beta2, double eps,
                      double decay, double penalty, bool masks_active, bool authors_rule, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  constexpr int kVec = 16 / sizeof(T);
  bool aligned = true;
  for (const AdamwItem* it : items)
    for (const at::Tensor* t : {&it->p, &it->g, &it->m, &it->v})
      aligned = aligned && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
  auto launch = [&](const AdamwBatch& batch, int n_blocks) {
    with_vector_width<kVec>(aligned ? kVec : 1, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      adamw_kernel<T, A, V><<<n_blocks, kAdamThreads, 0, stream>>>(
          batch, static_cast<A>(lr), static_cast<A>(beta1), static_cast<A>(beta2), static_cast<A>(eps),
          static_cast<A>(decay), static_cast<A>(std::min(penalty, 1.0)), static_cast<A>(penalty - 1.0), masks_active,
          penalty > 1.0, authors_rule);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  AdamwBatch batch{};
  int slot = 0, n_blocks = 0;
  for (size_t ti = 0; ti < items.size(); ++ti) {
    const AdamwItem& it = *items[ti];
    batch.p[slot] = it.p.data_ptr();
    batch.g[slot] = it.g.data_ptr();
    batch.m[slot] = it.m.data_ptr();
    batch.v[slot] = it.v.data_ptr();
    batch.keep[slot] = it.keep.defined() ? it.keep.data_ptr<uint8_t>() : nullptr;
    batch.numel[slot] = it.p.numel();
    batch.cols[slot] = std::max<int64_t>(it.cols, 1);
    batch.flags[slot] = (it.keep.defined() ? kHasKeep : 0) | (it.by_row ? kByRow : 0) | (it.add_param ? kAddParam : 0);
    const int64_t chunks = (it.p.numel() + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "wid_adamw_step: tensor too large");
    for (int64_t c = 0; c < chunks; ++c) {
      batch.block_tensor[n_blocks] = static_cast<int16_t>(slot);
      batch.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool last_tensor = last_chunk && ti == items.size() - 1;
      const bool slots_full = last_chunk && slot == kMaxTensors - 1;
      if (n_blocks == kMaxBlocks || slots_full || last_tensor) {
        launch(batch, n_blocks);
        n_blocks = 0;
        if (!last_chunk) {  // the tensor continues in the next launch, from slot 0
          batch.p[0] = batch.p[slot];
          batch.g[0] = batch.g[slot];
          batch.m[0] = batch.m[slot];
          batch.v[0] = batch.v[slot];
          batch.keep[0] = batch.keep[slot];
          batch.numel[0] = batch.numel[slot];
          batch.cols[0] = batch.cols[slot];
          batch.flags[0] = batch.flags[slot];
          slot = 0;
        } else {
          slot = -1;  // the next tensor starts at slot 0
        }
      }
    }
    ++slot;
  }
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const c10::List<c10::optional<at::Tensor>>& keeps, at::IntArrayRef keep_axes,
                const c10::List<bool>& is_compactor, double lr, double beta1, double beta2, double eps,
                double weight_decay, double penalty, bool masks_active, bool authors_rule) {
  auto items = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, masks_active);
  if (items.empty()) return;
  const at::Device device = items[0].p.device();
  c10::cuda::CUDAGuard guard(device);
  std::map<at::ScalarType, std::vector<const AdamwItem*>> by_dtype;
  for (const auto& it : items) {
    TORCH_CHECK(it.p.device() == device, "wid_adamw_step: all tensors must be on one device (", device, " vs ",
                it.p.device(), ")");
    by_dtype[it.p.scalar_type()].push_back(&it);
  }
  const double decay = weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& entry : by_dtype) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, entry.first, "wid_adamw_step_cuda", [&] {
      adamw_launch_all<scalar_t>(entry.second, lr, beta1, beta2, eps, decay, penalty, masks_active, authors_rule, stream);
    });
  }
}

}  // namespace
}  // namespace wid

TORCH_LIBRARY_IMPL(wid_kernels, CUDA, m) {
  m.impl("masked_layer_norm_fwd", &wid::mln_fwd_cuda);
  m.impl("masked_layer_norm_fwd_out", &wid::mln_fwd_out_cuda);
  m.impl("masked_layer_norm_bwd", &wid::mln_bwd_cuda);
  m.impl("wid_adamw_step", &wid::adamw_cuda);
}
