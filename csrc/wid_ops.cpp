// wid_kernels._C: op schemas (defined once, here) and the C++ CPU kernels.
//
// The CPU kernels make the compiled path testable on machines without a GPU and are the fast
// path of CPU training: each op is one pass over its rows/elements, parallel with at::parallel_for,
// computing in fp32 (fp64 for fp64 tensors) whatever the storage dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "wid_ops.h"

namespace wid {

at::Tensor as_bytes(const at::Tensor& keep) {
  if (keep.scalar_type() == at::kBool && keep.is_contiguous()) return keep.view(at::kByte);
  return keep.ne(0).to(at::kByte).contiguous();
}

at::ScalarType layer_norm_out_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& residual) {
  if (!residual.has_value() || !residual->defined()) return x.scalar_type();
  return at::promote_types(x.scalar_type(), residual->scalar_type());
}

LayerNormArgs prepare_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
                                 const c10::optional<at::Tensor>& keep, bool host_count) {
  TORCH_CHECK(x.dim() >= 1, "masked_layer_norm: x must have at least one dimension");
  LayerNormArgs a;
  a.cols = x.size(-1);
  a.rows = a.cols == 0 ? 0 : x.numel() / a.cols;
  a.out_dtype = layer_norm_out_dtype(x, residual);
  a.x = x.contiguous();
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "masked_layer_norm: residual shape ", residual->sizes(),
                " != x shape ", x.sizes());
    TORCH_CHECK(residual->device() == x.device(), "masked_layer_norm: residual on another device");
    const auto xt = x.scalar_type(), rt = residual->scalar_type();
    const bool kernel_pair = xt == rt || (rt == at::kFloat && (xt == at::kBFloat16 || xt == at::kHalf));
    a.residual = residual->to(kernel_pair ? rt : a.out_dtype).contiguous();
    if (!kernel_pair) a.x = x.to(a.out_dtype).contiguous();
  }
  const auto acc = acc_dtype(a.out_dtype);
  auto per_channel = [&](const c10::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->numel() == a.cols, "masked_layer_norm: ", name, " has ", t->numel(), " elements, expected ",
                a.cols);
    TORCH_CHECK(t->device() == x.device(), "masked_layer_norm: ", name, " on another device");
    return t->reshape({a.cols}).to(acc).contiguous();
  };
  a.gamma = per_channel(gamma, "gamma");
  a.beta = per_channel(beta, "beta");
  int64_t kept = a.cols;
  if (keep.has_value() && keep->defined()) {
    TORCH_CHECK(keep->numel() == a.cols, "masked_layer_norm: keep has ", keep->numel(), " elements, expected ",
                a.cols);
    TORCH_CHECK(keep->device() == x.device(), "masked_layer_norm: keep on another device");
    a.keep = as_bytes(*keep).reshape({a.cols});
    if (host_count) kept = a.keep.sum().item<int64_t>();  // a host sync: fine on the CPU
  }
  a.inv_count = 1.0 / static_cast<double>(std::max<int64_t>(kept, 1));
  return a;
}

