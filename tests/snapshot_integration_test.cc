// Node-local protection with real processes: tesserad, trainer processes, SIGKILL.
#include <signal.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/client.h"
#include "common/segment.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/agent.grpc.pb.h"
#include "proto/manifest.pb.h"
#include "tests/harness.h"
#include "tests/trainer_state.h"

namespace tessera::testing {
namespace {

using std::chrono::milliseconds;

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n", static_cast<unsigned long long>(seed));
  return seed;
}

struct Layout {
  const char* name;
  uint64_t tensors, min_bytes, max_bytes, total_bytes;
  int max_run_ms;  // how long a trainer may run before it is killed
};

// From a few bytes to hundreds of MiB, from 1 to 300 tensors.
const Layout kLayouts[] = {
    {"tiny", 1, 1, 7, 7, 30},
    {"many", 300, 1, 64 << 10, 8 << 20, 120},
    {"huge", 1, 200 << 20, 200 << 20, 200 << 20, 900},
    {"mixed", 40, 1 << 10, 32 << 20, 128 << 20, 500},
    {"wide", 5, 1 << 20, 64 << 20, 160 << 20, 600},
};

std::vector<std::string> TrainerArgs(const DaemonProcess& d, const std::string& job,
                                     const Layout& l, uint64_t seed, uint32_t rank = 0,
                                     uint32_t world = 1) {
  return TrainerCommand(d, job, seed, rank, world,
                        TrainerLayout{l.tensors, l.min_bytes, l.max_bytes, l.total_bytes});
}

bool IsStartLine(const std::string& l) {
  return l == "fresh" || absl::StartsWith(l, "resumed ") || absl::StartsWith(l, "error");
}

// The trainer is SIGKILLed at 50 random instants, while copying and sealing included; each time
// the next trainer restores exactly the newest sealed step, bit-exact (the trainer checks every
// byte against the seeded state and prints "resumed S" only when it matches).
TEST(SnapshotIntegrationTest, TrainerKilledAtRandomInstantsRestoresNewestSealedBitExact) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{2} << 30);
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;

  const int kKills = 50;
  const size_t n_layouts = std::size(kLayouts);
  std::vector<int64_t> last_sealed(n_layouts, -1), last_started(n_layouts, 0);
  int in_flight_kills = 0;
  for (int kill = 0; kill < kKills; ++kill) {
    const size_t li = kill % n_layouts;
    const Layout& l = kLayouts[li];
    const std::string job = absl::StrCat("kill-", l.name);
    std::vector<std::string> argv = TrainerArgs(daemon, job, l, seed + li);
    argv.push_back(rng() % 2 ? "--when-busy=wait" : "--when-busy=skip");
    auto trainer = Process::Start(argv);
    auto first = trainer->ReadUntil(IsStartLine, std::chrono::seconds(60));
    ASSERT_TRUE(first.has_value()) << "kill " << kill << ": trainer did not start";
    SCOPED_TRACE(absl::StrCat("kill ", kill, " layout ", l.name, ": ", *first));
    ASSERT_FALSE(absl::StartsWith(*first, "error")) << *first;
    if (last_sealed[li] >= 0) {
      // The newest sealed step: at least what the killed trainer saw sealed, at most what it
      // started; the trainer verified every byte before printing it.
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
              in_flight_kills, kKills);
  EXPECT_GE(in_flight_kills, kKills / 4) << "the kills should hit copies and seals";

  // A final check of every layout from a fresh process.
  for (size_t li = 0; li < n_layouts; ++li) {
    std::vector<std::string> argv = TrainerArgs(daemon, absl::StrCat("kill-", kLayouts[li].name),
                                                kLayouts[li], seed + li);
    argv.push_back("--mode=verify");
    auto verifier = Process::Start(argv);
    EXPECT_EQ(verifier->Wait(), 0);
    int64_t verified = LastEvent(verifier->lines(), "verified");
    EXPECT_GE(verified, last_sealed[li]) << kLayouts[li].name;
    EXPECT_LE(verified, last_started[li]) << kLayouts[li].name;
  }
}

