#include <cuda_bf16.h>

#include <algorithm>

#include "bench/gpu_kernels/gpu_bench_kernels.h"

namespace tessera::bench {
namespace {

constexpr int kThreads = 256;

int BlocksFor(size_t words) {
  return static_cast<int>(
      std::min<size_t>(std::max<size_t>((words + kThreads - 1) / kThreads, 1), 8192));
}

__device__ uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// cudaMalloc'd tensors are 256-byte aligned; the cut-short tail goes byte by byte.
__global__ void FillKernel(unsigned char* ptr, size_t bytes, uint64_t seed) {
  const size_t words = (bytes + 7) / 8;
  for (size_t w = blockIdx.x * size_t{blockDim.x} + threadIdx.x; w < words;
       w += size_t{gridDim.x} * blockDim.x) {
    const uint64_t v = Mix(seed + w);
    if (w * 8 + 8 <= bytes) {
      reinterpret_cast<uint64_t*>(ptr)[w] = v;
    } else {
      for (size_t i = w * 8; i < bytes; ++i) ptr[i] = static_cast<unsigned char>(v >> (8 * (i % 8)));
    }
  }
}

__global__ void XorKernel(unsigned char* ptr, size_t bytes, uint64_t mask) {
  const size_t words = (bytes + 7) / 8;
  for (size_t w = blockIdx.x * size_t{blockDim.x} + threadIdx.x; w < words;
       w += size_t{gridDim.x} * blockDim.x) {
    if (w * 8 + 8 <= bytes) {
      reinterpret_cast<uint64_t*>(ptr)[w] ^= mask;
    } else {
      for (size_t i = w * 8; i < bytes; ++i) ptr[i] ^= static_cast<unsigned char>(mask >> (8 * (i % 8)));
    }
  }
}

constexpr int kTile = 16;

__global__ void GemmKernel(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c,
                           int n) {
  __shared__ float as[kTile][kTile];
  __shared__ float bs[kTile][kTile];
  const int row = blockIdx.y * kTile + threadIdx.y;
  const int col = blockIdx.x * kTile + threadIdx.x;
  float sum = 0.f;
  for (int t = 0; t < n; t += kTile) {
    as[threadIdx.y][threadIdx.x] =
        row < n && t + threadIdx.x < n ? __bfloat162float(a[static_cast<size_t>(row) * n + t + threadIdx.x]) : 0.f;
    bs[threadIdx.y][threadIdx.x] =
        col < n && t + threadIdx.y < n ? __bfloat162float(b[static_cast<size_t>(t + threadIdx.y) * n + col]) : 0.f;
    __syncthreads();
    for (int k = 0; k < kTile; ++k) sum += as[threadIdx.y][k] * bs[k][threadIdx.x];
    __syncthreads();
  }
  if (row < n && col < n) c[static_cast<size_t>(row) * n + col] = __float2bfloat16(sum);
}

}  // namespace

cudaError_t FillRandom(void* ptr, size_t bytes, uint64_t seed, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  FillKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes, seed);
  return cudaGetLastError();
}

cudaError_t XorWords(void* ptr, size_t bytes, uint64_t mask, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  XorKernel<<<BlocksFor((bytes + 7) / 8), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(ptr), bytes, mask);
  return cudaGetLastError();
}

cudaError_t FallbackGemmBf16(const uint16_t* a, const uint16_t* b, uint16_t* c, int n,
                             cudaStream_t stream) {
  const dim3 threads(kTile, kTile);
  const dim3 blocks((n + kTile - 1) / kTile, (n + kTile - 1) / kTile);
  GemmKernel<<<blocks, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(a),
                                             reinterpret_cast<const __nv_bfloat16*>(b),
                                             reinterpret_cast<__nv_bfloat16*>(c), n);
  return cudaGetLastError();
}

}  // namespace tessera::bench
