#include "ec/erasure_codec.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

struct Shape {
  int k;
  int m;
};

const std::vector<Shape>& Shapes() {
  static const auto* shapes = new std::vector<Shape>{{1, 0}, {1, 1}, {2, 1},  {3, 2}, {4, 2},
                                                     {6, 3}, {8, 4}, {10, 4}, {12, 4}};
  return *shapes;
}

const std::vector<size_t>& UnalignedLengths() {
  static const auto* lengths = new std::vector<size_t>{1, 63, 64, 65, 4095, 100003};
  return *lengths;
}

std::string SeedName(uint64_t seed) { return absl::StrCat("seed=0x", absl::Hex(seed)); }

std::string ShapeName(const Shape& shape) {
  return absl::StrCat("RS(", shape.k, ",", shape.m, ")");
}

// Plain byte-at-a-time GF(2^8) arithmetic with the polynomial x^8+x^4+x^3+x^2+1 (0x11D), written
// independently of ISA-L so that its tables can be checked against it.
class Gf256 {
 public:
  Gf256() {
    for (int a = 0; a < 256; ++a) {
      for (int b = 0; b < 256; ++b) product_[a][b] = SlowMul(a, b);
    }
    for (int a = 1; a < 256; ++a) {
      for (int b = 1; b < 256; ++b) {
        if (product_[a][b] == 1) inverse_[a] = b;
      }
    }
  }

  uint8_t Mul(uint8_t a, uint8_t b) const { return product_[a][b]; }
  uint8_t Inv(uint8_t a) const { return inverse_[a]; }

 private:
  static uint8_t SlowMul(uint8_t a, uint8_t b) {
    uint8_t product = 0;
    while (b != 0) {
      if (b & 1) product ^= a;
      b >>= 1;
      a = (a & 0x80) ? static_cast<uint8_t>((a << 1) ^ 0x1D) : static_cast<uint8_t>(a << 1);
    }
    return product;
  }

  uint8_t product_[256][256];
  uint8_t inverse_[256] = {0};
};

const Gf256& Field() {
  static const auto* field = new Gf256();
  return *field;
}

// Parity row i (fragment k+i) of the Cauchy matrix: a[k+i][j] = 1 / ((k+i) xor j).
std::vector<std::vector<uint8_t>> ReferenceParity(int k, int m, const uint8_t* const* data,
                                                  size_t length) {
  const Gf256& gf = Field();
  std::vector<std::vector<uint8_t>> parity(m, std::vector<uint8_t>(length, 0));
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < k; ++j) {
      const uint8_t coefficient = gf.Inv(static_cast<uint8_t>((k + i) ^ j));
      for (size_t x = 0; x < length; ++x) parity[i][x] ^= gf.Mul(coefficient, data[j][x]);
    }
  }
  return parity;
}

void FillRandom(uint8_t* out, size_t length, std::mt19937_64& rng) {
  size_t x = 0;
  for (; x + 8 <= length; x += 8) {
    const uint64_t word = rng();
    std::memcpy(out + x, &word, 8);
  }
  for (; x < length; ++x) out[x] = static_cast<uint8_t>(rng());
}

// `count` fragments of `length` bytes, each starting `offset` bytes past a 64-byte boundary, with
// 64 guard bytes on either side. Everything, guards included, starts out random.
class Fragments {
 public:
  static constexpr size_t kGuardBytes = 64;

  Fragments(int count, size_t length, std::mt19937_64& rng, bool unaligned) : length_(length) {
    std::uniform_int_distribution<size_t> offset(1, 63);
    for (int i = 0; i < count; ++i) {
      const size_t start = kGuardBytes + (unaligned ? offset(rng) : 0);
      storage_.emplace_back(start + length + kGuardBytes + 64);
      std::vector<uint8_t>& buffer = storage_.back();
      FillRandom(buffer.data(), buffer.size(), rng);
      const size_t misalignment = reinterpret_cast<uintptr_t>(buffer.data()) % 64;
      const size_t base = misalignment == 0 ? 0 : 64 - misalignment;
      begin_.push_back(base + start);
      pointers_.push_back(buffer.data() + base + start);
    }
  }

