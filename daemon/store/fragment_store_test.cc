#include "daemon/store/fragment_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "ec/erasure_codec.h"
#include "absl/synchronization/notification.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

class FragmentStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-fragment-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/node0";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
    budget_ = std::make_unique<CapacityBudget>(256 << 20);
    OpenStore();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(root_);
  }

  // Spares are pre-created only where a test asks: most tests count segments exactly.
  void OpenStore(uint64_t pool_max_bytes = UINT64_MAX, bool precreate_spares = false) {
    store_.reset();
    FragmentStore::Options options;
    options.directory = dir_;
    options.budget = budget_.get();
    options.crc_threads = 2;
    options.pool_max_bytes = pool_max_bytes;
    options.precreate_spares = precreate_spares;
    auto opened = FragmentStore::Open(options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
  }

  std::vector<uint8_t> RandomBytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng_());
    return v;
  }

  static FragmentKey Key(int64_t step, uint32_t index = 1, uint32_t rank = 3) {
    return FragmentKey{"job-a", rank, step, index};
  }

  // Metadata for a fragment of a shard of `shard_bytes` under RS(3, 2).
  static FragmentMeta Meta(uint64_t shard_bytes, uint64_t incarnation = 7, uint32_t k = 3) {
    FragmentMeta m;
    m.owner_incarnation = incarnation;
    m.ec_k = k;
    m.ec_m = 2;
    m.shard_bytes = shard_bytes;
    m.fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
    m.shard_crc32c = 0x12345678;
    return m;
  }

  // Writes `data` in chunks of random sizes, in random order.
  void WriteAll(const FragmentKey& key, const FragmentMeta& meta, const std::vector<uint8_t>& data,
                size_t max_chunk = 100000) {
    std::vector<std::pair<size_t, size_t>> chunks;
    for (size_t off = 0; off < data.size();) {
      size_t len = std::min(data.size() - off, 1 + rng_() % max_chunk);
      chunks.emplace_back(off, len);
      off += len;
    }
    std::shuffle(chunks.begin(), chunks.end(), rng_);
    for (auto [off, len] : chunks) {
      auto s = store_->WriteChunk(key, meta.owner_incarnation, off, data.data() + off, len,
                                  Crc32c(data.data() + off, len));
      ASSERT_TRUE(s.ok()) << s.status();
    }
  }

  void PutSealed(const FragmentKey& key, const FragmentMeta& meta,
                 const std::vector<uint8_t>& data) {
    ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
    WriteAll(key, meta, data);
    auto sealed =
        store_->SealFragment(key, meta.owner_incarnation, Crc32c(data.data(), data.size()));
    ASSERT_TRUE(sealed.ok()) << sealed.status();
  }

  // Polls the store's stats until `done` holds (the background thread's work); false after 60 s.
  bool WaitForStats(const std::function<bool(const FragmentStore::Stats&)>& done) {
    for (int i = 0; i < 60000; ++i) {
      if (done(store_->stats())) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done(store_->stats());
  }

  void ExpectHolds(const FragmentKey& key, const std::vector<uint8_t>& data) {
    auto view = store_->Get(key);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(view->size(), data.size());
    EXPECT_EQ(0, std::memcmp(view->data(), data.data(), data.size())) << "seed " << seed_;
    EXPECT_EQ(view->fragment_crc32c(), Crc32c(data.data(), data.size()));
  }

  std::string root_;
  std::string dir_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> store_;
};

TEST_F(FragmentStoreTest, ChunksInRandomOrderSealBitExact) {
  for (uint64_t shard :
       {uint64_t{1}, uint64_t{1000}, uint64_t{3} << 20, (uint64_t{5} << 20) + 17}) {
    SCOPED_TRACE(shard);
    const FragmentMeta meta = Meta(shard);
    const FragmentKey key = Key(static_cast<int64_t>(shard));
    auto data = RandomBytes(meta.fragment_bytes);
    auto begun = store_->BeginFragment(key, meta);
    ASSERT_TRUE(begun.ok()) << begun.status();
    EXPECT_EQ(begun->state, SegmentState::kWriting);
    EXPECT_EQ(begun->bytes_received, 0u);
    WriteAll(key, meta, data);
    auto sealed = store_->SealFragment(key, 7, Crc32c(data.data(), data.size()));
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    EXPECT_EQ(sealed->state, SegmentState::kSealed);
    ExpectHolds(key, data);
    EXPECT_TRUE(store_->VerifyFragment(key).ok());
  }
  EXPECT_EQ(store_->stats().fragments_sealed, 4u);
  EXPECT_EQ(store_->stats().seals, 4u);
}

TEST_F(FragmentStoreTest, EveryCallIsIdempotent) {
  const FragmentMeta meta = Meta(1 << 20);
  const FragmentKey key = Key(5);
  auto data = RandomBytes(meta.fragment_bytes);
  const uint32_t crc = Crc32c(data.data(), data.size());
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  auto again = store_->BeginFragment(key, meta);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->bytes_received, 0u);
  const size_t half = data.size() / 2;
  for (int i = 0; i < 2; ++i) {
    auto w = store_->WriteChunk(key, 7, 0, data.data(), half, Crc32c(data.data(), half));
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->bytes_received, half);
  }
  // A retried Begin learns what has arrived.
  auto resumed = store_->BeginFragment(key, meta);
  ASSERT_TRUE(resumed.ok());
  EXPECT_EQ(resumed->bytes_received, half);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(store_
                    ->WriteChunk(key, 7, half, data.data() + half, data.size() - half,
                                 Crc32c(data.data() + half, data.size() - half))
                    .ok());
  }
  for (int i = 0; i < 2; ++i) {
    auto s = store_->SealFragment(key, 7, crc);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->fragment_crc32c, crc);
  }
  // After the seal: Begin, chunks and seal again change nothing.
  auto b = store_->BeginFragment(key, meta);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->state, SegmentState::kSealed);
  auto junk = RandomBytes(half);
  auto w = store_->WriteChunk(key, 7, 0, junk.data(), half, Crc32c(junk.data(), half));
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->state, SegmentState::kSealed);
  ExpectHolds(key, data);
  EXPECT_EQ(store_->SealFragment(key, 7, crc ^ 1).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store_->stats().seals, 1u);
}