// The daemon is SIGKILLed at random instants while three ranks snapshot every step. The trainers
// keep training, re-register with the restarted daemon and keep sealing; the job's restore point
// (the newest step every rank sealed) survives each restart, and new trainers all resume from
// the same step, bit-exact. The ranks advance in lockstep (--barrier), as those of a synchronous
// job do: unsynchronized, ranks 0 and 1 ran 20 steps ahead while rank 2 was still starting, kept
// only their two newest steps, and no step was held by every rank when the daemon was killed
// (round 1 started fresh: seed 1645448933 in make test, on this 2-core machine under load).
TEST(SnapshotIntegrationTest, DaemonKilledAndRestartedKeepsEverySealedSlot) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{1} << 30);
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const Layout l{"dk", 20, 1 << 10, 4 << 20, 24 << 20, 0};
  const int kRanks = 3;
  std::vector<int64_t> sealed_before(kRanks, -1);
  int64_t last_resumed = -1;
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    // All ranks resume together at the job's restore point: the same step on every rank, checked
    // byte for byte, and never older than where the previous round resumed.
    const int64_t common_sealed = last_resumed;
    std::vector<std::unique_ptr<Process>> trainers;
    std::set<int64_t> resumed_steps;
    // A barrier of this round's trainers only (the killed ones' steps would let a rank pass).
    const std::string barrier = absl::StrCat(root.path(), "/barrier-", round);
    std::filesystem::create_directories(barrier);
    for (int r = 0; r < kRanks; ++r) {
      auto argv = TrainerArgs(daemon, "dk", l, seed + r, r, kRanks);
      argv.push_back("--barrier=" + barrier);
      argv.push_back("--when-busy=wait");
      argv.push_back("--step-sleep-ms=2");
      trainers.push_back(Process::Start(argv));
      auto first = trainers[r]->ReadUntil(IsStartLine, std::chrono::seconds(60));
      ASSERT_TRUE(first.has_value());
      ASSERT_FALSE(absl::StartsWith(*first, "error")) << *first;
      if (round > 0) {
        auto resumed = ParseEvent(*first, "resumed");
        ASSERT_TRUE(resumed.has_value()) << "rank " << r << ": " << *first << "; daemon log:\n"
                                         << daemon.LogTail(6000);
        EXPECT_GE(*resumed, common_sealed) << "rank " << r;
        resumed_steps.insert(*resumed);
      }
    }
    if (round > 0) {
      EXPECT_EQ(resumed_steps.size(), 1u) << "ranks resumed different steps";
      if (!resumed_steps.empty()) last_resumed = *resumed_steps.begin();
    }
    // Let them seal a few steps, then kill the daemon mid-flight.
    for (auto& t : trainers) {
      ASSERT_TRUE(t->ReadUntil([](const std::string& s) { return ParseEvent(s, "sealed").value_or(-1) > 0; },
                               std::chrono::seconds(30)));
    }
    std::this_thread::sleep_for(milliseconds(rng() % 100));
    daemon.Kill(SIGKILL);
    std::vector<int64_t> at_kill(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      trainers[r]->DrainOutput(milliseconds(100));
      at_kill[r] = LastEvent(trainers[r]->lines(), "sealed");
    }
    ASSERT_TRUE(daemon.Start(&error)) << error;
    // Training went on; after the restart each trainer re-registers and seals newer steps.
    for (int r = 0; r < kRanks; ++r) {
      const int64_t before = at_kill[r];
      auto newer = trainers[r]->ReadUntil(
          [before](const std::string& s) { return ParseEvent(s, "sealed").value_or(-1) > before; },
          std::chrono::seconds(60));
      ASSERT_TRUE(newer.has_value()) << "rank " << r << " sealed nothing after the restart; log:\n"
                                     << daemon.LogTail();
    }
    for (int r = 0; r < kRanks; ++r) {
      trainers[r]->Signal(SIGKILL);
      trainers[r]->Wait();
      for (const auto& line : trainers[r]->lines()) {
        ASSERT_FALSE(absl::StartsWith(line, "error")) << line;
      }
      sealed_before[r] = LastEvent(trainers[r]->lines(), "sealed");
    }
  }
  // One more daemon restart with nobody attached: everything sealed is re-adopted.
  daemon.Kill(SIGKILL);
  ASSERT_TRUE(daemon.Start(&error)) << error;
  const int64_t common_sealed = last_resumed;
  std::set<int64_t> verified_steps;
  for (int r = 0; r < kRanks; ++r) {
    auto argv = TrainerArgs(daemon, "dk", l, seed + r, r, kRanks);
    argv.push_back("--mode=verify");
    auto verifier = Process::Start(argv);
    EXPECT_EQ(verifier->Wait(), 0) << "rank " << r;
    EXPECT_GE(LastEvent(verifier->lines(), "verified"), common_sealed) << "rank " << r;
    verified_steps.insert(LastEvent(verifier->lines(), "verified"));
  }
  EXPECT_EQ(verified_steps.size(), 1u) << "ranks restored different steps";
}

// Finds the slot file that holds `step` of (job, rank) in the daemon's store.
std::string SealedSlot(const DaemonProcess& d, const std::string& job, int64_t step) {
  for (const auto& f : std::filesystem::directory_iterator(d.store_dir())) {
    if (!absl::StartsWith(f.path().filename().string(), job + ".")) continue;
    auto seg = Segment::Open(f.path().string(), false);
    if (seg.ok() && LoadState(*(*seg)->header()) == SegmentState::kSealed &&
        (*seg)->header()->step == step) {
      return f.path().string();
    }
  }
  return "";
}

void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.read(&c, 1);
  c ^= 0x20;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = TestSeed();
    daemon_ = std::make_unique<DaemonProcess>(root_.path(), "n0", uint64_t{512} << 20);
    std::string error;
    ASSERT_TRUE(daemon_->Start(&error)) << error;
  }

  // Runs a trainer to completion and returns its output lines.
  std::vector<std::string> RunTrainer(const std::string& job, uint64_t seed,
                                      std::vector<std::string> extra, int* exit_code = nullptr) {
    auto argv = TrainerArgs(*daemon_, job, layout_, seed);
    argv.push_back("--when-busy=wait");  // every step is sealed, so the newest step is known
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Process::Start(argv);
    int code = p->Wait();
    if (exit_code) *exit_code = code;
    return p->lines();
  }

  std::unique_ptr<Client> Connect() {
    Client::Options options;
    options.socket_path = daemon_->socket_path();
    options.use_gpu = false;
    auto c = Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  uint64_t seed_;
  TempRoot root_;
  std::unique_ptr<DaemonProcess> daemon_;
  Layout layout_{"bad", 12, 100, 1 << 20, 4 << 20, 0};
};

