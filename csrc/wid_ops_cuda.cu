// wid_kernels._C: the CUDA kernels (one translation unit: each takes 1-1.5 min to compile on 2 cores).
//
// Both ops are memory-bound, so each kernel makes one pass over DRAM with 16-byte vector loads
// where the row length and the addresses allow it, computing in fp32 (fp64 for fp64 tensors).
// Headers: c10/cuda only (ATen/cuda/CUDAContext.h would pull in cusparse.h, absent from some toolkits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

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

// Sum over one row's threads: a block holds blockDim.y rows of blockDim.x threads each (a multiple of
// 32, so every warp belongs to one row); every thread of the row gets the total. Block-uniform control
// flow is required (it synchronises the block). `scratch`: one value per warp of the block (<= 16).
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (n_warps == 1) return v;
  A* mine = scratch + threadIdx.y * n_warps;
  __syncthreads();  // a previous call's readers are done with scratch
  if (lane == 0) mine[warp] = v;
  __syncthreads();
  return warp_sum(lane < n_warps ? mine[lane] : A(0));  // every warp of the row reduces the same partials
}

// 16-byte vectors of R (the residual's and the outputs' type) when the row length and every base address allow it,
// else scalar accesses. x (T, at most as wide as R: bf16 beside an fp32 residual) is read in vectors of as many
// elements, so its base must be aligned to their size.
template <typename T, typename R>
int vector_width(int64_t cols, const T* x, std::initializer_list<const R*> wide) {
  constexpr int kMax = 16 / sizeof(R);
  if (cols % kMax != 0 || reinterpret_cast<uintptr_t>(x) % (sizeof(T) * kMax) != 0) return 1;
  for (const R* p : wide)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kMax;
}

constexpr int kRowBlockMax = 512;  // threads of a row block: one row of up to 512, or rows sharing 256
// Resident blocks of kRowBlockMax threads the LayerNorm kernels are compiled for: 2 (half of the SM's 2048 threads,
// 64 registers each). At 4 (32 registers) the 16-byte-vector variants spilled 72-152 bytes per thread to local memory;
// 1024 threads with four 16-byte loads each in flight are still far more than the bandwidth needs (the compile
// report's test: no kernel spills).
constexpr int kRowBlocksPerSm = 2;