  Fragments(const Fragments& other) : length_(other.length_), storage_(other.storage_) {
    begin_ = other.begin_;
    for (size_t i = 0; i < storage_.size(); ++i) {
      pointers_.push_back(storage_[i].data() + begin_[i]);
    }
  }
  Fragments& operator=(const Fragments&) = delete;

  uint8_t* const* pointers() { return pointers_.data(); }
  uint8_t* operator[](int i) { return pointers_[i]; }
  size_t length() const { return length_; }

  void Scramble(int i, std::mt19937_64& rng) { FillRandom(pointers_[i], length_, rng); }

  // Whole buffers, guards included, are equal.
  bool SameBytes(const Fragments& other, int i) const { return storage_[i] == other.storage_[i]; }

  // Index of the first fragment whose buffer differs from `other`, or -1.
  int FirstDifference(const Fragments& other) const {
    for (size_t i = 0; i < storage_.size(); ++i) {
      if (!SameBytes(other, static_cast<int>(i))) return static_cast<int>(i);
    }
    return -1;
  }

 private:
  size_t length_;
  std::vector<std::vector<uint8_t>> storage_;
  std::vector<size_t> begin_;
  std::vector<uint8_t*> pointers_;
};

// k random data fragments followed by m parity fragments encoded by `codec`.
Fragments EncodedFragments(const ErasureCodec& codec, size_t length, std::mt19937_64& rng,
                           bool unaligned) {
  Fragments fragments(codec.total_fragments(), length, rng, unaligned);
  EXPECT_TRUE(codec.Encode(fragments.pointers(), fragments.pointers() + codec.k(), length).ok());
  return fragments;
}

ErasureCodec MustCreate(int k, int m) {
  absl::StatusOr<ErasureCodec> codec = ErasureCodec::Create(k, m);
  EXPECT_TRUE(codec.ok()) << codec.status();
  return *std::move(codec);
}

std::vector<int> PatternIndices(uint64_t mask, int n) {
  std::vector<int> indices;
  for (int i = 0; i < n; ++i) {
    if (mask & (uint64_t{1} << i)) indices.push_back(i);
  }
  return indices;
}

std::vector<int> RandomPattern(int n, int count, std::mt19937_64& rng) {
  std::vector<int> all(n);
  for (int i = 0; i < n; ++i) all[i] = i;
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(count);
  return all;
}

// Scrambles the erased fragments of a copy of `golden`, reconstructs them and checks every
// buffer, guards included, against `golden`.
void ExpectReconstructs(const ErasureCodec& codec, const Fragments& golden,
                        const std::vector<int>& erased, std::mt19937_64& rng) {
  SCOPED_TRACE(absl::StrCat("erased={", absl::StrJoin(erased, ","), "}"));
  Fragments work(golden);
  for (int i : erased) work.Scramble(i, rng);
  absl::Status status = codec.Reconstruct(erased, work.pointers(), work.length());
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(work.FirstDifference(golden), -1);
}