TEST_F(BadInputTest, RejectedInputNeverChangesStoredData) {
  int code;
  auto lines = RunTrainer("good", seed_, {"--steps=5"}, &code);
  ASSERT_EQ(code, 0);
  ASSERT_EQ(LastEvent(lines, "sealed"), 5);

  // A rank outside the world.
  lines = RunTrainer("good", seed_, {"--rank=2", "--world=2"}, &code);
  EXPECT_EQ(code, 1);
  EXPECT_TRUE(absl::StrContains(lines.back(), "INVALID_ARGUMENT")) << lines.back();
  EXPECT_TRUE(absl::StrContains(lines.back(), "valid ranks: 0..1")) << lines.back();

  // Two trainers claiming one rank.
  auto holder = Process::Start([&] {
    auto a = TrainerArgs(*daemon_, "good", layout_, seed_);
    a.push_back("--step-sleep-ms=20");
    return a;
  }());
  ASSERT_TRUE(holder->ReadUntil(IsStartLine, std::chrono::seconds(30)));
  lines = RunTrainer("good", seed_, {"--steps=1"}, &code);
  EXPECT_EQ(code, 1);
  EXPECT_TRUE(absl::StrContains(lines.back(), "FAILED_PRECONDITION")) << lines.back();
  EXPECT_TRUE(absl::StrContains(lines.back(), absl::StrCat("held by pid ", holder->pid())))
      << lines.back();
  holder->Signal(SIGKILL);
  holder->Wait();
  // The holder may seal one more step between its last line and the kill.
  const int64_t newest_seen = std::max(LastEvent(holder->lines(), "sealed"), int64_t{5});
  const int64_t newest_started = std::max(LastEvent(holder->lines(), "snapshot"), int64_t{5});

  // A step going backwards, and a size that does not match the shape, from an in-process client.
  auto state = MakeState(seed_, layout_.tensors, layout_.min_bytes, layout_.max_bytes,
                         layout_.total_bytes);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  auto bad_entries = ClientEntries(&state);
  bad_entries[0].spec.set_nbytes(bad_entries[0].spec.nbytes() + 4);
  absl::Status bad_size = client->Register("good", 0, 1, bad_entries);
  EXPECT_EQ(bad_size.code(), absl::StatusCode::kInvalidArgument) << bad_size;
  EXPECT_TRUE(absl::StrContains(bad_size.message(), "does not match shape")) << bad_size;
  ASSERT_TRUE(client->Register("good", 0, 1, ClientEntries(&state)).ok());
  auto outcome = client->Snapshot(1);
  ASSERT_TRUE(outcome.ok());
  absl::Status backwards = client->Wait();
  EXPECT_EQ(backwards.code(), absl::StatusCode::kFailedPrecondition) << backwards;
  EXPECT_TRUE(absl::StrContains(backwards.message(), "is not after the newest sealed step"))
      << backwards;
  EXPECT_EQ(client->stats().failed, 1u);
  ASSERT_TRUE(client->Close().ok());
  client.reset();

  // Through all of it the newest sealed step stayed intact.
  lines = RunTrainer("good", seed_, {"--mode=verify"}, &code);
  EXPECT_EQ(code, 0) << lines.back();
  EXPECT_GE(LastEvent(lines, "verified"), newest_seen);
  EXPECT_LE(LastEvent(lines, "verified"), newest_started);
}

TEST_F(BadInputTest, CorruptedPayloadOrHeaderIsReportedAsDataLoss) {
  int code;
  for (const char* job : {"payload", "header"}) {
    auto lines = RunTrainer(job, seed_, {"--steps=3"}, &code);
    ASSERT_EQ(code, 0);
    std::string slot = SealedSlot(*daemon_, job, 3);
    ASSERT_FALSE(slot.empty());
    const bool header = std::string(job) == "header";
    FlipByte(slot, header ? offsetof(SegmentHeader, rank) : kSegmentHeaderBytes + seed_ % 1000);
    lines = RunTrainer(job, seed_, {"--mode=verify"}, &code);
    EXPECT_EQ(code, 1);
    EXPECT_TRUE(absl::StrContains(lines.back(), "DATA_LOSS")) << lines.back();
    EXPECT_TRUE(absl::StrContains(lines.back(), header ? "header CRC32C" : "payload CRC32C"))
        << lines.back();
  }
  // A restarted daemon discards the damaged slots and says so; nothing damaged is handed out.
  daemon_->Kill(SIGKILL);
  std::string error;
  ASSERT_TRUE(daemon_->Start(&error)) << error;
  EXPECT_TRUE(absl::StrContains(daemon_->LogTail(), "discarding damaged segment"))
      << daemon_->LogTail();
  auto lines = RunTrainer("payload", seed_, {"--mode=verify"}, &code);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(lines.back(), "verified 0") << "no damaged step may be restored";
}