TEST_F(FragmentStoreTest, DamagedChunkIsRejectedAndWritesNothing) {
  const FragmentMeta meta = Meta(1 << 20);
  const FragmentKey key = Key(5);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  const uint32_t good = Crc32c(data.data(), 4096);
  data[100] ^= 0x10;  // flipped in transit
  auto w = store_->WriteChunk(key, 7, 0, data.data(), 4096, good);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kDataLoss) << w.status();
  EXPECT_NE(w.status().message().find("nothing was written"), std::string::npos);
  auto status = store_->BeginFragment(key, meta);
  EXPECT_EQ(status->bytes_received, 0u);
  EXPECT_EQ(store_->stats().crc_failures, 1u);
  data[100] ^= 0x10;
  WriteAll(key, meta, data);
  ASSERT_TRUE(store_->SealFragment(key, 7, Crc32c(data.data(), data.size())).ok());
  ExpectHolds(key, data);
}

// ReceiveChunk: bytes land in place, in random order and in parallel; a damaged or cut-off
// chunk un-receives exactly its range (whatever arrived there before), and the seal waits for
// chunks still arriving.
TEST_F(FragmentStoreTest, ReceiveChunkInPlaceForgetsDamagedRangesAndSealsBitExact) {
  const FragmentMeta meta = Meta(3 << 20);  // 1 MiB fragment
  const FragmentKey key = Key(8);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  auto receive = [&](uint64_t off, size_t len, uint32_t crc, const uint8_t* src) {
    return store_->ReceiveChunk(key, 7, off, len, crc, [&](uint8_t* dst) {
      std::memcpy(dst, src, len);
      return absl::OkStatus();
    });
  };
  // Four chunks in random order, each from its own thread.
  const size_t quarter = meta.fragment_bytes / 4;
  std::vector<size_t> order = {0, 1, 2, 3};
  std::shuffle(order.begin(), order.end(), rng_);
  std::vector<std::thread> threads;
  std::vector<absl::Status> statuses(4);
  for (size_t i : order) {
    threads.emplace_back([&, i] {
      const uint8_t* src = data.data() + i * quarter;
      statuses[i] = receive(i * quarter, quarter, Crc32c(src, quarter), src).status();
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& st : statuses) ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(store_->BeginFragment(key, meta)->bytes_received, meta.fragment_bytes);

  // A damaged rewrite of [quarter/2, quarter/2 + quarter) overwrote good bytes: that range is
  // missing again, the rest stays received.
  auto junk = RandomBytes(quarter);
  auto damaged = receive(quarter / 2, quarter, Crc32c(data.data(), quarter), junk.data());
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss) << damaged.status();
  EXPECT_NE(damaged.status().message().find("must be sent again"), std::string::npos);
  EXPECT_EQ(store_->stats().crc_failures, 1u);
  auto seal = store_->SealFragment(key, 7, Crc32c(data.data(), data.size()));
  EXPECT_EQ(seal.status().code(), absl::StatusCode::kFailedPrecondition) << seal.status();
  EXPECT_NE(seal.status().message().find(absl::StrCat("first missing: [", quarter / 2, ", ",
                                                       quarter / 2 + quarter, ")")),
            std::string::npos)
      << seal.status();
  // A fill that fails part-way (the connection dropped) un-receives its range too.
  auto cut = store_->ReceiveChunk(key, 7, 0, 100, 0, [](uint8_t* dst) {
    std::memset(dst, 0xEE, 50);
    return absl::UnavailableError("connection reset");
  });
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store_->BeginFragment(key, meta)->bytes_received, meta.fragment_bytes - quarter - 100);

  // While a chunk is arriving, the seal waits (kUnavailable) rather than checksum moving bytes.
  absl::Notification filling, finish;
  std::thread slow([&] {
    auto r = store_->ReceiveChunk(key, 7, quarter / 2, quarter,
                                  Crc32c(data.data() + quarter / 2, quarter), [&](uint8_t* dst) {
                                    filling.Notify();
                                    finish.WaitForNotification();
                                    std::memcpy(dst, data.data() + quarter / 2, quarter);
                                    return absl::OkStatus();
                                  });
    EXPECT_TRUE(r.ok()) << r.status();
  });
  filling.WaitForNotification();
  auto early = store_->SealFragment(key, 7, Crc32c(data.data(), data.size()));
  EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable) << early.status();
  finish.Notify();
  slow.join();
  ASSERT_TRUE(receive(0, 100, Crc32c(data.data(), 100), data.data()).ok());
  ASSERT_TRUE(store_->SealFragment(key, 7, Crc32c(data.data(), data.size())).ok());
  ExpectHolds(key, data);

  // Sealed: a late chunk is not written (fill is never called), and bad ranges are refused.
  bool called = false;
  auto late = store_->ReceiveChunk(key, 7, 0, 100, 0, [&](uint8_t*) {
    called = true;
    return absl::OkStatus();
  });
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->state, SegmentState::kSealed);
  EXPECT_FALSE(called);
  auto past = store_->ReceiveChunk(key, 7, meta.fragment_bytes - 10, 20, 0,
                                   [](uint8_t*) { return absl::OkStatus(); });
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument);
  auto stale = store_->ReceiveChunk(key, 6, 0, 10, 0, [](uint8_t*) { return absl::OkStatus(); });
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition);
  ExpectHolds(key, data);
}

// A fragment replaced while a chunk is arriving into it: the chunk's writes land in the old
// segment, which is deleted rather than recycled, and the new fragment is untouched.
TEST_F(FragmentStoreTest, ReceiveChunkIntoAReplacedFragmentTouchesNothingElse) {
  const FragmentMeta old_meta = Meta(3 << 20, 7);
  const FragmentMeta new_meta = Meta(3 << 20, 8);
  const FragmentKey key = Key(9);
  auto junk = RandomBytes(old_meta.fragment_bytes);
  auto data = RandomBytes(new_meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, old_meta).ok());
  absl::Notification filling, finish;
  std::thread slow([&] {
    auto r = store_->ReceiveChunk(key, 7, 0, junk.size(), Crc32c(junk.data(), junk.size()),
                                  [&](uint8_t* dst) {
                                    filling.Notify();
                                    finish.WaitForNotification();
                                    std::memcpy(dst, junk.data(), junk.size());
                                    return absl::OkStatus();
                                  });
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  });
  filling.WaitForNotification();
  ASSERT_TRUE(store_->BeginFragment(key, new_meta).ok());  // the owner restarted
  PutSealed(key, new_meta, data);
  finish.Notify();
  slow.join();
  ExpectHolds(key, data);
  EXPECT_EQ(store_->stats().pool_segments, 0u) << "the old segment was still written: deleted";
}

