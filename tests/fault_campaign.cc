// The seeded fault campaign (tests/campaign.h) as test cases: a short random campaign with a
// printed seed, the journal's own rules, and each failure the campaign found kept as a named
// regression case with its seed and fault sequence. tools/campaign.sh runs longer campaigns.
#include <signal.h>

#include <cinttypes>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/campaign.h"
#include "tests/campaign_journal.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

const TrialOptions& Options() {
  static const TrialOptions* options = [] {
    auto* o = new TrialOptions;
    o->no_partitions = ProbePartitions();
    // A failing trial's daemon logs and trainer output: where asked, else among the test's
    // outputs (Bazel keeps them in bazel-testlogs/.../test.outputs).
    for (const char* name : {"TESSERA_CAMPAIGN_KEEP_LOGS", "TEST_UNDECLARED_OUTPUTS_DIR"}) {
      const char* dir = std::getenv(name);
      if (dir != nullptr && *dir != '\0' && o->keep_logs_dir.empty()) o->keep_logs_dir = dir;
    }
    if (!o->no_partitions.empty()) {
      std::printf("partitions are skipped here: %s\n", o->no_partitions.c_str());
    }
    return o;
  }();
  return *options;
}

// What failed in `r`, with the command that reruns it.
std::string Describe(const TrialResult& r) {
  std::string out = absl::StrCat("trial seed ", r.seed, " (", r.shape, "), faults: ",
                                 absl::StrJoin(r.faults, "; "));
  for (const auto& f : r.failures) absl::StrAppend(&out, "\n[", f.check, "] ", f.detail);
  absl::StrAppend(&out, "\nrerun: ", r.rerun);
  return out;
}

TEST(JournalTest, AcceptsOnlyTheHistoryTheJobResumed) {
  Journal j;
  // Launch 1 starts fresh and snapshots steps 1..6; launch 2 resumes step 4 and snapshots 5..7
  // anew.
  j.Fresh(0, 1);
  for (int64_t s = 1; s <= 6; ++s) j.Snapshotted(0, 1, s, 100 + s);
  EXPECT_EQ(j.CheckRestored(0, 6, 106), "") << "launch 1's own history";
  j.Resumed(0, 2, 4, 104);
  for (int64_t s = 5; s <= 7; ++s) j.Snapshotted(0, 2, s, 200 + s);
  EXPECT_EQ(j.CheckRestored(0, 4, 104), "");
  EXPECT_EQ(j.CheckRestored(0, 6, 206), "");
  EXPECT_EQ(j.CheckRestored(0, 3, 103), "");
  // Launch 1's step 6 was abandoned when launch 2 resumed step 4.
  const std::string abandoned = j.CheckRestored(0, 6, 106);
  EXPECT_NE(abandoned.find("the bytes of launch L1, abandoned by the history"), std::string::npos)
      << abandoned;
  EXPECT_NE(j.CheckRestored(0, 6, 999), "");
  EXPECT_NE(j.CheckRestored(0, 9, 209), "") << "never snapshotted";
  // A launch that resumed launch 1's abandoned bytes continues launch 1's history from there.
  j.Resumed(0, 3, 5, 105);
  EXPECT_EQ(j.Describe(0), "L1(0..5] L3(5..]");
  EXPECT_NE(j.CheckRestored(0, 6, 206), "") << "launch 2 is abandoned now";
  // A fresh start abandons everything before it.
  j.Fresh(0, 4);
  EXPECT_NE(j.CheckRestored(0, 3, 103), "");
  EXPECT_EQ(j.Describe(0), "L4(0..]");
}