// A trainer can write its slot's header. One whose manifest offset plus length wraps around
// 2^64 (header CRC recomputed, so it looks intact) once passed every bounds check, and the client
// library died with SIGSEGV on restore. Now the daemon and the client check ranges without
// overflow: the restore fails with DATA_LOSS, the daemon stays up, and a restarted daemon
// discards the slot.
TEST_F(BadInputTest, AHeaderWhoseManifestRangeWrapsIsDataLossNotACrash) {
  int code;
  auto lines = RunTrainer("wrap", seed_, {"--steps=3"}, &code);
  ASSERT_EQ(code, 0);
  const std::string slot = SealedSlot(*daemon_, "wrap", 3);
  ASSERT_FALSE(slot.empty());
  {
    std::fstream f(slot, std::ios::in | std::ios::out | std::ios::binary);
    SegmentHeader h;
    f.read(reinterpret_cast<char*>(&h), sizeof(h));
    ASSERT_TRUE(f.good());
    // offset + bytes == 4096 + seed % 4096 modulo 2^64: inside the payload, if it wrapped; the
    // offset points a terabyte before the mapping.
    h.manifest_offset = ~uint64_t{0} - (uint64_t{1} << 40) + 1;
    h.manifest_bytes = (uint64_t{1} << 40) + 4096 + seed_ % 4096;
    h.header_crc32c = ComputeHeaderCrc(h);
    f.seekp(0);
    f.write(reinterpret_cast<const char*>(&h), sizeof(h));
    ASSERT_TRUE(f.good());
  }
  lines = RunTrainer("wrap", seed_, {"--mode=verify"}, &code);
  EXPECT_EQ(code, 1) << "the trainer must fail with an error, not a signal; last line: "
                     << (lines.empty() ? "" : lines.back());
  ASSERT_FALSE(lines.empty());
  EXPECT_TRUE(absl::StrContains(lines.back(), "DATA_LOSS")) << lines.back();
  EXPECT_EQ(daemon_->Poll(), -1) << "the daemon exited";
  daemon_->Kill(SIGKILL);
  std::string error;
  ASSERT_TRUE(daemon_->Start(&error)) << error;
  EXPECT_TRUE(absl::StrContains(daemon_->LogTail(), "discarding damaged segment"))
      << daemon_->LogTail();
  lines = RunTrainer("wrap", seed_, {"--mode=verify"}, &code);
  EXPECT_EQ(code, 0) << (lines.empty() ? "" : lines.back());
  ASSERT_FALSE(lines.empty());
  EXPECT_NE(lines.back(), "verified 3") << "the damaged step may not be restored";
}

