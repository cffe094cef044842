#include "common/dp_slices.h"

#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tessera {
namespace {

EntrySpec Tensor(const std::string& name, uint64_t nbytes) {
  EntrySpec e;
  e.set_name(name);
  e.set_dtype("uint8");
  e.add_shape(static_cast<int64_t>(nbytes));
  e.set_nbytes(nbytes);
  e.set_kind(ENTRY_KIND_TENSOR);
  return e;
}

TEST(DpSlicingTest, RandomLayoutsAreCoveredOnceAndBalanced) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t n = 1 + rng() % 40;
    std::vector<EntrySpec> entries;
    std::vector<bool> replicated;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t bytes = rng() % 4 == 0 ? rng() % 16 : rng() % 100000;
      entries.push_back(Tensor("t" + std::to_string(i), bytes));
      replicated.push_back(rng() % 3 != 0);
    }
    const uint32_t dp = 1 + rng() % 9;
    auto slicing = DpSlicing::Create(entries, replicated, dp);
    ASSERT_TRUE(slicing.ok()) << slicing.status();
    // Every byte of every replicated tensor belongs to exactly one member.
    std::vector<std::vector<int>> owner(n);
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      owner[i].assign(entries[i].nbytes(), -1);
      if (replicated[i]) total += entries[i].nbytes();
    }
    ASSERT_EQ(slicing->replicated_bytes(), total);
    for (uint32_t r = 0; r < dp; ++r) {
      uint64_t stored = 0;
      for (const DpPiece& p : slicing->pieces(r)) {
        ASSERT_TRUE(replicated[p.entry]);
        ASSERT_LE(p.offset + p.length, entries[p.entry].nbytes());
        for (uint64_t b = p.offset; b < p.offset + p.length; ++b) {
          ASSERT_EQ(owner[p.entry][b], -1) << "entry " << p.entry << " byte " << b << " twice";
          owner[p.entry][b] = static_cast<int>(r);
        }
        stored += p.length;
        auto slice = slicing->slice(r, p.entry);
        ASSERT_TRUE(slice.has_value());
        EXPECT_EQ(slice->offset(), p.offset);
        EXPECT_EQ(slice->length(), p.length);
      }
      const auto [begin, end] = slicing->range(r);
      EXPECT_EQ(stored, end - begin);
      // Balanced: within one alignment unit of an even share.
      EXPECT_LE(end - begin, total / dp + 2 * DpSlicing::kAlignment) << "dp " << dp;
      if (r > 0) EXPECT_EQ(begin % DpSlicing::kAlignment, 0u);
    }
    for (size_t i = 0; i < n; ++i) {
      for (uint64_t b = 0; b < entries[i].nbytes(); ++b) {
        ASSERT_EQ(owner[i][b] >= 0, replicated[i]) << "entry " << i << " byte " << b;
      }
      if (!replicated[i]) EXPECT_FALSE(slicing->slice(0, i).has_value());
    }
  }
}

TEST(DpSlicingTest, StoredBytesFollowsTheSlice) {
  EntrySpec e = Tensor("w", 1000);
  EXPECT_EQ(StoredBytes(e), 1000u);
  e.mutable_slice()->set_offset(256);
  e.mutable_slice()->set_length(300);
  EXPECT_EQ(StoredBytes(e), 300u);
  e.mutable_slice()->set_length(0);
  EXPECT_EQ(StoredBytes(e), 0u);
}

TEST(DpSlicingTest, RejectsBlobsBadSizesAndMismatchedFlags) {
  EntrySpec blob = Tensor("rng", 64);
  blob.set_kind(ENTRY_KIND_BLOB);
  auto s = DpSlicing::Create({Tensor("w", 10), blob}, {true, true}, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("'rng') is a blob"), std::string::npos) << s.status();
  s = DpSlicing::Create({Tensor("w", 10)}, {true}, 0);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("must be 1..65536"), std::string::npos) << s.status();
  s = DpSlicing::Create({Tensor("w", 10)}, {true, false}, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("2 entries, but 1"), std::string::npos) << s.status();
}

TEST(DpSlicingTest, StableFingerprintIsFnv1a) {
  // Known FNV-1a 64 values: the fingerprint must not depend on the process.
  EXPECT_EQ(StableFingerprint(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(StableFingerprint("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(MembersFingerprint({0}), StableFingerprint(std::string(4, '\0')));
}

TEST(DpSlicingTest, FingerprintDependsOnOrder) {
  EXPECT_NE(MembersFingerprint({0, 1, 2}), MembersFingerprint({0, 2, 1}));
  EXPECT_EQ(MembersFingerprint({4, 5}), MembersFingerprint({4, 5}));
}

}  // namespace
}  // namespace tessera
