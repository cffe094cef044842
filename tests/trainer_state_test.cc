// The test trainer's history-dependent state: a restored state is checked by replaying the
// history it records, and launches that diverge never produce the same bytes.
#include "tests/trainer_state.h"

#include <random>

#include "gtest/gtest.h"

namespace tessera::testing {
namespace {

HistoryState Make(uint64_t chain_seed = 11) {
  return HistoryState(7, chain_seed, 5, 1000, 5000, 20000);
}

// Copies the bytes and lengths of `from` into `to`, as a restore does.
void CopyInto(const HistoryState& from, HistoryState* to) {
  for (size_t i = 0; i < from.entries().size(); ++i) {
    to->entries()[i].bytes = from.entries()[i].bytes;
    to->entries()[i].length = from.entries()[i].length;
  }
}

TEST(HistoryStateTest, RestoredStateReplaysAndContinuesItsHistory) {
  HistoryState a = Make();
  a.StartLaunch(1);
  for (int i = 0; i < 6; ++i) a.Advance();
  HistoryState b = Make();
  Scramble(&b.entries(), 3);
  CopyInto(a, &b);
  ASSERT_EQ(b.AdoptRestored(6), "");
  EXPECT_EQ(DigestState(b.entries()), DigestState(a.entries()));
  EXPECT_EQ(b.DescribeLaunches(), "1@0");
  // The same launch continued the same way is the same history.
  a.Advance();
  b.Advance();
  EXPECT_EQ(DigestState(b.entries()), DigestState(a.entries()));
}

TEST(HistoryStateTest, LaunchesFromOneStepDivergeAndNeverMeetAgain) {
  HistoryState base = Make();
  base.StartLaunch(1);
  for (int i = 0; i < 4; ++i) base.Advance();
  HistoryState b = base, c = base;
  b.StartLaunch(2);
  c.StartLaunch(3);
  for (int i = 0; i < 5; ++i) {
    b.Advance();
    c.Advance();
    for (size_t e = 0; e + 1 < b.entries().size(); ++e) {
      EXPECT_NE(b.entries()[e].bytes, c.entries()[e].bytes) << "entry " << e << " step " << b.step();
    }
    EXPECT_NE(DigestState(b.entries()), DigestState(c.entries()));
  }
  // A fresh start folds its launch in too.
  HistoryState d = Make(), e = Make();
  d.StartLaunch(4);
  e.StartLaunch(5);
  d.Advance();
  e.Advance();
  EXPECT_NE(DigestState(d.entries()), DigestState(e.entries()));
  // Ranks differ by their chain seed.
  HistoryState r0 = Make(100), r1 = Make(101);
  r0.StartLaunch(1);
  r1.StartLaunch(1);
  r0.Advance();
  r1.Advance();
  EXPECT_NE(DigestState(r0.entries()), DigestState(r1.entries()));
}

TEST(HistoryStateTest, MixedTornOrMislabelledRestoresAreCaught) {
  std::mt19937_64 rng(42);
  HistoryState a = Make();
  a.StartLaunch(1);
  for (int i = 0; i < 3; ++i) a.Advance();
  HistoryState a3 = a;
  a.Advance();  // step 4
  // Another step's bytes under this step's number.
  HistoryState b = Make();
  CopyInto(a3, &b);
  EXPECT_NE(b.AdoptRestored(4), "");
  // One tensor of another step.
  CopyInto(a, &b);
  b.entries()[1].bytes = a3.entries()[1].bytes;
  EXPECT_NE(b.AdoptRestored(4), "");
  // One flipped byte anywhere.
  for (int trial = 0; trial < 20; ++trial) {
    CopyInto(a, &b);
    auto& e = b.entries()[rng() % b.entries().size()];
    e.bytes[rng() % e.length] ^= static_cast<uint8_t>(1 + rng() % 255);
    EXPECT_NE(b.AdoptRestored(4), "") << "trial " << trial;
  }
  // A failed check keeps the history the state had.
  EXPECT_EQ(b.step(), 0);
  CopyInto(a, &b);
  EXPECT_EQ(b.AdoptRestored(4), "");
  EXPECT_EQ(b.step(), 4);
}

TEST(HistoryStateTest, LongHistoriesKeepTheNewestLaunchesAndStillReplay) {
  HistoryState a = Make();
  for (int launch = 1; launch <= 300; ++launch) {
    a.StartLaunch(launch);
    a.Advance();
  }
  EXPECT_EQ(a.launches().size(), 128u);
  EXPECT_EQ(a.launches().back().id, 300u);
  HistoryState b = Make();
  CopyInto(a, &b);
  ASSERT_EQ(b.AdoptRestored(300), "");
  EXPECT_EQ(DigestState(b.entries()), DigestState(a.entries()));
}

}  // namespace
}  // namespace tessera::testing
