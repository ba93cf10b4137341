// Just enough of CUDA C++ for src/cuda/kernels.cu to compile unchanged with the system C++
// compiler and run on the CPU (see emulator.cpp). Every thread of a block is a fiber; the
// intrinsics that let threads of a block or a warp meet (__syncthreads, __shfl_down_sync) switch
// fibers, and everything else is plain C++ on one OS thread.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(bytes) alignas(bytes)
// One block runs at a time, so a function's statics are its block's shared memory.
#define __shared__ static

struct float4 {
    float x, y, z, w;
};

struct uint3 {
    unsigned x, y, z;
};

namespace emu {
uint3 thread_index();
uint3 block_index();
uint3 grid_dim();
uint3 block_dim();
void sync_threads(int line);
// Exchanges 8 bytes with the lane `delta` above in the warp; every lane of the warp must come.
uint64_t shuffle_down(uint64_t value, unsigned mask, int delta, int line);

template <typename T>
T shfl_down(unsigned mask, T value, int delta, int line) {
    static_assert(sizeof(T) <= 8, "the emulator shuffles at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    bits = shuffle_down(bits, mask, delta, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define gridDim (::emu::grid_dim())
#define blockDim (::emu::block_dim())
#define __syncthreads() ::emu::sync_threads(__LINE__)
#define __shfl_down_sync(mask, value, delta) ::emu::shfl_down((mask), (value), (delta), __LINE__)

// Blocks run one after another, so device memory is coherent without fences and an atomic is a
// plain read-modify-write.
inline void __threadfence() {}
inline float __uint_as_float(unsigned bits) {
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}
inline unsigned __float_as_uint(float value) {
    unsigned out;
    std::memcpy(&out, &value, 4);
    return out;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    unsigned old = *address;
    *address = old + value;
    return old;
}
template <typename T>
inline T __ldcg(const T* p) {
    return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
    return *p;
}
template <typename T>
inline void __stcs(T* p, T value) {
    *p = value;
}
template <typename T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
