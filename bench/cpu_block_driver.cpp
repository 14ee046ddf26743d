// The native CPU kernel's integer block loop (int_block: the i16 path, or i8) timed on one thread without Python,
// vLLM or outliers: compiled from the op's own source, so a change to eq_cpu.cpp can be measured in seconds and
// with little noise (fastest of 7 rounds of 5 passes over the layer's blocks; weights and x random, no outliers).
//
//   TI=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
//   TL=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O3 -fopenmp -std=c++17 $TI -o /tmp/cpu_block_driver bench/cpu_block_driver.cpp
//       -L$TL -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$TL   (one line)
//   /tmp/cpu_block_driver N K G M [VERSION [i8]]     e.g. 1536 8960 32 16 3
//
// Before/after a change: build this file from each version of the source (-DEQ_SRC='"path/to/eq_cpu.cpp"') and
// alternate the two binaries. VERSION 3 uses format version 3's multipliers and row units, else fp16 steps.
#ifndef EQ_SRC
#define EQ_SRC "../easyquant_vllm/kernels/csrc/eq_cpu.cpp"
#endif
#include EQ_SRC

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N K G M [VERSION [i8]]  (N %% 16 == 0, G %% 32 == 0, K %% G == 0)\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), k = std::atoll(argv[2]), g = std::atoll(argv[3]), m = std::atoll(argv[4]);
  const bool v3 = argc > 5 && std::atoi(argv[5]) == 3, i8 = argc > 6;
  if (n <= 0 || n % 16 || g <= 0 || g % 32 || k % g || m <= 0) {
    std::fprintf(stderr, "N must be a multiple of 16, G of 32, K of G, M positive\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::vector<uint32_t> w(n * k / 8);
  for (auto& v : w) v = rng();
  std::vector<uint16_t> s(n * (k / g), 0x2000);  // fp16 steps (2^-7)
  std::vector<uint8_t> a(n * (k / g), 77), z(n * (k / g), 100);
  std::vector<float> d(n, 1e-3f);
  std::vector<int32_t> indptr(n + 1, 0);
  Problem P{};
  P.m = m;
  P.n = n;
  P.k = k;
  P.g = g;
  P.groups = k / g;
  P.bits = 4;
  P.sym_zero = 8.0f;
  P.zero_unit = 1.0f / 16;
  P.w = w.data();
  P.z = z.data();
  P.indptr = indptr.data();
  if (v3) {
    P.a = a.data();
    P.d = d.data();
  } else {
    P.s = s.data();
  }
  P.xg = i8 ? kI8Subblock : i16_subblock(g);
  P.xblocks = k / P.xg;
  std::vector<uint32_t> xq(m * k / 2);
  for (auto& v : xq) v = rng() & (i8 ? 0x3f3f3f3fu : 0x3fff3fffu);
  std::vector<float> sigma(m * P.xblocks, 1e-3f), qsum(m * P.xblocks, 5.0f);
  P.xq = xq.data();
  P.xsigma = sigma.data();
  P.xqsum = qsum.data();
  std::vector<float> acc(m * kBlockN);
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int pass = 0; pass < 5; ++pass)
      for (int64_t b = 0; b < n / kBlockN; ++b) {
        if (i8) int_block<true, 4>(P, b, acc.data());
        else int_block<false, 4>(P, b, acc.data());
      }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 5);
  }
  std::printf("%s %ld x %ld, g%ld, M = %ld, version %d: %.0f us per pass, %.1f GMAC/s (checksum %g)\n",
              i8 ? "i8" : "i16", n, k, g, m, v3 ? 3 : 2, best * 1e6, double(n) * k * m / best / 1e9, acc[3]);
}
