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

// The 8 signed codes of one word (column k0 + j is nibble j), in column order, as floats.
__device__ __forceinline__ void dequant_word(uint32_t w, float (&q)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t pair = and_or(w >> (4 * j), kNibblePairMask, kMagicPair);  // halves: u_j, u_{j+4}
    q[j] = __half2float(__ushort_as_half(static_cast<unsigned short>(pair & 0xFFFFu))) - kMagicBias;
    q[j + 4] = __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> 16))) - kMagicBias;
  }
}

// Activation / output types as float, rounding to nearest even on the way back.
template <typename T>
struct Act;
template <>
struct Act<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float f) { return __float2half_rn(f); }
};
template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
};

}  // namespace eq