TEST(ErasureCodecTest, CreateRejectsBadShapesNamingTheValue) {
  struct Case {
    int k;
    int m;
    std::string named;
    std::string valid;
  };
  const std::vector<Case> cases = {
      {0, 1, "k=0 is invalid", "[1, 64]"},   {-3, 1, "k=-3 is invalid", "[1, 64]"},
      {65, 2, "k=65 is invalid", "[1, 64]"}, {4, -1, "m=-1 is invalid", "[0, 32]"},
      {4, 33, "m=33 is invalid", "[0, 32]"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ErasureCodec> codec = ErasureCodec::Create(c.k, c.m);
    ASSERT_FALSE(codec.ok()) << "k=" << c.k << " m=" << c.m;
    EXPECT_EQ(codec.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(codec.status().message()), HasSubstr(c.named));
    EXPECT_THAT(std::string(codec.status().message()), HasSubstr(c.valid));
  }
  for (const Shape& shape : std::vector<Shape>{{1, 0}, {64, 32}, {64, 0}, {1, 32}}) {
    absl::StatusOr<ErasureCodec> codec = ErasureCodec::Create(shape.k, shape.m);
    ASSERT_TRUE(codec.ok()) << ShapeName(shape) << ": " << codec.status();
    EXPECT_EQ(codec->k(), shape.k);
    EXPECT_EQ(codec->m(), shape.m);
    EXPECT_EQ(codec->total_fragments(), shape.k + shape.m);
  }
}

TEST(ErasureCodecTest, FragmentBytesSplitsEvenlyAndPadsTo64) {
  EXPECT_EQ(ErasureCodec::FragmentBytes(0, 1), 64u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(0, 8), 64u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(1, 1), 64u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(64, 1), 64u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(65, 1), 128u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(192, 3), 64u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(193, 3), 128u);
  EXPECT_EQ(ErasureCodec::FragmentBytes(100003, 4), 25024u);  // ceil = 25001
  EXPECT_EQ(ErasureCodec::FragmentBytes(size_t{256} << 20, 3), 89478528u);  // ceil = 89478486
  for (size_t shard_bytes : {size_t{0}, size_t{1}, size_t{4095}, size_t{100003}, size_t{1} << 26}) {
    for (int k : {1, 2, 3, 7, 12, 64}) {
      const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
      EXPECT_EQ(fragment_bytes % 64, 0u);
      EXPECT_GE(fragment_bytes * k, shard_bytes);
      EXPECT_LT(fragment_bytes * k, shard_bytes + 64 * k + 64 * (shard_bytes == 0 ? k : 0));
    }
  }
}

TEST(ErasureCodecTest, SplitShardThenJoinShardRoundTrips) {
  constexpr uint64_t kSeed = 0x5eed0001;
  std::mt19937_64 rng(kSeed);
  for (int k : {1, 3, 4, 8}) {
    const ErasureCodec codec = MustCreate(k, 2);
    for (size_t shard_bytes :
         {size_t{0}, size_t{1}, size_t{63}, size_t{65}, size_t{4095}, size_t{100003}}) {
      SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " k=", k, " shard_bytes=", shard_bytes));
      std::vector<uint8_t> shard(shard_bytes);
      FillRandom(shard.data(), shard.size(), rng);
      const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
      Fragments data(k, fragment_bytes, rng, /*unaligned=*/true);
      ASSERT_TRUE(
          codec.SplitShard(shard.data(), shard_bytes, data.pointers(), fragment_bytes).ok());

      std::vector<uint8_t> concatenated;
      for (int i = 0; i < k; ++i) {
        concatenated.insert(concatenated.end(), data[i], data[i] + fragment_bytes);
      }
      EXPECT_TRUE(std::equal(shard.begin(), shard.end(), concatenated.begin()));
      EXPECT_TRUE(std::all_of(concatenated.begin() + shard_bytes, concatenated.end(),
                              [](uint8_t b) { return b == 0; }));

      std::vector<uint8_t> joined(shard_bytes + 1, 0xA5);
      ASSERT_TRUE(
          codec.JoinShard(data.pointers(), fragment_bytes, joined.data(), shard_bytes).ok());
      EXPECT_TRUE(std::equal(shard.begin(), shard.end(), joined.begin()));
      EXPECT_EQ(joined[shard_bytes], 0xA5) << "JoinShard wrote past shard_bytes";
    }
  }
}

