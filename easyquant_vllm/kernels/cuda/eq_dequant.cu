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
#include "eq_int4.cuh"

namespace eq {

template <typename T, bool kV2>
__device__ __forceinline__ void dequant_int4(
    const int4* __restrict__ qweight,    // [N, K/32] 128-bit chunks of the [N, K/8] int32 codes
    const __half* __restrict__ scales,   // [N, K/G]
    const uint8_t* __restrict__ zeros,   // [N, K/G] (kV2 only)
    const __half* __restrict__ colscale, // [K] (kV2 only)
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
  for (int c = lane; active && c < chunks; c += kWarp) {
    const int4 q4 = qweight[static_cast<size_t>(n) * chunks + c];
    const float s = __half2float(scales[static_cast<size_t>(n) * groups + (c * 32) / G]);
    uint32_t bias = 0;
    if constexpr (kV2) bias = magic_bias_pair(zeros[static_cast<size_t>(n) * groups + (c * 32) / G]);
    const uint32_t words[4] = {uint32_t(q4.x), uint32_t(q4.y), uint32_t(q4.z), uint32_t(q4.w)};
    T* out = w + static_cast<size_t>(n) * K + c * 32;  // K % 32 == 0: 16-byte aligned
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[8];
      dequant_word_as<kV2>(words[i], bias, q);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] *= s;  // exact
      if constexpr (kV2) {
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
    for (int e = indptr[n] + lane; e < indptr[n + 1]; e += kWarp)
      w[static_cast<size_t>(n) * K + indices[e]] = Act<T>::store(__half2float(values[e]));
  }
}

}  // namespace eq

// eq_dequant_int4_{f16,bf16}[_v2]: one signature; format version 1 passes null for zeros and colscale.
#define EQ_DEQUANT_ENTRY(NAME, T, V2)                                                                           \
  extern "C" __global__ void NAME(const int4* qweight, const __half* scales, const uint8_t* zeros,              \
                                  const __half* colscale, const int* indptr, const int* indices,                \
                                  const __half* values, T* w, int N, int K, int G) {                            \
    eq::dequant_int4<T, V2>(qweight, scales, zeros, colscale, indptr, indices, values, w, N, K, G);             \
  }
EQ_DEQUANT_ENTRY(eq_dequant_int4_f16, __half, false)
EQ_DEQUANT_ENTRY(eq_dequant_int4_bf16, __nv_bfloat16, false)
EQ_DEQUANT_ENTRY(eq_dequant_int4_f16_v2, __half, true)
EQ_DEQUANT_ENTRY(eq_dequant_int4_bf16_v2, __nv_bfloat16, true)
