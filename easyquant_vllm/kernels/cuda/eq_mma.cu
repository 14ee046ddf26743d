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
// Format version 3 (the *_v3 entry points; docs/format.md): s = d[n] * a[n, g] (an fp16 unit per row times a uint8
// multiplier per group: exact in fp32) and a fractional zero z = zq / 16. The A fragment holds u - z itself:
// a multiple of 1/16 with at most 8 significant bits (|16 (u - z)| <= 255), so it is exact in fp16 and in bf16,
// and the mma still never rounds W' (each product (u - z) x is exact in fp32). fp16 gets it from the magic 64
// (ulp 1/16: the nibble goes to mantissa bits 4..7) minus the per-row bias 64 + zq / 16 (bits 0x5400 | zq): one
// lop3 + HSUB2 per register, version 2's cost. bf16 has one mantissa bit too few for that magic, so it subtracts
// twice, (u - 8) - (z - 8): 16 instructions more per 512 weight bytes. The alternative, integer codes in the
// fragment and -s z sum(x c) per group in the epilogue, needs the column-scaled activations' sum per group and
// batch row: one more mma per k-step and batch tile (or a pre-pass and a buffer), 4 more FFMAs per group and tile,
// growing with M where the exact fragment costs the same for every M (it is shared by all kT batch tiles).
// scales = d [N], zeros = the pairs (a, zq) [N, K/G, 2]: one 16-bit load per row and group gives the step and the
// bias, where version 2 loads the step and the zero separately. Main loop, sm_90, per 512 weight bytes at M <= 8:
// fp16 143 (v2: 160), bf16 177 (v2: 170) against the H100's 178 (docs/kernels.md).
//
// Work split: one block of kMmaWarps warps per 16-row tile; warp w takes k-blocks w, w + 8, ... (split
// K: enough warps in flight for HBM even when N is small), prefetching its next 128-bit load. Each
// warp adds its share of the tile's CSR outliers (entries w, w + 8, ... of each row) to its
// accumulators; then the warps' partial sums meet in shared memory and warp 0 writes y. No atomics:
// a tile has one owner block.
//
// Requires N % 16 == 0, K % 64 == 0, G a power of two >= 32 dividing K (or G == K), 16-byte aligned
// qweight and x, 2-byte aligned version-3 zeros, 4 * kT < M <= 8 * kT for kT > 1 (checked by
// easyquant_vllm/kernels/cuda_int4.py).
// Registers: 40-62 up to kT = 2, 80-96 at kT = 4; kT = 8 holds 64 fp32 accumulators (138 registers,
// one 8-warp block per SM).
#include "eq_mma.cuh"  // the per-tile core (mma_int4_tile), shared with eq_moe.cu; fragments: eq_int4.cuh

namespace eq {

// A dense layer: block b computes rows 16b .. 16b + 15 of y[M, N] (rounded once to T).
template <typename T, int kT, int kFmt>
__device__ __forceinline__ void mma_int4(const T* __restrict__ x, const int4* __restrict__ qweight,
                                         const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                         const __half* __restrict__ colscale, const int* __restrict__ indptr,
                                         const int* __restrict__ indices, const __half* __restrict__ values,
                                         T* __restrict__ y, int M, int N, int K, int G) {
  mma_int4_tile<T, kT, kFmt>(x, qweight, scales, zeros, colscale, indptr, indices, values, M, K, G, blockIdx.x, 0, 0, 0,
                            [=](int m, int n, float v) { y[static_cast<size_t>(m) * N + n] = Act<T>::store(v); });
}

// The code u of row `row`, column `col` in the MMA layout (the inverse of the regrouping: mma_layout.py). Row
// 16 r + 8 h + g, column 64 b + 16 s + 4 t + 2 e2 + e is nibble 4 e + 2 e2 + h of word s of lane 4 g + t, tile (r, b).
__device__ __forceinline__ uint32_t mma_code(const int4* __restrict__ qweight, int kblocks, int row, int col) {
  const int g = row & 7, h = (row >> 3) & 1, t = (col >> 2) & 3, e2 = (col >> 1) & 1, e = col & 1;
  const size_t lane = (static_cast<size_t>(row >> 4) * kblocks + (col >> 6)) * kWarp + 4 * g + t;
  const uint32_t word = reinterpret_cast<const uint32_t*>(qweight)[4 * lane + ((col >> 4) & 3)];
  return (word >> (4 * (4 * e + 2 * e2 + h))) & 0xFu;
}

// W' [N, K] from the MMA layout: one warp per 16-row tile, each value rounded once to T as the reference
// (easyquant_vllm.quant.dequantize) rounds it, bit-identical; 4 consecutive values per row and step as one 64-bit
// store. Then, after __syncwarp, the tile's outliers (the owner warp only: no atomics): versions 1 and 2 over their
// zeros (the dense part is exactly 0 there), version 3 added to the dense value recomputed in fp32 (it is not 0).
template <typename T, int kFmt>
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
        float step;
        uint32_t bias = 0u;
        if constexpr (kFmt == kV3) {  // s = d a (exact), the zero zq / 16
          const uint32_t meta = load_meta(zeros, grp);
          step = v3_step(__half2float(scales[row]), meta);
          bias = magic_bias_pair_v3(meta);
        } else {
          step = __half2float(scales[grp]);
          if constexpr (kFmt == kV2) bias = magic_bias_pair(zeros[grp]);
        }
        float q[4];
        nibble_pair_as<kFmt>(words[s], h, bias, q[0], q[1]);
        nibble_pair_as<kFmt>(words[s], h + 2, bias, q[2], q[3]);
        if constexpr (kFmt != kV1) {  // c * (s * q), the reference's order: s * q exact (v2) or rounded once (v3)
          ColScale<T> c;
          c.load(colscale, col);
#pragma unroll
          for (int i = 0; i < 4; ++i) q[i] = c.at(i) * (step * q[i]);
        } else {
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
      for (int e = indptr[r] + lane; e < indptr[r + 1]; e += kWarp) {
        const int col = indices[e];
        float v = __half2float(values[e]);
        if constexpr (kFmt == kV3) {  // fp32 dense + outlier, one rounding, as the reference adds them
          const uint32_t meta = load_meta(zeros, static_cast<size_t>(r) * groups + (col >> group_shift));
          const float dense = v3_dense(mma_code(qweight, kblocks, r, col), meta, __half2float(scales[r]),
                                       ColScale<T>::value(colscale, col));
          v = __fadd_rn(dense, v);
        }
        w[static_cast<size_t>(r) * K + col] = Act<T>::store(v);
      }
  }
}

}  // namespace eq