TEST_F(FragmentStoreTest, WholeFragmentCrcMismatchIsDataLossAndNothingSealed) {
  const FragmentMeta meta = Meta(1 << 20);
  const FragmentKey key = Key(5);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  WriteAll(key, meta, data);
  const uint32_t crc = Crc32c(data.data(), data.size());
  auto bad = store_->SealFragment(key, 7, crc ^ 0x80);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss) << bad.status();
  EXPECT_EQ(store_->Get(key).status().code(), absl::StatusCode::kFailedPrecondition);
  auto listed = store_->List("job-a");
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].state, SegmentState::kWriting);
  EXPECT_EQ(listed[0].bytes_received, 0u);  // must be sent again
  EXPECT_EQ(store_->SealFragment(key, 7, crc).status().code(),
            absl::StatusCode::kFailedPrecondition);
  WriteAll(key, meta, data);
  ASSERT_TRUE(store_->SealFragment(key, 7, crc).ok());
  ExpectHolds(key, data);
}

TEST_F(FragmentStoreTest, SealNamesTheMissingBytes) {
  const FragmentMeta meta = Meta(3 << 20);
  const FragmentKey key = Key(5);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  ASSERT_TRUE(store_->WriteChunk(key, 7, 0, data.data(), 1000, Crc32c(data.data(), 1000)).ok());
  ASSERT_TRUE(
      store_->WriteChunk(key, 7, 5000, data.data() + 5000, 1000, Crc32c(data.data() + 5000, 1000))
          .ok());
  auto s = store_->SealFragment(key, 7, Crc32c(data.data(), data.size()));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("[1000, 5000)"), std::string::npos) << s.status();
  EXPECT_NE(s.status().message().find("2000 of 1048576"), std::string::npos) << s.status();
}

TEST_F(FragmentStoreTest, OverlappingRetriesWithOtherChunkSizesStillSealExactly) {
  const FragmentMeta meta = Meta(2 << 20);
  const FragmentKey key = Key(5);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  WriteAll(key, meta, data, 30000);
  WriteAll(key, meta, data, 70000);  // a retry with other boundaries
  ASSERT_TRUE(store_->SealFragment(key, 7, Crc32c(data.data(), data.size())).ok());
  ExpectHolds(key, data);
}

TEST_F(FragmentStoreTest, RejectsBadInputWithClearErrors) {
  const FragmentMeta meta = Meta(1000);
  auto expect_invalid = [&](const FragmentKey& key, const FragmentMeta& m,
                            const std::string& what) {
    auto s = store_->BeginFragment(key, m);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_NE(s.status().message().find(what), std::string::npos) << s.status();
  };
  expect_invalid(FragmentKey{"", 0, 1, 0}, meta, "job_id");
  expect_invalid(FragmentKey{"a/b", 0, 1, 0}, meta, "job_id");
  expect_invalid(FragmentKey{"j", 0, -1, 0}, meta, "step");
  expect_invalid(FragmentKey{"j", 1u << 21, 1, 0}, meta, "rank");
  expect_invalid(FragmentKey{"j", 0, 1, 5}, meta, "fragment index 5");
  FragmentMeta m = meta;
  m.owner_incarnation = 0;
  expect_invalid(Key(1), m, "owner_incarnation");
  m = meta;
  m.ec_k = 0;
  expect_invalid(Key(1), m, "RS(0, 2)");
  m = meta;
  m.ec_m = 99;
  expect_invalid(Key(1), m, "RS(3, 99)");
  m = meta;
  m.fragment_bytes += 64;
  expect_invalid(Key(1), m, "expected 384");
  EXPECT_TRUE(store_->List("").empty());

  auto data = RandomBytes(meta.fragment_bytes);
  EXPECT_EQ(
      store_->WriteChunk(Key(1), 7, 0, data.data(), 10, Crc32c(data.data(), 10)).status().code(),
      absl::StatusCode::kNotFound);
  ASSERT_TRUE(store_->BeginFragment(Key(1), meta).ok());
  EXPECT_EQ(
      store_->WriteChunk(Key(1), 8, 0, data.data(), 10, Crc32c(data.data(), 10)).status().code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->WriteChunk(Key(1), 7, 0, data.data(), 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      store_
          ->WriteChunk(Key(1), 7, meta.fragment_bytes - 5, data.data(), 10, Crc32c(data.data(), 10))
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->WriteChunk(Key(1), 7, UINT64_MAX - 2, data.data(), 10, Crc32c(data.data(), 10))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->SealFragment(Key(2), 7, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->DropFragment(Key(2)).code(), absl::StatusCode::kNotFound);
}

TEST_F(FragmentStoreTest, IncarnationsDecideWhatABeginMeans) {
  const FragmentKey key = Key(9);
  const FragmentMeta old_meta = Meta(100000, /*incarnation=*/5);
  auto old_data = RandomBytes(old_meta.fragment_bytes);
  PutSealed(key, old_meta, old_data);

  // Older incarnation: refused.
  EXPECT_EQ(store_->BeginFragment(key, Meta(100000, 4)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectHolds(key, old_data);

  // A newer incarnation replaces it.
  const FragmentMeta new_meta = Meta(200000, /*incarnation=*/6);
  auto new_data = RandomBytes(new_meta.fragment_bytes);
  PutSealed(key, new_meta, new_data);
  ExpectHolds(key, new_data);
  EXPECT_EQ(store_->Get(key, 5).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->Get(key, 6).ok());
  EXPECT_EQ(store_->List("").size(), 1u);

  // Same incarnation, other metadata, sealed: the owner encoded the step again (a restored job
  // snapshotted it anew, or k changed); the new fragment replaces the held one.
  FragmentMeta again = new_meta;
  again.shard_crc32c ^= 1;
  auto again_data = RandomBytes(again.fragment_bytes);
  PutSealed(key, again, again_data);
  ExpectHolds(key, again_data);
  EXPECT_EQ(store_->List("").size(), 1u);
  EXPECT_EQ(store_->List("")[0].meta.shard_crc32c, again.shard_crc32c);

  // Same incarnation, other content, still WRITING: the abandoned attempt is replaced.
  const FragmentKey key2 = Key(10);
  ASSERT_TRUE(store_->BeginFragment(key2, Meta(1000, 6)).ok());
  FragmentMeta changed = Meta(2000, 6);
  auto data2 = RandomBytes(changed.fragment_bytes);
  PutSealed(key2, changed, data2);
  ExpectHolds(key2, data2);
}

TEST_F(FragmentStoreTest, RestartReadoptsSealedAndDeletesTheRest) {
  const FragmentMeta meta = Meta(300000);
  auto a = RandomBytes(meta.fragment_bytes);
  auto b = RandomBytes(meta.fragment_bytes);
  auto c = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(1, 0), meta, a);
  PutSealed(Key(1, 1), meta, b);
  PutSealed(Key(1, 2), meta, c);
  ASSERT_TRUE(store_->BeginFragment(Key(2, 0), meta).ok());  // left WRITING
  ASSERT_TRUE(store_->WriteChunk(Key(2, 0), 7, 0, a.data(), 100, Crc32c(a.data(), 100)).ok());
  // A dropped fragment sits in the pool: it must not come back.
  PutSealed(Key(0, 0), meta, c);
  ASSERT_TRUE(store_->DropFragment(Key(0, 0)).ok());
  // A closing store deletes its pool; a crashed one leaves it behind. Leave a copy as a crash
  // would.
  for (const auto& f : std::filesystem::directory_iterator(dir_)) {
    auto seg = Segment::Open(f.path().string(), false);
    ASSERT_TRUE(seg.ok());
    if (LoadState(*(*seg)->header()) == SegmentState::kEmpty) {
      std::filesystem::copy_file(f.path(), dir_ + "/frag-999.frag");
      break;
    }
  }
  ASSERT_TRUE(std::filesystem::exists(dir_ + "/frag-999.frag"));

  // Damage fragment (1, 2) in the file, as a stray write would.
  std::string damaged_path;
  for (const auto& f : std::filesystem::directory_iterator(dir_)) {
    auto seg = Segment::Open(f.path().string(), true);
    ASSERT_TRUE(seg.ok());
    const SegmentHeader& h = *(*seg)->header();
    if (LoadState(h) == SegmentState::kSealed && h.step == 1 && h.fragment_index == 2) {
      (*seg)->payload()[12345] ^= 1;
      damaged_path = f.path().string();
    }
  }
  ASSERT_FALSE(damaged_path.empty());

  store_.reset();
  EXPECT_EQ(budget_->used_bytes(), 0u);  // the closed store gave every reservation back
  OpenStore();
  auto listed = store_->List("job-a");
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].key, Key(1, 0));
  EXPECT_EQ(listed[1].key, Key(1, 1));
  for (const auto& s : listed) {
    EXPECT_EQ(s.state, SegmentState::kSealed);
    EXPECT_EQ(s.meta, meta);
  }
  ExpectHolds(Key(1, 0), a);
  ExpectHolds(Key(1, 1), b);
  EXPECT_FALSE(std::filesystem::exists(damaged_path));
  const auto stats = store_->stats();
  EXPECT_EQ(stats.adopted_at_start, 2u);
  EXPECT_EQ(stats.discarded_at_start, 3u);  // damaged, WRITING, pooled
  EXPECT_EQ(stats.crc_failures, 1u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes);
  size_t files = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir_))
    files += f.path().extension() == ".frag";
  EXPECT_EQ(files, 2u);
}

