// Host driver for cuda/eq_gemv.cu and cuda/eq_dequant.cu under the CPU emulation of cuda/cuda_host.h.
//   gemv_driver run IN OUT     IN: int32 header {M, N, K, G, nnz, dtype (0 fp16, 1 bf16), threads per block,
//                              format version (1, 2, 3)} then x [M*K] u16 bits, qweight [N*K/8] i32,
//                              scales [N*K/G] u16 bits (version 3: the row units d [N]), indptr [N+1] i32,
//                              indices [nnz] i32, values [nnz] u16 bits, and with versions 2 and 3: zeros
//                              [N*K/G] u8 (version 3: the (a, zq) pairs [N*K/G*2]), colscale [K] u16 bits (for
//                              the mma modes with bf16: [2K], split_col_scale's hi/lo layout).
//                              OUT: y [M*N] float32.
//   gemv_driver dequant IN OUT same IN (x is read and ignored); OUT: W' [N*K] float32 (exact: fp16/bf16 values).
//   gemv_driver mma IN OUT     cuda/eq_mma.cu's tensor-core kernel; qweight in IN is in the MMA layout.
//   gemv_driver dequant_mma IN OUT   W' from the MMA layout, as dequant.
//   gemv_driver mma_unit       prints D = A B of one emulated mma.sync.m16n8k16 (see mma_unit).
//   gemv_driver magic          prints the dequantized code of every nibble value 0..15, one per line.
//   gemv_driver magic_v3       prints u - zq / 16 for every code u and zero zq as format version 3's conversions make
//                              it: the fp16 one (GEMV, dequantize; 8 values) and the tensor cores' A register halves
//                              in fp16 and bf16 (2 + 2), one line per (u, zq), u major.
#include "../../easyquant_vllm/kernels/cuda/eq_dequant.cu"
#include "../../easyquant_vllm/kernels/cuda/eq_gemv.cu"
#include "../../easyquant_vllm/kernels/cuda/eq_mma.cu"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

template <typename V>
static std::vector<V> read(std::ifstream& f, size_t n) {
  std::vector<V> v(n);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(V)));
  return v;
}

template <typename T>
static float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// 16-bit values (fp16 / bf16) from their raw bits as read from IN, and results back as float32 for OUT.
template <typename V>
static std::vector<V> from_bits(const std::vector<uint16_t>& bits) {
  std::vector<V> v(bits.size());
  std::memcpy(v.data(), bits.data(), bits.size() * 2);
  return v;
}

template <typename T>
static std::vector<float> to_floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

// Format versions 2 and 3's tensors (empty for version 1: the kernels then get null pointers, as from the host).
struct FormatTensors {
  int version = 1;
  std::vector<uint8_t> zeros;
  std::vector<__half> colscale;
  const uint8_t* z() const { return zeros.empty() ? nullptr : zeros.data(); }
  const __half* c() const { return colscale.empty() ? nullptr : colscale.data(); }
  int variant() const { return version - 1; }  // index of the entry-point variant: "", _v2, _v3
};

template <typename T>
using DequantEntry = void (*)(const int4*, const __half*, const uint8_t*, const __half*, const int*, const int*,
                              const __half*, T*, int, int, int);

template <typename T>
static std::vector<float> dequant(const std::vector<int32_t>& qweight, const std::vector<uint16_t>& sbits,
                                  const std::vector<int32_t>& indptr, const std::vector<int32_t>& indices,
                                  const std::vector<uint16_t>& vbits, const FormatTensors& fmt, int N, int K, int G,
                                  int threads) {
  const auto scales = from_bits<__half>(sbits), values = from_bits<__half>(vbits);
  std::vector<T> w(static_cast<size_t>(N) * K);
  const dim3 grid((N + threads / 32 - 1) / (threads / 32));
  static const DequantEntry<__half> f16[3] = {eq_dequant_int4_f16, eq_dequant_int4_f16_v2, eq_dequant_int4_f16_v3};
  static const DequantEntry<__nv_bfloat16> bf16[3] = {eq_dequant_int4_bf16, eq_dequant_int4_bf16_v2,
                                                      eq_dequant_int4_bf16_v3};
  DequantEntry<T> entry;
  if constexpr (std::is_same_v<T, __half>) entry = f16[fmt.variant()];
  else entry = bf16[fmt.variant()];
  emu_launch(grid, dim3(threads), entry, reinterpret_cast<const int4*>(qweight.data()), scales.data(), fmt.z(),
             fmt.c(), indptr.data(), indices.data(), values.data(), w.data(), N, K, G);
  return to_floats(w);
}

