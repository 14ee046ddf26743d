// eq_dequant.cu - EasyQuant W' = dequant(codes, steps) + S into a dense [N, K] workspace (fp16/bf16).
//
// For large M (prefill), a GEMV that streams the int4 weights once per output row no longer wins:
// the work is compute-bound and tensor cores (cuBLAS) are ~15x faster than the GEMV's CUDA-core FMAs.
// The linear method then writes W' once per call with this kernel and runs torch.matmul on it.
// Above the crossover M the extra 2 bytes/weight written and read back are small next to the GEMM.
//
// Thread mapping: one warp per row n; lane l converts the 128-bit chunks c = l, l+32, ... (32 codes,
// one step each: G % 32 == 0) and writes its 32 outputs as four 128-bit stores (8 values each), so
// the kernel moves 0.5 byte in and 2 bytes out per weight in full-width transactions: 16-bit scalar
// stores would need 8x the store instructions and scatter each warp store over 32 segments. After __syncwarp,
// the same warp writes the row's outliers over their positions: the dense value there is exactly 0
// (code 0), so writing v equals adding it - and no other warp touches row n, so no atomics.
// Each value is s * q rounded once to the output type: bit-identical to the reference
// easyquant_vllm.quant.dequantize(..., dtype). Format version 2 (the *_v2 entry points): q = u - z with
// the group's zero point (per-row magic bias, eq_int4.cuh), and the value is c[k] * (s * q): s * q is
// exact in fp32, the product with c rounds once in fp32 as in the reference, then once to the output type.
// Format version 3 (the *_v3 entry points; scales = the row units d [N], zeros = the (a, zq) pairs [N, K/G, 2]):
// q = u - zq / 16 exact (eq_int4.cuh), s = d a exact, s * q rounded once and c * (s q) once more, as the reference
// rounds them. Its outliers are residuals (the dense part under them is not 0), so after __syncwarp the warp writes
// fp32 dense + outlier there, rounded once as the reference adds them: the dense value recomputed from the code.
#include "eq_int4.cuh"

namespace eq {

template <typename T, int kFmt>
__device__ __forceinline__ void dequant_int4(
    const int4* __restrict__ qweight,    // [N, K/32] 128-bit chunks of the [N, K/8] int32 codes
    const __half* __restrict__ scales,   // [N, K/G] steps; kV3: [N] the row units d
    const uint8_t* __restrict__ zeros,   // kV2: [N, K/G] zero points; kV3: [N, K/G, 2] (a, zq); kV1: unused
    const __half* __restrict__ colscale, // [K] (kV2, kV3)
    const int* __restrict__ indptr,      // [N + 1]
    const int* __restrict__ indices,     // [nnz]
    const __half* __restrict__ values,   // [nnz]
    T* __restrict__ w,                   // [N, K] output
    int N, int K, int G) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const bool active = n < N;
  const int chunks = K / 32;
  const int groups = K / G;
  const float unit = kFmt == kV3 && active ? __half2float(scales[n]) : 0.0f;  // kV3: the row's d
  for (int c = lane; active && c < chunks; c += kWarp) {
    const int4 q4 = qweight[static_cast<size_t>(n) * chunks + c];
    const size_t grp = static_cast<size_t>(n) * groups + (c * 32) / G;
    float s;
    uint32_t bias = 0;
    if constexpr (kFmt == kV3) {  // s = d a exact; the zero zq / 16
      const uint32_t meta = load_meta(zeros, grp);
      s = v3_step(unit, meta);
      bias = magic_bias_pair_v3(meta);
    } else {
      s = __half2float(scales[grp]);
      if constexpr (kFmt == kV2) bias = magic_bias_pair(zeros[grp]);
    }
    const uint32_t words[4] = {uint32_t(q4.x), uint32_t(q4.y), uint32_t(q4.z), uint32_t(q4.w)};
    T* out = w + static_cast<size_t>(n) * K + c * 32;  // K % 32 == 0: 16-byte aligned
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[8];
      dequant_word_as<kFmt>(words[i], bias, q);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] *= s;  // exact (v3: rounded once, as the reference)
      if constexpr (kFmt != kV1) {
        float cv[8];
        Act<__half>::load8(colscale + c * 32 + i * 8, cv);
#pragma unroll
        for (int j = 0; j < 8; ++j) q[j] *= cv[j];
      }
      store128(out + i * 8, uint4{Act<T>::pack2(q[0], q[1]), Act<T>::pack2(q[2], q[3]), Act<T>::pack2(q[4], q[5]),
                                  Act<T>::pack2(q[6], q[7])});
    }
  }
  __syncwarp();  // the row's dense values are written before its outliers go over them
  if (active) {
    for (int e = indptr[n] + lane; e < indptr[n + 1]; e += kWarp) {
      const int col = indices[e];
      float v = __half2float(values[e]);
      if constexpr (kFmt == kV3) {  // fp32 dense + outlier, one rounding, as the reference adds them
        const uint32_t word = reinterpret_cast<const uint32_t*>(qweight)[static_cast<size_t>(n) * (K / 8) + col / 8];
        const uint32_t meta = load_meta(zeros, static_cast<size_t>(n) * groups + col / G);
        v = __fadd_rn(v3_dense((word >> (4 * (col % 8))) & 0xFu, meta, unit, __half2float(colscale[col])), v);
      }
      w[static_cast<size_t>(n) * K + col] = Act<T>::store(v);
    }
  }
}

}  // namespace eq

// eq_dequant_int4_{f16,bf16}[_v2|_v3]: one signature; format version 1 passes null for zeros and colscale, version 3
// the row units d as scales and the (a, zq) pairs as zeros.
#define EQ_DEQUANT_ENTRY(NAME, T, FMT)                                                                          \
  extern "C" __global__ void NAME(const int4* qweight, const __half* scales, const uint8_t* zeros,              \
                                  const __half* colscale, const int* indptr, const int* indices,                \
                                  const __half* values, T* w, int N, int K, int G) {                            \
    eq::dequant_int4<T, FMT>(qweight, scales, zeros, colscale, indptr, indices, values, w, N, K, G);             \
  }
EQ_DEQUANT_ENTRY(eq_dequant_int4_f16, __half, eq::kV1)
EQ_DEQUANT_ENTRY(eq_dequant_int4_bf16, __nv_bfloat16, eq::kV1)
EQ_DEQUANT_ENTRY(eq_dequant_int4_f16_v2, __half, eq::kV2)
EQ_DEQUANT_ENTRY(eq_dequant_int4_bf16_v2, __nv_bfloat16, eq::kV2)
EQ_DEQUANT_ENTRY(eq_dequant_int4_f16_v3, __half, eq::kV3)
EQ_DEQUANT_ENTRY(eq_dequant_int4_bf16_v3, __nv_bfloat16, eq::kV3)