TEST_F(FragmentStoreTest, CapacityExhaustionSaysWhatWasAskedAndFree) {
  store_.reset();
  budget_ = std::make_unique<CapacityBudget>(3 << 20);
  OpenStore();
  const FragmentMeta meta = Meta(3 << 20);  // 1 MiB fragments: 1 MiB + 4 KiB segments
  auto data = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(1, 0), meta, data);
  PutSealed(Key(1, 1), meta, data);
  auto third = store_->BeginFragment(Key(1, 2), meta);
  ASSERT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  const std::string msg(third.status().message());
  EXPECT_NE(msg.find("fragment 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs 1052672 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("only 1040384 of 3145728 bytes"), std::string::npos) << msg;
  EXPECT_EQ(store_->List("").size(), 2u);

  // Commit GC frees room; the dropped segments are recycled, then reclaimed for other sizes.
  EXPECT_EQ(store_->DropOlderThan("job-a", 3, 2), 2u);
  EXPECT_EQ(store_->stats().pool_segments, 2u);
  PutSealed(Key(2, 0), meta, data);
  EXPECT_EQ(store_->stats().segments_recycled, 1u);
  const FragmentMeta bigger = Meta(9 << 19);  // 1.5 MiB: the pooled 1 MiB one is reclaimed
  auto big = RandomBytes(bigger.fragment_bytes);
  PutSealed(Key(2, 1), bigger, big);
  EXPECT_EQ(store_->stats().pool_segments, 0u);
  ExpectHolds(Key(2, 0), data);
  ExpectHolds(Key(2, 1), big);
  EXPECT_LE(budget_->used_bytes(), budget_->capacity_bytes());
}

TEST_F(FragmentStoreTest, DropsAndViewsThatOutliveThem) {
  const FragmentMeta meta = Meta(90000);
  std::vector<std::vector<uint8_t>> data;
  for (int step = 0; step < 4; ++step) {
    for (uint32_t rank = 0; rank < 2; ++rank) {
      data.push_back(RandomBytes(meta.fragment_bytes));
      PutSealed(FragmentKey{"job-a", rank, step, 0}, meta, data.back());
    }
  }
  PutSealed(FragmentKey{"job-b", 0, 0, 0}, meta, data[0]);
  auto view = store_->Get(FragmentKey{"job-a", 1, 0, 0});
  ASSERT_TRUE(view.ok());

  EXPECT_EQ(store_->DropOlderThan("job-a", 1, 2), 2u);  // rank 1 steps 0, 1
  EXPECT_EQ(store_->DropOlderThan("job-a", 1, 2), 0u);
  EXPECT_EQ(store_->List("job-a").size(), 6u);
  EXPECT_EQ(store_->Get(FragmentKey{"job-a", 1, 1, 0}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->Get(FragmentKey{"job-a", 0, 1, 0}).ok());
  // The pool recycles step 1's segment, never the one the view still reads.
  EXPECT_EQ(store_->stats().pool_segments, 1u);
  PutSealed(FragmentKey{"job-a", 1, 9, 0}, meta, data[7]);
  PutSealed(FragmentKey{"job-a", 1, 10, 0}, meta, data[6]);
  EXPECT_EQ(0, std::memcmp(view->data(), data[1].data(), data[1].size()));

  EXPECT_EQ(store_->DropJob("job-a"), 8u);
  EXPECT_TRUE(store_->List("job-a").empty());
  EXPECT_EQ(store_->List("").size(), 1u);
  EXPECT_EQ(0, std::memcmp(view->data(), data[1].data(), data[1].size()));
}

// The files of `dir` named *.frag.
std::vector<std::string> FragmentFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() == ".frag") files.push_back(f.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

TEST_F(FragmentStoreTest, StepsReuseTheSegmentsOfDroppedStepsBitExact) {
  // Commit GC as a peer sees it: step s - 1 commits (the steps before it are dropped), then step
  // s arrives. The shard's size varies a little between steps (its manifest does), within one
  // 64 KiB granule.
  std::map<int64_t, std::vector<uint8_t>> held;
  std::set<std::string> paths;
  for (int64_t step = 1; step <= 8; ++step) {
    SCOPED_TRACE(step);
    const FragmentMeta meta = Meta((uint64_t{3} << 20) - (step % 3) * 3000);
    store_->DropOlderThan("job-a", 3, step - 1);
    held.erase(step - 2);
    held[step] = RandomBytes(meta.fragment_bytes);
    PutSealed(Key(step), meta, held[step]);
    for (const auto& [s, data] : held) ExpectHolds(Key(s), data);
    auto view = store_->Get(Key(step));
    ASSERT_TRUE(view.ok());
    paths.insert(view->path());
    const auto stats = store_->stats();
    EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  }
  const auto stats = store_->stats();
  EXPECT_EQ(stats.segments_created,
            2u);  // steps 1 and 2; every later step reuses one
  EXPECT_EQ(stats.segments_recycled, 6u);
  EXPECT_EQ(paths.size(), 2u);
  EXPECT_EQ(stats.fragments_sealed, 2u);
  EXPECT_EQ(stats.pool_segments, 0u);
  EXPECT_EQ(FragmentFiles(dir_).size(), 2u);
  EXPECT_TRUE(store_->VerifyFragment(Key(8)).ok());
}

TEST_F(FragmentStoreTest, SparesAreNeverAdoptedAfterRestart) {
  const FragmentMeta meta = Meta(300000);
  const FragmentKey other_rank{"job-a", 4, 1, 0};
  auto kept = RandomBytes(meta.fragment_bytes);
  PutSealed(other_rank, meta, kept);
  PutSealed(Key(1), meta, RandomBytes(meta.fragment_bytes));
  PutSealed(Key(2), meta, RandomBytes(meta.fragment_bytes));
  auto spare_path = [this]() -> std::string {
    for (const std::string& path : FragmentFiles(dir_)) {
      auto seg = Segment::Open(path, false);
      if (seg.ok() && LoadState(*(*seg)->header()) == SegmentState::kEmpty) return path;
    }
    return "";
  };
  // A closing store deletes its spares; a crashed one leaves them behind: keep copies of them as
  // a crash would. The first spare once held step 1, sealed: even with its state word set back
  // to SEALED (a stray write), its header no longer verifies.
  ASSERT_EQ(store_->DropOlderThan("job-a", 3, 2), 1u);
  ASSERT_FALSE(spare_path().empty());
  std::filesystem::copy_file(spare_path(), dir_ + "/frag-900.frag");
  {
    auto seg = Segment::Open(dir_ + "/frag-900.frag", true);
    ASSERT_TRUE(seg.ok());
    EXPECT_EQ(std::string((*seg)->header()->job_id), "job-a");
    StoreState((*seg)->header(), SegmentState::kSealed);
  }
  // A crash in the middle of a reuse: step 3 took the spare and half its bytes have arrived.
  auto fresh = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(store_->BeginFragment(Key(3), meta).ok());
  EXPECT_EQ(store_->stats().segments_recycled, 1u);
  const size_t half = fresh.size() / 2;
  ASSERT_TRUE(
      store_->WriteChunk(Key(3), 7, 0, fresh.data(), half, Crc32c(fresh.data(), half)).ok());
  // And one more spare: step 2, dropped when step 3 committed.
  ASSERT_EQ(store_->DropOlderThan("job-a", 3, 3), 1u);
  ASSERT_FALSE(spare_path().empty());
  std::filesystem::copy_file(spare_path(), dir_ + "/frag-901.frag");
  EXPECT_EQ(store_->List("").size(),
            2u);  // (rank 4, step 1) and the WRITING step 3

  store_.reset();
  EXPECT_EQ(budget_->used_bytes(), 0u);
  OpenStore();
  auto listed = store_->List("");
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].key, other_rank);
  ExpectHolds(other_rank, kept);
  for (int64_t step = 1; step <= 3; ++step) {
    EXPECT_EQ(store_->Get(Key(step)).status().code(), absl::StatusCode::kNotFound);
  }
  const auto stats = store_->stats();
  EXPECT_EQ(stats.adopted_at_start, 1u);
  EXPECT_EQ(stats.discarded_at_start, 3u);  // two spares and the WRITING step 3
  EXPECT_EQ(stats.crc_failures, 1u);        // the spare that said SEALED
  EXPECT_EQ(stats.pool_segments,
            0u);  // spares are deleted, not adopted as spares
  EXPECT_EQ(FragmentFiles(dir_).size(), 1u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes);
}

