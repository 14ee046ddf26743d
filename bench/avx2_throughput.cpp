// Peak throughput of the AVX2 instructions our CPU paths are built on, per core and with both cores busy.
//
//   g++ -O2 -o /tmp/avx2_throughput bench/avx2_throughput.cpp -lpthread && /tmp/avx2_throughput
//
// Each loop runs 8 independent chains of one instruction (register operands only, so no load or store limits
// it) for 8e9 instructions; "madd+add" pairs each vpmaddwd with the vpaddd that accumulates it, as the i16 path
// does; "alternating" mixes vpmaddwd with FMAs (the fma path's multiply). Why it exists: the i16 path's ceiling at many batch rows is set by how many vpmaddwd (16 MACs) and
// vpaddd a core issues per second, and llama.cpp's by vpmaddubsw (32 MACs); docs/serving.md ("Many batch rows on
// AVX2") compares the kernel with these numbers. x86-64 with AVX2 and FMA only.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr long kIterations = 1000000000;  // 8 instructions each

#define EQ_CLOBBER "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm10", "ymm11", "ymm12", "ymm13"
#define EQ_EIGHT(op)                                                                                          \
  op " %%ymm8, %%ymm0, %%ymm0\n" op " %%ymm8, %%ymm1, %%ymm1\n" op " %%ymm8, %%ymm2, %%ymm2\n" op           \
     " %%ymm8, %%ymm3, %%ymm3\n" op " %%ymm8, %%ymm4, %%ymm4\n" op " %%ymm8, %%ymm5, %%ymm5\n" op            \
     " %%ymm8, %%ymm6, %%ymm6\n" op " %%ymm8, %%ymm7, %%ymm7\n"

// Seconds for kIterations of loop `kind`.
double run(int kind) {
  long n = kIterations;
  const auto t0 = std::chrono::steady_clock::now();
  switch (kind) {
    case 0: asm volatile("1:\n" EQ_EIGHT("vpmaddwd") "dec %0\njnz 1b" : "+r"(n) : : EQ_CLOBBER); break;
    case 1: asm volatile("1:\n" EQ_EIGHT("vpmaddubsw") "dec %0\njnz 1b" : "+r"(n) : : EQ_CLOBBER); break;
    case 2: asm volatile("1:\n" EQ_EIGHT("vfmadd231ps") "dec %0\njnz 1b" : "+r"(n) : : EQ_CLOBBER); break;
    case 3: asm volatile("1:\n" EQ_EIGHT("vpaddd") "dec %0\njnz 1b" : "+r"(n) : : EQ_CLOBBER); break;
    case 4:  // vpmaddwd and vfmadd231ps alternating: do they share pipes?
      asm volatile(
          "1:\n"
          "vpmaddwd %%ymm8, %%ymm0, %%ymm0\nvfmadd231ps %%ymm8, %%ymm9, %%ymm1\n"
          "vpmaddwd %%ymm8, %%ymm2, %%ymm2\nvfmadd231ps %%ymm8, %%ymm9, %%ymm3\n"
          "vpmaddwd %%ymm8, %%ymm4, %%ymm4\nvfmadd231ps %%ymm8, %%ymm9, %%ymm5\n"
          "vpmaddwd %%ymm8, %%ymm6, %%ymm6\nvfmadd231ps %%ymm8, %%ymm9, %%ymm7\n"
          "dec %0\njnz 1b"
          : "+r"(n) : : EQ_CLOBBER);
      break;
    default:  // vpmaddwd + the vpaddd that accumulates its product, 4 pairs
      asm volatile(
          "1:\n"
          "vpmaddwd %%ymm8, %%ymm0, %%ymm10\nvpaddd %%ymm10, %%ymm1, %%ymm1\n"
          "vpmaddwd %%ymm8, %%ymm2, %%ymm11\nvpaddd %%ymm11, %%ymm3, %%ymm3\n"
          "vpmaddwd %%ymm8, %%ymm4, %%ymm12\nvpaddd %%ymm12, %%ymm5, %%ymm5\n"
          "vpmaddwd %%ymm8, %%ymm6, %%ymm13\nvpaddd %%ymm13, %%ymm7, %%ymm7\n"
          "dec %0\njnz 1b"
          : "+r"(n) : : EQ_CLOBBER);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  const char* names[] = {"vpmaddwd", "vpmaddubsw", "vfmadd231ps", "vpaddd", "vpmaddwd, vfmadd231ps alternating",
                         "vpmaddwd+vpaddd"};
  long n = kIterations;  // a 1-cycle dec/jnz chain: the core's clock
  const auto t0 = std::chrono::steady_clock::now();
  asm volatile("1:\ndec %0\njnz 1b" : "+r"(n));
  const double ghz = kIterations / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
  std::printf("clock ~%.2f GHz (one dec/jnz per cycle)\n", ghz);
  std::printf("| instruction | 1 thread, G/s (per cycle) | 2 threads, G/s each |\n|---|---|---|\n");
  for (int k = 0; k < 6; ++k) {
    const double one = 8.0 * kIterations / run(k) / 1e9;
    std::vector<double> s(2);
    std::thread a([&] { s[0] = run(k); }), b([&] { s[1] = run(k); });
    a.join();
    b.join();
    std::printf("| %s | %.2f (%.2f) | %.2f / %.2f |\n", names[k], one, one / ghz, 8.0 * kIterations / s[0] / 1e9,
                8.0 * kIterations / s[1] / 1e9);
  }
}
