#include "cuda/staging_plan.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::cuda {

absl::string_view StagingModeName(StagingMode mode) {
  switch (mode) {
    case StagingMode::kOff:
      return "off";
    case StagingMode::kFull:
      return "full";
    case StagingMode::kAdaptive:
      return "adaptive";
  }
  return "unknown";
}

absl::StatusOr<StagingMode> ParseStagingMode(absl::string_view name) {
  for (StagingMode mode : {StagingMode::kOff, StagingMode::kFull, StagingMode::kAdaptive}) {
    if (name == StagingModeName(mode)) return mode;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "staging mode '", name, "' is not one of: off, full, adaptive"));
}

namespace {

double Ms(double seconds) { return seconds * 1e3; }
double Gb(uint64_t bytes) { return static_cast<double>(bytes) / 1e9; }

}  // namespace

StagingPlan PlanStaging(const StagingPlanInput& input) {
  const uint64_t total = input.device_to_host_bytes;
  const uint64_t allowed = std::min(total, input.budget_bytes);
  const StagingMeasurements& m = input.measured;
  const bool measured = m.window_s >= 0 && m.d2h_bytes_per_s > 0;
  const double d2d_s_per_byte = m.d2d_bytes_per_s > 0 ? 1.0 / m.d2d_bytes_per_s : 0.0;
  const auto fence_copy_s = [&](uint64_t staged) {
    return static_cast<double>(staged) * d2d_s_per_byte +
           static_cast<double>(total - staged) / m.d2h_bytes_per_s;
  };

  StagingPlan plan;
  switch (input.mode) {
    case StagingMode::kOff:
      plan.reason = "staging off: the fence waits for the whole device-to-host copy";
      break;
    case StagingMode::kFull:
      plan.staged_bytes = allowed;
      plan.budget_short = allowed < total;
      plan.reason = absl::StrFormat("full staging: %.3f of %.3f GB", Gb(allowed), Gb(total));
      break;
    case StagingMode::kAdaptive: {
      if (total == 0) {
        plan.reason = "nothing to copy from the device";
        break;
      }
      if (!measured) {
        plan.staged_bytes = allowed;
        plan.budget_short = allowed < total;
        plan.reason = absl::StrFormat(
            "nothing measured yet: staging %.3f of %.3f GB (all the budget allows)", Gb(allowed),
            Gb(total));
        break;
      }
      const double window = m.window_s * input.window_margin;
      const double direct_s = static_cast<double>(total) / m.d2h_bytes_per_s;
      if (direct_s <= window) {
        plan.reason = absl::StrFormat("the copy (%.1f ms) fits in the window (%.1f ms)",
                                      Ms(direct_s), Ms(m.window_s));
        break;
      }
      const double saved_s_per_byte = 1.0 / m.d2h_bytes_per_s - d2d_s_per_byte;
      if (saved_s_per_byte <= 0) {
        plan.reason = "staging is no faster than the device-to-host copy: not staging";
        break;
      }
      const double needed = (direct_s - window) / saved_s_per_byte;
      const uint64_t granularity = std::max<uint64_t>(input.granularity, 1);
      uint64_t staged = static_cast<uint64_t>(std::ceil(needed / granularity)) * granularity;
      staged = std::min(staged, total);
      if (staged > allowed) {
        plan.budget_short = true;
        staged = allowed;
      }
      plan.staged_bytes = staged;
      plan.reason = absl::StrFormat(
          "the copy (%.1f ms) outlasts the window (%.1f ms): staging %.3f of %.3f GB%s",
          Ms(direct_s), Ms(m.window_s), Gb(staged), Gb(total),
          plan.budget_short ? absl::StrFormat(" (budget %.3f GB short of %.3f GB)",
                                              Gb(input.budget_bytes), needed / 1e9)
                            : std::string());
      break;
    }
  }
  if (measured) {
    plan.expected_stall_s = std::max(0.0, fence_copy_s(plan.staged_bytes) - m.window_s);
  }
  return plan;
}

}  // namespace tessera::cuda