TEST(ErasureCodecTest, SplitAndJoinRejectShardsThatDoNotFit) {
  const ErasureCodec codec = MustCreate(3, 1);
  constexpr uint64_t kSeed = 0x5eed0002;
  SCOPED_TRACE(SeedName(kSeed));
  std::mt19937_64 rng(kSeed);
  Fragments data(3, 64, rng, /*unaligned=*/false);
  std::vector<uint8_t> shard(193);
  absl::Status split = codec.SplitShard(shard.data(), 193, data.pointers(), 64);
  EXPECT_EQ(split.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(split.message()), HasSubstr("193-byte shard"));
  EXPECT_EQ(codec.JoinShard(data.pointers(), 64, shard.data(), 193).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(codec.SplitShard(nullptr, 10, data.pointers(), 64).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ErasureCodecTest, FragmentsInPlaceZeroesPaddingOnly) {
  constexpr uint64_t kSeed = 0x5eed0003;
  std::mt19937_64 rng(kSeed);
  const ErasureCodec codec = MustCreate(4, 2);
  for (size_t shard_bytes : {size_t{0}, size_t{1}, size_t{255}, size_t{100003}}) {
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " shard_bytes=", shard_bytes));
    const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, 4);
    std::vector<uint8_t> buffer(4 * fragment_bytes + 100);
    FillRandom(buffer.data(), buffer.size(), rng);
    const std::vector<uint8_t> before = buffer;

    absl::StatusOr<std::vector<uint8_t*>> views =
        codec.FragmentsInPlace(buffer.data(), shard_bytes, buffer.size());
    ASSERT_TRUE(views.ok()) << views.status();
    ASSERT_EQ(views->size(), 4u);
    for (int i = 0; i < 4; ++i) EXPECT_EQ((*views)[i], buffer.data() + i * fragment_bytes);
    EXPECT_TRUE(std::equal(before.begin(), before.begin() + shard_bytes, buffer.begin()));
    EXPECT_TRUE(std::all_of(buffer.begin() + shard_bytes, buffer.begin() + 4 * fragment_bytes,
                            [](uint8_t b) { return b == 0; }));
    EXPECT_TRUE(std::equal(before.begin() + 4 * fragment_bytes, before.end(),
                           buffer.begin() + 4 * fragment_bytes));

    absl::StatusOr<std::vector<uint8_t*>> too_small =
        codec.FragmentsInPlace(buffer.data(), shard_bytes, 4 * fragment_bytes - 1);
    EXPECT_EQ(too_small.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ErasureCodecTest, EncodeMatchesPlainGf256ReferenceBitExact) {
  constexpr uint64_t kSeed = 0x5eed0004;
  std::mt19937_64 rng(kSeed);
  for (const Shape& shape : Shapes()) {
    const ErasureCodec codec = MustCreate(shape.k, shape.m);
    for (size_t length : UnalignedLengths()) {
      for (bool unaligned : {false, true}) {
        SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " ", ShapeName(shape), " length=", length,
                                  " unaligned=", unaligned));
        Fragments fragments(codec.total_fragments(), length, rng, unaligned);
        // Expected: the same buffers, guards included, with the reference parity in place.
        Fragments expected(fragments);
        const std::vector<std::vector<uint8_t>> parity =
            ReferenceParity(shape.k, shape.m, fragments.pointers(), length);
        for (int i = 0; i < shape.m; ++i) {
          std::memcpy(expected[shape.k + i], parity[i].data(), length);
        }
        ASSERT_TRUE(
            codec.Encode(fragments.pointers(), fragments.pointers() + shape.k, length).ok());
        EXPECT_EQ(fragments.FirstDifference(expected), -1);
      }
    }
  }
}

TEST(ErasureCodecTest, EncodeRangeOnChunksEqualsWholeEncode) {
  constexpr uint64_t kSeed = 0x5eed0005;
  std::mt19937_64 rng(kSeed);
  constexpr size_t kLength = 100003;
  for (const Shape& shape : Shapes()) {
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " ", ShapeName(shape)));
    const ErasureCodec codec = MustCreate(shape.k, shape.m);
    const Fragments whole = EncodedFragments(codec, kLength, rng, /*unaligned=*/true);

    // Random chunk boundaries, processed in shuffled order.
    std::vector<std::pair<size_t, size_t>> chunks;
    std::uniform_int_distribution<size_t> chunk_bytes(1, 9000);
    for (size_t offset = 0; offset < kLength;) {
      const size_t length = std::min(chunk_bytes(rng), kLength - offset);
      chunks.emplace_back(offset, length);
      offset += length;
    }
    std::shuffle(chunks.begin(), chunks.end(), rng);

    Fragments chunked(whole);
    for (int i = shape.k; i < codec.total_fragments(); ++i) chunked.Scramble(i, rng);
    for (const auto& [offset, length] : chunks) {
      ASSERT_TRUE(
          codec.EncodeRange(chunked.pointers(), chunked.pointers() + shape.k, offset, length).ok());
    }
    EXPECT_EQ(chunked.FirstDifference(whole), -1);
  }
}

