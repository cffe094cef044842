// FragmentStore's pool of spare segments (fragment_store_spares.cc): segments of dropped steps
// reused, spares bounded, counted in the budget and reclaimed under pressure, pre-created ahead
// of the next fragment, and never adopted after a restart.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "common/segment.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/fragment_store_fixture.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

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
  // Step 2 arrives before step 1 is dropped (the committed step and the next): it takes the
  // spare, and the rank holds as many fragments as it is taken to need, so none is created.
  auto step2 = RandomBytes(meta.fragment_bytes);
  PutSealed(Key(2), meta, step2);
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 1u);
  EXPECT_EQ(stats.segments_recycled, 1u);
  ExpectHolds(Key(1), step1);
  ExpectHolds(Key(2), step2);
  // Step 1 dropped (step 2 committed): its segment is the spare for step 3.
  EXPECT_EQ(store_->DropOlderThan(Key(1).job_id, Key(1).rank, 2), 1u);
  EXPECT_EQ(store_->stats().pool_segments, 1u);
  // Step 3 arrives before step 2 is dropped, and step 4 before step 3 is (commits lag a step):
  // step 4 finds no spare and creates one; step 5 then finds step 2's, and sealing it (holding
  // 3, 4, 5 again) creates none.
  PutSealed(Key(3), meta, RandomBytes(meta.fragment_bytes));
  PutSealed(Key(4), meta, RandomBytes(meta.fragment_bytes));
  EXPECT_EQ(store_->stats().segments_created, 2u);
  EXPECT_EQ(store_->DropOlderThan(Key(1).job_id, Key(1).rank, 3), 1u);
  PutSealed(Key(5), meta, RandomBytes(meta.fragment_bytes));
  EXPECT_EQ(store_->DropOlderThan(Key(1).job_id, Key(1).rank, 4), 1u);
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 2u);
  EXPECT_EQ(stats.segments_recycled, 3u);
  EXPECT_EQ(stats.spares_precreated, 1u);
  EXPECT_EQ(stats.pool_segments, 1u);
  // Any rank may take a spare; sealing rank 4's fragment then asks for one of rank 4's own.
  const FragmentKey other_rank{"job-a", 4, 1, 0};
  PutSealed(other_rank, meta, RandomBytes(meta.fragment_bytes));
  ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) {
    return s.spares_precreated == 2 && s.pool_segments == 1;
  })) << "seed "
      << seed_;
  stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 2u);
  EXPECT_EQ(stats.segments_recycled, 4u);
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
  // Dropping the job takes the spares with it.
  EXPECT_EQ(store_->DropJob("job-a"), 3u);
  EXPECT_EQ(store_->stats().pool_segments, 0u);
  EXPECT_EQ(store_->stats().spares_precreate_discarded, 0u);
  EXPECT_EQ(budget_->used_bytes(), 0u);
}

TEST_F(FragmentStoreTest, TheSteadyStateCreatesAndDeletesNoSegment) {
  // Each step's fragment arrives and seals, then the commit drops the step before: from the
  // second step on, the dropped step's segment is the next one's, and nothing is created in the
  // background either (creating a spare at every seal deleted a segment again at every step).
  OpenStore(UINT64_MAX, /*precreate_spares=*/true);
  const FragmentMeta meta = Meta(3 << 20);
  std::set<std::string> files_at_step2;
  for (int64_t step = 1; step <= 12; ++step) {
    auto data = RandomBytes(meta.fragment_bytes);
    PutSealed(Key(step), meta, data);
    ASSERT_EQ(store_->DropOlderThan(Key(step).job_id, Key(step).rank, step), step > 1 ? 1u : 0u);
    ASSERT_TRUE(WaitForStats([](const FragmentStore::Stats& s) { return s.pool_segments >= 1; }))
        << "step " << step << ", seed " << seed_;
    EXPECT_EQ(store_->stats().pool_segments, 1u) << "step " << step;
    ExpectHolds(Key(step), data);
    const std::vector<std::string> files = FragmentFiles(dir_);
    if (step == 2) files_at_step2.insert(files.begin(), files.end());
    if (step > 2) {
      EXPECT_EQ(std::set<std::string>(files.begin(), files.end()), files_at_step2)
          << "step " << step;
    }
  }
  // A creation queued by the last seals would land within milliseconds: give it 300.
  for (int i = 0; i < 300; ++i) {
    const auto s = store_->stats();
    if (s.spares_precreated > 1 || s.spares_precreate_discarded > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto stats = store_->stats();
  EXPECT_EQ(stats.segments_created, 1u);
  EXPECT_EQ(stats.spares_precreated, 1u);  // after the first fragment, for the second
  EXPECT_EQ(stats.spares_precreate_discarded, 0u);
  EXPECT_EQ(stats.segments_recycled, 11u);
  EXPECT_EQ(files_at_step2.size(), 2u);  // the fragment held and the spare
  EXPECT_EQ(budget_->used_bytes(), stats.held_bytes + stats.pool_bytes);
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

}  // namespace
}  // namespace tessera
