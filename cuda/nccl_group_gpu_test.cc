// NCCL broadcasts of the agent's DP-sharded restore (cuda/nccl_group.h), on a real GPU. Skips,
// saying why, where no CUDA device or no loadable libnccl exists (set TESSERA_NCCL_LIBRARY, or
// LD_LIBRARY_PATH to a directory with libnccl.so.2).
//
// One GPU allows a communicator of one member only (NCCL refuses two members on one device), so
// this checks the library, the non-blocking communicator, grouped broadcasts and the deadline; a
// group of several members is covered where several GPUs exist.
#include "cuda/nccl_group.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <random>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tessera::cuda {
namespace {

class NcclGroupGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::Status available = NcclAvailable();
    if (!available.ok()) GTEST_SKIP() << available.message();
    std::printf("NCCL %s\n", NcclVersion().c_str());
  }
};

TEST_F(NcclGroupGpuTest, OneMemberGroupBroadcastsKeepEveryByte) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::vector<size_t> sizes = {1, 255, 4096, size_t{3} << 20, 12345677};
  for (int i = 0; i < 600; ++i) sizes.push_back(1 + rng() % 70000);  // several groups of ops
  std::vector<std::vector<uint8_t>> host;
  std::vector<void*> device;
  std::vector<BroadcastOp> ops;
  for (size_t n : sizes) {
    std::vector<uint8_t> bytes(n);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    void* d = nullptr;
    ASSERT_EQ(cudaMalloc(&d, n), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d, bytes.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
    host.push_back(std::move(bytes));
    device.push_back(d);
    ops.push_back({d, n, 0});
  }
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_EQ(id->size(), 128u);
  absl::Status status = NcclBroadcast(*id, 0, 1, -1, ops, absl::Seconds(60));
  ASSERT_TRUE(status.ok()) << status;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::vector<uint8_t> back(sizes[i]);
    ASSERT_EQ(cudaMemcpy(back.data(), device[i], sizes[i], cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(back, host[i]) << "buffer " << i;
    cudaFree(device[i]);
  }
}

TEST_F(NcclGroupGpuTest, AMemberThatNeverJoinsEndsInDeadlineNotAHang) {
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 4096), cudaSuccess);
  const absl::Time start = absl::Now();
  // Member 0 of 2; member 1 never comes.
  absl::Status status = NcclBroadcast(*id, 0, 2, -1, {{d, 4096, 0}}, absl::Seconds(3));
  const absl::Duration took = absl::Now() - start;
  cudaFree(d);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_LT(took, absl::Seconds(30)) << "the abort itself must not hang";
  std::printf("gave up after %.1f s: %s\n", absl::ToDoubleSeconds(took),
              std::string(status.message()).c_str());
}

TEST_F(NcclGroupGpuTest, BadArgumentsAreNamed) {
  auto status = NcclBroadcast("short", 0, 1, -1, {}, absl::Seconds(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("128 bytes"), std::string::npos) << status;
  auto id = NcclUniqueId();
  ASSERT_TRUE(id.ok());
  status = NcclBroadcast(*id, 0, 1, -1, {{nullptr, 0, 3}}, absl::Seconds(1));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("root 3 of 1"), std::string::npos) << status;
}

}  // namespace
}  // namespace tessera::cuda
