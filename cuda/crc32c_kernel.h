// CRC32C on the GPU: the checksum of device memory computed by a kernel, so that a snapshot's
// checksum costs the host no pass over the bytes.
//
// The kernel computes the raw CRC (the CRC32C polynomial with initial value 0 and no final xor,
// which is linear in the data) of each piece; the standard CRC32C of a piece of n bytes is its
// raw CRC xor the standard CRC32C of n zero bytes (Crc32cOfZeros in common/crc32c.h).
//
// How: a piece is cut into tiles of kCrcTileBytes, one thread block each, and a tile into
// stretches of kCrcStretchBytes, one thread each (slice-by-8 tables in shared memory). The
// stretches' CRCs are combined up a tree (a CRC over A || B is crc(A) * x^(8|B|) xor crc(B) in
// GF(2)[x] mod P), then the tiles' by one thread per piece. Every stretch and tile combines with
// the same power of x because the piece is read as if it began with zero bytes up to a multiple
// of the tile: zeros in front do not change a raw CRC.
//
// Internal to //cuda:copy_engine.
#ifndef TESSERA_CUDA_CRC32C_KERNEL_H_
#define TESSERA_CUDA_CRC32C_KERNEL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tessera::cuda::internal {

constexpr uint64_t kCrcStretchBytes = 1024;
constexpr uint32_t kCrcTileThreads = 256;
constexpr uint64_t kCrcTileBytes = kCrcStretchBytes * kCrcTileThreads;  // 256 KiB

// One piece of device memory to checksum. first_tile: the sum of `tiles` of the pieces before
// it in the same launch; tiles: CrcTiles(bytes).
struct DeviceCrcPiece {
  const void* data;
  uint64_t bytes;
  uint64_t first_tile;
  uint64_t tiles;
};

inline uint64_t CrcTiles(uint64_t bytes) { return (bytes + kCrcTileBytes - 1) / kCrcTileBytes; }

// Enqueues on `stream` the raw CRCs of `count` pieces (an array in device memory, every piece
// at least 1 byte, tiles as documented above, `total_tiles` their sum, at most 2^31 - 1) into
// piece_crcs[0, count), using tile_crcs[0, total_tiles) as scratch (both device memory). Returns
// the launch's error; does not synchronise.
cudaError_t LaunchRawCrc32c(const DeviceCrcPiece* pieces, uint32_t count, uint64_t total_tiles,
                            uint32_t* tile_crcs, uint32_t* piece_crcs, cudaStream_t stream);

// The same computation on the host (stretches, padding and both combining steps as the kernel
// does them), for tests on machines without a GPU.
uint32_t RawCrc32cByTiles(const void* data, uint64_t bytes);

}  // namespace tessera::cuda::internal

#endif  // TESSERA_CUDA_CRC32C_KERNEL_H_
