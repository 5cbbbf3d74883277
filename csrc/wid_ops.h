// Shared declarations of the wid_kernels extension: argument preparation used by both the CPU
// kernels (wid_ops.cpp) and the CUDA kernels (wid_ops_cuda.cu). The math of every op is defined by
// wid_kernels/reference.py; these are faster implementations of it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/List.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace wid {

// Accumulation dtype of the statistics: fp64 for fp64 inputs, fp32 otherwise (HF/torch convention).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A mask as contiguous bytes (0/1): a free view for a contiguous bool mask.
at::Tensor as_bytes(const at::Tensor& keep);

// Inputs of masked_layer_norm, made contiguous and viewed as [rows, cols]; γ/β in the accumulation
// dtype (they are tiny, and this lets every storage dtype of γ/β share one kernel); keep as bytes.
// x and the residual share one dtype, or x is bf16/fp16 and the residual fp32: autocast's sublayer output
// added to the fp32 residual stream inside the kernel, without a cast pass. Other pairs are cast to the
// promoted dtype. y and dh have the promoted dtype, `out_dtype` (the residual's, or x's without one).
struct LayerNormArgs {
  at::Tensor x, residual, gamma, beta, keep;  // undefined when absent
  int64_t rows = 0, cols = 0;
  double inv_count = 1.0;  // 1 / max(#kept, 1), as the reference clamps the count to 1 (host_count only)
  at::ScalarType out_dtype = at::kFloat;
};

// The dtype of y and dh: x's and the residual's promoted (the reference's x + residual).
at::ScalarType layer_norm_out_dtype(const at::Tensor& x, const c10::optional<at::Tensor>& residual);

// host_count=false (device kernels): inv_count stays 1/cols and a kernel given `keep` counts the kept
// channels itself, from the mask bytes it reads anyway (no host sync, no extra launch).
LayerNormArgs prepare_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
                                 const c10::optional<at::Tensor>& keep, bool host_count = true);

// Calls f(x's data as const T*, the residual's as const R* or a null one) for the dtype pairs prepare_layer_norm
// leaves: one dtype throughout (R = T), or a bf16/fp16 x with an fp32 residual (R = float). y and dh are R.
template <typename F>
void dispatch_layer_norm(const LayerNormArgs& a, F&& f) {
  const bool wider_residual = a.residual.defined() && a.residual.scalar_type() != a.x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "masked_layer_norm", [&] {
    const scalar_t* x = a.x.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
      if (wider_residual) {
        f(x, static_cast<const float*>(a.residual.data_ptr<float>()));
        return;
      }
    }
    f(x, static_cast<const scalar_t*>(a.residual.defined() ? a.residual.data_ptr<scalar_t>() : nullptr));
  });
}

// The element type behind a pointer the dispatch passes.
template <typename P>
using pointee_t = std::remove_cv_t<std::remove_pointer_t<P>>;

// One tensor of the WID-AdamW step, validated: all four same dtype/shape/device, contiguous, <= 2-D.
struct AdamwItem {
  at::Tensor p, g, m, v, keep;  // keep: uint8 [n] or undefined
  int64_t cols = 1;             // flat index i -> row i / cols, column i % cols
  bool by_row = false;          // keep indexed by row (keep_axis 0 of a 2-D tensor) else by column
  bool add_param = false;       // masks not yet active and a masked compactor: g = grad + p
};

std::vector<AdamwItem> prepare_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, const c10::List<c10::optional<at::Tensor>>& keeps,
                                     at::IntArrayRef keep_axes, const c10::List<bool>& is_compactor, bool masks_active);

}  // namespace wid
