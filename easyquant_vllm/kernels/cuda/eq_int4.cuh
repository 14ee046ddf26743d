// eq_int4.cuh - what every EasyQuant kernel shares: int4 code -> float conversion, the 16-bit types, and the
// tensor-core fragment helpers (mma.sync and its host emulation, the column scale of a B fragment).
#pragma once
#include "cuda_host.h"  // also provides the fixed-width integer types (NVRTC has no <cstdint>)

namespace eq {

constexpr int kWarp = 32;

// Checkpoint format versions (docs/format.md): the kernels' template parameter kFmt.
//   kV1  q = u - 8, an fp16 step per group                                      (no zeros, no column scale)
//   kV2  q = u - z with an integer zero z per group, a column scale c           (zeros [N, K/G] uint8)
//   kV3  q = u - zq / 16 (a fractional zero), the step d[n] * a[n, g]: an fp16 unit per row times a uint8
//        multiplier per group, and a column scale c (scales = d [N], zeros = (a, zq) pairs [N, K/G, 2] uint8)
enum Format : int { kV1 = 1, kV2 = 2, kV3 = 3 };

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

// Format version 3: the zero z = zq / 16 is a multiple of 1/16, so q = u - z is one too, with at most 8
// significant bits (|16 q| <= 255): exact in fp16 (and in bf16). The magic-number trick still yields it in one
// HSUB2 if the magic's ulp is 1/16: fp16 64.0 (0x5400) has ulp 2^-4, so a nibble OR-ed into mantissa bits 4..7
// gives exactly 64 + u, and the bias 64 + zq / 16 is 0x5400 | zq (zq in mantissa bits 0..7): (64 + u) - (64 + z)
// = u - z, exact. Moving nibbles p and p + 4 to bits 4..7 and 20..23 costs one shift, as version 1's move to bits
// 0..3 does (none for p = 1 here, none for p = 0 there).
constexpr uint32_t kNibblePairMaskV3 = 0x00F000F0u;  // nibbles p and p + 4, moved to bits 4..7 and 20..23
constexpr uint32_t kMagicPairV3 = 0x54005400u;       // two fp16 64.0
__device__ __forceinline__ uint32_t nibbles_at_bit4(uint32_t w, int p) { return p == 0 ? w << 4 : w >> (4 * p - 4); }

// Format version 3's group metadata, one 16-bit load: meta = a | zq << 8 (byte 0 the step multiplier a, byte 1 the
// zero zq; CudaInt4Kernel.prepare interleaves them as uint8 [N, K/G, 2]). On the host a memcpy (no aliasing UB).
// The bias pair 64 + zq / 16 (bits 0x5400 | zq, twice) from meta: one byte permute, zq (byte 1 of meta) to bytes 0
// and 2, 0x54 (byte 1 of the magic, which the nibble conversion holds in a register anyway) to bytes 1 and 3.
__device__ __forceinline__ uint32_t magic_bias_pair_v3(uint32_t meta) {
  return __byte_perm(meta, kMagicPairV3, 0x5151u);
}
__device__ __forceinline__ uint32_t load_meta(const uint8_t* pairs, size_t group) {
#ifdef __CUDACC__
  return reinterpret_cast<const unsigned short*>(pairs)[group];
#else
  unsigned short v;
  std::memcpy(&v, pairs + 2 * group, sizeof v);
  return v;
#endif
}
// The group's step s = d * a in fp32: exact (an fp16's 11 significant bits times 8).
__device__ __forceinline__ float v3_step(float d, uint32_t meta) { return d * static_cast<float>(meta & 0xFFu); }

// One value of version 3's dense part, c * (s * (u - z)), rounded exactly where docs/format.md (and the reference
// dequantize_dense) rounds: u - z exact, the product with s once, the column scale once more. __fmul_rn keeps the
// compiler from fusing either product with what the caller adds (an outlier: the reference adds in fp32).
__device__ __forceinline__ float v3_dense(uint32_t u, uint32_t meta, float d, float c) {
  const float q = static_cast<float>(u) - static_cast<float>(meta >> 8) * 0.0625f;  // exact: sixteenths, |16 q| < 256
  return __fmul_rn(c, __fmul_rn(q, v3_step(d, meta)));
}

// Nibbles p and p + 4 of w as the floats q = u - 8 (kV1), u - z (kV2; bias = magic_bias_pair(z)) or u - zq / 16
// (kV3; bias = magic_bias_pair_v3(meta)): one lop3 and one HSUB2 (plus the shift that brings the nibbles in place).
template <int kFmt>
__device__ __forceinline__ void nibble_pair_as(uint32_t w, int p, uint32_t bias, float& lo, float& hi) {
  if constexpr (kFmt == kV3) {
    magic_pair_to_codes(and_or(nibbles_at_bit4(w, p), kNibblePairMaskV3, kMagicPairV3), bias, lo, hi);
  } else if constexpr (kFmt == kV2) {
    magic_pair_to_codes(and_or(w >> (4 * p), kNibblePairMask, kMagicPair), bias, lo, hi);
  } else {
    magic_pair_to_codes(and_or(w >> (4 * p), kNibblePairMask, kMagicPair), lo, hi);  // halves: 1024 + u_p, + u_p+4
  }
}

// The 8 codes of one word in format kFmt (column k0 + j is nibble j), in column order, as floats; bias as above.
template <int kFmt>
__device__ __forceinline__ void dequant_word_as(uint32_t w, uint32_t bias, float (&q)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) nibble_pair_as<kFmt>(w, j, bias, q[j], q[j + 4]);
}

