#include "daemon/coordination/shard_rebuild.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "ec/erasure_codec.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  const uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("TESSERA_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

// A shard of random bytes encoded RS(k, m); fragment i is "held" by member "n<i>".
struct Encoded {
  std::vector<uint8_t> shard;
  std::vector<std::vector<uint8_t>> fragments;
  uint32_t crc = 0;
};

Encoded Encode(std::mt19937_64& rng, int k, int m, size_t shard_bytes) {
  Encoded e;
  e.shard.resize(shard_bytes);
  for (auto& b : e.shard) b = static_cast<uint8_t>(rng());
  e.crc = Crc32c(e.shard.data(), e.shard.size());
  auto codec = ErasureCodec::Create(k, m);
  EXPECT_TRUE(codec.ok());
  const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
  e.fragments.assign(k + m, std::vector<uint8_t>(fragment_bytes));
  std::vector<uint8_t*> data, parity;
  for (int i = 0; i < k; ++i) data.push_back(e.fragments[i].data());
  for (int j = 0; j < m; ++j) parity.push_back(e.fragments[k + j].data());
  EXPECT_TRUE(codec->SplitShard(e.shard.data(), shard_bytes, data.data(), fragment_bytes).ok());
  if (m > 0) EXPECT_TRUE(codec->Encode(data.data(), parity.data(), fragment_bytes).ok());
  return e;
}

RestorePlan Plan(int k, int m, const Encoded& e, std::vector<uint32_t> indexes) {
  RestorePlan plan;
  plan.source = RestorePlan::Source::kRebuild;
  plan.k = k;
  plan.m = m;
  plan.shard_bytes = e.shard.size();
  plan.shard_crc32c = e.crc;
  for (uint32_t i : indexes) plan.fragments.emplace_back(i, absl::StrCat("n", i));
  return plan;
}

// A reader for calls that must be refused before anything is read.
FragmentReader NeverRead() {
  return [](uint32_t index, const std::string&, uint8_t*, size_t) -> absl::StatusOr<uint32_t> {
    ADD_FAILURE() << "fragment " << index << " read for a call that should have been refused";
    return 0u;
  };
}

