// EasyQuant int4 (and int8) linear for x86 CPUs: the GEMM, the CSR outliers and the bias in one op call.
//
//   easyquant::cpu_int4_linear(x [M, K] bf16/fp16, w_q, scales, zeros?, col_scale?, indptr, indices, values,
//                               bias?, G, plan, row_steps?) -> y [M, N] in x's dtype,   y = x @ W'^T + bias,
//   W'[n, k] = c[k] * (s[n, k / G] * (u[n, k] - z[n, k / G])) + S[n, k]   (z = 2^(bits-1), c = 1 when not given)
//
// with the step s and zero point z of each group as the checkpoint's format version stores them
// (docs/format.md):
//   versions 1 and 2: s = scales (fp16), z = zeros (uint8, an integer code) or 2^(bits-1)
//   version 3 (row_steps given): s = d[n] * a (the row's unit times the group's uint8 multiplier in scales: exact
//                                in fp32), z = zq * 2^(bits-8) (sixteenths of a 4-bit code, whole 8-bit codes:
//                                exact, a real zero point)
//
// The column scale multiplies the activations once per call (x * c, in fp32; rounded to bf16 for the bf16
// paths), and the outliers take the unscaled x: they are in the original domain (docs/format.md).
//
// Why our own kernel: vLLM's and PyTorch's int4 CPU GEMMs ran at ~0.5x of the unquantized model in vLLM's
// compiled mode on AVX512 machines: 3-5x slower than a dense bf16 GEMM at 16 batch rows, and the outliers
// went through a general sparse product (MKL CSR, ~3 ns per outlier plus a float copy of x) in separate
// ops. Here every path reads the codes once per 16 output rows, keeps them exact (integer codes; the step
// applied in fp32, so W' is never rounded except where the reference rounds it), and adds each row's
// outliers while that row's outputs are still in a small fp32 buffer.
//
// Weight layout (built at load by easyquant_vllm/kernels/cpu_native.py: a transpose of the checkpoint's
// words, the nibbles stay where they are), per block of 16 output rows:
//
//   w_q     int32 [N/16, K/8, 16]   dword (b, q, j) = qweight[16b + j, q]: row 16b+j, columns 8q..8q+7,
//                                   column 8q+i in bits 4i..4i+3 (the checkpoint's word)
//           int32 [N/16, K/4, 16]   8-bit codes, the same transpose: columns 4q..4q+3, column 4q+i in bits
//                                   8i..8i+7. The op tells the width from w_q's size (K/8 or K/4 words per row);
//                                   8-bit codes (a quantized lm_head, docs/format.md) take the i16, vnni, amx
//                                   and dequant paths only.
//   scales  fp16  [N/16, K/G, 16]   step of rows 16b..16b+15 for group g, contiguous per block; format version 3:
//           uint8                   the steps' multipliers a, in the same layout
//   zeros   uint8 [N/16, K/G, 16]   zero point of rows 16b..16b+15 for group g (format version 2: a code; 3: in
//                                   sixteenths of a code), or none
//   row_steps fp32 [N]              step unit d of each row (format version 3), or none
//   col_scale fp32 [K]              column scale (format versions 2 and 3), or none
//   indptr  int32 [N+1], indices int32 [nnz], values fp32 [nnz]   (the checkpoint's CSR, values widened)
//
// Why 16 rows side by side: one 64-byte load puts row j's word in lane j. Shifting it right by 8t leaves the
// codes of columns (8q + 2t, 8q + 2t + 1) in bits 0-7 of every lane: exactly the (k, k+1) pair that both
// vdpbf16ps (AVX512-BF16) and the AMX B tile (VNNI: row = k-pair, 16 columns x 2 bf16) want in one dword.
// Two ternary-logic operations turn the pair into bf16 values 128 + u (see bf16_codes): no shuffles, so
// the shuffle port stays free for the broadcasts of x. The offset is removed per group with the group's sum
// of x (x . (u + 128) - (128 + z) sum(x) = x . (u - z)), computed once per call.
//
// Paths (``plan`` picks one per M, see cpu_native.py; each is compiled for its ISA with a target attribute
// and only called where the CPU has it):
//   kFma     AVX2 + FMA: codes -> fp32 s*(u-z) (exact in versions 1 and 2: an 11-bit step times a 4-bit code;
//            rounded once in version 3, as the reference), FMA with fp32 x. Any x86-64 CPU of the last decade.
//   kI16     AVX2: x * c rounded to 16-bit fixed point per batch row and sub-block of at most 128 columns
//            (|error| <= max|x * c| / 65534 per element, the max taken over the sub-block), the codes left
//            as integers: vpmaddwd multiplies code pairs with x pairs (16 MACs per instruction, 8 for an
//            FMA) into int32 sums per sub-block, scaled once per sub-block in fp32. W' stays exact. fp16 too.
//   kI8      AVX2, opt-in: x * c rounded to int8 per batch row and 32 columns (|error| <= max|x * c| / 254), as
//            llama.cpp's Q8 activations; vpmaddubsw multiplies code bytes with x bytes (32 MACs per
//            instruction) into int16 sums per 32 columns. W' stays exact; x is not (see the path's comment).
//   kVnni    AVX512-VNNI: kI16's arithmetic (same x, same int32 sums, same epilogue: the same outputs bit for
//            bit), a word of all 16 rows in one zmm and vpdpwssd (32 MACs and the add in one instruction).
//   kBf16Dp  AVX512-BF16: bf16 codes, vdpbf16ps per group, the group sum corrected and scaled in fp32.
//   kAmx     AMX-BF16 (+ AVX512-VBMI): each 32 columns' codes written as a 1 KB B tile into an L1 ring, tdpbf16ps
//            against x pre-laid-out as 16-row A tiles; per group a second tdpbf16ps adds the zero point to the C
//            tile, which is stored and scaled in fp32.
//            8-bit codes: two B tiles per 32 columns, one per nibble, into the same C tile (amx_b_tiles).
//   kDequant W' [N, K] in x's dtype (bit-identical to the reference dequantize, outliers included), then
//            ATen's GEMM (oneDNN; AMX where present): for prefill-sized M, where the GEMM dominates.
#include "eq_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlockN = 16;   // output rows per block: one zmm (or two ymm) of fp32 lanes
constexpr int64_t kChunkK = 256;  // columns per fp32 panel of the kFma path: 16 rows x 256 x 4 B = 16 KB, in L1
constexpr float kCodeBase = 128.0f;  // bf16 codes hold 128 + u
constexpr int64_t kPrefetchWords = 16;  // software prefetch distance in 64-byte lines of codes
// The work of reading one 16-row block's codes and metadata, in batch rows of arithmetic on them: how
// cpu_int4_linear_jobs weighs a block of a linear with M rows (M + 2) when it splits the blocks over the threads.
constexpr int64_t kBlockReadRows = 2;

// The ids are the plan's ints (cpu_native.PATHS): a new path takes the next id, the others keep theirs.
enum Path : int64_t { kFma = 0, kBf16Dp = 1, kAmx = 2, kDequant = 3, kI16 = 4, kI8 = 5, kVnni = 6, kNumPaths = 7 };

std::atomic<int64_t> g_path_calls[kNumPaths];  // how often each path ran (the tests' dispatch counter)

// Everything a path needs, as raw pointers (set up per linear by weights_problem and prepare_x).
struct Problem {
  int64_t m, n, k, g;
  int64_t bits;            // code width: 4, or 8 (the i16, vnni, amx and dequant paths only)
  float sym_zero;          // z without zero points: 2^(bits - 1)
  float zero_unit;         // format version 3: a zero byte's unit in codes, 2^(bits - 8)
  int64_t groups;          // K / G, computed once: the paths' vector stores may alias P (the intrinsics store
                           // through may_alias types), so the compiler reloads P after them and K / G written in a
                           // loop is a 64-bit division per group
  const uint32_t* w;       // [N/16][K * bits / 32][16]
  const uint16_t* s;       // [N/16][K/G][16] fp16 bits of the steps (format versions 1 and 2), or null
  const uint8_t* a;        // [N/16][K/G][16] step multipliers (format version 3), or null
  const float* d;          // [N] step unit of each row (format version 3), or null
  const uint8_t* z;        // [N/16][K/G][16] zero points (version 3: sixteenths of a code), or null (symmetric: 8)
  const int32_t* indptr;   // [N+1]
  const int32_t* indices;  // [nnz]
  const float* values;     // [nnz]
  const float* xf;         // [M][K] x in fp32, unscaled (the outliers; amx: only at M <= 2, else xt)
  const float* xs;         // [M][K] x * c in fp32 (the fma path; = xf without a column scale)
  const uint16_t* xh;      // [M][K] 16-bit x * c (bf16 paths read a pair of them as one dword)
  const float* xsum;       // [M][K/G] sum of xh over each group (bf16dp), or null (the amx path's sums are in
                           // xcorr)
  const float* xt;         // [K][mp] x^T in fp32, mp = M rounded up to xt_lanes (outliers that many batch rows at
                           // a time: 16 with AVX512, 8 with AVX2), or null
  int64_t mp, xt_lanes;    // xt_lanes: 0 where xt is null
  const uint16_t* xtile;   // [ceil(M/16)][amx_slice_tiles(K)][16][32] x as whole AMX A tiles (1 KB each; K/32 used
                           // per slice), zero rows past M, on a page, or null
  const uint16_t* xcorr;   // [ceil(M/16)][K/G][16][6] bf16 -(h, h, m, m, l, l), h + m + l = xsum * 2^e: the amx
                           // path's zero-point tiles (amx_slice), zero rows past M, or null
  float zero_scale;        // 2^-e: the amx path's B' holds (base + z) * 2^-e (prepare_amx_x says why)
  int64_t xg;              // columns per x sub-block of the i16 path (divides G), else 0
  int64_t xblocks;         // K / xg (computed once, as groups)
  const uint32_t* xq;      // [M][K/2] int16 pairs of x * c, i16 layout (StoreI16); [M][K/4] int8 quads, i8 layout
                           // (StoreI8); or null
  const float* xsigma;     // [M][K/xg] step of xq per sub-block (x * c ~ sigma * xq; i8: xg = 32)
  const float* xqsum;      // [M][K/xg] sum of xq over the sub-block (exact: |sum| <= 128 * 32767 < 2^24)
};

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// ---- fp32 <-> bf16 / fp16, 8 at a time (AVX2) ----------------------------------------------------------

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

__attribute__((target("avx2,fma,f16c"))) inline void store8(at::Half* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx2,fma,f16c"))) inline void store8(at::BFloat16* out, __m256 v) {
  // Round to nearest even, as torch's float -> bfloat16 (no NaN occurs: steps, codes and x are finite).
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 words in lane order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// ---- group metadata: each group's step and zero point for the 16 rows of a block ------------------------
//
// One helper per ISA decodes a group's 16 steps s and zero points z, whatever the format version stores:
//   versions 1 and 2: s = the fp16 step;  z = the uint8 zero point (a code), or 2^(bits-1) (8; 128 for 8-bit
//                     codes) without zero points
//   version 3:        s = d * a, the row's unit times the group's uint8 multiplier (an 11-bit mantissa times an
//                     8-bit integer: exact in fp32);  z = zq * 2^(bits-8) (exact: sixteenths of a 4-bit code,
//                     whole 8-bit codes)
// The units d of a block's 16 rows are loaded once per block (units8, units16). So every path's hot loop is
// the same for all versions; only its per-group epilogue reads (s, z), through these helpers.


// Index of group gi's first entry (row 16b) in the blocked [N/16][K/G][16] metadata.
inline int64_t group_entry(const Problem& P, int64_t b, int64_t gi) { return (b * P.groups + gi) * kBlockN; }

// s and z of one row (16b + j) as the scalar code (dequant) reads them.
inline float row_step(const Problem& P, int64_t b, int64_t gi, int64_t j) {
  const int64_t e = group_entry(P, b, gi) + j;
  return P.a ? P.d[b * kBlockN + j] * static_cast<float>(P.a[e]) : half_to_float(P.s[e]);
}

inline float row_zero(const Problem& P, int64_t b, int64_t gi, int64_t j) {
  if (!P.z) return P.sym_zero;
  const float z = static_cast<float>(P.z[group_entry(P, b, gi) + j]);
  return P.a ? z * P.zero_unit : z;
}

struct Units8 {  // the step units d of a block's rows 0-7 and 8-15 (format version 3; zero otherwise)
  __m256 d0, d1;
};

__attribute__((target("avx2,fma,f16c"))) inline Units8 units8(const Problem& P, int64_t b) {
  if (!P.d) return {_mm256_setzero_ps(), _mm256_setzero_ps()};
  return {_mm256_loadu_ps(P.d + b * kBlockN), _mm256_loadu_ps(P.d + b * kBlockN + 8)};
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 bytes8(const uint8_t* p) {  // 8 uint8 -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

struct Steps8 {  // one group's s and z for the 16 rows (rows 0-7, rows 8-15)
  __m256 s0, s1, z0, z1;
};

__attribute__((target("avx2,fma,f16c"))) inline Steps8 group_steps8(const Problem& P, const Units8& units, int64_t b,
                                                                    int64_t gi) {
  const int64_t e = group_entry(P, b, gi);
  Steps8 st;
  if (P.a) {
    st.s0 = _mm256_mul_ps(units.d0, bytes8(P.a + e));
    st.s1 = _mm256_mul_ps(units.d1, bytes8(P.a + e + 8));
  } else {
    st.s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(P.s + e)));
    st.s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(P.s + e + 8)));
  }
  if (!P.z) {
    st.z0 = st.z1 = _mm256_set1_ps(P.sym_zero);
  } else if (P.a) {
    st.z0 = _mm256_mul_ps(bytes8(P.z + e), _mm256_set1_ps(P.zero_unit));
    st.z1 = _mm256_mul_ps(bytes8(P.z + e + 8), _mm256_set1_ps(P.zero_unit));
  } else {
    st.z0 = bytes8(P.z + e);
    st.z1 = bytes8(P.z + e + 8);
  }
  return st;
}

// ---- kFma: AVX2 + FMA + F16C ------------------------------------------------------------------------

// W' / c of one group's 16 rows in fp32, in one of two ways (kFrac: format version 3's fractional zeros):
//   integer z: fma(u, s, c) with c = -z s. -z s is exact (a 4-bit zero times an fp16 step), the FMA
//              rounds s u - z s once, and s (u - z) is representable: exact, one instruction per 8 weights.
//   kFrac:     (u - z) * s with c = z. u - z is exact (sixteenths below 16 in magnitude: 8 significant bits), the
//              product with the 19-bit step is rounded once: exactly the reference's W' (s z would not be exact,
//              so the FMA form would round differently).
struct FmaSteps {
  __m256 s0, s1, c0, c1;
};

template <bool kFrac>
__attribute__((target("avx2,fma,f16c"))) inline FmaSteps fma_steps(const Steps8& g) {
  if constexpr (kFrac) return {g.s0, g.s1, g.z0, g.z1};
  const __m256 zero = _mm256_setzero_ps();
  return {g.s0, g.s1, _mm256_mul_ps(g.s0, _mm256_sub_ps(zero, g.z0)), _mm256_mul_ps(g.s1, _mm256_sub_ps(zero, g.z1))};
}

// W' / c of column 8q + i for the 16 rows in fp32, from their words d0 (rows 0-7) and d1 (rows 8-15).
template <bool kFrac>
__attribute__((target("avx2,fma,f16c"))) inline void fma_column(__m256i d0, __m256i d1, int i, const FmaSteps& st,
                                                                __m256& w0, __m256& w1) {
  const __m256i lo_mask = _mm256_set1_epi32(0xF);
  const __m256i shift = _mm256_set1_epi32(4 * i);
  const __m256 u0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(d0, shift), lo_mask));
  const __m256 u1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(d1, shift), lo_mask));
  if constexpr (kFrac) {
    w0 = _mm256_mul_ps(_mm256_sub_ps(u0, st.c0), st.s0);
    w1 = _mm256_mul_ps(_mm256_sub_ps(u1, st.c1), st.s1);
  } else {
    w0 = _mm256_fmadd_ps(u0, st.s0, st.c0);
    w1 = _mm256_fmadd_ps(u1, st.s1, st.c1);
  }
}

// One or two batch rows straight from the codes. Two accumulator pairs per row (even and odd columns), so
// that the FMA latency stays hidden at M = 1.
template <int R, bool kFrac>
__attribute__((target("avx2,fma,f16c"))) void fma_direct(const Problem& P, int64_t b, int64_t m0, float* acc) {
  const int64_t words = P.k / 8, words_per_group = P.g / 8;
  const uint32_t* wb = P.w + b * words * kBlockN;
  const Units8 units = units8(P, b);
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < P.groups; ++gi) {
    const FmaSteps st = fma_steps<kFrac>(group_steps8(P, units, b, gi));
    for (int64_t q = gi * words_per_group; q < (gi + 1) * words_per_group; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + (q + kPrefetchWords) * kBlockN), _MM_HINT_T0);
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlockN));
      const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlockN + 8));
      for (int i = 0; i < 8; ++i) {
        __m256 w0, w1;
        fma_column<kFrac>(d0, d1, i, st, w0, w1);
        const int h = 2 * (i & 1);
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(P.xs + (m0 + r) * P.k + 8 * q + i);
          a[r][h] = _mm256_fmadd_ps(w0, xv, a[r][h]);
          a[r][h + 1] = _mm256_fmadd_ps(w1, xv, a[r][h + 1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + (m0 + r) * kBlockN, _mm256_add_ps(a[r][0], a[r][2]));
    _mm256_storeu_ps(acc + (m0 + r) * kBlockN + 8, _mm256_add_ps(a[r][1], a[r][3]));
  }
}