TEST(ErasureCodecTest, OnThreadsEqualsOneThread) {
  constexpr uint64_t kSeed = 0x5eed0012;
  std::mt19937_64 rng(kSeed);
  // Long enough to be cut into several ranges; odd, so the last range is short.
  const size_t length = (size_t{13} << 20) + 4097;
  for (int threads = 1; threads <= 4; ++threads) {
    const ErasureCodec codec = MustCreate(3, 2);
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " threads=", threads));
    const Fragments whole = EncodedFragments(codec, length, rng, /*unaligned=*/true);
    Fragments threaded(whole);
    for (int i = 3; i < 5; ++i) threaded.Scramble(i, rng);
    ASSERT_TRUE(
        codec.EncodeOnThreads(threaded.pointers(), threaded.pointers() + 3, length, threads).ok());
    EXPECT_EQ(threaded.FirstDifference(whole), -1);
    const std::vector<int> erased = {static_cast<int>(rng() % 3), 3 + static_cast<int>(rng() % 2)};
    for (int i : erased) threaded.Scramble(i, rng);
    ASSERT_TRUE(
        codec.ReconstructDataOnThreads(erased, threaded.pointers(), length, threads).ok());
    EXPECT_TRUE(threaded.SameBytes(whole, erased[0]));
  }
}

TEST(ErasureCodecTest, EveryPatternOfUpToMErasuresReconstructsBitExact) {
  constexpr uint64_t kSeed = 0x5eed0006;
  std::mt19937_64 rng(kSeed);
  for (const Shape& shape : Shapes()) {
    const ErasureCodec codec = MustCreate(shape.k, shape.m);
    const int n = codec.total_fragments();
    const size_t length = shape.k <= 4 ? 100003 : 4095;
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " ", ShapeName(shape), " length=", length));
    const Fragments golden = EncodedFragments(codec, length, rng, /*unaligned=*/true);
    int patterns = 0;
    for (uint64_t mask = 0; mask < (uint64_t{1} << n); ++mask) {
      if (__builtin_popcountll(mask) > shape.m) continue;
      std::vector<int> erased = PatternIndices(mask, n);
      std::shuffle(erased.begin(), erased.end(), rng);
      ExpectReconstructs(codec, golden, erased, rng);
      if (HasFatalFailure()) return;
      ++patterns;
    }
    EXPECT_GT(patterns, shape.m);
    EXPECT_LE(codec.decode_cache_stats().patterns, ErasureCodec::kMaxCachedPatterns);
  }
}

TEST(ErasureCodecTest, RandomErasuresAtUnalignedLengthsAndOffsets) {
  constexpr uint64_t kSeed = 0x5eed0007;
  constexpr int kTrials = 600;
  std::mt19937_64 rng(kSeed);
  std::vector<ErasureCodec> codecs;
  for (const Shape& shape : Shapes()) codecs.push_back(MustCreate(shape.k, shape.m));
  for (int trial = 0; trial < kTrials; ++trial) {
    const ErasureCodec& codec = codecs[rng() % codecs.size()];
    const size_t length = UnalignedLengths()[rng() % UnalignedLengths().size()];
    const int lost = codec.m() == 0 ? 0 : 1 + static_cast<int>(rng() % codec.m());
    const std::vector<int> erased = RandomPattern(codec.total_fragments(), lost, rng);
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " trial=", trial, " RS(", codec.k(), ",", codec.m(),
                              ") length=", length));
    const Fragments golden = EncodedFragments(codec, length, rng, /*unaligned=*/true);
    ExpectReconstructs(codec, golden, erased, rng);
    if (HasFatalFailure()) return;
  }
}

