// Jobs of different uids on one daemon, with the probe run as another uid (setpriv). Runs outside
// Bazel's sandbox (tag no-sandbox): inside its user namespace, uid 65534 does not exist.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
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
// A daemon whose agent socket every uid may use, and processes run as other uids.
class IsolationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = CannotSwitchUids(); !why.empty()) GTEST_SKIP() << why;
    seed = TestSeed();
    daemon = std::make_unique<DaemonProcess>(root.path(), "n0", uint64_t{256} << 20,
                                             std::vector<std::string>{"--set",
                                                                      "agent.socket_mode=0666"});
    std::string error;
    ASSERT_TRUE(daemon->Start(&error)) << error;
  }

  uint64_t seed = 0;
  TempRoot root;
  std::unique_ptr<DaemonProcess> daemon;
};

TEST_F(IsolationTest, AnotherUidCannotRestoreOrRollBackAJob) {
  const TrainerLayout layout{6, 100, 64 << 10, 256 << 10};
  auto argv = TrainerCommand(*daemon, "victim", seed, 0, 1, layout);
  argv.push_back("--when-busy=wait");
  argv.push_back("--steps=4");
  auto trainer = Process::Start(argv);
  ASSERT_EQ(trainer->Wait(), 0);
  ASSERT_EQ(LastEvent(trainer->lines(), "sealed"), 4);

  auto as_nobody = [&](std::vector<std::string> args) {
    std::vector<std::string> command = AsUid(root, "tests/agent_probe", 65534);
    command.push_back("--socket=" + daemon->socket_path());
    command.push_back("--job=victim");
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
  argv = TrainerCommand(*daemon, "victim", seed, 0, 1, layout);
  argv.push_back("--mode=verify");
  auto verifier = Process::Start(argv);
  EXPECT_EQ(verifier->Wait(), 0);
  ASSERT_FALSE(verifier->lines().empty());
  EXPECT_EQ(verifier->lines().back(), "verified 4");
}

// A reader that registers nothing (a resharding DCP reader in a new process) reads the
// snapshots of its own uid's job, which the daemon holds, and still no other uid does.
TEST_F(IsolationTest, AJobsOwnUidReadsItsSnapshotsWithoutRegistering) {
  const TrainerLayout layout{4, 100, 64 << 10, 256 << 10};
  // The trainer runs as uid 65534: the job is that uid's.
  const std::vector<std::string> command = TrainerCommand(*daemon, "own", seed, 0, 1, layout);
  std::vector<std::string> argv = AsUid(root, "tests/trainer", 65534);
  argv.insert(argv.end(), command.begin() + 1, command.end());  // its arguments
  argv.push_back("--when-busy=wait");
  argv.push_back("--steps=3");
  auto trainer = Process::Start(argv);
  ASSERT_EQ(trainer->Wait(), 0);
  ASSERT_EQ(LastEvent(trainer->lines(), "sealed"), 3);
  auto probe_as = [&](int uid, const std::string& call) {
    std::vector<std::string> command = AsUid(root, "tests/agent_probe", uid);
    command.insert(command.end(), {"--socket=" + daemon->socket_path(), "--job=own",
                                   "--call=" + call, "--step=-1"});
    auto p = Process::Start(command);
    EXPECT_EQ(p->Wait(), 0);
    return p->lines().empty() ? std::string("(no output)") : p->lines().back();
  };
  for (const std::string call : {"prepare_restore", "read_manifest"}) {
    EXPECT_EQ(probe_as(65534, call), "OK step 3") << call;
    const std::string other = probe_as(65533, call);
    EXPECT_TRUE(absl::StartsWith(other, "PERMISSION_DENIED")) << call << ": " << other;
    EXPECT_TRUE(absl::StrContains(
        other, "holds snapshots of uid 65534 here; the caller is uid 65533")) << other;
  }
}

// The shipped systemd unit and DaemonSet run tesserad as an unprivileged user, with no
// capability. It still serves trainers of any uid: a slot file stays the daemon's (mode 0600) and
// a POSIX ACL lets the registering trainer's uid open it, so no chown (CAP_CHOWN) is needed, and
// the daemon re-opens its files after a restart without CAP_DAC_OVERRIDE. Here tesserad runs as
// uid 65533 and a trainer as uid 65534 seals, is restored bit-exact by a relaunch after the
// daemon restarted, and uid 65532 (allowed on the socket) can neither read nor write the slots.
// Before, the registration was refused: "give segment ... to uid 65534 (tesserad must run as root
// or as that uid)".
TEST(UnprivilegedDaemonTest, ServesTrainersOfOtherUidsWithoutCapabilities) {
  if (std::string why = CannotSwitchUids(); !why.empty()) GTEST_SKIP() << why;
  const uint64_t seed = TestSeed();
  TempRoot root;
  const std::string home = root.path() + "/daemon-home";
  ASSERT_EQ(mkdir(home.c_str(), 0755), 0);
  ASSERT_EQ(chown(home.c_str(), 65533, 65533), 0);
  DaemonProcess daemon(home, "n0", uint64_t{256} << 20, {"--set", "agent.socket_mode=0666"});
  const std::vector<std::string> as_daemon = AsUid(root, "daemon/tesserad", 65533);
  daemon.SetLauncher({as_daemon.begin(), as_daemon.end() - 1});
  daemon.SetBinary(as_daemon.back());
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;

  const TrainerLayout layout{6, 100, 64 << 10, 256 << 10};
  auto run_trainer = [&](int launch, int steps) {
    auto argv = TrainerCommand(daemon, "other-uid", seed, 0, 1, layout);
    std::vector<std::string> command = AsUid(root, "tests/trainer", 65534);
    command.insert(command.end(), argv.begin() + 1, argv.end());
    command.insert(command.end(), {"--when-busy=wait", "--steps=" + std::to_string(steps),
                                   "--launch=" + std::to_string(launch)});
    auto trainer = Process::Start(command);
    EXPECT_EQ(trainer->Wait(), 0) << daemon.LogTail();
    return trainer->lines();
  };
  const std::vector<std::string> first = run_trainer(1, 4);
  ASSERT_EQ(LastEvent(first, "sealed"), 4);

  std::vector<std::string> slots;
  for (const auto& entry : std::filesystem::directory_iterator(daemon.store_dir())) {
    if (absl::EndsWith(entry.path().string(), ".slot")) slots.push_back(entry.path().string());
  }
  ASSERT_EQ(slots.size(), 2u);
  auto may = [&](int uid, const char* access, const std::string& path) {
    auto check = Process::Start({"/usr/bin/setpriv", "--reuid=" + std::to_string(uid),
                                 "--regid=" + std::to_string(uid), "--clear-groups",
                                 "/usr/bin/test", access, path});
    return check->Wait() == 0;
  };
  for (const std::string& slot : slots) {
    struct stat st;
    ASSERT_EQ(stat(slot.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, 65533u) << slot << ": the daemon's file";
    EXPECT_EQ(st.st_mode & 0007, 0u) << slot << ": nothing for others";
    EXPECT_TRUE(may(65534, "-r", slot) && may(65534, "-w", slot)) << slot;
    EXPECT_FALSE(may(65532, "-r", slot)) << slot << " is readable by another uid";
    EXPECT_FALSE(may(65532, "-w", slot)) << slot << " is writable by another uid";
  }

  // A restarted daemon re-adopts the slots as the trainer's uid's, and a relaunch restores them.
  daemon.Kill(SIGKILL);
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const std::vector<std::string> second = run_trainer(2, 2);
  EXPECT_EQ(LastEvent(second, "resumed"), 4) << absl::StrJoin(second, "\n");
  EXPECT_EQ(LastEvent(second, "sealed"), 6) << absl::StrJoin(second, "\n");
  EXPECT_TRUE(absl::StrContains(daemon.LogTail(), "re-adopted job 'other-uid' rank 0"))
      << daemon.LogTail();
}

}  // namespace
}  // namespace tessera::testing
