// `tessera drop JOB` on a live 3-daemon cluster on loopback (docs/PROTOCOL.md, Dropping a job):
// real tesserad processes with a cluster token, real trainers (tests/trainer, whose every restored
// byte is checked against its seeded history) and the real `tessera` binary. A dropped job is
// relaunched fresh on every node; a member stopped (SIGSTOP) while the job is dropped comes back
// holding the job's slots and fragments and still does not make it resumable; a drop is refused
// while a trainer of the job runs, unless --force.
#include <dirent.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/cli/cli_run.h"
#include "tests/harness.h"

namespace tessera::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

constexpr char kToken[] = "drop-test-token-0123456789abcdef";
constexpr char kJob[] = "drop-job";

// The job's slot segment files in a daemon's store directory ("<job>.r<rank>.<n>.slot";
// fragments live in pooled segments, and the drop's answer counts them per node).
std::vector<std::string> JobFiles(const std::string& dir) {
  std::vector<std::string> files;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (absl::StartsWith(name, std::string(kJob) + ".") && absl::EndsWith(name, ".slot")) {
        files.push_back(name);
      }
    }
    closedir(d);
  }
  std::sort(files.begin(), files.end());
  return files;
}

class CliDropTest : public ::testing::Test {
 protected:
  // Rank r on n<r>; n2 holds fragments only. RS(1, 1): each shard is on its owner and one other
  // member, so every member holds something of the job.
  static constexpr int kNodes = 3;
  static constexpr uint32_t kWorld = 2;

  void SetUp() override {
    seed_ = TestSeed();
    token_file_ = root_.path() + "/token";
    std::ofstream(token_file_) << kToken << "\n";
    for (int i = 0; i < kNodes; ++i) addresses_.push_back(absl::StrCat("127.0.0.1:", FreePort()));
    for (int i = 0; i < kNodes; ++i) {
      daemons_.push_back(std::make_unique<DaemonProcess>(
          root_.path(), absl::StrCat("n", i), uint64_t{256} << 20,
          TokenClusterFlags(addresses_, i, token_file_, 1, 1, extra_flags_)));
      if (!launcher_.empty()) daemons_.back()->SetLauncher(launcher_);
      std::string error;
      ASSERT_TRUE(daemons_.back()->Start(&error)) << error;
    }
    std::this_thread::sleep_for(milliseconds(600));  // every daemon hears every other
  }

  // With `uid` >= 0, the CLI runs as that uid.
  CliRun Tessera(std::vector<std::string> args, int node, int uid = -1) {
    std::vector<std::string> argv = {BinaryPath("cli/tessera")};
    if (uid >= 0) argv = AsUid(root_, "cli/tessera", uid);
    argv.insert(argv.end(), args.begin(), args.end());
    argv.insert(argv.end(), {"--socket", daemons_[node]->socket_path()});
    return RunCli(argv, absl::StrCat(root_.path(), "/cli-", runs_++, ".err"), seconds(120));
  }

  // A trainer of rank r on n<r> (or n<node>): `launch` names this launch in the state's history.
  // With `uid` >= 0, it runs as that uid.
  std::unique_ptr<Process> StartTrainer(uint32_t rank, int steps, int launch, int sleep_ms = 100,
                                        int uid = -1, int node = -1) {
    auto argv = TrainerCommand(*daemons_[node >= 0 ? node : rank], kJob, seed_ + rank, rank, kWorld,
                               TrainerLayout{4, 1000, 200000, 500000});
    if (uid >= 0) {
      std::vector<std::string> as_uid = AsUid(root_, "tests/trainer", uid);
      as_uid.insert(as_uid.end(), argv.begin() + 1, argv.end());
      argv = std::move(as_uid);
    }
    argv.insert(argv.end(), {absl::StrCat("--steps=", steps), absl::StrCat("--launch=", launch),
                             absl::StrCat("--step-sleep-ms=", sleep_ms), "--when-busy=wait",
                             "--restore-retry-ms=60000"});
    return Process::Start(argv);
  }

  // Runs every rank for `steps` steps (launch `launch`) and returns each rank's output.
  std::vector<std::vector<std::string>> Train(int steps, int launch, int uid = -1) {
    std::vector<std::unique_ptr<Process>> trainers;
    for (uint32_t r = 0; r < kWorld; ++r) {
      trainers.push_back(StartTrainer(r, steps, launch, /*sleep_ms=*/100, uid));
    }
    std::vector<std::vector<std::string>> lines;
    for (uint32_t r = 0; r < kWorld; ++r) {
      EXPECT_EQ(trainers[r]->Wait(seconds(180)), 0) << absl::StrJoin(trainers[r]->lines(), "\n");
      lines.push_back(trainers[r]->lines());
    }
    return lines;
  }

