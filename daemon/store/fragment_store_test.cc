// FragmentStore's tests; those of its pool of spare segments are in fragment_store_spares_test.cc.
#include "daemon/store/fragment_store.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/crc32c.h"
#include "daemon/store/fragment_store_fixture.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

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

// BeginReceive / FinishReceive: receipts of consecutive chunks open together and finished out of
// order (a receiver reading one chunk while the last one is still being decrypted); the seal
// waits for every open receipt; a receipt dropped unfinished, or finished with an error or a
// wrong CRC, leaves its range not received; a sealed fragment wants no bytes.
TEST_F(FragmentStoreTest, ReceiptsOpenTogetherFinishInAnyOrderAndDroppedOnesReceiveNothing) {
  const FragmentMeta meta = Meta(3 << 20);
  const FragmentKey key = Key(10);
  auto data = RandomBytes(meta.fragment_bytes);
  const uint32_t whole = Crc32c(data.data(), data.size());
  ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
  const size_t quarter = meta.fragment_bytes / 4;
  auto begin = [&](size_t i) {
    const uint8_t* src = data.data() + i * quarter;
    auto receipt = store_->BeginReceive(key, 7, i * quarter, quarter, Crc32c(src, quarter));
    EXPECT_TRUE(receipt.ok()) << receipt.status();
    EXPECT_FALSE(receipt->done().has_value());
    std::memcpy(receipt->dst(), src, quarter);
    return std::move(*receipt);
  };
  auto crc_of = [&](size_t i) { return Crc32c(data.data() + i * quarter, quarter); };
  {
    FragmentStore::ChunkReceipt r0 = begin(0);
    FragmentStore::ChunkReceipt r1 = begin(1);
    auto early = store_->SealFragment(key, 7, whole);
    EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable) << early.status();
    auto second = store_->FinishReceive(std::move(r1), crc_of(1));
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_EQ(second->bytes_received, quarter);
    auto first = store_->FinishReceive(std::move(r0), crc_of(0));
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->bytes_received, 2 * quarter);
    // Finishing a moved-from receipt is refused, and changes nothing.
    auto again = store_->FinishReceive(std::move(r0), crc_of(0));
    EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
  }
  {
    FragmentStore::ChunkReceipt dropped = begin(2);  // the connection broke: never finished
  }
  auto wrong = store_->FinishReceive(begin(3), crc_of(3) ^ 1);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kDataLoss) << wrong.status();
  auto failed = store_->FinishReceive(begin(3), absl::DataLossError("record 9 does not "
                                                                    "authenticate"));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kDataLoss) << failed.status();
  auto missing = store_->SealFragment(key, 7, whole);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition) << missing.status();
  EXPECT_NE(missing.status().message().find(absl::StrCat(2 * quarter, " of ", meta.fragment_bytes)),
            std::string::npos)
      << missing.status();
  ASSERT_TRUE(store_->FinishReceive(begin(3), crc_of(3)).ok());
  ASSERT_TRUE(store_->FinishReceive(begin(2), crc_of(2)).ok());
  ASSERT_TRUE(store_->SealFragment(key, 7, whole).ok());
  ExpectHolds(key, data);
  auto late = store_->BeginReceive(key, 7, 0, quarter, crc_of(0));
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->dst(), nullptr);
  ASSERT_TRUE(late->done().has_value());
  EXPECT_EQ(late->done()->state, SegmentState::kSealed);
  ExpectHolds(key, data);
}

