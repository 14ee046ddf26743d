// How fast a core reads blocked int4 codes from memory with the vnni path's one-row arithmetic, by how many blocks
// it reads side by side and where those blocks lie.
//
//   g++ -O2 -march=native -o /tmp/read_streams bench/read_streams.cpp -lpthread && /tmp/read_streams [block KB]
//
// The buffer (1 GiB, past any last-level cache we have) is cut into blocks of 16 rows x K/8 words (12 KB: K = 1536,
// Qwen2.5-1.5B's hidden size; 70 KB: K = 8960). Each thread takes half of the blocks and reads them NB at a time:
//   adjacent  blocks b, b+1, .., b+NB-1 together, then the next NB;
//   runs      its blocks cut into NB runs, block i of every run together (eq_cpu.cpp's vnni_row_blocks);
// per 64-byte line the kernel's work on 16 rows of 8 codes (three shifts, three ands, four vpdpwssd), the blocks
// taking turns every 4 lines (one sub-block of 32 columns), with a software prefetch 16 lines ahead in each block.
// Why it exists: docs/serving.md ("`vnni` from memory: four runs of blocks") compares the kernel with these rates.
// x86-64 with AVX512-BW and AVX512-VNNI only.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr size_t kBytes = size_t{1} << 30;
constexpr size_t kLine = 64, kSubBlock = 4 * kLine;  // 32 columns of 16 rows of 4-bit codes

// Blocks first, first + stride, .., first + (nb - 1) stride of `blk` bytes each, read together; returns the sums.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) __m512i read_blocks(const char* base, size_t first,
                                                                           size_t stride, int nb, size_t blk) {
  const __m512i mask = _mm512_set1_epi32(0x000F000F), x = _mm512_set1_epi32(0x00030005);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t off = 0; off < blk; off += kSubBlock) {
    for (int j = 0; j < nb; ++j) {
      const char* p = base + (first + j * stride) * blk + off;
      for (size_t l = 0; l < kSubBlock; l += kLine) {
        _mm_prefetch(p + l + 16 * kLine, _MM_HINT_T0);
        const __m512i d = _mm512_load_si512(p + l);
        s0 = _mm512_dpwssd_epi32(s0, _mm512_and_si512(d, mask), x);
        s1 = _mm512_dpwssd_epi32(s1, _mm512_and_si512(_mm512_srli_epi32(d, 4), mask), x);
        s2 = _mm512_dpwssd_epi32(s2, _mm512_and_si512(_mm512_srli_epi32(d, 8), mask), x);
        s3 = _mm512_dpwssd_epi32(s3, _mm512_srli_epi16(d, 12), x);
      }
    }
  }
  return _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
}

// One thread's blocks [b0, b1), nb at a time, adjacent or as runs; the last (b1 - b0) % nb blocks one by one.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) int read_range(const char* base, size_t b0, size_t b1, int nb,
                                                                      bool runs, size_t blk) {
  __m512i acc = _mm512_setzero_si512();
  const size_t groups = (b1 - b0) / nb;
  for (size_t i = 0; i < groups; ++i) {
    const size_t first = runs ? b0 + i : b0 + i * nb, stride = runs ? groups : 1;
    acc = _mm512_add_epi32(acc, read_blocks(base, first, stride, nb, blk));
  }
  for (size_t b = b0 + groups * nb; b < b1; ++b) acc = _mm512_add_epi32(acc, read_blocks(base, b, 1, 1, blk));
  return _mm512_reduce_add_epi32(acc);
}

// GB/s of the best of 5 passes over the buffer with `threads` threads.
double rate(const char* buf, size_t blk, int threads, int nb, bool runs) {
  const size_t blocks = kBytes / blk;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<std::thread> pool;
    std::vector<int> sink(threads);
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        sink[t] = read_range(buf, blocks * t / threads, blocks * (t + 1) / threads, nb, runs, blk);
      });
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, blocks * blk / s / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t blk = (argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 12) * 1024;
  if (blk == 0 || blk % kSubBlock) {
    std::fprintf(stderr, "block KB must be a positive multiple of 0.25 KB\n");
    return 2;
  }
  char* buf = static_cast<char*>(std::aligned_alloc(4096, kBytes));
  std::memset(buf, 1, kBytes);  // fault every page in before timing
  std::printf("blocks of %zu KB, 1 GiB, GB/s (best of 5 passes)\n\n| threads | blocks side by side | adjacent | runs |\n"
              "|---|---|---|---|\n", blk / 1024);
  for (int threads : {1, 2})
    for (int nb : {1, 2, 4, 8}) {
      const double adjacent = rate(buf, blk, threads, nb, false);  // one block at a time: the two are the same
      std::printf("| %d | %d | %.1f | %.1f |\n", threads, nb, adjacent, nb == 1 ? adjacent : rate(buf, blk, threads, nb, true));
    }
  std::free(buf);
  return 0;
}
