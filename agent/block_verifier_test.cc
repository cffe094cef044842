#include "agent/block_verifier.h"

#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 0) : 0xb10c;
  std::cout << "seed " << seed << " (set TESSERA_TEST_SEED to repeat)\n";
  return seed;
}

// Two ops of random bytes in blocks of 1000 (the last ones shorter).
struct Source {
  explicit Source(uint64_t seed) : rng(seed) {
    for (size_t bytes : {size_t{4500}, size_t{2999}}) {
      std::vector<unsigned char> data(bytes);
      for (auto& b : data) b = static_cast<unsigned char>(rng());
      ops.push_back(std::move(data));
    }
  }
  std::vector<BlockVerifier::Block> Blocks() const {
    std::vector<BlockVerifier::Block> blocks;
    for (size_t op = 0; op < ops.size(); ++op) {
      for (uint64_t at = 0; at < ops[op].size(); at += 1000) {
        const uint64_t n = std::min<uint64_t>(1000, ops[op].size() - at);
        blocks.push_back({op, at, ops[op].data() + at, n, Crc32c(ops[op].data() + at, n)});
      }
    }
    return blocks;
  }
  std::mt19937_64 rng;
  std::vector<std::vector<unsigned char>> ops;
};

TEST(BlockVerifierTest, IntactBlocksPassInAnyRangeAsked) {
  Source source(TestSeed());
  for (int threads : {1, 3}) {
    BlockVerifier verifier(source.Blocks(), threads, "rank 0 step 1");
    EXPECT_TRUE(verifier.WaitFor(0, 0, 4500).ok());
    EXPECT_TRUE(verifier.WaitFor(1, 1500, 1000).ok());  // across two blocks
    EXPECT_TRUE(verifier.WaitFor(1, 0, 2999).ok());
  }
}

// A changed byte fails its block (named, with both checksums) and only ranges touching it.
TEST(BlockVerifierTest, AChangedByteFailsItsBlockOnly) {
  Source source(TestSeed());
  const auto blocks = source.Blocks();
  const size_t at = 2000 + source.rng() % 1000;  // in op 0's third block
  source.ops[0][at] ^= 0x20;
  BlockVerifier verifier(blocks, 2, "rank 0 step 7");
  EXPECT_TRUE(verifier.WaitFor(0, 0, 2000).ok());
  const absl::Status bad = verifier.WaitFor(0, 1500, 1000);
  EXPECT_EQ(bad.code(), absl::StatusCode::kDataLoss) << bad;
  EXPECT_THAT(std::string(bad.message()),
              ::testing::HasSubstr("rank 0 step 7: bytes [2000, +1000) of entry 0"));
  EXPECT_TRUE(verifier.WaitFor(0, 3000, 1500).ok());
  EXPECT_TRUE(verifier.WaitFor(1, 0, 2999).ok());
}

TEST(BlockVerifierTest, ARangeWithoutBlocksIsAnError) {
  Source source(TestSeed());
  BlockVerifier verifier(source.Blocks(), 1, "rank 0 step 1");
  EXPECT_EQ(verifier.WaitFor(0, 4000, 1000).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(verifier.WaitFor(2, 0, 1).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace tessera
