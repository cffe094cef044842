#include "daemon/coordination/protection.h"

#include <map>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

std::vector<std::string> Nodes(int n) {
  std::vector<std::string> v;
  for (int i = 0; i < n; ++i) v.push_back(absl::StrCat("node", i));
  return v;
}

TEST(PlaceFragmentsTest, DistinctNodesOtherThanOwnerAndEvenLoad) {
  auto members = Nodes(6);
  std::map<std::string, int> load;
  for (uint32_t rank = 0; rank < 12; ++rank) {
    const std::string owner = members[rank / 2];
    auto p = PlaceFragments(members, owner, rank, 3, 2);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_FALSE(p->degraded);
    ASSERT_EQ(p->nodes.size(), 5u);
    std::set<std::string> distinct(p->nodes.begin(), p->nodes.end());
    EXPECT_EQ(distinct.size(), 5u);
    EXPECT_EQ(distinct.count(owner), 0u);
    for (const auto& n : p->nodes) ++load[n];
    // Every other member not placed is a spare, in the rotation's order.
    ASSERT_EQ(p->spares.size(), 0u);
  }
  // 12 shards x 5 fragments over 6 nodes: 10 each.
  for (const auto& [node, count] : load) EXPECT_EQ(count, 10) << node;
}

TEST(PlaceFragmentsTest, TheOtherMembersAreSparesInTheRotationsOrder) {
  auto members = Nodes(8);
  for (uint32_t rank = 0; rank < 14; ++rank) {
    const std::string owner = members[rank / 2];
    auto p = PlaceFragments(members, owner, rank, 3, 2);
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_EQ(p->spares.size(), 2u);
    std::set<std::string> all(p->nodes.begin(), p->nodes.end());
    all.insert(p->spares.begin(), p->spares.end());
    EXPECT_EQ(all.size(), 7u) << "placed and spares are every other member once";
    EXPECT_EQ(all.count(owner), 0u);
    // The rotation continues: the first spare follows the last placed node among the others.
    std::vector<std::string> others;
    for (const auto& n : members) {
      if (n != owner) others.push_back(n);
    }
    const size_t last = std::find(others.begin(), others.end(), p->nodes.back()) - others.begin();
    EXPECT_EQ(p->spares[0], others[(last + 1) % others.size()]);
  }
  auto p = PlaceFragments(Nodes(4), "node0", 0, 3, 2);  // shrunk: no spare
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->spares.empty());
}

TEST(PlaceFragmentsTest, ShrinksWithFewNodesAndSaysSo) {
  auto p = PlaceFragments(Nodes(4), "node0", 0, 3, 2);  // 3 others: RS(1,2)
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->k, 1);
  EXPECT_EQ(p->m, 2);
  EXPECT_TRUE(p->degraded);
  EXPECT_NE(p->reason.find("shrinks"), std::string::npos);
  p = PlaceFragments(Nodes(5), "node0", 0, 3, 2);  // 4 others: RS(2,2)
  EXPECT_EQ(p->k, 2);
  EXPECT_EQ(p->m, 2);
  p = PlaceFragments(Nodes(2), "node1", 0, 3, 2);  // 1 other: replication
  EXPECT_EQ(p->k, 1);
  EXPECT_EQ(p->m, 0);
  EXPECT_EQ(p->nodes, std::vector<std::string>{"node0"});
  p = PlaceFragments(Nodes(1), "node0", 0, 3, 2);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->nodes.empty());
  EXPECT_NE(p->reason.find("no cross-node protection"), std::string::npos);
  EXPECT_EQ(PlaceFragments(Nodes(3), "nodeX", 0, 3, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlaceFragments(Nodes(3), "node0", 0, 0, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CoordinatorForTest, StableAndIndependentOfOrder) {
  auto a = Nodes(5);
  auto b = a;
  std::reverse(b.begin(), b.end());
  EXPECT_EQ(CoordinatorFor("job-x", a), CoordinatorFor("job-x", b));
  std::set<std::string> chosen;
  for (int j = 0; j < 50; ++j) chosen.insert(CoordinatorFor(absl::StrCat("job", j), a));
  EXPECT_GT(chosen.size(), 2u) << "jobs spread over coordinators";
}


JobHoldings Holdings(int world, int64_t step, uint32_t k, uint32_t m) {
  // Rank r's shard lives on node r; its fragments on the next k+m nodes.
  JobHoldings h;
  const int n = world + static_cast<int>(k + m);
  for (int r = 0; r < world; ++r) {
    h.shards.push_back({absl::StrCat("node", r), static_cast<uint32_t>(r), step,
                        static_cast<uint32_t>(world), 1000, 77});
    for (uint32_t i = 0; i < k + m; ++i) {
      h.fragments.push_back({absl::StrCat("node", (r + 1 + i) % n), static_cast<uint32_t>(r), step,
                             static_cast<uint32_t>(world), i, k, m, 1000, 77});
    }
  }
  return h;
}

void Lose(JobHoldings* h, const std::string& node) {
  auto& s = h->shards;
  s.erase(std::remove_if(s.begin(), s.end(), [&](const HeldShard& x) { return x.node == node; }), s.end());
  auto& f = h->fragments;
  f.erase(std::remove_if(f.begin(), f.end(), [&](const HeldFragment& x) { return x.node == node; }), f.end());
}

TEST(PlanRestoreTest, LocalThenCopyThenRebuildThenDataLoss) {
  JobHoldings h = Holdings(2, 7, 3, 2);
  auto p = PlanRestore(h, "node0", 0, 7);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->source, RestorePlan::Source::kLocal);
  p = PlanRestore(h, "node5", 0, 7);
  EXPECT_EQ(p->source, RestorePlan::Source::kCopy);
  EXPECT_EQ(p->node, "node0");
  Lose(&h, "node0");  // the owner
  p = PlanRestore(h, "node5", 0, 7);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->source, RestorePlan::Source::kRebuild);
  ASSERT_EQ(p->fragments.size(), 3u);
  EXPECT_EQ(p->fragments[0].first, 0u);  // data fragments first
  Lose(&h, "node1");
  Lose(&h, "node2");  // owner + m = 2 others lost: still k fragments
  p = PlanRestore(h, "node5", 0, 7);
  ASSERT_TRUE(p.ok()) << p.status();
  std::set<std::pair<uint32_t, std::string>> corrupt = {{p->fragments[0].first, p->fragments[0].second}};
  auto q = PlanRestore(h, "node5", 0, 7, corrupt);  // one more counts as an erasure
  EXPECT_EQ(q.status().code(), absl::StatusCode::kDataLoss) << q.status();
  EXPECT_NE(q.status().message().find("only 2 intact fragments"), std::string::npos) << q.status();
  EXPECT_EQ(PlanRestore(h, "node5", 0, 8).status().code(), absl::StatusCode::kNotFound);
}

