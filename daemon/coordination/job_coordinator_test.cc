#include "daemon/coordination/job_coordinator.h"

#include <cstdint>
#include <random>

#include "gtest/gtest.h"

namespace tessera {
namespace {

ProtectedReport MakeReport(uint32_t rank, int64_t step, int64_t previous, uint64_t epoch = 1,
                           uint32_t world = 3) {
  ProtectedReport r;
  r.job_id = "j";
  r.world_size = world;
  r.epoch = epoch;
  r.rank = rank;
  r.step = step;
  r.previous_step = previous;
  r.shard_crc32c = static_cast<uint32_t>(0x1000 * (rank + 1) + step);
  r.shard_bytes = 4096 + rank;
  r.owner = "n" + std::to_string(rank);
  r.holders = {"h" + std::to_string(rank), "h" + std::to_string(rank + 1)};
  return r;
}

TEST(JobCoordinatorTest, CommitsOnlyWhenEveryRankOfTheRegisteredWorldReported) {
  JobCoordinator c;
  EXPECT_FALSE(c.Report(MakeReport(0, 10, -1)).committed_now);
  EXPECT_FALSE(c.Report(MakeReport(1, 10, -1)).committed_now);
  EXPECT_FALSE(c.Report(MakeReport(1, 10, -1)).committed_now);  // a repeat changes nothing
  JobCoordinator::Outcome last = c.Report(MakeReport(2, 10, -1));
  ASSERT_TRUE(last.committed_now);
  EXPECT_EQ(last.state.committed.step, 10);
  EXPECT_EQ(last.state.committed.epoch, 1u);
  ASSERT_EQ(last.state.committed.ranks.size(), 3u);
  EXPECT_EQ(last.state.committed.ranks[2].shard_crc32c, MakeReport(2, 10, -1).shard_crc32c);
  // The commit goes to every owner and holder of the job.
  EXPECT_EQ(last.push_to, (std::vector<std::string>{"h0", "h1", "h2", "h3", "n0", "n1", "n2"}));
  // A late duplicate is answered with the state and commits nothing again.
  JobCoordinator::Outcome again = c.Report(MakeReport(0, 10, -1));
  EXPECT_FALSE(again.committed_now);
  EXPECT_EQ(again.state.committed.step, 10);
}

TEST(JobCoordinatorTest, ReportsOfAnOlderEpochAreIgnored) {
  JobCoordinator c;
  c.Report(MakeReport(0, 20, -1, /*epoch=*/5));
  c.Report(MakeReport(1, 20, -1, /*epoch=*/4));  // a stale report from an abandoned history
  EXPECT_FALSE(c.Report(MakeReport(2, 20, -1, /*epoch=*/5)).committed_now);
  EXPECT_TRUE(c.Report(MakeReport(1, 20, -1, /*epoch=*/5)).committed_now);
}

TEST(JobCoordinatorTest, ANewerEpochVoidsTheOpenStepsOfTheOlder) {
  JobCoordinator c;
  c.Report(MakeReport(0, 30, -1, 1));
  c.Report(MakeReport(1, 30, -1, 1));
  c.Report(MakeReport(2, 40, -1, 2));  // the job moved on to epoch 2
  // Rank 2's epoch-1 report of step 30 now comes too late to complete it.
  EXPECT_FALSE(c.Report(MakeReport(2, 30, -1, 1)).committed_now);
  EXPECT_EQ(c.State("j").epoch, 2u);
  EXPECT_TRUE(c.State("j").committed.empty());
}

TEST(JobCoordinatorTest, AStepSomeRankSkippedIsDeadAndNeverCommits) {
  JobCoordinator c;
  c.Report(MakeReport(0, 10, -1));
  c.Report(MakeReport(1, 10, -1));
  c.Report(MakeReport(2, 10, -1));  // committed 10
  c.Report(MakeReport(0, 20, 10));
  c.Report(MakeReport(1, 20, 10));
  // Rank 2 sealed 30 right after 10: it skipped 20.
  JobCoordinator::Outcome o = c.Report(MakeReport(2, 30, 10));
  EXPECT_EQ(o.state.dead_steps, std::vector<int64_t>{20});
  EXPECT_FALSE(o.push_to.empty());  // holders of step 20 are told to drop it
  // A late report of 20 from rank 2 would be impossible; from rank 0 again it stays dead.
  EXPECT_FALSE(c.Report(MakeReport(0, 20, 10)).committed_now);
  c.Report(MakeReport(0, 30, 20));
  EXPECT_TRUE(c.Report(MakeReport(1, 30, 20)).committed_now);
  EXPECT_EQ(c.State("j").committed.step, 30);
}

TEST(JobCoordinatorTest, ResumeStartsANewEpochOncePerRestart) {
  JobCoordinator c;
  // Run ids are the trainer processes; may_hold says whether the current epoch may hold a shard.
  const uint64_t e1 = c.Resume("j", 0, /*run_id=*/100, /*may_hold=*/false, 1000);
  EXPECT_GT(e1, 0u);                                  // the job's first epoch
  EXPECT_EQ(c.Resume("j", 1, 101, false, 1001), e1);  // the other ranks of the restart join it
  EXPECT_EQ(c.Resume("j", 2, 102, false, 1002), e1);
  // A retry of run 101's question (its answer was lost) after a shard was sealed in e1: the
  // same epoch, not a new history.
  EXPECT_EQ(c.Resume("j", 1, 101, true, 1003), e1);
  // A new run of rank 1 while e1 may hold shards: a new history.
  const uint64_t e2 = c.Resume("j", 1, 201, true, 1004);
  EXPECT_GT(e2, e1);
  // Rank 0 of a second restart asks first, although it never resumed in e2: still a new
  // history, since e2 may hold shards of rank 0's previous run (the rule the model check found).
  const uint64_t e3 = c.Resume("j", 0, 300, true, 1005);
  EXPECT_GT(e3, e2);
  // Nothing of rank 1 sealed in e3 yet: it joins (a later rank of the same restart).
  EXPECT_EQ(c.Resume("j", 1, 301, false, 1006), e3);
  // Rank 1 again, a new run, although nothing of it is held in e3: another run of rank 1 was
  // answered in e3, so this is another restart.
  EXPECT_GT(c.Resume("j", 1, 302, false, 1007), e3);
  // A takeover knows only what owners tell it; its epochs still grow.
  JobCoordinator other;
  other.Learn("j", CommitRecord(), e3);
  EXPECT_GT(other.Resume("j", 0, 400, true, 5), e3);
}

// Found by the fault campaign (seeds 73310020, 73310013): rank 1's restart starts epoch e1 and the
// other ranks go on sealing in it; then rank 2 restarts too, from step 60, after its last run
// reported step 70 in e1. Rank 2 never resumed in e1, but it must not join it: its report of 70
// would complete step 70 with the shard of the abandoned run (released by the rollback, or lost
// with its node), a commit that no restore could satisfy.
TEST(JobCoordinatorTest, ARankThatReportedInTheEpochRestartsIntoANewOne) {
  JobCoordinator c;
  const uint64_t e0 = c.Resume("j", 0, 10, false, 1000);
  c.Resume("j", 1, 11, false, 1000);
  c.Resume("j", 2, 12, false, 1000);
  for (uint32_t rank = 0; rank < 3; ++rank) c.Report(MakeReport(rank, 60, -1, e0));
  ASSERT_EQ(c.State("j").committed.step, 60);
  const uint64_t e1 = c.Resume("j", 1, 21, false, 2000);  // rank 1 restarts: a new epoch
  ASSERT_GT(e1, e0);
  c.Report(MakeReport(0, 70, -1, e1));
  c.Report(MakeReport(2, 70, -1, e1));  // rank 2's last run, about to be killed
  const uint64_t e2 = c.Resume("j", 2, 22, /*may_hold=*/false, 2001);
  EXPECT_GT(e2, e1);
  // Rank 1's report of 70 (from its new run, still in e1) completes nothing: e1 is void.
  EXPECT_FALSE(c.Report(MakeReport(1, 70, -1, e1)).committed_now);
  EXPECT_EQ(c.State("j").committed.step, 60);
  // The ranks' reports of the new epoch commit as usual.
  for (uint32_t rank = 0; rank < 2; ++rank) c.Report(MakeReport(rank, 80, -1, e2));
  EXPECT_TRUE(c.Report(MakeReport(2, 80, -1, e2)).committed_now);
}

TEST(JobCoordinatorTest, LearnedCommitsOnlyGrowByEpochThenStep) {
  JobCoordinator c;
  CommitRecord a;
  a.epoch = 3;
  a.step = 50;
  a.ranks = {{0, 1, 1}};
  CommitRecord b = a;
  b.epoch = 4;
  b.step = 10;  // a newer epoch wins whatever its step
  c.Learn("j", a, 3);
  c.Learn("j", b, 4);
  c.Learn("j", a, 3);
  EXPECT_EQ(c.State("j").committed.epoch, 4u);
  EXPECT_EQ(c.State("j").committed.step, 10);
}

// Campaign seed 16000113: the coordinator n1 committed step 96 of epoch e1 as it was cut off;
// the majority, which knew only step 95, resumed the job from 95 in epoch e2. Whatever order n1
// (or any coordinator) learns the two records in, the restore point that e2 resumed from wins,
// and the abandoned commit is reported as superseded, so that no rank restores step 96 while
// the others continue from 95.
TEST(JobCoordinatorTest, ACommitMadeOnTheFarSideOfAPartitionIsSupersededByTheResumedPoint) {
  const uint64_t e1 = 1000, e2 = 2000;
  for (uint32_t world = 1; world <= 2; ++world) {
    SCOPED_TRACE("world " + std::to_string(world));
    JobCoordinator cut_off;
    for (uint32_t rank = 0; rank < world; ++rank) cut_off.Report(MakeReport(rank, 95, 94, e1, world));
    JobCoordinator::Outcome last;
    for (uint32_t rank = 0; rank < world; ++rank) last = cut_off.Report(MakeReport(rank, 96, 95, e1, world));
    ASSERT_TRUE(last.committed_now);
    const CommitRecord at_96 = cut_off.State("j").committed;
    ASSERT_EQ(at_96.step, 96);
    EXPECT_EQ(at_96.confirmed_epoch, e1);

    CommitRecord resumed_from = at_96;  // step 95 of e1, as the majority knew it
    resumed_from.step = 95;
    resumed_from.confirmed_epoch = e2;
    EXPECT_TRUE(resumed_from.NewerThan(at_96));
    EXPECT_FALSE(at_96.NewerThan(resumed_from));
    EXPECT_TRUE(at_96.SupersededBy(resumed_from));
    EXPECT_FALSE(resumed_from.SupersededBy(at_96));

    std::optional<CommitRecord> abandoned = cut_off.Learn("j", resumed_from, e2);
    ASSERT_TRUE(abandoned.has_value());
    EXPECT_EQ(abandoned->step, 96);
    EXPECT_FALSE(cut_off.Learn("j", at_96, e1).has_value());  // a late push of its own commit
    EXPECT_EQ(cut_off.State("j").committed.step, 95);
    EXPECT_EQ(cut_off.State("j").epoch, e2);

    JobCoordinator other_order;
    EXPECT_FALSE(other_order.Learn("j", resumed_from, e2).has_value());
    EXPECT_FALSE(other_order.Learn("j", at_96, e1).has_value());
    EXPECT_EQ(other_order.State("j").committed.step, 95);

    // Step 96 of the new epoch commits as usual, and outranks the point e2 resumed from.
    JobCoordinator::Outcome again;
    for (uint32_t rank = 0; rank < world; ++rank) again = cut_off.Report(MakeReport(rank, 96, -1, e2, world));
    ASSERT_TRUE(again.committed_now);
    EXPECT_EQ(again.state.committed.epoch, e2);
    EXPECT_TRUE(again.state.committed.NewerThan(resumed_from));
    EXPECT_FALSE(resumed_from.SupersededBy(again.state.committed));
  }
}

// Random interleavings of the same reports (with duplicates) always commit the same steps.
TEST(JobCoordinatorTest, OrderAndDuplicatesDoNotChangeTheOutcome) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<ProtectedReport> reports;
  for (uint32_t rank = 0; rank < 3; ++rank) {
    int64_t previous = -1;
    for (int64_t step = 10; step <= 50; step += 10) {
      if (rank == 1 && step == 30) continue;  // rank 1 skips 30: it can never commit
      reports.push_back(MakeReport(rank, step, previous));
      previous = step;
    }
  }
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<ProtectedReport> order = reports;
    for (int d = 0; d < 5; ++d) order.push_back(reports[rng() % reports.size()]);
    std::shuffle(order.begin(), order.end(), rng);
    JobCoordinator c;
    std::vector<int64_t> commits;
    for (const ProtectedReport& r : order) {
      JobCoordinator::Outcome o = c.Report(r);
      if (o.committed_now) commits.push_back(o.state.committed.step);
      ASSERT_NE(o.state.committed.step, 30);
    }
    EXPECT_EQ(c.State("j").committed.step, 50);
    for (size_t i = 1; i < commits.size(); ++i) EXPECT_GT(commits[i], commits[i - 1]);
  }
}