std::vector<AdamwItem> prepare_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, const c10::List<c10::optional<at::Tensor>>& keeps,
                                     at::IntArrayRef keep_axes, const c10::List<bool>& is_compactor,
                                     bool masks_active) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && keeps.size() == n &&
                  keep_axes.size() == n && is_compactor.size() == n,
              "wid_adamw_step: all lists must have the same length");
  std::vector<AdamwItem> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    for (const at::Tensor* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->sizes() == p.sizes(), "wid_adamw_step: tensor ", i, " state shape ", t->sizes(),
                  " != param shape ", p.sizes());
      TORCH_CHECK(t->scalar_type() == p.scalar_type(), "wid_adamw_step: tensor ", i,
                  " mixes dtypes (the Python wrapper sends those to the reference)");
      TORCH_CHECK(t->device() == p.device(), "wid_adamw_step: tensor ", i, " mixes devices");
      TORCH_CHECK(t->is_contiguous(), "wid_adamw_step: tensor ", i, " is not contiguous");
    }
    TORCH_CHECK(p.is_contiguous(), "wid_adamw_step: param ", i, " is not contiguous");
    TORCH_CHECK(p.dim() <= 2, "wid_adamw_step: param ", i, " has ", p.dim(), " dims (at most 2)");
    if (p.numel() == 0) continue;
    AdamwItem it{p, grads[i], exp_avgs[i], exp_avg_sqs[i]};
    const c10::optional<at::Tensor> keep = keeps.get(i);
    it.cols = p.dim() == 2 ? p.size(1) : p.numel();
    if (keep.has_value() && keep->defined()) {
      const int64_t axis = keep_axes[i];
      TORCH_CHECK(axis == 0 || axis == 1, "wid_adamw_step: keep_axis must be 0 or 1, got ", axis);
      TORCH_CHECK(keep->device() == p.device(), "wid_adamw_step: keep ", i, " on another device");
      it.by_row = p.dim() == 2 && axis == 0;
      const int64_t expected = p.dim() == 2 ? p.size(axis) : p.numel();
      TORCH_CHECK(keep->dim() == 1 && keep->numel() == expected, "wid_adamw_step: keep ", i, " has shape ",
                  keep->sizes(), ", expected [", expected, "]");
      it.keep = as_bytes(*keep);
      it.add_param = !masks_active && is_compactor.get(i);
    }
    items.push_back(std::move(it));
  }
  return items;
}