// The extern "C" entry points, by batch tile kM = 1, 2, 4, 8, 16: a launch takes the smallest kM >= M.
template <typename T>
using GemvEntry = void (*)(const T*, const int4*, const __half*, const uint8_t*, const __half*, const int*,
                           const int*, const __half*, T*, int, int, int, int);
static const GemvEntry<__half> kGemvF16[3][5] = {
    {eq_gemv_int4_f16_m1, eq_gemv_int4_f16_m2, eq_gemv_int4_f16_m4, eq_gemv_int4_f16_m8, eq_gemv_int4_f16_m16},
    {eq_gemv_int4_f16_m1_v2, eq_gemv_int4_f16_m2_v2, eq_gemv_int4_f16_m4_v2, eq_gemv_int4_f16_m8_v2,
     eq_gemv_int4_f16_m16_v2},
    {eq_gemv_int4_f16_m1_v3, eq_gemv_int4_f16_m2_v3, eq_gemv_int4_f16_m4_v3, eq_gemv_int4_f16_m8_v3,
     eq_gemv_int4_f16_m16_v3}};
static const GemvEntry<__nv_bfloat16> kGemvBf16[3][5] = {
    {eq_gemv_int4_bf16_m1, eq_gemv_int4_bf16_m2, eq_gemv_int4_bf16_m4, eq_gemv_int4_bf16_m8, eq_gemv_int4_bf16_m16},
    {eq_gemv_int4_bf16_m1_v2, eq_gemv_int4_bf16_m2_v2, eq_gemv_int4_bf16_m4_v2, eq_gemv_int4_bf16_m8_v2,
     eq_gemv_int4_bf16_m16_v2},
    {eq_gemv_int4_bf16_m1_v3, eq_gemv_int4_bf16_m2_v3, eq_gemv_int4_bf16_m4_v3, eq_gemv_int4_bf16_m8_v3,
     eq_gemv_int4_bf16_m16_v3}};

template <typename T>
static std::vector<float> run(const std::vector<uint16_t>& xbits, const std::vector<int32_t>& qweight,
                              const std::vector<uint16_t>& sbits, const std::vector<int32_t>& indptr,
                              const std::vector<int32_t>& indices, const std::vector<uint16_t>& vbits, const FormatTensors& fmt,
                              int M, int N, int K, int G, int threads) {
  const auto x = from_bits<T>(xbits), scales = from_bits<__half>(sbits), values = from_bits<__half>(vbits);
  std::vector<T> y(static_cast<size_t>(M) * N);
  const int rows_per_block = threads / 32 * eq::kRowsPerWarp;
  const dim3 grid((N + rows_per_block - 1) / rows_per_block);
  const int tile = M <= 1 ? 0 : M <= 2 ? 1 : M <= 4 ? 2 : M <= 8 ? 3 : 4;
  GemvEntry<T> entry;
  if constexpr (std::is_same_v<T, __half>) entry = kGemvF16[fmt.variant()][tile];
  else entry = kGemvBf16[fmt.variant()][tile];
  emu_launch(grid, dim3(threads), entry, x.data(), reinterpret_cast<const int4*>(qweight.data()), scales.data(),
             fmt.z(), fmt.c(), indptr.data(), indices.data(), values.data(), y.data(), M, N, K, G);
  return to_floats(y);
}

// The tensor-core kernels (cuda/eq_mma.cu), qweight in the MMA layout: the smallest kT with 8 kT >= M.
static const GemvEntry<__half> kMmaF16[3][4] = {
    {eq_mma_int4_f16_t1, eq_mma_int4_f16_t2, eq_mma_int4_f16_t4, eq_mma_int4_f16_t8},
    {eq_mma_int4_f16_t1_v2, eq_mma_int4_f16_t2_v2, eq_mma_int4_f16_t4_v2, eq_mma_int4_f16_t8_v2},
    {eq_mma_int4_f16_t1_v3, eq_mma_int4_f16_t2_v3, eq_mma_int4_f16_t4_v3, eq_mma_int4_f16_t8_v3}};
static const GemvEntry<__nv_bfloat16> kMmaBf16[3][4] = {
    {eq_mma_int4_bf16_t1, eq_mma_int4_bf16_t2, eq_mma_int4_bf16_t4, eq_mma_int4_bf16_t8},
    {eq_mma_int4_bf16_t1_v2, eq_mma_int4_bf16_t2_v2, eq_mma_int4_bf16_t4_v2, eq_mma_int4_bf16_t8_v2},
    {eq_mma_int4_bf16_t1_v3, eq_mma_int4_bf16_t2_v3, eq_mma_int4_bf16_t4_v3, eq_mma_int4_bf16_t8_v3}};

