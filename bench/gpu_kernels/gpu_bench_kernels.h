// Kernels for bench/gpu_snapshot_bench.cc. Launchers return the launch's cudaError_t and do not
// synchronise; pointers are device memory.
#ifndef TESSERA_BENCH_GPU_KERNELS_GPU_BENCH_KERNELS_H_
#define TESSERA_BENCH_GPU_KERNELS_GPU_BENCH_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tessera::bench {

// Random bytes (splitmix64 of seed and word), never a constant page.
cudaError_t FillRandom(void* ptr, size_t bytes, uint64_t seed, cudaStream_t stream);

// The stand-in optimizer step: XORs every 8-byte word with `mask` (reads and writes every byte).
cudaError_t XorWords(void* ptr, size_t bytes, uint64_t mask, cudaStream_t stream);

// C = A * B for n x n row-major bf16 matrices (given as raw 16-bit words), fp32 accumulation.
// A plain shared-memory tiled kernel, used only when no cuBLAS library can be loaded.
cudaError_t FallbackGemmBf16(const uint16_t* a, const uint16_t* b, uint16_t* c, int n,
                             cudaStream_t stream);

}  // namespace tessera::bench

#endif  // TESSERA_BENCH_GPU_KERNELS_GPU_BENCH_KERNELS_H_
