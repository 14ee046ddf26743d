// eq_gemv.cu - EasyQuant fused decode GEMV on CUDA cores: y[M, N] = x[M, K] @ W'^T for small M (1..16).
//
// Used for layers whose shape does not fit the tensor-core layout of eq_mma.cu (N % 16 or K % 64),
// or GPUs before sm_80: it reads the checkpoint's layout as it is, with no load-time regrouping.
// W' = dequant(codes, steps) + S, in the canonical checkpoint layout (docs/format.md):
//   qweight [N, K/8] int32   4-bit codes u = q + 8, column k = nibble k % 8 of word k / 8
//   scales  [N, K/G] fp16    one step per group of G columns (G = K: per output channel)
//   indptr  [N+1], indices [nnz] int32, values [nnz] fp16: the outliers of each row (CSR)
// Format version 2 (the *_v2 entry points) adds, per docs/format.md,
//   zeros    [N, K/G] uint8   zero point z per group: q = u - z (unpacked from qzeros at load)
//   colscale [K] fp16         column scale c: W'[n, k] = c[k] * s * q + S[n, k]
// Format version 3 (the *_v3 entry points) passes, in the same slots,
//   scales   [N] fp16         the unit d of each row
//   zeros    [N, K/G, 2] uint8 (a, zq) per group: step s = d a (exact in fp32), zero z = zq / 16, q = u - z
//   colscale [K] fp16         as version 2 (ones where the checkpoint has none)
// and its fractional zero costs what version 2's integer one does: q = u - zq / 16 is exact in fp16, from the magic
// 64 + u minus the bias 64 + zq / 16 (eq_int4.cuh), and one 16-bit load per chunk and row fetches a and zq.
// The zero point enters through the per-row magic bias (eq_int4.cuh: free per weight). The column
// scale costs one 128-bit load and 8 conversions of c per word, shared by both rows, and then 8 FMULs
// per batch row (kM = 1: x[m, k] * c[k]) or 16, once per word (kM >= 2: q * c for both rows, which also
// frees c's 8 registers before the batch loop: x-side scaling took the kM = 4 tile from 80 to 100
// registers). Either product is exact in fp32 (11 x 11, 8 x 11 or 4 x 11 significant bits), so the dense
// sum is the format's, unrounded; the outliers take the unscaled x. Version 3's q has up to 8 significant bits
// (sixteenths of a code), so q * c (8 x 11 bits) is exact as well; the step multiplies the partial sum in fp32.
//
// Why it looks like this (numbers in docs/kernels.md, "the instruction-issue model"):
//   At M = 1 the GEMV must stream 0.5 byte per weight at HBM speed. An H100 can issue 178 warp
//   instructions per 512 weight bytes in that time, and every batch row costs 32 FMAs per 32 weights,
//   so the kernel is as much issue-bound as memory-bound: every instruction per weight counts (its
//   main loop: 144 at M = 1). Three choices follow.
//   * One warp owns kRowsPerWarp = 2 output rows. Lane l streams the 128-bit chunks c = l, l+32, ...
//     of both rows (two independent LDG.E.128 in flight per lane, one coalesced 512-byte transaction
//     per warp and row), and every activation it loads and converts serves both rows.
//   * Activations are read 8 at a time with one 128-bit load (the 8 columns of one code word) and
//     converted once per warp and word, not once per row.
//   * The batch size is a template parameter kM (instantiated for 1, 2, 4, 8, 16; a launch takes
//     the smallest kM >= M and masks the rest), so the accumulators acc[row][m] are registers with
//     compile-time indices and the loops over m unroll with no per-m bookkeeping. Since then
//     kM / 2 < M, the first half of a tile needs no mask test at all.
//   A chunk (32 codes) never straddles a group because G is a multiple of 32: one step per chunk.
//   Accumulation is fp32: the step multiplies each 8-column partial dot, then y is rounded once.
//
// Outliers: the warp that owns rows n0, n0+1 then walks their CSR entries (lane l takes entries
// l, l+32, ...) and adds them to its partial sums before the warp reduction. A row has exactly one
// owner, so the merge needs no atomics and no second pass over y; the dense code at an outlier
// position is 0, so adding needs no mask.
//
// Requires K % 32 == 0, G a power of two >= 32 dividing K (or G == K), 16-byte aligned qweight
// and x, kM / 2 < M <= kM (the launcher in easyquant_vllm/kernels/cuda_int4.py checks all of it).
#include "eq_gemv.cuh"  // the per-row-pair core (gemv_int4_rows), shared with eq_moe.cu

namespace eq {

// A dense layer: warp w of block b owns rows 2 (4b + w) and 2 (4b + w) + 1 of y[M, N] (rounded once to T).
template <typename T, int kM, int kFmt>
__device__ __forceinline__ void gemv_int4(const T* __restrict__ x, const int4* __restrict__ qweight,
                                          const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                          const __half* __restrict__ colscale, const int* __restrict__ indptr,
                                          const int* __restrict__ indices, const __half* __restrict__ values,
                                          T* __restrict__ y, int M, int N, int K, int G) {
  const int n0 = (blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp) * kRowsPerWarp;
  gemv_int4_rows<T, kM, kFmt>(x, qweight, scales, zeros, colscale, indptr, indices, values, M, N, K, G, n0, 0, 0, 0,
                             [=](int m, int n, float v) { y[static_cast<size_t>(m) * N + n] = Act<T>::store(v); });
}

}  // namespace eq

// C names, so that CuPy's RawModule finds them without C++ name mangling:
// eq_gemv_int4_{f16,bf16}_m{1,2,4,8,16}[_v2|_v3]; a launch takes the smallest kM >= M, and the _v2 / _v3 entry
// for layers of format version 2 (zero points and column scale) / 3 (compact steps, fractional zeros). All share one
// signature; format version 1 passes null for zeros and colscale.
// No __launch_bounds__: capping kM = 16 at 128 registers made it spill, and the cap also let the
// small tiles grow from 55 to 95 registers (fewer resident warps where they matter most, at M = 1).
#define EQ_GEMV_ENTRY_AS(NAME, T, KM, FMT)                                                                      \
  extern "C" __global__ void NAME(const T* x, const int4* qweight, const __half* scales, const uint8_t* zeros,  \
                                  const __half* colscale, const int* indptr, const int* indices,                \
                                  const __half* values, T* y, int M, int N, int K, int G) {                     \
    eq::gemv_int4<T, KM, FMT>(x, qweight, scales, zeros, colscale, indptr, indices, values, y, M, N, K, G);      \
  }
#define EQ_GEMV_ENTRY(SUFFIX, T, KM)                                     \
  EQ_GEMV_ENTRY_AS(eq_gemv_int4_##SUFFIX##_m##KM, T, KM, eq::kV1)       \
  EQ_GEMV_ENTRY_AS(eq_gemv_int4_##SUFFIX##_m##KM##_v2, T, KM, eq::kV2) \
  EQ_GEMV_ENTRY_AS(eq_gemv_int4_##SUFFIX##_m##KM##_v3, T, KM, eq::kV3)
#define EQ_GEMV_ENTRIES(SUFFIX, T) \
  EQ_GEMV_ENTRY(SUFFIX, T, 1)      \
  EQ_GEMV_ENTRY(SUFFIX, T, 2)      \
  EQ_GEMV_ENTRY(SUFFIX, T, 4)      \
  EQ_GEMV_ENTRY(SUFFIX, T, 8)      \
  EQ_GEMV_ENTRY(SUFFIX, T, 16)
EQ_GEMV_ENTRIES(f16, __half)
EQ_GEMV_ENTRIES(bf16, __nv_bfloat16)
