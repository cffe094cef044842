// DP-sharded snapshots with real processes: a tesserad, trainer processes of one data-parallel
// group (tests/trainer --dp-members), real shared memory, SIGKILL. Each member stores a slice of
// the replicated state; a restore gathers the other members' slices through the daemon (these
// trainers hold host memory; the NCCL path is covered on the GPU machine) and checks every byte.
#include <signal.h>

#include <map>
#include <set>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/client.h"
#include "gtest/gtest.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr uint64_t kReplicatedBytes = 12 * 500000;  // 12 tensors of 500,000 bytes

std::vector<std::string> DpTrainerArgs(const DaemonProcess& d, const std::string& job,
                                       uint64_t seed, uint32_t rank, uint32_t world,
                                       const std::string& members) {
  std::vector<std::string> argv =
      TrainerCommand(d, job, seed, rank, world,
                     TrainerLayout{12, kReplicatedBytes / 12, kReplicatedBytes / 12,
                                   kReplicatedBytes});
  argv.insert(argv.end(), {"--dp-members=" + members, "--dp-timeout-ms=60000"});
  return argv;
}

std::string Members(uint32_t n) {
  std::vector<uint32_t> m;
  for (uint32_t r = 0; r < n; ++r) m.push_back(r);
  return absl::StrJoin(m, ",");
}

// Starts `world` trainers of one DP group that snapshot every step until each has sealed at
// least `min_sealed`, then SIGKILLs `victim` and, as a synchronous job restarts after losing a
// rank, the others too. Returns the newest step every rank printed as sealed.
int64_t TrainThenKill(DaemonProcess& daemon, const std::string& job, uint64_t seed,
                      uint32_t world, int64_t min_sealed, uint32_t victim) {
  std::vector<std::unique_ptr<Process>> trainers;
  for (uint32_t r = 0; r < world; ++r) {
    auto argv = DpTrainerArgs(daemon, job, seed, r, world, Members(world));
    argv.push_back("--step-sleep-ms=20");
    argv.push_back("--when-busy=wait");
    trainers.push_back(Process::Start(argv));
  }
  int64_t sealed_everywhere = INT64_MAX;
  for (auto& t : trainers) {
    auto line = t->ReadUntil(
        [&](const std::string& l) {
          auto s = ParseEvent(l, "sealed");
          return absl::StartsWith(l, "error") || (s && *s >= min_sealed);
        },
        seconds(60));
    EXPECT_TRUE(line && !absl::StartsWith(*line, "error")) << (line ? *line : "no output");
  }
  // Real DP ranks start together; these processes need not, and a member that ran ahead before
  // the group was complete holds steps the others have not reached yet. Kill only once the daemon
  // holds a step >= min_sealed sealed on every member.
  Client::Options options;
  options.socket_path = daemon.socket_path();
  options.use_gpu = false;
  auto observer = Client::Connect(options);
  EXPECT_TRUE(observer.ok()) << observer.status();
  for (int i = 0; observer.ok() && i < 600; ++i) {
    auto versions = (*observer)->ListVersions(job);
    std::map<int64_t, std::set<uint32_t>> holders;
    if (versions.ok()) {
      for (const auto& v : *versions) {
        if (v.state() == "SEALED") holders[v.step()].insert(v.rank());
      }
    }
    int64_t common = -1;
    for (const auto& [step, ranks] : holders) {
      if (ranks.size() == world) common = std::max(common, step);
    }
    if (common >= min_sealed) break;
    std::this_thread::sleep_for(milliseconds(50));
  }
  trainers[victim]->Signal(SIGKILL);
  for (uint32_t r = 0; r < world; ++r) {
    if (r != victim) trainers[r]->Signal(SIGKILL);
  }
  for (auto& t : trainers) {
    t->Wait();
    sealed_everywhere = std::min(sealed_everywhere, LastEvent(t->lines(), "sealed"));
  }
  return sealed_everywhere;
}

// Every member restores in a fresh process, all together; returns their "resumed" steps.
std::vector<int64_t> RestoreAll(DaemonProcess& daemon, const std::string& job, uint64_t seed,
                                uint32_t world, const std::string& members,
                                std::vector<std::string>* gathered) {
  std::vector<std::unique_ptr<Process>> verifiers;
  for (uint32_t r = 0; r < world; ++r) {
    auto argv = DpTrainerArgs(daemon, job, seed, r, world, members);
    argv.push_back("--mode=verify");
    verifiers.push_back(Process::Start(argv));
  }
  std::vector<int64_t> steps;
  for (auto& v : verifiers) {
    EXPECT_EQ(v->Wait(seconds(90)), 0) << absl::StrJoin(v->lines(), " | ");
    steps.push_back(LastEvent(v->lines(), "resumed"));
    for (const auto& l : v->lines()) {
      if (absl::StartsWith(l, "gathered ")) gathered->push_back(l);
    }
  }
  return steps;
}