// More rows: W' of a 256-column chunk is written once to an fp32 panel in L1 (16 KB), then every batch
// row streams over it (4 rows at a time: 8 accumulators, two panel loads and eight FMAs per column).
template <bool kFrac>
__attribute__((target("avx2,fma,f16c"))) void fma_panel(const Problem& P, int64_t b, float* acc, float* panel) {
  const int64_t words_per_group = P.g / 8;
  const uint32_t* wb = P.w + b * (P.k / 8) * kBlockN;
  const Units8 units = units8(P, b);
  std::fill(acc, acc + P.m * kBlockN, 0.0f);
  FmaSteps st{};
  int64_t next_group = 0, gi = 0;  // the word where group gi starts (no division per word: see Problem::groups)
  for (int64_t k0 = 0; k0 < P.k; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, P.k - k0);
    for (int64_t q = k0 / 8; q < (k0 + kc) / 8; ++q) {  // panel[k - k0][16] = W'[rows, k]
      _mm_prefetch(reinterpret_cast<const char*>(wb + (q + kPrefetchWords) * kBlockN), _MM_HINT_T0);
      if (q == next_group) {
        st = fma_steps<kFrac>(group_steps8(P, units, b, gi++));
        next_group += words_per_group;
      }
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlockN));
      const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlockN + 8));
      for (int i = 0; i < 8; ++i) {
        __m256 w0, w1;
        fma_column<kFrac>(d0, d1, i, st, w0, w1);
        float* out = panel + (8 * q + i - k0) * kBlockN;
        _mm256_store_ps(out, w0);
        _mm256_store_ps(out + 8, w1);
      }
    }
    int64_t m = 0;
    for (; m + 4 <= P.m; m += 4) {
      __m256 a[4][2];
      for (int r = 0; r < 4; ++r) {
        a[r][0] = _mm256_loadu_ps(acc + (m + r) * kBlockN);
        a[r][1] = _mm256_loadu_ps(acc + (m + r) * kBlockN + 8);
      }
      for (int64_t kk = 0; kk < kc; ++kk) {
        const __m256 w0 = _mm256_load_ps(panel + kk * kBlockN), w1 = _mm256_load_ps(panel + kk * kBlockN + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 xv = _mm256_broadcast_ss(P.xs + (m + r) * P.k + k0 + kk);
          a[r][0] = _mm256_fmadd_ps(w0, xv, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(w1, xv, a[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(acc + (m + r) * kBlockN, a[r][0]);
        _mm256_storeu_ps(acc + (m + r) * kBlockN + 8, a[r][1]);
      }
    }
    for (; m < P.m; ++m) {
      __m256 a0 = _mm256_loadu_ps(acc + m * kBlockN), a1 = _mm256_loadu_ps(acc + m * kBlockN + 8);
      for (int64_t kk = 0; kk < kc; ++kk) {
        const __m256 xv = _mm256_broadcast_ss(P.xs + m * P.k + k0 + kk);
        a0 = _mm256_fmadd_ps(_mm256_load_ps(panel + kk * kBlockN), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_load_ps(panel + kk * kBlockN + 8), xv, a1);
      }
      _mm256_storeu_ps(acc + m * kBlockN, a0);
      _mm256_storeu_ps(acc + m * kBlockN + 8, a1);
    }
  }
}

// ---- kI16: AVX2 integer dot products (vpmaddwd) --------------------------------------------------------

// Why integers: the fma path spends four instructions on each column of 8 rows' codes (shift, and, int ->
// fp32, FMA with the step) before the FMAs with x, each of them 8 MACs: on AVX2 it is bound by instructions,
// not memory. Here a shift and an and turn 8 rows' words into two columns of codes, as int16 pairs, and one
// vpmaddwd multiplies them with two int16 values of x: 16 MACs, no conversion. The price is x in 16-bit
// fixed point (below).
//
// Code pairs: (word >> 4t) & 0x000F000F holds u[8q + t] in bits 0-3 and u[8q + 4 + t] in bits 16-19 of each
// lane, t = 0..3: the int16 pair (u[8q + t], u[8q + 4 + t]). x is laid out to match (StoreI16): one
// dword per pair, (xq[8q + t], xq[8q + 4 + t]), so a single broadcast serves the 8 rows of a ymm, and
// vpmaddwd gives u[8q + t] xq[8q + t] + u[8q + 4 + t] xq[8q + 4 + t] per row (codes 0..15 are non-negative
// int16, as the signed multiply wants).
//
// Overflow: a product pair is at most 2 * 15 * 32767 = 983,010 in magnitude, and the int32 sums run over one
// sub-block of x, at most 128 columns (64 pairs): at most 6.3e7, far below 2^31. Per channel (G = K) the
// sub-block is the largest of 128, 96, 64, 32 dividing K: quantizing x per 128 columns rather than per K
// also keeps a large activation in one place from coarsening x everywhere else (and int32 sums over K >
// 4368 columns could overflow).
//
// 8-bit codes (a quantized lm_head): (word >> 8t) & 0x00FF00FF holds u[4q + t] and u[4q + 2 + t], t = 0, 1, the
// int16 pair (u[4q + t], u[4q + 2 + t]); StoreI16<8> lays x out to match. A product pair is at most 2 * 255 *
// 32767 = 16,711,170, so 64 pairs (a 128-column sub-block) sum to at most 1.07e9 < 2^31: the same sub-blocks.
//
// Per sub-block and 16-row block, the int32 sums become fp32 once (i16_epilogue):
//   y += sigma * (scale * acc - offset * sum(xq)),   scale = s, offset = s * z
// since x * c ~ sigma * xq and W'[n, k] / c[k] = s (u - z). The codes stay integers whatever z is: format
// version 3's fractional zero only enters the fp32 offset (i16_steps).

constexpr int64_t kI16MaxSubblock = 128;  // columns of x per int16 step and per int32 sum (overflow, above)
constexpr float kI16Max = 32767.0f;       // xq in [-32767, 32767]: -32768 never occurs, so |xq| fits int16

// Columns per x sub-block for a group size G (G % 32 == 0): G itself up to 128, else the largest of 128, 96,
// 64, 32 that divides G, so that every sub-block lies within one group (one step per row).
inline int64_t i16_subblock(int64_t g) {
  for (int64_t c : {kI16MaxSubblock, int64_t{96}, int64_t{64}, int64_t{32}})
    if (g % c == 0) return c;
  return g;  // unreachable for G % 32 == 0 (checked by the op)
}

struct I16Steps {  // one group's per-row "scale" and "offset" of the 16 rows (rows 0-7, rows 8-15)
  __m256 scale0, scale1, offset0, offset1;
};

// scale = s, offset = s * z: exact in format versions 1 and 2 (an fp16 step times an integer below 256), rounded once
// in version 3 (the correction is fp32 either way).
__attribute__((target("avx2,fma,f16c"))) inline I16Steps i16_steps(const Steps8& g) {
  return {g.s0, g.s1, _mm256_mul_ps(g.s0, g.z0), _mm256_mul_ps(g.s1, g.z1)};
}

// tot[0..15] += sigma * (scale * acc - offset * qsum): one batch row's int32 sums of one sub-block (a0: rows
// 0-7, a1: rows 8-15) into its fp32 totals. acc converts to fp32 with a relative error <= 2^-24 (|acc| may
// exceed 2^24); qsum is exact.
__attribute__((target("avx2,fma"))) inline void i16_epilogue(__m256i a0, __m256i a1, const I16Steps& st, float sigma,
                                                             float qsum, float* tot) {
  const __m256 sg = _mm256_set1_ps(sigma), qs = _mm256_set1_ps(qsum);
  const __m256 t0 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(a0), st.scale0, _mm256_mul_ps(st.offset0, qs));
  const __m256 t1 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(a1), st.scale1, _mm256_mul_ps(st.offset1, qs));
  _mm256_storeu_ps(tot, _mm256_fmadd_ps(sg, t0, _mm256_loadu_ps(tot)));
  _mm256_storeu_ps(tot + 8, _mm256_fmadd_ps(sg, t1, _mm256_loadu_ps(tot + 8)));
}

// The int16 code pairs (u[8q + t], u[8q + 4 + t]) of 8 rows' words d. For t = 3 a 16-bit shift alone leaves
// nibble 3 (bits 12-15) and nibble 7 (bits 28-31) at the bottom of their halves: no mask needed.
// 8-bit codes: the pair (u[4q + t], u[4q + 2 + t]), t = 0, 1; bytes 1 and 3 need only the 16-bit shift.
template <int kBits>
__attribute__((target("avx2"))) inline __m256i code_pairs(__m256i d, int t, __m256i mask) {
  if constexpr (kBits == 8) {
    return t == 0 ? _mm256_and_si256(d, mask) : _mm256_srli_epi16(d, 8);
  } else {
    if (t == 0) return _mm256_and_si256(d, mask);
    if (t == 3) return _mm256_srli_epi16(d, 12);
    return _mm256_and_si256(_mm256_srli_epi32(d, 4 * t), mask);
  }
}

// An empty asm that takes v in a ymm register and gives it back: the compiler must have the value there, as
// written. Integer adds are associative, and without this GCC 12 rewrites a word's chains of vpaddd into
// trees over all its vpmaddwd results: at R = 4, 32 of them in flight for 16 registers, so it spilled the
// accumulators and products to the stack (measured 1.15-1.2x slower at M = 2-64).
__attribute__((target("avx2"))) inline void in_register(__m256i& v) { asm("" : "+x"(v)); }

// One x pair (a dword) in all 8 lanes. vbroadcastss from memory is a pure load on Intel and AMD alike
// (vpbroadcastd m32 is a load plus a shuffle-unit uop on some AMD cores); the bits are the same.
__attribute__((target("avx2"))) inline __m256i broadcast_pair(const uint32_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// (lo, hi) += one batch row's x pair at p times the code pairs of rows 0-7 (c0) and 8-15 (c1).
__attribute__((target("avx2"))) inline void madd_pairs(__m256i c0, __m256i c1, const uint32_t* p, __m256i& lo,
                                                       __m256i& hi) {
  const __m256i xv = broadcast_pair(p);
  lo = _mm256_add_epi32(lo, _mm256_madd_epi16(c0, xv));
  hi = _mm256_add_epi32(hi, _mm256_madd_epi16(c1, xv));
  in_register(lo);
  in_register(hi);
}

// The x of R batch rows as R pointers, advanced together. (Written as xr + r * stride + t, GCC 12 kept a register
// per (row, t) offset and, short of registers at R = 4, reloaded some from the stack inside the loop: 4 % slower at
// M = 16 on a 1536 x 8960 layer at g32; with the sigma/qsum pointers below, 1.06-1.09x at M = 4-16.)
template <int R>
struct RowPointers {
  const uint32_t *p0, *p1, *p2, *p3;
  RowPointers(const uint32_t* x, int64_t stride)
      : p0(x), p1(x + (R > 1 ? stride : 0)), p2(x + (R > 2 ? 2 * stride : 0)), p3(x + (R > 3 ? 3 * stride : 0)) {}
  void advance(int64_t n) {
    p0 += n;
    p1 += n;
    p2 += n;
    p3 += n;
  }
};

// Batch row m0's sigma and qsum of sub-block xi (row m0 + r at index r * P.xblocks), read into local pointers
// before any store: the epilogue's stores through acc may alias P (see Problem.groups), so P.xsigma written in the
// epilogue was reloaded from P after each row's stores.
struct TileScales {
  const float *sigma, *qsum;
  TileScales(const Problem& P, int64_t m0, int64_t xi)
      : sigma(P.xsigma + m0 * P.xblocks + xi), qsum(P.xqsum + m0 * P.xblocks + xi) {}
};

// R batch rows (m0 .. m0 + R - 1) against sub-block xi of block b: int32 sums in registers (2R ymm: R = 4 is
// 8 of AVX2's 16, with the two code words, two code pairs, the mask and a broadcast), the fp32 totals in acc
// [M][16]. Each code pair is decoded once and used by the R rows. The vpaddd chain has a 1-cycle latency, so
// one accumulator pair per row keeps vpmaddwd busy even at M = 1. The sums are named variables, not an array:
// an array stayed in memory where GCC did not inline this function (a load and a store per vpaddd, 2x slower
// at R = 2). prefetch: this pass is the first over the sub-block's codes (later row tiles find them in L1).
template <int R, int kBits>
__attribute__((target("avx2,fma,f16c"))) void i16_rows(const Problem& P, int64_t b, int64_t xi, int64_t m0,
                                                       const I16Steps& st, bool prefetch, float* acc) {
  static_assert(R >= 1 && R <= 4, "i16_rows: 1 to 4 batch rows");
  static_assert(kBits == 4 || kBits == 8, "i16_rows: 4- or 8-bit codes");
  constexpr int64_t kPerWord = 32 / kBits, kPairsPerWord = kPerWord / 2;  // columns and x pairs per word
  const int64_t pairs = P.k / 2, subblocks = P.xblocks, words = P.xg / kPerWord;
  const uint32_t* wb = P.w + (b * (P.k / kPerWord) + xi * words) * kBlockN;  // the sub-block's first line
  const uint32_t* xr = P.xq + m0 * pairs + xi * P.xg / 2;                     // its x pairs in batch row m0
  const __m256i mask = _mm256_set1_epi32(kBits == 8 ? 0x00FF00FF : 0x000F000F);
  __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0, lo3 = lo0, hi3 = lo0;
  RowPointers<R> x(xr, pairs);
  const TileScales sc(P, m0, xi);
  for (int64_t q = 0; q < words; ++q, wb += kBlockN, x.advance(kPairsPerWord)) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchWords * kBlockN), _MM_HINT_T0);
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 8));
    for (int t = 0; t < kPairsPerWord; ++t) {
      const __m256i c0 = code_pairs<kBits>(d0, t, mask), c1 = code_pairs<kBits>(d1, t, mask);
      madd_pairs(c0, c1, x.p0 + t, lo0, hi0);
      if constexpr (R > 1) madd_pairs(c0, c1, x.p1 + t, lo1, hi1);
      if constexpr (R > 2) madd_pairs(c0, c1, x.p2 + t, lo2, hi2);
      if constexpr (R > 3) madd_pairs(c0, c1, x.p3 + t, lo3, hi3);
    }
  }
  float* out = acc + m0 * kBlockN;
  i16_epilogue(lo0, hi0, st, sc.sigma[0], sc.qsum[0], out);
  if constexpr (R > 1) i16_epilogue(lo1, hi1, st, sc.sigma[subblocks], sc.qsum[subblocks], out + kBlockN);
  if constexpr (R > 2) i16_epilogue(lo2, hi2, st, sc.sigma[2 * subblocks], sc.qsum[2 * subblocks], out + 2 * kBlockN);
  if constexpr (R > 3) i16_epilogue(lo3, hi3, st, sc.sigma[3 * subblocks], sc.qsum[3 * subblocks], out + 3 * kBlockN);
}

// ---- kI8: AVX2 8-bit integer dot products (vpmaddubsw), x rounded to 8 bits ---------------------------

// Why a second integer path: at 16 batch rows the i16 path is bound by vpmaddwd (16 MACs per instruction, one
// per cycle on the AVX2 machines measured; docs/serving.md), and at one row by its instruction count.
// vpmaddubsw multiplies 32 unsigned bytes with 32 signed bytes and adds neighbours into 16 int16: 32 MACs per
// instruction, twice vpmaddwd's. The codes (0..15) are the unsigned operand as they are; x must be int8. This is
// what llama.cpp does on every CPU (its Q8 activations per block of 32 or 256); the price is x rounded to 8 bits
// per sub-block of 32 columns, |error| <= max |x * c| / 254 per element, the max taken over the sub-block: about
// 0.5 % relative on a Gaussian x, twice bf16's own rounding of x. W' stays exact, as in the i16 path. So this path
// is opt-in (EASYQUANT_CPU_PLAN=i8), never a default: the fidelity it costs is measured in docs/serving.md.
//
// Code bytes: d & 0x0F0F0F0F holds (u[8q], u[8q + 2], u[8q + 4], u[8q + 6]) in the 4 bytes of row j's lane,
// (d >> 4) & 0x0F0F0F0F holds (u[8q + 1], u[8q + 3], u[8q + 5], u[8q + 7]): two instructions per 8 rows, no
// shuffle. x is laid out to match (StoreI8): per word q two dwords, (x[8q], x[8q+2], x[8q+4], x[8q+6]) and
// (x[8q+1], x[8q+3], x[8q+5], x[8q+7]), each broadcast to the 8 lanes.
//
// Overflow: vpmaddubsw's int16 is at most 2 * 15 * 127 = 3810 in magnitude (no saturation), a word adds two
// of them to each int16 sum, and a sub-block of 32 columns is 4 words: at most 30480 < 2^15. So the sums stay
// int16 (vpaddw, an ALU instruction, not the multiplier) over the whole sub-block, and one vpmaddwd with ones
// per sub-block turns each lane's two int16 into the row's int32. The epilogue is the i16 path's.

constexpr int64_t kI8Subblock = 32;  // columns per x step and per int16 sum (overflow, above)
constexpr float kI8Max = 127.0f;     // xq in [-127, 127]

// (lo, hi) += one batch row's x dwords at p (p[0]: even columns, p[1]: odd) times the code bytes of rows 0-7
// (e0 even, o0 odd columns) and rows 8-15 (e1, o1).
__attribute__((target("avx2"))) inline void maddubs_word(__m256i e0, __m256i o0, __m256i e1, __m256i o1,
                                                        const uint32_t* p, __m256i& lo, __m256i& hi) {
  // Each product goes into its sum at once (not summed in pairs first): one temporary live at a time, so that
  // at R = 4 the 8 sums, 4 code vectors, the mask and the broadcasts fit AVX2's 16 registers.
  const __m256i xe = broadcast_pair(p), xo = broadcast_pair(p + 1);
  lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(e0, xe));
  hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(e1, xe));
  lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(o0, xo));
  hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(o1, xo));
  in_register(lo);
  in_register(hi);
}

