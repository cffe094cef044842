// Jobs of different uids on one daemon, with the probe run as another uid (setpriv). Runs outside
// Bazel's sandbox (tag no-sandbox): inside its user namespace, uid 65534 does not exist.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n", static_cast<unsigned long long>(seed));
  return seed;
}

// A job belongs to the uid that registered it. A user allowed on the agent socket (here every
// user: mode 0666) once asked its daemon to restore a rank of another uid's job and was handed
// the sealed payload's segment, and FindLatestRestorable(resume) from another uid dropped a job's
// newer sealed steps. Both are refused now, and the job's snapshots stay as they were. The probe
// runs as uid 65534 under setpriv (util-linux).
TEST(IsolationTest, AnotherUidCannotRestoreOrRollBackAJob) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root, to run the probe as another uid";
  {
    // Some containers cannot switch to uid 65534 (no such uid in their user namespace).
    auto check = Process::Start({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                 "--clear-groups", "/bin/true"});
    if (check->Wait() != 0) {
      GTEST_SKIP() << "cannot run a process as uid 65534 here (setpriv failed: "
                   << (check->lines().empty() ? "no output" : check->lines().back()) << ")";
    }
  }
  const uint64_t seed = TestSeed();
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{256} << 20, {"--set", "agent.socket_mode=0666"});
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const TrainerLayout layout{6, 100, 64 << 10, 256 << 10};
  auto argv = TrainerCommand(daemon, "victim", seed, 0, 1, layout);
  argv.push_back("--when-busy=wait");
  argv.push_back("--steps=4");
  auto trainer = Process::Start(argv);
  ASSERT_EQ(trainer->Wait(), 0);
  ASSERT_EQ(LastEvent(trainer->lines(), "sealed"), 4);

  // The probe, where uid 65534 can run it.
  const std::string probe = root.path() + "/agent_probe";
  std::filesystem::copy_file(BinaryPath("tests/agent_probe"), probe);
  chmod(probe.c_str(), 0755);
  auto as_nobody = [&](std::vector<std::string> args) {
    std::vector<std::string> command = {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                        "--clear-groups", probe,
                                        "--socket=" + daemon.socket_path(), "--job=victim"};
    command.insert(command.end(), args.begin(), args.end());
    auto p = Process::Start(command);
    EXPECT_EQ(p->Wait(), 0);
    return p->lines().empty() ? std::string("(no output)") : p->lines().back();
  };
  const std::string restore = as_nobody({"--call=prepare_restore", "--step=-1"});
  EXPECT_TRUE(absl::StartsWith(restore, "PERMISSION_DENIED")) << restore;
  EXPECT_TRUE(absl::StrContains(restore, "holds snapshots of uid 0 here; the caller is uid 65534"))
      << restore;
  const std::string rollback = as_nobody({"--call=find_latest", "--world=1", "--resume"});
  EXPECT_TRUE(absl::StartsWith(rollback, "PERMISSION_DENIED")) << rollback;
  // The admin calls that change data, on the same socket.
  const std::string corrupt = as_nobody({"--call=corrupt"});
  EXPECT_TRUE(absl::StartsWith(corrupt, "PERMISSION_DENIED")) << corrupt;
  EXPECT_TRUE(absl::StrContains(corrupt, "the caller is uid 65534")) << corrupt;
  const std::string drop = as_nobody({"--call=drop_memory", "--node=n0"});
  EXPECT_TRUE(absl::StartsWith(drop, "PERMISSION_DENIED")) << drop;
  // The client library's reader (no registration needed for the owner) is refused the same.
  for (const char* read : {"--call=read_manifest", "--call=read_range"}) {
    const std::string answer = as_nobody({read, "--step=4", "--entry=user_state"});
    EXPECT_TRUE(absl::StartsWith(answer, "PERMISSION_DENIED")) << answer;
    EXPECT_TRUE(absl::StrContains(answer, "the caller is uid 65534")) << answer;
  }
  // A job nobody registered here: told to register first, not answered.
  const std::string unknown = as_nobody({"--call=prepare_restore", "--job=other"});
  EXPECT_TRUE(absl::StartsWith(unknown, "FAILED_PRECONDITION")) << unknown;

  // The owner restores its newest step, bit-exact: nothing was dropped.
  argv = TrainerCommand(daemon, "victim", seed, 0, 1, layout);
  argv.push_back("--mode=verify");
  auto verifier = Process::Start(argv);
  EXPECT_EQ(verifier->Wait(), 0);
  ASSERT_FALSE(verifier->lines().empty());
  EXPECT_EQ(verifier->lines().back(), "verified 4");
}

}  // namespace
}  // namespace tessera::testing
