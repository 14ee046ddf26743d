// eq_int4.cuh - what every EasyQuant kernel shares: int4 code -> float conversion, the 16-bit types, and the
// tensor-core fragment helpers (mma.sync and its host emulation, the column scale of a B fragment).
#pragma once
#include "cuda_host.h"  // also provides the fixed-width integer types (NVRTC has no <cstdint>)

namespace eq {

constexpr int kWarp = 32;

// fp16 1024.0 is 0x6400; its mantissa's low 10 bits are free. OR-ing a nibble u into them gives
// exactly 1024 + u, so subtracting 1024 + 8 yields the signed code q = u - 8 with no int->float
// conversion instruction (the "magic number" trick of Kim et al., used by FasterTransformer/Marlin).
constexpr uint32_t kNibblePairMask = 0x000F000Fu;  // nibble j and nibble j + 4 of a word
constexpr uint32_t kMagicPair = 0x64006400u;       // two fp16 1024.0
constexpr float kMagicBias = 1032.0f;              // 1024 + 8

// (a & b) | c in one instruction: lop3 with truth table 0xEA = (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDACC__
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  return (a & b) | c;
#endif
}

// 128- and 64-bit global loads / stores of 16-bit values (aligned to their width). On the GPU one
// LDG/STG.E.128 or .64; on the host a memcpy, so the emulation does not read _Float16 arrays through a
// uint4 pointer (aliasing UB).
__device__ __forceinline__ uint4 load128(const void* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
__device__ __forceinline__ uint2 load64(const void* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const uint2*>(p);
#else
  uint2 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
__device__ __forceinline__ void store128(void* p, uint4 v) {
#ifdef __CUDACC__
  *reinterpret_cast<uint4*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}
__device__ __forceinline__ void store64(void* p, uint2 v) {
#ifdef __CUDACC__
  *reinterpret_cast<uint2*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// Two halves 1024 + u_lo, 1024 + u_hi (a magic pair) -> the signed codes u - 8 as floats.
// On the GPU one HSUB2 subtracts 1032 from both halves at once (exact: small integers), then two
// conversions; on the host the same exact arithmetic one half at a time.
__device__ __forceinline__ void magic_pair_to_codes(uint32_t pair, float& lo, float& hi) {
#ifdef __CUDACC__
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&pair), __float2half2_rn(kMagicBias));
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
#else
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xFFFFu))) - kMagicBias;
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16))) - kMagicBias;
#endif
}

// Format version 2 (asymmetric codes, q = u - z with a zero point z per group): the same trick with
// a per-row bias 1024 + z instead of the constant 1024 + 8. Its fp16 bits are 0x6400 | z (z < 16 sits
// in the mantissa like u does), so building it is two integer instructions per group and the code
// conversion itself is still one HSUB2, now with a register operand instead of an immediate: zero
// points cost nothing per weight. (The alternative, s * (sum u x - z * sum x), needs the activation sums
// of every group and batch row.)
__device__ __forceinline__ uint32_t magic_bias_pair(uint32_t z) { return (0x6400u | z) * 0x00010001u; }

__device__ __forceinline__ void magic_pair_to_codes(uint32_t pair, uint32_t bias, float& lo, float& hi) {
#ifdef __CUDACC__
  const __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&pair), *reinterpret_cast<const __half2*>(&bias));
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
#else
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xFFFFu))) -
       __half2float(__ushort_as_half(static_cast<unsigned short>(bias & 0xFFFFu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16))) -
       __half2float(__ushort_as_half(static_cast<unsigned short>(bias >> 16)));
#endif
}

// The 8 signed codes of one word (column k0 + j is nibble j), in column order, as floats.
__device__ __forceinline__ void dequant_word(uint32_t w, float (&q)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t pair = and_or(w >> (4 * j), kNibblePairMask, kMagicPair);  // halves: u_j, u_{j+4}
    magic_pair_to_codes(pair, q[j], q[j + 4]);
  }
}

// The same with a zero point: q = u - z, bias = magic_bias_pair(z).
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t bias, float (&q)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t pair = and_or(w >> (4 * j), kNibblePairMask, kMagicPair);
    magic_pair_to_codes(pair, bias, q[j], q[j + 4]);
  }
}

// Codes of one word for a checkpoint without (kV2 = false) or with (true) zero points.
template <bool kV2>
__device__ __forceinline__ void dequant_word_as(uint32_t w, uint32_t bias, float (&q)[8]) {
  if constexpr (kV2) dequant_word(w, bias, q);
  else dequant_word(w, q);
}

// Activation / output types as float, rounding to nearest even on the way back.
// load8 reads 8 consecutive activations with one 128-bit load (p must be 16-byte aligned): a lane
// needs exactly the 8 columns of one code word, so a scalar 16-bit load per column would cost 8
// load instructions where one suffices.
template <typename T>
struct Act;
template <>
struct Act<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // two rounded values, one word
    return uint32_t(__half_as_ushort(store(lo))) | (uint32_t(__half_as_ushort(store(hi))) << 16);
  }
  static __device__ __forceinline__ void load8(const __half* p, float (&f)[8]) {
    const uint4 v = load128(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  }
};
template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(store(lo))) | (uint32_t(__bfloat16_as_ushort(store(hi))) << 16);
  }
  static __device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[8]) {
    const uint4 v = load128(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a bf16 is the top half of its float: a shift or a mask, exact
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

// --- Tensor-core fragments (eq_mma.cu, eq_moe.cu): mma.sync.m16n8k16 with the codes as the A operand ---------
// The fragment layout and why the codes enter as exact integers are described at the top of eq_mma.cu.

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


}  // namespace eq
