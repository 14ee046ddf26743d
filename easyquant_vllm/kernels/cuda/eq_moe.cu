// eq_moe.cu - EasyQuant mixture-of-experts layer on CUDA: every expert's tokens through the dense kernels' cores.
//
// The layer (docs/format.md, "Mixture-of-experts layers"): for each token x with router choices (e_j, p_j),
//     y = sum_j p_j * W2'_{e_j} (silu(Wg'_{e_j} x) * (Wu'_{e_j} x)),   w13 = [gate; up] [2I, H], w2 [H, I].
// easyquant_vllm/kernels/cuda_moe.py runs it as six steps, every one of fixed shape (no host synchronisation,
// so a CUDA graph can hold the layer):
//   1. eq_moe_route: the P = M * topk (token, slot) pairs grouped by expert. Sorted row s is one pair, expert
//      e's pairs are the rows start_e .. start_e + count_e - 1, and those rows are cut into tiles (below).
//   2. x rows gathered into that order (torch index_select): x_sorted [P, H].
//   3. up:   h[s] = W13'_e x_sorted[s]                  eq_moe_{mma,gemv}_int4_*, fp32 out [P, 2I]
//   4.       a[s] = silu(h[s, :I]) * h[s, I:]           eq_moe_silu_mul_*, fp32, rounded once to T [P, I]
//   5. down: y_pair[pair(s)] = p(s) * W2'_e a[s]        eq_moe_{mma,gemv}_int4_*, fp32 out [P, H]
//   6.       y[t] = sum_j y_pair[t * topk + j]          eq_moe_sum_*, fp32 in slot order, rounded once to T
//
// Tiles. A tile is (expert e, first sorted row s0, rows): rows s0 .. s0 + rows - 1, all of expert e. Each
// projection has a layout, and with it a family of tile heights (its batch tiles): the tensor cores' 8, 16,
// 32, 64 rows (eq_mma.cuh, kT = 1, 2, 4, 8) or the GEMV's 1, 2, 4, 8, 16 rows (eq_gemv.cuh, kM). An expert
// with c rows gets floor(c / top) full tiles of the top height, and its remainder r = c mod top goes to the
// height T with T / 2 < r <= T (the smallest that holds it; to the top height if r > top / 2). So every tile
// satisfies its core's contract T / 2 < rows <= T (the first half of a batch tile is never masked), an expert
// with one token in decode runs the 1-row GEMV or the 8-row tensor-core tile (one mma covers 8 tokens at the
// cost of one, docs/kernels.md), and an expert with many tokens runs 64-row tiles: one pass over its weights
// per 64 tokens. One launch per projection and height ("tile class"); a class's tiles are listed in
// tiles[class][i] = {e, s0, rows}, num_tiles[class] of them.
//
// Launch shape. Grids cannot depend on the routing (a CUDA graph replays the captured grid), so every
// launch is sized from M, topk and E: a static bound on the class's tiles (cuda_moe.tile_bounds) times the
// blocks of one tile. Block b works on row block rb = b % row_blocks of the weights (16 rows for the tensor
// cores, 8 for the GEMV's 4 warps x 2 rows) of tile t = b / row_blocks; a block with t >= num_tiles[class] reads
// that one int and returns, before any barrier. (A grid-stride loop over tiles would spare those blocks but
// kept 20-30 more registers live on sm_80.) Every output element has one owner block, so there are no atomics
// outside the routing.
//
// Layouts, stacked over the E experts (expert e's slice is exactly what the dense kernel reads):
//   qweight   [E, N/16, K/64, 32] int4 words, the MMA layout of mma_layout.py (tensor cores), or
//             [E, N, K/8] int32, the checkpoint's (GEMV): N * K / 32 words per expert either way
//   scales    [E, N, K/G] fp16;  zeros [E, N, K/G] uint8 and colscale [E, K] fp16 (format version 2; the tensor
//             cores with bf16 activations take split_col_scale's [E, 2K]); format version 3: scales [E, N] (the row
//             units), zeros [E, N, K/G, 2] (the (a, zq) pairs) and colscale as version 2's
//   indptr    [E * N + 1] int32: one running CSR over all experts' rows (expert e's row n is row e * N + n);
//   indices, values [nnz] int32 / fp16 of all experts, in the original domain (no column scale), as in the dense
//   kernels: the warp that owns an output row adds its outliers.
//
// Requires (checked by cuda_moe.py): K % 32 == 0 (tensor cores: N % 16 == 0 and K % 64 == 0), G a power of two
// >= 32 dividing K or G == K, E <= kMoeMaxExperts, 16-byte aligned tensors.
#include "eq_gemv.cuh"
#include "eq_mma.cuh"