int threads_for(int64_t cols, int vec) {
  const int64_t lanes = (cols + vec - 1) / vec;
  const int64_t rounded = (lanes + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(std::min<int64_t>(kRowBlockMax, std::max<int64_t>(kWarp, rounded)));
}

// Rows per block: a row gets the threads its vectors need (whole warps, at most 512); narrow rows share
// a block up to 256 threads, so BERT widths (96 threads for 768 bf16 columns) do not run as 1-3-warp blocks,
// which would cap occupancy at the 32-blocks-per-SM limit.
dim3 row_block(int64_t cols, int vec) {
  const int per_row = threads_for(cols, vec);
  return dim3(per_row, std::max(1, 256 / per_row));
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// ---------------------------------------------------------------- masked LayerNorm forward
// blockDim.y rows per block, blockDim.x threads per row. The row is read three times (sum, centred
// squares, output) but only the first read comes from DRAM: a row is a few KB and stays in L1/L2. With a
// mask, the kept count comes from the mask bytes the first pass reads anyway. T: x's type; R: the residual's
// and y's (T, or float beside a bf16/fp16 x: autocast's sublayer output added to the fp32 stream).

template <typename T, typename R, typename A, int V>
__global__ void __launch_bounds__(kRowBlockMax, kRowBlocksPerSm)
    mln_fwd_kernel(const T* __restrict__ x, const R* __restrict__ r, const A* __restrict__ gamma,
                               const A* __restrict__ beta, const uint8_t* __restrict__ keep, A inv_cols, A eps,
                               R* __restrict__ y, A* __restrict__ mean_out, A* __restrict__ rstd_out, int64_t rows,
                               int64_t cols) {
  __shared__ A scratch[kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t span = row < rows ? cols : 0;  // a missing last row still joins the block's reductions
  const T* xr = x + row * cols;
  const R* rr = r ? r + row * cols : nullptr;
  R* yr = y + row * cols;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;

  A sum = 0, kept = 0;
  for (int64_t c = threadIdx.x * V; c < span; c += stride) {
    T xv[V];
    R rv[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<R, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A h = static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0));
      const bool on = !keep || keep[c + k];
      sum += on ? h : A(0);
      kept += on ? A(1) : A(0);
    }
  }
  // 1 / max(#kept, 1), as the reference clamps the count
  const A inv_count = keep ? A(1) / max(row_sum(kept, scratch), A(1)) : inv_cols;
  const A mean = row_sum(sum, scratch) * inv_count;

  A sq = 0;
  for (int64_t c = threadIdx.x * V; c < span; c += stride) {
    T xv[V];
    R rv[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<R, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A d = static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mean;
      if (!keep || keep[c + k]) sq += d * d;
    }
  }
  const A rstd = A(1) / sqrt(row_sum(sq, scratch) * inv_count + eps);

  for (int64_t c = threadIdx.x * V; c < span; c += stride) {
    T xv[V];
    R rv[V], out[V];
    load_pack<T, V>(xr, c, xv);
    if (rr) load_pack<R, V>(rr, c, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A v = (static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mean) * rstd;
      if (gamma) v *= gamma[c + k];
      if (beta) v += beta[c + k];
      out[k] = static_cast<R>(v);
    }
    store_pack<R, V>(yr, c, out);
  }
  if (threadIdx.x == 0 && row < rows) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------- masked LayerNorm backward
// Persistent blocks of blockDim.y row slots; slot s of block b is "virtual block" b·blockDim.y + s and owns
// row partial[that]. dh = rstd·(g − k·(Σg + x̂·Σg·x̂)/c), g = dy·γ. Each thread owns the same columns in
// every row, so its dγ/dβ partials accumulate without atomics or barriers: in shared memory when the
// slots' 2·cols fit, else in the slot's row of the global partial buffer (reduced by torch). All slots
// of a block step through rows together (block-uniform trip count: the reductions synchronise). dy and dh have
// the residual's type R, x its own, T (as in the forward).

template <typename T, typename R, typename A, int V>
__global__ void __launch_bounds__(kRowBlockMax, kRowBlocksPerSm)
    mln_bwd_kernel(const R* __restrict__ dy, const T* __restrict__ x, const R* __restrict__ r,
                               const A* __restrict__ gamma, const uint8_t* __restrict__ keep, A inv_cols,
                               const A* __restrict__ mean, const A* __restrict__ rstd, R* __restrict__ dh,
                               A* __restrict__ partial, int64_t rows, int64_t cols, bool shared_acc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ A scratch[kWarp];
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  A* part = partial + slot * 2 * cols;
  A* acc = shared_acc ? reinterpret_cast<A*>(smem_raw) + static_cast<int64_t>(threadIdx.y) * 2 * cols : part;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
  for (int64_t c = threadIdx.x * V; c < cols; c += stride)
#pragma unroll
    for (int k = 0; k < V; ++k) acc[c + k] = acc[cols + c + k] = A(0);

  A inv_count = inv_cols;
  if (keep) {  // the same for every row: count once per launch
    A kept = 0;
    for (int64_t c = threadIdx.x * V; c < cols; c += stride)
#pragma unroll
      for (int k = 0; k < V; ++k) kept += keep[c + k] ? A(1) : A(0);
    inv_count = A(1) / max(row_sum(kept, scratch), A(1));
  }

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += rows_per_step) {
    const int64_t row = base + threadIdx.y;
    const int64_t span = row < rows ? cols : 0;
    const T* xr = x + row * cols;
    const R* rr = r ? r + row * cols : nullptr;
    const R* dyr = dy + row * cols;
    const A mu = span ? mean[row] : A(0), rs = span ? rstd[row] : A(0);
    A sum_g = 0, sum_gx = 0;
    for (int64_t c = threadIdx.x * V; c < span; c += stride) {
      T xv[V];
      R rv[V], dv[V];
      load_pack<T, V>(xr, c, xv);
      load_pack<R, V>(dyr, c, dv);
      if (rr) load_pack<R, V>(rr, c, rv);
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
    sum_g = row_sum(sum_g, scratch) * inv_count;
    sum_gx = row_sum(sum_gx, scratch) * inv_count;
    R* dhr = dh + row * cols;
    for (int64_t c = threadIdx.x * V; c < span; c += stride) {
      T xv[V];
      R rv[V], dv[V], out[V];
      load_pack<T, V>(xr, c, xv);
      load_pack<R, V>(dyr, c, dv);
      if (rr) load_pack<R, V>(rr, c, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xh = (static_cast<A>(xv[k]) + (rr ? static_cast<A>(rv[k]) : A(0)) - mu) * rs;
        const A d = static_cast<A>(dv[k]);
        const A g = gamma ? d * gamma[c + k] : d;
        const A corr = (keep && !keep[c + k]) ? A(0) : sum_g + xh * sum_gx;
        out[k] = static_cast<R>(rs * (g - corr));
      }
      store_pack<R, V>(dhr, c, out);
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
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == a.out_dtype && y.is_contiguous() &&
                  y.device() == x.device(),
              "masked_layer_norm: out must be a contiguous tensor of x's shape and device, in x's and the residual's "
              "promoted dtype");
  auto stats = x.options().dtype(acc_dtype(a.out_dtype));
  at::Tensor mean = at::empty({a.rows}, stats), rstd = at::empty({a.rows}, stats);
  if (a.rows == 0) return {mean, rstd};
  TORCH_CHECK(a.rows <= INT32_MAX, "masked_layer_norm: too many rows for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_layer_norm(a, [&](auto xp, auto rp) {
    using T = pointee_t<decltype(xp)>;
    using R = pointee_t<decltype(rp)>;
    using A = at::opmath_type<R>;
    R* yp = y.data_ptr<R>();
    const int vec = vector_width<T, R>(a.cols, xp, {rp, yp});
    with_vector_width<16 / sizeof(R)>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const dim3 block = row_block(a.cols, V);
      const int64_t blocks = (a.rows + block.y - 1) / block.y;
      mln_fwd_kernel<T, R, A, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          xp, rp, a.gamma.defined() ? a.gamma.data_ptr<A>() : nullptr,
          a.beta.defined() ? a.beta.data_ptr<A>() : nullptr, a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr,
          static_cast<A>(a.inv_count), static_cast<A>(eps), yp, mean.data_ptr<A>(), rstd.data_ptr<A>(), a.rows, a.cols);
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
  at::Tensor y = at::empty(x.sizes(), x.options()
                                          .dtype(layer_norm_out_dtype(x, residual))
                                          .memory_format(at::MemoryFormat::Contiguous));
  auto stats = mln_fwd_out_cuda(x, residual, gamma, beta, keep, eps, y);
  return {y, std::get<0>(stats), std::get<1>(stats)};
}

// Resident blocks per SM of one backward instantiation at one block shape: a host query, asked once per
// (device, kernel, shape) rather than on every call.
int resident_blocks(const void* kernel, int device, int threads, size_t shared_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, threads, shared_bytes);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared_bytes));
  return cache[key] = std::max(per_sm, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& residual,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            const c10::optional<at::Tensor>& keep,
                                                            const at::Tensor& mean, const at::Tensor& rstd) {
  c10::cuda::CUDAGuard guard(x.device());
  LayerNormArgs a = prepare_layer_norm(x, residual, gamma, c10::nullopt, keep, /*host_count=*/false);
  TORCH_CHECK(dy.sizes() == x.sizes(), "masked_layer_norm_bwd: dy shape ", dy.sizes(), " != x shape ", x.sizes());
  for (const at::Tensor* t : {&dy, &mean, &rstd})
    TORCH_CHECK(t->device() == x.device(), "masked_layer_norm_bwd: dy, mean and rstd must be on x's device (",
                x.device(), "), got one on ", t->device());
  const auto acc = acc_dtype(a.out_dtype);
  at::Tensor dy_c = dy.to(a.out_dtype).contiguous();
  at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  TORCH_CHECK(mean_c.numel() == a.rows && rstd_c.numel() == a.rows,
              "masked_layer_norm_bwd: mean/rstd must have one entry per row");
  at::Tensor dh = at::empty(x.sizes(), x.options().dtype(a.out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (a.rows == 0 || a.cols == 0) {
    at::Tensor zeros = at::zeros({a.cols}, x.options().dtype(acc));
    return {dh, zeros, zeros.clone()};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  dispatch_layer_norm(a, [&](auto xp, auto rp) {
    using T = pointee_t<decltype(xp)>;
    using R = pointee_t<decltype(rp)>;
    using A = at::opmath_type<R>;
    const R* dyp = dy_c.data_ptr<R>();
    R* dhp = dh.data_ptr<R>();
    const int vec = vector_width<T, R>(a.cols, xp, {rp, dyp, dhp});
    with_vector_width<16 / sizeof(R)>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      const dim3 block = row_block(a.cols, V);
      const size_t acc_bytes = 2 * static_cast<size_t>(a.cols) * block.y * sizeof(A);
      const bool shared_acc = acc_bytes <= 32 * 1024;
      // as many persistent blocks as can be resident at once (registers, shared memory), no more than
      // the rows need: each extra block costs a row of partials
      const int device = x.get_device();
      const int per_sm = resident_blocks(reinterpret_cast<const void*>(&mln_bwd_kernel<T, R, A, V>), device,
                                         static_cast<int>(block.x * block.y), shared_acc ? acc_bytes : 0);
      // ... and at least ~16 rows per slot once the GPU is full, so the partials stay small next to dy and x
      const int sms = sm_count(device);
      const int64_t needed = (a.rows + block.y - 1) / block.y;
      const int64_t worth = std::max<int64_t>(sms, (a.rows + 16 * block.y - 1) / (16 * block.y));
      const int blocks = static_cast<int>(std::min<int64_t>({needed, worth, static_cast<int64_t>(per_sm) * sms}));
      partial = at::empty({static_cast<int64_t>(blocks) * block.y, 2, a.cols}, x.options().dtype(acc));
      mln_bwd_kernel<T, R, A, V><<<blocks, block, shared_acc ? acc_bytes : 0, stream>>>(
          dyp, xp, rp, a.gamma.defined() ? a.gamma.data_ptr<A>() : nullptr,
          a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr, static_cast<A>(a.inv_count), mean_c.data_ptr<A>(),
          rstd_c.data_ptr<A>(), dhp, partial.data_ptr<A>(), a.rows, a.cols, shared_acc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // two separate reductions: the outputs must not alias (the schema promises fresh tensors)
  return {dh, partial.select(1, 0).sum(0), partial.select(1, 1).sum(0)};
}

// ---------------------------------------------------------------- WID-AdamW, multi-tensor
// One launch per dtype and alignment class covers every tensor: a table of per-tensor descriptors and the
// prefix sums of their chunk counts lives on the device (uploaded once per set of addresses, asynchronously
// from pinned memory: no host sync, no per-launch tensor limit). Block b finds its tensor by binary search.

constexpr int64_t kChunk = 65536;
// 256 threads, 3 resident blocks (85 registers each): the bf16/fp16 16-byte-vector step needs 78; at 512 threads and
// 4 blocks (32 registers) it spilled 200 bytes per thread, at 2 blocks (64) still 32. 768 threads per SM with four
// 16-byte loads each in flight keep the memory busy (the compile report's test: no kernel spills).
constexpr int kAdamThreads = 256;
constexpr int kAdamBlocksPerSm = 3;
enum : int64_t { kHasKeep = 1, kByRow = 2, kAddParam = 4 };

// One tensor's descriptor: int64 words, so that the whole table is one int64 tensor.
struct AdamwTensor {
  int64_t p, g, m, v, keep;  // addresses
  int64_t numel, cols, flags;
};
constexpr int kWords = sizeof(AdamwTensor) / sizeof(int64_t);

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kAdamThreads, kAdamBlocksPerSm)
    adamw_kernel(const AdamwTensor* __restrict__ tensors, const int64_t* __restrict__ chunk_start, int n_tensors,
                 A lr, A beta1, A beta2, A eps, A decay, A pen_lo, A pen_hi, bool masks_active, bool has_extra,
                 bool authors_rule) {
  __shared__ AdamwTensor d;
  __shared__ int64_t first_chunk;
  if (threadIdx.x == 0) {  // the last tensor whose first chunk is <= this block
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (chunk_start[mid] <= static_cast<int64_t>(blockIdx.x)) lo = mid; else hi = mid - 1;
    }
    d = tensors[lo];
    first_chunk = chunk_start[lo];
  }
  __syncthreads();
  const int64_t start = (static_cast<int64_t>(blockIdx.x) - first_chunk) * kChunk;
  const int64_t end = d.numel < start + kChunk ? d.numel : start + kChunk;
  T* __restrict__ p = reinterpret_cast<T*>(d.p);
  const T* __restrict__ gr = reinterpret_cast<const T*>(d.g);
  T* __restrict__ m = reinterpret_cast<T*>(d.m);
  T* __restrict__ v = reinterpret_cast<T*>(d.v);
  const uint8_t* __restrict__ keep = (d.flags & kHasKeep) ? reinterpret_cast<const uint8_t*>(d.keep) : nullptr;
  const bool by_row = d.flags & kByRow, add_param = d.flags & kAddParam;
  const int64_t cols = d.cols;
  const A one_b1 = A(1) - beta1, one_b2 = A(1) - beta2;
  // authors' rule: tensors under the rule get the pre-step injection (their whole first moment decays
  // once more); the additive variant adds the injection to AdamW's own update
  const bool pre_inject = masks_active && has_extra && authors_rule && keep;
  const bool post_inject = masks_active && has_extra && !authors_rule;

  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < end;
       i += static_cast<int64_t>(blockDim.x) * V) {
    T pv[V], gv[V], mv[V], vv[V];
    const bool full = i + V <= end;  // V > 1 only for tensors whose addresses are 16-byte aligned
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
    int64_t row = 0, col = 0;
    if (keep) {  // one division per vector, only where a mask needs the position
      row = i / cols;
      col = i - row * cols;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      // lanes past the end (a vector tail) read no mask byte: keep[rows] would be past the mask
      const bool kept = !keep || (i + k < end && (by_row ? keep[row] : keep[col]) != 0);
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

bool all_aligned(const AdamwItem& it) {
  for (const at::Tensor* t : {&it.p, &it.g, &it.m, &it.v})
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Device copies of descriptor tables, found by content (and device): in steady training the tensors keep their
// addresses, so a step uploads nothing. The upload is asynchronous on the stream of the step that made it; a step on
// another stream waits for it (an event) and the table is recorded as in use there, so the allocator reuses its block
// only after that stream's kernels. A CUDA graph captures on a stream of its own (torch.cuda.graph), after
// synchronising the device: there the upload has completed, the table is taken as it is and stays for the life of the
// process (every replay reads it); the other tables are evicted least recently used first. `get` returns the table
// itself (a reference), so another thread's eviction cannot free it before this step's launch.
class DescriptorTables {
 public:
  at::Tensor get(const std::vector<int64_t>& words, at::Device device, c10::cuda::CUDAStream stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool in_capture = capturing(stream.stream());
    ++clock_;
    for (Entry& e : entries_) {
      if (e.device != device || e.words != words) continue;
      e.last_use = clock_;
      e.kept_for_graph = e.kept_for_graph || in_capture;
      const bool known = std::find(e.streams.begin(), e.streams.end(), stream.stream()) != e.streams.end();
      if (!known && !in_capture) {
        e.uploaded.block(stream);
        c10::cuda::CUDACachingAllocator::recordStream(e.table.storage().data_ptr(), stream);
        e.streams.push_back(stream.stream());
      }
      return e.table;
    }
    TORCH_CHECK(!in_capture,
                "wid_adamw_step (CUDA): these tensors were not stepped before the CUDA graph capture; run one "
                "optimizer step eagerly first (the usual warm-up), then capture");
    at::Tensor host = at::empty({static_cast<int64_t>(words.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
    evict_one_if_full();
    entries_.emplace_back();
    Entry& e = entries_.back();
    e.words = words;
    // the caching host allocator records the copy's stream: the pinned buffer is not reused too early
    e.table = host.to(device, /*non_blocking=*/true);
    e.uploaded.record(stream);
    e.device = device;
    e.streams.push_back(stream.stream());
    e.last_use = clock_;
    return e.table;
  }

 private:
  struct Entry {
    std::vector<int64_t> words;
    at::Tensor table;  // freed stream-ordered on every stream that used it (recordStream)
    at::cuda::CUDAEvent uploaded;
    at::Device device = at::Device(at::kCUDA);
    std::vector<cudaStream_t> streams;  // streams ordered after the upload
    uint64_t last_use = 0;
    bool kept_for_graph = false;
  };
  static constexpr size_t kEvictable = 16;

  void evict_one_if_full() {
    size_t evictable = 0;
    auto oldest = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->kept_for_graph) continue;
      ++evictable;
      if (oldest == entries_.end() || it->last_use < oldest->last_use) oldest = it;
    }
    if (evictable >= kEvictable) entries_.erase(oldest);
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  uint64_t clock_ = 0;
};

DescriptorTables& descriptor_tables() {
  static DescriptorTables* tables = new DescriptorTables();  // never destroyed: no CUDA calls at exit
  return *tables;
}

// One launch for `items` (one dtype; vector width V: all 16-byte aligned, or 1).
template <typename T, int V>
void adamw_launch(const std::vector<const AdamwItem*>& items, double lr, double beta1, double beta2, double eps,
                  double decay, double penalty, bool masks_active, bool authors_rule, c10::cuda::CUDAStream stream) {
  using A = at::opmath_type<T>;
  const int64_t n = static_cast<int64_t>(items.size());
  TORCH_CHECK(n < INT32_MAX, "wid_adamw_step: too many tensors");
  std::vector<int64_t> words(n * kWords + n);
  auto* desc = reinterpret_cast<AdamwTensor*>(words.data());
  int64_t* chunk_start = words.data() + n * kWords;
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const AdamwItem& it = *items[i];
    desc[i] = AdamwTensor{reinterpret_cast<int64_t>(it.p.data_ptr()), reinterpret_cast<int64_t>(it.g.data_ptr()),
                          reinterpret_cast<int64_t>(it.m.data_ptr()), reinterpret_cast<int64_t>(it.v.data_ptr()),
                          it.keep.defined() ? reinterpret_cast<int64_t>(it.keep.data_ptr()) : 0,
                          it.p.numel(), std::max<int64_t>(it.cols, 1),
                          (it.keep.defined() ? kHasKeep : 0) | (it.by_row ? kByRow : 0) | (it.add_param ? kAddParam : 0)};
    chunk_start[i] = chunks;
    chunks += (it.p.numel() + kChunk - 1) / kChunk;
  }
  TORCH_CHECK(chunks <= INT32_MAX, "wid_adamw_step: too many elements for one launch");
  const at::Tensor table_tensor = descriptor_tables().get(words, items[0]->p.device(), stream);
  const int64_t* table = table_tensor.data_ptr<int64_t>();
  adamw_kernel<T, A, V><<<static_cast<unsigned>(chunks), kAdamThreads, 0, stream>>>(
      reinterpret_cast<const AdamwTensor*>(table), table + n * kWords, static_cast<int>(n), static_cast<A>(lr),
      static_cast<A>(beta1), static_cast<A>(beta2), static_cast<A>(eps), static_cast<A>(decay),
      static_cast<A>(std::min(penalty, 1.0)), static_cast<A>(penalty - 1.0), masks_active, penalty > 1.0, authors_rule);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// At most two launches per dtype: the 16-byte-aligned tensors with vector accesses, the rest scalar.
template <typename T>
void adamw_launch_all(const std::vector<const AdamwItem*>& items, double lr, double beta1, double beta2, double eps,
                      double decay, double penalty, bool masks_active, bool authors_rule, c10::cuda::CUDAStream stream) {
  std::vector<const AdamwItem*> vectorised, scalar;
  for (const AdamwItem* it : items) (all_aligned(*it) ? vectorised : scalar).push_back(it);
  if (!vectorised.empty())
    adamw_launch<T, 16 / sizeof(T)>(vectorised, lr, beta1, beta2, eps, decay, penalty, masks_active, authors_rule, stream);
  if (!scalar.empty())
    adamw_launch<T, 1>(scalar, lr, beta1, beta2, eps, decay, penalty, masks_active, authors_rule, stream);
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