// A lane's two int16 sums -> the row's int32 sum (vpmaddwd with ones).
__attribute__((target("avx2"))) inline __m256i wide(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

// R batch rows (m0 .. m0 + R - 1) against sub-block xi (32 columns) of block b: int16 sums in registers (2R ymm;
// R = 4: 8, with 4 code vectors, the mask, a broadcast and a product: 15 of AVX2's 16), then the i16 path's
// epilogue on their int32 pair sums. prefetch: as in i16_rows.
template <int R>
__attribute__((target("avx2,fma,f16c"))) void i8_rows(const Problem& P, int64_t b, int64_t xi, int64_t m0,
                                                      const I16Steps& st, bool prefetch, float* acc) {
  static_assert(R >= 1 && R <= 4, "i8_rows: 1 to 4 batch rows");
  constexpr int64_t words = kI8Subblock / 8;
  const int64_t dwords = P.k / 4, subblocks = P.xblocks;                // x dwords per batch row
  const uint32_t* wb = P.w + (b * (P.k / 8) + xi * words) * kBlockN;  // the sub-block's first line
  const uint32_t* xr = P.xq + m0 * dwords + xi * 2 * words;           // its x dwords in batch row m0
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0, lo3 = lo0, hi3 = lo0;
  RowPointers<R> x(xr, dwords);
  const TileScales sc(P, m0, xi);
  for (int64_t q = 0; q < words; ++q, wb += kBlockN, x.advance(2)) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchWords * kBlockN), _MM_HINT_T0);
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 8));
    const __m256i e0 = _mm256_and_si256(d0, mask), o0 = _mm256_and_si256(_mm256_srli_epi16(d0, 4), mask);
    const __m256i e1 = _mm256_and_si256(d1, mask), o1 = _mm256_and_si256(_mm256_srli_epi16(d1, 4), mask);
    maddubs_word(e0, o0, e1, o1, x.p0, lo0, hi0);
    if constexpr (R > 1) maddubs_word(e0, o0, e1, o1, x.p1, lo1, hi1);
    if constexpr (R > 2) maddubs_word(e0, o0, e1, o1, x.p2, lo2, hi2);
    if constexpr (R > 3) maddubs_word(e0, o0, e1, o1, x.p3, lo3, hi3);
  }
  float* out = acc + m0 * kBlockN;
  i16_epilogue(wide(lo0), wide(hi0), st, sc.sigma[0], sc.qsum[0], out);
  if constexpr (R > 1) i16_epilogue(wide(lo1), wide(hi1), st, sc.sigma[subblocks], sc.qsum[subblocks], out + kBlockN);
  if constexpr (R > 2)
    i16_epilogue(wide(lo2), wide(hi2), st, sc.sigma[2 * subblocks], sc.qsum[2 * subblocks], out + 2 * kBlockN);
  if constexpr (R > 3)
    i16_epilogue(wide(lo3), wide(hi3), st, sc.sigma[3 * subblocks], sc.qsum[3 * subblocks], out + 3 * kBlockN);
}

// The block, for both integer paths: sub-block by sub-block (its codes, 1 KB at i16's 128 columns and 512 B at
// i8's 32, stay in L1 while every row tile of 1-4 batch rows passes over it), the fp32 totals in acc [M][16].
// Group by group, the steps decoded once per group, with no division per sub-block (at G = 32, format version
// 3's usual size, each group is one sub-block of either path).
// kBits: the codes' width (8 on the i16 path only).
template <int R, bool I8, int kBits>
__attribute__((target("avx2,fma,f16c"))) inline void int_rows(const Problem& P, int64_t b, int64_t xi, int64_t m0,
                                                              const I16Steps& st, bool prefetch, float* acc) {
  static_assert(!I8 || kBits == 4, "the i8 path takes 4-bit codes");
  if constexpr (I8) i8_rows<R>(P, b, xi, m0, st, prefetch, acc);
  else i16_rows<R, kBits>(P, b, xi, m0, st, prefetch, acc);
}

template <bool I8, int kBits>
__attribute__((target("avx2,fma,f16c"))) void int_block(const Problem& P, int64_t b, float* acc) {
  std::fill(acc, acc + P.m * kBlockN, 0.0f);
  const int64_t per_group = P.g / P.xg;
  const Units8 units = units8(P, b);
  for (int64_t gi = 0, xi = 0; gi < P.groups; ++gi) {
    const I16Steps st = i16_steps(group_steps8(P, units, b, gi));
    for (const int64_t end = xi + per_group; xi < end; ++xi) {
      int64_t m0 = 0;
      for (; m0 + 4 <= P.m; m0 += 4) int_rows<4, I8, kBits>(P, b, xi, m0, st, m0 == 0, acc);
      switch (P.m - m0) {
        case 3: int_rows<3, I8, kBits>(P, b, xi, m0, st, m0 == 0, acc); break;
        case 2: int_rows<2, I8, kBits>(P, b, xi, m0, st, m0 == 0, acc); break;
        case 1: int_rows<1, I8, kBits>(P, b, xi, m0, st, m0 == 0, acc); break;
        default: break;
      }
    }
  }
}

// ---- the i16 path at M = 1: one batch row, its totals in registers ------------------------------------

// At M = 1 (decoding one sequence) nothing shares a sub-block's epilogue, and at G = 32 (format version 3's
// default) it runs every 32 columns. As int_block does it (scale and offset per group, then per sub-block a call
// that converts and scales the int32 sums and loads and stores the 16 fp32 totals) it cost about a third of the
// time of the loop over the codes. For one row the totals stay in registers over the whole block and each
// sub-block adds (sigma s) (A - z Q): a conversion, an FNMADD, a multiply and an FMA per 8 rows (A its int32 sums,
// Q its sum of xq; s and z per group from group_steps8, as int_block takes them, s = d a in version 3). Qwen2.5-1.5B's
// layers at g32, one pass through memory, 2 threads: 5.14 -> 4.49 ms; its 8-bit lm_head on one thread 16.4 -> 14.8
// ms (docs/serving.md, "One batch row"). (Applying version 3's d once at the end of the row instead would keep
// totals 1/d times the output, which overflow fp32 for huge x where the output does not. A path that also halved
// the decode, x as two int8 digits for vpmaddubsw, gained 3 % more through memory at g32 and lost at g128: not
// kept.)

// tot += (sigma s) (A - z Q) for one sub-block (a0, a1: its int32 sums of rows 0-7 and 8-15; qsum: Q). A converts
// to fp32 with a relative error <= 2^-24 (as in i16_epilogue); A - z Q is rounded once (an FNMADD: z Q is exact in
// it).
__attribute__((target("avx2,fma"))) inline void row_epilogue(__m256i a0, __m256i a1, const Steps8& st, float sigma,
                                                             float qsum, __m256& tot0, __m256& tot1) {
  const __m256 sg = _mm256_set1_ps(sigma), q = _mm256_set1_ps(qsum);
  tot0 = _mm256_fmadd_ps(_mm256_mul_ps(st.s0, sg), _mm256_fnmadd_ps(st.z0, q, _mm256_cvtepi32_ps(a0)), tot0);
  tot1 = _mm256_fmadd_ps(_mm256_mul_ps(st.s1, sg), _mm256_fnmadd_ps(st.z1, q, _mm256_cvtepi32_ps(a1)), tot1);
}

// The i16 path for one batch row (M = 1: decode on AVX2-only CPUs and with fp16 activations, and the 8-bit
// lm_head's decode step everywhere): int_block's loop over the codes, with the one-row epilogue above.
template <int kBits>
__attribute__((target("avx2,fma,f16c"))) void i16_row_block(const Problem& P, int64_t b, float* acc) {
  constexpr int64_t kPerWord = 32 / kBits, kPairsPerWord = kPerWord / 2;  // columns and x pairs per word
  const int64_t words = P.xg / kPerWord, subs_per_group = P.g / P.xg;
  const uint32_t* wb = P.w + b * (P.k / kPerWord) * kBlockN;
  const uint32_t* xr = P.xq;
  const float* sigma = P.xsigma;
  const float* qsum = P.xqsum;
  const __m256i mask = _mm256_set1_epi32(kBits == 8 ? 0x00FF00FF : 0x000F000F);
  const Units8 units = units8(P, b);
  __m256 tot0 = _mm256_setzero_ps(), tot1 = tot0;
  for (int64_t gi = 0; gi < P.groups; ++gi) {
    const Steps8 st = group_steps8(P, units, b, gi);
    for (int64_t j = 0; j < subs_per_group; ++j, ++sigma, ++qsum) {
      __m256i lo = _mm256_setzero_si256(), hi = lo;
      for (int64_t q = 0; q < words; ++q, wb += kBlockN, xr += kPairsPerWord) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchWords * kBlockN), _MM_HINT_T0);
        const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
        const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 8));
        for (int t = 0; t < kPairsPerWord; ++t)
          madd_pairs(code_pairs<kBits>(d0, t, mask), code_pairs<kBits>(d1, t, mask), xr + t, lo, hi);
      }
      row_epilogue(lo, hi, st, *sigma, *qsum, tot0, tot1);
    }
  }
  _mm256_storeu_ps(acc, tot0);
  _mm256_storeu_ps(acc + 8, tot1);
}

// ---- kBf16Dp: AVX512-BF16 ----------------------------------------------------------------------------

// Codes of one column pair for the 16 rows as bf16 in VNNI order, offset by 136: from v (lane j = row j's
// word shifted so that the pair sits in bits 0-7), dword j = bf16(128 + u[j, k]) | bf16(128 + u[j, k+1]) << 16.
// bf16(128 + u) is 0x4300 | u (u < 16 fits the 7 mantissa bits at exponent 7), so it is pure bit work:
// (v & 0xF) | 0x43004300 puts the even code in the low word, then the odd code (bits 4-7 of v) moves to
// bits 16-19. Two ternary-logic operations and a shift: no shuffle-port instruction.
__attribute__((target("avx512f"))) inline __m512i bf16_codes(__m512i v) {
  const __m512i lo = _mm512_ternarylogic_epi32(v, _mm512_set1_epi32(0xF), _mm512_set1_epi32(0x43004300), 0xEA);  // (a & b) | c
  return _mm512_ternarylogic_epi32(lo, _mm512_slli_epi32(v, 12), _mm512_set1_epi32(0xF0000), 0xF8);  // a | (b & c)
}

// The step units d of a block's 16 rows (lanes; format version 3, zero otherwise): loaded once per block.
__attribute__((target("avx512f"))) inline __m512 units16(const Problem& P, int64_t b) {
  return P.d ? _mm512_loadu_ps(P.d + b * kBlockN) : _mm512_setzero_ps();
}

__attribute__((target("avx512f"))) inline __m512 bytes16(const uint8_t* p) {  // 16 uint8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

struct Steps16 {  // one group's step s and code offset base + z for the 16 rows (lanes): the bf16 paths' epilogue
  __m512 s, offset;
};

struct StepZero16 {  // one group's step s and zero point z for the 16 rows (lanes), as group_steps8 gives them
  __m512 s, z;
};

// group_steps8 (see there) for the 16 rows in one zmm each: the same values.
__attribute__((target("avx512f,f16c"), always_inline)) inline StepZero16 group_sz16(const Problem& P, __m512 units, int64_t b,
                                                                     int64_t gi) {
  const int64_t e = group_entry(P, b, gi);
  StepZero16 st;
  st.s = P.a ? _mm512_mul_ps(units, bytes16(P.a + e))
             : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(P.s + e)));
  if (!P.z) st.z = _mm512_set1_ps(P.sym_zero);
  else if (P.a) st.z = _mm512_mul_ps(bytes16(P.z + e), _mm512_set1_ps(P.zero_unit));
  else st.z = bytes16(P.z + e);
  return st;
}

// With the offset of the bf16 codes folded in: base + z is exact in fp32 (base = 128, z = 8 without zero points;
// version 3's zq / 16 + 128 has at most 12 significant bits; the amx path's 8-bit codes: base = 2176, z <= 255).
__attribute__((target("avx512f,f16c"))) inline Steps16 group_steps16(const Problem& P, __m512 units, int64_t b,
                                                                     int64_t gi, float base = kCodeBase) {
  const StepZero16 st = group_sz16(P, units, b, gi);
  return {st.s, _mm512_add_ps(st.z, _mm512_set1_ps(base))};
}

// R batch rows, U independent partial sums per row (the four pairs of a word spread over them) so that a
// single row still has U dot-product chains in flight. Per group: partial sums added, corrected by the
// group's sum of x, scaled by the step.
template <int R, int U>
__attribute__((target("avx512f,avx512bw,avx512bf16,f16c"))) void bf16dp_rows(const Problem& P, int64_t b, int64_t m0,
                                                                            float* acc) {
  const int64_t words = P.k / 8, words_per_group = P.g / 8, pairs = P.k / 2, groups = P.groups;
  const uint32_t* wb = P.w + b * words * kBlockN;
  const __m512 units = units16(P, b);
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(P.xh);  // x[m][2p], x[m][2p+1] as one dword
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512 part[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) part[u][r] = _mm512_setzero_ps();
    for (int64_t q = gi * words_per_group; q < (gi + 1) * words_per_group; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + (q + kPrefetchWords) * kBlockN), _MM_HINT_T0);
      const __m512i d = _mm512_loadu_si512(wb + q * kBlockN);
      for (int t = 0; t < 4; ++t) {
        const __m512bh w = reinterpret_cast<__m512bh>(bf16_codes(t ? _mm512_srli_epi32(d, 8 * t) : d));
        for (int r = 0; r < R; ++r) {
          const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x32[(m0 + r) * pairs + 4 * q + t]));
          part[t % U][r] = _mm512_dpbf16_ps(part[t % U][r], w, xb);
        }
      }
    }
    const Steps16 st = group_steps16(P, units, b, gi);
    for (int r = 0; r < R; ++r) {
      __m512 sum = part[0][r];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, part[u][r]);
      const __m512 corrected = _mm512_fnmadd_ps(st.offset, _mm512_set1_ps(P.xsum[(m0 + r) * groups + gi]), sum);
      tot[r] = _mm512_fmadd_ps(st.s, corrected, tot[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + (m0 + r) * kBlockN, tot[r]);
}

void bf16dp_block(const Problem& P, int64_t b, float* acc) {
  int64_t m0 = 0;
  for (; m0 + 8 <= P.m; m0 += 8) bf16dp_rows<8, 1>(P, b, m0, acc);
  switch (P.m - m0) {
    case 7: bf16dp_rows<7, 1>(P, b, m0, acc); break;
    case 6: bf16dp_rows<6, 1>(P, b, m0, acc); break;
    case 5: bf16dp_rows<5, 1>(P, b, m0, acc); break;
    case 4: bf16dp_rows<4, 1>(P, b, m0, acc); break;
    case 3: bf16dp_rows<3, 2>(P, b, m0, acc); break;
    case 2: bf16dp_rows<2, 2>(P, b, m0, acc); break;
    case 1: bf16dp_rows<1, 2>(P, b, m0, acc); break;
    default: break;
  }
}

// ---- kVnni: the i16 path on AVX512-VNNI ----------------------------------------------------------------

// Why: on an AVX512 CPU the AVX2 i16 loop (above) spends, per word of the block's 16 rows, two ymm loads, twelve
// instructions to form the code pairs, and per batch row 4 broadcasts, 8 vpmaddwd and 8 vpaddd: 20 instructions
// for 128 MACs. Here one zmm holds the word of all 16 rows (lane j = row j, the blocked layout as it is), six
// instructions form its four code pairs, and vpdpwssd multiplies int16 pairs and adds them into int32 in one
// instruction, its x pair broadcast from memory in the same instruction: 4 per batch row for the same 128 MACs.
// The bf16 paths use the same 16-lane words, but their vdpbf16ps needs the codes turned into bf16 and, at format
// version 3's group of 32, a float correction per group; this keeps i16's integer sums (exact).
//
// Everything else is i16's: the code pairs (code_pairs16 below is code_pairs on a zmm), x quantized per sub-block
// into the same StoreI16 layout, the same int32 sums (vpdpwssd does not saturate; the overflow bound above holds),
// and the same epilogue formulas lane for lane. So kVnni's outputs are kI16's bit for bit; it is a separate path
// only so that the plan, the tests and the benchmarks can name and compare the two on one CPU.
//
// Chains: vpdpwssd's accumulator is a dependency, about 5 cycles on the Intel cores that have it, one issued
// per cycle. So each batch row spreads a word's pairs over U = min(4, 8 / R) partial sums (U chains per row; 8-bit
// codes have two pairs per word, so at most two of them are used), added (exact) before the epilogue.

template <int kBits>
__attribute__((target("avx512f,avx512bw"))) inline __m512i code_pairs16(__m512i d, int t, __m512i mask) {
  if constexpr (kBits == 8) {
    return t == 0 ? _mm512_and_si512(d, mask) : _mm512_srli_epi16(d, 8);
  } else {
    if (t == 0) return _mm512_and_si512(d, mask);
    if (t == 3) return _mm512_srli_epi16(d, 12);
    return _mm512_and_si512(_mm512_srli_epi32(d, 4 * t), mask);
  }
}

constexpr int vnni_chains(int r) { return r >= 8 ? 1 : r >= 4 ? 2 : 4; }  // U for R rows (R x U >= 8)

// R batch rows (m0 .. m0 + R - 1, R <= 8) against sub-block xi (kXg columns) of block b: as i16_rows, the int32 sums
// of 16 rows in one zmm per row and chain, then i16_epilogue's arithmetic (scale = s, offset = s z) into acc [M][16].
// The sub-block's words are unrolled in full and each chain starts with vpmaddwd: see vnni_row_blocks for why
// (GCC 12's register copies around vpdpwssd in a loop with a run-time count).
template <int R, int kBits, int kXg>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))) void vnni_rows(const Problem& P, int64_t b, int64_t xi,
                                                                          int64_t m0, __m512 scale, __m512 offset,
                                                                          bool prefetch, float* acc) {
  static_assert(R >= 1 && R <= 8, "vnni_rows: 1 to 8 batch rows");
  constexpr int kPerWord = 32 / kBits, kPairsPerWord = kPerWord / 2, kWords = kXg / kPerWord;
  constexpr int U = std::min(vnni_chains(R), kPairsPerWord);  // chains per row that a word's pairs fill
  const int64_t pairs = P.k / 2, subblocks = P.xblocks;
  const uint32_t* wb = P.w + (b * (P.k / kPerWord) + xi * kWords) * kBlockN;
  const uint32_t* xr = P.xq + m0 * pairs + xi * kXg / 2;
  const __m512i mask = _mm512_set1_epi32(kBits == 8 ? 0x00FF00FF : 0x000F000F);
  const TileScales sc(P, m0, xi);
  __m512i sums[U][R];
#pragma GCC unroll 32
  for (int q = 0; q < kWords; ++q) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wb + (q + kPrefetchWords) * kBlockN), _MM_HINT_T0);
    const __m512i d = _mm512_loadu_si512(wb + q * kBlockN);