// Random trials from a printed seed, started for about 90 seconds (each trial prints its seed
// and, when it fails, the command that reruns it alone); with the regression cases below the
// target takes about four minutes on a 2-core machine. TESSERA_TEST_SEED repeats a campaign;
// TESSERA_CAMPAIGN_TRIALS caps the trials, TESSERA_CAMPAIGN_BUDGET_S the time.
TEST(FaultCampaignTest, ShortRandomCampaign) {
  signal(SIGPIPE, SIG_IGN);
  const uint64_t seed = TestSeed() % 1000000000;
  const char* trials_env = std::getenv("TESSERA_CAMPAIGN_TRIALS");
  const char* budget_env = std::getenv("TESSERA_CAMPAIGN_BUDGET_S");
  const int trials = trials_env != nullptr ? std::atoi(trials_env) : 20;
  const double budget_s = budget_env != nullptr ? std::atof(budget_env) : 90;
  TrialOptions options = Options();
  options.min_faults = 2;
  options.max_faults = 4;
  options.progress_deadline_s = 45;
  std::printf("short campaign: trials from seed %" PRIu64 ", at most %d, started within %.0f s\n",
              seed, trials, budget_s);
  for (const TrialResult& r : RunCampaign(seed, trials, budget_s, options)) {
    EXPECT_TRUE(r.failures.empty()) << Describe(r);
  }
}

// Regression cases: failures the campaign found, each as the trial that found it (its seed and
// fault sequence; the targets follow from the seed). Each comment says what failed then and, for
// the epoch protocol, whether it still does and why. One that still fails may pass by luck of
// timing on a given run: each failure below is about an interleaving. Under the epoch protocol
// SnapshotsOfEveryStep..., NodeLossWith..., ASingleRankRestart... and the ASecondRankRestart...
// cases pass; the others still fail (some only on some runs), as their comments say.

// Runs the trial of `seed` with exactly the faults of `script`.
TrialResult RunScripted(uint64_t seed, std::vector<FaultKind> script) {
  TrialOptions options = Options();
  options.script = std::move(script);
  options.min_faults = options.max_faults = static_cast<int>(options.script.size());
  options.tls = "off";  // as the trial was when it failed
  options.progress_deadline_s = 20;
  options.restore_deadline_s = 60;
  return RunTrial(seed, options);
}

bool PartitionsPossible() { return Options().no_partitions.empty(); }

