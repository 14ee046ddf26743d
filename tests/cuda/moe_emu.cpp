// Host build of cuda/eq_moe.cu (through cuda/cuda_host.h) as a shared library: tests/cuda_emulation.py launches its
// entry points from Python with the launch plans of easyquant_vllm/kernels/cuda_moe.py, marshalled by kernel_args()
// exactly as for CuPy on a GPU (pointers as 64-bit addresses, ints as int32), on CPU tensors.
//
//   int eq_emu_launch(const char* name, unsigned grid, unsigned block, const uint64_t* args, int nargs)
//     0: ran; 1: no entry point of that name; 2: wrong number of arguments.
#include "../../easyquant_vllm/kernels/cuda/eq_moe.cu"

#include <cstring>

namespace {

template <typename P>
P ptr(uint64_t word) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(word));
}
int i32(uint64_t word) { return static_cast<int32_t>(static_cast<uint32_t>(word)); }

template <typename T>
using GemmEntry = void (*)(const T*, const int4*, const __half*, const uint8_t*, const __half*, const int*,
                           const int*, const __half*, const int*, const int*, const int*, const float*, float*, int,
                           int, int, int);

template <typename T>
void gemm(GemmEntry<T> entry, dim3 grid, dim3 block, const uint64_t* a) {
  emu_launch(grid, block, entry, ptr<const T*>(a[0]), ptr<const int4*>(a[1]), ptr<const __half*>(a[2]),
             ptr<const uint8_t*>(a[3]), ptr<const __half*>(a[4]), ptr<const int*>(a[5]), ptr<const int*>(a[6]),
             ptr<const __half*>(a[7]), ptr<const int*>(a[8]), ptr<const int*>(a[9]), ptr<const int*>(a[10]),
             ptr<const float*>(a[11]), ptr<float*>(a[12]), i32(a[13]), i32(a[14]), i32(a[15]), i32(a[16]));
}

void route(dim3 grid, dim3 block, const uint64_t* a) {
  emu_launch(grid, block, eq_moe_route, ptr<const int*>(a[0]), ptr<const float*>(a[1]), ptr<int*>(a[2]),
             ptr<int*>(a[3]), ptr<float*>(a[4]), ptr<int*>(a[5]), ptr<int*>(a[6]), i32(a[7]), i32(a[8]), i32(a[9]),
             i32(a[10]), i32(a[11]), i32(a[12]), i32(a[13]), i32(a[14]));
}

template <typename T>
void silu_mul(void (*entry)(const float*, T*, int, int), dim3 grid, dim3 block, const uint64_t* a) {
  emu_launch(grid, block, entry, ptr<const float*>(a[0]), ptr<T*>(a[1]), i32(a[2]), i32(a[3]));
}

template <typename T>
void sum(void (*entry)(const float*, const int*, T*, int, int, int, int), dim3 grid, dim3 block, const uint64_t* a) {
  emu_launch(grid, block, entry, ptr<const float*>(a[0]), ptr<const int*>(a[1]), ptr<T*>(a[2]), i32(a[3]), i32(a[4]),
             i32(a[5]), i32(a[6]));
}

struct Entry {
  const char* name;
  int nargs;
  void (*run)(dim3, dim3, const uint64_t*);
};

#define EMU_GEMM(NAME, T) {#NAME, 17, [](dim3 g, dim3 b, const uint64_t* a) { gemm<T>(NAME, g, b, a); }}
#define EMU_GEMM_PAIR(NAME, T) EMU_GEMM(NAME, T), EMU_GEMM(NAME##_v2, T), EMU_GEMM(NAME##_v3, T)  // format versions
#define EMU_ENTRIES(SUFFIX, T)                                                                                 \
  EMU_GEMM_PAIR(eq_moe_mma_int4_##SUFFIX##_t1, T), EMU_GEMM_PAIR(eq_moe_mma_int4_##SUFFIX##_t2, T),            \
      EMU_GEMM_PAIR(eq_moe_mma_int4_##SUFFIX##_t4, T), EMU_GEMM_PAIR(eq_moe_mma_int4_##SUFFIX##_t8, T),        \
      EMU_GEMM_PAIR(eq_moe_gemv_int4_##SUFFIX##_m1, T), EMU_GEMM_PAIR(eq_moe_gemv_int4_##SUFFIX##_m2, T),      \
      EMU_GEMM_PAIR(eq_moe_gemv_int4_##SUFFIX##_m4, T), EMU_GEMM_PAIR(eq_moe_gemv_int4_##SUFFIX##_m8, T),      \
      EMU_GEMM_PAIR(eq_moe_gemv_int4_##SUFFIX##_m16, T),                                                       \
      {"eq_moe_silu_mul_" #SUFFIX, 4,                                                                          \
       [](dim3 g, dim3 b, const uint64_t* a) { silu_mul<T>(eq_moe_silu_mul_##SUFFIX, g, b, a); }},             \
      {"eq_moe_sum_" #SUFFIX, 7, [](dim3 g, dim3 b, const uint64_t* a) { sum<T>(eq_moe_sum_##SUFFIX, g, b, a); }}

const Entry kEntries[] = {{"eq_moe_route", 15, route}, EMU_ENTRIES(f16, __half), EMU_ENTRIES(bf16, __nv_bfloat16)};

}  // namespace

extern "C" int eq_emu_launch(const char* name, unsigned grid, unsigned block, const uint64_t* args, int nargs) {
  for (const Entry& e : kEntries) {
    if (std::strcmp(e.name, name) != 0) continue;
    if (nargs != e.nargs) return 2;
    e.run(dim3(grid), dim3(block), args);
    return 0;
  }
  return 1;
}