#pragma GCC unroll 4
    for (int t = 0; t < kPairsPerWord; ++t) {
      const __m512i c = code_pairs16<kBits>(d, t, mask);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(static_cast<int>(xr[r * pairs + q * kPairsPerWord + t]));
        sums[t % U][r] = q == 0 && t < U ? _mm512_madd_epi16(c, x) : _mm512_dpwssd_epi32(sums[t % U][r], c, x);
      }
    }
  }
  float* out = acc + m0 * kBlockN;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r, out += kBlockN) {
    __m512i a = sums[0][r];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) a = _mm512_add_epi32(a, sums[u][r]);
    const __m512 qs = _mm512_set1_ps(sc.qsum[r * subblocks]);
    const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(a), scale, _mm512_mul_ps(offset, qs));
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_set1_ps(sc.sigma[r * subblocks]), t, _mm512_loadu_ps(out)));
  }
}

// int_block for kVnni, NB blocks at once (b + j stride, j < NB; vnni_row_blocks says why): sub-block by sub-block
// (kXg columns), the blocks in turns, row tiles of up to 8 batch rows (each decoded code pair serves up to 8).
// acc: [NB][M][16].
template <int kBits, int NB, int kXg>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c"))) void vnni_blocks(const Problem& P, int64_t b,
                                                                                int64_t stride, float* acc) {
  std::fill(acc, acc + NB * P.m * kBlockN, 0.0f);
  const int64_t per_group = P.g / kXg;
  __m512 units[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) units[j] = units16(P, b + j * stride);
  for (int64_t gi = 0, xi = 0; gi < P.groups; ++gi) {
    StepZero16 st[NB];
    __m512 offset[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      st[j] = group_sz16(P, units[j], b + j * stride, gi);
      offset[j] = _mm512_mul_ps(st[j].s, st[j].z);  // i16_steps: offset = s z
    }
    for (const int64_t end = xi + per_group; xi < end; ++xi) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const int64_t bj = b + j * stride;
        float* aj = acc + j * P.m * kBlockN;
        int64_t m0 = 0;
        for (; m0 + 8 <= P.m; m0 += 8) vnni_rows<8, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj);
        switch (P.m - m0) {
          case 7: vnni_rows<7, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 6: vnni_rows<6, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 5: vnni_rows<5, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 4: vnni_rows<4, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 3: vnni_rows<3, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 2: vnni_rows<2, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          case 1: vnni_rows<1, kBits, kXg>(P, bj, xi, m0, st[j].s, offset[j], m0 == 0, aj); break;
          default: break;
        }
      }
    }
  }
}

// f(std::integral_constant<int, xg>) for the x sub-block widths the vnni loops are compiled for (i16_subblock: 32,
// 64, 96 or 128 columns; the op checks G % 32 == 0).
template <typename F>
void with_subblock_width(int64_t xg, F&& f) {
  switch (xg) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case kI16MaxSubblock: f(std::integral_constant<int, kI16MaxSubblock>{}); break;
    default: TORCH_CHECK(false, "easyquant: vnni has no loop for sub-blocks of ", xg, " columns");
  }
}

// vnni_blocks for P's sub-block width.
template <int kBits, int NB>
void vnni_blocks(const Problem& P, int64_t b, int64_t stride, float* acc) {
  with_subblock_width(P.xg, [&](auto xg) { vnni_blocks<kBits, NB, decltype(xg)::value>(P, b, stride, acc); });
}

// i16_row_block for kVnni (M = 1), NB blocks at once (blocks b + j stride, j < NB), x sub-blocks of kXg columns: the
// totals of each block's 16 rows in one register over the whole block, one chain per code pair of a word (four; two
// for 8-bit codes), row_epilogue's arithmetic per sub-block: tot += (s sigma) (A - z Q). acc: [NB][16].
//
// Why NB blocks far apart: at one batch row the loop waits on memory, and what a core gets from memory depends on
// how many sequential streams it reads. run_block_range cuts a thread's blocks into NB runs and takes block i of
// every run together, so the codes, the steps and the zero points each form NB long sequential streams (blocks
// are contiguous in every tensor). On the AVX512 + AMX Xeon (2 cores, docs/serving.md, "vnni from memory: four runs
// of blocks", bench/read_streams.cpp) that took a pass through Qwen2.5-1.5B's linears at one row from ~32.5 to ~28
// ms (19.5 -> 23 GB/s from memory). Taking NB adjacent blocks instead gained only where blocks are long
// (K = 8960), nothing at K = 1536 (12 KB blocks); eight runs lost to four; the software prefetch distance and hint
// changed nothing measurable.
//
// Why the sub-block width is a template parameter: with a loop over a run-time number of words, GCC 12 copies each
// vpdpwssd accumulator to another register and back on every instruction (two zmm moves each, on the ports this
// loop needs; objdump shows them). A sub-block's words unrolled in full carry no accumulator from one iteration to
// the next, and the compiler keeps them in place. The first word starts each chain with vpmaddwd (the same int32 as
// vpdpwssd into zero), so there is no zeroed register to copy either.
//
// Each block's arithmetic is the one-block loop's, in the same order, so the outputs do not depend on NB or on
// stride; a sub-block's x pairs serve all NB blocks from L1.
template <int kBits, int NB, int kXg>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c"))) void vnni_row_blocks(const Problem& P, int64_t b,
                                                                                    int64_t stride, float* acc) {
  constexpr int kPerWord = 32 / kBits, kPairsPerWord = kPerWord / 2, kWords = kXg / kPerWord;
  const int64_t subs_per_group = P.g / kXg, block_words = P.k / kPerWord;
  const uint32_t* wb = P.w + b * block_words * kBlockN;  // word q of block b + j stride: wb + (j stride block_words + q) 16
  const uint32_t* xr = P.xq;
  const float* sigma = P.xsigma;
  const float* qsum = P.xqsum;
  const __m512i mask = _mm512_set1_epi32(kBits == 8 ? 0x00FF00FF : 0x000F000F);
  __m512 units[NB], tot[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    units[j] = units16(P, b + j * stride);
    tot[j] = _mm512_setzero_ps();
  }
  for (int64_t gi = 0; gi < P.groups; ++gi) {
    StepZero16 st[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) st[j] = group_sz16(P, units[j], b + j * stride, gi);
    for (int64_t sub = 0; sub < subs_per_group; ++sub, ++sigma, ++qsum, xr += kWords * kPairsPerWord) {
      const __m512 sg = _mm512_set1_ps(*sigma), qs = _mm512_set1_ps(*qsum);
      __m512i sums[NB][kPairsPerWord];
#pragma GCC unroll 32
      for (int q = 0; q < kWords; ++q) {
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          const uint32_t* wj = wb + j * stride * block_words * kBlockN;
          _mm_prefetch(reinterpret_cast<const char*>(wj + (q + kPrefetchWords) * kBlockN), _MM_HINT_T0);
          const __m512i d = _mm512_loadu_si512(wj + q * kBlockN);
#pragma GCC unroll 4
          for (int t = 0; t < kPairsPerWord; ++t) {
            const __m512i c = code_pairs16<kBits>(d, t, mask);
            const __m512i x = _mm512_set1_epi32(static_cast<int>(xr[q * kPairsPerWord + t]));
            sums[j][t] = q == 0 ? _mm512_madd_epi16(c, x) : _mm512_dpwssd_epi32(sums[j][t], c, x);
          }
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        __m512i a = sums[j][0];
#pragma GCC unroll 4
        for (int t = 1; t < kPairsPerWord; ++t) a = _mm512_add_epi32(a, sums[j][t]);
        tot[j] = _mm512_fmadd_ps(_mm512_mul_ps(st[j].s, sg), _mm512_fnmadd_ps(st[j].z, qs, _mm512_cvtepi32_ps(a)),
                                 tot[j]);
      }
      wb += kWords * kBlockN;
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) _mm512_storeu_ps(acc + j * kBlockN, tot[j]);
}

// vnni_row_blocks for P's sub-block width.
template <int kBits, int NB>
void vnni_row_blocks(const Problem& P, int64_t b, int64_t stride, float* acc) {
  with_subblock_width(P.xg, [&](auto xg) { vnni_row_blocks<kBits, NB, decltype(xg)::value>(P, b, stride, acc); });
}

// ---- kAmx: AMX-BF16 ----------------------------------------------------------------------------------

// Tile registers: 0-3 accumulate C (16 batch rows x 16 output rows, fp32), 4 takes A (16 batch rows x 32 bf16 of
// x), 5 takes B (16 k-pairs x 16 output rows x 2 bf16: 16 registers of bf16 codes), all 16 rows x 64 bytes; 6 and 7
// take the zero-point product's A' (16 x 6 bf16) and B' (3 k-pairs x 16 x 2 bf16). 8-bit codes have two B tiles per
// chunk (lo and hi, amx_b_tiles): hi is loaded into register 5 after lo's tdpbf16ps, and waits for it to have read
// lo (tiles are not renamed). The plan before gave hi a register of its own and let A alternate between two, which
// left two C tiles; the pairs below need four, and measured faster (the 151936 x 1536 head at 16 rows, two threads,
// pass from memory: 18.4-18.5 -> 17.1-17.6 ms, two alternating rounds).
//
// Why the zero point goes through the tile unit: B holds base + u (base = 128), so a group's C is
// sum x (base + u) and y needs s (C - (base + z) xsum). Folding that in with vector FMAs cost two per batch row and
// group, the larger part of the path's vector work. Instead one more tdpbf16ps per group adds -(base + z) xsum to
// the C tile itself: A' holds each row's -xsum as three bf16 parts h + m + l (each twice; exactly the fp32 sum,
// prepare_amx_x), B' the 16 rows' base + z as two bf16 parts (exact: base + z has at most 16 significant bits,
// amx_zero_tile), so A' B' is -(h + m + l)(hi + lo) with every product exact and fp32 sums, as the vector fold
// computed it. The fold is then one FMA per row and group, sum += s C. Cache-hot, 16 rows, format 3, g32 (alternating
// builds, docs/serving.md): the 1536 x 8960 layer 894 -> 764 us per call with two threads, 1114-1182 -> 1006-1100
// with one; 1536 x 1536 unchanged within the swing. From memory the path waits on reads, and did not move.
//
// Why the C tiles rotate and are stored in pairs: a group of 32 columns (the default format) is one tdpbf16ps (and
// the zero-point one; 8-bit codes: two and one), and its C tile must be stored and scaled before its register takes
// another group. A tile store holds up the loads after it until it has written its 1 KB (a microbenchmark on this
// Xeon: a tile store alone ~5 ns, 16 vector loads alone ~6, the store then the loads ~11: they add up), and a
// group's fold is a tile store then 16 loads. Storing right after the group's tdpbf16ps also waits for the
// products. So the groups take four C tiles by turns and are folded two at a time, after a later group's products
// are issued (groups gi - 3 and gi - 2 after gi's, gi odd): both tiles stored back to back, then both groups' 32
// FMAs, one wait for two groups. Alternating builds, 16 rows, format 3, g32, two threads (docs/serving.md): the pass
// from memory through Qwen2.5-1.5B's linear shapes 23.3 -> 21.0 ms (means of four rounds; two C tiles by turns, each
// folded alone, before), every layer faster cache-hot.
//
// Why B is written per chunk and A comes pre-tiled: a block's B tiles for all of K (K * 32 bytes: 48 KB at
// K = 1536, 280 KB at K = 8960) and x's rows (a tile load of 16 rows at stride 2K touches 16 lines) did not
// fit L1 together, and a tile load from L2 took 2.5x one from L1 here (7 against 2.8 ns per KB). Now each
// chunk's B tile (1 KB) is written into a ring of four a chunk ahead of its load (a tile load does not take
// its data from the store buffer), and x is laid out once per call as whole 1 KB A tiles (prepare_x: xtile).
//
// Where the time goes (Xeon with AMX, 2026-12-06, microbenchmarks of the pieces): the tile unit's part of a
// chunk (two tile loads, tdpbf16ps, the C tile's store) is ~14 ns; writing the B tile ~8 ns and folding a
// 16-row group in ~20 ns are vector work, and 512-bit operations ran at ~1.6 per ns there. The fold was then two
// FMAs per row and group (the group's step and its zero; the zero has since moved into the tile unit, above), which
// is why the sums stay in registers and only the slice's rows (rounded up to 4) are folded.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAmxCTiles = 4;   // C tile registers 0-3, by turns, stored and folded in pairs
constexpr int64_t kAmxRing = 4;     // B tiles written ahead of their loads (a ring of 1 KB slots; 8-bit codes: 2 KB)
constexpr int64_t kAmxAhead = 2;    // chunks between writing a B tile and loading it
constexpr int64_t kTileElems = 512;  // bf16 per 1 KB tile (16 rows x 32)
constexpr int64_t kCorrK = 6;        // bf16 per row of the zero-point A' tile: h, h, m, m, l, l
constexpr int64_t kPage = 4096;      // x's A tiles and the ring start on a page (below)

// Why x's A tiles and the ring of B tiles start on pages. A load waits behind an older store still in the store
// buffer whose address has the same low 12 bits, even where the addresses differ (the CPU compares those first: "4K
// aliasing"). Each chunk writes slot c + 2's B tile (16 stores) just before loading its A tile, and x's A tiles walk
// through all of a page, 1 KB a chunk. Where they fell against the slot just written was left to malloc, and so was
// part of what a call cost. With both on pages, chunk c's A tile (4-bit codes: 1 KB slots) has the low bits of slot
// c, whose B tile is loaded just before it and waited for anyway, never those of slot c + 2 (written this chunk) or
// c + 1 (the chunk before). Alternating builds on the AMX Xeon, two threads, 16 rows, Qwen2.5-1.5B's layers cache-hot
// (docs/serving.md): the two large decoder shapes 10-17 % less time per call without their outliers, the 8-bit head
// 10-14 %. 8-bit codes' slots are 2 KB, so slot c + 2 has slot c's low bits, and A tile c falls on the slot being
// written in half the chunks; slots a page and a quarter apart keep it off, but measured no better. Through all
// layers from memory, and in a served step, the change was within these cores' noise.
constexpr int64_t kAmxRingBytes = kAmxRing * 2 * kTileElems * 2;  // four slots of 8-bit codes' two tiles

// A tiles per 16-row slice of x: K's chunks rounded up to whole pages, so that every slice's tiles start on one.
inline int64_t amx_slice_tiles(int64_t k) { return (k / 32 + 3) / 4 * 4; }

bool request_amx() {
  // Linux grants the AMX tile state to a process only on request (else the first tile instruction is
  // SIGILL): ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

__attribute__((target("amx-tile"))) void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  cfg.colsb[6] = kCorrK * 2;  // A': 16 batch rows x 6 bf16
  cfg.rows[7] = kCorrK / 2;   // B': 3 k-pairs x 16 output rows x 2 bf16
  // GCC 12 does not treat ldtilecfg as reading its operand and drops the stores above (the tile config
  // then holds stack garbage: #GP). The empty asm with a memory clobber makes them visible.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// 8-bit codes (a quantized lm_head) do not fit a bf16 mantissa offset by 128 (128 + u needs 9 significant bits
// past 255), so each code is split into its nibbles, and a chunk of 32 columns takes two B tiles against the same
// A tile into the same C tile: `lo` with bf16 128 + (u & 15) (exponent 0x43, as the 4-bit tile) and `hi` with
// bf16 2048 + 16 (u >> 4) (exponent 0x45: 2^11, the nibble in the mantissa's low 4 bits is 16 per unit). Their sum
// is u + 2176, exact, and the fold removes (2176 + z) * xsum as the 4-bit path removes (128 + z) * xsum. The
// offset's ratio to the code range (2176 / 256) is the 4-bit tile's (128 / 16), so the fp32 sums keep the 4-bit
// path's relative accuracy.
constexpr float kCodeBase8 = 2176.0f;  // lo + hi tiles hold u + 128 + 2048

// The B tile(s) of columns 32c .. 32c + 31 of block b (kBits words of codes at wc) into dst (64-byte aligned): one
// 1 KB tile of bf16_codes' dwords for 4-bit codes; for 8-bit codes the lo tile, then the hi tile at dst + kTileElems
// (above). Each tile row is one vpmultishiftqb (AVX512-VBMI, every AMX CPU has it) and one ternary-logic operation.
// vpmultishiftqb copies any 8-bit field of a qword into each of its bytes. Word q holds 32 / kBits columns, so tile
// row p = (16 / kBits) q + t (columns 2p, 2p + 1) is the code pair (2t, 2t + 1) of the word: byte 0 of row j's
// dword gets bits 2t kBits.. and byte 2 gets bits (2t + 1) kBits.. (4 more for the hi nibbles), 32 more for the
// qword's second row (j + 1); the ternary logic keeps the low nibbles and sets the bf16 exponent. 4-bit: 32 zmm
// operations per tile against bf16_codes' 60 (cache-hot ~8 against ~11 ns; the vector unit is this path's
// bottleneck, see the section's header); 8-bit: 64 per chunk, for twice the bytes. The codes are prefetched four
// chunks ahead (kBits lines a chunk: kPrefetchWords for 4-bit codes).
template <int kBits>
__attribute__((target("avx512f,avx512vbmi"), always_inline)) inline void amx_b_tiles(const uint32_t* wc,
                                                                                 uint16_t* dst) {
  constexpr int kRowsPerWord = 16 / kBits, kAheadLines = 4 * kBits;
#pragma GCC unroll 8
  for (int q = 0; q < kBits; ++q)
    _mm_prefetch(reinterpret_cast<const char*>(wc + (kAheadLines + q) * kBlockN), _MM_HINT_T0);
  const __m512i low_nibbles = _mm512_set1_epi32(0x000F000F);
  const __m512i exp_lo = _mm512_set1_epi32(0x43004300), exp_hi = _mm512_set1_epi32(0x45004500);
#pragma GCC unroll 8
  for (int q = 0; q < kBits; ++q) {
    const __m512i d = _mm512_loadu_si512(wc + q * kBlockN);
#pragma GCC unroll 4
    for (int t = 0; t < kRowsPerWord; ++t) {
      const uint64_t lo = uint64_t(2 * t * kBits) | uint64_t((2 * t + 1) * kBits) << 16 |
                          uint64_t(32 + 2 * t * kBits) << 32 | uint64_t(32 + (2 * t + 1) * kBits) << 48;
      uint16_t* row = dst + (kRowsPerWord * q + t) * 32;
      const __m512i f_lo = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(static_cast<long long>(lo)), d);
      _mm512_store_si512(row, _mm512_ternarylogic_epi32(f_lo, low_nibbles, exp_lo, 0xEA));
      if constexpr (kBits == 8) {
        const uint64_t hi = lo + 0x0004000400040004ull;  // each field 4 bits further: the high nibbles
        const __m512i f_hi = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(static_cast<long long>(hi)), d);
        _mm512_store_si512(row + kTileElems, _mm512_ternarylogic_epi32(f_hi, low_nibbles, exp_hi, 0xEA));
      }
    }
  }
}

