#include <algorithm>

#include "tests/gpu/gpu_state_kernels.h"

namespace tessera::testing::gpu {
namespace {

constexpr int kThreads = 256;

int BlocksFor(size_t words) {
  const size_t blocks = (words + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<size_t>(std::max<size_t>(blocks, 1), 8192));
}

// Applies `op(word_index, old_word) -> new_word` to every word of [ptr, ptr + bytes). Whole
// words are accessed as uint64_t when ptr is 8-byte aligned, the cut-short tail byte by byte.
template <typename Op>
__device__ void ForEachWord(unsigned char* ptr, size_t bytes, Op op) {
  const size_t words = (bytes + 7) / 8;
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 8 == 0;
  for (size_t w = blockIdx.x * size_t{blockDim.x} + threadIdx.x; w < words;
       w += size_t{gridDim.x} * blockDim.x) {
    const size_t begin = w * 8;
    if (aligned && begin + 8 <= bytes) {
      uint64_t* p = reinterpret_cast<uint64_t*>(ptr + begin);
      *p = op(w, *p);
    } else {
      uint64_t old = 0;
      const size_t n = bytes - begin < 8 ? bytes - begin : 8;
      for (size_t i = 0; i < n; ++i) old |= uint64_t{ptr[begin + i]} << (8 * i);
      const uint64_t value = op(w, old);
      for (size_t i = 0; i < n; ++i) ptr[begin + i] = static_cast<unsigned char>(value >> (8 * i));
    }
  }
}

struct StateOp {
  uint64_t seed, index, mask;
  __device__ uint64_t operator()(size_t w, uint64_t) const { return BaseWord(seed, index, w) ^ mask; }
};
struct XorOp {
  uint64_t mask;
  __device__ uint64_t operator()(size_t, uint64_t old) const { return old ^ mask; }
};
struct NoiseOp {
  uint64_t salt;
  __device__ uint64_t operator()(size_t w, uint64_t) const { return SplitMix64(salt + w); }
};

__global__ void FillStateKernel(unsigned char* ptr, size_t bytes, uint64_t seed, uint64_t index,
                                uint64_t mask) {
  ForEachWord(ptr, bytes, StateOp{seed, index, mask});
}

__global__ void XorKernel(unsigned char* ptr, size_t bytes, uint64_t mask) {
  ForEachWord(ptr, bytes, XorOp{mask});
}

__global__ void NoiseKernel(unsigned char* ptr, size_t bytes, uint64_t salt) {
  ForEachWord(ptr, bytes, NoiseOp{salt});
}

__global__ void CountKernel(const unsigned char* ptr, size_t bytes, uint64_t seed, uint64_t index,
                            uint64_t mask, unsigned long long* mismatches) {
  const size_t words = (bytes + 7) / 8;
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 8 == 0;
  unsigned long long count = 0;
  for (size_t w = blockIdx.x * size_t{blockDim.x} + threadIdx.x; w < words;
       w += size_t{gridDim.x} * blockDim.x) {
    const uint64_t want = BaseWord(seed, index, w) ^ mask;
    const size_t begin = w * 8;
    if (aligned && begin + 8 <= bytes) {
      const uint64_t diff = *reinterpret_cast<const uint64_t*>(ptr + begin) ^ want;
      if (diff != 0) {
        for (int i = 0; i < 8; ++i) count += ((diff >> (8 * i)) & 0xff) != 0;
      }
    } else {
      for (size_t i = begin; i < bytes && i < begin + 8; ++i) {
        count += ptr[i] != static_cast<unsigned char>(want >> (8 * (i - begin)));
      }
    }
  }
  if (count != 0) atomicAdd(mismatches, count);
}

__device__ uint64_t GlobalTimerNs() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

__global__ void SpinKernel(uint64_t nanoseconds) {
  const uint64_t start = GlobalTimerNs();
  while (GlobalTimerNs() - start < nanoseconds) __nanosleep(1000);
}

}  // namespace

cudaError_t FillState(void* ptr, size_t bytes, uint64_t seed, uint64_t index, int64_t step,
                      cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  FillStateKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes, seed, index, StepMask(seed, index, step));
  return cudaGetLastError();
}

cudaError_t AdvanceState(void* ptr, size_t bytes, uint64_t seed, uint64_t index, int64_t from,
                         int64_t to, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  XorKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes,
      StepMask(seed, index, from) ^ StepMask(seed, index, to));
  return cudaGetLastError();
}

cudaError_t CountStateMismatches(const void* ptr, size_t bytes, uint64_t seed, uint64_t index,
                                 int64_t step, unsigned long long* mismatches,
                                 cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  CountKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<const unsigned char*>(ptr), bytes, seed, index, StepMask(seed, index, step),
      mismatches);
  return cudaGetLastError();
}

cudaError_t FillNoise(void* ptr, size_t bytes, uint64_t salt, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  NoiseKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes, salt);
  return cudaGetLastError();
}

cudaError_t SpinStream(uint64_t nanoseconds, cudaStream_t stream) {
  SpinKernel<<<1, 1, 0, stream>>>(nanoseconds);
  return cudaGetLastError();
}

}  // namespace tessera::testing::gpu