template <typename T>
static std::vector<float> run_mma(const std::vector<uint16_t>& xbits, const std::vector<int32_t>& qweight,
                                  const std::vector<uint16_t>& sbits, const std::vector<int32_t>& indptr,
                                  const std::vector<int32_t>& indices, const std::vector<uint16_t>& vbits,
                                  const FormatTensors& fmt, int M, int N, int K, int G) {
  const auto x = from_bits<T>(xbits), scales = from_bits<__half>(sbits), values = from_bits<__half>(vbits);
  std::vector<T> y(static_cast<size_t>(M) * N);
  const int tile = M <= 8 ? 0 : M <= 16 ? 1 : M <= 32 ? 2 : 3;  // kT = 1, 2, 4, 8 batch tiles of 8 rows
  GemvEntry<T> entry;
  if constexpr (std::is_same_v<T, __half>) entry = kMmaF16[fmt.variant()][tile];
  else entry = kMmaBf16[fmt.variant()][tile];
  emu_launch(dim3(N / 16), dim3(eq::kMmaWarps * 32), entry, x.data(), reinterpret_cast<const int4*>(qweight.data()),
             scales.data(), fmt.z(), fmt.c(), indptr.data(), indices.data(), values.data(), y.data(), M, N, K, G);
  return to_floats(y);
}

template <typename T>
static std::vector<float> dequant_mma(const std::vector<int32_t>& qweight, const std::vector<uint16_t>& sbits,
                                      const std::vector<int32_t>& indptr, const std::vector<int32_t>& indices,
                                      const std::vector<uint16_t>& vbits, const FormatTensors& fmt, int N, int K, int G) {
  const auto scales = from_bits<__half>(sbits), values = from_bits<__half>(vbits);
  std::vector<T> w(static_cast<size_t>(N) * K);
  const auto* q = reinterpret_cast<const int4*>(qweight.data());
  const dim3 grid((N / 16 + 3) / 4), block(128);
  static const DequantEntry<__half> f16[3] = {eq_dequant_mma_int4_f16, eq_dequant_mma_int4_f16_v2,
                                             eq_dequant_mma_int4_f16_v3};
  static const DequantEntry<__nv_bfloat16> bf16[3] = {eq_dequant_mma_int4_bf16, eq_dequant_mma_int4_bf16_v2,
                                                      eq_dequant_mma_int4_bf16_v3};
  DequantEntry<T> entry;
  if constexpr (std::is_same_v<T, __half>) entry = f16[fmt.variant()];
  else entry = bf16[fmt.variant()];
  emu_launch(grid, block, entry, q, scales.data(), fmt.z(), fmt.c(), indptr.data(), indices.data(), values.data(),
             w.data(), N, K, G);
  return to_floats(w);
}

