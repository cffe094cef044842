#include "cuda/staging_plan.h"

#include <cstdint>
#include <iostream>
#include <random>

#include "gtest/gtest.h"

namespace tessera::cuda {
namespace {

constexpr uint64_t kGB = 1'000'000'000;

// The H100 figures: 9.7 GB of state, 55 GB/s to host, about 1.3 TB/s device to device.
StagingPlanInput H100(StagingMode mode, double window_s, uint64_t budget) {
  StagingPlanInput input;
  input.mode = mode;
  input.device_to_host_bytes = 9'700'000'000;
  input.budget_bytes = budget;
  input.measured = {window_s, 55e9, 1.3e12};
  return input;
}

// The time the fence-side copies take with `staged` bytes staged.
double FenceSeconds(const StagingPlanInput& input, uint64_t staged) {
  return staged / input.measured.d2d_bytes_per_s +
         (input.device_to_host_bytes - staged) / input.measured.d2h_bytes_per_s;
}

TEST(StagingModeTest, NamesRoundTripAndBadNamesSayWhatIsAccepted) {
  for (StagingMode mode : {StagingMode::kOff, StagingMode::kFull, StagingMode::kAdaptive}) {
    absl::StatusOr<StagingMode> parsed = ParseStagingMode(StagingModeName(mode));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, mode);
  }
  absl::StatusOr<StagingMode> bad = ParseStagingMode("lazy");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'lazy' is not one of: off, full, adaptive"),
            std::string::npos)
      << bad.status();
}

TEST(StagingPlanTest, OffStagesNothingAndPredictsTheLazyFenceStall) {
  const StagingPlanInput input = H100(StagingMode::kOff, 0.075, 20 * kGB);
  const StagingPlan plan = PlanStaging(input);
  EXPECT_EQ(plan.staged_bytes, 0u);
  EXPECT_NEAR(plan.expected_stall_s, 9.7 / 55 - 0.075, 1e-9);
}

