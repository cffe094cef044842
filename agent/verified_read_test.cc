#include "agent/verified_read.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

struct Entry {
  std::vector<uint8_t> bytes;
  uint64_t block_bytes;
  std::vector<uint32_t> blocks;
};

Entry RandomEntry(std::mt19937_64& rng, uint64_t length, uint64_t block_bytes) {
  Entry e{std::vector<uint8_t>(length), block_bytes, {}};
  for (uint8_t& b : e.bytes) b = static_cast<uint8_t>(rng());
  for (uint64_t at = 0; at < length; at += block_bytes) {
    e.blocks.push_back(Crc32c(e.bytes.data() + at, std::min(block_bytes, length - at)));
  }
  return e;
}

absl::Status Read(const Entry& e, uint64_t offset, uint64_t length, std::vector<uint8_t>* out) {
  out->assign(length, 0);
  return CopyVerifiedRange(e.bytes.data(), e.bytes.size(), e.block_bytes, e.blocks, offset, length,
                           out->data());
}

uint64_t Seed() {
  const uint64_t seed = std::random_device{}();
  std::printf("seed=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

// Random ranges, edges and whole entries, with blocks smaller and larger than the copy's chunk,
// come back bit-exact.
TEST(CopyVerifiedRangeTest, RandomRangesAreBitExact) {
  const uint64_t seed = Seed();
  std::mt19937_64 rng(seed);
  for (const uint64_t block : {uint64_t{1000}, uint64_t{3} << 20}) {
    const Entry e = RandomEntry(rng, 3 * block + block / 3, block);
    std::vector<std::pair<uint64_t, uint64_t>> ranges = {
        {0, e.bytes.size()}, {0, 1}, {e.bytes.size() - 1, 1}, {block - 1, 2}, {block, block},
        {e.bytes.size(), 0}, {5, 0}};
    for (int i = 0; i < 40; ++i) {
      const uint64_t offset = rng() % e.bytes.size();
      ranges.push_back({offset, rng() % (e.bytes.size() - offset + 1)});
    }
    for (const auto& [offset, length] : ranges) {
      SCOPED_TRACE(
          absl::StrCat("seed ", seed, " block ", block, " range [", offset, ", +", length, ")"));
      std::vector<uint8_t> out;
      ASSERT_TRUE(Read(e, offset, length, &out).ok());
      EXPECT_TRUE(std::equal(out.begin(), out.end(), e.bytes.begin() + offset));
    }
  }
}

// A changed byte fails exactly the ranges that overlap its block, naming the block; the others
// still read.
TEST(CopyVerifiedRangeTest, AChangedByteFailsOnlyTheRangesOverItsBlock) {
  const uint64_t seed = Seed();
  std::mt19937_64 rng(seed);
  const uint64_t block = 4096;
  Entry e = RandomEntry(rng, 5 * block + 17, block);
  const uint64_t bad = 2 * block + rng() % block;
  e.bytes[bad] ^= 0x20;
  for (int i = 0; i < 200; ++i) {
    const uint64_t offset = rng() % e.bytes.size();
    const uint64_t length = 1 + rng() % std::min<uint64_t>(2 * block, e.bytes.size() - offset);
    SCOPED_TRACE(absl::StrCat("seed ", seed, " range [", offset, ", +", length, ")"));
    std::vector<uint8_t> out;
    const absl::Status status = Read(e, offset, length, &out);
    const bool overlaps = offset < 3 * block && offset + length > 2 * block;
    if (overlaps) {
      EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
      EXPECT_TRUE(absl::StrContains(status.message(), "block 2 (bytes [8192, 12288)")) << status;
    } else {
      EXPECT_TRUE(status.ok()) << status;
      EXPECT_TRUE(std::equal(out.begin(), out.end(), e.bytes.begin() + offset));
    }
  }
}

ShardManifest GoodManifest() {
  ShardManifest m;
  m.set_job_id("job");
  m.set_rank(1);
  m.set_world_size(2);
  m.set_step(7);
  ManifestEntry* tensor = m.add_entries();
  tensor->mutable_spec()->set_name("w");
  tensor->mutable_spec()->set_dtype("float32");
  tensor->mutable_spec()->add_shape(4);
  tensor->mutable_spec()->set_nbytes(16);
  tensor->mutable_spec()->set_kind(ENTRY_KIND_TENSOR);
  tensor->mutable_spec()->mutable_slice()->set_offset(8);
  tensor->mutable_spec()->mutable_slice()->set_length(8);
  tensor->set_length(8);
  ManifestEntry* blob = m.add_entries();
  blob->mutable_spec()->set_name("b");
  blob->mutable_spec()->set_dtype("bytes");
  blob->mutable_spec()->set_nbytes(100);
  blob->mutable_spec()->set_kind(ENTRY_KIND_BLOB);
  blob->set_length(30);
  return m;
}

TEST(CheckReadableManifestTest, NamesWhatIsWrong) {
  EXPECT_TRUE(CheckReadableManifest(GoodManifest(), "job", 1, 7).ok());
  struct Case {
    const char* expected;
    std::function<void(ShardManifest*)> change;
  };
  const std::vector<Case> cases = {
      {"is of job 'job' rank 1 step 8, not of job 'job' rank 1 step 7",
       [](ShardManifest* m) { m->set_step(8); }},
      {"is of job 'job' rank 0 step 7, not of job 'job' rank 1",
       [](ShardManifest* m) { m->set_rank(0); }},
      {"world_size 1 does not hold rank 1", [](ShardManifest* m) { m->set_world_size(1); }},
      {"DP rank 2 is not below its DP size 2",
       [](ShardManifest* m) {
         m->mutable_data_parallel()->set_dp_rank(2);
         m->mutable_data_parallel()->set_dp_size(2);
       }},
      {"manifest entry 1 has a name of 0 bytes",
       [](ShardManifest* m) { m->mutable_entries(1)->mutable_spec()->set_name(""); }},
      {"without control characters",
       [](ShardManifest* m) { m->mutable_entries(1)->mutable_spec()->set_name("a\nb"); }},
      {"manifest entry 1 ('w'): the name is in the manifest twice",
       [](ShardManifest* m) { m->mutable_entries(1)->mutable_spec()->set_name("w"); }},
      {"its dtype is not",
       [](ShardManifest* m) { m->mutable_entries(0)->mutable_spec()->set_dtype(""); }},
      {"kind 0 is neither",
       [](ShardManifest* m) {
         m->mutable_entries(1)->mutable_spec()->set_kind(ENTRY_KIND_UNSPECIFIED);
       }},
      {"slice [8, +9) is not a part of a tensor of 16 bytes",
       [](ShardManifest* m) {
         m->mutable_entries(0)->mutable_spec()->mutable_slice()->set_length(9);
       }},
      {"slice [18446744073709551615, +2)",
       [](ShardManifest* m) {
         m->mutable_entries(0)->mutable_spec()->mutable_slice()->set_offset(~uint64_t{0});
         m->mutable_entries(0)->mutable_spec()->mutable_slice()->set_length(2);
       }},
      {"length 7, but the shard stores exactly 8",
       [](ShardManifest* m) { m->mutable_entries(0)->set_length(7); }},
      {"length 101, but the shard stores at most 100",
       [](ShardManifest* m) { m->mutable_entries(1)->set_length(101); }},
  };
  for (const Case& c : cases) {
    ShardManifest m = GoodManifest();
    c.change(&m);
    const absl::Status status = CheckReadableManifest(m, "job", 1, 7);
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << c.expected;
    EXPECT_TRUE(absl::StrContains(status.message(), c.expected)) << status;
  }
}

}  // namespace
}  // namespace tessera