// The zero-point B' tile of one group (3 rows of 16 dwords, 64-byte aligned at dst): each row's base + z as bf16
// hi (its leading 8 significant bits, truncated) in the dword's low half and lo (the rest) in its high half, the
// same in all three rows (A' pairs them with h, m and l), times the call's 2^-e (prepare_amx_x). Exact where base + z
// has at most 16 significant bits: version 3's 128 + zq / 16 has 12, the 8-bit codes' 2176 + zq (a whole code) 12,
// versions 1 and 2 are integers below 2^16. One row is written: the tile load reads it three times (stride 0).
// (A function, not a lambda in amx_slice: a lambda does not take its caller's target attribute.)
template <int kBits>
__attribute__((target("avx512f,f16c"))) inline void amx_zero_tile(const Problem& P, __m512 units, int64_t b, int64_t gi,
                                                                  uint32_t* dst) {
  const __m512 offset = _mm512_mul_ps(group_steps16(P, units, b, gi, kBits == 8 ? kCodeBase8 : kCodeBase).offset,
                                      _mm512_set1_ps(P.zero_scale));
  const __m512i bits = _mm512_castps_si512(offset), high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i hi = _mm512_and_si512(bits, high);
  const __m512i lo = _mm512_castps_si512(_mm512_sub_ps(offset, _mm512_castsi512_ps(hi)));
  // (lo & 0xFFFF0000) | (hi >> 16): ternary logic 0xEA is (a & b) | c
  const __m512i row = _mm512_ternarylogic_epi32(lo, high, _mm512_srli_epi32(hi, 16), 0xEA);
  _mm512_store_si512(dst, row);
}

// GCC's _tile_loadd is an asm statement with register operands only: the compiler does not know that it reads
// memory, so nothing stops it from sinking (or dropping) the vector stores that amx_b_tiles, inlined, made into
// the slot. This empty statement names the slot's 1 KB as read before each B tile load.
#define EQ_AMX_READS(P) asm volatile("" : : "m"(*reinterpret_cast<const char(*)[1024]>(P)))
#define EQ_AMX_READS_ZERO(P) asm volatile("" : : "m"(*reinterpret_cast<const char(*)[64]>(P)))
// And after the load: the slot's next B tile (written kAmxRing - kAmxAhead chunks later, by amx_b_tiles inlined) must
// not be stored before this load has read it. Nothing else tells the compiler so; before amx_b_tiles was inlined,
// its call was the barrier.
// (C casts: the ring is written memory, read here through a pointer to const.)
#define EQ_AMX_LOADED(P) asm volatile("" : "+m"(*(char(*)[1024])(P)))
#define EQ_AMX_LOADED_ZERO(P) asm volatile("" : "+m"(*(char(*)[64])(P)))

// Tile register ids are immediates: these pick one of the four C tiles by a run-time index.
__attribute__((target("amx-tile"))) inline void amx_zero_c(int64_t c) {
  switch (c) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3);
  }
}

__attribute__((target("amx-tile"))) inline void amx_store_c(int64_t c, float* dst) {
  // the previous fold's loads of dst come before the tile store overwrites it (the store's asm names no memory)
  asm volatile("" : "+m"(*reinterpret_cast<float(*)[256]>(dst)));
  switch (c) {
    case 0: _tile_stored(0, dst, 64); break;
    case 1: _tile_stored(1, dst, 64); break;
    case 2: _tile_stored(2, dst, 64); break;
    default: _tile_stored(3, dst, 64);
  }
  // as EQ_AMX_READS, the other way: the tile store wrote dst's 1 KB, so the folds' loads come after it
  asm volatile("" : "=m"(*reinterpret_cast<float(*)[256]>(dst)));
}

// C tile C += A (register AREG) . B (register BREG), both loaded. GCC's tile intrinsics are macros that paste
// the register number into the instruction text: the registers must be literals (no template parameters).
#define EQ_AMX_DP(AREG, BREG, C)                    \
  do {                                              \
    switch (C) {                                    \
      case 0: _tile_dpbf16ps(0, AREG, BREG); break; \
      case 1: _tile_dpbf16ps(1, AREG, BREG); break; \
      case 2: _tile_dpbf16ps(2, AREG, BREG); break; \
      default: _tile_dpbf16ps(3, AREG, BREG);       \
    }                                               \
  } while (0)

// One chunk: A (register AREG) loaded from xa, then C += A . B for the chunk's B tile at bt (register BREG) and,
// with 8-bit codes, C += A . B_hi for its hi tile (register BREG again, right after the lo tile in the ring slot).
#define EQ_AMX_CHUNK(AREG, BREG, C, A, BT)                    \
  do {                                                        \
    EQ_AMX_READS(BT);                                         \
    _tile_loadd(BREG, (BT), 64);                              \
    EQ_AMX_LOADED(BT);                                        \
    _tile_loadd(AREG, (A), 64);                               \
    EQ_AMX_DP(AREG, BREG, C);                                 \
    if constexpr (kBits == 8) {                               \
      EQ_AMX_READS((BT) + kTileElems);                        \
      _tile_loadd(BREG, (BT) + kTileElems, 64);               \
      EQ_AMX_LOADED((BT) + kTileElems);                       \
      EQ_AMX_DP(AREG, BREG, C);                               \
    }                                                         \
  } while (0)

// Group GI's C tile (its zero point already in it), stored at CT, folded into amx_slice's row sums: sum[r] += s C[r].
#define EQ_AMX_FMA(GI, CT)                                                                                     \
  do {                                                                                                         \
    const __m512 s = group_sz16(P, units, b, (GI)).s;                                                          \
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) sum[r] =                                              \
        _mm512_fmadd_ps(s, _mm512_load_ps((CT) + r * 16), sum[r]);                                            \
  } while (0)
// One group's C tile stored and folded (the odd group at the end of a block)
#define EQ_AMX_FOLD(GI)                                 \
  do {                                                  \
    amx_store_c((GI) % depth, ctile[0]);                \
    EQ_AMX_FMA(GI, ctile[0]);                           \
  } while (0)
// Groups GI and GI + 1 (GI even) stored back to back, then folded (see the section's header)
#define EQ_AMX_FOLD2(GI)                                \
  do {                                                  \
    amx_store_c((GI) % depth, ctile[0]);                \
    amx_store_c(((GI) + 1) % depth, ctile[1]);          \
    EQ_AMX_FMA(GI, ctile[0]);                           \
    EQ_AMX_FMA((GI) + 1, ctile[1]);                     \
  } while (0)

// Batch rows m0 .. m0 + 15 (a slice: one A tile per chunk of 32 columns) against block b. Per chunk one B tile
// (amx_b_tiles, kAmxAhead chunks ahead; 8-bit codes: two) and one tdpbf16ps each into the group's C tile; per
// group one more tdpbf16ps of A' and B' (amx_zero_tile, kAmxAhead groups ahead) adds the zero point, and the C tile
// is stored (two groups' tiles at a time) and folded into the R rows' sums (the slice's rows rounded up to a
// multiple of 4), which stay in zmm registers for the whole block: one FMA per row and group, its C row a memory
// operand. (Sums kept in memory, as several slices at once would need, cost a load and a store more per row and
// group: more than writing the B tiles again for each slice.) Rows past M have zero x and zero group sums: their
// sums stay zero and are not stored.
template <int R, int kBits>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vbmi,f16c"))) void amx_slice(const Problem& P,
                                                                                           int64_t b, int64_t m0,
                                                                                           uint16_t* ring, float* acc) {
  constexpr int64_t depth = kAmxCTiles;
  static_assert(depth == 4, "the fold schedule below (pairs of groups gi - 3, gi - 2 at odd gi) assumes four C tiles");
  constexpr int64_t chunk_words = kBits, slot = kBits / 4 * kTileElems;  // words of codes and ring slot per chunk
  const int64_t groups = P.groups, chunks_per_group = P.g / 32, chunks = P.k / 32;
  const __m512 units = units16(P, b);
  const uint32_t* wb = P.w + b * (P.k * kBits / 32) * kBlockN;
  // (a macro, not a lambda: a lambda does not take amx_slice's target attribute, and then cannot inline
  // amx_b_tiles: it was a call per chunk, with the registers it clobbers saved around it)
#define EQ_AMX_WRITE_B(C) amx_b_tiles<kBits>(wb + (C) * chunk_words * kBlockN, ring + ((C) % kAmxRing) * slot)
  const uint16_t* xa = P.xtile + (m0 / 16) * amx_slice_tiles(P.k) * kTileElems;
  const uint16_t* xz = P.xcorr + (m0 / 16) * groups * 16 * kCorrK;
  // the zero-point B' tiles, written kAmxAhead groups ahead of their loads (as the B tiles, for the same reason)
  alignas(64) uint32_t zring[kAmxRing][16];
  alignas(64) float ctile[2][16 * 16];
  __m512 sum[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < std::min(kAmxAhead, chunks); ++c) EQ_AMX_WRITE_B(c);
  for (int64_t gi = 0; gi < std::min(kAmxAhead, groups); ++gi)
    amx_zero_tile<kBits>(P, units, b, gi, zring[gi % kAmxRing]);
  int64_t folded = 0;  // groups folded so far (in order)
  for (int64_t gi = 0; gi < groups; ++gi) {
    amx_zero_c(gi % depth);
    if (gi + kAmxAhead < groups)
      amx_zero_tile<kBits>(P, units, b, gi + kAmxAhead, zring[(gi + kAmxAhead) % kAmxRing]);
    for (int64_t c = gi * chunks_per_group; c < (gi + 1) * chunks_per_group; ++c) {
      if (c + kAmxAhead < chunks) EQ_AMX_WRITE_B(c + kAmxAhead);
      const uint16_t* bt = ring + (c % kAmxRing) * slot;
      EQ_AMX_CHUNK(4, 5, gi % depth, xa + c * kTileElems, bt);
    }
    EQ_AMX_READS_ZERO(zring[gi % kAmxRing]);
    _tile_loadd(6, xz + gi * 16 * kCorrK, kCorrK * 2);
    _tile_loadd(7, zring[gi % kAmxRing], 0);  // the one row, three times
    EQ_AMX_LOADED_ZERO(zring[gi % kAmxRing]);
    EQ_AMX_DP(6, 7, gi % depth);
    // groups gi - 3 and gi - 2 (C tiles 0, 1 or 2, 3): their products finished a group ago, and their registers
    // are zeroed again at gi + 1 and gi + 2
    if (gi % 2 == 1 && gi >= 3) {
      EQ_AMX_FOLD2(gi - 3);
      folded += 2;
    }
  }
  int64_t gi = folded;  // the last groups: pairs, then an odd one
  for (; gi + 1 < groups; gi += 2) EQ_AMX_FOLD2(gi);
  if (gi < groups) EQ_AMX_FOLD(gi);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    if (m0 + r < P.m) _mm512_storeu_ps(acc + (m0 + r) * kBlockN, sum[r]);
}
#undef EQ_AMX_WRITE_B
#undef EQ_AMX_FOLD
#undef EQ_AMX_FOLD2
#undef EQ_AMX_FMA
#undef EQ_AMX_CHUNK
#undef EQ_AMX_DP
#undef EQ_AMX_READS
#undef EQ_AMX_READS_ZERO
#undef EQ_AMX_LOADED
#undef EQ_AMX_LOADED_ZERO

// ring: kAmxRing slots of B tiles, two tiles each (the thread's scratch, on a page: kPage says why).
template <int kBits>
void amx_block(const Problem& P, int64_t b, float* acc, uint16_t* ring) {
  for (int64_t m0 = 0; m0 < P.m; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, P.m - m0);
    if (rows > 12) amx_slice<16, kBits>(P, b, m0, ring, acc);
    else if (rows > 8) amx_slice<12, kBits>(P, b, m0, ring, acc);
    else if (rows > 4) amx_slice<8, kBits>(P, b, m0, ring, acc);
    else amx_slice<4, kBits>(P, b, m0, ring, acc);
  }
}

// ---- outliers ----------------------------------------------------------------------------------------

// acc [M][16] += x @ S^T for the block's rows, one batch row at a time (M = 2: below the transposed paths' break-even).
void outliers_scalar(const Problem& P, int64_t b, float* acc) {
  for (int64_t j = 0; j < kBlockN; ++j) {
    const int64_t n = b * kBlockN + j;
    for (int32_t e = P.indptr[n]; e < P.indptr[n + 1]; ++e) {
      const float v = P.values[e];
      const float* xk = P.xf + P.indices[e];
      for (int64_t m = 0; m < P.m; ++m) acc[m * kBlockN + j] += v * xk[m * P.k];
    }
  }
}

// The same for one batch row (decode), without a branch per row. Rows hold 0 to a few outliers each (Qwen2.5-1.5B's
// 8-bit lm_head: 401k over 152k rows), so outliers_scalar's loop over a row's outliers mispredicts its exit about
// once per row: ~270 ns per 16-row block there, 2.6 ms of the head's 17 ms at M = 1 on one thread (1.8 ms with
// this). Here one loop runs over the block's outliers in CSR order, and each product goes to its row's lane by a
// mask, row j being the one with indptr[j] <= e < indptr[j + 1] (two compares per 8 rows against the block's 17
// row bounds). Two accumulator pairs alternate, so the adds' latency does not chain consecutive outliers. A NaN or
// inf product stays in its row (the mask is bitwise: other lanes add +0).
struct RowBounds {  // the block's rows [start, end) in the CSR, rows 0-7 and 8-15
  __m256i start0, start1, end0, end1;
};

// (lo, hi) += outlier e's product in its row's lane. (A function, not a lambda: a lambda does not take its
// caller's target attribute, so GCC would not inline the AVX2 intrinsics into it.)
__attribute__((target("avx2"))) inline void add_outlier(const Problem& P, const RowBounds& r, int32_t e, __m256& lo,
                                                        __m256& hi) {
  const __m256i ev = _mm256_set1_epi32(e);
  const __m256 p = _mm256_set1_ps(P.values[e] * P.xf[P.indices[e]]);
  const __m256i in0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(r.start0, ev), _mm256_cmpgt_epi32(r.end0, ev));
  const __m256i in1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(r.start1, ev), _mm256_cmpgt_epi32(r.end1, ev));
  lo = _mm256_add_ps(lo, _mm256_and_ps(p, _mm256_castsi256_ps(in0)));
  hi = _mm256_add_ps(hi, _mm256_and_ps(p, _mm256_castsi256_ps(in1)));
}

__attribute__((target("avx2"))) void outliers_row(const Problem& P, int64_t b, float* acc) {
  const int32_t* ip = P.indptr + b * kBlockN;
  const int32_t first = ip[0], end = ip[kBlockN];
  if (first == end) return;
  const RowBounds r{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip + 8)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip + 1)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip + 9))};
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  int32_t e = first;
  for (; e < end - 1; e += 2) {
    add_outlier(P, r, e, a0, a1);
    add_outlier(P, r, e + 1, b0, b1);
  }
  if (e < end) add_outlier(P, r, e, a0, a1);
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), _mm256_add_ps(a0, b0)));
  _mm256_storeu_ps(acc + 8, _mm256_add_ps(_mm256_loadu_ps(acc + 8), _mm256_add_ps(a1, b1)));
}

// 16x16 fp32 transpose in registers (unpack, in-lane shuffle, two 128-bit lane shuffles).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// The same for many rows: per 16 batch rows, the outliers' contribution is summed with the batch rows in the
// lanes (each outlier: one FMA of its value with 16 batch rows of its column of x^T, contiguous), then
// turned around once and added to the block's accumulators: ~70 shuffles per 16 x 16 instead of ~3 scalar
// operations per outlier and batch row.
__attribute__((target("avx512f"))) void outliers_transposed(const Problem& P, int64_t b, float* acc) {
  for (int64_t m0 = 0; m0 < P.m; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, P.m - m0);
    __m512 r[16];
    for (int64_t j = 0; j < kBlockN; ++j) {  // r[j] = batch rows m0.. of output row 16b + j
      const int64_t n = b * kBlockN + j;
      r[j] = _mm512_setzero_ps();
      for (int32_t e = P.indptr[n]; e < P.indptr[n + 1]; ++e)
        r[j] = _mm512_fmadd_ps(_mm512_set1_ps(P.values[e]), _mm512_loadu_ps(P.xt + P.indices[e] * P.mp + m0), r[j]);
    }
    transpose16(r);
    for (int64_t i = 0; i < rows; ++i) {
      float* out = acc + (m0 + i) * kBlockN;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), r[i]));
    }
  }
}

