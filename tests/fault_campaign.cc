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
  absl::StrAppend(&out, "\nrerun: tools/campaign.sh --seed ", r.seed, " --trials 1");
  return out;
}

TEST(JournalTest, AcceptsOnlyTheHistoryTheJobResumed) {
  Journal j;
  // Launch 1 snapshots steps 1..6; launch 2 resumes step 4 and snapshots 5..7 anew.
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

// A few random trials, bounded to about two minutes here. TESSERA_TEST_SEED repeats a campaign;
// TESSERA_CAMPAIGN_TRIALS changes how many trials at most.
TEST(FaultCampaignTest, ShortRandomCampaign) {
  signal(SIGPIPE, SIG_IGN);
  const uint64_t seed = TestSeed() % 1000000000;
  const char* env = std::getenv("TESSERA_CAMPAIGN_TRIALS");
  const int trials = env != nullptr ? std::atoi(env) : 3;
  TrialOptions options = Options();
  options.min_faults = 2;
  options.max_faults = 4;
  for (const TrialResult& r : RunCampaign(seed, trials, /*budget_s=*/90, options)) {
    EXPECT_TRUE(r.failures.empty()) << Describe(r);
  }
}

}  // namespace
}  // namespace tessera::testing
