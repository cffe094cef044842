#include "cuda/crc32c_kernel.h"

#include <vector>

namespace tessera::cuda::internal {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, bit-reflected
constexpr int kWarps = kCrcTileThreads / 32;
static_assert(kCrcTileThreads % 32 == 0 && kWarps <= 32, "a tile is whole warps, one per lane");

// Powers of x the combining steps multiply by, in the reflected representation.
struct CrcPowers {
  uint32_t stretch[5];  // x^(8 * stretch * 2^k): the warp's tree, k = 0..4
  uint32_t warp;        // x^(8 * 32 stretches): a warp's part of a tile
  uint32_t tile;        // x^(8 * tile)
};

// a * b in GF(2)[x] mod P, reflected; a fixed 32 rounds, so that the lanes of a warp agree.
__host__ __device__ uint32_t GfMul(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & (0x80000000u >> i)) product ^= b;
    b = (b >> 1) ^ (kPoly & (0u - (b & 1u)));
  }
  return product;
}

// x^(8 * bytes) mod P.
__host__ __device__ uint32_t XPow8n(uint64_t bytes) {
  uint32_t result = 0x80000000u;  // x^0
  uint32_t square = 0x00800000u;  // x^8
  for (; bytes != 0; bytes >>= 1) {
    if (bytes & 1) result = GfMul(result, square);
    square = GfMul(square, square);
  }
  return result;
}

CrcPowers Powers() {
  CrcPowers powers;
  for (int k = 0; k < 5; ++k) powers.stretch[k] = XPow8n(kCrcStretchBytes << k);
  powers.warp = XPow8n(kCrcStretchBytes * 32);
  powers.tile = XPow8n(kCrcTileBytes);
  return powers;
}

// Slice-by-8 tables: table[k][b] is the raw CRC of byte b followed by k zero bytes.
// Entry `i` of every table, given entry `i` of table 0 for all i (call per i, table by table).
__host__ __device__ uint32_t TableZeroEntry(uint32_t byte) {
  uint32_t crc = byte;
  for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (kPoly & (0u - (crc & 1u)));
  return crc;
}

__host__ __device__ inline uint32_t Step8(const uint32_t (*table)[256], uint32_t crc,
                                          uint32_t low, uint32_t high) {
  const uint32_t x = crc ^ low;
  return table[7][x & 0xff] ^ table[6][(x >> 8) & 0xff] ^ table[5][(x >> 16) & 0xff] ^
         table[4][x >> 24] ^ table[3][high & 0xff] ^ table[2][(high >> 8) & 0xff] ^
         table[1][(high >> 16) & 0xff] ^ table[0][high >> 24];
}

__host__ __device__ inline uint32_t StepByte(const uint32_t (*table)[256], uint32_t crc,
                                             uint8_t byte) {
  return (crc >> 8) ^ table[0][(crc ^ byte) & 0xff];
}

// The raw CRC of [data, data + bytes), continuing from `crc`, 16 bytes a load where aligned.
__device__ uint32_t RawCrcDevice(const uint32_t (*table)[256], const uint8_t* __restrict__ data,
                                 uint64_t bytes, uint32_t crc) {
  while (bytes != 0 && (reinterpret_cast<uintptr_t>(data) & 15) != 0) {
    crc = StepByte(table, crc, *data++);
    --bytes;
  }
  const uint4* words = reinterpret_cast<const uint4*>(data);
  for (; bytes >= 16; bytes -= 16) {
    const uint4 w = __ldg(words++);
    crc = Step8(table, crc, w.x, w.y);
    crc = Step8(table, crc, w.z, w.w);
  }
  data = reinterpret_cast<const uint8_t*>(words);
  for (; bytes != 0; --bytes) crc = StepByte(table, crc, *data++);
  return crc;
}

// The bytes of `piece` that stretch `stretch` of the zero-padded piece covers: [*begin, *end).
__host__ __device__ inline void StretchRange(uint64_t piece_bytes, uint64_t piece_tiles,
                                             uint64_t stretch, uint64_t* begin, uint64_t* end) {
  const uint64_t pad = piece_tiles * kCrcTileBytes - piece_bytes;
  const uint64_t from = stretch * kCrcStretchBytes;
  const uint64_t to = from + kCrcStretchBytes;
  *begin = from < pad ? 0 : from - pad;
  *end = to < pad ? 0 : to - pad;
}