TEST(ShardRebuildTest, AnyKFragmentsDecodeBitExact) {
  std::mt19937_64 rng(TestSeed());
  for (int round = 0; round < 60; ++round) {
    const int k = 1 + static_cast<int>(rng() % 6), m = static_cast<int>(rng() % 4);
    const size_t bytes = rng() % 3 == 0 ? rng() % 100 : 1 + rng() % 300000;  // tiny and odd
    Encoded e = Encode(rng, k, m, bytes);
    std::vector<uint32_t> all(k + m);
    for (int i = 0; i < k + m; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(k);
    std::atomic<int> reads{0};
    FragmentReader read = [&](uint32_t index, const std::string& node, uint8_t* dst,
                              size_t n) -> absl::StatusOr<uint32_t> {
      EXPECT_EQ(node, absl::StrCat("n", index));
      EXPECT_EQ(n, e.fragments[index].size());
      std::memcpy(dst, e.fragments[index].data(), n);
      ++reads;
      return Crc32c(dst, n);
    };
    std::vector<uint8_t> out(std::max<size_t>(bytes, 1), 0xA5);
    auto decoded = DecodeShard(Plan(k, m, e, all), read, out.data());
    ASSERT_TRUE(decoded.ok()) << decoded.status() << " round " << round;
    EXPECT_TRUE(decoded->failed.empty());
    EXPECT_EQ(reads.load(), k);
    EXPECT_EQ(decoded->used.size(), static_cast<size_t>(k));
    EXPECT_EQ(decoded->crc32c, e.crc) << "RS(" << k << ", " << m << ") " << bytes << " bytes";
    EXPECT_EQ(std::memcmp(out.data(), e.shard.data(), bytes), 0) << "round " << round;
  }
}

// The shard's CRC32C is combined from the CRC32Cs the reader returns for whole data fragments,
// not read again: a reader that vouches for other bytes than it wrote shows in the result (which
// the caller then compares with the shard's sealed CRC32C).
TEST(ShardRebuildTest, ShardCrcIsCombinedFromTheFragmentsReadWhole) {
  std::mt19937_64 rng(TestSeed());
  Encoded e = Encode(rng, 3, 2, 300001);
  for (uint32_t liar : {0u, 1u, 2u}) {
    FragmentReader read = [&](uint32_t index, const std::string&, uint8_t* dst,
                              size_t n) -> absl::StatusOr<uint32_t> {
      std::memcpy(dst, e.fragments[index].data(), n);
      return Crc32c(dst, n) ^ (index == liar ? 1u : 0u);
    };
    std::vector<uint8_t> out(e.shard.size());
    auto decoded = DecodeShard(Plan(3, 2, e, {0, 1, 2}), read, out.data());
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(out, e.shard);
    // Fragment 2 is cut by the end of the shard, so its bytes are checksummed, not its CRC.
    if (liar < 2) {
      EXPECT_NE(decoded->crc32c, e.crc) << "fragment " << liar << "'s CRC32C was not used";
    } else {
      EXPECT_EQ(decoded->crc32c, e.crc);
    }
  }
}

TEST(ShardRebuildTest, AFailedReadIsReportedAndNothingIsDecoded) {
  std::mt19937_64 rng(TestSeed());
  Encoded e = Encode(rng, 3, 2, 123457);
  const uint32_t bad = static_cast<uint32_t>(rng() % 3);
  FragmentReader read = [&](uint32_t index, const std::string&, uint8_t* dst,
                            size_t n) -> absl::StatusOr<uint32_t> {
    if (index == bad) return absl::DataLossError("chunk CRC32C mismatch");
    std::memcpy(dst, e.fragments[index].data(), n);
    return Crc32c(dst, n);
  };
  std::vector<uint8_t> out(e.shard.size());
  auto decoded = DecodeShard(Plan(3, 2, e, {0, 1, 2}), read, out.data());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->failed.size(), 1u);
  EXPECT_EQ(decoded->failed[0].index, bad);
  EXPECT_EQ(decoded->failed[0].node, absl::StrCat("n", bad));
  EXPECT_EQ(decoded->failed[0].status.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(decoded->used.size(), 2u);  // the others were read, in parallel
  EXPECT_EQ(decoded->crc32c, 0u);

  // Planned around it: the parity fragments stand in, bit-exact.
  std::vector<uint32_t> others = {3, 4};
  for (uint32_t i = 0; i < 3; ++i) {
    if (i != bad) others.push_back(i);
  }
  others.resize(3);
  decoded = DecodeShard(Plan(3, 2, e, others), read, out.data());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(decoded->failed.empty());
  EXPECT_EQ(decoded->crc32c, e.crc);
  EXPECT_EQ(out, e.shard);
}

TEST(ShardRebuildTest, EveryFailedReadIsReported) {
  std::mt19937_64 rng(TestSeed());
  Encoded e = Encode(rng, 4, 2, 77777);
  FragmentReader read = [&](uint32_t index, const std::string&, uint8_t* dst,
                            size_t n) -> absl::StatusOr<uint32_t> {
    if (index == 1) return absl::UnavailableError("not live");
    if (index == 3) return absl::DataLossError("fragment CRC32C mismatch");
    std::memcpy(dst, e.fragments[index].data(), n);
    return Crc32c(dst, n);
  };
  std::vector<uint8_t> out(e.shard.size());
  auto decoded = DecodeShard(Plan(4, 2, e, {0, 1, 2, 3}), read, out.data());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_EQ(decoded->failed.size(), 2u);
  EXPECT_EQ(decoded->failed[0].index, 1u);
  EXPECT_EQ(decoded->failed[0].status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(decoded->failed[1].index, 3u);
  EXPECT_EQ(decoded->failed[1].status.code(), absl::StatusCode::kDataLoss);
  decoded = DecodeShard(Plan(4, 2, e, {0, 2, 4, 5}), read, out.data());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->crc32c, e.crc);
  EXPECT_EQ(out, e.shard);
}

TEST(ShardRebuildTest, PaddedDestinationAndThreadedRebuildDecodeBitExact) {
  std::mt19937_64 rng(TestSeed());
  for (int round = 0; round < 8; ++round) {
    const int k = 2 + static_cast<int>(rng() % 4), m = 1 + static_cast<int>(rng() % 3);
    // Large enough that the rebuild and the CRC32C are cut across threads; odd-sized.
    const size_t bytes = (size_t{9} << 20) + rng() % 100000;
    Encoded e = Encode(rng, k, m, bytes);
    std::vector<uint32_t> some(k + m);
    for (int i = 0; i < k + m; ++i) some[i] = i;
    std::shuffle(some.begin(), some.end(), rng);
    some.resize(k);
    FragmentReader read = [&](uint32_t index, const std::string&, uint8_t* dst,
                              size_t n) -> absl::StatusOr<uint32_t> {
      std::memcpy(dst, e.fragments[index].data(), n);
      return Crc32c(dst, n);
    };
    // Room for every data fragment in place (padding included), or just the shard.
    const size_t padded = k * e.fragments[0].size();
    const bool in_place = round % 2 == 0;
    std::vector<uint8_t> out(in_place ? padded : bytes);
    for (auto& b : out) b = static_cast<uint8_t>(rng());
    DecodeOptions options;
    options.shard_capacity = out.size();
    options.threads = 1 + static_cast<int>(rng() % 4);
    auto decoded = DecodeShard(Plan(k, m, e, some), read, out.data(), options);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->crc32c, e.crc) << "round " << round;
    EXPECT_EQ(std::memcmp(out.data(), e.shard.data(), bytes), 0)
        << "RS(" << k << ", " << m << ") round " << round << " threads " << options.threads;
  }
}

TEST(ShardRebuildTest, ADestinationSmallerThanTheShardIsRefused) {
  std::mt19937_64 rng(TestSeed());
  Encoded e = Encode(rng, 3, 2, 5000);
  const FragmentReader never = NeverRead();
  std::vector<uint8_t> out(4999);
  DecodeOptions options;
  options.shard_capacity = out.size();
  EXPECT_EQ(DecodeShard(Plan(3, 2, e, {0, 1, 2}), never, out.data(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ShardRebuildTest, BadPlansAreRefused) {
  std::mt19937_64 rng(TestSeed());
  Encoded e = Encode(rng, 2, 1, 1000);
  const FragmentReader never = NeverRead();
  std::vector<uint8_t> out(1000);
  RestorePlan copy = Plan(2, 1, e, {0, 1});
  copy.source = RestorePlan::Source::kCopy;
  EXPECT_EQ(DecodeShard(copy, never, out.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeShard(Plan(2, 1, e, {0}), never, out.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto twice = DecodeShard(
      Plan(2, 1, e, {1, 1}),
      [&](uint32_t i, const std::string&, uint8_t* d, size_t n) -> absl::StatusOr<uint32_t> {
        std::memcpy(d, e.fragments[i].data(), n);
        return Crc32c(d, n);
      },
      out.data());
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeShard(Plan(2, 1, e, {0, 7}), never, out.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tessera
