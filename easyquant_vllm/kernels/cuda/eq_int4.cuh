// eq_int4.cuh - what every EasyQuant kernel shares: int4 code -> float conversion and the 16-bit types.
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

}  // namespace eq