TEST(JobCoordinatorTest, ADropVoidsEveryCommitAndReportOfItsHistory) {
  JobCoordinator c;
  for (uint32_t rank = 0; rank < 3; ++rank) c.Report(MakeReport(rank, 10, -1, /*epoch=*/7));
  const CommitRecord old = c.State("j").committed;
  ASSERT_EQ(old.step, 10);
  const JobState dropped = c.Drop("j", /*now_ms=*/3);
  EXPECT_EQ(dropped.dropped_epoch, 8u);  // the clock is behind: known epoch + 1
  EXPECT_EQ(dropped.epoch, dropped.dropped_epoch);
  EXPECT_TRUE(dropped.committed.empty());
  EXPECT_TRUE(c.Nodes("j").empty());
  // A node that was away brings the dropped commit back, with its epoch: it is not adopted.
  c.Learn("j", old, old.epoch);
  EXPECT_TRUE(c.State("j").committed.empty());
  // Reports of the dropped history, even in the drop's own epoch, commit nothing.
  for (uint32_t rank = 0; rank < 3; ++rank) {
    EXPECT_FALSE(c.Report(MakeReport(rank, 11, 10, /*epoch=*/7)).committed_now);
    EXPECT_FALSE(c.Report(MakeReport(rank, 12, -1, /*epoch=*/8)).committed_now);
  }
  // The relaunch starts an epoch of its own, and its first commit collects the tombstone.
  const uint64_t epoch = c.Resume("j", 0, /*run_id=*/1, /*may_hold=*/false, /*now_ms=*/3);
  EXPECT_GT(epoch, 8u);
  EXPECT_EQ(c.Resume("j", 1, /*run_id=*/2, false, 3), epoch);  // the other ranks join it
  EXPECT_EQ(c.State("j").dropped_epoch, 8u);
  for (uint32_t rank = 0; rank < 3; ++rank) c.Report(MakeReport(rank, 2, -1, epoch));
  EXPECT_EQ(c.State("j").committed.step, 2);
  EXPECT_EQ(c.State("j").dropped_epoch, 0u);
  c.Learn("j", old, old.epoch, /*dropped_epoch=*/8);  // old news: the new commit stays
  EXPECT_EQ(c.State("j").committed.step, 2);
  EXPECT_EQ(c.State("j").committed.epoch, epoch);
}

TEST(JobCoordinatorTest, ACoordinatorLearnsADropFromTheNodesItGathersTheJobFrom) {
  JobCoordinator fresh;  // took over: knows nothing of the job
  CommitRecord old;
  old.epoch = 4;
  old.confirmed_epoch = 4;
  old.step = 9;
  old.ranks = {{0, 1, 1}, {1, 2, 2}};
  old.nodes = {"n1"};
  fresh.Learn("j", old, 4);                      // the node that was away answers first
  EXPECT_EQ(fresh.State("j").committed.step, 9);
  fresh.Learn("j", CommitRecord(), 6, /*dropped_epoch=*/6);  // a node that took the drop
  EXPECT_TRUE(fresh.State("j").committed.empty());
  EXPECT_EQ(fresh.State("j").dropped_epoch, 6u);
  EXPECT_GE(fresh.State("j").epoch, 6u);
  fresh.Learn("j", old, 4);                      // and in the other order
  EXPECT_TRUE(fresh.State("j").committed.empty());
  EXPECT_GT(fresh.Resume("j", 0, 1, false, 0), 6u);
}

}  // namespace
}  // namespace tessera
