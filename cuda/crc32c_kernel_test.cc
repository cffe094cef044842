// The GPU checksum's arithmetic, run on the host: the tiled computation (stretches, zero
// padding in front, both combining steps) must give the CRC32C ISA-L gives, for lengths around
// every boundary it has. The kernel itself runs the same functions; copy_engine_gpu_test runs it.
#include "cuda/crc32c_kernel.h"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "gtest/gtest.h"

namespace tessera::cuda::internal {
namespace {

TEST(Crc32cKernelTest, TiledRawCrcIsTheCrc32cOfTheBytes) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> data(3 * kCrcTileBytes + 4096);
  for (auto& byte : data) byte = static_cast<uint8_t>(rng());
  std::vector<uint64_t> lengths = {1, 7, 8, 15, 16, 17, kCrcStretchBytes - 1, kCrcStretchBytes,
                                   kCrcStretchBytes + 1, 32 * kCrcStretchBytes + 3,
                                   kCrcTileBytes - 1, kCrcTileBytes, kCrcTileBytes + 1,
                                   2 * kCrcTileBytes + 777, 3 * kCrcTileBytes};
  for (int i = 0; i < 10; ++i) lengths.push_back(1 + rng() % (3 * kCrcTileBytes));
  for (uint64_t length : lengths) {
    const uint64_t offset = rng() % 4096;  // any alignment
    const uint8_t* at = data.data() + offset;
    EXPECT_EQ(RawCrc32cByTiles(at, length) ^ Crc32cOfZeros(length), Crc32c(at, length))
        << "length " << length << " at offset " << offset;
  }
  EXPECT_EQ(RawCrc32cByTiles(data.data(), 0), 0u);
}

TEST(Crc32cKernelTest, OneChangedByteChangesTheTiledCrc) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> data(kCrcTileBytes + 5000);
  for (auto& byte : data) byte = static_cast<uint8_t>(rng());
  const uint32_t before = RawCrc32cByTiles(data.data(), data.size());
  const size_t at = rng() % data.size();
  data[at] ^= static_cast<uint8_t>(1 + rng() % 255);
  EXPECT_NE(RawCrc32cByTiles(data.data(), data.size()), before) << "byte " << at;
}

}  // namespace
}  // namespace tessera::cuda::internal
