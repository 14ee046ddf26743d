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
//             (8-bit codes: K/4 * 16)
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
// streams k experts' codes, not all E). Each expert runs the dense layers' kernel (its path chosen by that
// expert's token count from the plan), so every ISA path serves experts too; the experts of one projection run
// as one batch of linears (cpu_int4_linear_jobs), the glue around them as a few ops per layer. The weighted sum
// is accumulated in fp32 and rounded to x's dtype once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "eq_cpu.h"

namespace {

// One projection (w13 or w2) of every expert, stacked, as the op receives it.
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
  const at::Tensor& offsets;  // int64 [E + 1]: expert e's outliers are entries offsets[e] .. offsets[e + 1] - 1
};

// The shapes of a stacked projection and what every expert's pointers rely on (checked_weights: dtypes, sizes,
// contiguity), its O(E) CSR invariants (offsets from 0 to nnz, never decreasing; each expert's row pointers from 0
// to its own nnz), with K from its input. Returns expert 0's weights; .at() gives the others.
easyquant::LinearWeights check_projection(const Projection& p, int64_t experts, int64_t k, int64_t group_size) {
  const std::string what = std::string("easyquant::cpu_int4_moe: ") + p.name;
  TORCH_CHECK(p.w_q.dim() == 3 && p.scales.dim() == 3 && p.indptr.dim() == 2 && p.w_q.size(0) == experts &&
                  p.scales.size(0) == experts && p.indptr.size(0) == experts,
              what, " must stack ", experts, " experts along dim 0 (w_q, scales 3-D, indptr 2-D), got w_q ",
              p.w_q.sizes(), ", scales ", p.scales.sizes(), ", indptr ", p.indptr.sizes());
  TORCH_CHECK(!p.zeros || (p.zeros->dim() == 3 && p.zeros->size(0) == experts), what, " zeros must be [E, N/16, ",
              "K/G * 16]");
  TORCH_CHECK(!p.col_scale || (p.col_scale->dim() == 2 && p.col_scale->size(0) == experts), what,
              " col_scale must be [E, K]");
  TORCH_CHECK(!p.row_steps || (p.row_steps->dim() == 2 && p.row_steps->size(0) == experts), what,
              " row_steps must be [E = ", experts, ", N], got ",
              p.row_steps ? p.row_steps->sizes() : at::IntArrayRef{});
  TORCH_CHECK(p.offsets.scalar_type() == at::kLong && p.offsets.dim() == 1 && p.offsets.numel() == experts + 1 &&
                  p.offsets.is_contiguous() && p.offsets.device().is_cpu(),
              what, " offsets must be a contiguous int64 CPU tensor [E + 1 = ", experts + 1, "], got ",
              p.offsets.scalar_type(), " ", p.offsets.sizes());
  easyquant::check_outlier_arrays(what, p.indices, p.values);
  const int64_t* off = p.offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[experts] == p.indices.numel(), what, " offsets must run from 0 to nnz = ",
              p.indices.numel(), ", got ", off[0], " .. ", off[experts]);
  for (int64_t e = 0; e < experts; ++e)
    TORCH_CHECK(off[e] <= off[e + 1], what, " offsets decrease at expert ", e);
  easyquant::LinearWeights w = easyquant::checked_weights(what, experts, k, p.w_q, p.scales, p.zeros, p.col_scale,
                                                          p.indptr, p.row_steps, group_size);
  w.indices = p.indices.data_ptr<int32_t>();
  w.values = p.values.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int32_t* ip = w.indptr + e * (w.n + 1);
    TORCH_CHECK(ip[0] == 0 && ip[w.n] == off[e + 1] - off[e], what, " indptr of expert ", e, " must run from 0 to ",
                "its nnz = ", off[e + 1] - off[e], ", got ", ip[0], " .. ", ip[w.n]);
  }
  return w;
}

// Tokens per task of the gather and the weighted sum: one task (no fork) at decode, the threads at prefill.
int64_t token_grain(int64_t hidden) { return std::max<int64_t>(1, 32768 / hidden); }

