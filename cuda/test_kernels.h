// Kernels for the copy engine's GPU test: a pseudo-random byte pattern, determined by a seed,
// that device and host can write and check without keeping a reference copy; and a kernel that
// keeps a stream busy for a while.
//
// Launchers return the launch's cudaError_t and do not synchronise. Pointers passed to launchers
// are device memory unless the name says host.
#ifndef TESSERA_CUDA_TEST_KERNELS_H_
#define TESSERA_CUDA_TEST_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TESSERA_HOST_DEVICE __host__ __device__
#else
#define TESSERA_HOST_DEVICE
#endif

namespace tessera::cuda::test {

// Bytes [8 * word, 8 * word + 8) of the pattern for `seed`, little-endian (splitmix64).
TESSERA_HOST_DEVICE inline uint64_t PatternWord(uint64_t seed, uint64_t word) {
  uint64_t z = seed + (word + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Writes the pattern for `seed` to [ptr, ptr + bytes), which may be unaligned.
cudaError_t FillPattern(void* ptr, size_t bytes, uint64_t seed, cudaStream_t stream);

// Adds to *mismatches (device memory) the number of bytes of [ptr, ptr + bytes) that differ from
// the pattern for `seed`.
cudaError_t CountPatternMismatches(const void* ptr, size_t bytes, uint64_t seed,
                                   unsigned long long* mismatches, cudaStream_t stream);

// Occupies `stream` for about `nanoseconds` (one thread spinning on the global timer).
cudaError_t Spin(uint64_t nanoseconds, cudaStream_t stream);

void FillPatternHost(void* ptr, size_t bytes, uint64_t seed);

// The offset of the first byte of host memory [ptr, ptr + bytes) that differs from the pattern
// for `seed`, or `bytes` if none does.
size_t FirstPatternMismatchHost(const void* ptr, size_t bytes, uint64_t seed);

}  // namespace tessera::cuda::test

#endif  // TESSERA_CUDA_TEST_KERNELS_H_