// eq_mma_int4_{f16,bf16}_t{1,2,4,8}[_v2|_v3]: kT batch tiles of 8 rows (M <= 8 kT; a launch takes the
// smallest); grid N / 16 blocks of 8 warps. eq_dequant_mma_int4_{f16,bf16}[_v2|_v3]: grid ceil(N / 64) blocks
// of 4 warps. _v2: format version 2 (zero points and column scale); version 1 passes null for both. _v3: format
// version 3, scales = the row units d [N], zeros = the (a, zq) pairs [N, K/G, 2] (see the top of the file).
#define EQ_MMA_ENTRY_AS(NAME, T, KT, FMT)                                                                        \
  extern "C" __global__ void NAME(const T* x, const int4* qweight, const __half* scales, const uint8_t* zeros,   \
                                  const __half* colscale, const int* indptr, const int* indices,                 \
                                  const __half* values, T* y, int M, int N, int K, int G) {                      \
    eq::mma_int4<T, KT, FMT>(x, qweight, scales, zeros, colscale, indptr, indices, values, y, M, N, K, G);        \
  }
#define EQ_MMA_ENTRY(SUFFIX, T, KT)                                    \
  EQ_MMA_ENTRY_AS(eq_mma_int4_##SUFFIX##_t##KT, T, KT, eq::kV1)       \
  EQ_MMA_ENTRY_AS(eq_mma_int4_##SUFFIX##_t##KT##_v2, T, KT, eq::kV2) \
  EQ_MMA_ENTRY_AS(eq_mma_int4_##SUFFIX##_t##KT##_v3, T, KT, eq::kV3)
EQ_MMA_ENTRY(f16, __half, 1)
EQ_MMA_ENTRY(f16, __half, 2)
EQ_MMA_ENTRY(f16, __half, 4)
EQ_MMA_ENTRY(f16, __half, 8)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 1)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 2)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 4)
EQ_MMA_ENTRY(bf16, __nv_bfloat16, 8)

#define EQ_DEQUANT_MMA_ENTRY(NAME, T, FMT)                                                                      \
  extern "C" __global__ void NAME(const int4* qweight, const __half* scales, const uint8_t* zeros,              \
                                  const __half* colscale, const int* indptr, const int* indices,                \
                                  const __half* values, T* w, int N, int K, int G) {                            \
    eq::dequant_mma<T, FMT>(qweight, scales, zeros, colscale, indptr, indices, values, w, N, K, G);              \
  }
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_f16, __half, eq::kV1)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_bf16, __nv_bfloat16, eq::kV1)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_f16_v2, __half, eq::kV2)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_bf16_v2, __nv_bfloat16, eq::kV2)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_f16_v3, __half, eq::kV3)
EQ_DEQUANT_MMA_ENTRY(eq_dequant_mma_int4_bf16_v3, __nv_bfloat16, eq::kV3)