// y[t] = sum over j of gain[s] * out[s], s = pos[t * k + j] (token t's j-th choice in the sorted slots), in
// fp32 in the order of j, rounded to T once. Each token is one task's: no shared sums, the same bits for any
// number of threads.
template <typename T>
void weighted_sum(const T* out, const std::vector<int64_t>& pos, const std::vector<float>& gain, int64_t m,
                  int64_t k, int64_t hidden, T* y) {
  at::parallel_for(0, m, token_grain(hidden), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(hidden);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = pos[t * k + j];
        const T* src = out + s * hidden;
        const float p = gain[s];
        for (int64_t i = 0; i < hidden; ++i) acc[i] += p * static_cast<float>(src[i]);
      }
      for (int64_t i = 0; i < hidden; ++i) y[t * hidden + i] = static_cast<T>(acc[i]);
    }
  });
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
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "easyquant::cpu_int4_moe: x must be bf16 or fp16, got ",
              dtype);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), hidden = x.size(1);
  TORCH_CHECK(topk_ids_in.dim() == 2 && topk_ids_in.size(0) == m && topk_weights_in.sizes() == topk_ids_in.sizes(),
              "easyquant::cpu_int4_moe: topk_ids and topk_weights must both be [M = ", m, ", k], got ",
              topk_ids_in.sizes(), " and ", topk_weights_in.sizes());
  TORCH_CHECK(at::isIntegralType(topk_ids_in.scalar_type(), /*includeBool=*/false),
              "easyquant::cpu_int4_moe: topk_ids must be integers, got ", topk_ids_in.scalar_type());
  TORCH_CHECK(w13_q.dim() == 3 && w13_q.size(0) >= 1, "easyquant::cpu_int4_moe: w13 w_q must stack the experts ",
              "along dim 0 ([E, N/16, K/8 * 16], E >= 1), got ", w13_q.sizes());
  const int64_t experts = w13_q.size(0);
  const Projection p13{"w13", w13_q, w13_s, w13_z, w13_c, w13_row_steps, w13_indptr, w13_indices, w13_values,
                       w13_offsets};
  const Projection p2{"w2", w2_q, w2_s, w2_z, w2_c, w2_row_steps, w2_indptr, w2_indices, w2_values, w2_offsets};
  const easyquant::LinearWeights w13 = check_projection(p13, experts, hidden, group_size);
  const int64_t inter = w13.n / 2;  // w13 = [gate; up]; N % 16 == 0 is checked
  const easyquant::LinearWeights w2 = check_projection(p2, experts, inter, group_size);
  TORCH_CHECK(w2.n == hidden, "easyquant::cpu_int4_moe: w2 must give x's ", hidden, " columns, got N = ", w2.n);
  const int64_t* off13 = w13_offsets.data_ptr<int64_t>();
  const int64_t* off2 = w2_offsets.data_ptr<int64_t>();

  // topk_ids as vLLM gives them (int32), or any other integer type widened once.
  const bool int32_ids = topk_ids_in.scalar_type() == at::kInt;
  const at::Tensor ids = int32_ids ? topk_ids_in.contiguous() : topk_ids_in.to(at::kLong).contiguous();
  const int32_t* id32 = int32_ids ? ids.data_ptr<int32_t>() : nullptr;
  const int64_t* id64 = int32_ids ? nullptr : ids.data_ptr<int64_t>();
  const auto expert_of = [&](int64_t i) -> int64_t { return id32 ? id32[i] : id64[i]; };
  const int64_t slots = ids.numel(), k = ids.size(1);

  // Counting sort of the (token, choice) pairs by expert; token order is kept within an expert. Row s of the
  // sorted slots is token rows[s] of expert e for start[e] <= s < start[e + 1], with gain[s] its routing weight;
  // pair i = t * k + j (token t's j-th choice) went to slot pos[i].
  std::vector<int64_t> start(experts + 1, 0);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t e = expert_of(i);
    TORCH_CHECK(e >= 0 && e < experts, "easyquant::cpu_int4_moe: topk_ids holds expert ", e, " (token ", i / k,
                "); this layer has ", experts, " experts");
    ++start[e + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), rows(slots), pos(slots);
  std::vector<float> gain(slots);
  {
    const at::Tensor weights = topk_weights_in.to(at::kFloat).contiguous();
    const float* w = weights.data_ptr<float>();
    for (int64_t i = 0; i < slots; ++i) {
      const int64_t s = fill[expert_of(i)]++;
      pos[i] = s;
      rows[s] = i / k;
      gain[s] = w[i];
    }
  }

  // Every expert's rows at once, in the sorted order: x gathered, gate/up, the activation, down. The experts'
  // products run as one batch of linears (cpu_int4_linear_jobs: their blocks in one parallel region, each expert
  // on the path its token count picks), and the glue around them is plain loops and two ops per layer, not ops
  // per expert: at decode a layer runs k small experts, where per-expert ops and forks cost as much as the
  // expert's arithmetic (measured: docs/serving.md).
  const int64_t elem = x.element_size();
  at::Tensor xs = at::empty({slots, hidden}, x.options());    // [S, H]
  at::Tensor h = at::empty({slots, 2 * inter}, x.options());  // [S, 2I]
  at::Tensor out = at::empty({slots, hidden}, x.options());   // [S, H]
  {
    const char* src = static_cast<const char*>(x.data_ptr());
    char* dst = static_cast<char*>(xs.data_ptr());
    const int64_t bytes = hidden * elem;
    at::parallel_for(0, slots, token_grain(hidden), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) std::memcpy(dst + s * bytes, src + rows[s] * bytes, bytes);
    });
  }
  const auto jobs = [&](const easyquant::LinearWeights& w, const int64_t* off, const at::Tensor& in, at::Tensor& y) {
    std::vector<easyquant::LinearJob> list;
    const char* src = static_cast<const char*>(in.data_ptr());
    char* dst = static_cast<char*>(y.data_ptr());
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t count = start[e + 1] - start[e];
      if (count == 0) continue;  // an expert no token chose: its codes are never read
      list.push_back({w.at(e, off[e], off[e + 1] - off[e]), src + start[e] * w.k * elem, count,
                      dst + start[e] * w.n * elem});
    }
    return list;
  };
  easyquant::cpu_int4_linear_jobs(dtype, plan, jobs(w13, off13, xs, h));
  // SiLU-gated, in x's dtype as the reference model computes it (each op rounds once).
  const at::Tensor act = (at::silu(h.narrow(1, 0, inter)) * h.narrow(1, inter, inter)).contiguous();  // [S, I]
  easyquant::cpu_int4_linear_jobs(dtype, plan, jobs(w2, off2, act, out));
  // The weighted sum in fp32, rounded to x's dtype once.
  at::Tensor y = at::empty({m, hidden}, x.options());
  if (dtype == at::kBFloat16)
    weighted_sum(out.data_ptr<at::BFloat16>(), pos, gain, m, k, hidden, y.data_ptr<at::BFloat16>());
  else
    weighted_sum(out.data_ptr<at::Half>(), pos, gain, m, k, hidden, y.data_ptr<at::Half>());
  return y;
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