namespace eq {

constexpr int kMoeMaxExperts = 1024;  // the routing counts experts in shared memory (2 x 4 KiB)
constexpr int kMoeMaxClasses = 5;     // tile heights per family: the GEMV's 1, 2, 4, 8, 16
constexpr int kMoeStages = 2;         // up (w13) and down (w2): each has its own tile classes

// An id outside [0, E) (vLLM's -1 for an expert another rank holds) goes to bin E: no tile, no output.
__device__ __forceinline__ int expert_bin(int id, int E) {
  return static_cast<unsigned>(id) < static_cast<unsigned>(E) ? id : E;
}

// One block of any size. Shared memory holds the per-expert counts; everything else is atomics on them, so the
// order of the experts' row ranges and of the tiles within a class depends on timing. No result does: each
// sorted row is computed on its own (a tile's batch rows never mix), and step 6 sums the slots in slot order.
__device__ __forceinline__ void moe_route(
    const int* __restrict__ topk_ids,        // [P] int32, P = M * topk: the expert of pair p = token * topk + slot
    const float* __restrict__ topk_weights,  // [P] fp32: the router weight of pair p
    int* __restrict__ src_rows,              // [P] out: the token (row of x) of sorted row s
    int* __restrict__ y_rows,                // [P] out: the pair of sorted row s (its row of y_pair)
    float* __restrict__ y_scale,             // [P] out: the router weight of sorted row s (0 for an id outside [0, E))
    int* __restrict__ tiles,                 // [2, kMoeMaxClasses, max_tiles, 3] out: {e, s0, rows} per stage, class
    int* __restrict__ num_tiles,             // [2, kMoeMaxClasses] out: tiles of each stage and class
    int P, int topk, int E,
    int tile0_up, int classes_up,            // up (w13): heights tile0_up << c, c < classes_up (<= kMoeMaxClasses)
    int tile0_down, int classes_down,        // down (w2): the same for its layout
    int max_tiles) {                         // the static bound on any class's tiles (cuda_moe.tile_bounds)
  __shared__ int count[kMoeMaxExperts + 1];   // pairs of each expert; [E]: pairs with an id outside [0, E)
  __shared__ int cursor[kMoeMaxExperts + 1];  // the next free sorted row of each expert
  __shared__ int used;                        // sorted rows handed out so far
  __shared__ int class_tiles[kMoeStages][kMoeMaxClasses];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) count[e] = 0;
  if (threadIdx.x < kMoeStages * kMoeMaxClasses) (&class_tiles[0][0])[threadIdx.x] = 0;
  if (threadIdx.x == 0) used = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&count[expert_bin(topk_ids[p], E)], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int c = count[e];
    const int start = atomicAdd(&used, c);
    cursor[e] = start;
#pragma unroll
    for (int stage = 0; stage < kMoeStages; ++stage) {
      const int tile0 = stage == 0 ? tile0_up : tile0_down, classes = stage == 0 ? classes_up : classes_down;
      const int top = tile0 << (classes - 1);
      const int full = c / top, rem = c - full * top;
      for (int k = 0; k < classes; ++k) {
        const int hi = tile0 << k, lo = k == 0 ? 0 : hi / 2;
        const bool last = k == classes - 1;
        const int n = (last ? full : 0) + (rem > lo && rem <= hi ? 1 : 0);  // rem < top: the top class takes r > top/2
        const int base = n > 0 ? atomicAdd(&class_tiles[stage][k], n) : 0;
        for (int j = 0; j < n && base + j < max_tiles; ++j) {
          int* tile = tiles + ((static_cast<size_t>(stage) * kMoeMaxClasses + k) * max_tiles + base + j) * 3;
          tile[0] = e;
          tile[1] = last ? start + j * top : start + full * top;  // the top class: the full tiles, then the rest
          tile[2] = last ? (c - j * top < top ? c - j * top : top) : rem;
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) cursor[E] = used;  // pairs that no expert takes: the rows after all experts' rows
  if (threadIdx.x < kMoeStages * kMoeMaxClasses) {
    const int n = (&class_tiles[0][0])[threadIdx.x];
    num_tiles[threadIdx.x] = n < max_tiles ? n : max_tiles;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int e = expert_bin(topk_ids[p], E);
    const int s = atomicAdd(&cursor[e], 1);
    src_rows[s] = p / topk;
    y_rows[s] = p;
    y_scale[s] = e < E ? topk_weights[p] : 0.0f;
  }
}

// The epilogue of both products: sorted row s = s0 + m of the tile goes to y[rows[s]] scaled by scale[s] (down:
// the pair's row and its router weight), or to y[s] as it is (up: rows and scale null). fp32, so neither h nor
// a pair's product is rounded before the activation or the sum.
struct PairStore {
  float* y;            // [*, N] fp32
  const int* rows;     // [P] or null
  const float* scale;  // [P] or null
  int s0, N;
  __device__ __forceinline__ void operator()(int m, int n, float v) const {
    const int s = s0 + m;
    const size_t row = rows ? static_cast<size_t>(rows[s]) : static_cast<size_t>(s);
    y[row * N + n] = scale ? scale[s] * v : v;
  }
};

// One tile class of one projection. Expert e's weights start e * N * K / 32 words into qweight in both
// layouts; its steps, zero points and CSR rows e * N rows in.
template <typename T, int kTile, int kFmt, bool kMma>
__device__ __forceinline__ void moe_gemm(
    const T* __restrict__ x,             // [P, K] activations in sorted order, 16-byte aligned
    const int4* __restrict__ qweight,    // [E] x the dense kernel's layout (see the top of the file)
    const __half* __restrict__ scales,   // [E, N, K/G] steps; kV3: [E, N] the row units d
    const uint8_t* __restrict__ zeros,   // kV2: [E, N, K/G] zero points; kV3: [E, N, K/G, 2] (a, zq); kV1: null
    const __half* __restrict__ colscale, // [E, K], or [E, 2K] (tensor cores, bf16) (kV2, kV3; null for kV1)
    const int* __restrict__ indptr,      // [E * N + 1]
    const int* __restrict__ indices,     // [nnz]
    const __half* __restrict__ values,   // [nnz]
    const int* __restrict__ tiles,       // [max_tiles, 3] this class's {e, s0, rows}
    const int* __restrict__ num_tiles,   // [1] how many of them are real
    const int* __restrict__ y_rows,      // [P] or null (see PairStore)
    const float* __restrict__ y_scale,   // [P] or null
    float* __restrict__ y,               // [P, N] fp32
    int max_tiles,                       // tiles the grid covers: the class's static bound (cuda_moe.tile_bounds)
    int N, int K, int G) {               // one expert's [N, K] and its group size (G == K: per channel)
  const int rows_per_block = kMma ? 16 : blockDim.x / kWarp * kRowsPerWarp;
  const unsigned row_blocks = (N + rows_per_block - 1) / rows_per_block;
  const unsigned rb = blockIdx.x % row_blocks;
  const int t = blockIdx.x / row_blocks, real = *num_tiles;
  if (t >= real || t >= max_tiles) return;  // a slot the routing left empty: the whole block leaves, before any barrier
  const int* tile = tiles + 3 * t;
  const int e = tile[0], s0 = tile[1], rows = tile[2];
  const PairStore store{y, y_rows, y_scale, s0, N};
  // The cores index the stacked tensors from expert e's first row and column (e N, e K) and the activations from
  // the tile's first sorted row, so the base pointers stay kernel parameters (constant bank) instead of registers.
  if constexpr (kMma) {
    mma_int4_tile<T, kTile, kFmt>(x, qweight, scales, zeros, colscale, indptr, indices, values, rows, K, G, rb, e * N,
                                 e * K, s0, store);
  } else {
    const int n0 = (rb * (blockDim.x / kWarp) + threadIdx.x / kWarp) * kRowsPerWarp;
    gemv_int4_rows<T, kTile, kFmt>(x, qweight, scales, zeros, colscale, indptr, indices, values, rows, N, K, G, n0,
                                  e * N, e * K, s0, store);
  }
}

// a[s, i] = silu(g) * u with g = h[s, i], u = h[s, I + i] (h = [gate | up] rows of w13), in fp32, rounded once.
// Block b takes rows b, b + gridDim.x, ...; its threads the columns: coalesced, no division per element.
template <typename T>
__device__ __forceinline__ void moe_silu_mul(const float* __restrict__ h,  // [P, 2I] fp32
                                             T* __restrict__ a,            // [P, I] out
                                             int P, int I) {
  for (int s = blockIdx.x; s < P; s += gridDim.x) {
    const float* hs = h + static_cast<size_t>(s) * 2 * I;
    for (int i = threadIdx.x; i < I; i += blockDim.x) {
      const float g = hs[i], u = hs[I + i];
      a[static_cast<size_t>(s) * I + i] = Act<T>::store(g / (1.0f + expf(-g)) * u);
    }
  }
}

// y[t, n] = sum_j y_pair[t * topk + j, n] over the slots j whose expert exists, in slot order (fp32), rounded once.
template <typename T>
__device__ __forceinline__ void moe_sum(const float* __restrict__ y_pair,  // [M * topk, H] fp32 (step 5)
                                        const int* __restrict__ topk_ids,  // [M * topk] int32
                                        T* __restrict__ y,                 // [M, H] out
                                        int M, int topk, int H, int E) {
  for (int t = blockIdx.x; t < M; t += gridDim.x) {
    for (int n = threadIdx.x; n < H; n += blockDim.x) {
      float acc = 0.0f;
      for (int j = 0; j < topk; ++j) {
        const int p = t * topk + j;
        if (expert_bin(topk_ids[p], E) < E) acc += y_pair[static_cast<size_t>(p) * H + n];
      }
      y[static_cast<size_t>(t) * H + n] = Act<T>::store(acc);
    }
  }
}

}  // namespace eq

// C names for CuPy's RawModule (the launch plans of kernels/cuda_moe.py name them; tests check the argument order
// against these signatures). All products share one signature; format version 1 passes null for zeros and
// colscale, the up stage null for y_rows and y_scale; _v2 / _v3: format versions 2 / 3.
//   eq_moe_route                                       1 block
//   eq_moe_mma_int4_{f16,bf16}_t{1,2,4,8}[_v2|_v3]     tile classes of 8 kT rows; blocks of 8 warps, 16 weight rows
//   eq_moe_gemv_int4_{f16,bf16}_m{1,2,4,8,16}[_v2|_v3] tile classes of kM rows; blocks of 4 warps, 8 weight rows
//   eq_moe_silu_mul_{f16,bf16}, eq_moe_sum_{f16,bf16}
extern "C" __global__ void eq_moe_route(const int* topk_ids, const float* topk_weights, int* src_rows, int* y_rows,
                                        float* y_scale, int* tiles, int* num_tiles, int P, int topk, int E,
                                        int tile0_up, int classes_up, int tile0_down, int classes_down,
                                        int max_tiles) {
  eq::moe_route(topk_ids, topk_weights, src_rows, y_rows, y_scale, tiles, num_tiles, P, topk, E, tile0_up,
                classes_up, tile0_down, classes_down, max_tiles);
}

#define EQ_MOE_GEMM_ENTRY_AS(NAME, T, TILE, FMT, MMA)                                                           \
  extern "C" __global__ void NAME(const T* x, const int4* qweight, const __half* scales, const uint8_t* zeros,   \
                                  const __half* colscale, const int* indptr, const int* indices,                 \
                                  const __half* values, const int* tiles, const int* num_tiles,                  \
                                  const int* y_rows, const float* y_scale, float* y, int max_tiles, int N, int K, \
                                  int G) {                                                                       \
    eq::moe_gemm<T, TILE, FMT, MMA>(x, qweight, scales, zeros, colscale, indptr, indices, values, tiles,          \
                                   num_tiles, y_rows, y_scale, y, max_tiles, N, K, G);                           \
  }
#define EQ_MOE_GEMM_ENTRY(KIND, SUFFIX, T, LETTER, TILE, MMA)                                          \
  EQ_MOE_GEMM_ENTRY_AS(eq_moe_##KIND##_int4_##SUFFIX##_##LETTER##TILE, T, TILE, eq::kV1, MMA)       \
  EQ_MOE_GEMM_ENTRY_AS(eq_moe_##KIND##_int4_##SUFFIX##_##LETTER##TILE##_v2, T, TILE, eq::kV2, MMA) \
  EQ_MOE_GEMM_ENTRY_AS(eq_moe_##KIND##_int4_##SUFFIX##_##LETTER##TILE##_v3, T, TILE, eq::kV3, MMA)
#define EQ_MOE_ENTRIES(SUFFIX, T)                                                                              \
  EQ_MOE_GEMM_ENTRY(mma, SUFFIX, T, t, 1, true)                                                                \
  EQ_MOE_GEMM_ENTRY(mma, SUFFIX, T, t, 2, true)                                                                \
  EQ_MOE_GEMM_ENTRY(mma, SUFFIX, T, t, 4, true)                                                                \
  EQ_MOE_GEMM_ENTRY(mma, SUFFIX, T, t, 8, true)                                                                \
  EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, 1, false)                                                              \
  EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, 2, false)                                                              \
  EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, 4, false)                                                              \
  EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, 8, false)                                                              \
  EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, 16, false)                                                             \
  extern "C" __global__ void eq_moe_silu_mul_##SUFFIX(const float* h, T* a, int P, int I) {                    \
    eq::moe_silu_mul<T>(h, a, P, I);                                                                           \
  }                                                                                                            \
  extern "C" __global__ void eq_moe_sum_##SUFFIX(const float* y_pair, const int* topk_ids, T* y, int M, int topk, \
                                                 int H, int E) {                                               \
    eq::moe_sum<T>(y_pair, topk_ids, y, M, topk, H, E);                                                        \
  }
EQ_MOE_ENTRIES(f16, __half)
EQ_MOE_ENTRIES(bf16, __nv_bfloat16)
