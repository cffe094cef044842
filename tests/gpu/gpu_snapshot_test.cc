// The CUDA snapshot path end to end, with real processes: a trainer whose state lives in device
// memory (tests/gpu/gpu_trainer.cc) snapshots into a real tesserad every step, is SIGKILLed at
// random instants while copies and seals are in flight, and the next process restores the newest
// sealed step and checks every byte on the device. And the fence, through the Client: a kernel
// that overwrites the tensors right after Fence must not leak into the snapshot.
//
// Skips, saying why, where no CUDA device is usable. Environment:
//   TESSERA_TEST_SEED           the seed (printed by every test)
//   TESSERA_GPU_KILLS           kills per layout (default 3)
//   TESSERA_GPU_LARGE_BYTES     state of the large kill test (default 10 GB; 0 skips it)
//   TESSERA_GPU_LARGE_KILLS     kills in the large test (default 3)
//   TESSERA_GPU_FENCE_BYTES     state of the fence tests (default 1 GiB)
//   TESSERA_GPU_TRAINER         path of gpu_trainer (default: the runfiles' tests/gpu/gpu_trainer;
//                               tesserad comes from the runfiles, see tests/harness.h)
#include <cuda_runtime_api.h>
#include <signal.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/client.h"
#include "gtest/gtest.h"
#include "tests/gpu/gpu_state.h"
#include "tests/gpu/gpu_state_kernels.h"
#include "tests/harness.h"

namespace tessera::testing::gpu {
namespace {

using std::chrono::milliseconds;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::strtoull(value, nullptr, 0) : fallback;
}

std::string TrainerPath() {
  const char* path = std::getenv("TESSERA_GPU_TRAINER");
  return path != nullptr && *path != '\0' ? path : BinaryPath("tests/gpu/gpu_trainer");
}

struct Layout {
  const char* name;
  int tensors;
  uint64_t min_bytes, max_bytes, total_bytes;
  int max_run_ms;  // how long a trainer may run before it is killed
};

// From a few bytes to 1 GiB, from 1 to 300 tensors, odd sizes, six dtypes.
const Layout kLayouts[] = {
    {"tiny", 1, 1, 7, 7, 40},
    {"many", 300, 1, 256 << 10, 16 << 20, 200},
    {"mixed", 40, 1 << 10, 64 << 20, 512 << 20, 500},
    {"wide", 6, 32 << 20, 256 << 20, 1 << 30, 700},
};

bool IsStartLine(const std::string& l) {
  return l == "fresh" || absl::StartsWith(l, "resumed ") || absl::StartsWith(l, "error");
}

class GpuSnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = NoGpuReason();
    if (!why.empty()) GTEST_SKIP() << "GPU test skipped: " << why;
    const char* env = std::getenv("TESSERA_TEST_SEED");
    seed_ = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(seed_));
    RecordProperty("seed", std::to_string(seed_));
  }

  std::vector<std::string> TrainerArgs(const DaemonProcess& d, const std::string& job,
                                       const Layout& l, uint64_t seed) const {
    return {TrainerPath(),
            "--socket=" + d.socket_path(),
            "--job=" + job,
            absl::StrCat("--seed=", seed),
            absl::StrCat("--tensors=", l.tensors),
            absl::StrCat("--min-bytes=", l.min_bytes),
            absl::StrCat("--max-bytes=", l.max_bytes),
            absl::StrCat("--total-bytes=", l.total_bytes)};
  }

  // Kills a GPU trainer `kills` times per layout at random instants; each new trainer must
  // resume exactly a step in [newest seen sealed, newest started], checked bit-exact on the
  // device before it prints "resumed". A final verifier checks each layout once more.
  void KillAndRestore(DaemonProcess& daemon, const std::vector<Layout>& layouts, int kills,
                      milliseconds start_timeout) {
    std::mt19937_64 rng(seed_);
    const size_t n = layouts.size();
    std::vector<int64_t> last_sealed(n, -1), last_started(n, 0);
    int in_flight_kills = 0, total = 0;
    for (int kill = 0; kill < kills * static_cast<int>(n); ++kill, ++total) {
      const size_t li = kill % n;
      const Layout& l = layouts[li];
      std::vector<std::string> argv = TrainerArgs(daemon, absl::StrCat("gpu-", l.name), l, seed_ + li);
      argv.push_back(rng() % 2 ? "--when-busy=wait" : "--when-busy=skip");
      // Killed while a staged copy drains to host, too: the previous sealed step must stay.
      static constexpr const char* kStaging[] = {"--staging=off", "--staging=full",
                                                 "--staging=adaptive"};
      argv.push_back(kStaging[rng() % 3]);
      auto trainer = Process::Start(argv);
      ASSERT_NE(trainer, nullptr);
      auto first = trainer->ReadUntil(IsStartLine, start_timeout);
      ASSERT_TRUE(first.has_value()) << "kill " << kill << ": the trainer did not start; daemon log:\n"
                                     << daemon.LogTail();
      SCOPED_TRACE(absl::StrCat("kill ", kill, " layout ", l.name, " ", argv.back(), ": ", *first));
      ASSERT_FALSE(absl::StartsWith(*first, "error")) << *first;
      std::printf("layout %s kill %d (%s): %s\n", l.name, kill / static_cast<int>(n),
                  argv.back().c_str(), first->c_str());
      if (last_sealed[li] >= 0) {
        auto resumed = ParseEvent(*first, "resumed");
        ASSERT_TRUE(resumed.has_value()) << "a sealed step " << last_sealed[li] << " was lost";
        EXPECT_GE(*resumed, last_sealed[li]);
        EXPECT_LE(*resumed, last_started[li]);
      }
      std::this_thread::sleep_for(milliseconds(rng() % l.max_run_ms));
      trainer->Signal(SIGKILL);
      EXPECT_EQ(trainer->Wait(), 128 + SIGKILL) << "the trainer ended before it was killed";
      const auto& lines = trainer->lines();
      for (const auto& line : lines) ASSERT_FALSE(absl::StartsWith(line, "error")) << line;
      const int64_t sealed = LastEvent(lines, "sealed");
      const int64_t started = std::max(LastEvent(lines, "snapshot"), LastEvent(lines, "resumed"));
      if (started > sealed) ++in_flight_kills;
      last_sealed[li] = std::max({last_sealed[li], sealed, LastEvent(lines, "resumed")});
      last_started[li] = std::max(last_started[li], started);
    }
    std::printf("%d of %d kills landed while a snapshot was being copied or sealed\n",
                in_flight_kills, total);
    EXPECT_GE(in_flight_kills, (total + 3) / 4) << "the kills should hit copies and seals";
    for (size_t li = 0; li < n; ++li) {
      std::vector<std::string> argv =
          TrainerArgs(daemon, absl::StrCat("gpu-", layouts[li].name), layouts[li], seed_ + li);
      argv.push_back("--mode=verify");
      auto verifier = Process::Start(argv);
      EXPECT_EQ(verifier->Wait(std::chrono::seconds(300)), 0)
          << layouts[li].name << ": " << (verifier->lines().empty() ? "" : verifier->lines().back());
      const int64_t verified = LastEvent(verifier->lines(), "verified");
      std::printf("layout %s: verified step %lld bit-exact on the device (sealed >= %lld)\n",
                  layouts[li].name, static_cast<long long>(verified),
                  static_cast<long long>(last_sealed[li]));
      EXPECT_GE(verified, last_sealed[li]) << layouts[li].name;
      EXPECT_LE(verified, last_started[li]) << layouts[li].name;
    }
  }

  uint64_t seed_ = 0;
};

