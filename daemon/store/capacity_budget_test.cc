#include "daemon/store/capacity_budget.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

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
