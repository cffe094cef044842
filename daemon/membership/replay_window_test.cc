#include "daemon/membership/replay_window.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

uint64_t Seed() {
  static const uint64_t seed = [] {
    const uint64_t s = std::random_device{}();
    std::printf("replay_window_test seed %llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// As UdpHeartbeats does: Check, then (the signature verified) Accept.
bool Take(ReplayWindow *w, const std::string &node, uint64_t incarnation, uint64_t sequence,
          absl::Time now) {
  if (!w->Check(node, incarnation, sequence, now).ok()) return false;
  EXPECT_TRUE(w->Accept(node, incarnation, sequence).ok());
  return true;
}

TEST(ReplayWindowTest, EachSequenceIsTakenOnceAndReorderingWithinTheWindowPasses) {
  std::mt19937_64 rng(Seed());
  ReplayWindow w;
  const absl::Time now = absl::Now();
  // 1..2000 in an order where each is at most kWindow - 1 behind the highest
  // taken so far: shuffled in blocks of 64.
  std::vector<uint64_t> order;
  for (uint64_t s = 1; s <= 2000; ++s) order.push_back(s);
  for (size_t i = 0; i < order.size(); i += 64) {
    std::shuffle(order.begin() + i, order.begin() + std::min(order.size(), i + 64), rng);
  }
  for (uint64_t s : order) EXPECT_TRUE(Take(&w, "n1", 7, s, now)) << s;
  // Every one again: refused, and Check says why.
  for (uint64_t s : order) EXPECT_FALSE(Take(&w, "n1", 7, s, now)) << s;
  const absl::Status again = w.Check("n1", 7, 2000, now);
  EXPECT_TRUE(absl::IsAlreadyExists(again)) << again;
  EXPECT_NE(again.message().find("taken already"), std::string::npos) << again;
  const absl::Status below = w.Check("n1", 7, 2000 - ReplayWindow::kWindow, now);
  EXPECT_NE(below.message().find("below the window"), std::string::npos) << below;
  // Another node's sequences are its own.
  EXPECT_TRUE(Take(&w, "n2", 7, 1999, now));
}

TEST(ReplayWindowTest, AGapLeavesItsSequencesOpenUntilTheyFallBelowTheWindow) {
  ReplayWindow w;
  const absl::Time now = absl::Now();
  ASSERT_TRUE(Take(&w, "n1", 7, 10, now));
  ASSERT_TRUE(Take(&w, "n1", 7, 10 + ReplayWindow::kWindow - 1, now));
  EXPECT_TRUE(w.Check("n1", 7, 11, now).ok()) << "just inside the window";
  ASSERT_TRUE(Take(&w, "n1", 7, 10 + ReplayWindow::kWindow, now));
  EXPECT_FALSE(w.Check("n1", 7, 10, now).ok()) << "one below the window";
  EXPECT_TRUE(w.Check("n1", 7, 11, now).ok());
  // A jump far ahead leaves nothing behind marked.
  ASSERT_TRUE(Take(&w, "n1", 7, 1'000'000, now));
  EXPECT_FALSE(w.Check("n1", 7, 11, now).ok());
  EXPECT_TRUE(w.Check("n1", 7, 999'999, now).ok());
}

TEST(ReplayWindowTest, CheckAloneMovesNothing) {
  // A forged datagram is Checked, then fails its signature: not Accepted.
  ReplayWindow w;
  const absl::Time now = absl::Now();
  ASSERT_TRUE(Take(&w, "n1", 7, 5, now));
  for (uint64_t forged : {uint64_t{1} << 62, ~uint64_t{0}}) {
    EXPECT_TRUE(w.Check("n1", 7, forged, now).ok());
    EXPECT_TRUE(w.Check("n1", 1000, forged, now).ok());  // a newer incarnation
  }
  EXPECT_TRUE(Take(&w, "n1", 7, 6, now));
  EXPECT_FALSE(Take(&w, "n1", 7, 5, now));
  EXPECT_EQ(w.nodes(), 1u);
}

TEST(ReplayWindowTest, ANewIncarnationStartsAFreshWindowAndTwoOlderAreRefusedButOneASecond) {
  ReplayWindow w;
  absl::Time now = absl::Now();
  ASSERT_TRUE(Take(&w, "n1", 100, 500, now));
  ASSERT_TRUE(Take(&w, "n1", 200, 1, now)) << "a new incarnation starts at its own sequence";
  ASSERT_TRUE(Take(&w, "n1", 200, 2, now));
  // The previous incarnation is still tracked (a replaced daemon's heartbeat
  // must be heard to be answered that it is fenced), its replays refused.
  EXPECT_TRUE(Take(&w, "n1", 100, 501, now));
  EXPECT_FALSE(Take(&w, "n1", 100, 500, now));
  // A third: the oldest is forgotten; its datagrams are older than both
  // tracked.
  ASSERT_TRUE(Take(&w, "n1", 300, 1, now));
  EXPECT_TRUE(Take(&w, "n1", 100, 502, now)) << "one older datagram a second is checked";
  for (int i = 0; i < 10; ++i) {
    const absl::Status s = w.Check("n1", 100, 503 + i, now + absl::Milliseconds(50 * i));
    EXPECT_TRUE(absl::IsAlreadyExists(s)) << i << ": " << s;
  }
  now += absl::Seconds(1);
  EXPECT_TRUE(w.Check("n1", 50, 1, now).ok());
  EXPECT_FALSE(w.Check("n1", 100, 600, now).ok());
  // Both tracked incarnations keep their windows.
  EXPECT_FALSE(Take(&w, "n1", 300, 1, now));
  EXPECT_FALSE(Take(&w, "n1", 200, 2, now));
  EXPECT_TRUE(Take(&w, "n1", 200, 3, now));
}

TEST(ReplayWindowTest, StateIsBoundedAndTheLeastRecentNodeIsForgotten) {
  ReplayWindow::Options options;
  options.max_nodes = 8;
  ReplayWindow w(options);
  const absl::Time now = absl::Now();
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(Take(&w, absl::StrCat("n", i), 1, 1, now));
  ASSERT_TRUE(Take(&w, "n0", 1, 2, now));  // n1 is now the least recent
  for (int i = 8; i < 1000; ++i) {
    // Checks alone (forgeries) make no state, whatever node they claim.
    EXPECT_TRUE(w.Check(absl::StrCat("n", i), 1, 1, now).ok());
  }
  EXPECT_EQ(w.nodes(), 8u);
  ASSERT_TRUE(Take(&w, "n8", 1, 1, now));
  EXPECT_EQ(w.nodes(), 8u);
  EXPECT_TRUE(w.Check("n1", 1, 1, now).ok()) << "n1 was forgotten";
  EXPECT_FALSE(w.Check("n0", 1, 2, now).ok()) << "n0 was not";
  EXPECT_FALSE(w.Check("n2", 1, 1, now).ok());
}

}  // namespace
}  // namespace tessera