TEST(FindLatestRestorableTest, NewestStepWhereEveryRankCanBeRebuilt) {
  JobHoldings h = Holdings(3, 10, 2, 1);
  JobHoldings newer = Holdings(3, 20, 2, 1);
  h.shards.insert(h.shards.end(), newer.shards.begin(), newer.shards.end() - 1);  // rank 2 missing
  newer.fragments.erase(std::remove_if(newer.fragments.begin(), newer.fragments.end(),
                                       [](const HeldFragment& f) { return f.rank == 2 && f.index > 0; }),
                        newer.fragments.end());
  h.fragments.insert(h.fragments.end(), newer.fragments.begin(), newer.fragments.end());
  auto latest = FindLatestRestorable(h);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, 10) << "step 20 lacks rank 2";
  JobHoldings none = Holdings(2, 5, 2, 1);
  Lose(&none, "node0");
  Lose(&none, "node1");
  Lose(&none, "node2");
  auto lost = FindLatestRestorable(none);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(lost.status().message().find("rank 0 step 5"), std::string::npos) << lost.status();
  EXPECT_EQ(FindLatestRestorable({}).status().code(), absl::StatusCode::kNotFound);
}

// Shards listed by peers carry no world size. Ranks 0 and 1 of a job of 3 sealed step 1 before
// rank 2 started: step 1 is not restorable for the job, however few ranks the holdings show.
TEST(FindLatestRestorableTest, RanksThatSealedNothingYetStillCount) {
  JobHoldings h;
  h.shards.push_back({"node0", 0, 1, 0, 100, 7});
  h.shards.push_back({"node1", 1, 1, 0, 100, 9});
  auto unknown_world = FindLatestRestorable(h);
  ASSERT_TRUE(unknown_world.ok()) << "ranks 0 and 1 are all the holdings show";
  EXPECT_EQ(*unknown_world, 1);
  auto with_hint = FindLatestRestorable(h, /*min_world_size=*/3);
  ASSERT_EQ(with_hint.status().code(), absl::StatusCode::kNotFound) << with_hint.status();
  EXPECT_NE(with_hint.status().message().find("rank 2"), std::string::npos) << with_hint.status();
  // Only rank 1 holds step 2: rank 0 (below the highest rank held) is missing even without a hint.
  h.shards.push_back({"node1", 1, 2, 0, 100, 11});
  auto newest = FindLatestRestorable(h);
  ASSERT_TRUE(newest.ok()) << newest.status();
  EXPECT_EQ(*newest, 1);
}

}  // namespace
}  // namespace tessera
