// Shared declarations of the wid_kernels extension: argument preparation used by both the CPU
// kernels (wid_ops.cpp) and the CUDA kernels (wid_ops_cuda.cu). The math of every op is defined by
// wid_kernels/reference.py; these are faster implementations of it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cstdint>
#include <tuple>
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
struct LayerNormArgs {
  at::Tensor x, residual, gamma, beta, keep;  // undefined when absent
  int64_t rows = 0, cols = 0;
  double inv_count = 1.0;  // 1 / max(#kept, 1), as the reference clamps the count to 1 (host_count only)
};

// host_count=false (device kernels): inv_count stays 1/cols and a kernel given `keep` counts the kept
// channels itself, from the mask bytes it reads anyway (no host sync, no extra launch).
LayerNormArgs prepare_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
                                 const c10::optional<at::Tensor>& keep, bool host_count = true);

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

// Output allocation shared by the CPU and CUDA forward: y in x's dtype, mean/rstd per row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_outputs(const at::Tensor& x);

}  // namespace wid