namespace {

// ---------------------------------------------------------------- masked LayerNorm, CPU

// T: x's element type; R: the residual's, y's and dh's (T, or float for a half-precision x).
template <typename T, typename R>
void mln_forward_rows(const LayerNormArgs& a, double eps, R* y, at::opmath_type<R>* mean_out,
                      at::opmath_type<R>* rstd_out) {
  using acc_t = at::opmath_type<R>;
  const T* x = a.x.data_ptr<T>();
  const R* r = a.residual.defined() ? a.residual.data_ptr<R>() : nullptr;
  const acc_t* gamma = a.gamma.defined() ? a.gamma.data_ptr<acc_t>() : nullptr;
  const acc_t* beta = a.beta.defined() ? a.beta.data_ptr<acc_t>() : nullptr;
  const uint8_t* keep = a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr;
  const int64_t n = a.cols;
  const acc_t inv_count = static_cast<acc_t>(a.inv_count);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(n);  // the row once, in the accumulation dtype: one read of x and residual
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * n;
      acc_t sum = 0;
      if (r) {
        const R* rr = r + row * n;
        for (int64_t j = 0; j < n; ++j) h[j] = static_cast<acc_t>(xr[j]) + static_cast<acc_t>(rr[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) h[j] = static_cast<acc_t>(xr[j]);
      }
      if (keep) {
        for (int64_t j = 0; j < n; ++j) sum += keep[j] ? h[j] : acc_t(0);
      } else {
        for (int64_t j = 0; j < n; ++j) sum += h[j];
      }
      const acc_t mean = sum * inv_count;
      acc_t sq = 0;
      if (keep) {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t c = h[j] - mean;
          sq += keep[j] ? c * c : acc_t(0);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t c = h[j] - mean;
          sq += c * c;
        }
      }
      const acc_t rstd = acc_t(1) / std::sqrt(sq * inv_count + static_cast<acc_t>(eps));
      R* yr = y + row * n;
      for (int64_t j = 0; j < n; ++j) {
        acc_t v = (h[j] - mean) * rstd;
        if (gamma) v *= gamma[j];
        if (beta) v += beta[j];
        yr[j] = static_cast<R>(v);
      }
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mln_fwd_out_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                   const c10::optional<at::Tensor>& gamma,
                                                   const c10::optional<at::Tensor>& beta,
                                                   const c10::optional<at::Tensor>& keep, double eps, at::Tensor& y) {
  LayerNormArgs a = prepare_layer_norm(x, residual, gamma, beta, keep);
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == a.out_dtype && y.is_contiguous(),
              "masked_layer_norm: out must be a contiguous tensor of x's shape and of x's and the residual's "
              "promoted dtype");
  auto stats = x.options().dtype(acc_dtype(a.out_dtype));
  at::Tensor mean = at::empty({a.rows}, stats), rstd = at::empty({a.rows}, stats);
  dispatch_layer_norm(a, [&](auto xp, auto rp) {
    using T = pointee_t<decltype(xp)>;
    using R = pointee_t<decltype(rp)>;
    using acc_t = at::opmath_type<R>;
    mln_forward_rows<T, R>(a, eps, y.data_ptr<R>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_cpu(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& residual,
                                                           const c10::optional<at::Tensor>& gamma,
                                                           const c10::optional<at::Tensor>& beta,
                                                           const c10::optional<at::Tensor>& keep, double eps) {
  at::Tensor y = at::empty(x.sizes(), x.options()
                                          .dtype(layer_norm_out_dtype(x, residual))
                                          .memory_format(at::MemoryFormat::Contiguous));
  auto stats = mln_fwd_out_cpu(x, residual, gamma, beta, keep, eps, y);
  return {y, std::get<0>(stats), std::get<1>(stats)};
}

// dh = rstd·(g − k·(Σg + x̂·Σg·x̂)/c) with g = dy·γ (sums over all channels: pruned outputs depend
// on the statistics too); dγ = Σ_rows dy·x̂, dβ = Σ_rows dy, reduced per chunk of rows without atomics.
template <typename T, typename R>
void mln_backward_rows(const LayerNormArgs& a, const R* dy, const at::opmath_type<R>* mean,
                       const at::opmath_type<R>* rstd, R* dh, at::opmath_type<R>* partial, int64_t n_chunks) {
  using acc_t = at::opmath_type<R>;
  const T* x = a.x.data_ptr<T>();
  const R* r = a.residual.defined() ? a.residual.data_ptr<R>() : nullptr;
  const acc_t* gamma = a.gamma.defined() ? a.gamma.data_ptr<acc_t>() : nullptr;
  const uint8_t* keep = a.keep.defined() ? a.keep.data_ptr<uint8_t>() : nullptr;
  const int64_t n = a.cols, rows = a.rows;
  const acc_t inv_count = static_cast<acc_t>(a.inv_count);
  const int64_t per_chunk = (rows + n_chunks - 1) / n_chunks;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<acc_t> xhat(n), g(n);
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      acc_t* dgamma = partial + chunk * 2 * n;
      acc_t* dbeta = dgamma + n;
      std::fill(dgamma, dgamma + 2 * n, acc_t(0));
      const int64_t row_end = std::min(rows, (chunk + 1) * per_chunk);
      for (int64_t row = chunk * per_chunk; row < row_end; ++row) {
        const T* xr = x + row * n;
        const R* rr = r ? r + row * n : nullptr;
        const R* dyr = dy + row * n;
        const acc_t mu = mean[row], rs = rstd[row];
        acc_t sum_g = 0, sum_gx = 0;
        for (int64_t j = 0; j < n; ++j) {
          acc_t h = static_cast<acc_t>(xr[j]);
          if (rr) h += static_cast<acc_t>(rr[j]);
          const acc_t xh = (h - mu) * rs;
          const acc_t d = static_cast<acc_t>(dyr[j]);
          const acc_t gj = gamma ? d * gamma[j] : d;
          xhat[j] = xh;
          g[j] = gj;
          sum_g += gj;
          sum_gx += gj * xh;
          dgamma[j] += d * xh;
          dbeta[j] += d;
        }
        sum_g *= inv_count;
        sum_gx *= inv_count;
        R* dhr = dh + row * n;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t corr = (keep && !keep[j]) ? acc_t(0) : sum_g + xhat[j] * sum_gx;
          dhr[j] = static_cast<R>(rs * (g[j] - corr));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& residual,
                                                           const c10::optional<at::Tensor>& gamma,
                                                           const c10::optional<at::Tensor>& keep,
                                                           const at::Tensor& mean, const at::Tensor& rstd) {
  LayerNormArgs a = prepare_layer_norm(x, residual, gamma, c10::nullopt, keep);
  TORCH_CHECK(dy.sizes() == x.sizes(), "masked_layer_norm_bwd: dy shape ", dy.sizes(), " != x shape ", x.sizes());
  const auto acc = acc_dtype(a.out_dtype);
  at::Tensor dy_c = dy.to(a.out_dtype).contiguous();
  at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  TORCH_CHECK(mean_c.numel() == a.rows && rstd_c.numel() == a.rows, "masked_layer_norm_bwd: mean/rstd must have one "
              "entry per row");
  at::Tensor dh = at::empty(x.sizes(), x.options().dtype(a.out_dtype).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(a.rows, 4 * at::get_num_threads()));
  at::Tensor partial = at::empty({n_chunks, 2, a.cols}, x.options().dtype(acc));
  dispatch_layer_norm(a, [&](auto xp, auto rp) {
    using T = pointee_t<decltype(xp)>;
    using R = pointee_t<decltype(rp)>;
    using acc_t = at::opmath_type<R>;
    mln_backward_rows<T, R>(a, dy_c.data_ptr<R>(), mean_c.data_ptr<acc_t>(), rstd_c.data_ptr<acc_t>(),
                            dh.data_ptr<R>(), partial.data_ptr<acc_t>(), n_chunks);
  });
  if (a.rows == 0) partial.zero_();
  // two separate reductions: the outputs must not alias (the schema promises fresh tensors)
  return {dh, partial.select(1, 0).sum(0), partial.select(1, 1).sum(0)};
}

// ---------------------------------------------------------------- WID-AdamW, CPU

template <typename T>
void adamw_tensor(const AdamwItem& it, double lr, double beta1, double beta2, double eps, double decay, double pen_lo,
                  double pen_hi, bool masks_active, bool has_extra, bool authors_rule) {
  // fp64 arithmetic for every storage dtype: the step is memory-bound on the CPU, and the update
  // p·decay − lr·m/(√v+eps) often cancels (|result| ≪ |p|), where fp32 without FMA loses digits
  // that the reference's FMA-vectorised ATen kernels keep.
  using acc_t = double;
  T* p = it.p.data_ptr<T>();
  const T* gr = it.g.data_ptr<T>();
  T* m = it.m.data_ptr<T>();
  T* v = it.v.data_ptr<T>();
  const uint8_t* keep = it.keep.defined() ? it.keep.data_ptr<uint8_t>() : nullptr;
  const acc_t b1 = beta1, b2 = beta2, one_b1 = 1.0 - beta1, one_b2 = 1.0 - beta2, lr_ = lr, eps_ = eps,
              decay_ = decay, lo = pen_lo, hi = pen_hi;
  const int64_t cols = it.cols, numel = it.p.numel();
  const bool by_row = it.by_row, add_param = it.add_param;
  // authors' rule: a tensor under the rule (it has a keep mask) gets the pre-step injection, which
  // decays its whole first moment once more; the additive variant adds the injection to AdamW's update
  const bool pre_inject = masks_active && has_extra && authors_rule && keep;
  const bool post_inject = masks_active && has_extra && !authors_rule;
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {  // walk row by row so the keep index needs no division per element
      const int64_t row = i / cols;
      int64_t col = i - row * cols;
      const int64_t stop = std::min(end, (row + 1) * cols);
      const bool row_kept = !keep || !by_row || keep[row];
      for (; i < stop; ++i, ++col) {
        const acc_t pv = static_cast<acc_t>(p[i]), gv = static_cast<acc_t>(gr[i]);
        const bool kept = row_kept && (!keep || by_row || keep[col]);
        acc_t g;
        if (masks_active) {
          g = kept ? gv : lo * pv;  // a select, so an uncomputed (even NaN) pruned gradient cannot leak
        } else {
          g = add_param ? gv + pv : gv;
        }
        acc_t mv = static_cast<acc_t>(m[i]);
        if (pre_inject) mv = b1 * mv + (kept ? 0.0 : one_b1 * (hi * pv));
        mv = b1 * mv + one_b1 * g;
        if (post_inject && !kept) mv += one_b1 * (hi * pv);
        const acc_t vv = b2 * static_cast<acc_t>(v[i]) + one_b2 * g * g;
        const acc_t step = lr_ * (mv / (std::sqrt(vv) + eps_));
        p[i] = static_cast<T>(authors_rule ? (pv - step) * decay_ : pv * decay_ - step);
        m[i] = static_cast<T>(mv);
        v[i] = static_cast<T>(vv);
      }
    }
  });
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const c10::List<c10::optional<at::Tensor>>& keeps, at::IntArrayRef keep_axes,
               const c10::List<bool>& is_compactor, double lr, double beta1, double beta2, double eps,
               double weight_decay, double penalty, bool masks_active, bool authors_rule) {
  auto items = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, masks_active);
  const double decay = weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0;
  for (const auto& it : items) {
    TORCH_CHECK(it.p.device().is_cpu(), "wid_adamw_step (CPU kernel): tensor on ", it.p.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, it.p.scalar_type(), "wid_adamw_step_cpu", [&] {
      adamw_tensor<scalar_t>(it, lr, beta1, beta2, eps, decay, std::min(penalty, 1.0), penalty - 1.0, masks_active,
                             penalty > 1.0, authors_rule);
    });
  }
}

}  // namespace
}  // namespace wid