  // Waits until `jobs --json` on n0 shows the job protected at a committed step that stayed the
  // same over three polls; returns it.
  int64_t WaitForSettledCommit() {
    int64_t committed = -1;
    int unchanged = 0;
    for (int i = 0; i < 300 && unchanged < 3; ++i) {
      std::this_thread::sleep_for(milliseconds(200));
      CliRun run = Tessera({"jobs", "--json"}, 0);
      if (run.exit_code != 0) continue;
      for (const auto& job : List(run.result().at("jobs")).values()) {
        if (Obj(job).at("job").string_value() != kJob) continue;
        const int64_t now = static_cast<int64_t>(Obj(job).at("committed_step").number_value());
        const bool settled =
            now >= 0 && now == committed && Obj(job).at("health").string_value() == "protected";
        unchanged = settled ? unchanged + 1 : 0;
        committed = now;
      }
    }
    EXPECT_EQ(unchanged, 3) << "job not protected at a settled committed step (last: "
                            << committed << ")";
    return committed;
  }

  // The fragments member `node` holds (of every job: this test runs one), from `status --json`.
  int64_t FragmentsHeld(int node) {
    CliRun run = Tessera({"status", "--json"}, node);
    google::protobuf::Struct json;
    if ((run.exit_code != 0 && run.exit_code != 1) ||
        !google::protobuf::util::JsonStringToMessage(run.out, &json).ok()) {
      ADD_FAILURE() << "status on n" << node << ": " << run.Describe();
      return -1;
    }
    const JsonObject& self = Obj(Obj(json.fields().at("result")).at("self"));
    return static_cast<int64_t>(Obj(self.at("memory")).at("fragments").number_value());
  }

  // Waits until `observer` no longer sees member `node` alive.
  void WaitUntilNotAlive(const std::string& node, int observer) {
    for (int i = 0; i < 300; ++i) {
      CliRun run = Tessera({"status", "--json"}, observer);
      if (run.exit_code == 0 || run.exit_code == 1) {
        google::protobuf::Struct json;
        if (google::protobuf::util::JsonStringToMessage(run.out, &json).ok()) {
          for (const auto& m : List(Obj(json.fields().at("result")).at("members")).values()) {
            if (Obj(m).at("node").string_value() == node &&
                Obj(m).at("state").string_value() != "alive") {
              return;
            }
          }
        }
      }
      std::this_thread::sleep_for(milliseconds(200));
    }
    ADD_FAILURE() << node << " is still seen alive by n" << observer;
  }

  // Trains the job to a settled commit, then drops it through n0 while n1 (rank 1's owner, and
  // a holder of rank 0's fragment) is stopped: n1 keeps the dropped run's slots and fragments.
  void DropWhileN1IsStopped() {
    Train(8, 1);
    ASSERT_GE(WaitForSettledCommit(), 0);
    ASSERT_FALSE(JobFiles(daemons_[1]->store_dir()).empty());
    daemons_[1]->Signal(SIGSTOP);
    WaitUntilNotAlive("n1", 0);
    WaitUntilNotAlive("n1", 2);
    CliRun drop = Tessera({"drop", kJob, "--json"}, 0);
    ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
    ASSERT_EQ(List(drop.result().at("unanswered")).values_size(), 1) << drop.Describe();
  }

  // n0 and n2, started again, read the drop back from their job state files; n1 comes back with
  // its copies of the dropped run, and the next launch starts fresh on every rank.
  void ExpectTheDropKeptOnN0AndN2WhenN1Returns() {
    for (int n : {0, 2}) {
      EXPECT_THAT(daemons_[n]->LogTail(size_t{1} << 20),
                  HasSubstr("job 'drop-job': kept state read back"))
          << "n" << n;
    }
    daemons_[1]->Signal(SIGCONT);
    ExpectFresh(Train(6, 2));
    EXPECT_GE(WaitForSettledCommit(), 0);
  }

  // Each rank's output says it started fresh: nothing was restored.
  static void ExpectFresh(const std::vector<std::vector<std::string>>& lines) {
    for (size_t r = 0; r < lines.size(); ++r) {
      EXPECT_THAT(lines[r], ::testing::Contains("fresh")) << "rank " << r << ":\n"
                                                           << absl::StrJoin(lines[r], "\n");
      for (const std::string& line : lines[r]) {
        EXPECT_FALSE(absl::StartsWith(line, "resumed") || absl::StartsWith(line, "restored"))
            << "rank " << r << " restored after the drop: " << line;
      }
    }
  }