TEST_F(FragmentStoreTest, BudgetCountsSparesAndReclaimsThemUnderPressure) {
  store_.reset();
  const uint64_t segment_bytes = (uint64_t{1} << 20) + kSegmentHeaderBytes;
  budget_ = std::make_unique<CapacityBudget>(4 << 20);  // three 1 MiB segments and a bit
  OpenStore();
  const FragmentMeta meta = Meta(3 << 20);
  for (uint32_t rank = 0; rank < 3; ++rank) {
    PutSealed(FragmentKey{"job-a", rank, 1, 0}, meta, RandomBytes(meta.fragment_bytes));
  }
  for (uint32_t rank = 0; rank < 3; ++rank) {
    ASSERT_EQ(store_->DropOlderThan("job-a", rank, 2), 1u);
  }
  auto stats = store_->stats();
  EXPECT_EQ(stats.held_bytes, 0u);
  EXPECT_EQ(stats.pool_segments, 3u);
  EXPECT_EQ(stats.pool_bytes, 3 * segment_bytes);
  EXPECT_EQ(budget_->used_bytes(), 3 * segment_bytes);

  // A 2 MiB fragment fits no spare and not the free budget: two spares make room.
  const FragmentMeta bigger = Meta(6 << 20);
  auto big = RandomBytes(bigger.fragment_bytes);
  PutSealed(Key(2), bigger, big);
  stats = store_->stats();
  EXPECT_EQ(stats.spares_reclaimed, 2u);
  EXPECT_EQ(stats.pool_segments, 1u);
  EXPECT_EQ(stats.segments_recycled, 0u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  ExpectHolds(Key(2), big);

  // Another does not fit even without the last spare: refused with the numbers, which count the
  // spare as free.
  auto refused = store_->BeginFragment(Key(3), bigger);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  stats = store_->stats();
  EXPECT_EQ(stats.pool_segments, 0u);
  EXPECT_EQ(stats.spares_reclaimed, 3u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes);
  EXPECT_EQ(FragmentFiles(dir_).size(), 1u);
  ExpectHolds(Key(2), big);
}

TEST_F(FragmentStoreTest, SpareMuchLargerThanTheFragmentIsNotUsed) {
  const FragmentMeta two_mib = Meta(6 << 20);
  PutSealed(Key(1), two_mib, RandomBytes(two_mib.fragment_bytes));
  ASSERT_EQ(store_->DropOlderThan("job-a", 3, 2), 1u);
  ASSERT_EQ(store_->stats().pool_segments, 1u);
  // Half the size, and tiny: new segments, the spare stays.
  const FragmentMeta one_mib = Meta(3 << 20);
  const FragmentMeta tiny = Meta(3000);
  auto a = RandomBytes(one_mib.fragment_bytes);
  auto b = RandomBytes(tiny.fragment_bytes);
  PutSealed(Key(2, 0), one_mib, a);
  PutSealed(Key(2, 1), tiny, b);
  auto stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 3u);
  EXPECT_EQ(stats.segments_recycled, 0u);
  EXPECT_EQ(stats.pool_segments, 1u);
  // Slightly smaller than the spare: reused.
  const FragmentMeta nearly = Meta((6 << 20) - 3 * 10000);
  auto c = RandomBytes(nearly.fragment_bytes);
  PutSealed(Key(2, 2), nearly, c);
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 3u);
  EXPECT_EQ(stats.segments_recycled, 1u);
  EXPECT_EQ(stats.pool_segments, 0u);
  ExpectHolds(Key(2, 0), a);
  ExpectHolds(Key(2, 1), b);
  ExpectHolds(Key(2, 2), c);
}

