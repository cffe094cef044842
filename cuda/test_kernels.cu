#include <algorithm>
#include <cstring>

#include "cuda/test_kernels.h"

namespace tessera::cuda::test {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU; each thread then strides over the words.
int BlocksFor(size_t words) {
  const size_t blocks = (words + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<size_t>(std::max<size_t>(blocks, 1), 4096));
}

__global__ void FillPatternKernel(unsigned char* ptr, size_t bytes, uint64_t seed) {
  const size_t words = (bytes + 7) / 8;
  const bool aligned = reinterpret_cast<uintptr_t>(ptr) % 8 == 0;
  for (size_t word = blockIdx.x * size_t{blockDim.x} + threadIdx.x; word < words;
       word += size_t{gridDim.x} * blockDim.x) {
    const uint64_t value = PatternWord(seed, word);
    const size_t begin = word * 8;
    if (aligned && begin + 8 <= bytes) {
      *reinterpret_cast<uint64_t*>(ptr + begin) = value;
    } else {
      for (size_t i = begin; i < bytes && i < begin + 8; ++i) {
        ptr[i] = static_cast<unsigned char>(value >> (8 * (i - begin)));
      }
    }
  }
}

__global__ void CountMismatchesKernel(const unsigned char* ptr, size_t bytes, uint64_t seed,
                                      unsigned long long* mismatches) {
  const size_t words = (bytes + 7) / 8;
  unsigned long long count = 0;
  for (size_t word = blockIdx.x * size_t{blockDim.x} + threadIdx.x; word < words;
       word += size_t{gridDim.x} * blockDim.x) {
    const uint64_t value = PatternWord(seed, word);
    const size_t begin = word * 8;
    for (size_t i = begin; i < bytes && i < begin + 8; ++i) {
      count += ptr[i] != static_cast<unsigned char>(value >> (8 * (i - begin)));
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

cudaError_t FillPattern(void* ptr, size_t bytes, uint64_t seed, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  FillPatternKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes, seed);
  return cudaGetLastError();
}

cudaError_t CountPatternMismatches(const void* ptr, size_t bytes, uint64_t seed,
                                   unsigned long long* mismatches, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  CountMismatchesKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<const unsigned char*>(ptr), bytes, seed, mismatches);
  return cudaGetLastError();
}

cudaError_t Spin(uint64_t nanoseconds, cudaStream_t stream) {
  SpinKernel<<<1, 1, 0, stream>>>(nanoseconds);
  return cudaGetLastError();
}

void FillPatternHost(void* ptr, size_t bytes, uint64_t seed) {
  auto* out = static_cast<unsigned char*>(ptr);
  for (size_t begin = 0; begin < bytes; begin += 8) {
    const uint64_t value = PatternWord(seed, begin / 8);
    std::memcpy(out + begin, &value, std::min<size_t>(8, bytes - begin));
  }
}

size_t FirstPatternMismatchHost(const void* ptr, size_t bytes, uint64_t seed) {
  const auto* in = static_cast<const unsigned char*>(ptr);
  for (size_t begin = 0; begin < bytes; begin += 8) {
    const uint64_t expected = PatternWord(seed, begin / 8);
    const size_t n = std::min<size_t>(8, bytes - begin);
    uint64_t actual = expected;
    std::memcpy(&actual, in + begin, n);
    if (actual == expected) continue;
    for (size_t i = 0; i < n; ++i) {
      if (in[begin + i] != static_cast<unsigned char>(expected >> (8 * i))) return begin + i;
    }
  }
  return bytes;
}

}  // namespace tessera::cuda::test
