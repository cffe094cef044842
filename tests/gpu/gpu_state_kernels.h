// Device-side training state for the GPU tests: the bytes of tensor `index` at step `step` are a
// pure function of (seed, index, step), generated, advanced and checked by kernels, so a 10 GB
// state is produced and verified at HBM speed without a host reference copy.
//
// Word w (bytes [8w, 8w + 8), little-endian; the last word of an odd-sized tensor is cut short)
// is BaseWord(seed, index, w) ^ StepMask(seed, index, step). The mask of step 0 is zero; the low
// bit of every mask byte is the step's parity, so from one step to the next every byte changes.
// This mirrors tests/trainer_state.cc (splitmix64 base, per-step XOR mask), except that the base
// is counter-based so that each thread computes its words independently.
//
// Launchers return the launch's cudaError_t and do not synchronise. Pointers are device memory.
#ifndef TESSERA_TESTS_GPU_GPU_STATE_KERNELS_H_
#define TESSERA_TESTS_GPU_GPU_STATE_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TESSERA_GPU_STATE_HD __host__ __device__
#else
#define TESSERA_GPU_STATE_HD
#endif

namespace tessera::testing::gpu {

TESSERA_GPU_STATE_HD inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

TESSERA_GPU_STATE_HD inline uint64_t BaseWord(uint64_t seed, uint64_t index, uint64_t word) {
  return SplitMix64(SplitMix64(seed ^ (0xABCDEFull * (index + 1))) + word);
}

TESSERA_GPU_STATE_HD inline uint64_t StepMask(uint64_t seed, uint64_t index, int64_t step) {
  if (step == 0) return 0;
  const uint64_t random =
      SplitMix64(seed * 31 + index * 1000003 + static_cast<uint64_t>(step)) & 0xFEFEFEFEFEFEFEFEull;
  return random | ((step & 1) ? 0x0101010101010101ull : 0);
}

// Writes the state of `step` to tensor `index` ([ptr, ptr + bytes)).
cudaError_t FillState(void* ptr, size_t bytes, uint64_t seed, uint64_t index, int64_t step,
                      cudaStream_t stream);

// The "optimizer step": moves tensor `index` from step `from` to step `to` in place (reads and
// writes every byte).
cudaError_t AdvanceState(void* ptr, size_t bytes, uint64_t seed, uint64_t index, int64_t from,
                         int64_t to, cudaStream_t stream);

// Adds to *mismatches the number of bytes of tensor `index` that differ from the state of `step`.
cudaError_t CountStateMismatches(const void* ptr, size_t bytes, uint64_t seed, uint64_t index,
                                 int64_t step, unsigned long long* mismatches,
                                 cudaStream_t stream);

// Fills [ptr, ptr + bytes) with noise from `salt` (a restore that writes nothing must show).
cudaError_t FillNoise(void* ptr, size_t bytes, uint64_t salt, cudaStream_t stream);

// Occupies `stream` for about `nanoseconds` (one thread spinning on the global timer).
cudaError_t SpinStream(uint64_t nanoseconds, cudaStream_t stream);

}  // namespace tessera::testing::gpu

#endif  // TESSERA_TESTS_GPU_GPU_STATE_KERNELS_H_