TEST_F(FragmentStoreTest, SparesAreBoundedPerRankAndDropJobKeepsNone) {
  const FragmentMeta meta = Meta(300000);
  for (int64_t step = 1; step <= 5; ++step) {
    PutSealed(Key(step), meta, RandomBytes(meta.fragment_bytes));
  }
  PutSealed(FragmentKey{"job-a", 4, 1, 0}, meta, RandomBytes(meta.fragment_bytes));
  PutSealed(FragmentKey{"job-b", 3, 1, 0}, meta, RandomBytes(meta.fragment_bytes));
  EXPECT_EQ(store_->DropOlderThan("job-a", 3, 5), 4u);
  auto stats = store_->stats();
  EXPECT_EQ(stats.pool_segments, 2u);  // Options::max_spares_per_rank
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  EXPECT_EQ(FragmentFiles(dir_).size(), 3u + 2u);
  EXPECT_EQ(store_->DropOlderThan("job-a", 4, 5), 1u);
  EXPECT_EQ(store_->DropOlderThan("job-b", 3, 5), 1u);
  EXPECT_EQ(store_->stats().pool_segments, 4u);

  // The job is gone: its fragments and the spares they left are deleted; job-b's spare stays.
  EXPECT_EQ(store_->DropJob("job-a"), 1u);
  stats = store_->stats();
  EXPECT_EQ(stats.pool_segments, 1u);
  EXPECT_EQ(stats.held_bytes, 0u);
  EXPECT_EQ(budget_->used_bytes(), stats.pool_bytes);
  EXPECT_EQ(FragmentFiles(dir_).size(), 1u);
}