TEST(ErasureCodecTest, ReconstructDataRangeRebuildsDataOnlyAndLeavesParityPointersUnused) {
  constexpr uint64_t kSeed = 0x5eed0011;
  constexpr int kTrials = 300;
  std::mt19937_64 rng(kSeed);
  std::vector<ErasureCodec> codecs;
  for (const Shape& shape : Shapes()) {
    if (shape.m > 0) codecs.push_back(MustCreate(shape.k, shape.m));
  }
  for (int trial = 0; trial < kTrials; ++trial) {
    const ErasureCodec& codec = codecs[rng() % codecs.size()];
    const size_t length = UnalignedLengths()[rng() % UnalignedLengths().size()];
    const int lost = 1 + static_cast<int>(rng() % codec.m());
    const std::vector<int> erased = RandomPattern(codec.total_fragments(), lost, rng);
    SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " trial=", trial, " RS(", codec.k(), ",", codec.m(),
                              ") length=", length, " erased={", absl::StrJoin(erased, ","), "}"));
    const Fragments golden = EncodedFragments(codec, length, rng, /*unaligned=*/true);
    Fragments work(golden);
    for (int i : erased) work.Scramble(i, rng);
    // Erased parity and the parity beyond the k survivors are never read or written: null.
    std::vector<uint8_t*> pointers(work.pointers(), work.pointers() + codec.total_fragments());
    int survivors = 0;
    for (int i = 0; i < codec.total_fragments(); ++i) {
      const bool is_erased = std::find(erased.begin(), erased.end(), i) != erased.end();
      if (!is_erased && survivors < codec.k()) {
        ++survivors;
      } else if (i >= codec.k()) {
        pointers[i] = nullptr;
      }
    }
    // In two pieces, as a parallel rebuild cuts it.
    const size_t half = length / 2;
    if (half > 0) {
      ASSERT_TRUE(codec.ReconstructDataRange(erased, pointers.data(), 0, half).ok());
    }
    ASSERT_TRUE(codec.ReconstructDataRange(erased, pointers.data(), half, length - half).ok());
    for (int i = 0; i < codec.k(); ++i) {
      EXPECT_TRUE(work.SameBytes(golden, i)) << "data fragment " << i;
    }
  }
}

TEST(ErasureCodecTest, ReconstructRangeOnChunksEqualsWholeReconstruct) {
  constexpr uint64_t kSeed = 0x5eed0008;
  constexpr size_t kLength = 100003;
  std::mt19937_64 rng(kSeed);
  for (const Shape& shape : Shapes()) {
    if (shape.m == 0) continue;
    const ErasureCodec codec = MustCreate(shape.k, shape.m);
    for (int trial = 0; trial < 10; ++trial) {
      const std::vector<int> erased =
          RandomPattern(codec.total_fragments(), 1 + static_cast<int>(rng() % shape.m), rng);
      SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " ", ShapeName(shape), " trial=", trial,
                                " erased={", absl::StrJoin(erased, ","), "}"));
      const Fragments golden = EncodedFragments(codec, kLength, rng, /*unaligned=*/true);
      Fragments work(golden);
      for (int i : erased) work.Scramble(i, rng);
      std::uniform_int_distribution<size_t> chunk_bytes(1, 20000);
      for (size_t offset = 0; offset < kLength;) {
        const size_t length = std::min(chunk_bytes(rng), kLength - offset);
        ASSERT_TRUE(codec.ReconstructRange(erased, work.pointers(), offset, length).ok());
        offset += length;
      }
      EXPECT_EQ(work.FirstDifference(golden), -1);
    }
  }
}

TEST(ErasureCodecTest, MoreThanMErasuresIsDataLossAndChangesNothing) {
  constexpr uint64_t kSeed = 0x5eed0009;
  std::mt19937_64 rng(kSeed);
  for (const Shape& shape : Shapes()) {
    const ErasureCodec codec = MustCreate(shape.k, shape.m);
    const int n = codec.total_fragments();
    for (int lost = shape.m + 1; lost <= n; ++lost) {
      const std::vector<int> erased = RandomPattern(n, lost, rng);
      SCOPED_TRACE(absl::StrCat(SeedName(kSeed), " ", ShapeName(shape), " erased={",
                                absl::StrJoin(erased, ","), "}"));
      Fragments fragments = EncodedFragments(codec, 65, rng, /*unaligned=*/true);
      const Fragments before(fragments);
      absl::Status status = codec.Reconstruct(erased, fragments.pointers(), 65);
      EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
      EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrCat(lost, " of ", n)));
      EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrCat("at most m=", shape.m)));
      EXPECT_EQ(fragments.FirstDifference(before), -1);
    }
  }
}

