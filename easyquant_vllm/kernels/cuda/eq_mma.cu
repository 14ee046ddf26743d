// eq_mma.cu - EasyQuant int4 x fp16/bf16 on tensor cores for batches of 1..64 rows, and W' from the
// same layout for larger batches.
//
// Why tensor cores even for decode: the CUDA-core GEMV (eq_gemv.cu) spends 32 fp32 FMAs per 32
// weights per batch row, so beyond M ~ 2 it is bound by instruction issue, not HBM (docs/kernels.md).
// One mma.sync.m16n8k16 multiplies a 16 x 16 block of weights by 8 batch rows at once. Here the
// WEIGHTS are the A operand (16 rows x 16 columns) and the activations the B operand (16 columns x
// 8 batch rows), so a batch of up to 8 fills one mma and costs the same as a batch of 1. Per 512
// weight bytes the loop issues less than the GEMV at M = 1 and stays under the H100's issue budget up
// to M = 16 (HBM speed); batch tiles up to kT = 8 (M <= 64) add ~25-35 instructions per 8 rows.
//
// Layout (easyquant_vllm/kernels/mma_layout.py builds it once at load from the checkpoint's):
//   qweight [N/16][K/64][32 lanes] of int4: tile (r, b) = rows 16r.., columns 64b..; lane l = 4g + t
//   holds word s for k-step s (columns 64b + 16s ..), whose nibbles p / p + 4 are the two halves of
//   A register p. Inside a step, mma column 2t + e is physical column 4t + e and 2t + 8 + e is
//   4t + 2 + e, so a lane's B fragment is the 4 consecutive activations 16s + 4t .. + 3 (one 64-bit
//   load) and its A fragment is one lop3 + HSUB2 per register, with no shuffles.
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), g = lane >> 2,
// t = lane & 3:  A a0,a1: (g, 2t..2t+1)  a2,a3: (g+8, 2t..)  a4,a5: (g, 2t+8..)  a6,a7: (g+8, 2t+8..)
//                B b0,b1: (2t..2t+1, g)  b2,b3: (2t+8.., g);  C c0,c1: (g, 2t..2t+1)  c2,c3: (g+8, 2t..)
//
// Steps: the codes go in as exact small integers q (fp16 or bf16), the mma accumulates q * x in
// fp32, and the group step multiplies that partial sum in fp32 at each group (or k-block) end. So W'
// is never rounded: more exact than the dequantize path, and bf16 needs no bf16 copy of the fp16 step.
//
// Format version 2 (the *_v2 entry points; docs/format.md): zero points and a column scale c.
//   * q = u - z: the magic bias becomes a per-row register, 2^n + z (its bits are the magic's with z
//     in the mantissa), loaded with the zero at each group start; the A fragment still costs one lop3 +
//     HSUB2 per register and stays an exact small integer (|q| <= 15). Free per weight.
//   * c multiplies the B fragment as it is loaded: x * c rounded once to the activation type, the only
//     rounding v2 adds (the CPU kernels make the same one); the outliers take the unscaled x. fp16: one
//     HMUL2 per register (the product of two fp16 is correctly rounded). bf16: c (fp16, 11 significant
//     bits) does not fit a bf16, so the loader splits it exactly into c = c_hi + c_lo, two bf16 (8 + 3
//     bits), stored per 4 columns as [hi x4, lo x4] (one 128-bit load per k-step), and the kernel
//     computes HFMA2(x, c_hi, HMUL2(x, c_lo)): two instructions per register instead of a round trip
//     through fp32 (unpack, multiply, repack: 211 instead of 160 instructions per 512 B at M <= 8).
//     x * c_lo is exact in bf16's range of interest up to its own rounding (2^-9 of a term 2^-8 the
//     size of x * c), so the result is round(x * c) except within ~2^-17 of a rounding boundary.
//
// Work split: one block of kMmaWarps warps per 16-row tile; warp w takes k-blocks w, w + 8, ... (split
// K: enough warps in flight for HBM even when N is small), prefetching its next 128-bit load. Each
// warp adds its share of the tile's CSR outliers (entries w, w + 8, ... of each row) to its
// accumulators; then the warps' partial sums meet in shared memory and warp 0 writes y. No atomics:
// a tile has one owner block.
//
// Requires N % 16 == 0, K % 64 == 0, G a power of two >= 32 dividing K (or G == K), 16-byte aligned
// qweight and x, 4 * kT < M <= 8 * kT for kT > 1 (checked by easyquant_vllm/kernels/cuda_int4.py).
// Registers: 40-62 up to kT = 2, 80-96 at kT = 4; kT = 8 holds 64 fp32 accumulators (138 registers,
// one 8-warp block per SM).
#include "eq_mma.cuh"  // the per-tile core (mma_int4_tile), shared with eq_moe.cu; fragments: eq_int4.cuh

