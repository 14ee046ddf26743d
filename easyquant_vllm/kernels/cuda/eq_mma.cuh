// eq_mma.cuh - the tensor-core kernel's core: one 16-row tile of W times up to 8 kT batch rows, shared by
// eq_mma.cu (a dense layer: the tile is blockIdx.x) and eq_moe.cu (one expert's tile of tokens). What it
// computes, the layout it reads and the work split are described at the top of eq_mma.cu. Its epilogue is the
// caller's: `store(m, n, v)` receives each finished fp32 sum, so a dense layer rounds it into y[M, N] and a MoE
// layer writes it where its token's slot goes.
#pragma once
#include "eq_int4.cuh"

namespace eq {

constexpr int kMmaWarps = 8;     // warps per block, all on one 16-row tile
constexpr int kMmaMaxTiles = 8;  // batch tiles of 8 rows: M <= 64

template <typename T, int kT, int kFmt, typename Store>
__device__ __forceinline__ void mma_int4_tile(
    const T* __restrict__ x,            // [M, K] activations, 16-byte aligned
    const int4* __restrict__ qweight,   // [N/16][K/64][32] lanes' 128-bit words (MMA layout)
    const __half* __restrict__ scales,  // [N, K/G] steps; kV3: [N] the row units d
    const uint8_t* __restrict__ zeros,  // kV2: [N, K/G] zero points; kV3: [N, K/G, 2] (a, zq) pairs; kV1: unused
    const __half* __restrict__ colscale,  // kV2, kV3: [K] fp16, or for bf16 the [K/4][8] split (ColScale)
    const int* __restrict__ indptr, const int* __restrict__ indices, const __half* __restrict__ values,
    int M, int K, int G,
    unsigned tile,  // which 16-row tile of W: rows 16 tile .. 16 tile + 15
    int w_row0,     // weights, steps, zero points and CSR rows are read at row w_row0 + n (a stacked expert: e N)
    int c_col0,     // column scales are read at column c_col0 + k (a stacked expert: e K)
    int x_row0,     // activation rows are read at x_row0 + m (a tile of sorted rows: its first)
    Store store) {  // store(m, n, v): the caller's epilogue for y[m, n] = v (fp32, m < M), called by warp 0
  // Shared memory holds the warps' partial sums until warp 0 has stored them: a caller that runs a second tile
  // in the same block must __syncthreads() in between.
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = tile * 16;      // the tile's first row, as the store numbers it
  const int rw0 = w_row0 + r0;  // ... and as the weights do
  const int kblocks = K / 64;
  const int groups = K / G;
  const int group_shift = G == K ? 31 : __ffs(G) - 1;  // group of column k = k >> group_shift
  const int steps_per_scale = G == 32 ? 2 : 4;         // scale at each group end, at least per k-block
  float acc[kT][4], part[kT][4];
#pragma unroll
  for (int j = 0; j < kT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = part[j][i] = 0.0f;

  // Batch row 8j + g of each tile, clamped to M - 1 so every load is in bounds (a launch takes the
  // smallest kT with 8 kT >= M, so M > 4 kT for kT > 1 and only the upper half of the tiles can be short).
  const T* xrow[kT];
#pragma unroll
  for (int j = 0; j < kT; ++j)
    xrow[j] = x + static_cast<size_t>(x_row0 + (8 * j + g < M ? 8 * j + g : M - 1)) * K + 4 * t;
  const int4* words_of = qweight + (static_cast<size_t>(w_row0 / 16) + tile) * kblocks * kWarp + lane;
  int4 next = {0, 0, 0, 0};
  if (warp < kblocks) next = words_of[warp * kWarp];  // LDG.E.128
  uint32_t bias[2] = {0u, 0u};  // kV2, kV3: the zero bias of rows g (A registers 0, 2) and g + 8 (registers 1, 3)
  float unit[2] = {0.0f, 0.0f}, step[2] = {0.0f, 0.0f};  // kV3: the rows' d, and the group's s = d a from its start
  if constexpr (kFmt == kV3) unit[0] = __half2float(scales[rw0 + g]), unit[1] = __half2float(scales[rw0 + g + 8]);
  for (int kb = warp; kb < kblocks; kb += kMmaWarps) {
    const uint32_t words[4] = {uint32_t(next.x), uint32_t(next.y), uint32_t(next.z), uint32_t(next.w)};
    if (kb + kMmaWarps < kblocks) next = words_of[(kb + kMmaWarps) * kWarp];  // in flight during this block
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int k0 = kb * 64 + 16 * s;
      uint32_t a[4];
      ColScale<T> c;
      if constexpr (kFmt != kV1) {
        if (s % steps_per_scale == 0) {  // a group starts here (steps_per_scale divides the group's steps)
          const int grp = k0 >> group_shift;
          const size_t lo = static_cast<size_t>(rw0 + g) * groups + grp;
          const size_t hi = static_cast<size_t>(rw0 + g + 8) * groups + grp;
          if constexpr (kFmt == kV3) {  // a and zq of both rows: one 16-bit load each; s = d a exact
            const uint32_t meta_lo = load_meta(zeros, lo), meta_hi = load_meta(zeros, hi);
            bias[0] = MmaV3<T>::bias_pair(meta_lo), bias[1] = MmaV3<T>::bias_pair(meta_hi);
            step[0] = v3_step(unit[0], meta_lo), step[1] = v3_step(unit[1], meta_hi);
          } else {
            bias[0] = Mma<T>::bias_pair(zeros[lo]), bias[1] = Mma<T>::bias_pair(zeros[hi]);
          }
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          if constexpr (kFmt == kV3) a[p] = MmaV3<T>::codes(words[s], p, bias[p & 1]);  // u - z, exact
          else a[p] = codes<T>(and_or(words[s] >> (4 * p), kNibblePairMask, Mma<T>::kMagic), bias[p & 1]);
        }
        c.load(colscale, c_col0 + k0 + 4 * t);  // the 4 column scales of this lane's B fragment
      } else {
#pragma unroll
        for (int p = 0; p < 4; ++p) a[p] = codes<T>(and_or(words[s] >> (4 * p), kNibblePairMask, Mma<T>::kMagic));
      }
#pragma unroll
      for (int j = 0; j < kT; ++j) {
        // B fragment: 4 activations of this lane's batch row (see xrow). Rows past M are zeroed by a
        // select, not skipped by a branch, so the warp reaches mma.sync.aligned converged.
        uint2 v = load64(xrow[j] + k0);  // 8-byte aligned: K % 64 == 0, x 16-byte aligned
        if constexpr (kFmt != kV1) v = c.apply(v);
        const bool live = 2 * j < kT || 8 * j + g < M;  // the first half of the tiles is never masked
        const uint32_t b[2] = {live ? v.x : 0u, live ? v.y : 0u};
        mma<T>(part[j], a, b);
      }
      if ((s + 1) % steps_per_scale == 0) {
        float s_lo = step[0], s_hi = step[1];  // kV3: from the group's start
        if constexpr (kFmt != kV3) {
          const int grp = k0 >> group_shift;
          s_lo = __half2float(scales[static_cast<size_t>(rw0 + g) * groups + grp]);
          s_hi = __half2float(scales[static_cast<size_t>(rw0 + g + 8) * groups + grp]);
        }
#pragma unroll
        for (int j = 0; j < kT; ++j) {
          acc[j][0] = fmaf(s_lo, part[j][0], acc[j][0]), acc[j][1] = fmaf(s_lo, part[j][1], acc[j][1]);
          acc[j][2] = fmaf(s_hi, part[j][2], acc[j][2]), acc[j][3] = fmaf(s_hi, part[j][3], acc[j][3]);
#pragma unroll
          for (int i = 0; i < 4; ++i) part[j][i] = 0.0f;
        }
      }
    }
  }
  // This warp's share of the outliers of rows r0 + g (c0, c1) and r0 + g + 8 (c2, c3).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = rw0 + g + 8 * h;
    for (int e = indptr[row] + warp; e < indptr[row + 1]; e += kMmaWarps) {
      const float v = __half2float(values[e]);
      const int col = indices[e];
#pragma unroll
      for (int j = 0; j < kT; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int m = 8 * j + 2 * t + i;
          if (m < M)
            acc[j][2 * h + i] = fmaf(v, Act<T>::load(x[static_cast<size_t>(x_row0 + m) * K + col]), acc[j][2 * h + i]);
        }
    }
  }
  // +1 float per lane: a stride of 9 words puts the 32 lanes' stores in 32 different banks (8 would
  // fold them onto 4 banks, an 8-way conflict).
  __shared__ float partial[kMmaWarps][kWarp][kT * 4 + 1];
#pragma unroll
  for (int j = 0; j < kT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][4 * j + i] = acc[j][i];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kMmaWarps; ++w) sum += partial[w][lane][4 * j + i];
        const int m = 8 * j + 2 * t + (i & 1), n = r0 + g + (i >= 2 ? 8 : 0);
        if (m < M) store(m, n, sum);
      }
  }
}

}  // namespace eq