// 8x8 fp32 transpose in registers (AVX2): after it r[i] holds what was column i. Unpack pairs of rows, take
// 4-row halves of columns with in-lane shuffles, then join the 128-bit halves (24 shuffles).
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // u[4i + c]: columns c and c + 4 of rows 4i .. 4i + 3
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// outliers_transposed on AVX2, 8 batch rows (a chunk) at a time. outliers_scalar costs ~8 cycles per outlier and
// batch row (a strided load of x and a load, add and store of acc each): at M = 16 on Qwen2.5-1.5B's down_proj
// (0.1 % outliers) that was a sixth of the call, and a tenth of the 8-bit lm_head's (docs/serving.md). Here each
// outlier is one FMA per chunk, on x^T's contiguous column, into its row's sums in `sums` [mp/8][16][8]; one loop
// runs over the block's outliers in CSR order, each finding its row j by comparing e with the 16 row ends (rows
// hold 0 to a few outliers, so a loop per row would mispredict its exit about once per row, as in outliers_row).
// Two 8x8 transposes per chunk then turn the block's 16 row sums around into acc. A block without outliers costs
// nothing.
__attribute__((target("avx2,fma,popcnt"))) void outliers_transposed8(const Problem& P, int64_t b, float* acc,
                                                                    float* sums) {
  const int32_t* ip = P.indptr + b * kBlockN;
  const int32_t first = ip[0], end = ip[kBlockN];
  if (first == end) return;
  const int64_t chunks = P.mp / 8, chunk_stride = kBlockN * 8;
  std::fill(sums, sums + chunks * chunk_stride, 0.0f);
  const __m256i end0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip + 1));
  const __m256i end1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ip + 9));
  for (int32_t e = first; e < end; ++e) {
    // e's row is the first j with ip[j + 1] > e; the rows ending after e are j .. 15 (ip is non-decreasing)
    const __m256i ev = _mm256_set1_epi32(e);
    const int after = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(end0, ev))) |
                      _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(end1, ev))) << 8;
    float* s = sums + (kBlockN - __builtin_popcount(after)) * 8;
    const __m256 v = _mm256_set1_ps(P.values[e]);
    const float* xk = P.xt + P.indices[e] * P.mp;
    for (int64_t c = 0; c < chunks; ++c, xk += 8, s += chunk_stride)
      _mm256_storeu_ps(s, _mm256_fmadd_ps(v, _mm256_loadu_ps(xk), _mm256_loadu_ps(s)));
  }
  for (int64_t c = 0; c < chunks; ++c) {
    __m256 r[kBlockN];  // r[j] = batch rows 8c .. 8c + 7 of output row 16b + j
    for (int64_t j = 0; j < kBlockN; ++j) r[j] = _mm256_loadu_ps(sums + c * chunk_stride + j * 8);
    transpose8(r);  // r[i]: output rows 0-7 of batch row 8c + i; r[8 + i]: rows 8-15
    transpose8(r + 8);
    for (int64_t i = 0; i < std::min<int64_t>(8, P.m - 8 * c); ++i) {
      float* out = acc + (8 * c + i) * kBlockN;
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), r[i]));
      _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), r[8 + i]));
    }
  }
}

// ---- output ------------------------------------------------------------------------------------------

// y[m, 16b + j] = acc[m][j] + bias, rounded to T once.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void store_block(const Problem& P, int64_t b, const float* acc, const T* bias,
                                                          T* y) {
  const __m256 b0 = bias ? load8(bias + b * kBlockN) : _mm256_setzero_ps();
  const __m256 b1 = bias ? load8(bias + b * kBlockN + 8) : _mm256_setzero_ps();
  for (int64_t m = 0; m < P.m; ++m) {
    T* out = y + m * P.n + b * kBlockN;
    store8(out, _mm256_add_ps(_mm256_loadu_ps(acc + m * kBlockN), b0));
    store8(out + 8, _mm256_add_ps(_mm256_loadu_ps(acc + m * kBlockN + 8), b1));
  }
}

// ---- kDequant: W' for ATen's GEMM --------------------------------------------------------------------

// w [N][K] = W' in T for blocks b0..b1, exactly the reference: fp32 c * ((u - z) * s) (versions 1 and 2: the
// product exact; version 3: u - z exact, the product rounded once) plus the outlier value where there is one,
// rounded to T once. A row's word is 8 consecutive columns (two words of 8-bit codes): 8 lanes, one store.
// (Vector code lives in target functions, never in a lambda: a lambda is compiled without the target, and passing
// __m256 by value across that boundary breaks the ABI.)
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void dequant_blocks(const Problem& P, const float* c, T* w, int64_t b0,
                                                             int64_t b1, int64_t row0 = 0) {
  const bool wide = P.bits == 8;
  const int64_t per_word = 32 / P.bits, words = P.k / per_word, chunks_per_group = P.g / 8;  // 8 columns a chunk
  const __m256i shifts = wide ? _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24)
                              : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i lo_mask = _mm256_set1_epi32(wide ? 0xFF : 0xF);
  const uint32_t code_mask = wide ? 0xFF : 0xF;
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* wb = P.w + b * words * kBlockN;
    for (int64_t j = 0; j < kBlockN; ++j) {
      T* row = w + (b * kBlockN + j - row0) * P.k;
      for (int64_t gi = 0; gi < P.groups; ++gi) {
        const __m256 s = _mm256_set1_ps(row_step(P, b, gi, j)), z = _mm256_set1_ps(row_zero(P, b, gi, j));
        for (int64_t q = gi * chunks_per_group; q < (gi + 1) * chunks_per_group; ++q) {
          // columns 8q..8q+7: one word of 4-bit codes, or the words 2q and 2q + 1 of 8-bit codes
          const __m256i words8 =
              wide ? _mm256_setr_m128i(_mm_set1_epi32(static_cast<int>(wb[2 * q * kBlockN + j])),
                                       _mm_set1_epi32(static_cast<int>(wb[(2 * q + 1) * kBlockN + j])))
                   : _mm256_set1_epi32(static_cast<int>(wb[q * kBlockN + j]));
          const __m256i u = _mm256_and_si256(_mm256_srlv_epi32(words8, shifts), lo_mask);
          __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(u), z), s);
          if (c) v = _mm256_mul_ps(v, _mm256_loadu_ps(c + 8 * q));
          store8(row + 8 * q, v);
        }
      }
      const int64_t n = b * kBlockN + j;
      for (int32_t e = P.indptr[n]; e < P.indptr[n + 1]; ++e) {  // W' = dense + S, as the reference adds them
        const int64_t col = P.indices[e];
        const int64_t gi = col / P.g;
        const uint32_t word = wb[(col / per_word) * kBlockN + j];
        const float code = static_cast<float>((word >> (P.bits * (col % per_word))) & code_mask);
        const float dense = ((code - row_zero(P, b, gi, j)) * row_step(P, b, gi, j)) * (c ? c[col] : 1.0f);
        row[col] = static_cast<T>(dense + P.values[e]);
      }
    }
  }
}

// ---- per-call preparation of x -----------------------------------------------------------------------

// Per-thread buffers that only grow: fresh allocations of ~100 KB each call would come back from the OS as
// new pages and page-fault on first touch (measured ~15 us per call at M = 16, K = 1536).
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t count) {
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// p rounded up to a multiple of `bytes` (a power of two), as a T*: the caller allocated bytes - 1 more.
template <typename T>
T* align_up(void* p, int64_t bytes) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + bytes - 1) & ~static_cast<uintptr_t>(bytes - 1));
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void widen(const T* x, float* out, int64_t count) {  // count % 8 == 0
  for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(out + i, load8(x + i));
}

// xs [M][K] = x * c in fp32 and, for the bf16 paths, xh = xs rounded to T (what the dot products multiply).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void scale_columns(const float* xf, const float* c, int64_t m, int64_t k,
                                                            float* xs, T* xh) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; i += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xf + r * k + i), _mm256_loadu_ps(c + i));
      _mm256_storeu_ps(xs + r * k + i, v);
      if (xh) store8(xh + r * k + i, v);
    }
  }
}

// out [M][K/G] = the sum of x over each group of G columns (G % 8 == 0).
__attribute__((target("avx2,fma"))) void group_sums(const float* xf, int64_t m, int64_t k, int64_t g, float* out) {
  for (int64_t i = 0; i < m * (k / g); ++i) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < g; c += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xf + i * g + c));
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[i] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
}

// x * c in fixed point for the integer paths, per batch row r0 .. r1 - 1 of xs [M][K] and sub-block of xg
// columns: sigma = max |xs| / qmax, xq = round((xs / max) * qmax) (to nearest even, as cvtps2dq), qsum = sum of
// xq. |xs - sigma xq| <= sigma / 2 = max / (2 qmax). The quotient of |xs| <= max is at most 1 (correctly
// rounded), so |xq| <= qmax with no clamp; dividing first because qmax / max overflows for max below ~1e-34 (M * K
// divisions per call, under 1 % of it). A sub-block of zeros gets sigma = 0 (and xq = 0); one holding an inf or
// a NaN gets sigma = NaN, so that the row's outputs are NaN, as the other paths give, instead of silently finite.
// Each 8 columns' int32 values go to store(q, index of their first column in xs), which writes the path's layout.
template <typename Store>
__attribute__((target("avx2,fma"))) void quantize_x(const float* xs, int64_t k, int64_t xg, int64_t r0, int64_t r1,
                                                    float qmax, float* sigma, float* qsum, const Store& store) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c0 = 0; c0 < k; c0 += xg) {
      const float* v = xs + r * k + c0;
      __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int64_t c = 0; c < xg; c += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + c), abs_mask);
        vmax = _mm256_max_ps(vmax, a);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // |x| >= inf, or NaN
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      const __m256 mxv = _mm256_set1_ps(mx > 0.0f ? mx : 1.0f), unit = _mm256_set1_ps(qmax);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t c = 0; c < xg; c += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(v + c), mxv), unit));
        sum = _mm256_add_epi32(sum, q);
        store(q, r * k + c0 + c);
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      const int64_t i = r * (k / xg) + c0 / xg;
      sigma[i] = _mm256_movemask_ps(bad) ? __builtin_nanf("") : mx / qmax;
      qsum[i] = static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
}

// The i16 path's layout, xq [M][K/2] as the pair dwords i16_rows broadcasts: dword (m, 4q + t) = xq[m, 8q + t] |
// xq[m, 8q + 4 + t] << 16 (the low 16 bits of an int32 in [-32767, 32767] are its two's complement int16).
// For 8-bit codes the pairs follow their words of 4 columns: dword (m, 2q + t) = xq[m, 4q + t] | xq[m, 4q + 2 + t]
// << 16, so the 8 columns of a store (words 2p and 2p + 1) are first permuted to (0, 1, 4, 5 | 2, 3, 6, 7).
template <int kBits>
struct StoreI16 {
  uint32_t* xq;
  __attribute__((target("avx2"))) void operator()(__m256i q, int64_t at) const {
    if constexpr (kBits == 8) q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    const __m128i pairs = _mm_or_si128(_mm_and_si128(_mm256_castsi256_si128(q), _mm_set1_epi32(0xFFFF)),
                                       _mm_slli_epi32(_mm256_extracti128_si256(q, 1), 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + at / 2), pairs);
  }
};

// The i8 path's layout, xq [M][K/4] as the dwords i8_rows broadcasts: per word q, dword 2q = bytes (xq[8q],
// xq[8q+2], xq[8q+4], xq[8q+6]) and dword 2q + 1 = bytes (xq[8q+1], xq[8q+3], xq[8q+5], xq[8q+7]).
struct StoreI8 {
  uint32_t* xq;
  __attribute__((target("avx2"))) void operator()(__m256i q, int64_t at) const {
    // even columns to lanes 0-3, odd to 4-7; int32 -> int16 -> int8 within each 128-bit half (exact: no value
    // in [-127, 127] saturates), so the low dword of each half holds its 4 bytes in order.
    const __m256i eo = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    const __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(eo, eo), _mm256_setzero_si256());
    xq[at / 4] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(b8)));
    xq[at / 4 + 1] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(b8, 1)));
  }
};

// xt [K][mp] = x^T with zero rows past M, 16 x 16 tiles transposed in registers (K % 16 == 0).
__attribute__((target("avx512f"))) void transpose_x(const float* xf, int64_t m, int64_t k, int64_t mp, float* xt) {
  for (int64_t r0 = 0; r0 < mp; r0 += 16) {
    for (int64_t c0 = 0; c0 < k; c0 += 16) {
      __m512 t[16];
      for (int64_t i = 0; i < 16; ++i)
        t[i] = r0 + i < m ? _mm512_loadu_ps(xf + (r0 + i) * k + c0) : _mm512_setzero_ps();
      transpose16(t);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(xt + (c0 + i) * mp + r0, t[i]);
    }
  }
}

// The same with 8 x 8 tiles on AVX2 (xt [K][mp], mp = M rounded up to 8; K % 8 == 0).
__attribute__((target("avx2"))) void transpose_x8(const float* xf, int64_t m, int64_t k, int64_t mp, float* xt) {
  for (int64_t r0 = 0; r0 < mp; r0 += 8) {
    for (int64_t c0 = 0; c0 < k; c0 += 8) {
      __m256 t[8];
      for (int64_t i = 0; i < 8; ++i) t[i] = r0 + i < m ? _mm256_loadu_ps(xf + (r0 + i) * k + c0) : _mm256_setzero_ps();
      transpose8(t);
      for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(xt + (c0 + i) * mp + r0, t[i]);
    }
  }
}

// ---- the op ------------------------------------------------------------------------------------------

