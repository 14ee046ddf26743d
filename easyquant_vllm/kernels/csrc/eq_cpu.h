// The native CPU kernel's entry points that other translation units call (eq_cpu_moe.cpp runs its experts on them).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace easyquant {

// y [M, N] = x [M, K] @ W'^T + bias, in x's dtype (bf16/fp16): see eq_cpu.cpp for the layout and the paths.
// row_steps (fp32 [N]) marks format version 3: scales are then uint8 multipliers, zeros sixteenths of a code.
at::Tensor cpu_int4_linear(const at::Tensor& x_in, const at::Tensor& w_q, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& col_scale,
                           const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                           const c10::optional<at::Tensor>& bias, int64_t group_size, at::IntArrayRef plan,
                           const c10::optional<at::Tensor>& row_steps);

// One linear's tensors in the kernel's layout (eq_cpu.cpp) as raw pointers, after checked_weights.
struct LinearWeights {
  int64_t n = 0, k = 0, g = 0, bits = 4;
  const uint32_t* w = nullptr;        // [N/16][K * bits / 32][16] codes
  const uint16_t* s = nullptr;        // [N/16][K/G][16] fp16 steps (format versions 1 and 2), or null
  const uint8_t* a = nullptr;         // [N/16][K/G][16] step multipliers (version 3), or null
  const float* d = nullptr;           // [N] row units (version 3), or null
  const uint8_t* z = nullptr;         // [N/16][K/G][16] zero points, or null
  const float* c = nullptr;           // [K] column scale, or null
  const int32_t* indptr = nullptr;    // [N + 1], from 0 to nnz
  const int32_t* indices = nullptr;   // [nnz]
  const float* values = nullptr;      // [nnz]
  int64_t nnz = 0;

  // Linear e of a stack of linears of this shape (checked_weights with experts >= 1): every tensor offset by e
  // linears, the outliers by their own offset into the concatenated indices / values.
  LinearWeights at(int64_t e, int64_t outlier_offset, int64_t outlier_count) const;
};

// The dense tensors of `experts` >= 1 linears of one shape stacked along a leading dimension (indptr [E, N + 1]),
// or of one linear as cpu_int4_linear takes it (experts = 0, indptr [N + 1]), checked for everything a pointer
// relies on (dtypes, sizes, contiguity), with K from x. Returns linear 0's pointers without its outliers
// (indices/values and the ends of indptr are the caller's to check). `what` prefixes errors.
LinearWeights checked_weights(const std::string& what, int64_t experts, int64_t k, const at::Tensor& w_q,
                              const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                              const c10::optional<at::Tensor>& col_scale, const at::Tensor& indptr,
                              const c10::optional<at::Tensor>& row_steps, int64_t group_size);

// The outliers' value arrays of one linear, or of a stack concatenated: int32 indices and fp32 values, contiguous,
// 1-D, of one length that int32 row pointers can reach. (The row pointers' ends are the caller's to check.)
void check_outlier_arrays(const std::string& what, const at::Tensor& indices, const at::Tensor& values);

// One linear of a batch of independent ones: x [m, K] and y [m, N] in the batch's dtype, rows contiguous.
struct LinearJob {
  LinearWeights w;
  const void* x;
  int64_t m;
  void* y;
};

// Runs every job, each on the path the plan gives its m: the block paths' 16-row blocks of all jobs in one
// parallel region, split over the threads by work (a MoE layer's experts at decode are many small linears, each
// too small to be worth a fork and join of its own).
void cpu_int4_linear_jobs(at::ScalarType dtype, at::IntArrayRef plan, const std::vector<LinearJob>& jobs);

}  // namespace easyquant
