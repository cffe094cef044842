// How many bytes of a snapshot to stage on the GPU so that the fence does not stall training.
//
// A snapshot's device-to-host copy must be over before the next optimizer step overwrites the
// state (the fence). When that copy outlasts the window between snapshot() and the fence
// (forward and backward), the optimizer step stalls. Staging copies part of the state
// device-to-device, at HBM speed, into a buffer before the fence; that part then goes to host
// from the buffer, after the fence. With S bytes staged out of T, the fence waits for
//
//     S / d2d_rate + (T - S) / d2h_rate
//
// at most: the engine runs the staging beside the copy of the bytes not staged, so the fence
// waits for the longer of the two where the device overlaps them and for their sum where it
// does not. The plan takes the sum, which is never too little, and picks the smallest S that
// keeps it within the window (times a margin for the
// iteration-to-iteration jitter), bounded by the GPU memory budget. When nothing is measured yet
// it stages all it may: a first snapshot must not stall for want of a measurement.
//
// Pure arithmetic, no CUDA: the engine measures, this decides.
#ifndef TESSERA_CUDA_STAGING_PLAN_H_
#define TESSERA_CUDA_STAGING_PLAN_H_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tessera::cuda {

enum class StagingMode {
  kOff,       // no staging: the fence waits for the whole device-to-host copy (the lazy fence)
  kFull,      // stage every device-to-host byte the budget allows
  kAdaptive,  // stage the fewest bytes that keep the fence from stalling
};

// "off", "full", "adaptive".
absl::string_view StagingModeName(StagingMode mode);
// Parses a name above; kInvalidArgument names the accepted ones.
absl::StatusOr<StagingMode> ParseStagingMode(absl::string_view name);

struct StagingMeasurements {
  double window_s = -1;         // GPU time from the snapshot point to the fence; < 0: unknown
  double d2h_bytes_per_s = -1;  // achieved device-to-host rate; <= 0: unknown
  double d2d_bytes_per_s = -1;  // achieved device-to-device (staging) rate; <= 0: unknown
};

struct StagingPlan {
  uint64_t staged_bytes = 0;
  // The fence's expected wait beyond the window, in seconds; < 0 when it cannot be estimated
  // (nothing measured yet).
  double expected_stall_s = -1;
  bool budget_short = false;  // the plan wanted more than the budget
  std::string reason;         // one line for the log
};

struct StagingPlanInput {
  StagingMode mode = StagingMode::kAdaptive;
  uint64_t device_to_host_bytes = 0;  // the snapshot's stageable bytes
  uint64_t budget_bytes = 0;          // GPU memory the staging buffer may take
  StagingMeasurements measured;
  // The share of the measured window the fence-side copies may fill.
  double window_margin = 0.9;
  // Staged amounts are rounded up to this, so that small changes in the measurements do not
  // resize the buffer.
  uint64_t granularity = uint64_t{2} << 20;
};

StagingPlan PlanStaging(const StagingPlanInput& input);

// Exponentially weighted moving average; the first sample is taken as is.
class Ewma {
 public:
  explicit Ewma(double weight) : weight_(weight) {}
  void Add(double sample) {
    value_ = value_ < 0 ? sample : value_ + weight_ * (sample - value_);
  }
  double value() const { return value_; }  // < 0 until the first sample

 private:
  double weight_;
  double value_ = -1;
};

// The smallest of the last kSamples samples. The window between snapshot and fence is estimated
// this way: one long sample (an evaluation pause, a slow data loader, a checkpoint) must not make
// the plan count on a window the next iterations do not have, while an average would.
class RecentMin {
 public:
  static constexpr size_t kSamples = 8;
  void Add(double sample) {
    samples_[next_++ % kSamples] = sample;
    count_ = std::min(count_ + 1, kSamples);
  }
  double value() const {  // < 0 until the first sample
    if (count_ == 0) return -1;
    return *std::min_element(samples_.begin(), samples_.begin() + count_);
  }

 private:
  std::array<double, kSamples> samples_{};
  size_t next_ = 0;
  size_t count_ = 0;
};

}  // namespace tessera::cuda

#endif  // TESSERA_CUDA_STAGING_PLAN_H_
