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
#include "eq_int4.cuh"

namespace eq {

constexpr int kMmaWarps = 8;     // warps per block, all on one 16-row tile
constexpr int kMmaMaxTiles = 8;  // batch tiles of 8 rows: M <= 64

// Per operand type: the magic pair (two 16-bit 2^n with room for a nibble in the mantissa), the
// bias 2^n + 8 that turns 2^n + u into q = u - 8 exactly, and the mma instruction.
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0, twice
  static constexpr float kBias = 1032.0f;
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ uint32_t bias_pair(uint32_t z) { return magic_bias_pair(z); }
#ifdef __CUDACC__
  static __device__ __forceinline__ uint32_t codes(uint32_t pair) {
    const __half2 q = __hsub2(*reinterpret_cast<const __half2*>(&pair), __float2half2_rn(kBias));
    return *reinterpret_cast<const uint32_t*>(&q);
  }
  static __device__ __forceinline__ uint32_t codes(uint32_t pair, uint32_t bias) {
    const __half2 q = __hsub2(*reinterpret_cast<const __half2*>(&pair), *reinterpret_cast<const __half2*>(&bias));
    return *reinterpret_cast<const uint32_t*>(&q);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
};

template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0, twice: 7 mantissa bits hold u < 16
  static constexpr float kBias = 136.0f;
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  static __device__ __forceinline__ uint32_t bias_pair(uint32_t z) { return (0x4300u | z) * 0x00010001u; }
#ifdef __CUDACC__
  static __device__ __forceinline__ uint32_t codes(uint32_t pair) {
    const __nv_bfloat162 q = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&pair), __float2bfloat162_rn(kBias));
    return *reinterpret_cast<const uint32_t*>(&q);
  }
  static __device__ __forceinline__ uint32_t codes(uint32_t pair, uint32_t bias) {
    const __nv_bfloat162 q =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&pair), *reinterpret_cast<const __nv_bfloat162*>(&bias));
    return *reinterpret_cast<const uint32_t*>(&q);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
};

#ifndef __CUDACC__
// Host versions, exact: the codes are small integers; the mma gathers the warp's fragments through
// scratch (like the shuffles of cuda_host.h) and sums the 16 exact products per output in fp32.
template <typename T>
inline uint32_t host_codes(uint32_t pair) {
  const float lo = Mma<T>::to_float(uint16_t(pair & 0xFFFFu)) - Mma<T>::kBias;
  const float hi = Mma<T>::to_float(uint16_t(pair >> 16)) - Mma<T>::kBias;
  return uint32_t(Mma<T>::from_float(lo)) | (uint32_t(Mma<T>::from_float(hi)) << 16);
}

template <typename T>
inline uint32_t host_codes(uint32_t pair, uint32_t bias) {
  const float lo = Mma<T>::to_float(uint16_t(pair & 0xFFFFu)) - Mma<T>::to_float(uint16_t(bias & 0xFFFFu));
  const float hi = Mma<T>::to_float(uint16_t(pair >> 16)) - Mma<T>::to_float(uint16_t(bias >> 16));
  return uint32_t(Mma<T>::from_float(lo)) | (uint32_t(Mma<T>::from_float(hi)) << 16);
}

template <typename T>
inline void host_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned tid = threadIdx.x, lane = tid % 32;
  uint32_t* warp = &emu::mma_scratch[(tid - lane) * 6];
  for (int i = 0; i < 4; ++i) warp[lane * 6 + i] = a[i];
  warp[lane * 6 + 4] = b[0];
  warp[lane * 6 + 5] = b[1];
  __syncwarp();
  auto half_of = [](uint32_t reg, int c) { return Mma<T>::to_float(uint16_t(c & 1 ? reg >> 16 : reg & 0xFFFFu)); };
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float sum = d[i];
    for (int c = 0; c < 16; ++c) {
      const int a_lane = (row % 8) * 4 + (c % 8) / 2, a_reg = (row >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0);
      const int b_lane = col * 4 + (c % 8) / 2, b_reg = c >= 8 ? 1 : 0;
      sum += half_of(warp[a_lane * 6 + a_reg], c) * half_of(warp[b_lane * 6 + 4 + b_reg], c);
    }
    d[i] = sum;
  }
  __syncwarp();  // nobody overwrites the scratch before the whole warp has read it
}
#endif

