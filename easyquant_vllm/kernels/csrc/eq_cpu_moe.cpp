// EasyQuant mixture-of-experts layer for x86 CPUs: routing already done, every expert's int4 GEMMs in one op call.
//
//   easyquant::cpu_int4_moe(x [M, H], topk_ids [M, k], topk_weights [M, k], <w13 of every expert>, <w2 ...>,
//                            G, plan, w13_row_steps?, w2_row_steps?) -> y [M, H] in x's dtype,
//   y[t] = sum_j p[t, j] * W2'_e (silu(Wg'_e x[t]) * (Wu'_e x[t])),   e = topk_ids[t, j], p = topk_weights
//
// Each projection arrives as the experts' tensors stacked along a leading expert dimension, in the native
// kernel's layout (eq_cpu.cpp), with the outliers of all experts concatenated:
//
//   w_q       int32 [E, N/16, K/8 * 16]     scales fp16 [E, N/16, K/G * 16]    zeros uint8 [E, N/16, K/G * 16]?
//   col_scale fp32  [E, K]?                 indptr int32 [E, N + 1] (each expert's from 0)
//   indices   int32 [nnz_total]             values fp32 [nnz_total]             offsets int64 [E + 1] (CPU)
//   row_steps fp32  [E, N]?                 format version 3: scales are then uint8 multipliers of these units
//                                           and zeros are in sixteenths of a code (eq_cpu.cpp)
//
// with w13 = [gate; up] ([2I, H], one column scale: docs/format.md) and w2 = down ([H, I]).
//
// Why one op: vLLM traces the MoE layer's Python into its compiled graph on CPU (fullgraph, no guards), so
// everything that depends on the routing (which experts run, how many tokens each gets) must happen out of
// the tracer's sight. Here the tokens are grouped by expert with a counting sort, and only the experts that
// received tokens are read: at decode that is top-k of E experts, which is where int4 pays (each token
// streams k experts' codes, not all E). Each expert runs the same cpu_int4_linear as a dense layer (its path
// chosen by that expert's token count from the plan), so every ISA path serves experts too. The weighted sum
// is accumulated in fp32 and rounded to x's dtype once.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "eq_cpu.h"

namespace {

// One projection (w13 or w2) of every expert, stacked; run(e, x) is expert e's linear.
struct Projection {
  const char* name;
  const at::Tensor& w_q;
  const at::Tensor& scales;
  const c10::optional<at::Tensor>& zeros;
  const c10::optional<at::Tensor>& col_scale;
  const c10::optional<at::Tensor>& row_steps;
  const at::Tensor& indptr;
  const at::Tensor& indices;
  const at::Tensor& values;
  const int64_t* offsets;  // [E + 1]: expert e's outliers are entries offsets[e] .. offsets[e + 1] - 1

