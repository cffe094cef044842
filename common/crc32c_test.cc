#include "common/crc32c.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tessera {
namespace {

// Bit-at-a-time reference, independent of ISA-L.
uint32_t ReferenceCrc32c(const uint8_t* p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST(Crc32cTest, KnownVector) {
  const char* s = "123456789";
  EXPECT_EQ(Crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(s, 0), 0u);
}

TEST(Crc32cTest, MatchesReferenceOnRandomLengthsAndOffsets) {
  const uint64_t seed = 20261123;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto data = RandomBytes(70000, seed);
  std::mt19937_64 rng(seed + 1);
  for (int i = 0; i < 200; ++i) {
    size_t off = rng() % 64;
    size_t len = rng() % (data.size() - off);
    ASSERT_EQ(Crc32c(data.data() + off, len), ReferenceCrc32c(data.data() + off, len))
        << "off=" << off << " len=" << len;
  }
}

TEST(Crc32cTest, ExtendAndCombineAgree) {
  const uint64_t seed = 7;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto data = RandomBytes(100003, seed);
  uint32_t whole = Crc32c(data.data(), data.size());
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 100; ++i) {
    size_t cut = rng() % (data.size() + 1);
    uint32_t a = Crc32c(data.data(), cut);
    uint32_t b = Crc32c(data.data() + cut, data.size() - cut);
    ASSERT_EQ(Crc32c(data.data() + cut, data.size() - cut, a), whole) << "cut=" << cut;
    ASSERT_EQ(Crc32cCombine(a, b, data.size() - cut), whole) << "cut=" << cut;
  }
}

// Lengths past 32 bits, where a combine that truncated or wrapped its length would go wrong:
// B is 4 GiB + 12345 zero bytes, streamed through a small buffer.
TEST(Crc32cTest, CombineHandlesLengthsPast32Bits) {
  const uint64_t seed = 31;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto a = RandomBytes(1000, seed);
  const uint32_t crc_a = Crc32c(a.data(), a.size());
  std::vector<uint8_t> zeros(size_t{1} << 20, 0);
  const size_t len_b = (size_t{4} << 30) + 12345;
  uint32_t crc_b = 0;
  uint32_t whole = crc_a;
  for (size_t done = 0; done < len_b;) {
    const size_t n = std::min(zeros.size(), len_b - done);
    crc_b = Crc32c(zeros.data(), n, crc_b);
    whole = Crc32c(zeros.data(), n, whole);
    done += n;
  }
  EXPECT_EQ(Crc32cCombine(crc_a, crc_b, len_b), whole);
  EXPECT_NE(Crc32cCombine(crc_a, crc_b, len_b - 1), whole);
}

// Raw CRC (initial value 0, no final xor), bit at a time.
uint32_t ReferenceRawCrc32c(const uint8_t* p, size_t n) {
  uint32_t crc = 0;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return crc;
}

TEST(Crc32cTest, ZerosTurnARawCrcIntoTheCrc) {
  const uint64_t seed = 20261206;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto data = RandomBytes(20000, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<uint8_t> zeros(5000, 0);
  for (size_t len : {size_t{0}, size_t{1}, size_t{7}, size_t{4096}, size_t{4999}}) {
    ASSERT_EQ(Crc32cOfZeros(len), ReferenceCrc32c(zeros.data(), len)) << "len=" << len;
  }
  for (int i = 0; i < 50; ++i) {
    const size_t len = rng() % data.size();
    ASSERT_EQ(ReferenceRawCrc32c(data.data(), len) ^ Crc32cOfZeros(len), Crc32c(data.data(), len))
        << "len=" << len;
  }
}

TEST(Crc32cTest, ParallelEqualsSerial) {
  const uint64_t seed = 99;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  auto data = RandomBytes((size_t{5} << 20) + 12345, seed);
  uint32_t serial = Crc32c(data.data(), data.size());
  for (int threads : {1, 2, 3, 4, 7, 16}) {
    for (size_t min_chunk : {size_t{1}, size_t{4096}, size_t{1} << 20, size_t{64} << 20}) {
      EXPECT_EQ(ParallelCrc32c(data.data(), data.size(), threads, min_chunk), serial)
          << "threads=" << threads << " min_chunk=" << min_chunk;
    }
  }
  data[data.size() / 2] ^= 0x10;
  EXPECT_NE(ParallelCrc32c(data.data(), data.size(), 4, 4096), serial);
}

}  // namespace
}  // namespace tessera
