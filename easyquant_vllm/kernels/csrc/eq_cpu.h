// The native CPU kernel's one entry point that other translation units call (eq_cpu_moe.cpp runs it per expert).
#pragma once

#include <ATen/ATen.h>

namespace easyquant {

// y [M, N] = x [M, K] @ W'^T + bias, in x's dtype (bf16/fp16): see eq_cpu.cpp for the layout and the paths.
// row_steps (fp32 [N]) marks format version 3: scales are then uint8 multipliers, zeros sixteenths of a code.
at::Tensor cpu_int4_linear(const at::Tensor& x_in, const at::Tensor& w_q, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& col_scale,
                           const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                           const c10::optional<at::Tensor>& bias, int64_t group_size, at::IntArrayRef plan,
                           const c10::optional<at::Tensor>& row_steps);

}  // namespace easyquant