// Snapshots of every step under the wait policy, no fault at all: no step is ever committed.
// Until a first commit, BeginSnapshot does not hold anyone back, and each rank's protection skips
// a sealed step once a newer one is sealed, so no step ends up protected on every rank. The
// final restart then resumes each rank from its own newest sealed step ("ranks on other daemons
// are not visible (no cluster), so it resumes from its own newest sealed step"), or fresh.
TEST(FaultCampaignRegression, SnapshotsOfEveryStepWithoutFaultsAreNeverCommitted) {
  const TrialResult r = RunScripted(1008, {});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// A lost node's ranks restart on its empty replacement while the others keep running: commits
// stop for good. Step s was protected on every rank with a fragment on the lost node, and
// committed on some daemons only; the others can no longer commit it (a fragment is gone and
// nothing protects it again; commits are not passed between daemons), and under the wait policy
// their ranks hold step s until it commits (SnapshotStore::BeginSnapshot), so the lockstep job
// snapshots nothing new ("step s is not committed yet ...; the snapshot of step s+2 waits for it").
TEST(FaultCampaignRegression, NodeLossWithOnlyItsRanksRestartedStopsCommits) {
  const TrialResult r = RunScripted(1003, {FaultKind::kNodeLoss});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// The same stall after a zombie: the replacement (same node id, another store and port) takes the
// ranks, and steps with a fragment on the stopped daemon are never committed. Under the epoch
// protocol that stall is gone, but this trial now fails when the zombie's port sorts before its
// replacement's: see AZombieCoordinatorSplitsTheReportsAndCommitsStop below (n0 coordinates).
TEST(FaultCampaignRegression, ZombieReplacementStopsCommits) {
  const TrialResult r = RunScripted(1009, {FaultKind::kZombie});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// The same stall after a daemon is SIGKILLed and restarted on its memory. It was open under the
// epoch protocol when the kill landed while a snapshot was being copied: the restarted daemon
// discards that rank's WRITING slot (step w), so the rank never seals w, and its next seal
// reports previous step "unknown" (SnapshotStore::SealSnapshot: the rank's slots were
// re-adopted), so the coordinator cannot mark w dead (JobCoordinator::Report); under the wait
// policy every other rank, holding w sealed, waits for w to commit (SnapshotStore::BeginSnapshot)
// and the lockstep job stopped. Also seen as "progress" in random trials with a daemon-kill (seed
// 59199026). Fixed: a restarted daemon takes each rank's last sealed step from its newest
// re-adopted slot, and an agent that re-registers waits under the wait policy; daemon kills are
// drawn in the short campaign again since 2,128 random trials passed with them.
TEST(FaultCampaignRegression, DaemonKillStopsCommits) {
  const TrialResult r = RunScripted(1009, {FaultKind::kDaemonKill});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// One trainer is SIGKILLed and restarted at once: its restore rolls the whole job back on its
// daemon ("resumes from step 17: releasing step 19 of the abandoned run", once per rank there),
// so the sealed steps of the other rank on that node, whose trainer never stopped, are released
// too; the steps the other ranks hold for commit can then never be committed, and commits stop.
TEST(FaultCampaignRegression, ASingleRankRestartReleasesItsNeighboursNewerSteps) {
  const TrialResult r =
      RunScripted(72860767, {FaultKind::kTrainerKill, FaultKind::kTrainerKill});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// Two trainers are SIGKILLed and restarted one after the other. The first restart starts a new
// epoch; the second rank had not resumed in it, so it joined it although its killed run had
// already reported step 10 in it. That report completed step 10, and the final restart restored
// rank 8's step 10 from the killed run's fragments: bytes of an abandoned history ("history").
// Fixed: a rank that reported in the current epoch restarts into a new one
// (JobCoordinator::Resume).
TEST(FaultCampaignRegression, ASecondRankRestartDoesNotCommitItsAbandonedStep) {
  const TrialResult r = RunScripted(73310046, {FaultKind::kDaemonStop, FaultKind::kNodeLoss,
                                               FaultKind::kJobRestart, FaultKind::kTrainerKill,
                                               FaultKind::kTrainerKill});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// The same with the abandoned shard gone: rank 3's restart joined the epoch rank 1's restart had
// started, its killed run's report of step 7 completed step 7 after the rollback had released
// that shard, and the next restart found the committed step unrestorable ("no live node holds
// its shard or a fragment") and started fresh ("committed"). Fixed with the case above.
TEST(FaultCampaignRegression, ASecondRankRestartLeavesNoUnrestorableCommit) {
  const TrialResult r = RunScripted(
      73310020, {FaultKind::kTrainerKill, FaultKind::kTrainerKill, FaultKind::kRankRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// The whole job restarts while one node is cut off. Under the old protocol that node's daemon
// saw no peer and resumed its ranks from their own newest sealed step. Under the epoch protocol
// it failed because a restore decided from a partial view: the cut-off daemon suspected every
// peer, coordinated the job for itself, counted every suspected node's holdings as lost and
// answered NOT_FOUND, so its ranks started fresh while the others resumed step s. Fixed: a
// restore point is decided only by a coordinator that sees a majority of the members live
// (Cluster::CountQuorum); the cut-off node's ranks wait until it is joined again.
TEST(FaultCampaignRegression, APartitionedNodeResumesItsRanksFromTheirOwnNewestStep) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(201, {FaultKind::kPartitionRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// Found by the campaign of seed 16000000 (trial seed 16000113): the job's coordinator n1 committed
// step 96 just as it was cut off, before the commit reached the others; the whole job restarted
// meanwhile. The majority side's coordinator decided the restore point from n0, n2 and n3, which
// knew only step 95, while n1 was unreachable; once n1 was joined again it answered its own ranks
// 1 and 5 with step 96 ("same-step": 95 on six ranks, 96 on two). It needs the commit to land at
// the cut, so most runs of this seed pass; ProtectionPipelineTest.
// ACommitTheMajorityResumedWithoutIsSuperseded replays it deterministically. Fixed: commit
// records are ordered by their confirmed epoch first (docs/PROTOCOL.md, Restore 3), so the point
// the majority resumed from supersedes n1's commit wherever it is learned, and n1 logs so. The
// campaign's "committed" check accepts a restore behind a commit only when the node that was cut
// off made it and logged it superseded.
TEST(FaultCampaignRegression, ACommitAtTheCutIsNotOverruledByTheMajoritysRestorePoint) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r =
      RunScripted(16000113, {FaultKind::kPartition, FaultKind::kPartitionRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// Links cut between two members at a time, each still reaching every other member (so both
// stay live: other members' indirect probes answer for them), three of the four cuts with the
// whole job restarted meanwhile: the coordinator may not reach a node of the job, an owner its
// holders or the coordinator. Commits wait and resume once the link is mended, and every restart
// resumes one step on every rank. Not a failure found: the partial partition the campaign draws
// since link cuts were added (campaign seed 44000001: 39 trials of four cuts each, 0 failed).
TEST(FaultCampaignScripted, LinkCutsBetweenLiveMembersWithJobRestarts) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(44001001, {FaultKind::kLinkCut, FaultKind::kLinkCut,
                                               FaultKind::kLinkCut, FaultKind::kLinkCut});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// A link cut between two members of a 5-node RS(2,1) cluster (n4 and n0, 3.5 s, no restart):
// each owner has one member outside its placement, so the fragments its ranks would send across
// the cut go to that spare instead (the daemons log each one), and every check passes. Without
// the reroute they were retried on the same member until the link was mended.
TEST(FaultCampaignScripted, FragmentsForAMemberBeyondACutLinkGoToASpare) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(44002004, {FaultKind::kLinkCut});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
  EXPECT_NE(r.shape.find("5 nodes RS(2,1)"), std::string::npos) << r.shape;
  EXPECT_GT(r.fragments_rerouted, 0) << Describe(r);
}

// Found by the campaign of seed 32000001 (trial seed 32001002): as n0's partition healed, n0
// protected its ranks' step 14 while the members it had declared dead came back one by one, and
// n4 while suspicions relayed on the way were refuted; each saw one other live member and
// protected in RS(1, 0) (one copy) where RS(2, 2) was configured, and step 14 committed. The job
// then restarted after losing n1 and n4, as RS(2, 2) allows: rank 9's shard and its only copy
// were gone, and the job started fresh ("committed"). Fixed: a smaller code waits until the live
// members have been steady for the suspicion timeout (ClusterCoordination::Options::
// degraded_settle; ProtectionPipelineTest.ASmallerCodeWaitsUntilTheLiveMembersAreSteady).
TEST(FaultCampaignRegression, AStepIsNotCommittedInASmallerCodeWhileAPartitionHeals) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r =
      RunScripted(32001002, {FaultKind::kZombie, FaultKind::kFlipSlot, FaultKind::kPartitionRestart,
                             FaultKind::kJobRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// After a whole-job restart resumed step s, a later restart restored a step after s with the
// bytes of the abandoned run on some ranks (the old protocol: an abandoned step's protection,
// retrying against the cut-off node, completed after the rollback freed its slot). Under the
// epoch protocol this trial failed as the one above did (the cut-off n0 answered NOT_FOUND from
// its own view, and that fresh start opened no new epoch, so the final restart restored the old
// commit: "history"). Fixed with it: only a majority decides a restore point.
TEST(FaultCampaignRegression, FragmentsOfAnAbandonedStepAreRestoredAfterAResume) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(1001, {FaultKind::kPartitionRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// Two zombies: an old n0 (SIGSTOPped, replaced by a new n0 on another port, then SIGCONTed) is
// taken live again by its peers ("member n0 at <old address> is back"), and Membership::AddressOf
// returns the first address that carries the node id, the zombie's when its port sorts first.
// The job's coordinator is n0: the replacement's own ranks report to itself, every other rank to
// the zombie, neither sees the whole world, and commits stop ("progress"). Membership with
// incarnation fencing (not in main yet) never makes an older incarnation live again. Fails only
// when the zombie's port sorts before its replacement's.
TEST(FaultCampaignRegression, AZombieCoordinatorSplitsTheReportsAndCommitsStop) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(52175, {FaultKind::kJobRestart, FaultKind::kZombie,
                                            FaultKind::kZombie, FaultKind::kPartition});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// A daemon stopped, continued, and stopped again for a zombie 0.2 s later, before it could refute
// its death: its peers held it dead all along and never suspected it anew, and the campaign
// waited 30 s for a suspicion ("hang"; seeds 5000831, 5000656, 5000718 and, with a node loss
// after the stop, 5000747, on the 16-core machine). The campaign now also takes "already dead
// in a peer's view" for suspected.
TEST(FaultCampaignRegression, AStoppedDaemonStoppedAgainBeforeItRefutesIsNotSuspectedAnew) {
  const TrialResult r = RunScripted(5000831, {FaultKind::kDaemonStop, FaultKind::kZombie});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// n3, the job's coordinator, committed step 2 as it was cut off; the majority resumed the job
// from step 1 in a newer epoch. Once n3 was back, its push of the commit of 2 reached the others,
// which took its step although the record was older than the point they had resumed from: they
// released their slots of step 1 and dropped its fragments, n3 then found step 1 held nowhere
// and its ranks started fresh while the others had restored step 1 ("committed", "same-step";
// seed 17300003 with a second worker on the 2-core machine). A node's store and fragments now
// follow the newest commit record it holds, never a pushed one alone
// (protection_pipeline_test ...AStalePushOfACommitTheJobResumedWithoutReleasesNothing).
TEST(FaultCampaignRegression, AStaleCommitPushedAfterAPartitionReleasesNoRestorePoint) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(
      17300003, {FaultKind::kJobRestart, FaultKind::kPartitionRestart, FaultKind::kJobRestart});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// Two fragments flipped on n3, then n1 SIGSTOPped for a zombie right after step 4 was committed:
// for 30 s no peer logged a suspicion of n1, or any line at all, while the ranks waited for the
// killed ranks of n1 at their next step ("hang"; trial seed 17000001 of campaign seed 17000001,
// with a second worker beside it on the 2-core machine). Not understood: replayed alone and
// beside a second worker (7 times) it passed, as did 146 more trials on two workers (217
// zombies), and the logs do not tell whether n1 stopped at all. A hang now also lists each
// daemon's threads by state and wait channel (Trial::ProcessStates), which will tell next time.
TEST(FaultCampaignRegression, AZombieStoppedRightAfterACommitIsSuspected) {
  const TrialResult r = RunScripted(
      17000001, {FaultKind::kFlipFragment, FaultKind::kFlipFragment, FaultKind::kZombie});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// A flipped byte in the slot of a committed step, then its daemon re-protected the step when a
// holder of its fragments restarted: the fragments were encoded from the damaged slot with the
// sealed CRC in their metadata, so each passed its own check and the rebuild at the final
// restart failed the shard's CRC32C three times ("restore": DATA_LOSS; seed 6000711 on the
// 16-core machine). Protection now checks the slot's payload against its seal first.
TEST(FaultCampaignRegression, AFlippedSlotIsNeverEncodedIntoFragments) {
  const TrialResult r = RunScripted(6000711, {FaultKind::kTrainerKill, FaultKind::kRankRestart,
                                              FaultKind::kFlipSlot, FaultKind::kDaemonKill});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// The whole job restarted while n0 was cut off: the majority decided step 1, but n0 could reach
// none of its rank's fragments, its PrepareRestore answered NOT_FOUND, and the trainer started
// fresh ("committed", then "history"; seed 520503531 in the short campaign of make test).
// PrepareRestore now answers UNAVAILABLE while members that may hold the shard are not live,
// and the agent asks again.
TEST(FaultCampaignRegression, ACutOffNodeWaitsToMakeItsRankLocal) {
  if (!PartitionsPossible()) GTEST_SKIP() << "no partitions here: " << Options().no_partitions;
  const TrialResult r = RunScripted(520503531, {FaultKind::kPartitionRestart, FaultKind::kFlipSlot,
                                                FaultKind::kJobRestart, FaultKind::kTrainerKill});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

// A flipped byte in rank 4's slot of the committed step on n0, n1 lost with its memory (one
// fragment gone; n0 cannot re-protect from the damaged slot), then n2 stopped long enough to be
// held dead. At the final restart, just after n2 resumed, n0 could reach only n3's fragment and
// PrepareRestore answered DATA_LOSS ("only 1 intact fragments on live nodes, 2 are needed";
// seed 9000317 on the 16-core machine). A missing fragment now answers UNAVAILABLE while
// members that may hold it are not live, and the agent asks again until n2 is back.
TEST(FaultCampaignRegression, ARebuildWaitsForAStoppedHolderOfItsFragments) {
  const TrialResult r = RunScripted(9000317, {FaultKind::kFlipSlot, FaultKind::kNodeLoss,
                                              FaultKind::kDaemonStop});
  EXPECT_TRUE(r.failures.empty()) << Describe(r);
}

}  // namespace
}  // namespace tessera::testing