template <typename T>
__device__ __forceinline__ uint32_t codes(uint32_t pair) {
#ifdef __CUDACC__
  return Mma<T>::codes(pair);
#else
  return host_codes<T>(pair);
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t codes(uint32_t pair, uint32_t bias) {
#ifdef __CUDACC__
  return Mma<T>::codes(pair, bias);
#else
  return host_codes<T>(pair, bias);
#endif
}

// The column scales of one lane's B fragment (4 consecutive columns), per activation type: loaded once per
// k-step, applied to each batch tile's 2 registers, and read as floats by the dequantize kernel.
template <typename T>
struct ColScale;

template <>
struct ColScale<__half> {  // colscale: [K] fp16
  uint2 c;
  __device__ __forceinline__ void load(const __half* colscale, int col) { c = load64(colscale + col); }
  __device__ __forceinline__ float at(int i) const {
    const uint32_t w = i < 2 ? c.x : c.y;
    return __half2float(__ushort_as_half(static_cast<unsigned short>(i & 1 ? w >> 16 : w & 0xFFFFu)));
  }
  __device__ __forceinline__ uint2 apply(uint2 x) const {  // x * c, rounded once to fp16
#ifdef __CUDACC__
    const __half2 lo = __hmul2(*reinterpret_cast<const __half2*>(&x.x), *reinterpret_cast<const __half2*>(&c.x));
    const __half2 hi = __hmul2(*reinterpret_cast<const __half2*>(&x.y), *reinterpret_cast<const __half2*>(&c.y));
    return {*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi)};
#else
    uint32_t out[2];
    const uint32_t xs[2] = {x.x, x.y};
    for (int r = 0; r < 2; ++r) {
      const float a = __half2float(__ushort_as_half(uint16_t(xs[r] & 0xFFFFu))) * at(2 * r);
      const float b = __half2float(__ushort_as_half(uint16_t(xs[r] >> 16))) * at(2 * r + 1);
      out[r] = Act<__half>::pack2(a, b);  // exact products (11 x 11 bits), one rounding
    }
    return {out[0], out[1]};
#endif
  }
};

#ifndef __CUDACC__
// Round-to-nearest-even of an exact double to bf16 (the host stand-in for one HFMA2.BF16 rounding).
inline uint16_t host_round_bf16(double v) {
  if (v == 0.0) return std::signbit(v) ? 0x8000u : 0u;
  int e;
  std::frexp(v, &e);                                      // |v| in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, e - 8);              // bf16: 8 significant bits
  const double r = std::nearbyint(v / ulp) * ulp;         // exact scaling; nearbyint rounds to even
  return __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(r)));  // r fits a bf16: exact
}
#endif

template <>
struct ColScale<__nv_bfloat16> {  // colscale: [K/4][hi x4, lo x4] bf16 with c = hi + lo exactly (split_col_scale)
  uint4 c;  // x: hi of columns 0,1; y: hi 2,3; z: lo 0,1; w: lo 2,3
  __device__ __forceinline__ void load(const __half* colscale, int col) { c = load128(colscale + 2 * col); }
  __device__ __forceinline__ float at(int i) const {  // hi + lo in fp32: exact, the stored fp16 c
    const uint32_t hi = i < 2 ? c.x : c.y, lo = i < 2 ? c.z : c.w;
    const int sh = i & 1 ? 16 : 0;
    return __uint_as_float(((hi >> sh) & 0xFFFFu) << 16) + __uint_as_float(((lo >> sh) & 0xFFFFu) << 16);
  }
  __device__ __forceinline__ uint2 apply(uint2 x) const {  // HFMA2(x, hi, HMUL2(x, lo))
#ifdef __CUDACC__
    const __nv_bfloat162* xs = reinterpret_cast<const __nv_bfloat162*>(&x);
    const __nv_bfloat162* cs = reinterpret_cast<const __nv_bfloat162*>(&c);
    const __nv_bfloat162 lo = __hfma2(xs[0], cs[0], __hmul2(xs[0], cs[2]));
    const __nv_bfloat162 hi = __hfma2(xs[1], cs[1], __hmul2(xs[1], cs[3]));
    return {*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi)};
#else
    uint32_t out[2];
    const uint32_t xs[2] = {x.x, x.y}, his[2] = {c.x, c.y}, los[2] = {c.z, c.w};
    for (int r = 0; r < 2; ++r) {
      uint32_t halves[2];
      for (int h = 0; h < 2; ++h) {
        const int sh = 16 * h;
        const double xv = __uint_as_float(((xs[r] >> sh) & 0xFFFFu) << 16);
        const double hv = __uint_as_float(((his[r] >> sh) & 0xFFFFu) << 16);
        const double lv = __uint_as_float(((los[r] >> sh) & 0xFFFFu) << 16);
        const double t = __uint_as_float(uint32_t(host_round_bf16(xv * lv)) << 16);  // HMUL2: one rounding
        halves[h] = host_round_bf16(xv * hv + t);  // HFMA2: exact x * hi + t, one rounding (exact in double)
      }
      out[r] = halves[0] | (halves[1] << 16);
    }
    return {out[0], out[1]};
#endif
  }
};

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  Mma<T>::mma(d, a, b);
#else
  host_mma<T>(d, a, b);