TEST(StagingPlanTest, FullStagesEverythingTheBudgetAllows) {
  StagingPlan plan = PlanStaging(H100(StagingMode::kFull, 0.075, 20 * kGB));
  EXPECT_EQ(plan.staged_bytes, 9'700'000'000u);
  EXPECT_FALSE(plan.budget_short);
  EXPECT_EQ(plan.expected_stall_s, 0);
  plan = PlanStaging(H100(StagingMode::kFull, 0.075, 4 * kGB));
  EXPECT_EQ(plan.staged_bytes, 4 * kGB);
  EXPECT_TRUE(plan.budget_short);
}

TEST(StagingPlanTest, AdaptiveStagesNothingWhenTheCopyFitsInTheWindow) {
  const StagingPlan plan = PlanStaging(H100(StagingMode::kAdaptive, 0.300, 20 * kGB));
  EXPECT_EQ(plan.staged_bytes, 0u);
  EXPECT_EQ(plan.expected_stall_s, 0);
  EXPECT_NE(plan.reason.find("fits in the window"), std::string::npos) << plan.reason;
}

TEST(StagingPlanTest, AdaptiveStagesEverythingWhenNothingFits) {
  const StagingPlan plan = PlanStaging(H100(StagingMode::kAdaptive, 0.0, 20 * kGB));
  EXPECT_EQ(plan.staged_bytes, 9'700'000'000u);
  EXPECT_FALSE(plan.budget_short);
}

TEST(StagingPlanTest, AdaptiveStagesPartWhenPartFits) {
  const StagingPlanInput input = H100(StagingMode::kAdaptive, 0.075, 20 * kGB);
  const StagingPlan plan = PlanStaging(input);
  EXPECT_GT(plan.staged_bytes, 0u);
  EXPECT_LT(plan.staged_bytes, input.device_to_host_bytes);
  EXPECT_EQ(plan.staged_bytes % input.granularity, 0u);
  // Fits in the window with the margin, and one granule less would not.
  EXPECT_LE(FenceSeconds(input, plan.staged_bytes), 0.075 * input.window_margin + 1e-12);
  EXPECT_GT(FenceSeconds(input, plan.staged_bytes - input.granularity),
            0.075 * input.window_margin);
  EXPECT_EQ(plan.expected_stall_s, 0);
}

TEST(StagingPlanTest, AShortBudgetStagesWhatItCanAndPredictsTheStall) {
  const StagingPlanInput input = H100(StagingMode::kAdaptive, 0.075, 2 * kGB);
  const StagingPlan plan = PlanStaging(input);
  EXPECT_EQ(plan.staged_bytes, 2 * kGB);
  EXPECT_TRUE(plan.budget_short);
  EXPECT_NEAR(plan.expected_stall_s, FenceSeconds(input, 2 * kGB) - 0.075, 1e-9);
  EXPECT_GT(plan.expected_stall_s, 0);
  // Never worse than not staging.
  EXPECT_LT(plan.expected_stall_s, 9.7 / 55 - 0.075);
}

TEST(StagingPlanTest, WithoutMeasurementsAdaptiveStagesAllTheBudgetAllows) {
  StagingPlanInput input = H100(StagingMode::kAdaptive, -1, 20 * kGB);
  StagingPlan plan = PlanStaging(input);
  EXPECT_EQ(plan.staged_bytes, input.device_to_host_bytes);
  EXPECT_LT(plan.expected_stall_s, 0) << "nothing measured: the stall is unknown";
  input.budget_bytes = 0;
  plan = PlanStaging(input);
  EXPECT_EQ(plan.staged_bytes, 0u);
  EXPECT_TRUE(plan.budget_short);
}

// Random inputs: the adaptive plan is never worse than no staging, never above the budget or the
// total, and stages nothing whenever no staging keeps the fence within the window.
TEST(StagingPlanTest, AdaptiveIsNeverWorseThanTheLazyFence) {
  const uint64_t seed = std::random_device{}();
  std::cout << "seed " << seed << "\n";
  std::mt19937_64 random(seed);
  std::uniform_real_distribution<double> unit(0, 1);
  for (int i = 0; i < 10000; ++i) {
    StagingPlanInput input;
    input.mode = StagingMode::kAdaptive;
    input.device_to_host_bytes = random() % (40 * kGB);
    input.budget_bytes = random() % (40 * kGB);
    input.measured = {unit(random) * 0.5, 1e9 + unit(random) * 60e9, 100e9 + unit(random) * 3e12};
    input.granularity = 1 + random() % (4 << 20);
    const StagingPlan plan = PlanStaging(input);
    SCOPED_TRACE(plan.reason);
    ASSERT_LE(plan.staged_bytes, input.device_to_host_bytes);
    ASSERT_LE(plan.staged_bytes, input.budget_bytes);
    input.mode = StagingMode::kOff;
    const StagingPlan lazy = PlanStaging(input);
    ASSERT_LE(plan.expected_stall_s, lazy.expected_stall_s + 1e-12);
    if (FenceSeconds(input, 0) <= input.measured.window_s * input.window_margin) {
      ASSERT_EQ(plan.staged_bytes, 0u);
    }
  }
}

TEST(EwmaTest, TakesTheFirstSampleThenMovesByItsWeight) {
  Ewma average(0.25);
  EXPECT_LT(average.value(), 0);
  average.Add(8);
  EXPECT_EQ(average.value(), 8);
  average.Add(16);
  EXPECT_EQ(average.value(), 10);
}

TEST(RecentMinTest, IsTheSmallestOfTheLastSamples) {
  RecentMin window;
  EXPECT_LT(window.value(), 0);
  window.Add(0.100);
  window.Add(0.450);  // a pause: ignored while a shorter window is recent
  EXPECT_EQ(window.value(), 0.100);
  for (size_t i = 0; i < RecentMin::kSamples - 1; ++i) window.Add(0.120);
  EXPECT_EQ(window.value(), 0.120) << "the 0.100 sample is older than the last kSamples";
}

}  // namespace
}  // namespace tessera::cuda
