// eq_gemv.cu - EasyQuant fused decode GEMV: y[M, N] = x[M, K] @ W'^T for small M (1..8).
//
// W' = dequant(codes, steps) + S, in the canonical checkpoint layout (docs/format.md):
//   qweight [N, K/8] int32   4-bit codes u = q + 8, column k = nibble k % 8 of word k / 8
//   scales  [N, K/G] fp16    one step per group of G columns (G = K: per output channel)
//   indptr  [N+1], indices [nnz] int32, values [nnz] fp16: the outliers of each row (CSR)
//
// Thread mapping: one warp per output row n (blockDim.x / 32 rows per block).
//   lane l streams the 128-bit chunks c = l, l+32, ... of row n: each chunk is 4 words = 32 codes,
//   one coalesced 512-byte transaction per warp and iteration, every weight byte read exactly once.
//   A chunk never straddles a group because G is a multiple of 32, so one step per chunk.
//   The same warp then walks row n's outliers (lane l takes entries l, l+32, ...) and adds them
//   to its partial sums before the warp reduction. Rows are independent and a row has one owner,
//   so the outlier merge needs no atomics and no second pass over y; the dense code at an
//   outlier position is 0, so adding needs no mask.
//   Accumulation is fp32; y is rounded to the activation type once.
//
// Requires K % 32 == 0, G % 32 == 0 (or G == K), 16-byte aligned qweight, M <= kMaxM.
#include "eq_int4.cuh"

namespace eq {

constexpr int kMaxM = 8;  // decode batch rows per launch: acc[] stays in registers

template <typename T>
__device__ __forceinline__ void gemv_int4(
    const T* __restrict__ x,             // [M, K] activations, row-major
    const int4* __restrict__ qweight,    // [N, K/32] 128-bit chunks of the [N, K/8] int32 codes
    const __half* __restrict__ scales,   // [N, K/G]
    const int* __restrict__ indptr,      // [N + 1]
    const int* __restrict__ indices,     // [nnz]
    const __half* __restrict__ values,   // [nnz]
    T* __restrict__ y,                   // [M, N]
    int M, int N, int K, int G) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  // No early return: every thread reaches the shuffles below (the host emulation needs it).
  const bool active = n < N;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;

  const int chunks = K / 32;
  const int groups = K / G;
  for (int c = lane; active && c < chunks; c += kWarp) {
    const int4 w = qweight[static_cast<size_t>(n) * chunks + c];  // LDG.E.128: 32 codes
    const float s = __half2float(scales[static_cast<size_t>(n) * groups + (c * 32) / G]);
    const uint32_t words[4] = {uint32_t(w.x), uint32_t(w.y), uint32_t(w.z), uint32_t(w.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[8];
      dequant_word(words[i], q);
      const int k0 = c * 32 + i * 8;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          const T* xm = x + static_cast<size_t>(m) * K + k0;
          float dot = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) dot += q[j] * Act<T>::load(xm[j]);
          acc[m] += s * dot;
        }
      }
    }
  }
  if (active) {
    for (int e = indptr[n] + lane; e < indptr[n + 1]; e += kWarp) {
      const float v = __half2float(values[e]);
      const int col = indices[e];
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
        if (m < M) acc[m] += v * Act<T>::load(x[static_cast<size_t>(m) * K + col]);
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {  // M is the same for the whole grid: the shuffles stay uniform
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], offset);
    }
  }
  if (active && lane == 0) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < M) y[static_cast<size_t>(m) * N + n] = Act<T>::store(acc[m]);
  }
}

}  // namespace eq

// C names, so that CuPy's RawModule finds them without C++ name mangling.
extern "C" __global__ void eq_gemv_int4_f16(const __half* x, const int4* qweight, const __half* scales,
                                            const int* indptr, const int* indices, const __half* values,
                                            __half* y, int M, int N, int K, int G) {
  eq::gemv_int4<__half>(x, qweight, scales, indptr, indices, values, y, M, N, K, G);
}

extern "C" __global__ void eq_gemv_int4_bf16(const __nv_bfloat16* x, const int4* qweight, const __half* scales,
                                             const int* indptr, const int* indices, const __half* values,
                                             __nv_bfloat16* y, int M, int N, int K, int G) {
  eq::gemv_int4<__nv_bfloat16>(x, qweight, scales, indptr, indices, values, y, M, N, K, G);
}
