#include "cuda/checksum_queue.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/crc32c.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera::cuda::internal {
namespace {

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 0) : 0xc4ec5;
  std::cout << "seed " << seed << " (set TESSERA_TEST_SEED to repeat)\n";
  return seed;
}

std::vector<unsigned char> RandomBytes(std::mt19937_64& rng, size_t bytes) {
  std::vector<unsigned char> out(bytes);
  for (auto& b : out) b = static_cast<unsigned char>(rng());
  return out;
}

// Ranges of random bytes cut into pieces of random sizes, handed over out of order, each behind
// a wait that opens only after the batch is submitted (as a chunk lands after its copy is
// enqueued): every range's checksum is the CRC32C of its bytes.
TEST(ChecksumQueueTest, PiecesLandingLaterCombineIntoEachRangesCrc) {
  constexpr uint64_t kBlock = 65536;
  std::mt19937_64 rng(TestSeed());
  std::vector<std::vector<unsigned char>> ranges;
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4097}, size_t{1} << 20, size_t{777777}}) {
    ranges.push_back(RandomBytes(rng, bytes));
  }
  std::vector<ChecksumQueue::Piece> pieces;
  std::vector<uint64_t> range_bytes;
  for (size_t r = 0; r < ranges.size(); ++r) {
    range_bytes.push_back(ranges[r].size());
    for (uint64_t offset = 0; offset < ranges[r].size();) {
      // Random sizes, cut at the blocks' boundaries.
      const uint64_t to_boundary = kBlock - offset % kBlock;
      const uint64_t n = std::min<uint64_t>({1 + rng() % 100000, ranges[r].size() - offset,
                                             to_boundary});
      pieces.push_back({r, offset, ranges[r].data() + offset, n, static_cast<int>(rng() % 3)});
      offset += n;
    }
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);
  absl::Notification landed[3];
  std::vector<ChecksumQueue::Wait> waits;
  for (auto& n : landed) {
    waits.push_back([&n] {
      n.WaitForNotification();
      return absl::OkStatus();
    });
  }
  ChecksumQueue queue(3);
  auto batch = queue.Submit(kBlock, range_bytes, pieces, waits);
  for (auto& n : landed) n.Notify();
  absl::StatusOr<std::vector<RangeChecksum>> crcs = batch->Wait();
  ASSERT_TRUE(crcs.ok()) << crcs.status();
  ASSERT_EQ(crcs->size(), ranges.size());
  for (size_t r = 0; r < ranges.size(); ++r) {
    const auto& bytes = ranges[r];
    EXPECT_EQ((*crcs)[r].crc, Crc32c(bytes.data(), bytes.size())) << "range " << r;
    ASSERT_EQ((*crcs)[r].blocks.size(), (bytes.size() + kBlock - 1) / kBlock) << "range " << r;
    for (size_t b = 0; b < (*crcs)[r].blocks.size(); ++b) {
      const size_t n = std::min<size_t>(kBlock, bytes.size() - b * kBlock);
      EXPECT_EQ((*crcs)[r].blocks[b], Crc32c(bytes.data() + b * kBlock, n))
          << "range " << r << " block " << b;
    }
  }
}

TEST(ChecksumQueueTest, AFailedWaitIsTheBatchsError) {
  std::mt19937_64 rng(TestSeed());
  auto bytes = RandomBytes(rng, 100000);
  ChecksumQueue queue(2);
  auto batch = queue.Submit(
      bytes.size(), {bytes.size()},
      {{0, 0, bytes.data(), 50000, 0}, {0, 50000, bytes.data() + 50000, 50000, 1}},
      {[] { return absl::OkStatus(); },
       [] { return absl::InternalError("cudaEventSynchronize(chunk landed): lost"); }});
  const absl::Status status = batch->Wait().status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("chunk landed"));
}

TEST(ChecksumQueueTest, PiecesThatDoNotTileTheirRangeAreAnError) {
  std::mt19937_64 rng(TestSeed());
  auto bytes = RandomBytes(rng, 1000);
  ChecksumQueue queue(1);
  // A gap at [400, 500).
  auto gap = queue.Submit(1000, {1000},
                          {{0, 0, bytes.data(), 400, -1}, {0, 500, bytes.data(), 500, -1}}, {});
  EXPECT_EQ(gap->Wait().status().code(), absl::StatusCode::kInternal);
  // Short of the range's end.
  auto short_batch = queue.Submit(1000, {1000}, {{0, 0, bytes.data(), 999, -1}}, {});
  EXPECT_EQ(short_batch->Wait().status().code(), absl::StatusCode::kInternal);
  // A wait index that does not exist.
  auto bad_wait = queue.Submit(1000, {1000}, {{0, 0, bytes.data(), 1000, 5}}, {});
  EXPECT_EQ(bad_wait->Wait().status().code(), absl::StatusCode::kInternal);
  // A piece across a block boundary (blocks of 256).
  auto across = queue.Submit(256, {1000}, {{0, 0, bytes.data(), 1000, -1}}, {});
  EXPECT_EQ(across->Wait().status().code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace tessera::cuda::internal