__global__ void TileCrcKernel(const DeviceCrcPiece* __restrict__ pieces, uint32_t count,
                              uint32_t* __restrict__ tile_crcs, CrcPowers powers) {
  __shared__ uint32_t table[8][256];
  __shared__ uint32_t warp_crcs[kWarps];
  for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) table[0][i] = TableZeroEntry(i);
  __syncthreads();
  for (int k = 1; k < 8; ++k) {
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) {
      const uint32_t previous = table[k - 1][i];
      table[k][i] = (previous >> 8) ^ table[0][previous & 0xff];
    }
    __syncthreads();
  }

  // The piece this tile belongs to: the last whose first tile is at or before it.
  const uint64_t tile = blockIdx.x;
  uint32_t low = 0, high = count;
  while (high - low > 1) {
    const uint32_t middle = low + (high - low) / 2;
    if (pieces[middle].first_tile <= tile) {
      low = middle;
    } else {
      high = middle;
    }
  }
  const DeviceCrcPiece piece = pieces[low];
  uint64_t begin = 0, end = 0;
  StretchRange(piece.bytes, piece.tiles,
               (tile - piece.first_tile) * kCrcTileThreads + threadIdx.x, &begin, &end);
  uint32_t crc = RawCrcDevice(table, static_cast<const uint8_t*>(piece.data) + begin,
                              end - begin, 0);

  // Lane i ends up with the CRC of stretches i .. i + 2^k - 1 after step k.
  const uint32_t lane = threadIdx.x & 31;
  for (int k = 0; k < 5; ++k) {
    const uint32_t next = __shfl_down_sync(0xffffffffu, crc, 1u << k);
    if ((lane & ((2u << k) - 1)) == 0) crc = GfMul(powers.stretch[k], crc) ^ next;
  }
  if (lane == 0) warp_crcs[threadIdx.x / 32] = crc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t tile_crc = warp_crcs[0];
    for (int w = 1; w < kWarps; ++w) tile_crc = GfMul(powers.warp, tile_crc) ^ warp_crcs[w];
    tile_crcs[tile] = tile_crc;
  }
}

__global__ void PieceCrcKernel(const DeviceCrcPiece* __restrict__ pieces, uint32_t count,
                               const uint32_t* __restrict__ tile_crcs,
                               uint32_t* __restrict__ piece_crcs, uint32_t tile_power) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const DeviceCrcPiece piece = pieces[i];
  uint32_t crc = 0;
  for (uint64_t t = 0; t < piece.tiles; ++t) {
    crc = GfMul(tile_power, crc) ^ tile_crcs[piece.first_tile + t];
  }
  piece_crcs[i] = crc;
}

}  // namespace

cudaError_t LaunchRawCrc32c(const DeviceCrcPiece* pieces, uint32_t count, uint64_t total_tiles,
                            uint32_t* tile_crcs, uint32_t* piece_crcs, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (total_tiles == 0 || total_tiles > 0x7fffffffu) return cudaErrorInvalidValue;
  static const CrcPowers powers = Powers();
  TileCrcKernel<<<static_cast<unsigned>(total_tiles), kCrcTileThreads, 0, stream>>>(
      pieces, count, tile_crcs, powers);
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return launched;
  constexpr uint32_t kThreads = 128;
  PieceCrcKernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      pieces, count, tile_crcs, piece_crcs, powers.tile);
  return cudaGetLastError();
}

uint32_t RawCrc32cByTiles(const void* data, uint64_t bytes) {
  if (bytes == 0) return 0;
  static const CrcPowers powers = Powers();
  uint32_t table[8][256];
  for (uint32_t i = 0; i < 256; ++i) table[0][i] = TableZeroEntry(i);
  for (int k = 1; k < 8; ++k) {
    for (uint32_t i = 0; i < 256; ++i) {
      table[k][i] = (table[k - 1][i] >> 8) ^ table[0][table[k - 1][i] & 0xff];
    }
  }
  const uint8_t* bytes_at = static_cast<const uint8_t*>(data);
  const uint64_t tiles = CrcTiles(bytes);
  uint32_t piece_crc = 0;
  std::vector<uint32_t> lanes(kCrcTileThreads);
  for (uint64_t tile = 0; tile < tiles; ++tile) {
    for (uint32_t thread = 0; thread < kCrcTileThreads; ++thread) {
      uint64_t begin = 0, end = 0;
      StretchRange(bytes, tiles, tile * kCrcTileThreads + thread, &begin, &end);
      uint32_t crc = 0;
      uint64_t at = begin;
      for (; at + 8 <= end; at += 8) {
        uint32_t low = 0, high = 0;
        for (int b = 0; b < 4; ++b) {
          low |= uint32_t{bytes_at[at + b]} << (8 * b);
          high |= uint32_t{bytes_at[at + 4 + b]} << (8 * b);
        }
        crc = Step8(table, crc, low, high);
      }
      for (; at < end; ++at) crc = StepByte(table, crc, bytes_at[at]);
      lanes[thread] = crc;
    }
    // The same tree as the kernel: within each warp, then the warps in order.
    uint32_t tile_crc = 0;
    for (int w = 0; w < kWarps; ++w) {
      uint32_t* lane = &lanes[w * 32];
      for (int k = 0; k < 5; ++k) {
        for (uint32_t i = 0; i + (1u << k) < 32; i += 2u << k) {
          lane[i] = GfMul(powers.stretch[k], lane[i]) ^ lane[i + (1u << k)];
        }
      }
      tile_crc = w == 0 ? lane[0] : GfMul(powers.warp, tile_crc) ^ lane[0];
    }
    piece_crc = GfMul(powers.tile, piece_crc) ^ tile_crc;
  }
  return piece_crc;
}

}  // namespace tessera::cuda::internal