// A fragment dropped while a chunk arrives: the receipt then holds the last reference to it, and
// finishing it (NotFound) or dropping it unfinished releases it without touching it after (run
// under ASan, releasing it while its lock was held was a use after free).
TEST_F(FragmentStoreTest, AReceiptOfAFragmentDroppedMeanwhileReleasesItLast) {
  const FragmentMeta meta = Meta(3 << 20);
  const FragmentKey key = Key(11);
  auto data = RandomBytes(meta.fragment_bytes);
  const size_t half = meta.fragment_bytes / 2;
  for (const bool finish : {true, false}) {
    SCOPED_TRACE(finish ? "finished" : "dropped unfinished");
    ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
    auto receipt = store_->BeginReceive(key, 7, 0, half, Crc32c(data.data(), half));
    ASSERT_TRUE(receipt.ok()) << receipt.status();
    std::memcpy(receipt->dst(), data.data(), half);
    ASSERT_TRUE(store_->DropFragment(key).ok());
    if (finish) {
      auto finished = store_->FinishReceive(std::move(*receipt), Crc32c(data.data(), half));
      EXPECT_EQ(finished.status().code(), absl::StatusCode::kNotFound) << finished.status();
    } else {
      FragmentStore::ChunkReceipt abandoned = std::move(*receipt);
    }
    EXPECT_EQ(store_->Get(key).status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(store_->stats().pool_segments, 0u) << "the segment was still written: deleted";
  }
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

// A fragment records the job's epoch its shard was sealed in, and the epoch decides before the
// incarnation: incarnations are start times of whichever daemon owned the rank, so those of
// different nodes say nothing of each other (docs/PROTOCOL.md, "a holder refuses a fragment of
// an older epoch and answers with its epoch").
TEST_F(FragmentStoreTest, EpochsDecideBeforeIncarnations) {
  const FragmentKey key = Key(11);
  auto with = [](FragmentMeta m, uint64_t epoch) {
    m.epoch = epoch;
    return m;
  };
  // Node A (incarnation 1000) protected step 11 in epoch 3.
  const FragmentMeta a = with(Meta(150000, /*incarnation=*/1000), 3);
  auto a_data = RandomBytes(a.fragment_bytes);
  PutSealed(key, a, a_data);

  // A write of step 11 from an abandoned history (epoch 2), by a daemon that started later: it
  // must not replace the step the job went on with.
  auto stale = store_->BeginFragment(key, with(Meta(150000, 2000), 2));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << stale.status();
  EXPECT_NE(stale.status().message().find("epoch 3; epoch 2 is older"), std::string::npos)
      << stale.status();
  ExpectHolds(key, a_data);

  // The job resumed in epoch 4 with the rank on node B, which started before A (incarnation
  // 900): its step 11 replaces A's. (Compared by incarnation alone it was refused as stale.)
  const FragmentMeta b = with(Meta(180000, /*incarnation=*/900), 4);
  auto b_data = RandomBytes(b.fragment_bytes);
  PutSealed(key, b, b_data);
  ExpectHolds(key, b_data);
  ASSERT_EQ(store_->List("job-a").size(), 1u);
  EXPECT_EQ(store_->List("job-a")[0].meta, b);
  // A's chunks still in flight land nowhere.
  EXPECT_EQ(store_->WriteChunk(key, 1000, 0, a_data.data(), 100, Crc32c(a_data.data(), 100))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectHolds(key, b_data);

  // Within one epoch, and where an epoch is not known (0: a sender that predates the field),
  // the incarnation decides as before.
  EXPECT_EQ(store_->BeginFragment(key, with(Meta(180000, 800), 4)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->BeginFragment(key, with(Meta(180000, 850), 0)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectHolds(key, b_data);

  // The epoch is kept in the segment's header: a restarted store still refuses epoch 3.
  store_.reset();
  OpenStore();
  ASSERT_EQ(store_->List("job-a").size(), 1u);
  EXPECT_EQ(store_->List("job-a")[0].meta, b);
  ExpectHolds(key, b_data);
  EXPECT_EQ(store_->BeginFragment(key, with(Meta(150000, 5000), 3)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ExpectHolds(key, b_data);
}

// Two sealed segments of one key after a crash during a replacement: the newer epoch is
// re-adopted, although its owner's incarnation is the older.
TEST_F(FragmentStoreTest, ARestartKeepsTheNewerEpochOfTwoSealedSegmentsOfAKey) {
  const FragmentKey key = Key(12);
  FragmentMeta older = Meta(120000, /*incarnation=*/1000);
  older.epoch = 5;
  auto older_data = RandomBytes(older.fragment_bytes);
  PutSealed(key, older, older_data);
  std::string older_path;
  for (const auto& f : std::filesystem::directory_iterator(dir_)) older_path = f.path().string();
  const std::string copy = dir_ + "/frag-999.frag";
  std::filesystem::copy_file(older_path, copy);

  FragmentMeta newer = Meta(120000, /*incarnation=*/900);
  newer.epoch = 6;
  auto newer_data = RandomBytes(newer.fragment_bytes);
  PutSealed(key, newer, newer_data);
  ExpectHolds(key, newer_data);

  store_.reset();
  // The replaced segment went back to the pool (EMPTY) and is deleted at start; the copy is the
  // sealed epoch-5 segment a crash would have left.
  OpenStore();
  ASSERT_EQ(store_->List("job-a").size(), 1u);
  EXPECT_EQ(store_->List("job-a")[0].meta, newer);
  ExpectHolds(key, newer_data);
  EXPECT_FALSE(std::filesystem::exists(copy));
}

// A job's drop deletes its fragments of the drop's epoch and before; a later run's stay, and
// those of no known epoch go only when asked (no later epoch is known).
TEST_F(FragmentStoreTest, ADropUpToAnEpochKeepsALaterRunsFragments) {
  auto meta = [this](uint64_t epoch) {
    FragmentMeta m = Meta(60000 + rng_() % 60000);
    m.epoch = epoch;
    return m;
  };
  const FragmentMeta dropped = meta(2), later = meta(5), unknown = meta(0);
  auto later_data = RandomBytes(later.fragment_bytes);
  PutSealed(Key(1), dropped, RandomBytes(dropped.fragment_bytes));
  PutSealed(Key(2), later, later_data);
  PutSealed(Key(3), unknown, RandomBytes(unknown.fragment_bytes));
  const FragmentMeta other_job = meta(1);
  PutSealed(FragmentKey{"job-b", 0, 1, 0}, other_job, RandomBytes(other_job.fragment_bytes));

  uint64_t bytes = 0;
  EXPECT_EQ(store_->DropJob("job-a", 4, /*unknown_too=*/false, &bytes), 1u);
  EXPECT_EQ(bytes, dropped.fragment_bytes);
  auto left = store_->List("job-a");
  ASSERT_EQ(left.size(), 2u);
  EXPECT_EQ(left[0].key, Key(2));
  EXPECT_EQ(left[1].key, Key(3));

  bytes = 0;
  EXPECT_EQ(store_->DropJob("job-a", 4, /*unknown_too=*/true, &bytes), 1u);
  EXPECT_EQ(bytes, unknown.fragment_bytes);
  left = store_->List("job-a");
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].key, Key(2));
  ExpectHolds(Key(2), later_data);
  EXPECT_EQ(store_->List("job-b").size(), 1u);
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

}  // namespace
}  // namespace tessera