TEST_F(FragmentStoreTest, ConcurrentWritersOfManyFragments) {
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);  // spares created meanwhile change nothing
  const FragmentMeta meta = Meta(3 << 20);
  constexpr int kFragments = 6;
  std::vector<std::vector<uint8_t>> data;
  for (int i = 0; i < kFragments; ++i) {
    data.push_back(RandomBytes(meta.fragment_bytes));
    ASSERT_TRUE(store_->BeginFragment(Key(1, i % 5, i), meta).ok());
  }
  // Four threads each write every fourth 64 KiB chunk of every fragment.
  std::vector<std::thread> threads;
  std::vector<absl::Status> errors(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      constexpr size_t kChunk = 64 << 10;
      for (int i = 0; i < kFragments; ++i) {
        for (size_t c = t; c * kChunk < data[i].size(); c += 4) {
          const size_t off = c * kChunk;
          const size_t len = std::min(kChunk, data[i].size() - off);
          auto s = store_->WriteChunk(Key(1, i % 5, i), 7, off, data[i].data() + off, len,
                                      Crc32c(data[i].data() + off, len));
          if (!s.ok()) errors[t] = s.status();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& e : errors) ASSERT_TRUE(e.ok()) << e;
  for (int i = 0; i < kFragments; ++i) {
    auto s = store_->SealFragment(Key(1, i % 5, i), 7, Crc32c(data[i].data(), data[i].size()));
    ASSERT_TRUE(s.ok()) << s.status();
    ExpectHolds(Key(1, i % 5, i), data[i]);
  }
}

TEST_F(FragmentStoreTest, ConcurrentBeginsOfOneFragmentCreateOneSegment) {
  const FragmentMeta meta = Meta(24 << 20);
  const FragmentKey key = Key(3);
  auto data = RandomBytes(meta.fragment_bytes);
  std::vector<std::thread> threads;
  std::vector<absl::Status> results(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      auto begun = store_->BeginFragment(key, meta);
      if (!begun.ok()) {
        results[t] = begun.status();
        return;
      }
      // Each "stream" writes its quarter.
      const size_t quarter = data.size() / 4;
      results[t] = store_
                       ->WriteChunk(key, 7, t * quarter, data.data() + t * quarter, quarter,
                                    Crc32c(data.data() + t * quarter, quarter))
                       .status();
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& r : results) ASSERT_TRUE(r.ok()) << r;
  EXPECT_EQ(store_->stats().segments_created, 1u);
  ASSERT_TRUE(store_->SealFragment(key, 7, Crc32c(data.data(), data.size())).ok());
  ExpectHolds(key, data);
}

// A fragment's segment capacity (FragmentStore rounds up to 64 KiB).
uint64_t RoundUpForTest(uint64_t bytes) {
  constexpr uint64_t kGranule = 64 << 10;
  return (bytes + kGranule - 1) / kGranule * kGranule;
}

// The EMPTY ".frag" files in dir (spares).
std::vector<std::string> EmptyFragmentFiles(const std::string& dir) {
  std::vector<std::string> empty;
  for (const std::string& path : FragmentFiles(dir)) {
    auto seg = Segment::Open(path, false);
    if (seg.ok() && LoadState(*(*seg)->header()) == SegmentState::kEmpty) empty.push_back(path);
  }
  return empty;
}

TEST_F(FragmentStoreTest, ASpareIsCreatedAheadOfTheNextFragmentAndRecycled) {
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  const FragmentMeta meta = Meta(3 << 20);
  auto step1 = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(1), meta, step1);
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) { return s.pool_segments == 1; }))
      << "seed " << seed_;
  auto stats = store_->stats();
  EXPECT_EQ(stats.spares_precreated, 1u);
  EXPECT_EQ(stats.segments_created, 1u);
  EXPECT_EQ(stats.spares_reclaimed, 0u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  // The spare is EMPTY with no header CRC, as a recycled one.
  auto spares = EmptyFragmentFiles(dir_);
  ASSERT_EQ(spares.size(), 1u);
  {
    auto seg = Segment::Open(spares[0], false);
    ASSERT_TRUE(seg.ok());
    EXPECT_EQ((*seg)->header()->header_crc32c, 0u);
    EXPECT_GE((*seg)->capacity_bytes(), meta.fragment_bytes);
  }
  // Step 2 arrives before step 1 is dropped (back-to-back snapshots): it takes the spare.
  auto step2 = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(2), meta, step2);
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 1u);
  EXPECT_EQ(stats.segments_recycled, 1u);
  ExpectHolds(Key(1), step1);
  ExpectHolds(Key(2), step2);
  // Sealing step 2 asked for the next one.
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) {
    return s.spares_precreated == 2 && s.pool_segments == 1;
  })) << "seed " << seed_;
  // Any rank may take a spare; sealing rank 4's fragment then asks for one of rank 4's own.
  const FragmentKey other_rank{"job-a", 4, 1, 0};
  PutSealed(other_rank, meta, RandomBytes(meta.fragment_bytes));
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) {
    return s.spares_precreated == 3 && s.pool_segments == 1;
  })) << "seed " << seed_;
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 1u);
  EXPECT_EQ(stats.segments_recycled, 2u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  // Dropping the job takes the spares with it.
  EXPECT_EQ(store_->DropJob("job-a"), 3u);
  EXPECT_EQ(store_->stats().pool_segments, 0u);
  EXPECT_EQ(budget_->used_bytes(), 0u);
}

TEST_F(FragmentStoreTest, ShortBudgetSkipsTheSpareAndEvictsNothing) {
  // Rank 5's 1 MiB fragment and its pre-created spare, then a 2 MiB fragment of rank 3 that
  // leaves less than its size free: no spare for rank 3, and rank 5's spare stays.
  store_.reset();
  budget_ = std::make_unique<CapacityBudget>((9 << 20) / 2);
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  const FragmentMeta small = Meta(3 << 20);
  const FragmentMeta large = Meta(6 << 20);
  const FragmentKey rank5{"job-a", 5, 1, 0};
  auto small_data = RandomBytes(small.fragment_bytes);
  PutSealed(rank5, small, small_data);
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) { return s.pool_segments == 1; }))
      << "seed " << seed_;
  auto large_data = RandomBytes(large.fragment_bytes);
  PutSealed(Key(1), large, large_data);
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) {
    return s.spares_precreate_skipped >= 1;
  })) << "seed " << seed_;
  const auto stats = store_->stats();
  EXPECT_EQ(stats.spares_precreated, 1u);
  EXPECT_EQ(stats.spares_reclaimed, 0u);
  EXPECT_EQ(stats.pool_segments, 1u);
  EXPECT_EQ(stats.segments_created, 2u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  EXPECT_LE(budget_->used_bytes(), budget_->capacity_bytes());
  ExpectHolds(rank5, small_data);
  ExpectHolds(Key(1), large_data);
}

TEST_F(FragmentStoreTest, AFragmentThatNeedsTheBytesOfASpareBeingCreatedGetsThem) {
  // Room for a 16 MiB fragment and a 32 MiB one, not for a 16 MiB spare besides. Right after
  // the 16 MiB fragment is sealed its spare is queued, being created, or pooled: in each case
  // the 32 MiB Begin must get its bytes (TrimPool waits for a creation under way).
  const FragmentMeta small = Meta(48 << 20);
  const FragmentMeta large = Meta(96 << 20);
  const uint64_t small_file = RoundUpForTest(small.fragment_bytes) + kSegmentHeaderBytes;
  const uint64_t large_file = RoundUpForTest(large.fragment_bytes) + kSegmentHeaderBytes;
  store_.reset();
  budget_ = std::make_unique<CapacityBudget>(small_file + large_file + small_file / 2);
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  auto data = RandomBytes(small.fragment_bytes);
  for (int64_t step = 1; step <= 20; ++step) {
    PutSealed(FragmentKey{"job-a", 3, step, 0}, small, data);
    auto begun = store_->BeginFragment(FragmentKey{"job-a", 4, step, 0}, large);
    ASSERT_TRUE(begun.ok()) << "step " << step << ": " << begun.status();
    EXPECT_LE(budget_->used_bytes(), budget_->capacity_bytes());
    EXPECT_EQ(store_->DropJob("job-a"), 2u);
  }
  store_.reset();
  EXPECT_EQ(budget_->used_bytes(), 0u);
  EXPECT_TRUE(FragmentFiles(dir_).empty());
}