  // Set by a subclass before SetUp: more flags for every daemon, and what runs it.
  std::vector<std::string> extra_flags_;
  std::vector<std::string> launcher_;
  uint64_t seed_ = 0;
  TempRoot root_;
  std::string token_file_;
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  int runs_ = 0;
};

TEST_F(CliDropTest, ADroppedJobIsRelaunchedFreshOnEveryNode) {
  Train(8, 1);
  const int64_t committed = WaitForSettledCommit();
  ASSERT_GE(committed, 0);
  for (int n = 0; n < 2; ++n) {
    EXPECT_FALSE(JobFiles(daemons_[n]->store_dir()).empty()) << "n" << n << " holds the job";
  }

  // Asked on n2, which holds fragments only: the job's coordinator drops it everywhere.
  CliRun drop = Tessera({"drop", kJob, "--json"}, 2);
  ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
  const JsonObject& r = drop.result();
  EXPECT_GT(r.at("dropped_epoch").number_value(), 0);
  EXPECT_EQ(List(r.at("nodes")).values_size(), kNodes);
  EXPECT_EQ(List(r.at("unanswered")).values_size(), 0);
  EXPECT_EQ(r.at("slots_deleted").number_value(), 2 * kWorld);
  EXPECT_GT(r.at("fragments_deleted").number_value(), 0);
  EXPECT_GE(r.at("newest_sealed_step").number_value(), committed);
  for (const auto& node : List(r.at("nodes")).values()) {
    // RS(1, 1): every member holds a fragment of some rank's committed step.
    EXPECT_GT(Obj(node).at("fragments_deleted").number_value(), 0)
        << Obj(node).at("node").string_value();
    const bool owner = Obj(node).at("node").string_value() != "n2";
    EXPECT_EQ(Obj(node).at("slots_deleted").number_value(), owner ? 2 : 0)
        << Obj(node).at("node").string_value();
  }
  for (int n = 0; n < kNodes; ++n) {
    EXPECT_THAT(JobFiles(daemons_[n]->store_dir()), ::testing::IsEmpty()) << "n" << n;
  }
  // Again: nothing is left, so the same drop is sent again (for members that missed it), and
  // each member answers what it deleted for it.
  CliRun again = Tessera({"drop", kJob, "--json"}, 0);
  ASSERT_EQ(again.exit_code, 0) << again.Describe();
  EXPECT_EQ(again.result().at("dropped_epoch").number_value(),
            r.at("dropped_epoch").number_value());
  EXPECT_EQ(again.result().at("slots_deleted").number_value(), 2 * kWorld);
  CliRun text = Tessera({"drop", kJob}, 1);
  ASSERT_EQ(text.exit_code, 0) << text.Describe();
  EXPECT_THAT(text.out, HasSubstr("across the cluster at epoch"));
  EXPECT_THAT(text.out, HasSubstr("in all: 2 ranks, 4 slots, "));

  // The next launch with the job id starts fresh on every rank, then commits and resumes as usual.
  ExpectFresh(Train(6, 2));
  const int64_t recommitted = WaitForSettledCommit();
  ASSERT_GE(recommitted, 0);
  auto resumed = Train(recommitted + 2, 3);
  for (uint32_t rank = 0; rank < kWorld; ++rank) {
    EXPECT_GE(LastEvent(resumed[rank], "resumed"), recommitted)
        << absl::StrJoin(resumed[rank], "\n");
  }
}