// A snapshot's checksum comes from its bytes as they landed in shared memory, not from a second
// pass at seal. A byte changed after it was checksummed (a stray write into the slot between copy
// and seal) therefore fails the restore: the client checks each block before copying it, finds
// the bad one, asks the daemon to check the whole payload, and the daemon says DATA_LOSS. The
// entries before the bad one are restored; the bad one and those after it are not written.
// With store.seal_checksum = "daemon", the same write makes the seal fail instead.
TEST_F(BadInputTest, BytesChangedAfterTheyWereChecksummedFailTheRestoreNotTheSeal) {
  std::mt19937_64 rng(seed_);
  auto state = MakeState(seed_, layout_.tensors, layout_.min_bytes, layout_.max_bytes,
                         layout_.total_bytes);
  const size_t victim = 1 + rng() % (state.size() - 2);  // a tensor, not the first
  uint64_t victim_offset = 0;  // in the payload, set by the hook from the layout
  const uint64_t at = rng() % state[victim].spec.nbytes();
  bool armed = false;
  Client::Options options;
  options.socket_path = daemon_->socket_path();
  options.use_gpu = false;
  options.when_busy = Client::BusyPolicy::kWait;
  options.after_checksums_for_testing = [&](uint8_t* payload, uint64_t) {
    if (armed) payload[victim_offset + at] ^= 0x40;
  };
  auto connected = Client::Connect(options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  std::unique_ptr<Client> client = std::move(*connected);
  ASSERT_TRUE(client->Register("stray", 0, 1, ClientEntries(&state)).ok());
  ASSERT_TRUE(client->Snapshot(1).ok());
  ASSERT_TRUE(client->Wait().ok());
  {
    // Where the victim lies in the payload: its manifest entry in the sealed slot.
    auto segment = Segment::Open(SealedSlot(*daemon_, "stray", 1), /*writable=*/false);
    ASSERT_TRUE(segment.ok()) << segment.status();
    ShardManifest manifest;
    const SegmentHeader& h = *(*segment)->header();
    ASSERT_TRUE(manifest.ParseFromArray((*segment)->payload() + h.manifest_offset,
                                        static_cast<int>(h.manifest_bytes)));
    victim_offset = manifest.entries(static_cast<int>(victim)).offset();
    EXPECT_EQ(manifest.crc_block_bytes(), uint64_t{8} << 20);
    EXPECT_EQ(manifest.entries(static_cast<int>(victim)).block_crc32c_size(), 1);
  }
  armed = true;
  ASSERT_TRUE(client->Snapshot(2).ok());
  ASSERT_TRUE(client->Wait().ok()) << "the seal takes the client's checksum; it must succeed";

  std::vector<std::vector<uint8_t>> snapshotted;
  for (const StateEntry& e : state) snapshotted.push_back(e.bytes);
  Scramble(&state, seed_ + 1);
  std::vector<std::vector<uint8_t>> scrambled;
  for (const StateEntry& e : state) scrambled.push_back(e.bytes);
  const absl::StatusOr<int64_t> restored = client->Restore(2);
  ASSERT_EQ(restored.status().code(), absl::StatusCode::kDataLoss) << restored.status();
  EXPECT_TRUE(absl::StrContains(restored.status().message(), "payload CRC32C"))
      << restored.status();
  for (size_t i = 0; i < victim; ++i) {
    EXPECT_EQ(state[i].bytes, snapshotted[i]) << "entry " << i << " before the bad one";
  }
  EXPECT_EQ(state[victim].bytes, scrambled[victim]) << "the bad entry may not be written";
  EXPECT_TRUE(absl::StrContains(daemon_->LogTail(), "payload CRC32C")) << daemon_->LogTail();
  ASSERT_TRUE(client->Close().ok());
  client.reset();

  // The daemon that checks every seal refuses the same write at seal.
  DaemonProcess auditing(root_.path(), "n1", uint64_t{256} << 20,
                         {"--set", "store.seal_checksum=daemon"});
  std::string error;
  ASSERT_TRUE(auditing.Start(&error)) << error;
  options.socket_path = auditing.socket_path();
  connected = Client::Connect(options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  client = std::move(*connected);
  ASSERT_TRUE(client->Register("stray", 0, 1, ClientEntries(&state)).ok());
  armed = false;
  ASSERT_TRUE(client->Snapshot(1).ok());
  ASSERT_TRUE(client->Wait().ok());
  armed = true;
  ASSERT_TRUE(client->Snapshot(2).ok());
  const absl::Status sealed = client->Wait();
  EXPECT_EQ(sealed.code(), absl::StatusCode::kDataLoss) << sealed;
  EXPECT_TRUE(absl::StrContains(sealed.message(), "changed after they were checksummed"))
      << sealed;
  auto versions = client->ListVersions();
  ASSERT_TRUE(versions.ok()) << versions.status();
  for (const agent::Version& v : *versions) {
    EXPECT_FALSE(v.step() == 2 && v.state() == "SEALED") << "step 2 may not be sealed";
  }
}

// A trainer can write its own slot's header. One rewritten to claim another job (header CRC
// recomputed, newer steps) was adopted by the restarted daemon as that job's newest steps, which
// pushed the victim's real steps out ("two newer sealed steps are held"). The daemon named the
// file for the job it created it for, in a directory only it writes: a header that disagrees with
// its file name is discarded now, and the victim keeps its newest step.
TEST_F(BadInputTest, ASlotHeaderClaimingAnotherJobIsDiscardedNotAdopted) {
  int code;
  auto lines = RunTrainer("victim", seed_, {"--steps=2"}, &code);
  ASSERT_EQ(code, 0);
  lines = RunTrainer("evil", seed_ + 1, {"--steps=2"}, &code);
  ASSERT_EQ(code, 0);
  // Every sealed slot of "evil" (the newest at least) claims to be a newer step of "victim".
  int rewritten = 0;
  for (const auto& file : std::filesystem::directory_iterator(daemon_->store_dir())) {
    const std::string slot = file.path().string();
    if (!absl::StartsWith(file.path().filename().string(), "evil.")) continue;
    std::fstream f(slot, std::ios::in | std::ios::out | std::ios::binary);
    SegmentHeader h;
    f.read(reinterpret_cast<char*>(&h), sizeof(h));
    ASSERT_TRUE(f.good());
    if (LoadState(h) != SegmentState::kSealed) continue;
    std::memset(h.job_id, 0, sizeof(h.job_id));
    std::memcpy(h.job_id, "victim", 6);
    h.step = 1000000 + rewritten++;
    h.header_crc32c = ComputeHeaderCrc(h);
    f.seekp(0);
    f.write(reinterpret_cast<const char*>(&h), sizeof(h));
    ASSERT_TRUE(f.good());
  }
  ASSERT_GE(rewritten, 1);
  daemon_->Kill(SIGKILL);
  std::string error;
  ASSERT_TRUE(daemon_->Start(&error)) << error;
  EXPECT_TRUE(absl::StrContains(daemon_->LogTail(), "its header claims job 'victim' rank 0"))
      << daemon_->LogTail();
  lines = RunTrainer("victim", seed_, {"--mode=verify"}, &code);
  EXPECT_EQ(code, 0) << (lines.empty() ? "" : lines.back());
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.back(), "verified 2");
}

// Trainers that registered and died before sealing anything once kept their slots for as long
// as the daemon ran: 60 of them held 123 MB and the next registration was refused. Now a
// registration short of room first reclaims the empty slots of ranks whose trainer exited; the
// slots of a rank that sealed a snapshot stay (that is what a restarted trainer restores).
TEST_F(BadInputTest, SlotsOfTrainersThatDiedBeforeSealingAreReclaimed) {
  // Room for two ranks of this layout and not three (a rank takes two slots of its state's bytes
  // plus alignment and the manifest, well under 64 KiB here).
  uint64_t state_bytes = 0;
  for (const StateEntry& e : MakeState(seed_, layout_.tensors, layout_.min_bytes,
                                       layout_.max_bytes, layout_.total_bytes)) {
    state_bytes += e.spec.nbytes();
  }
  DaemonProcess small(root_.path(), "small", 5 * (state_bytes + (64 << 10)));
  std::string error;
  ASSERT_TRUE(small.Start(&error)) << error;
  auto args = [&](const std::string& job) {
    auto argv = TrainerArgs(small, job, layout_, seed_);
    argv.push_back("--when-busy=wait");
    return argv;
  };
  // One rank that seals: its slots must survive everything below.
  auto keeper_args = args("keeper");
  keeper_args.push_back("--steps=3");
  auto keeper = Process::Start(keeper_args);
  ASSERT_EQ(keeper->Wait(), 0);
  ASSERT_EQ(LastEvent(keeper->lines(), "sealed"), 3);
  // Eight trainers in turn register and are killed before their first snapshot.
  for (int i = 0; i < 8; ++i) {
    auto argv = args(absl::StrCat("dead", i));
    argv.push_back("--every=1000000");
    argv.push_back("--step-sleep-ms=50");
    auto trainer = Process::Start(argv);
    ASSERT_TRUE(trainer->ReadUntil(IsStartLine, std::chrono::seconds(30))) << "trainer " << i;
    ASSERT_EQ(trainer->lines().back(), "fresh")
        << "trainer " << i << " could not register: " << trainer->lines().back();
    trainer->Signal(SIGKILL);
    trainer->Wait();
  }
  EXPECT_TRUE(absl::StrContains(small.LogTail(200000), "reclaiming its empty slots"))
      << small.LogTail(200000);
  auto verify_args = args("keeper");
  verify_args.push_back("--mode=verify");
  auto verifier = Process::Start(verify_args);
  EXPECT_EQ(verifier->Wait(), 0);
  ASSERT_FALSE(verifier->lines().empty());
  EXPECT_EQ(verifier->lines().back(), "verified 3");
}

// FindLatestRestorable with world_size 4294967295 once ran past its caller's deadline and grew
// the daemon to 2-2.5 GB. Every world size and rank a request names is bounded now.
// A client repeating a refused request once wrote one log line per request. Refusals are counted
// by kind and logged at most 20 lines per 10 s per kind, the next line saying how many went
// unlogged.
TEST_F(BadInputTest, RepeatedRefusalsAreCountedAndTheirLoggingBounded) {
  auto stub = agent::Agent::NewStub(
      grpc::CreateChannel("unix:" + daemon_->socket_path(), grpc::InsecureChannelCredentials()));
  for (int i = 0; i < 300; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    agent::FindLatestRestorableRequest request;
    request.set_job_id("flood");
    request.set_world_size(0);
    agent::FindLatestRestorableResponse response;
    ASSERT_EQ(stub->FindLatestRestorable(&context, request, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  const std::string log = daemon_->LogTail(1 << 20);
  size_t lines = 0;
  for (size_t at = log.find("FindLatestRestorable: INVALID_ARGUMENT"); at != std::string::npos;
       at = log.find("FindLatestRestorable: INVALID_ARGUMENT", at + 1)) {
    ++lines;
  }
  EXPECT_GE(lines, 20u);
  EXPECT_LE(lines, 41u) << "one line per refusal:\n" << log.substr(0, 3000);
  EXPECT_EQ(daemon_->Poll(), -1) << "the daemon exited";
}

TEST_F(BadInputTest, AnAbsurdWorldSizeIsRefusedAtOnce) {
  auto stub = agent::Agent::NewStub(
      grpc::CreateChannel("unix:" + daemon_->socket_path(), grpc::InsecureChannelCredentials()));
  struct Case {
    uint32_t rank, world;
    const char* says;
  };
  for (const Case& c : {Case{0, 0, "world_size must be 1..1048576, got 0"},
                        Case{0, 4294967295u, "world_size must be 1..1048576, got 4294967295"},
                        Case{0, (1u << 20) + 1, "world_size must be 1..1048576"},
                        Case{5, 4, "valid ranks: 0..3"}}) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    agent::FindLatestRestorableRequest request;
    request.set_job_id("absurd");
    request.set_rank(c.rank);
    request.set_world_size(c.world);
    request.set_resume(true);
    agent::FindLatestRestorableResponse response;
    const grpc::Status s = stub->FindLatestRestorable(&context, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << "world " << c.world << ": " << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), c.says)) << s.error_message();
  }
  EXPECT_EQ(daemon_->Poll(), -1) << "the daemon exited";
}

TEST_F(BadInputTest, SharedMemoryTooSmallSaysHowMuch) {
  DaemonProcess small(root_.path(), "small", 1 << 20);
  std::string error;
  ASSERT_TRUE(small.Start(&error)) << error;
  const Layout too_big{"too-big", 4, 1 << 20, 1 << 20, 4 << 20, 0};  // 4 MiB cannot fit in 1
  auto argv = TrainerArgs(small, "big", too_big, seed_);
  auto p = Process::Start(argv);
  EXPECT_EQ(p->Wait(), 1);
  const std::string& last = p->lines().back();
  EXPECT_TRUE(absl::StrContains(last, "RESOURCE_EXHAUSTED")) << last;
  EXPECT_TRUE(absl::StrContains(last, "of 1048576 bytes of store capacity are free")) << last;
}

TEST(TesseradTest, SigtermDrainsAndExitsZeroAndBadConfigExitsTwo) {
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", 64 << 20);
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  daemon.Kill(SIGTERM);
  EXPECT_TRUE(absl::StrContains(daemon.LogTail(), "draining")) << daemon.LogTail();
  EXPECT_TRUE(absl::StrContains(daemon.LogTail(), "stopped")) << daemon.LogTail();

  auto bad = Process::Start({BinaryPath("daemon/tesserad"), "--set", "store.crc_threads=0"},
                            root.path() + "/bad.log");
  EXPECT_EQ(bad->Wait(), 2);
  std::ifstream in(root.path() + "/bad.log");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(absl::StrContains(text, "store.crc_threads")) << text;
}

// Shared memory that is not memory, or smaller than the capacity asked for, is refused at start
// with what was wrong and what to set (a 10 GiB capacity on a 300 MiB tmpfs, and a store on a
// disk, were once accepted without a word); "warn" starts anyway and says so.
TEST(TesseradTest, AStoreThatIsNotMemoryOrTooSmallIsRefusedAtStart) {
  TempRoot root;
  auto run = [&](const std::string& directory, const std::string& capacity,
                 const std::string& policy, const std::string& name, int* code) {
    auto p = Process::Start(
        {BinaryPath("daemon/tesserad"), "--set", "node.id=" + name, "--set",
         "store.directory=" + directory, "--set", "store.capacity_bytes=" + capacity, "--set",
         "agent.socket_path=" + root.path() + "/" + name + ".sock", "--set",
         "store.filesystem_check=" + policy},
        root.path() + "/" + name + ".log");
    if (policy == "warn") {  // it starts: stop it once its socket is there
      const std::string socket = root.path() + "/" + name + ".sock";
      for (int i = 0; i < 400 && !std::filesystem::exists(socket); ++i) {
        std::this_thread::sleep_for(milliseconds(50));
      }
      p->Signal(SIGTERM);
    }
    *code = p->Wait();
    std::ifstream in(root.path() + "/" + name + ".log");
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  int code = 0;
  // 1 EiB on the tmpfs the test root lives on.
  std::string log = run(root.path() + "/shm", "1024PiB", "refuse", "big", &code);
  EXPECT_EQ(code, 1) << log;
  EXPECT_TRUE(absl::StrContains(log, "store.capacity_bytes 1152921504606846976 exceeds the size "
                                     "of the filesystem"))
      << log;
  EXPECT_TRUE(absl::StrContains(log, "set at most")) << log;
  log = run(root.path() + "/shm", "1024PiB", "warn", "bigwarn", &code);
  EXPECT_EQ(code, 0) << log;
  EXPECT_TRUE(absl::StrContains(log, "started anyway")) << log;
  // A directory on a disk filesystem: the test's own temporary directory, where it is one.
  const char* tmp = std::getenv("TEST_TMPDIR");
  ASSERT_NE(tmp, nullptr);
  struct statfs fs;
  ASSERT_EQ(statfs(tmp, &fs), 0);
  if (fs.f_type == 0x01021994) {
    GTEST_SKIP() << "TEST_TMPDIR " << tmp << " is a tmpfs here: no disk filesystem to refuse";
  }
  log = run(std::string(tmp) + "/disk-store", "64MiB", "refuse", "disk", &code);
  EXPECT_EQ(code, 1) << log;
  EXPECT_TRUE(absl::StrContains(log, "is not a tmpfs or hugetlbfs")) << log;
}

// A daemon with a peer port and no cluster token once served every job's state to anyone who
// reached the port. Cluster mode now needs cluster.token (or cluster.token_file), or an explicit
// cluster.insecure = true, which the log and status then say loudly.
// Idle connections up to the daemon's file-descriptor limit once made its accept loop spin, one
// warning per turn ("Too many open files": 1.66 GB of log in 10 minutes), and trainers could not
// connect. Now the pending connection is taken with a spare descriptor and closed, the log says
// so at most every 10 s, and once the idle connections go, trainers register and seal again.
TEST(TesseradTest, IdleConnectionsUpToTheFdLimitAreShedNotSpunOn) {
  const uint64_t seed = TestSeed();
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{256} << 20);
  daemon.SetLauncher({"/usr/bin/prlimit", "--nofile=192:192", "--"});
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  std::vector<int> idle;
  for (int i = 0; i < 400; ++i) {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", daemon.socket_path().c_str());
    (void)!connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));  // EAGAIN: backlog full
    idle.push_back(fd);
    if (i % 50 == 49) std::this_thread::sleep_for(milliseconds(50));
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const std::string log = daemon.LogTail(1 << 20);
  size_t accept_lines = 0;
  for (size_t at = log.find("accept on"); at != std::string::npos; at = log.find("accept on", at + 1)) {
    ++accept_lines;
  }
  EXPECT_GE(accept_lines, 1u) << "the limit was never reached; the test proves nothing";
  EXPECT_LE(accept_lines, 2u) << "the accept loop logs every turn:\n" << log.substr(0, 2000);
  EXPECT_TRUE(absl::StrContains(log, "closed unanswered")) << log.substr(0, 2000);
  EXPECT_EQ(daemon.Poll(), -1) << "the daemon exited";
  for (int fd : idle) close(fd);
  // The daemon serves trainers again.
  auto argv = TrainerCommand(daemon, "after", seed, 0, 1);
  argv.push_back("--steps=2");
  argv.push_back("--when-busy=wait");
  std::unique_ptr<Process> trainer;
  for (int attempt = 0; attempt < 50; ++attempt) {  // gRPC closes the idle connections lazily
    trainer = Process::Start(argv);
    if (trainer->Wait() == 0) break;
    std::this_thread::sleep_for(milliseconds(200));
  }
  EXPECT_EQ(LastEvent(trainer->lines(), "sealed"), 2)
      << (trainer->lines().empty() ? "" : trainer->lines().back());
}