namespace eq {

// A dense layer: block b computes rows 16b .. 16b + 15 of y[M, N] (rounded once to T).
template <typename T, int kT, bool kV2>
__device__ __forceinline__ void mma_int4(const T* __restrict__ x, const int4* __restrict__ qweight,
                                         const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                         const __half* __restrict__ colscale, const int* __restrict__ indptr,
                                         const int* __restrict__ indices, const __half* __restrict__ values,
                                         T* __restrict__ y, int M, int N, int K, int G) {
  mma_int4_tile<T, kT, kV2>(x, qweight, scales, zeros, colscale, indptr, indices, values, M, K, G, blockIdx.x, 0, 0, 0,
                            [=](int m, int n, float v) { y[static_cast<size_t>(m) * N + n] = Act<T>::store(v); });
}

// W' [N, K] from the MMA layout: one warp per 16-row tile, each value s * q rounded once (bit-identical
// to easyquant_vllm.quant.dequantize), 4 consecutive values per row and step as one 64-bit store; then,
// after __syncwarp, the tile's outliers over their zeros (the owner warp only: no atomics).
template <typename T, bool kV2>
__device__ __forceinline__ void dequant_mma(const int4* __restrict__ qweight, const __half* __restrict__ scales,
                                            const uint8_t* __restrict__ zeros, const __half* __restrict__ colscale,
                                            const int* __restrict__ indptr, const int* __restrict__ indices,
                                            const __half* __restrict__ values, T* __restrict__ w, int N, int K,
                                            int G) {
  const int lane = threadIdx.x % kWarp;
  const int tile = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const bool active = tile < N / 16;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = tile * 16;
  const int kblocks = K / 64, groups = K / G;
  const int group_shift = G == K ? 31 : __ffs(G) - 1;
  for (int kb = 0; active && kb < kblocks; ++kb) {
    const int4 q4 = qweight[(static_cast<size_t>(tile) * kblocks + kb) * kWarp + lane];
    const uint32_t words[4] = {uint32_t(q4.x), uint32_t(q4.y), uint32_t(q4.z), uint32_t(q4.w)};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int col = kb * 64 + 16 * s + 4 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // row g (nibble pairs 0, 2) and row g + 8 (pairs 1, 3)
        const int row = r0 + g + 8 * h;
        const size_t grp = static_cast<size_t>(row) * groups + (col >> group_shift);
        const float step = __half2float(scales[grp]);
        float q[4];
        if constexpr (kV2) {  // q = u - z, then c * (s * q): the reference's order (s * q exact, one rounding)
          const uint32_t bias = magic_bias_pair(zeros[grp]);
          magic_pair_to_codes(and_or(words[s] >> (4 * h), kNibblePairMask, kMagicPair), bias, q[0], q[1]);
          magic_pair_to_codes(and_or(words[s] >> (4 * (h + 2)), kNibblePairMask, kMagicPair), bias, q[2], q[3]);
          ColScale<T> c;
          c.load(colscale, col);
#pragma unroll
          for (int i = 0; i < 4; ++i) q[i] = c.at(i) * (step * q[i]);
        } else {
          magic_pair_to_codes(and_or(words[s] >> (4 * h), kNibblePairMask, kMagicPair), q[0], q[1]);
          magic_pair_to_codes(and_or(words[s] >> (4 * (h + 2)), kNibblePairMask, kMagicPair), q[2], q[3]);
#pragma unroll
          for (int i = 0; i < 4; ++i) q[i] *= step;
        }
        const uint2 out = {Act<T>::pack2(q[0], q[1]), Act<T>::pack2(q[2], q[3])};
        store64(w + static_cast<size_t>(row) * K + col, out);  // STG.E.64
      }
    }
  }
  __syncwarp();
  if (active) {
    for (int r = r0; r < r0 + 16; ++r)
      for (int e = indptr[r] + lane; e < indptr[r + 1]; e += kWarp)
        w[static_cast<size_t>(r) * K + indices[e]] = Act<T>::store(__half2float(values[e]));
  }
}

}  // namespace eq

// eq_mma_int4_{f16,bf16}_t{1,2,4,8}[_v2]: kT batch tiles of 8 rows (M <= 8 kT; a launch takes the
// smallest); grid N / 16 blocks of 8 warps. eq_dequant_mma_int4_{f16,bf16}[_v2]: grid ceil(N / 64) blocks
// of 4 warps. _v2: format version 2 (zero points and column scale); version 1 passes null for both.
#define EQ_MMA_ENTRY_AS(NAME, T, KT, V2)                                                                         \
  extern "C" __global__ void NAME(const T* x, const int4* qweight, const __half* scales, const uint8_t* zeros,   \
                                  const __half* colscale, const int* indptr, const int* indices,                 \
                                  const __half* values, T* y, int M, int N, int K, int G) {                      \
    eq::mma_int4<T, KT, V2>(x, qweight, scales, zeros, colscale, indptr, indices, values, y, M, N, K, G);        \
  }
#define EQ_MMA_ENTRY(SUFFIX, T, KT)                             \
  EQ_MMA_ENTRY_AS(eq_mma_int4_##SUFFIX##_t##KT, T, KT, false) \
  EQ_MMA_ENTRY_AS(eq_mma_int4_##SUFFIX##_t##KT##_v2, T, KT, true)
EQ_MMA_ENTRY(f16, __half, 1)
EQ_MMA_ENTRY(f16, __half, 2)
EQ_MMA_ENTRY(f16, __half, 4)
EQ_MMA_ENTRY(f16, __half, 8)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 1)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 2)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 4)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 8)

#define EQ_DEQUANT_MMA_ENTRY(NAME, T, V2)                                                                       \
  extern "C" __global__ void NAME(const int4* qweight, const __half* scales, const uint8_t* zeros,              \
                                  const __half* colscale, const int* indptr, const int* indices,                \
                                  const __half* values, T* w, int N, int K, int G) {                            \
    eq::dequant_mma<T, V2>(qweight, scales, zeros, colscale, indptr, indices, values, w, N, K, G);              \
  }
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_f16, __half, false)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_bf16, __nv_bfloat16, false)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_f16_v2, __half, true)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_bf16_v2, __nv_bfloat16, true)