TEST_F(CliDropTest, AMemberStoppedDuringTheDropDoesNotResurrectTheJob) {
  Train(8, 1);
  ASSERT_GE(WaitForSettledCommit(), 0);
  const std::vector<std::string> held = JobFiles(daemons_[1]->store_dir());
  ASSERT_FALSE(held.empty());

  // n1 (rank 1's owner, and a holder of rank 0's fragment) is stopped while the job is dropped.
  daemons_[1]->Signal(SIGSTOP);
  WaitUntilNotAlive("n1", 0);
  WaitUntilNotAlive("n1", 2);
  CliRun drop = Tessera({"drop", kJob, "--json"}, 0);
  ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
  const auto& unanswered = List(drop.result().at("unanswered"));
  ASSERT_EQ(unanswered.values_size(), 1) << drop.Describe();
  EXPECT_EQ(Obj(unanswered.values(0)).at("node").string_value(), "n1");
  EXPECT_EQ(List(drop.result().at("nodes")).values_size(), 2);
  EXPECT_EQ(JobFiles(daemons_[1]->store_dir()), held) << "n1 was stopped: it still holds them";

  // n1 comes back with its slots, fragments and commit of the dropped run. The job's coordinator
  // tells a member that comes back of the drops it keeps, and n1 deletes them; meanwhile, and
  // after, no restore resumes the dropped run.
  daemons_[1]->Signal(SIGCONT);
  for (int i = 0; i < 300 && !JobFiles(daemons_[1]->store_dir()).empty(); ++i) {
    std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_THAT(JobFiles(daemons_[1]->store_dir()), ::testing::IsEmpty())
      << "n1 kept the dropped job's files";
  ExpectFresh(Train(6, 2));
  EXPECT_GE(WaitForSettledCommit(), 0);
}

TEST_F(CliDropTest, AMemberKilledDuringTheDropAndRestartedDoesNotResurrectTheJob) {
  Train(8, 1);
  ASSERT_GE(WaitForSettledCommit(), 0);
  // n1 is killed; its shared memory (slots and fragments) stays for the restarted daemon to
  // re-adopt, as after a crash.
  daemons_[1]->Kill(SIGKILL);
  daemons_[1]->Wait();
  WaitUntilNotAlive("n1", 0);
  CliRun drop = Tessera({"drop", kJob, "--json"}, 2);
  ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
  ASSERT_EQ(List(drop.result().at("unanswered")).values_size(), 1) << drop.Describe();
  ASSERT_FALSE(JobFiles(daemons_[1]->store_dir()).empty());

  // Restarted, it re-adopts the dropped run's slots and keeps them until it has learned the
  // job's state, which brings the drop.
  std::string error;
  ASSERT_TRUE(daemons_[1]->Start(&error)) << error;
  for (int i = 0; i < 300 && !JobFiles(daemons_[1]->store_dir()).empty(); ++i) {
    std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_THAT(JobFiles(daemons_[1]->store_dir()), ::testing::IsEmpty());
  ExpectFresh(Train(4, 2));
}

// A member killed while it holds a sealed step that never committed (rank 1 trained alone past the
// commit) restarts after a drop it missed. It re-adopts that step and protects it only once it
// has learned the job's state, which brings the drop: so no member that took the drop is sent a
// fragment of the dropped run again (here the drop usually reaches n1 before it could protect
// anything; protection_pipeline_test ...AReAdoptedStepIsProtectedOnlyOnceTheJobsStateIsKnown
// holds the state back, and without the wait the step was protected).
TEST_F(CliDropTest, AMemberRestartedAfterADropItMissedSendsNoFragmentsOfTheDroppedRun) {
  Train(8, 1);
  const int64_t committed = WaitForSettledCommit();
  ASSERT_GE(committed, 0);
  // Rank 1 alone resumes and seals one step more, which rank 0 never seals: it cannot commit.
  auto alone = StartTrainer(1, /*steps=*/1, 2);
  ASSERT_EQ(alone->Wait(seconds(180)), 0) << absl::StrJoin(alone->lines(), "\n");
  ASSERT_EQ(LastEvent(alone->lines(), "sealed"), committed + 1)
      << absl::StrJoin(alone->lines(), "\n");
  daemons_[1]->Kill(SIGKILL);
  daemons_[1]->Wait();
  WaitUntilNotAlive("n1", 0);
  WaitUntilNotAlive("n1", 2);
  CliRun drop = Tessera({"drop", kJob, "--json"}, 2);
  ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
  ASSERT_EQ(List(drop.result().at("unanswered")).values_size(), 1) << drop.Describe();
  for (int n : {0, 2}) EXPECT_EQ(FragmentsHeld(n), 0) << "n" << n << " after the drop";

  std::string error;
  ASSERT_TRUE(daemons_[1]->Start(&error)) << error;
  for (int i = 0; i < 300 && !JobFiles(daemons_[1]->store_dir()).empty(); ++i) {
    std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_THAT(JobFiles(daemons_[1]->store_dir()), ::testing::IsEmpty());
  // A protection started before n1 learned the drop would land within these polls.
  for (int poll = 0; poll < 10; ++poll) {
    for (int n : {0, 2}) {
      ASSERT_EQ(FragmentsHeld(n), 0) << "n" << n << " holds fragments of the dropped run that n1 "
                                     << "re-protected after its restart (poll " << poll << ")";
    }
    std::this_thread::sleep_for(milliseconds(300));
  }
  ExpectFresh(Train(4, 3));
}

// Every member that took the drop restarts (as in an upgrade of the daemons) while the one that
// missed it is stopped; that one comes back with the dropped run's slots, fragments and commit.
// The others kept the drop in their job state files ("<job>.jobstate"), so the job's coordinator
// learns it from them and the next launch starts fresh. Without the files, the restarted members
// knew nothing of the job, and the returning member's commit made the dropped run resumable.
TEST_F(CliDropTest, ADropOutlivesARestartOfEveryMemberThatTookIt) {
  ASSERT_NO_FATAL_FAILURE(DropWhileN1IsStopped());

  for (int n : {0, 2}) {
    EXPECT_TRUE(std::ifstream(daemons_[n]->store_dir() + "/" + kJob + ".jobstate").good())
        << "n" << n << " keeps no state of the job";
    daemons_[n]->Kill(SIGKILL);
    daemons_[n]->Wait();
  }
  for (int n : {0, 2}) {
    std::string error;
    ASSERT_TRUE(daemons_[n]->Start(&error)) << error;
  }
  ExpectTheDropKeptOnN0AndN2WhenN1Returns();
}

// store.state_directory apart from the segments, as on a disk (deploy/ keeps it in
// /var/lib/tessera): a reboot empties the store directory and leaves the job state files.
class CliDropRebootTest : public CliDropTest {
 protected:
  void SetUp() override {
    state_root_ = root_.path() + "/state";
    extra_flags_ = {"--set", "store.state_directory=" + state_root_};
    CliDropTest::SetUp();
  }

  // Member n as after a reboot: killed, its memory (every segment, every slot and fragment)
  // gone, started again.
  void Reboot(int n) {
    daemons_[n]->Kill(SIGKILL);
    daemons_[n]->Wait();
    std::filesystem::remove_all(daemons_[n]->store_dir());
    std::string error;
    ASSERT_TRUE(daemons_[n]->Start(&error)) << error;
  }

  std::string state_root_;
};

// Every member that took a drop reboots while the one that missed it is stopped; that one comes
// back with the dropped run's slots and fragments (rank 1's shard, and a fragment of rank 0's:
// enough to resume both). The others kept the drop on "disk", so the next launch starts fresh.
// With the state files beside the segments (the default), the reboot took them too and both
// ranks restored the dropped run's step 8.
TEST_F(CliDropRebootTest, ADropKeptOnDiskOutlivesARebootOfEveryMemberThatTookIt) {
  ASSERT_NO_FATAL_FAILURE(DropWhileN1IsStopped());
  for (int n : {0, 2}) {
    const std::string name = std::string("/") + kJob + ".jobstate";
    EXPECT_TRUE(std::ifstream(absl::StrCat(state_root_, "/n", n, name)).good())
        << "n" << n << " keeps no state of the job in " << state_root_;
    EXPECT_FALSE(std::ifstream(daemons_[n]->store_dir() + name).good())
        << "n" << n << " keeps the job's state beside its segments";
  }
  for (int n : {0, 2}) ASSERT_NO_FATAL_FAILURE(Reboot(n));
  ExpectTheDropKeptOnN0AndN2WhenN1Returns();
}

// A state directory the daemon cannot make (here under a regular file) is refused at start,
// naming the key and the directory, rather than run with drops that a restart would forget.
TEST_F(CliDropRebootTest, AStateDirectoryThatCannotBeMadeIsRefusedAtStart) {
  const std::string file = root_.path() + "/not-a-directory";
  std::ofstream(file) << "x";
  DaemonProcess daemon(
      root_.path(), "n9", uint64_t{64} << 20,
      TokenClusterFlags({addresses_[0], absl::StrCat("127.0.0.1:", FreePort())}, 1, token_file_, 1,
                        1, {"--set", "store.state_directory=" + file}));
  std::string error;
  ASSERT_FALSE(daemon.Start(&error, seconds(20)));
  EXPECT_THAT(error, HasSubstr("store.state_directory: cannot create or write " + file + "/n9"));
}

TEST_F(CliDropTest, ADropIsRefusedWhileATrainerRunsUnlessForced) {
  std::vector<std::unique_ptr<Process>> trainers;
  for (uint32_t r = 0; r < kWorld; ++r) trainers.push_back(StartTrainer(r, 100000, 1));
  for (uint32_t r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(trainers[r]->ReadUntil(
        [](const std::string& line) { return absl::StartsWith(line, "sealed 3"); },
        milliseconds(120000)))
        << absl::StrJoin(trainers[r]->lines(), "\n");
  }
  CliRun refused = Tessera({"drop", kJob}, 2);
  EXPECT_EQ(refused.exit_code, 4) << refused.Describe();
  EXPECT_THAT(refused.err, HasSubstr("job 'drop-job' is still being trained: "));
  EXPECT_THAT(refused.err, HasSubstr(absl::StrCat("rank 0 on n0 (pid ", trainers[0]->pid(), ")")));
  EXPECT_THAT(refused.err, HasSubstr(absl::StrCat("rank 1 on n1 (pid ", trainers[1]->pid(), ")")));
  EXPECT_THAT(refused.err, HasSubstr("nothing was dropped"));
  EXPECT_THAT(refused.err, HasSubstr("(here: tessera drop drop-job --force)"));
  for (int n = 0; n < 2; ++n) {
    EXPECT_FALSE(JobFiles(daemons_[n]->store_dir()).empty()) << "n" << n;
  }

  CliRun forced = Tessera({"drop", kJob, "--force", "--json"}, 2);
  ASSERT_EQ(forced.exit_code, 0) << forced.Describe();
  std::vector<int64_t> running;
  for (const auto& v : List(forced.result().at("running_pids")).values()) {
    running.push_back(static_cast<int64_t>(v.number_value()));
  }
  EXPECT_THAT(running, ::testing::UnorderedElementsAre(trainers[0]->pid(), trainers[1]->pid()));
  for (auto& t : trainers) {
    t->Signal(SIGKILL);
    t->Wait();
  }
  // What the trainers sealed after the forced drop is void: the next launch starts fresh.
  ExpectFresh(Train(3, 2));
}

// A drop refused after its check (a trainer runs) lifts the fence its check put up on every
// member: another rank of the job registers at once, not once the fence lapses (here 10 minutes).
class CliDropFenceTest : public CliDropTest {
 protected:
  void SetUp() override {
    extra_flags_ = {"--set", "cluster.drop_fence_ms=600000"};
    CliDropTest::SetUp();
  }
};

TEST_F(CliDropFenceTest, ADropRefusedAfterItsCheckLiftsTheFenceOnEveryMember) {
  auto rank0 = StartTrainer(0, 100000, 1);
  ASSERT_TRUE(
      rank0->ReadUntil([](const std::string& line) { return absl::StartsWith(line, "sealed 2"); },
                       milliseconds(120000)))
      << absl::StrJoin(rank0->lines(), "\n");
  CliRun refused = Tessera({"drop", kJob}, 1);
  EXPECT_EQ(refused.exit_code, 4) << refused.Describe();
  EXPECT_THAT(refused.err, HasSubstr("job 'drop-job' is still being trained: "));
  auto rank1 = StartTrainer(1, 100000, 1);
  EXPECT_TRUE(
      rank1->ReadUntil([](const std::string& line) { return absl::StartsWith(line, "sealed 2"); },
                       milliseconds(120000)))
      << absl::StrJoin(rank1->lines(), "\n");
  EXPECT_THAT(rank1->lines(), ::testing::Not(::testing::Contains(HasSubstr("being dropped"))));
  for (auto* t : {rank0.get(), rank1.get()}) {
    t->Signal(SIGKILL);
    t->Wait();
  }
}

// A trainer that registers between the drop's check and its push would seal into the dropped
// epoch, void. From the check on, every member refuses the job's registrations until the drop
// reaches it. The coordinator is held in that window by a test hook (TESSERA_TEST_HOLD_DROP_FILE:
// it waits while the file exists, having created "<file>.held"), so nothing here is timed.
class CliDropHeldTest : public CliDropTest {
 protected:
  void SetUp() override {
    hold_file_ = root_.path() + "/hold-drop";
    launcher_ = {"/usr/bin/env", "TESSERA_TEST_HOLD_DROP_FILE=" + hold_file_};
    // The fence outlasts anything this test waits for: only the drop lifts it.
    extra_flags_ = {"--set", "cluster.drop_fence_ms=600000"};
    CliDropTest::SetUp();
  }

  // Trains the job and drops it, which names its coordinator (by the job id's rendezvous hash,
  // the same while the membership is), then trains and commits it again. Returns the
  // coordinator's index, or -1 (with the failure added).
  int TrainDropAndTrainAgain() {
    Train(4, 1);
    if (WaitForSettledCommit() < 0) return -1;
    CliRun first = Tessera({"drop", kJob, "--json"}, 0);
    const std::string coordinator =
        first.exit_code == 0 ? first.result().at("coordinator").string_value() : "";
    if (coordinator.size() != 2u) {
      ADD_FAILURE() << first.Describe();
      return -1;
    }
    ExpectFresh(Train(4, 2));
    if (WaitForSettledCommit() < 0) return -1;
    return coordinator[1] - '0';
  }

  // A drop asked on its coordinator n<c> (so that no forwarding deadline runs out), held between
  // its check and its push; null (with the failure added) if it never reached the hold.
  std::unique_ptr<Process> StartHeldDrop(int c) {
    std::ofstream(hold_file_) << "hold\n";
    auto drop = Process::Start(
        {BinaryPath("cli/tessera"), "drop", kJob, "--json", "--socket", daemons_[c]->socket_path()},
        root_.path() + "/held-drop.err");
    for (int i = 0; i < 600; ++i) {
      if (std::ifstream(hold_file_ + ".held").good()) return drop;
      std::this_thread::sleep_for(milliseconds(100));
    }
    ADD_FAILURE() << "the coordinator never reached the hold\n" << daemons_[c]->LogTail();
    return nullptr;
  }

  // Lets the held drop go on; it must succeed.
  void ReleaseHeldDrop(Process& drop) {
    std::remove(hold_file_.c_str());
    EXPECT_EQ(drop.Wait(seconds(120)), 0)
        << absl::StrJoin(drop.lines(), "\n") << ReadFile(root_.path() + "/held-drop.err");
  }

  std::string hold_file_;
};

TEST_F(CliDropHeldTest, ATrainerRegisteringWhileTheJobIsDroppedIsRefused) {
  const int c = TrainDropAndTrainAgain();
  ASSERT_GE(c, 0);
  auto drop = StartHeldDrop(c);
  ASSERT_TRUE(drop);

  // Every member was checked: a trainer of the job is refused on each, with the reason.
  for (uint32_t r = 0; r < kWorld; ++r) {
    auto trainer = StartTrainer(r, 4, 3);
    EXPECT_EQ(trainer->Wait(seconds(60)), 1) << absl::StrJoin(trainer->lines(), "\n");
    EXPECT_THAT(trainer->lines(),
                ::testing::Contains(::testing::AllOf(
                    HasSubstr("error: register: UNAVAILABLE: job 'drop-job' is being dropped"),
                    HasSubstr("register again once the drop has finished"))))
        << "rank " << r;
  }

  ReleaseHeldDrop(*drop);
  // The drop lifted the fence on every member: the job registers fresh.
  ExpectFresh(Train(4, 4));
}

// A member killed and restarted while the drop is held holds no fence: a trainer registers there
// and asks to resume. The coordinator answers no restore point while it decides the drop (its
// own fence), so the trainer waits instead of restoring the run being dropped, and once the drop
// is decided it starts fresh.
TEST_F(CliDropHeldTest, ATrainerOnAMemberRestartedDuringTheDropDoesNotResumeTheDroppedRun) {
  const int c = TrainDropAndTrainAgain();
  ASSERT_GE(c, 0);
  // A rank's owner other than the coordinator (rank r trains on n<r>).
  const int m = c == 1 ? 0 : 1;
  ASSERT_FALSE(JobFiles(daemons_[m]->store_dir()).empty());
  auto drop = StartHeldDrop(c);
  ASSERT_TRUE(drop);

  // n<m> restarts holding the run's slots again (re-adopted) and no fence of the drop.
  daemons_[m]->Kill(SIGKILL);
  daemons_[m]->Wait();
  std::string error;
  ASSERT_TRUE(daemons_[m]->Start(&error)) << error;
  auto trainer = StartTrainer(m, 4, 3);
  const std::string refusal = "restore point not decided yet: job 'drop-job' is being dropped";
  // Until the coordinator refuses it, or (the failure this catches) it restores the dropped run.
  bool refused = false;
  for (int i = 0; i < 600 && !refused; ++i) {
    refused = absl::StrContains(daemons_[c]->LogTail(size_t{1} << 20), refusal);
    if (!refused && trainer->ReadUntil(
                        [](const std::string& line) { return absl::StartsWith(line, "restored"); },
                        milliseconds(100))) {
      break;
    }
  }
  EXPECT_TRUE(refused) << "the coordinator never refused the trainer's restore question\n"
                       << daemons_[c]->LogTail() << "\n"
                       << absl::StrJoin(trainer->lines(), "\n");

  ReleaseHeldDrop(*drop);
  // The other rank's member took the drop's check and fence: it registers once the drop is done.
  auto other = StartTrainer(1 - m, 4, 3);
  EXPECT_EQ(trainer->Wait(seconds(120)), 0) << absl::StrJoin(trainer->lines(), "\n");
  EXPECT_EQ(other->Wait(seconds(120)), 0) << absl::StrJoin(other->lines(), "\n");
  ExpectFresh({trainer->lines(), other->lines()});
}

// `tessera drop` on a cluster answers only root, the daemon's uid and the uid that registered the
// job, checked on every member: another uid is refused and nothing of the job is deleted.
class CliDropUidTest : public CliDropTest {
 protected:
  void SetUp() override {
    if (std::string why = CannotSwitchUids(); !why.empty()) GTEST_SKIP() << why;
    extra_flags_ = {"--set", "agent.socket_mode=0666"};
    CliDropTest::SetUp();
  }
};

// Rank 1 of a job of uid 65534 relaunched on n2, which holds only fragments of it: n2 copies or
// rebuilds the shard into a segment of its own for the restore, which is the daemon's (mode 0600)
// until the restoring trainer's uid is let in. Before, such a segment was readable by the
// daemon's group (every trainer's) instead of by the job's uid.
TEST_F(CliDropUidTest, ATrainerOfAnotherUidRestoresAShardMadeLocalOnAnotherNode) {
  Train(6, 1, /*uid=*/65534);
  const int64_t committed = WaitForSettledCommit();
  ASSERT_GE(committed, 0);
  auto moved = StartTrainer(1, /*steps=*/1, 2, /*sleep_ms=*/100, /*uid=*/65534, /*node=*/2);
  ASSERT_EQ(moved->Wait(seconds(120)), 0) << absl::StrJoin(moved->lines(), "\n");
  EXPECT_EQ(LastEvent(moved->lines(), "resumed"), committed) << absl::StrJoin(moved->lines(), "\n");
}

TEST_F(CliDropUidTest, OnlyTheJobsUidOrRootDropsItOnACluster) {
  Train(6, 1, /*uid=*/65534);
  const int64_t committed = WaitForSettledCommit();
  ASSERT_GE(committed, 0);
  std::vector<std::vector<std::string>> held;
  for (int n = 0; n < kNodes; ++n) held.push_back(JobFiles(daemons_[n]->store_dir()));

  for (int n = 0; n < kNodes; ++n) {
    CliRun refused = Tessera({"drop", kJob, "--force"}, n, /*uid=*/65533);
    // Refused (exit 4) with the message of PERMISSION_DENIED (the CLI prints no code name).
    EXPECT_EQ(refused.exit_code, 4) << refused.Describe();
    EXPECT_THAT(refused.err, HasSubstr("job 'drop-job' belongs to uid 65534 here"));
    EXPECT_THAT(refused.err, HasSubstr("the caller is uid 65533: only root, the daemon's uid or "
                                       "the uid that registered the job may drop it"));
  }
  for (int n = 0; n < kNodes; ++n) {
    EXPECT_EQ(JobFiles(daemons_[n]->store_dir()), held[n]) << "n" << n;
  }
  // Nothing was dropped: the job resumes from its commit.
  auto resumed = Train(committed + 2, 2, /*uid=*/65534);
  for (uint32_t rank = 0; rank < kWorld; ++rank) {
    EXPECT_GE(LastEvent(resumed[rank], "resumed"), committed)
        << absl::StrJoin(resumed[rank], "\n");
  }
  ASSERT_GE(WaitForSettledCommit(), 0);

  // The job's own uid drops it everywhere, fragments included.
  CliRun drop = Tessera({"drop", kJob, "--json"}, 2, /*uid=*/65534);
  ASSERT_EQ(drop.exit_code, 0) << drop.Describe();
  EXPECT_EQ(List(drop.result().at("nodes")).values_size(), kNodes);
  EXPECT_EQ(drop.result().at("slots_deleted").number_value(), 2 * kWorld);
  EXPECT_GT(drop.result().at("fragments_deleted").number_value(), 0);
  for (int n = 0; n < kNodes; ++n) {
    EXPECT_THAT(JobFiles(daemons_[n]->store_dir()), ::testing::IsEmpty()) << "n" << n;
  }
  // Root may drop any job (the same drop again: nothing left).
  CliRun again = Tessera({"drop", kJob}, 0);
  EXPECT_EQ(again.exit_code, 0) << again.Describe();
}

}  // namespace
}  // namespace tessera::testing