  at::Tensor run(int64_t e, const at::Tensor& x, int64_t group_size, at::IntArrayRef plan) const {
    const int64_t o0 = offsets[e], nnz = offsets[e + 1] - offsets[e];
    c10::optional<at::Tensor> z, c, d;
    if (zeros) z = zeros->select(0, e);
    if (col_scale) c = col_scale->select(0, e);
    if (row_steps) d = row_steps->select(0, e);
    // cpu_int4_linear checks each expert's shapes and CSR ends against x: a malformed slice raises there.
    return easyquant::cpu_int4_linear(x, w_q.select(0, e), scales.select(0, e), z, c, indptr.select(0, e),
                                      indices.narrow(0, o0, nnz), values.narrow(0, o0, nnz), c10::nullopt,
                                      group_size, plan, d);
  }
};

// The O(E) invariants of a stacked projection: E experts everywhere, offsets from 0 to nnz, never decreasing.
void check_projection(const Projection& p, int64_t experts, const at::Tensor& offsets_t) {
  TORCH_CHECK(p.w_q.dim() == 3 && p.scales.dim() == 3 && p.indptr.dim() == 2 && p.w_q.size(0) == experts &&
                  p.scales.size(0) == experts && p.indptr.size(0) == experts,
              "easyquant::cpu_int4_moe: ", p.name, " must stack ", experts, " experts along dim 0 (w_q, scales 3-D, ",
              "indptr 2-D), got w_q ", p.w_q.sizes(), ", scales ", p.scales.sizes(), ", indptr ", p.indptr.sizes());
  TORCH_CHECK(!p.zeros || (p.zeros->dim() == 3 && p.zeros->size(0) == experts), "easyquant::cpu_int4_moe: ", p.name,
              " zeros must be [E, N/16, K/G * 16]");
  TORCH_CHECK(!p.col_scale || (p.col_scale->dim() == 2 && p.col_scale->size(0) == experts),
              "easyquant::cpu_int4_moe: ", p.name, " col_scale must be [E, K]");
  TORCH_CHECK(!p.row_steps || (p.row_steps->dim() == 2 && p.row_steps->size(0) == experts),
              "easyquant::cpu_int4_moe: ", p.name, " row_steps must be [E = ", experts, ", N], got ",
              p.row_steps ? p.row_steps->sizes() : at::IntArrayRef{});
  TORCH_CHECK(offsets_t.scalar_type() == at::kLong && offsets_t.dim() == 1 && offsets_t.numel() == experts + 1 &&
                  offsets_t.is_contiguous() && offsets_t.device().is_cpu(),
              "easyquant::cpu_int4_moe: ", p.name, " offsets must be a contiguous int64 CPU tensor [E + 1 = ",
              experts + 1, "], got ", offsets_t.scalar_type(), " ", offsets_t.sizes());
  TORCH_CHECK(p.indices.dim() == 1 && p.values.dim() == 1 && p.indices.numel() == p.values.numel(),
              "easyquant::cpu_int4_moe: ", p.name, " indices/values must be 1-D of one length");
  TORCH_CHECK(p.offsets[0] == 0 && p.offsets[experts] == p.indices.numel(), "easyquant::cpu_int4_moe: ", p.name,
              " offsets must run from 0 to nnz = ", p.indices.numel(), ", got ", p.offsets[0], " .. ",
              p.offsets[experts]);
  for (int64_t e = 0; e < experts; ++e)
    TORCH_CHECK(p.offsets[e] <= p.offsets[e + 1], "easyquant::cpu_int4_moe: ", p.name, " offsets decrease at expert ",
                e);
}

at::Tensor cpu_int4_moe(const at::Tensor& x_in, const at::Tensor& topk_ids_in, const at::Tensor& topk_weights_in,
                        const at::Tensor& w13_q, const at::Tensor& w13_s, const c10::optional<at::Tensor>& w13_z,
                        const c10::optional<at::Tensor>& w13_c, const at::Tensor& w13_indptr,
                        const at::Tensor& w13_indices, const at::Tensor& w13_values, const at::Tensor& w13_offsets,
                        const at::Tensor& w2_q, const at::Tensor& w2_s, const c10::optional<at::Tensor>& w2_z,
                        const c10::optional<at::Tensor>& w2_c, const at::Tensor& w2_indptr,
                        const at::Tensor& w2_indices, const at::Tensor& w2_values, const at::Tensor& w2_offsets,
                        int64_t group_size, at::IntArrayRef plan, const c10::optional<at::Tensor>& w13_row_steps,
                        const c10::optional<at::Tensor>& w2_row_steps) {
  TORCH_CHECK(x_in.dim() == 2, "easyquant::cpu_int4_moe: x must be [M, H], got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  TORCH_CHECK(topk_ids_in.dim() == 2 && topk_ids_in.size(0) == m && topk_weights_in.sizes() == topk_ids_in.sizes(),
              "easyquant::cpu_int4_moe: topk_ids and topk_weights must both be [M = ", m, ", k], got ",
              topk_ids_in.sizes(), " and ", topk_weights_in.sizes());
  TORCH_CHECK(at::isIntegralType(topk_ids_in.scalar_type(), /*includeBool=*/false),
              "easyquant::cpu_int4_moe: topk_ids must be integers, got ", topk_ids_in.scalar_type());
  const int64_t experts = w13_q.dim() == 3 ? w13_q.size(0) : -1;
  TORCH_CHECK(w13_offsets.scalar_type() == at::kLong && w2_offsets.scalar_type() == at::kLong &&
                  w13_offsets.numel() == experts + 1 && w2_offsets.numel() == experts + 1,
              "easyquant::cpu_int4_moe: offsets must be int64 [E + 1]");
  const Projection w13{"w13", w13_q, w13_s, w13_z, w13_c, w13_row_steps, w13_indptr, w13_indices, w13_values,
                       w13_offsets.data_ptr<int64_t>()};
  const Projection w2{"w2", w2_q, w2_s, w2_z, w2_c, w2_row_steps, w2_indptr, w2_indices, w2_values,
                      w2_offsets.data_ptr<int64_t>()};
  check_projection(w13, experts, w13_offsets);
  check_projection(w2, experts, w2_offsets);

  const at::Tensor ids = topk_ids_in.to(at::kLong).contiguous();
  const at::Tensor weights = topk_weights_in.to(at::kFloat).contiguous();
  const int64_t slots = ids.numel(), k = ids.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();

  // Counting sort of the (token, slot) pairs by expert; token order is kept within an expert.
  std::vector<int64_t> start(experts + 1, 0);
  for (int64_t i = 0; i < slots; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < experts, "easyquant::cpu_int4_moe: topk_ids holds expert ", id[i],
                " (token ", i / k, "); this layer has ", experts, " experts");
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), order(slots);
  for (int64_t i = 0; i < slots; ++i) order[fill[id[i]]++] = i;

  at::Tensor y = at::zeros({m, x.size(1)}, x.options().dtype(at::kFloat));
  const float* w = weights.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t count = start[e + 1] - start[e];
    if (count == 0) continue;  // an expert no token chose: its codes are never read
    at::Tensor rows = at::empty({count}, at::kLong);
    at::Tensor gain = at::empty({count, 1}, at::kFloat);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t slot = order[start[e] + j];
      rows.data_ptr<int64_t>()[j] = slot / k;
      gain.data_ptr<float>()[j] = w[slot];
    }
    const at::Tensor h = w13.run(e, x.index_select(0, rows), group_size, plan);  // [count, 2I]
    const int64_t inter = h.size(1) / 2;
    // SiLU-gated, in x's dtype as the reference model computes it (each op rounds once).
    const at::Tensor act = at::silu(h.narrow(1, 0, inter)) * h.narrow(1, inter, inter);
    const at::Tensor out = w2.run(e, act, group_size, plan);  // [count, H]
    y.index_add_(0, rows, out.to(at::kFloat).mul_(gain));
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(easyquant, m) {
  m.def(
      "cpu_int4_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_q, Tensor w13_s, Tensor? w13_z, "
      "Tensor? w13_c, Tensor w13_indptr, Tensor w13_indices, Tensor w13_values, Tensor w13_offsets, Tensor w2_q, "
      "Tensor w2_s, Tensor? w2_z, Tensor? w2_c, Tensor w2_indptr, Tensor w2_indices, Tensor w2_values, "
      "Tensor w2_offsets, int group_size, int[] plan, Tensor? w13_row_steps=None, Tensor? w2_row_steps=None) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(easyquant, CPU, m) { m.impl("cpu_int4_moe", &cpu_int4_moe); }