// Version 1's codes q = u - 8 of one word.
__device__ __forceinline__ void dequant_word(uint32_t w, float (&q)[8]) { dequant_word_as<kV1>(w, 0u, q); }

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

// Format version 3's A registers: u - z exactly (z = zq / 16; see magic_bias_pair_v3), so the fragment is as exact
// as the integer codes of versions 1 and 2 and the mma still never rounds W'. fp16 takes one lop3 + HSUB2 per
// register from the magic 64 (ulp 1/16), as version 2 costs. bf16 has 8 significant bits: no bf16 power of two has
// both room for a nibble below 2^(e+1) and an ulp of 1/16 (that takes 4 + 4 mantissa bits, bf16 has 7), so there it
// is two exact subtractions: version 1's u - 8, then z - 8 (bias = bf16 z - 8, twice; exact). bias_pair(meta) builds
// the zero's pair from the group's a | zq << 8 once per group.
template <typename T>
struct MmaV3;

template <>
struct MmaV3<__half> {
  static __device__ __forceinline__ uint32_t bias_pair(uint32_t meta) { return magic_bias_pair_v3(meta); }
  static __device__ __forceinline__ uint32_t codes(uint32_t w, int p, uint32_t bias) {  // nibbles p, p + 4 of w
    return eq::codes<__half>(and_or(nibbles_at_bit4(w, p), kNibblePairMaskV3, kMagicPairV3), bias);
  }
};

template <>
struct MmaV3<__nv_bfloat16> {
  // z - 8 from meta (16 bits) in three instructions: one funnel shift puts zq into the low mantissa bits of the
  // fp32 2^19 (0x49000000, ulp 1/16), which is 2^19 + zq / 16; minus 2^19 + 8 (exact); then the top half (the bf16
  // bits: z - 8 has at most 8 significant bits) twice.
  static __device__ __forceinline__ uint32_t bias_pair(uint32_t meta) {
    const float z8 = __uint_as_float(__funnelshift_r(meta, 0x49u, 8)) - 524296.0f;  // 2^19 + 8
    return __byte_perm(__float_as_uint(z8), 0u, 0x3232u);
  }
  static __device__ __forceinline__ uint32_t codes(uint32_t w, int p, uint32_t bias) {
    using T = __nv_bfloat16;
    return eq::codes<T>(eq::codes<T>(and_or(w >> (4 * p), kNibblePairMask, Mma<T>::kMagic)), bias);
  }
};

// The column scales of one lane's B fragment (4 consecutive columns), per activation type: loaded once per
// k-step, applied to each batch tile's 2 registers, and read as floats by the dequantize kernel.
template <typename T>
struct ColScale;

template <>
struct ColScale<__half> {  // colscale: [K] fp16
  uint2 c;
  __device__ __forceinline__ void load(const __half* colscale, int col) { c = load64(colscale + col); }
  static __device__ __forceinline__ float value(const __half* colscale, int col) {  // c[col] alone
    return __half2float(colscale[col]);
  }
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
  static __device__ __forceinline__ float value(const __half* colscale, int col) {  // c[col] alone: hi + lo, exact
    const __half* four = colscale + 2 * (col & ~3) + (col & 3);  // hi of col; its lo 4 further
    return __uint_as_float(uint32_t(__half_as_ushort(four[0])) << 16) +
           __uint_as_float(uint32_t(__half_as_ushort(four[4])) << 16);
  }
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
