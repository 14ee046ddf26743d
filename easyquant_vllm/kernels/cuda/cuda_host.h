// cuda_host.h - run the kernels of this directory on CPU threads, so their exact source is tested
// without a GPU (our CI has none). Under nvcc/NVRTC (__CUDACC__) it only pulls in the CUDA half types.
//
// Model of execution on the host:
//   * blocks run one after another; the threads of a block are real OS threads (one per CUDA thread,
//     reused by the next block), so data races between them are real and ThreadSanitizer sees them;
//   * __syncthreads() is a std::barrier over the block;
//   * __shared__ is a function-static: with one block at a time, that is per-block shared memory;
//   * warp-level operations (shuffles, __syncwarp, the mma.sync emulation of eq_mma.cu) go through
//     per-block scratch and a barrier of the warp's 32 threads, so, as on the GPU, they need the whole
//     warp (the kernels never return early: see the `active` flags), and different warps of a block
//     may take different paths (eq_mma.cu's warps loop over different numbers of k-blocks);
//   * threadIdx / blockIdx are thread_local; blockDim / gridDim are set per launch.
//   * atomicAdd on int is a relaxed atomic fetch-add (GCC builtin, which ThreadSanitizer understands).
// Inline PTX stays behind small wrappers in the kernels with an exact host version beside it.
#pragma once

#ifdef __CUDACC__
#ifdef __CUDACC_RTC__
// NVRTC (how CuPy compiles at run time) has no C++ standard library headers.
using uint8_t = unsigned char;
using uint16_t = unsigned short;
using uint32_t = unsigned int;
using int32_t = int;
using size_t = decltype(sizeof(0));
#else
#include <cstdint>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else

#include <barrier>
#include <cmath>  // fmaf: fused, one rounding, as the GPU's FFMA
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct int4 {
  int x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};

using __half = _Float16;  // IEEE binary16 on the host, the same rounding as the GPU's __half
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  std::memcpy(&h, &u, sizeof h);
  return h;
}
inline unsigned short __half_as_ushort(__half h) {
  unsigned short u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline int __ffs(int v) { return __builtin_ffs(v); }  // 1-based index of the lowest set bit, 0 for 0
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// Byte permute (PRMT): byte i of the result is byte s[4i..4i+2] of the 8 bytes {y, x} (x bytes 0..3, y 4..7).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
// Funnel shift right (SHF.R.W): the low 32 bits of the 64-bit hi:lo shifted right by shift & 31.
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((uint64_t(hi) << 32) | lo) >> (shift & 31u));
}
// Round-to-nearest products and sums that the GPU compiler may not fuse into an FMA; on the host (no contraction
// across statements at -std=c++20) a plain operation.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;  // one per warp of the block
inline std::vector<float> shuffle_scratch;  // one slot per thread of the block
inline std::vector<uint32_t> mma_scratch;   // 6 registers (4 of A, 2 of B) per thread, for mma.sync
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask*/ = 0xFFFFFFFFu) { emu::warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

// Butterfly shuffle within a warp of 32: every thread publishes its value, then reads its partner's.
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  float* warp = &emu::shuffle_scratch[t - t % 32];
  warp[t % 32] = v;
  __syncwarp();
  const float r = warp[(t % 32) ^ unsigned(lane_mask)];
  __syncwarp();  // nobody overwrites a slot before everyone has read it
  return r;
}

// Integer atomics (eq_moe.cu's routing counts in shared memory): a relaxed fetch-add, all CUDA's atomicAdd promises.
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

// Launch a 1-D grid of 1-D blocks: emu_launch(grid, block, kernel, args...). The block's threads are started once
// and run the blocks one after another, meeting at the block barrier after each (so a block's shared memory and
// scratch are free before the next one starts): a launch costs block.x thread starts, not grid.x * block.x.
template <typename Kernel, typename... Args>
void emu_launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  emu::grid_dim = grid;
  emu::block_dim = block;
  emu::shuffle_scratch.assign(block.x, 0.0f);
  emu::mma_scratch.assign(block.x * 6, 0u);
  std::barrier<> barrier(block.x);
  emu::block_barrier = &barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;  // blocks are whole warps here
  emu::warp_barriers.clear();
  for (unsigned w = 0; w < block.x / 32; ++w) {
    warps.push_back(std::make_unique<std::barrier<>>(32));
    emu::warp_barriers.push_back(warps.back().get());
  }
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([=, &barrier] {
      emu::thread_idx = dim3(t);
      for (unsigned b = 0; b < grid.x; ++b) {
        emu::block_idx = dim3(b);
        kernel(args...);
        barrier.arrive_and_wait();  // the whole block is done (kernels return per block, uniformly)
      }
    });
  }
  for (auto& th : threads) th.join();
}

#endif  // __CUDACC__