#endif
}

template <typename T, int kT, bool kV2>
__device__ __forceinline__ void mma_int4(
    const T* __restrict__ x,            // [M, K] activations, 16-byte aligned
    const int4* __restrict__ qweight,   // [N/16][K/64][32] lanes' 128-bit words (MMA layout)
    const __half* __restrict__ scales,  // [N, K/G]
    const uint8_t* __restrict__ zeros,  // [N, K/G] (kV2 only)
    const __half* __restrict__ colscale,  // kV2 only: [K] fp16, or for bf16 the [K/4][8] split (ColScale)
    const int* __restrict__ indptr, const int* __restrict__ indices, const __half* __restrict__ values,
    T* __restrict__ y,  // [M, N]
    int M, int N, int K, int G) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = blockIdx.x * 16;
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
  for (int j = 0; j < kT; ++j) xrow[j] = x + static_cast<size_t>(8 * j + g < M ? 8 * j + g : M - 1) * K + 4 * t;
  const int4* tile = qweight + static_cast<size_t>(blockIdx.x) * kblocks * kWarp + lane;
  int4 next = {0, 0, 0, 0};
  if (warp < kblocks) next = tile[warp * kWarp];  // LDG.E.128
  uint32_t bias[2] = {0u, 0u};  // kV2: 2^n + z of rows g (A registers 0, 2) and g + 8 (registers 1, 3)
  for (int kb = warp; kb < kblocks; kb += kMmaWarps) {
    const uint32_t words[4] = {uint32_t(next.x), uint32_t(next.y), uint32_t(next.z), uint32_t(next.w)};
    if (kb + kMmaWarps < kblocks) next = tile[(kb + kMmaWarps) * kWarp];  // in flight during this block
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int k0 = kb * 64 + 16 * s;
      uint32_t a[4];
      ColScale<T> c;
      if constexpr (kV2) {
        if (s % steps_per_scale == 0) {  // a group starts here (steps_per_scale divides the group's steps)
          const int grp = k0 >> group_shift;
          bias[0] = Mma<T>::bias_pair(zeros[static_cast<size_t>(r0 + g) * groups + grp]);
          bias[1] = Mma<T>::bias_pair(zeros[static_cast<size_t>(r0 + g + 8) * groups + grp]);
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) a[p] = codes<T>(and_or(words[s] >> (4 * p), kNibblePairMask, Mma<T>::kMagic), bias[p & 1]);
        c.load(colscale, k0 + 4 * t);  // the 4 column scales of this lane's B fragment
      } else {
#pragma unroll
        for (int p = 0; p < 4; ++p) a[p] = codes<T>(and_or(words[s] >> (4 * p), kNibblePairMask, Mma<T>::kMagic));
      }
#pragma unroll
      for (int j = 0; j < kT; ++j) {
        // B fragment: 4 activations of this lane's batch row (see xrow). Rows past M are zeroed by a
        // select, not skipped by a branch, so the warp reaches mma.sync.aligned converged.
        uint2 v = load64(xrow[j] + k0);  // 8-byte aligned: K % 64 == 0, x 16-byte aligned
        if constexpr (kV2) v = c.apply(v);
        const bool live = 2 * j < kT || 8 * j + g < M;  // the first half of the tiles is never masked
        const uint32_t b[2] = {live ? v.x : 0u, live ? v.y : 0u};
        mma<T>(part[j], a, b);
      }
      if ((s + 1) % steps_per_scale == 0) {
        const int grp = k0 >> group_shift;
        const float s_lo = __half2float(scales[static_cast<size_t>(r0 + g) * groups + grp]);
        const float s_hi = __half2float(scales[static_cast<size_t>(r0 + g + 8) * groups + grp]);
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
    const int row = r0 + g + 8 * h;
    for (int e = indptr[row] + warp; e < indptr[row + 1]; e += kMmaWarps) {
      const float v = __half2float(values[e]);
      const int col = indices[e];
#pragma unroll
      for (int j = 0; j < kT; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int m = 8 * j + 2 * t + i;
          if (m < M) acc[j][2 * h + i] = fmaf(v, Act<T>::load(x[static_cast<size_t>(m) * K + col]), acc[j][2 * h + i]);
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
        if (m < M) y[static_cast<size_t>(m) * N + n] = Act<T>::store(sum);
      }
  }
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