TEST_F(GpuSnapshotTest, TrainerKilledMidCopyRestoresNewestSealedBitExact) {
  TempRoot root;
  DaemonProcess daemon(root.path(), "g0", uint64_t{4} << 30, {"--set", "store.crc_threads=8"});
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  KillAndRestore(daemon, std::vector<Layout>(std::begin(kLayouts), std::end(kLayouts)),
                 static_cast<int>(EnvOr("TESSERA_GPU_KILLS", 3)), std::chrono::seconds(120));
}

// About 10 GB in 200 tensors: registration pins 20 GB of slots, and a kill lands while a
// snapshot of the whole state is being copied or sealed.
TEST_F(GpuSnapshotTest, LargeStateKilledMidCopyRestoresBitExact) {
  const uint64_t bytes = EnvOr("TESSERA_GPU_LARGE_BYTES", 10'000'000'000ull);
  if (bytes == 0) GTEST_SKIP() << "TESSERA_GPU_LARGE_BYTES=0";
  size_t free_device = 0, total_device = 0;
  cudaMemGetInfo(&free_device, &total_device);
  struct statvfs shm {};
  statvfs("/dev/shm", &shm);
  const uint64_t free_shm = uint64_t{shm.f_bavail} * shm.f_frsize;
  if (free_device < bytes + (uint64_t{2} << 30) || free_shm < 2 * bytes + (uint64_t{2} << 30)) {
    GTEST_SKIP() << "not enough memory for a " << bytes << "-byte state: " << free_device
                 << " bytes free on the GPU, " << free_shm << " in /dev/shm (needs 2x)";
  }
  TempRoot root;
  DaemonProcess daemon(root.path(), "g1", 2 * bytes + (uint64_t{1} << 30),
                       {"--set", "store.crc_threads=8"});
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const Layout large{"large", 200, bytes / 400, bytes / 100, bytes, 2500};
  KillAndRestore(daemon, {large}, static_cast<int>(EnvOr("TESSERA_GPU_LARGE_KILLS", 3)),
                 std::chrono::seconds(300));
}

// Through the Client, as a training loop does it: the compute stream is busy, Snapshot(1) marks
// the snapshot point, Fence, and at once a kernel on the same stream overwrites every tensor
// (the optimizer step). After Wait, restoring the snapshot must give back step 1, bit-exact.
class GpuFenceTest : public GpuSnapshotTest {
 protected:
  void SnapshotThenOverwrite(bool fence, std::string* restored_diff) {
    TempRoot root;
    DaemonProcess daemon(root.path(), "f0", uint64_t{4} << 30, {"--set", "store.crc_threads=8"});
    std::string error;
    ASSERT_TRUE(daemon.Start(&error)) << error;
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    {
      const uint64_t bytes = EnvOr("TESSERA_GPU_FENCE_BYTES", uint64_t{1} << 30);
      auto state_or = GpuState::Create({seed_, 60, 1 << 10, bytes / 8, bytes}, stream);
      ASSERT_TRUE(state_or.ok()) << state_or.status();
      GpuState& state = **state_or;
      Client::Options options;
      options.socket_path = daemon.socket_path();
      options.when_busy = Client::BusyPolicy::kWait;
      auto client = Client::Connect(options);
      ASSERT_TRUE(client.ok()) << client.status();
      ASSERT_TRUE((*client)->Register(fence ? "fence" : "no-fence", 0, 1, state.ClientEntries()).ok());
      ASSERT_TRUE(absl::StartsWith((*client)->stats().engine, "cuda")) << (*client)->stats().engine;

      ASSERT_TRUE(state.Fill(1).ok());
      ASSERT_EQ(SpinStream(20'000'000, stream), cudaSuccess);  // still busy at the snapshot point
      auto outcome = (*client)->Snapshot(1, stream);
      ASSERT_TRUE(outcome.ok()) << outcome.status();
      ASSERT_EQ(*outcome, Client::SnapshotOutcome::kStarted);
      if (fence) {
        const absl::Status fenced = (*client)->Fence(stream);
        ASSERT_TRUE(fenced.ok()) << fenced;
      }
      ASSERT_TRUE(state.Advance(1, 2).ok());  // overwrites every byte of every tensor
      ASSERT_TRUE((*client)->Wait().ok()) << (*client)->stats().last_error;
      auto overwritten = state.Check(2);
      ASSERT_TRUE(overwritten.ok()) << overwritten.status();
      ASSERT_EQ(*overwritten, "") << "the overwrite kernel did not run";

      auto restored = (*client)->Restore(-1);
      ASSERT_TRUE(restored.ok()) << restored.status();
      ASSERT_EQ(*restored, 1);
      auto diff = state.Check(1);
      ASSERT_TRUE(diff.ok()) << diff.status();
      *restored_diff = *diff;
      std::printf("%s, %zu tensors, %llu bytes: restored snapshot vs step 1: %s\n",
                  fence ? "with Fence" : "without Fence", state.tensors(),
                  static_cast<unsigned long long>(state.device_bytes()),
                  diff->empty() ? "bit-exact" : diff->c_str());
    }
    cudaStreamDestroy(stream);
  }
};

TEST_F(GpuFenceTest, FenceOrdersTheCopyBeforeTheNextKernel) {
  std::string diff;
  SnapshotThenOverwrite(/*fence=*/true, &diff);
  EXPECT_EQ(diff, "");
}

// The control: without Fence the overwrite (at HBM speed) overtakes the device-to-host copy
// (at PCIe speed), and the check above sees it. If this ever passes, the check proves nothing.
TEST_F(GpuFenceTest, WithoutFenceTheOverwriteLeaksIntoTheSnapshot) {
  std::string diff;
  SnapshotThenOverwrite(/*fence=*/false, &diff);
  // The device tensors themselves must differ (not only the host blob, which the CPU rewrites
  // before the copy of host entries runs when nothing waits for it).
  EXPECT_TRUE(absl::StrContains(diff, " tensors (")) << "without a fence the overwrite should "
                                                        "have leaked into the snapshot; got: '"
                                                     << diff << "'";
}

}  // namespace
}  // namespace tessera::testing::gpu