bool path_supported(int64_t path, at::ScalarType dtype) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // every such CPU has F16C
  const bool avx512bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
  switch (path) {
    case kFma: return avx2;
    case kBf16Dp: return avx512bf16 && dtype == at::kBFloat16;
    case kAmx:  // amx_b_tiles' vpmultishiftqb: AVX512-VBMI (every AMX CPU has it)
      return avx512bf16 && amx && __builtin_cpu_supports("avx512vbmi") && dtype == at::kBFloat16 && request_amx();
    case kDequant: return avx2;
    case kI16: return avx2;
    case kI8: return avx2;
    case kVnni: return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

int64_t choose_path(at::IntArrayRef plan, int64_t m) {
  // plan = [m_max_0, path_0, m_max_1, path_1, ...]: the first pair with M <= m_max; the last covers the rest.
  TORCH_CHECK(!plan.empty() && plan.size() % 2 == 0, "easyquant::cpu_int4_linear: plan must hold (m_max, path) pairs");
  for (size_t i = 0; i + 2 < plan.size(); i += 2)
    if (m <= plan[i]) return plan[i + 1];
  return plan[plan.size() - 1];
}

// Every 64-byte line of [p, p + bytes) into L1 (the first and last lines included, whatever p's alignment).
inline void prefetch_range(const void* p, int64_t bytes) {
  if (bytes <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t line = first; line < end; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

// The next block's group metadata (steps or multipliers, zero points, units) and outliers, fetched while this
// block computes. (Its codes are prefetched by the paths themselves, a fixed distance ahead of the loads.)
void prefetch_block_extras(const Problem& P, int64_t b) {
  const int64_t entries = P.groups * kBlockN, first = b * entries;  // the block's metadata per tensor
  if (P.s) prefetch_range(P.s + first, entries * sizeof(uint16_t));
  if (P.a) prefetch_range(P.a + first, entries);
  if (P.z) prefetch_range(P.z + first, entries);
  if (P.d) prefetch_range(P.d + b * kBlockN, kBlockN * sizeof(float));
  const int64_t e0 = P.indptr[b * kBlockN], e1 = P.indptr[(b + 1) * kBlockN];
  prefetch_range(P.indices + e0, (e1 - e0) * sizeof(int32_t));
  prefetch_range(P.values + e0, (e1 - e0) * sizeof(float));
}

// Block b's outliers into its acc [M][16], by the method P's x was prepared for (sums: outliers_transposed8's).
inline void add_outliers(const Problem& P, int64_t b, float* acc, float* sums) {
  if (P.xt_lanes == 16) outliers_transposed(P, b, acc);  // xt_lanes is set (16 or 8) only with xt
  else if (P.xt_lanes == 8) outliers_transposed8(P, b, acc, sums);
  else if (P.m == 1) outliers_row(P, b, acc);
  else outliers_scalar(P, b, acc);
}

// The vnni path on blocks b + j stride (j < NB) into acc [NB][M][16]: the one-row loop or the row tiles, 4- or 8-bit.
template <int NB>
void vnni_any_blocks(const Problem& P, int64_t b, int64_t stride, float* acc) {
  if (P.m == 1 && P.bits == 8) vnni_row_blocks<8, NB>(P, b, stride, acc);
  else if (P.m == 1) vnni_row_blocks<4, NB>(P, b, stride, acc);
  else if (P.bits == 8) vnni_blocks<8, NB>(P, b, stride, acc);
  else vnni_blocks<4, NB>(P, b, stride, acc);
}

// Runs of blocks that the vnni path reads side by side (vnni_row_blocks says why), up to kRunsMaxRows batch rows.
constexpr int64_t kRowStreams = 4;
constexpr int64_t kRunsMaxRows = 8;

template <typename T>
void run_block_range(const Problem& P, int64_t path, const T* bias, T* y, int64_t b0, int64_t b1) {
  std::vector<float> acc((P.m <= kRunsMaxRows ? kRowStreams : 1) * P.m * kBlockN);
  std::vector<float> sums(P.xt_lanes == 8 ? P.mp * kBlockN : 0);  // outliers_transposed8's row sums
  std::vector<char> scratch;
  float* panel32 = nullptr;
  uint16_t* ring = nullptr;  // the amx path's B tiles
  if (path == kFma && P.m > 2) {
    scratch.resize(kChunkK * kBlockN * sizeof(float) + 64);
    panel32 = align_up<float>(scratch.data(), 64);
  } else if (path == kAmx) {
    scratch.resize(kAmxRingBytes + kPage);
    ring = align_up<uint16_t>(scratch.data(), kPage);  // kPage says why
    amx_configure();
  }
  int64_t b = b0;
  if (path == kVnni && P.m <= kRunsMaxRows && b1 - b0 >= kRowStreams) {
    // kRowStreams runs of `run` blocks, block i of every run side by side (vnni_row_blocks says why); the last
    // (b1 - b0) % kRowStreams blocks one by one, below
    const int64_t run = (b1 - b0) / kRowStreams;
    for (int64_t i = 0; i < run; ++i) {
      vnni_any_blocks<kRowStreams>(P, b0 + i, run, acc.data());
      for (int64_t j = 0; j < kRowStreams; ++j) {
        float* aj = acc.data() + j * P.m * kBlockN;
        add_outliers(P, b0 + i + j * run, aj, sums.data());
        store_block<T>(P, b0 + i + j * run, aj, bias, y);
      }
    }
    b = b0 + run * kRowStreams;
  }
  for (; b < b1; ++b) {
    if (b + 1 < b1) prefetch_block_extras(P, b + 1);
    if (path == kFma && P.a) {  // format version 3: fractional zeros (fma_steps)
      if (P.m == 1) fma_direct<1, true>(P, b, 0, acc.data());
      else if (P.m == 2) fma_direct<2, true>(P, b, 0, acc.data());
      else fma_panel<true>(P, b, acc.data(), panel32);
    } else if (path == kFma) {
      if (P.m == 1) fma_direct<1, false>(P, b, 0, acc.data());
      else if (P.m == 2) fma_direct<2, false>(P, b, 0, acc.data());
      else fma_panel<false>(P, b, acc.data(), panel32);
    } else if (path == kI16 && P.bits == 8) {
      if (P.m == 1) i16_row_block<8>(P, b, acc.data());
      else int_block<false, 8>(P, b, acc.data());
    } else if (path == kI16) {
      if (P.m == 1) i16_row_block<4>(P, b, acc.data());
      else int_block<false, 4>(P, b, acc.data());
    } else if (path == kVnni) {
      vnni_any_blocks<1>(P, b, 1, acc.data());
    } else if (path == kI8) {
      int_block<true, 4>(P, b, acc.data());
    } else if (path == kBf16Dp) {
      bf16dp_block(P, b, acc.data());
    } else if (P.bits == 8) {
      amx_block<8>(P, b, acc.data(), ring);
    } else {
      amx_block<4>(P, b, acc.data(), ring);
    }
    add_outliers(P, b, acc.data(), sums.data());
    store_block<T>(P, b, acc.data(), bias, y);
  }
  if (path == kAmx) amx_release();
}

// Per-call buffers of x in its forms (see Problem), grown on demand and kept (see scratch).
struct Scratch {
  std::vector<float> xf, xs, xsum, xt, xsigma, xqsum;
  std::vector<uint16_t> xh, xtile, xcorr;
  std::vector<uint32_t> xq;

  size_t bytes() const {
    return (xf.capacity() + xs.capacity() + xsum.capacity() + xt.capacity() + xsigma.capacity() +
            xqsum.capacity() + xq.capacity()) * 4 + (xh.capacity() + xtile.capacity() + xcorr.capacity()) * 2;
  }
};

// cpu_int4_linear_jobs: elements of x prepared at once (a wave), and the buffers a thread keeps between calls.
constexpr int64_t kWaveElements = int64_t{1} << 21;   // 2 M elements: ~30 MB of buffers
constexpr size_t kKeepScratchBytes = size_t{64} << 20;

// The weights' part of a Problem.
Problem weights_problem(const easyquant::LinearWeights& W, int64_t m) {
  Problem P{};  // the pointers a path does not use stay null
  P.m = m;
  P.n = W.n;
  P.k = W.k;
  P.g = W.g;
  P.groups = W.k / W.g;
  P.bits = W.bits;
  P.sym_zero = W.bits == 8 ? 128.0f : 8.0f;
  P.zero_unit = W.bits == 8 ? 1.0f : 1.0f / 16.0f;
  P.w = W.w;
  P.s = W.s;
  P.a = W.a;
  P.d = W.d;
  P.z = W.z;
  P.indptr = W.indptr;
  P.indices = W.indices;
  P.values = W.values;
  return P;
}

// 16 bf16 (a ymm's bits) -> fp32: the bits in the high half of each lane.
__attribute__((target("avx512f"))) inline __m512 bf16x16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The lane sums of 16 vectors as one vector (lane i: the sum of p[i]'s 16 lanes), in 45 operations where 16
// _mm512_reduce_add_ps take ~130: pairs of vectors are interleaved and added, each step halving the vectors and
// doubling the rows per vector (16 -> 8 within 128-bit lanes, -> 4 across their 64-bit halves, -> 2 and -> 1 across
// whole 128-bit lanes).
__attribute__((target("avx512f"))) inline __m512 row_sums16(const __m512 p[16]) {
  __m512 q[8], s[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0 + a2, b0 + b2, a1 + a3, b1 + b3) of rows a = 2i, b = 2i + 1
    q[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: the lane's sums of rows 4j .. 4j + 3
    s[j] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * j], q[2 * j + 1], 0x44), _mm512_shuffle_ps(q[2 * j], q[2 * j + 1], 0xEE));
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

// The amx path's x for one slice s (batch rows 16s .. 16s + 15) and group gi, in one pass over its 16 x G values
// (bf16 x [M][K], c [K] or null):
// - x * c rounded to bf16 (to nearest even, as scale_columns) straight into the group's A tiles (xtile
//   [ceil(M/16)][amx_slice_tiles(K)][16][32], zero rows past M): each chunk of 32 columns is one 1 KB tile, 16 row
//   stores;
// - the group's sum of those bf16 values for each of the 16 rows, as one vector (xsum16 [ceil(M/16)][K/G][16]):
//   each row's even and odd columns as fp32 (a shift and a mask of the bf16 pairs) added into 16 lanes, and
//   row_sums16 turns 16 rows around at once (vdpbf16ps against bf16 ones would be one operation, but lost ~1 % of
//   the sum of x near 1e-36 here: test_native_path_tiny_x);
// - with kXt, the outliers' x^T (xt [K][16 ceil(M/16)] fp32, unscaled, zero columns past M): each row's even and
//   odd columns of x as fp32 again, each set turned around by transpose16.
// Why 16 rows at a time: row by row (before), each row and chunk ended in a horizontal reduction, and x^T was a
// second and third pass (widen x to fp32, then transpose it), all on one thread while the other waited. On this
// Xeon a 16 x 8960 call's x cost ~140 us of a ~810 us call with two threads (docs/serving.md).
template <bool kScale, bool kXt>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void amx_x_group(const uint16_t* x, const float* c, int64_t m,
                                                                         int64_t k, int64_t g, int64_t s, int64_t gi,
                                                                         uint16_t* xtile, float* xsum16, float* xt) {
  const int64_t tiles = amx_slice_tiles(k), chunks_per_group = g / 32, r0 = 16 * s;
  const int64_t rows = std::min<int64_t>(16, m - r0);
  const int64_t mp = kXt ? 16 * ((m + 15) / 16) : 0;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 total = _mm512_setzero_ps();
  for (int64_t ch = gi * chunks_per_group; ch < (gi + 1) * chunks_per_group; ++ch) {
    uint16_t* tile = xtile + (s * tiles + ch) * kTileElems;
    __m512 sc_lo = _mm512_setzero_ps(), sc_hi = _mm512_setzero_ps();
    if constexpr (kScale) {
      sc_lo = _mm512_loadu_ps(c + 32 * ch);
      sc_hi = _mm512_loadu_ps(c + 32 * ch + 16);
    }
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      __m512i v = _mm512_setzero_si512();
      if (i < rows) {
        v = _mm512_loadu_si512(x + (r0 + i) * k + 32 * ch);
        if constexpr (kScale) {  // x * c rounded to bf16: the sums are of what the tiles multiply
          const __m512 lo = bf16x16_to_ps(_mm512_castsi512_si256(v)), hi = bf16x16_to_ps(_mm512_extracti64x4_epi64(v, 1));
          v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sc_hi), _mm512_mul_ps(lo, sc_lo));
        }
      }
      _mm512_storeu_si512(tile + i * 32, v);
      acc[i] = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_castsi512_ps(_mm512_and_si512(v, high)));
    }
    total = _mm512_add_ps(total, row_sums16(acc));
    if constexpr (kXt) {
      // even columns (the low halves of the pairs, shifted into place), then odd ones (the high halves, masked);
      // x's rows are loaded again (from L1): the 16 sums above and 16 rows here do not fit the registers together
#pragma GCC unroll 2
      for (int odd = 0; odd < 2; ++odd) {
        __m512 t[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const __m512i raw = i < rows ? _mm512_loadu_si512(x + (r0 + i) * k + 32 * ch) : _mm512_setzero_si512();
          t[i] = _mm512_castsi512_ps(odd ? _mm512_and_si512(raw, high) : _mm512_slli_epi32(raw, 16));
        }
        transpose16(t);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(xt + (32 * ch + 2 * j + odd) * mp + r0, t[j]);
      }
    }
  }
  _mm512_storeu_ps(xsum16 + (s * (k / g) + gi) * 16, total);
}

// The zero-point A' tiles from the group sums (xsum16, above): each row's sum times 2^e in three bf16 parts, h
// rounded to nearest even, then m of the rest, then l of what is left, negated (prepare_amx_x says why), each part
// twice, written as xcorr's rows of 6 bf16: three dwords (hh, mm, ll) per row, interleaved by two permutes per
// 16 dwords.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void amx_corr_tiles(const float* xsum16, int64_t count,
                                                                            float up, uint16_t* xcorr) {
  alignas(64) int32_t idx1[3][16], idx2[3][16];
  for (int j = 0; j < 3; ++j)
    for (int l = 0; l < 16; ++l) {  // output dword d = 16j + l is part t = d % 3 of row r = d / 3
      const int d = 16 * j + l, r = d / 3, t = d % 3;
      idx1[j][l] = t == 1 ? 16 + r : r;  // from hh (t = 0) or mm (t = 1)
      idx2[j][l] = t == 2 ? 16 + r : l;  // ll (t = 2), or what idx1 took
    }
  const __m512 scale = _mm512_set1_ps(-up);
  for (int64_t i = 0; i < count; ++i) {
    __m512 rest = _mm512_mul_ps(_mm512_loadu_ps(xsum16 + 16 * i), scale);  // exact: up is a power of 2
    __m512i part[3];
    for (int t = 0; t < 3; ++t) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(rest);
      const __m512i wide = _mm512_cvtepu16_epi32(h);
      part[t] = _mm512_or_si512(wide, _mm512_slli_epi32(wide, 16));
      rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));  // exact
    }
    uint32_t* dst = reinterpret_cast<uint32_t*>(xcorr + i * 16 * kCorrK);
    for (int j = 0; j < 3; ++j) {
      const __m512i hm = _mm512_permutex2var_epi32(part[0], _mm512_load_si512(idx1[j]), part[1]);
      _mm512_storeu_si512(dst + 16 * j, _mm512_permutex2var_epi32(hm, _mm512_load_si512(idx2[j]), part[2]));
    }
  }
}

// The outliers' x^T (xf [M][K] fp32, unscaled), where the block paths add them many batch rows at a time.
inline void prepare_xt(Problem& P, const float* xf, int64_t nnz, Scratch& S) {
  const int64_t m = P.m, k = P.k;
  if (m > 2 && nnz) {  // outliers 16 (AVX512) or 8 batch rows at a time: x^T, zero-padded
    P.xt_lanes = has_avx512() ? 16 : 8;
    P.mp = (m + P.xt_lanes - 1) / P.xt_lanes * P.xt_lanes;
    float* xt = scratch(S.xt, k * P.mp);
    if (P.xt_lanes == 16) transpose_x(xf, m, k, P.mp, xt);
    else transpose_x8(xf, m, k, P.mp, xt);
    P.xt = xt;
  }
}

// The amx path's x (bf16): A tiles, group sums and (with outliers, from 3 rows) x^T in one pass over x split over
// the threads (amx_x_group), then the zero-point A' tiles (amx_corr_tiles); xf (unscaled fp32) only for outliers
// at 1 or 2 rows.
inline void prepare_amx_x(Problem& P, const uint16_t* x, const float* c, int64_t nnz, Scratch& S) {
  const int64_t m = P.m, k = P.k, g = P.g, slices = (m + 15) / 16, groups = k / g;
  // on a page, each slice's tiles on whole pages (kPage says why)
  uint16_t* xtile = align_up<uint16_t>(scratch(S.xtile, slices * amx_slice_tiles(k) * kTileElems + kPage / 2), kPage);
  float* xsum16 = scratch(S.xsum, slices * groups * 16);
  const bool with_xt = nnz && m > 2;
  float* xt = nullptr;
  P.xf = P.xs = nullptr;
  P.xh = nullptr;
  P.xsum = nullptr;
  if (with_xt) {  // outliers_transposed, 16 batch rows at a time
    P.xt_lanes = 16;
    P.mp = slices * 16;
    xt = scratch(S.xt, k * P.mp);
    P.xt = xt;
  } else if (nnz) {  // outliers_row / outliers_scalar
    float* xf = scratch(S.xf, m * k);
    widen(reinterpret_cast<const at::BFloat16*>(x), xf, m * k);
    P.xf = xf;
  }
  // units of one slice and group; a task of at least 32 K values (smaller calls run inline: a parallel region
  // costs more than their x)
  at::parallel_for(0, slices * groups, std::max<int64_t>(1, 32768 / (16 * g)), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t s = u / groups, gi = u % groups;
      if (c && with_xt) amx_x_group<true, true>(x, c, m, k, g, s, gi, xtile, xsum16, xt);
      else if (c) amx_x_group<true, false>(x, c, m, k, g, s, gi, xtile, xsum16, xt);
      else if (with_xt) amx_x_group<false, true>(x, c, m, k, g, s, gi, xtile, xsum16, xt);
      else amx_x_group<false, false>(x, c, m, k, g, s, gi, xtile, xsum16, xt);
    }
  });
  P.xtile = xtile;
  // each group's sum of x in three bf16 parts (h rounded to nearest, then m of the rest, then l of what is left;
  // each rest is exact in fp32, and h + m + l is the sum exactly: the rest after m has at most 8 significant bits),
  // negated, as the A tile of the zero-point product (amx_slice). The tile unit flushes bf16 denormals: m and l of a
  // sum below ~2^-110 would vanish (x at 1e-36: 1 % off). So the sums are scaled by 2^e, the call's largest to
  // ~2^64, and B' by 2^-e (both exact); only a call whose sums span more than ~2^170 loses its smallest ones' low
  // parts. (Rows past M have zero sums: they do not change the largest.)
  float largest = 0.0f;
  for (int64_t i = 0; i < slices * groups * 16; ++i) largest = std::max(largest, std::fabs(xsum16[i]));
  const int e = std::isfinite(largest) && largest > 0.0f ? std::clamp(64 - std::ilogb(largest), -100, 100) : 0;
  P.zero_scale = std::ldexp(1.0f, -e);
  uint16_t* xcorr = scratch(S.xcorr, slices * groups * 16 * kCorrK);
  amx_corr_tiles(xsum16, slices * groups, std::ldexp(1.0f, e), xcorr);
  P.xcorr = xcorr;
}

// x [M, K] (T = bf16 / fp16) in the forms the block path `path` reads, in S's buffers: P's x pointers.
template <typename T>
void prepare_x(Problem& P, const T* x, const float* c, int64_t path, int64_t nnz, Scratch& S) {
  const int64_t m = P.m, k = P.k, g = P.g;
  if (path == kAmx) {  // bf16 x only (path_supported)
    prepare_amx_x(P, reinterpret_cast<const uint16_t*>(x), c, nnz, S);
    return;
  }
  const bool bf16_path = path == kBf16Dp;
  float* xf = scratch(S.xf, m * k);
  widen(x, xf, m * k);
  const float* xs = xf;
  const uint16_t* xh = reinterpret_cast<const uint16_t*>(x);
  if (c) {  // x * c once per call; the outliers keep xf
    float* scaled = scratch(S.xs, m * k);
    uint16_t* half = bf16_path ? scratch(S.xh, m * k) : nullptr;
    scale_columns(xf, c, m, k, scaled, reinterpret_cast<T*>(half));
    xs = scaled;
    if (half) xh = half;
  }
  P.xf = xf;
  P.xs = xs;
  P.xh = xh;
  if (bf16_path) {  // the sum over each group of what vdpbf16ps multiplies: removes the codes' offset
    float* xsum = scratch(S.xsum, m * (k / g));
    if (xh == reinterpret_cast<const uint16_t*>(x)) {
      group_sums(xf, m, k, g, xsum);
    } else {  // sums of the rounded x * c
      float* rounded = scratch(S.xs, m * k);  // the fp32 copy is not needed by the bf16 paths
      widen(reinterpret_cast<const at::BFloat16*>(xh), rounded, m * k);
      group_sums(rounded, m, k, g, xsum);
    }
    P.xsum = xsum;
  }
  // x * c in fixed point (16 bits per sub-block of xg <= 128 columns, or 8 bits per 32), rows split over the
  // threads (M x K values, read twice)
  if (path == kI16 || path == kVnni || path == kI8) {
    const bool i8 = path == kI8;
    P.xg = i8 ? kI8Subblock : i16_subblock(g);
    P.xblocks = k / P.xg;
    uint32_t* xq = scratch(S.xq, m * k / (i8 ? 4 : 2));
    float* xsigma = scratch(S.xsigma, m * P.xblocks);
    float* xqsum = scratch(S.xqsum, m * P.xblocks);
    at::parallel_for(0, m, std::max<int64_t>(1, 32768 / k), [&](int64_t r0, int64_t r1) {
      if (i8) quantize_x(xs, k, P.xg, r0, r1, kI8Max, xsigma, xqsum, StoreI8{xq});
      else if (P.bits == 8) quantize_x(xs, k, P.xg, r0, r1, kI16Max, xsigma, xqsum, StoreI16<8>{xq});
      else quantize_x(xs, k, P.xg, r0, r1, kI16Max, xsigma, xqsum, StoreI16<4>{xq});
    });
    P.xq = xq;
    P.xsigma = xsigma;
    P.xqsum = xqsum;
  }
  prepare_xt(P, xf, nnz, S);
}