TORCH_LIBRARY(wid_kernels, m) {
  // y and dh (the gradient of x + residual) have x's and the residual's promoted dtype; mean, rstd, dγ and dβ
  // its accumulation dtype (fp32, fp64 for fp64)
  m.def(
      "masked_layer_norm_fwd(Tensor x, Tensor? residual, Tensor? gamma, Tensor? beta, Tensor? keep, float eps) "
      "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "masked_layer_norm_fwd_out(Tensor x, Tensor? residual, Tensor? gamma, Tensor? beta, Tensor? keep, float eps, "
      "Tensor(a!) y) -> (Tensor mean, Tensor rstd)");
  m.def(
      "masked_layer_norm_bwd(Tensor dy, Tensor x, Tensor? residual, Tensor? gamma, Tensor? keep, Tensor mean, "
      "Tensor rstd) -> (Tensor dh, Tensor dgamma, Tensor dbeta)");
  m.def(
      "wid_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor?[] keeps, int[] keep_axes, bool[] is_compactor, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float penalty, bool masks_active, bool authors_rule=True) -> ()");
}

TORCH_LIBRARY_IMPL(wid_kernels, CPU, m) {
  m.impl("masked_layer_norm_fwd", &wid::mln_fwd_cpu);
  m.impl("masked_layer_norm_fwd_out", &wid::mln_fwd_out_cpu);
  m.impl("masked_layer_norm_bwd", &wid::mln_bwd_cpu);
  m.impl("wid_adamw_step", &wid::adamw_cpu);
}

namespace wid {
// Flush-to-zero and denormals-are-zero in every intra-op CPU thread. torch.set_flush_denormal only
// sets the calling thread, and worker threads copy the flag only when they are created, so a pool
// started earlier keeps computing Adam's tiny second moments as (very slow) denormals.
// Returns how many threads were set (0 where the CPU has no such mode).
int64_t flush_denormals_all_threads() {
#if defined(__x86_64__) || defined(_M_X64)
  const int64_t threads = at::get_num_threads();
  std::vector<int> done(threads, 0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
    for (int64_t i = begin; i < end; ++i) done[i] = 1;
  });
  _mm_setcsr(_mm_getcsr() | 0x8040);
  return std::count(done.begin(), done.end(), 1);
#else
  return 0;
#endif
}
}  // namespace wid

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "wid_kernels compiled ops (registered under torch.ops.wid_kernels)";
  module.def("flush_denormals_all_threads", &wid::flush_denormals_all_threads,
             "set flush-to-zero / denormals-are-zero in every intra-op CPU thread");
#ifdef WID_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