// One uid's idle connections stop at agent.max_connections_per_uid: the ones past it are closed
// at once (logged once per 10 s), so they cannot take the daemon's descriptors; a trainer of that
// uid connects again once its own connections are closed.
TEST(TesseradTest, OneUidsConnectionsStopAtItsCap) {
  const uint64_t seed = TestSeed();
  TempRoot root;
  DaemonProcess daemon(root.path(), "n0", uint64_t{256} << 20,
                       {"--set", "agent.max_connections_per_uid=8"});
  std::string error;
  ASSERT_TRUE(daemon.Start(&error)) << error;
  std::vector<int> idle;
  for (int i = 0; i < 20; ++i) {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", daemon.socket_path().c_str());
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << errno;
    idle.push_back(fd);
  }
  // The daemon closes the connections past the cap: reading them gives end of file. gRPC
  // answers the ones it keeps with its settings frame, so only a read of 0 bytes counts.
  std::this_thread::sleep_for(milliseconds(500));
  int closed = 0;
  for (int fd : idle) {
    pollfd p{fd, POLLIN, 0};
    char buffer[256];
    if (poll(&p, 1, 200) == 1 && recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT) == 0) ++closed;
  }
  EXPECT_EQ(closed, 12) << "of 20 connections with a cap of 8";
  const std::string log = daemon.LogTail(1 << 20);
  EXPECT_TRUE(absl::StrContains(log, "holds 8 open connections, agent.max_connections_per_uid"))
      << log.substr(0, 2000);
  size_t lines = 0;
  for (size_t at = log.find("max_connections_per_uid"); at != std::string::npos;
       at = log.find("max_connections_per_uid", at + 1)) {
    ++lines;
  }
  EXPECT_EQ(lines, 1u) << "logged once per 10 s, not per connection";
  // While they are held, this uid's trainer is turned away; once they are closed, it is served.
  auto argv = TrainerCommand(daemon, "capped", seed, 0, 1);
  argv.push_back("--steps=2");
  argv.push_back("--when-busy=wait");
  auto refused = Process::Start(argv);
  EXPECT_NE(refused->Wait(), 0) << "a trainer connected past the cap";
  for (int fd : idle) close(fd);
  std::unique_ptr<Process> trainer;
  for (int attempt = 0; attempt < 50; ++attempt) {  // gRPC notices the closed ones lazily
    trainer = Process::Start(argv);
    if (trainer->Wait() == 0) break;
    std::this_thread::sleep_for(milliseconds(200));
  }
  EXPECT_EQ(LastEvent(trainer->lines(), "sealed"), 2)
      << (trainer->lines().empty() ? "" : trainer->lines().back());
}

TEST(TesseradTest, AClusterWithoutATokenIsRefusedUnlessInsecure) {
  TempRoot root;
  const std::string address = absl::StrCat("127.0.0.1:", FreePort());
  auto bad = Process::Start({BinaryPath("daemon/tesserad"), "--set", "node.id=open", "--set",
                             "store.directory=" + root.path() + "/shm", "--set",
                             "agent.socket_path=" + root.path() + "/open.sock", "--set",
                             "peer.listen_address=" + address},
                            root.path() + "/open.log");
  EXPECT_EQ(bad->Wait(), 2);
  std::ifstream in(root.path() + "/open.log");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(absl::StrContains(text, "cluster.token and cluster.token_file are not")) << text;
  EXPECT_TRUE(absl::StrContains(text, "cluster.insecure = true")) << text;
  DaemonProcess insecure(root.path(), "n0", 64 << 20,
                         {"--set", "peer.listen_address=" + address, "--set",
                          "cluster.insecure=true"});
  std::string error;
  ASSERT_TRUE(insecure.Start(&error)) << error;
  EXPECT_TRUE(absl::StrContains(insecure.LogTail(), "INSECURE: cluster.insecure = true"))
      << insecure.LogTail();
}

}  // namespace
}  // namespace tessera::testing