TEST(ErasureCodecTest, ReconstructRejectsBadArgumentsAndChangesNothing) {
  const ErasureCodec codec = MustCreate(4, 2);
  constexpr uint64_t kSeed = 0x5eed000a;
  SCOPED_TRACE(SeedName(kSeed));
  std::mt19937_64 rng(kSeed);
  Fragments fragments = EncodedFragments(codec, 4095, rng, /*unaligned=*/true);
  const Fragments before(fragments);
  struct Case {
    std::vector<int> erased;
    std::string named;
  };
  const std::vector<Case> cases = {
      {{1, 1}, "index 1 is listed twice"},
      {{-1}, "index -1 is out of range"},
      {{6}, "index 6 is out of range: it must be in [0, 6)"},
      {{0, 2, 2, 3, 4}, "index 2 is listed twice"},  // invalid beats too many
  };
  for (const Case& c : cases) {
    absl::Status status = codec.Reconstruct(c.erased, fragments.pointers(), 4095);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.named));
  }
  EXPECT_EQ(codec.Reconstruct({0}, fragments.pointers(), 0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(codec.Reconstruct({}, fragments.pointers(), 4095).ok());
  std::vector<uint8_t*> with_null(fragments.pointers(), fragments.pointers() + 6);
  with_null[5] = nullptr;
  EXPECT_EQ(codec.Reconstruct({0}, with_null.data(), 4095).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fragments.FirstDifference(before), -1);
}

TEST(ErasureCodecTest, EncodeRejectsBadArgumentsAndWritesNothing) {
  const ErasureCodec codec = MustCreate(3, 2);
  constexpr uint64_t kSeed = 0x5eed000b;
  SCOPED_TRACE(SeedName(kSeed));
  std::mt19937_64 rng(kSeed);
  Fragments fragments(5, 100, rng, /*unaligned=*/true);
  const Fragments before(fragments);
  absl::Status zero = codec.Encode(fragments.pointers(), fragments.pointers() + 3, 0);
  EXPECT_EQ(zero.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(zero.message()), HasSubstr("length is 0"));
  std::vector<uint8_t*> data(fragments.pointers(), fragments.pointers() + 3);
  data[1] = nullptr;
  absl::Status null_data = codec.Encode(data.data(), fragments.pointers() + 3, 100);
  EXPECT_EQ(null_data.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(null_data.message()), HasSubstr("data fragment 1 is null"));
  EXPECT_EQ(codec.Encode(fragments.pointers(), nullptr, 100).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fragments.FirstDifference(before), -1);
}

TEST(ErasureCodecTest, NoParityEncodesNothingAndAnyErasureIsDataLoss) {
  constexpr uint64_t kSeed = 0x5eed000c;
  SCOPED_TRACE(SeedName(kSeed));
  std::mt19937_64 rng(kSeed);
  for (int k : {1, 4}) {
    const ErasureCodec codec = MustCreate(k, 0);
    Fragments fragments(k, 65, rng, /*unaligned=*/true);
    const Fragments before(fragments);
    EXPECT_TRUE(codec.Encode(fragments.pointers(), nullptr, 65).ok());
    EXPECT_TRUE(codec.Reconstruct({}, fragments.pointers(), 65).ok());
    EXPECT_EQ(codec.Reconstruct({0}, fragments.pointers(), 65).code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(fragments.FirstDifference(before), -1);
  }
}

TEST(ErasureCodecTest, DecodeTablesAreCachedPerPatternAndSharedByCopies) {
  constexpr uint64_t kSeed = 0x5eed000d;
  SCOPED_TRACE(SeedName(kSeed));
  std::mt19937_64 rng(kSeed);
  const ErasureCodec codec = MustCreate(6, 3);
  const Fragments golden = EncodedFragments(codec, 4095, rng, /*unaligned=*/true);
  auto stats = [&codec] { return codec.decode_cache_stats(); };
  EXPECT_EQ(stats().hits, 0u);
  EXPECT_EQ(stats().misses, 0u);

  ExpectReconstructs(codec, golden, {1, 7}, rng);
  EXPECT_EQ(stats().misses, 1u);
  EXPECT_EQ(stats().hits, 0u);
  EXPECT_EQ(stats().patterns, 1u);

  ExpectReconstructs(codec, golden, {7, 1}, rng);  // same set, other order
  EXPECT_EQ(stats().misses, 1u);
  EXPECT_EQ(stats().hits, 1u);

  const ErasureCodec copy = codec;
  ExpectReconstructs(copy, golden, {1, 7}, rng);
  EXPECT_EQ(stats().hits, 2u);

  ExpectReconstructs(codec, golden, {1}, rng);
  EXPECT_EQ(stats().misses, 2u);
  EXPECT_EQ(stats().patterns, 2u);

  // Invalid and over-m patterns never reach the cache.
  Fragments work(golden);
  EXPECT_FALSE(codec.Reconstruct({0, 1, 2, 3}, work.pointers(), 4095).ok());
  EXPECT_FALSE(codec.Reconstruct({0, 0}, work.pointers(), 4095).ok());
  EXPECT_EQ(stats().misses, 2u);
  EXPECT_EQ(stats().hits, 2u);

  const ErasureCodec other = MustCreate(6, 3);
  EXPECT_EQ(other.decode_cache_stats().misses, 0u);
}

TEST(ErasureCodecTest, ConcurrentEncodeAndReconstructAreCorrect) {
  constexpr uint64_t kSeed = 0x5eed000e;
  constexpr int kThreads = 6;
  constexpr int kIterations = 150;
  constexpr size_t kLength = 20011;
  std::mt19937_64 rng(kSeed);
  const ErasureCodec codec = MustCreate(8, 4);
  const Fragments golden = EncodedFragments(codec, kLength, rng, /*unaligned=*/true);
  std::vector<std::vector<int>> patterns;
  for (int i = 0; i < 10; ++i) {
    patterns.push_back(RandomPattern(12, 1 + static_cast<int>(rng() % 4), rng));
  }

  std::atomic<int> failures{0};
  std::vector<std::string> first_failure(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 thread_rng(kSeed + 1 + t);
      for (int iteration = 0; iteration < kIterations; ++iteration) {
        Fragments work(golden);
        absl::Status status;
        std::string what;
        if (iteration % 2 == 0) {
          for (int i = 8; i < 12; ++i) work.Scramble(i, thread_rng);
          status = codec.Encode(work.pointers(), work.pointers() + 8, kLength);
          what = "encode";
        } else {
          const std::vector<int>& erased = patterns[thread_rng() % patterns.size()];
          for (int i : erased) work.Scramble(i, thread_rng);
          status = codec.Reconstruct(erased, work.pointers(), kLength);
          what = absl::StrCat("reconstruct {", absl::StrJoin(erased, ","), "}");
        }
        if (!status.ok() || work.FirstDifference(golden) != -1) {
          failures.fetch_add(1);
          if (first_failure[t].empty()) {
            first_failure[t] = absl::StrCat("thread ", t, " iteration ", iteration, " ", what, ": ",
                                            status.ToString());
          }
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0) << SeedName(kSeed) << " " << absl::StrJoin(first_failure, "; ");
  const ErasureCodec::DecodeCacheStats stats = codec.decode_cache_stats();
  EXPECT_LE(stats.patterns, patterns.size());
  EXPECT_GT(stats.hits, 0u);
  EXPECT_EQ(stats.hits + stats.misses, uint64_t{kThreads} * (kIterations / 2));
}

}  // namespace
}  // namespace tessera
