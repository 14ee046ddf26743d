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
// easyquant_vllm.quant.dequantize(..., dtype).
#include "eq_int4.cuh"

namespace eq {

template <typename T>
__device__ __forceinline__ void dequant_int4(
    const int4* __restrict__ qweight,    // [N, K/32] 128-bit chunks of the [N, K/8] int32 codes
    const __half* __restrict__ scales,   // [N, K/G]
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
    const uint32_t words[4] = {uint32_t(q4.x), uint32_t(q4.y), uint32_t(q4.z), uint32_t(q4.w)};
    T* out = w + static_cast<size_t>(n) * K + c * 32;  // K % 32 == 0: 16-byte aligned
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[8];
      dequant_word(words[i], q);
      store128(out + i * 8, uint4{Act<T>::pack2(s * q[0], s * q[1]), Act<T>::pack2(s * q[2], s * q[3]),
                                  Act<T>::pack2(s * q[4], s * q[5]), Act<T>::pack2(s * q[6], s * q[7])});
    }
  }
  __syncwarp();  // the row's dense values are written before its outliers go over them
  if (active) {
    for (int e = indptr[n] + lane; e < indptr[n + 1]; e += kWarp)
      w[static_cast<size_t>(n) * K + indices[e]] = Act<T>::store(__half2float(values[e]));
  }
}

}  // namespace eq

extern "C" __global__ void eq_dequant_int4_f16(const int4* qweight, const __half* scales, const int* indptr,
                                               const int* indices, const __half* values, __half* w, int N, int K,
                                               int G) {
  eq::dequant_int4<__half>(qweight, scales, indptr, indices, values, w, N, K, G);
}

extern "C" __global__ void eq_dequant_int4_bf16(const int4* qweight, const __half* scales, const int* indptr,
                                                const int* indices, const __half* values, __nv_bfloat16* w, int N,
                                                int K, int G) {
  eq::dequant_int4<__nv_bfloat16>(qweight, scales, indptr, indices, values, w, N, K, G);
}