// The plan's path for M rows, checked against the CPU, the dtype and the codes' width (count it once the call
// is known to run: count_path).
int64_t checked_path(at::IntArrayRef plan, int64_t m, at::ScalarType dtype, int64_t bits) {
  const int64_t path = choose_path(plan, m);
  TORCH_CHECK(path >= 0 && path < kNumPaths && path_supported(path, dtype), "easyquant::cpu_int4_linear: path ", path,
              " is not available on this CPU for ", dtype);
  TORCH_CHECK(bits == 4 || path == kI16 || path == kVnni || path == kAmx || path == kDequant,
              "easyquant::cpu_int4_linear: 8-bit codes take the i16, vnni, amx and dequant paths only; the plan chose ",
              "path ", path, " for M = ", m);
  return path;
}

void count_path(int64_t path) { g_path_calls[path].fetch_add(1, std::memory_order_relaxed); }

// The kDequant path: y [M, N] = x [M, K] @ W'^T (+ bias), W' in x's dtype, bit-identical to the reference
// dequantize (outliers included), handed to ATen's GEMM (oneDNN; AMX where present) a tile of rows at a time.
// Why tiles: W' of a whole layer written to a fresh tensor each call (55 MB for a 17920 x 1536 layer) paid the
// page faults of its first touch every call (~20 ms per such layer here, more than its GEMM at 256 rows) and
// then went through memory twice. A tile of ~4 MB lives in one grow-only buffer per thread and is still in
// cache when the GEMM reads it. Each tile's GEMM writes its own columns of y (a strided view, ldc = N) with the
// bias added in the GEMM, as at::linear does. (W' is the reference's bit for bit; the GEMM's own summation order
// may differ between a tile and a whole-layer call, as between any two oneDNN shapes.)
constexpr int64_t kDequantTileBytes = int64_t{4} << 20;

void dequant_mm(const Problem& P, const float* c, const at::Tensor& x, const at::Tensor& bias, at::Tensor& y) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t tile_rows =
      std::min(P.n, std::max<int64_t>(kBlockN, kDequantTileBytes / (2 * P.k) / kBlockN * kBlockN));
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < tile_rows * P.k || buffer.scalar_type() != x.scalar_type())
    buffer = at::empty({tile_rows * P.k}, x.options());
  for (int64_t n0 = 0; n0 < P.n; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, P.n - n0);
    at::Tensor w = buffer.narrow(0, 0, rows * P.k).view({rows, P.k});
    at::parallel_for(n0 / kBlockN, (n0 + rows) / kBlockN, 1, [&](int64_t b0, int64_t b1) {
      if (bf16) dequant_blocks<at::BFloat16>(P, c, w.data_ptr<at::BFloat16>(), b0, b1, n0);
      else dequant_blocks<at::Half>(P, c, w.data_ptr<at::Half>(), b0, b1, n0);
    });
    at::Tensor out = y.narrow(1, n0, rows);
    if (bias.defined()) at::addmm_out(out, bias.narrow(0, n0, rows), x, w.t());
    else at::mm_out(out, x, w.t());
  }
}

// The 16-row blocks of several prepared linears in one parallel region. Thread t takes the blocks whose work
// starts in [total * t / T, total * (t + 1) / T): contiguous runs of blocks, balanced by work (a block of a
// linear with M rows weighs M + kBlockReadRows), so that an expert with more tokens gets more threads' time.
template <typename T>
void run_blocks_together(const std::vector<Problem>& problems, const std::vector<int64_t>& paths,
                         const std::vector<void*>& outputs) {
  std::vector<int64_t> before(problems.size());  // the work of the blocks before each linear's first
  int64_t total = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    before[i] = total;
    total += (problems[i].n / kBlockN) * (problems[i].m + kBlockReadRows);
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / threads, hi = total * (t + 1) / threads;
      for (size_t i = 0; i < problems.size(); ++i) {
        const Problem& P = problems[i];
        const int64_t unit = P.m + kBlockReadRows, blocks = P.n / kBlockN;
        // the blocks b with before + b * unit in [lo, hi): ceilings, clamped (a numerator <= 0 gives <= 0)
        const int64_t b0 = std::clamp<int64_t>((lo - before[i] + unit - 1) / unit, 0, blocks);
        const int64_t b1 = std::clamp<int64_t>((hi - before[i] + unit - 1) / unit, 0, blocks);
        if (b0 < b1) run_block_range<T>(P, paths[i], nullptr, static_cast<T*>(outputs[i]), b0, b1);
      }
    }
  });
}

}  // namespace

namespace easyquant {

LinearWeights LinearWeights::at(int64_t e, int64_t outlier_offset, int64_t outlier_count) const {
  LinearWeights out = *this;
  const int64_t meta = n * (k / g);  // entries of each per-group tensor
  out.w += e * n * (k * bits / 32);
  if (s) out.s += e * meta;
  if (a) out.a += e * meta;
  if (z) out.z += e * meta;
  if (d) out.d += e * n;
  if (c) out.c += e * k;
  out.indptr += e * (n + 1);
  out.indices = indices + outlier_offset;
  out.values = values + outlier_offset;
  out.nnz = outlier_count;
  return out;
}

LinearWeights checked_weights(const std::string& what, int64_t experts, int64_t k, const at::Tensor& w_q,
                              const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                              const c10::optional<at::Tensor>& col_scale, const at::Tensor& indptr,
                              const c10::optional<at::Tensor>& row_steps, int64_t group_size) {
  // The O(1) invariants every pointer relies on are checked here, whatever the caller validated: a malformed
  // tensor must be an error, never a wild read. (The O(nnz) ones, every column index in [0, K) and non-decreasing
  // row pointers, are the loader's: format.validate_layer runs on each layer's final CSR.)
  const bool stacked = experts > 0;
  const std::string each = stacked ? " per expert" : "";
  TORCH_CHECK(indptr.dim() == (stacked ? 2 : 1) && (!stacked || indptr.size(0) == experts) && indptr.size(-1) >= 2 &&
                  indptr.scalar_type() == at::kInt && indptr.is_contiguous(),
              what, ": indptr must be contiguous int32 [", stacked ? "E = " + std::to_string(experts) + ", " : "",
              "N + 1] with N >= 1, got ", indptr.scalar_type(), " ", indptr.sizes());
  experts = std::max<int64_t>(experts, 1);  // the number of linears below
  const int64_t n = indptr.size(-1) - 1;
  TORCH_CHECK(group_size == -1 || group_size > 0, what, ": group_size must be > 0 or -1 (per channel), got ",
              group_size);
  const int64_t g = group_size == -1 ? k : group_size;
  TORCH_CHECK(k > 0 && n % kBlockN == 0 && k % 32 == 0 && g % 32 == 0 && k % g == 0, what,
              ": needs N % 16 == 0, K % 32 == 0 and a group size, multiple of 32, dividing K; got N = ", n, ", K = ", k,
              ", G = ", g);
  const int64_t meta = experts * n * (k / g);
  // The codes' width from the words per row: K/8 (4-bit) or K/4 (8-bit); K % 32 == 0, so the two never meet.
  const int64_t words4 = experts * n * k / 8, words8 = experts * n * k / 4;
  TORCH_CHECK(w_q.scalar_type() == at::kInt && (w_q.numel() == words4 || w_q.numel() == words8) && w_q.is_contiguous(),
              what, ": w_q must be contiguous int32 with N*K/8 = ", n * k / 8, " words (4-bit codes) or N*K/4 = ",
              n * k / 4, " (8-bit)", each, ", got ", w_q.scalar_type(), " ", w_q.sizes());
  LinearWeights W;
  W.n = n;
  W.k = k;
  W.g = g;
  W.bits = w_q.numel() == words4 ? 4 : 8;
  W.w = reinterpret_cast<const uint32_t*>(w_q.data_ptr<int32_t>());
  if (row_steps) {  // format version 3: uint8 multipliers of the rows' units, zero points in sixteenths
    TORCH_CHECK(row_steps->scalar_type() == at::kFloat && row_steps->numel() == experts * n &&
                    row_steps->is_contiguous(),
                what, ": row_steps must be contiguous fp32 [N = ", n, "]", each, ", got ", row_steps->scalar_type(),
                " ", row_steps->sizes());
    TORCH_CHECK(scales.scalar_type() == at::kByte && scales.numel() == meta && scales.is_contiguous(), what,
                ": with row_steps (format version 3), scales must be contiguous uint8 step multipliers with N*K/G = ",
                n * (k / g), " entries", each, ", got ", scales.scalar_type(), " ", scales.sizes());
    TORCH_CHECK(zeros.has_value(), what, ": row_steps (format version 3) needs zeros (uint8, sixteenths of a code)");
    W.a = scales.data_ptr<uint8_t>();
    W.d = row_steps->data_ptr<float>();
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.numel() == meta && scales.is_contiguous(), what,
                ": scales must be contiguous fp16 with N*K/G = ", n * (k / g), " entries", each,
                " (uint8 step multipliers need row_steps: format version 3), got ", scales.scalar_type(), " ",
                scales.sizes());
    W.s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  }
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->numel() == meta && zeros->is_contiguous(), what,
                ": zeros must be contiguous uint8 with N*K/G = ", n * (k / g), " entries", each, ", got ",
                zeros->scalar_type(), " ", zeros->sizes());
    W.z = zeros->data_ptr<uint8_t>();
  }
  if (col_scale) {
    TORCH_CHECK(col_scale->scalar_type() == at::kFloat && col_scale->numel() == experts * k &&
                    col_scale->is_contiguous(),
                what, ": col_scale must be contiguous fp32 [", k, "]", each, ", got ", col_scale->scalar_type(), " ",
                col_scale->sizes());
    W.c = col_scale->data_ptr<float>();
  }
  W.indptr = indptr.data_ptr<int32_t>();
  return W;
}

void check_outlier_arrays(const std::string& what, const at::Tensor& indices, const at::Tensor& values) {
  TORCH_CHECK(indices.scalar_type() == at::kInt && values.scalar_type() == at::kFloat &&
                  indices.numel() == values.numel() && indices.is_contiguous() && values.is_contiguous(),
              what, ": outliers must be contiguous int32 indptr/indices and fp32 values of one length");
  TORCH_CHECK(indices.dim() == 1 && values.dim() == 1 && indices.numel() <= INT32_MAX,
              what, ": indices/values must be 1-D with at most 2^31 - 1 entries");
}

at::Tensor cpu_int4_linear(const at::Tensor& x_in, const at::Tensor& w_q, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& col_scale,
                           const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                           const c10::optional<at::Tensor>& bias, int64_t group_size, at::IntArrayRef plan,
                           const c10::optional<at::Tensor>& row_steps) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "easyquant::cpu_int4_linear: x must be bf16 or fp16, got ",
              dtype);
  TORCH_CHECK(x_in.dim() == 2, "easyquant::cpu_int4_linear: x must be [M, K], got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  LinearWeights W =
      checked_weights("easyquant::cpu_int4_linear", 0, k, w_q, scales, zeros, col_scale, indptr, row_steps, group_size);
  check_outlier_arrays("easyquant::cpu_int4_linear", indices, values);
  const int64_t n = W.n;
  TORCH_CHECK(W.indptr[0] == 0 && W.indptr[n] == indices.numel(), "easyquant::cpu_int4_linear: indptr must start at 0 ",
              "and end at nnz = ", indices.numel(), ", got indptr[0] = ", W.indptr[0], ", indptr[N] = ", W.indptr[n]);
  W.indices = indices.data_ptr<int32_t>();
  W.values = values.data_ptr<float>();
  W.nnz = indices.numel();
  if (bias)
    TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == n, "easyquant::cpu_int4_linear: bias must be ", dtype,
                " [", n, "]");
  const int64_t path = checked_path(plan, m, dtype, W.bits);
  count_path(path);
  const bool bf16 = dtype == at::kBFloat16;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  Problem P = weights_problem(W, m);
  if (path == kDequant) {
    at::Tensor y = at::empty({m, n}, x.options());
    dequant_mm(P, W.c, x, b.defined() ? b.reshape({n}) : b, y);  // the tiles take slices of a 1-D bias
    return y;
  }
  thread_local Scratch buffers;
  if (bf16) prepare_x(P, x.data_ptr<at::BFloat16>(), W.c, path, W.nnz, buffers);
  else prepare_x(P, x.data_ptr<at::Half>(), W.c, path, W.nnz, buffers);
  at::Tensor y = at::empty({m, n}, x.options());
  at::parallel_for(0, n / kBlockN, 1, [&](int64_t b0, int64_t b1) {
    if (bf16) run_block_range<at::BFloat16>(P, path, bias ? b.data_ptr<at::BFloat16>() : nullptr,
                                            y.data_ptr<at::BFloat16>(), b0, b1);
    else run_block_range<at::Half>(P, path, bias ? b.data_ptr<at::Half>() : nullptr, y.data_ptr<at::Half>(), b0, b1);
  });
  return y;
}

void cpu_int4_linear_jobs(at::ScalarType dtype, at::IntArrayRef plan, const std::vector<LinearJob>& jobs) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "easyquant::cpu_int4_linear: x must be bf16 or fp16, got ",
              dtype);
  const bool bf16 = dtype == at::kBFloat16;
  const auto options = at::TensorOptions().dtype(dtype);
  std::vector<int64_t> path(jobs.size(), -1);
  for (size_t j = 0; j < jobs.size(); ++j)  // every job checked before any runs
    if (jobs[j].m > 0) path[j] = checked_path(plan, jobs[j].m, dtype, jobs[j].w.bits);
  // Each prepared job's x has buffers of its own, alive together while the region runs (~14 bytes per element of
  // x: fp32 x, x * c, 16-bit x and, from M = 3, x^T for the outliers; the amx path ~2 (its tiles: rows padded to 16),
  // and 4 more with outliers: x^T from M = 3, fp32 x below).
  // So the jobs run in waves of at most kWaveElements elements of x (one wave at decode; a larger job is a wave of
  // its own), the pool is per thread and reused between calls of one wave, and a pool grown past kKeepScratchBytes
  // (by a prefill) is released at the end of the call.
  thread_local std::vector<Scratch> pool;
  if (pool.size() < jobs.size()) pool.resize(jobs.size());  // before any pointer into it is taken
  std::vector<Problem> problems;
  std::vector<int64_t> paths;
  std::vector<void*> outputs;
  int64_t elements = 0;
  const auto run_wave = [&]() {
    if (problems.empty()) return;
    if (bf16) run_blocks_together<at::BFloat16>(problems, paths, outputs);
    else run_blocks_together<at::Half>(problems, paths, outputs);
    problems.clear();
    paths.clear();
    outputs.clear();
    elements = 0;
  };
  for (size_t j = 0; j < jobs.size(); ++j) {
    const LinearJob& job = jobs[j];
    if (job.m == 0) continue;
    count_path(path[j]);
    Problem P = weights_problem(job.w, job.m);
    if (path[j] == kDequant) {  // prefill-sized: ATen's GEMM parallelises it on its own
      const at::Tensor x = at::from_blob(const_cast<void*>(job.x), {job.m, job.w.k}, options);
      at::Tensor y = at::from_blob(job.y, {job.m, job.w.n}, options);
      dequant_mm(P, job.w.c, x, at::Tensor(), y);
      continue;
    }
    const int64_t size = job.m * job.w.k;
    if (!problems.empty() && elements + size > kWaveElements) {
      run_wave();  // nothing points into the pool any more:
      pool.clear();  // a call of several waves is a prefill, each wave's buffers sized to it, not to every max
      pool.resize(jobs.size());
    }
    Scratch& buffers = pool[problems.size()];
    if (bf16) prepare_x(P, static_cast<const at::BFloat16*>(job.x), job.w.c, path[j], job.w.nnz, buffers);
    else prepare_x(P, static_cast<const at::Half*>(job.x), job.w.c, path[j], job.w.nnz, buffers);
    problems.push_back(P);
    paths.push_back(path[j]);
    outputs.push_back(job.y);
    elements += size;
  }
  run_wave();
  size_t kept = 0;
  for (const Scratch& b : pool) kept += b.bytes();
  if (kept > kKeepScratchBytes) pool.clear();
}

}  // namespace easyquant

namespace {

// Which paths this CPU can run for a dtype, as path ids (for the Python side's plan and the tests).
std::vector<int64_t> cpu_int4_paths(c10::ScalarType dtype) {
  std::vector<int64_t> out;
  for (int64_t p = 0; p < kNumPaths; ++p)
    if (path_supported(p, dtype)) out.push_back(p);
  return out;
}

std::vector<int64_t> cpu_int4_path_calls() {
  std::vector<int64_t> out;
  for (auto& c : g_path_calls) out.push_back(c.load());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(easyquant, m) {
  m.def(
      "cpu_int4_linear(Tensor x, Tensor w_q, Tensor scales, Tensor? zeros, Tensor? col_scale, Tensor indptr, "
      "Tensor indices, Tensor values, Tensor? bias, int group_size, int[] plan, Tensor? row_steps=None) -> Tensor");
  m.def("cpu_int4_paths(ScalarType dtype) -> int[]", &cpu_int4_paths);  // no tensor argument: catch-all
  m.def("cpu_int4_path_calls() -> int[]", &cpu_int4_path_calls);
}

TORCH_LIBRARY_IMPL(easyquant, CPU, m) { m.impl("cpu_int4_linear", &easyquant::cpu_int4_linear); }
