// eq_gemv.cuh - the CUDA-core GEMV's core: one warp's kRowsPerWarp rows of W times up to kM batch rows, shared by
// eq_gemv.cu (a dense layer) and eq_moe.cu (one expert's tile of tokens). The design (thread mapping, batch tiles,
// double-buffered weight stream, outliers without atomics) is described at the top of eq_gemv.cu. Its epilogue is
// the caller's: `store(m, n, v)` receives each finished fp32 sum.
#pragma once
#include "eq_int4.cuh"

namespace eq {

constexpr int kMaxM = 16;        // largest batch one launch takes: acc[][] stays in registers
constexpr int kRowsPerWarp = 2;  // output rows per warp; grid = ceil(N / (blockDim.x / 32 * 2))

template <typename T, int kM, int kFmt, typename Store>
__device__ __forceinline__ void gemv_int4_rows(
    const T* __restrict__ x,             // [M, K] activations, row-major, 16-byte aligned
    const int4* __restrict__ qweight,    // [N, K/32] 128-bit chunks of the [N, K/8] int32 codes
    const __half* __restrict__ scales,   // [N, K/G] steps; kV3: [N] the row units d
    const uint8_t* __restrict__ zeros,   // kV2: [N, K/G] zero points; kV3: [N, K/G, 2] (a, zq); kV1: may be null
    const __half* __restrict__ colscale, // [K] (kV2, kV3; unused, may be null, for kV1)
    const int* __restrict__ indptr,      // [N + 1]
    const int* __restrict__ indices,     // [nnz]
    const __half* __restrict__ values,   // [nnz]
    int M, int N, int K, int G,
    int n0,         // the warp's first row: it owns rows n0 .. n0 + kRowsPerWarp - 1 (those < N)
    int w_row0,     // weights, steps, zero points and CSR rows are read at row w_row0 + n (a stacked expert: e N)
    int c_col0,     // column scales are read at c_col0 + k (a stacked expert: e K)
    int x_row0,     // activation rows are read at x_row0 + m (a tile of sorted rows: its first)
    Store store) {  // store(m, n, v): the caller's epilogue for y[m, n] = v (fp32, m < M, n < N), one lane each
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x % kWarp;
  // No early return: every thread reaches the shuffles below (the host emulation needs it).
  bool active[R];
  int row[R];  // rows read; an inactive second row re-reads row n0 (in bounds, never written): no branch in the loop
#pragma unroll
  for (int r = 0; r < R; ++r) {
    active[r] = n0 + r < N;
    row[r] = w_row0 + (active[r] ? n0 + r : n0);
  }
  x += static_cast<size_t>(x_row0) * K;
  if constexpr (kFmt != kV1) colscale += c_col0;
  float acc[R][kM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[r][m] = 0.0f;

  const int chunks = K / 32;
  const int groups = K / G;
  float unit[R] = {};               // kV3: each row's d (the steps are d a)
  const uint8_t* pairs_of[R] = {};  // kV3: each row's (a, zq) pairs, indexed by group (the row's 64-bit offset once,
                                    // not per chunk: 5 instructions per 512 B less, measured)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (kFmt == kV3) {
      unit[r] = __half2float(scales[row[r]]);
      pairs_of[r] = zeros + 2 * static_cast<size_t>(row[r]) * groups;
    }
  }
  // Group of chunk c: c * 32 / G, as a shift (G is a power of two, or G == K with one group and
  // group_shift = 31). A run-time division here cost ~18 instructions per chunk in SASS.
  const int group_shift = G == K ? 31 : __ffs(G / 32) - 1;

  // Registers double-buffer the weight stream: chunk c + 32's loads are issued before chunk c is
  // dequantized, so each lane keeps two rows x two chunks (64 bytes) in flight instead of waiting
  // a full HBM latency per iteration (with K = 4096 a lane only has 4 chunks to do).
  int4 next[R];
  __half next_s[R];
  uint32_t next_z[R] = {};  // kV2: the zero point; kV3: a | zq << 8 (one 16-bit load)
  auto fetch = [&](int c) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      next[r] = qweight[static_cast<size_t>(row[r]) * chunks + c];  // LDG.E.128: 32 codes
      if constexpr (kFmt == kV3) next_z[r] = load_meta(pairs_of[r], c >> group_shift);
      else next_s[r] = scales[static_cast<size_t>(row[r]) * groups + (c >> group_shift)];
      if constexpr (kFmt == kV2) next_z[r] = zeros[static_cast<size_t>(row[r]) * groups + (c >> group_shift)];
    }
  };
  if (active[0] && lane < chunks) fetch(lane);
  for (int c = lane; active[0] && c < chunks; c += kWarp) {
    uint32_t words[R][4], bias[R];
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      words[r][0] = uint32_t(next[r].x), words[r][1] = uint32_t(next[r].y);
      words[r][2] = uint32_t(next[r].z), words[r][3] = uint32_t(next[r].w);
      if constexpr (kFmt == kV3) {
        s[r] = v3_step(unit[r], next_z[r]);         // exact
        bias[r] = magic_bias_pair_v3(next_z[r]);  // 64 + zq / 16
      } else {
        s[r] = __half2float(next_s[r]);
        bias[r] = magic_bias_pair(next_z[r]);  // used by kV2 only (dead code for kV1)
      }
    }
    if (c + kWarp < chunks) fetch(c + kWarp);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float q[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) dequant_word_as<kFmt>(words[r][i], bias[r], q[r]);
      const T* xk = x + c * 32 + i * 8;
      constexpr bool kScaleX = kFmt != kV1 && kM == 1;  // where the column scale goes: see the top of eq_gemv.cu
      float cv[8];
      if constexpr (kFmt != kV1) {
        Act<__half>::load8(colscale + c * 32 + i * 8, cv);  // LDG.E.128: 8 column scales
        if constexpr (!kScaleX) {
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) q[r][j] *= cv[j];
        }
      }
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m <= kM / 2 || m < M) {  // kM / 2 < M: the first half of the tile is never masked
          float xv[8];
          Act<T>::load8(xk + static_cast<size_t>(m) * K, xv);  // LDG.E.128: 8 activations
          if constexpr (kScaleX) {
#pragma unroll
            for (int j = 0; j < 8; ++j) xv[j] *= cv[j];  // exact: see the top of the file
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) dot = fmaf(q[r][j], xv[j], dot);
            acc[r][m] = fmaf(s[r], dot, acc[r][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (active[r]) {
      for (int e = indptr[row[r]] + lane; e < indptr[row[r] + 1]; e += kWarp) {
        const float v = __half2float(values[e]);
        const int col = indices[e];
#pragma unroll
        for (int m = 0; m < kM; ++m)
          if (m < M) acc[r][m] = fmaf(v, Act<T>::load(x[static_cast<size_t>(m) * K + col]), acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if (m < M) {  // M is the same for the whole grid: the shuffles stay uniform
#pragma unroll
        for (int offset = kWarp / 2; offset > 0; offset /= 2)
          acc[r][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][m], offset);
        // After the butterfly every lane holds the sum: lane m % 32 writes it, so the up to
        // 2 * kM stores of a warp go out from different lanes in one instruction.
        if (active[r] && lane == m % kWarp) store(m, n0 + r, acc[r][m]);
      }
    }
  }
}

}  // namespace eq