// A member that dies after the rendezvous holds the others' NCCL gather only this long, not the
// whole restore timeout: setup plus the bytes at 1 GB/s, capped by the restore timeout.
TEST(DpShardedTest, NcclGatherTimeoutFollowsTheBytesWithinTheRestoreTimeout) {
  EXPECT_EQ(Client::NcclGatherTimeout(0, 300000), absl::Seconds(30));
  EXPECT_EQ(Client::NcclGatherTimeout(uint64_t{10} * 1000 * 1000 * 1000, 300000),
            absl::Seconds(40));
  EXPECT_EQ(Client::NcclGatherTimeout(uint64_t{1} << 40, 300000), absl::Seconds(300));
  EXPECT_EQ(Client::NcclGatherTimeout(0, 5000), absl::Seconds(5));
  EXPECT_EQ(Client::NcclGatherTimeout(0, 0), absl::Seconds(1));
}

TEST(DpShardedTest, FourMembersStoreDisjointSlicesAndAllRestoreBitExactAfterAKill) {
  const uint64_t seed = TestSeed();
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{1} << 30);
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const std::string job = "dp-job";
  const uint32_t world = 4;
  const int64_t sealed = TrainThenKill(daemon, job, seed, world, 6, /*victim=*/2);
  ASSERT_GE(sealed, 6);

  // Each member's shard holds about a quarter of the replicated bytes (plus its own state).
  Client::Options options;
  options.socket_path = daemon.socket_path();
  options.use_gpu = false;
  auto client = Client::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto versions = (*client)->ListVersions(job);
  ASSERT_TRUE(versions.ok()) << versions.status();
  std::map<uint32_t, uint64_t> payload;
  for (const auto& v : *versions) payload[v.rank()] = std::max(payload[v.rank()], v.payload_bytes());
  ASSERT_EQ(payload.size(), world);
  for (const auto& [rank, bytes] : payload) {
    EXPECT_LT(bytes, kReplicatedBytes / world + 400000) << "rank " << rank;
    EXPECT_GT(bytes, kReplicatedBytes / world / 2) << "rank " << rank;
  }

  std::vector<std::string> gathered;
  const auto steps = RestoreAll(daemon, job, seed, world, Members(world), &gathered);
  for (int64_t s : steps) {
    EXPECT_EQ(s, steps[0]) << "the members restored different steps";
    EXPECT_GE(s, sealed);
  }
  ASSERT_EQ(gathered.size(), world);
  for (const auto& g : gathered) {
    // Three quarters of the replicated bytes came from the other members.
    const std::vector<std::string> words = absl::StrSplit(g, ' ');
    ASSERT_EQ(words.size(), 3u) << g;
    int64_t bytes = 0;
    ASSERT_TRUE(absl::SimpleAtoi(words[1], &bytes)) << g;
    EXPECT_GE(bytes, static_cast<int64_t>(kReplicatedBytes * 3 / 4 - 4 * 256)) << g;
    EXPECT_LE(bytes, static_cast<int64_t>(kReplicatedBytes * 3 / 4 + 4 * 256)) << g;
    EXPECT_TRUE(absl::EndsWith(g, " daemon")) << g;
  }
}

TEST(DpShardedTest, ADifferentGroupIsRefusedAndAMissingMemberTimesOutWithItsName) {
  const uint64_t seed = TestSeed();
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{1} << 30);
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const std::string job = "dp-group";
  ASSERT_GE(TrainThenKill(daemon, job, seed, 2, 3, /*victim=*/0), 3);

  // The same ranks, now one DP group each: their shards hold only half of the replicated state.
  auto argv = DpTrainerArgs(daemon, job, seed, 0, 2, "0");
  argv.push_back("--mode=verify");
  auto alone = Process::Start(argv);
  EXPECT_NE(alone->Wait(seconds(60)), 0);
  bool refused = false;
  for (const auto& l : alone->lines()) {
    refused = refused || (absl::StrContains(l, "does not match the registered state") &&
                          absl::StrContains(l, "DP rank 0 of a group of 2"));
  }
  EXPECT_TRUE(refused) << absl::StrJoin(alone->lines(), " | ");

  // Only member 1 of 2 restores: it waits for member 0, then fails naming it.
  argv = DpTrainerArgs(daemon, job, seed, 1, 2, "0,1");
  argv.push_back("--mode=verify");
  argv.push_back("--dp-timeout-ms=1500");
  auto lonely = Process::Start(argv);
  EXPECT_NE(lonely->Wait(seconds(60)), 0);
  bool named = false;
  for (const auto& l : lonely->lines()) {
    named = named || (absl::StrContains(l, "ms in all for the other members of [0,1]") &&
                      absl::StrContains(l, "(indices 0)"));
  }
  EXPECT_TRUE(named) << absl::StrJoin(lonely->lines(), " | ");
}

}  // namespace
}  // namespace tessera::testing