// One emulated mma.sync.m16n8k16 (fp16) on A[i][c] = i - c / 4 and B[c][j] = (c * j) % 5 - 2, small
// integers, so D = A B is exact. Fragments are placed by the PTX ISA's formulas, written out again here
// independently of eq_mma.cu. Prints D, 16 rows of 8.
static void mma_unit() {
  float d[32][4] = {};
  auto a_val = [](int i, int c) { return float(i - c / 4); };
  auto b_val = [](int c, int j) { return float((c * j) % 5 - 2); };
  auto bits = [](float v) { return uint32_t(__half_as_ushort(__float2half_rn(v))); };
  emu_launch(dim3(1), dim3(32), [&] {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    uint32_t a[4], b[2];
    for (int r = 0; r < 4; ++r) {  // a_{2r}, a_{2r+1}: row g (+8 for r = 1, 3), column 2t (+8 for r >= 2)
      const int row = g + (r % 2) * 8, col = 2 * t + (r / 2) * 8;
      a[r] = bits(a_val(row, col)) | (bits(a_val(row, col + 1)) << 16);
    }
    for (int r = 0; r < 2; ++r) {  // b_{2r}, b_{2r+1}: rows 2t, 2t + 1 (+8 for r = 1), column g
      const int row = 2 * t + 8 * r;
      b[r] = bits(b_val(row, g)) | (bits(b_val(row + 1, g)) << 16);
    }
    float acc[4] = {0, 0, 0, 0};
    eq::mma<__half>(acc, a, b);
    for (int i = 0; i < 4; ++i) d[lane][i] = acc[i];
  });
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {  // c_k: row g (+8 for k >= 2), column 2t + (k & 1)
      const int lane = (i % 8) * 4 + j / 2, k = (i >= 8 ? 2 : 0) + (j % 2);
      std::printf(j ? " %g" : "%g", d[lane][k]);
    }
    std::printf("\n");
  }
}

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "mma_unit") {
    mma_unit();
    return 0;
  }
  if (argc >= 2 && std::string(argv[1]) == "magic") {
    for (uint32_t u = 0; u < 16; ++u) {
      float q[8];
      eq::dequant_word(u * 0x11111111u, q);  // the same nibble in all 8 positions
      for (int j = 0; j < 8; ++j) std::printf(j ? " %g" : "%g", q[j]);
      std::printf("\n");
    }
    return 0;
  }
  if (argc >= 2 && std::string(argv[1]) == "magic_v3") {
    for (uint32_t u = 0; u < 16; ++u) {
      for (uint32_t zq = 0; zq < 256; ++zq) {
        const uint32_t w = u * 0x11111111u, meta = 0xA5u | zq << 8;  // a = 0xA5 must not leak into the zero
        float q[8];
        eq::dequant_word_as<eq::kV3>(w, eq::magic_bias_pair_v3(meta), q);
        for (int j = 0; j < 8; ++j) std::printf("%g ", q[j]);
        for (int p = 0; p < 4; ++p) {  // each A register: nibbles p and p + 4
          const uint32_t h = eq::MmaV3<__half>::codes(w, p, eq::MmaV3<__half>::bias_pair(meta));
          const uint32_t b = eq::MmaV3<__nv_bfloat16>::codes(w, p, eq::MmaV3<__nv_bfloat16>::bias_pair(meta));
          std::printf("%g %g %g %g ", eq::Mma<__half>::to_float(h & 0xFFFFu), eq::Mma<__half>::to_float(h >> 16),
                      eq::Mma<__nv_bfloat16>::to_float(b & 0xFFFFu), eq::Mma<__nv_bfloat16>::to_float(b >> 16));
        }
        std::printf("\n");
      }
    }
    return 0;
  }
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "run" && mode != "dequant" && mode != "mma" && mode != "dequant_mma") {
    std::fprintf(stderr, "usage: gemv_driver run|dequant|mma|dequant_mma IN OUT | gemv_driver magic\n");
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  const auto h = read<int32_t>(in, 8);
  const int M = h[0], N = h[1], K = h[2], G = h[3], nnz = h[4], dtype = h[5], threads = h[6];
  auto x = read<uint16_t>(in, static_cast<size_t>(M) * K);
  auto qweight = read<int32_t>(in, static_cast<size_t>(N) * K / 8);
  FormatTensors fmt;
  fmt.version = h[7];
  auto scales = read<uint16_t>(in, fmt.version == 3 ? N : static_cast<size_t>(N) * (K / G));
  auto indptr = read<int32_t>(in, N + 1);
  auto indices = read<int32_t>(in, nnz);
  auto values = read<uint16_t>(in, nnz);
  if (fmt.version > 1) {
    fmt.zeros = read<uint8_t>(in, static_cast<size_t>(N) * (K / G) * (fmt.version == 3 ? 2 : 1));
    const bool split = (mode == "mma" || mode == "dequant_mma") && dtype == 1;
    fmt.colscale = from_bits<__half>(read<uint16_t>(in, split ? 2 * static_cast<size_t>(K) : K));
  }
  if (mode == "mma" || mode == "dequant_mma") {  // qweight holds the MMA layout (same number of words)
    const auto r = mode == "mma"
                       ? (dtype == 0 ? run_mma<__half>(x, qweight, scales, indptr, indices, values, fmt, M, N, K, G)
                                     : run_mma<__nv_bfloat16>(x, qweight, scales, indptr, indices, values, fmt, M, N,
                                                              K, G))
                       : (dtype == 0 ? dequant_mma<__half>(qweight, scales, indptr, indices, values, fmt, N, K, G)
                                     : dequant_mma<__nv_bfloat16>(qweight, scales, indptr, indices, values, fmt, N, K,
                                                                  G));
    std::ofstream out(argv[3], std::ios::binary);
    out.write(reinterpret_cast<const char*>(r.data()), static_cast<std::streamsize>(r.size() * sizeof(float)));
    return 0;
  }
  if (mode == "dequant") {
    const auto w = dtype == 0 ? dequant<__half>(qweight, scales, indptr, indices, values, fmt, N, K, G, threads)
                              : dequant<__nv_bfloat16>(qweight, scales, indptr, indices, values, fmt, N, K, G, threads);
    std::ofstream out(argv[3], std::ios::binary);
    out.write(reinterpret_cast<const char*>(w.data()), static_cast<std::streamsize>(w.size() * sizeof(float)));
    return 0;
  }
  const auto y = dtype == 0 ? run<__half>(x, qweight, scales, indptr, indices, values, fmt, M, N, K, G, threads)
                            : run<__nv_bfloat16>(x, qweight, scales, indptr, indices, values, fmt, M, N, K, G, threads);
  std::ofstream out(argv[3], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data()), static_cast<std::streamsize>(y.size() * sizeof(float)));
  return 0;
}
