// Seeded training state in device memory for the GPU tests (see gpu_state_kernels.h for the byte
// scheme): tensors of mixed dtypes and odd sizes, allocated with cudaMalloc, plus one host blob
// holding the step, so a snapshot mixes device and host memory. Filling, advancing and checking
// run as kernels on the given stream.
#ifndef TESSERA_TESTS_GPU_GPU_STATE_H_
#define TESSERA_TESTS_GPU_GPU_STATE_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent/client.h"

namespace tessera::testing::gpu {

struct GpuLayout {
  uint64_t seed = 1;
  int tensors = 8;            // 1 to 300 and more
  uint64_t min_bytes = 1;     // tensor sizes spread log-uniformly over [min_bytes, max_bytes],
  uint64_t max_bytes = 1 << 20;  // capped so that they sum to at most total_bytes
  uint64_t total_bytes = 64 << 20;
};

// "" when a CUDA device is usable, otherwise why not (for GTEST_SKIP and the trainer).
std::string NoGpuReason();

class GpuState {
 public:
  // Allocates the layout's tensors on the current device. Contents are undefined until Fill.
  static absl::StatusOr<std::unique_ptr<GpuState>> Create(const GpuLayout& layout,
                                                          cudaStream_t stream);
  ~GpuState();
  GpuState(const GpuState&) = delete;
  GpuState& operator=(const GpuState&) = delete;

  // Enqueue kernels on the stream; they do not synchronise. The host blob is written at once.
  absl::Status Fill(int64_t step);
  absl::Status Advance(int64_t from, int64_t to);  // the optimizer step
  absl::Status Scramble(uint64_t salt);            // noise that no step produces
  // Synchronises the stream, then returns "" when every byte holds the state of `step`,
  // otherwise the mismatching tensors with their byte counts.
  absl::StatusOr<std::string> Check(int64_t step);

  // Entries for Client::Register: the device tensors, then the host blob "trainer_step".
  std::vector<Client::Entry> ClientEntries();

  size_t tensors() const { return tensors_.size(); }
  uint64_t device_bytes() const { return device_bytes_; }
  cudaStream_t stream() const { return stream_; }

 private:
  struct Tensor {
    EntrySpec spec;
    void* data = nullptr;
    uint64_t bytes = 0;
  };
  struct StepBlob {
    int64_t step;
    uint64_t check;  // a function of (seed, step)
  };

  GpuState(const GpuLayout& layout, cudaStream_t stream) : layout_(layout), stream_(stream) {}

  const GpuLayout layout_;
  const cudaStream_t stream_;
  std::vector<Tensor> tensors_;
  uint64_t device_bytes_ = 0;
  unsigned long long* mismatches_ = nullptr;  // one counter per tensor, device memory
  StepBlob blob_{};
};

}  // namespace tessera::testing::gpu

#endif  // TESSERA_TESTS_GPU_GPU_STATE_H_
