// Does a tile store hold up the vector loads after it? The microbenchmark behind the amx path's paired folds
// (easyquant_vllm/kernels/csrc/eq_cpu.cpp, "Why the C tiles rotate and are stored in pairs").
//
//   gcc -O3 -o /tmp/amx_tile_store bench/amx_tile_store.c && /tmp/amx_tile_store
//
// Needs Linux and a CPU with AMX (it asks the kernel for the tile state, as the op does). Each row times one loop
// body, ns per iteration on one thread (its CPU time), the best of 5 runs:
//   store       one 1 KB tile store (tilestored) of a C tile
//   loads       16 zmm loads of another 1 KB buffer, each added into its own accumulator (the fold's shape)
//   store+loads the two, one after the other (the loads read a buffer the store does not write)
//   2 stores+32 loads   two tile stores back to back, then the loads of both buffers (the paired fold)
// If the loads could run under the store, "store+loads" would cost about max(store, loads).
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((aligned(64))) TileConfig;

static float buf[8][256] __attribute__((aligned(64)));

static double thread_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define LOADS(SRC)                                                                          \
  _Pragma("GCC unroll 16") for (int r = 0; r < 16; ++r) acc[r] =                            \
      _mm512_add_ps(acc[r], _mm512_load_ps((SRC) + r * 16))

__attribute__((target("amx-tile,avx512f"))) static double run(int mode, float* out) {
  const long iters = 2000000;
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  const double t0 = thread_seconds();
  for (long i = 0; i < iters; ++i) {
    float* dst = buf[i & 3];
    const float* src = buf[4 + (i & 3)];
    if (mode == 0) {
      _tile_stored(0, dst, 64);
      asm volatile("" ::: "memory");
    } else if (mode == 1) {
      LOADS(src);
    } else if (mode == 2) {
      _tile_stored(0, dst, 64);
      asm volatile("" ::: "memory");
      LOADS(src);
    } else {
      _tile_stored(0, buf[0], 64);
      _tile_stored(1, buf[1], 64);
      asm volatile("" ::: "memory");
      LOADS(buf[4]);
      LOADS(buf[5]);
    }
  }
  const double t = thread_seconds() - t0;
  __m512 s = acc[0];
  for (int r = 1; r < 16; ++r) s = _mm512_add_ps(s, acc[r]);
  *out += _mm512_reduce_add_ps(s);
  return t * 1e9 / iters;
}

__attribute__((target("amx-tile"))) int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    fprintf(stderr, "no AMX tile state from the kernel (CPU without AMX?)\n");
    return 1;
  }
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  const char* names[] = {"store", "loads", "store+loads", "2 stores+32 loads"};
  float sink = 0.0f;
  for (int mode = 0; mode < 4; ++mode) {
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const double ns = run(mode, &sink);
      if (ns < best) best = ns;
    }
    printf("%-18s %6.2f ns per iteration\n", names[mode], best);
  }
  _tile_release();
  return sink == 12345.0f;  // keeps the sums live
}