TEST_F(FragmentStoreTest, PrecreatedSparesAreNeverAdoptedAfterRestart) {
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  const FragmentMeta meta = Meta(300000);
  auto kept = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(1), meta, kept);
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) { return s.pool_segments == 1; }))
      << "seed " << seed_;
  // A crashed store leaves its spare behind: keep a copy as a crash would, and one whose state
  // word a stray write set to SEALED.
  auto spares = EmptyFragmentFiles(dir_);
  ASSERT_EQ(spares.size(), 1u);
  std::filesystem::copy_file(spares[0], dir_ + "/frag-900.frag");
  std::filesystem::copy_file(spares[0], dir_ + "/frag-901.frag");
  {
    auto seg = Segment::Open(dir_ + "/frag-901.frag", true);
    ASSERT_TRUE(seg.ok());
    StoreState((*seg)->header(), SegmentState::kSealed);
  }
  store_.reset();
  EXPECT_EQ(budget_->used_bytes(), 0u);
  OpenStore();
  auto listed = store_->List("");
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].key, Key(1));
  ExpectHolds(Key(1), kept);
  const auto stats = store_->stats();
  EXPECT_EQ(stats.adopted_at_start, 1u);
  EXPECT_EQ(stats.discarded_at_start, 2u);
  EXPECT_EQ(stats.pool_segments, 0u);
  EXPECT_EQ(FragmentFiles(dir_).size(), 1u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes);
}

TEST_F(FragmentStoreTest, DestroyingTheStoreWhileSparesAreQueuedIsClean) {
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  const FragmentMeta meta = Meta(12 << 20);
  constexpr uint32_t kRanks = 8;
  for (uint32_t rank = 0; rank < kRanks; ++rank) {
    PutSealed(FragmentKey{"job-a", rank, 1, 0}, meta, RandomBytes(meta.fragment_bytes));
  }
  store_.reset();  // creations queued, one perhaps under way
  EXPECT_EQ(budget_->used_bytes(), 0u);
  EXPECT_TRUE(EmptyFragmentFiles(dir_).empty());
  EXPECT_EQ(FragmentFiles(dir_).size(), kRanks);
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  EXPECT_EQ(store_->stats().adopted_at_start, kRanks);
  EXPECT_EQ(store_->stats().discarded_at_start, 0u);
  // A DropJob while spares are being created leaves none behind.
  EXPECT_EQ(store_->DropJob("job-a"), kRanks);
  for (uint32_t rank = 0; rank < kRanks; ++rank) {
    PutSealed(FragmentKey{"job-b", rank, 1, 0}, meta, RandomBytes(meta.fragment_bytes));
  }
  EXPECT_EQ(store_->DropJob("job-b"), kRanks);
  store_.reset();
  EXPECT_EQ(budget_->used_bytes(), 0u);
  EXPECT_TRUE(FragmentFiles(dir_).empty());
}

TEST(Crc32cCombineCachedTest, MatchesCrc32cCombine) {
  std::mt19937_64 rng(12345);
  for (uint64_t len : {uint64_t{0}, uint64_t{1}, uint64_t{3}, uint64_t{64}, uint64_t{1000},
                       uint64_t{1} << 20, (uint64_t{1} << 20) + 7, uint64_t{5} << 30}) {
    for (int i = 0; i < 20; ++i) {
      const uint32_t a = static_cast<uint32_t>(rng());
      const uint32_t b = static_cast<uint32_t>(rng());
      EXPECT_EQ(Crc32cCombineCached(a, b, len), Crc32cCombine(a, b, len)) << len;
    }
  }
  std::vector<uint8_t> data(3 << 20);
  for (auto& x : data) x = static_cast<uint8_t>(rng());
  const size_t cut = 1 << 20;
  EXPECT_EQ(Crc32cCombineCached(Crc32c(data.data(), cut),
                                Crc32c(data.data() + cut, data.size() - cut), data.size() - cut),
            Crc32c(data.data(), data.size()));
}

TEST(CapacityBudgetTest, ReserveReleaseChargeAndReclaim) {
  CapacityBudget budget(1000);
  EXPECT_TRUE(budget.Reserve(600, "a").ok());
  auto s = budget.Reserve(500, "slot of rank 3");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("slot of rank 3 needs 500 bytes but only 400 of 1000"),
            std::string::npos)
      << s;
  uint64_t held = 300;  // a pool the reclaimer can give back
  ASSERT_TRUE(budget.Reserve(300, "pool").ok());
  const int id = budget.AddReclaimer([&](uint64_t wanted) {
    const uint64_t freed = std::min(wanted, held);
    held -= freed;
    budget.Release(freed);
    return freed;
  });
  EXPECT_TRUE(budget.Reserve(250, "b").ok());
  EXPECT_EQ(held, 150u);
  EXPECT_EQ(budget.used_bytes(), 1000u);
  budget.RemoveReclaimer(id);
  EXPECT_EQ(budget.Reserve(1, "c").code(), absl::StatusCode::kResourceExhausted);
  // ReserveIfFree never runs a reclaimer.
  bool reclaimed = false;
  const int never = budget.AddReclaimer([&](uint64_t) {
    reclaimed = true;
    return uint64_t{0};
  });
  EXPECT_EQ(budget.ReserveIfFree(1, "spare").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(reclaimed);
  budget.RemoveReclaimer(never);
  budget.Release(1000);
  EXPECT_EQ(budget.free_bytes(), 1000u);
  EXPECT_TRUE(budget.ReserveIfFree(100, "spare").ok());
  EXPECT_EQ(budget.used_bytes(), 100u);
  budget.Release(100);
  EXPECT_FALSE(budget.Charge(1500));
  EXPECT_EQ(budget.free_bytes(), 0u);
}

}  // namespace
}  // namespace tessera
