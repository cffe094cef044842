// A stand-in trainer for multi-process tests and the demo. Registers seeded state with the local
// tesserad, restores the newest restorable step if there is one (checking every byte), then
// "trains": each step fences, moves the state to the next step, and snapshots every --every steps.
// It prints one line per event, flushed, for the harness to read.
//
// The state depends on its history (tests/trainer_state.h): each launch folds in --launch, an
// identifier the test driver picks, and the step it started from. After a restore the trainer
// replays the history recorded in the restored bytes and checks every byte against it; a driver
// that journals the digests each launch printed can then check that the restored bytes belong to
// the history the job resumed.
//
// With --barrier=DIR the ranks of the job advance in lockstep, as those of a synchronous job do:
// none starts step s + 1 before every rank has completed step s (StepBarrier).
//
// With --dp-members=R0,R1,... the rank is a member of that data-parallel group: its seeded state
// (--seed, the same on every member) is replicated across the group and snapshotted DP-sharded,
// and it also holds two tensors and a blob of its own, seeded by --seed and its rank, which are
// not. A restore checks both, so a slice gathered from the wrong member or step is caught.
//
// Events:
//   connect_retry STATUS | restore_retry STATUS (the daemon asked to retry) | restore_ms T |
//   restored S DIGEST (the restored bytes, before they are checked) | history HISTORY (they
//   matched it) | resumed S | fresh |
//   digest S DIGEST (the state about to be snapshotted at step S) | snapshot S (printed before
//   the call) | skipped S | sealed S | verified S | done | error: ...
// DIGEST is 16 hex digits (DigestState over every registered entry); HISTORY is
// "launch@step,..." of the launches the restored state went through (the newest 128).
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "agent/client.h"
#include "common/logging.h"
#include "tests/trainer_state.h"

namespace {

struct Flags {
  std::string socket, job = "trainer-job", mode = "train", when_busy = "skip", dp_members;
  std::string barrier;  // a directory: ranks advance in lockstep (StepBarrier)
  uint64_t seed = 1, rank = 0, world = 1, tensors = 8, min_bytes = 1, max_bytes = 1 << 20;
  uint64_t total_bytes = 64 << 20, steps = 0, every = 1, step_sleep_ms = 0, dp_timeout_ms = 60000;
  uint64_t launch = 0;
  // How long a connection or a restore that the daemon answers kUnavailable is retried.
  uint64_t restore_retry_ms = 0;
};

bool Parse(int argc, char** argv, Flags* f) {
  std::map<std::string, uint64_t*> numbers = {
      {"seed", &f->seed},           {"rank", &f->rank},         {"world", &f->world},
      {"tensors", &f->tensors},     {"min-bytes", &f->min_bytes}, {"max-bytes", &f->max_bytes},
      {"total-bytes", &f->total_bytes}, {"steps", &f->steps},   {"every", &f->every},
      {"step-sleep-ms", &f->step_sleep_ms}, {"dp-timeout-ms", &f->dp_timeout_ms},
      {"launch", &f->launch},       {"restore-retry-ms", &f->restore_retry_ms}};
  std::map<std::string, std::string*> strings = {
      {"socket", &f->socket}, {"job", &f->job}, {"mode", &f->mode}, {"when-busy", &f->when_busy},
      {"dp-members", &f->dp_members}, {"barrier", &f->barrier}};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "trainer: bad argument '%s' (expected --key=value)\n", argv[i]);
      return false;
    }
    std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
    if (numbers.count(key)) {
      if (!absl::SimpleAtoi(value, numbers[key])) {
        std::fprintf(stderr, "trainer: --%s needs a number, got '%s'\n", key.c_str(), value.c_str());
        return false;
      }
    } else if (strings.count(key)) {
      *strings[key] = value;
    } else {
      std::fprintf(stderr, "trainer: unknown flag --%s\n", key.c_str());
      return false;
    }
  }
  if (f->socket.empty() || (f->mode != "train" && f->mode != "verify") || f->every == 0) {
    std::fprintf(stderr, "trainer: need --socket, --mode=train|verify and --every>0\n");
    return false;
  }
  return true;
}

void Say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

int Fail(const std::string& what, const absl::Status& status) {
  Say("error: " + what + ": " + status.ToString());
  return 1;
}

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

uint64_t Mix(uint64_t a, uint64_t b) { return a * 0x9E3779B97F4A7C15ull + b * 1000003 + 1; }

// Ranks that advance in lockstep, as those of a synchronous job do (a collective every step):
// each publishes the step it completed in <dir>/rank<R>, and none starts step s + 1 before every
// rank has published s or later. A rank without a file is not running: the others wait for it.
class StepBarrier {
 public:
  StepBarrier(std::string dir, uint64_t rank, uint64_t world)
      : dir_(std::move(dir)), rank_(rank), world_(world) {}

  void Publish(int64_t step) const {
    const std::string path = dir_ + "/rank" + std::to_string(rank_);
    const std::string tmp = path + ".tmp";
    if (FILE* f = std::fopen(tmp.c_str(), "w")) {
      std::fprintf(f, "%" PRId64 "\n", step);
      std::fclose(f);
      std::rename(tmp.c_str(), path.c_str());
    }
  }

  // Returns once every rank has completed `step`.
  void Wait(int64_t step) const {
    for (uint64_t r = 0; r < world_; ++r) {
      while (Completed(r) < step) std::this_thread::sleep_for(std::chrono::milliseconds(3));
    }
  }

 private:
  int64_t Completed(uint64_t rank) const {
    const std::string path = dir_ + "/rank" + std::to_string(rank);
    int64_t step = -1;
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      if (std::fscanf(f, "%" SCNd64, &step) != 1) step = -1;
      std::fclose(f);
    }
    return step;
  }

  const std::string dir_;
  const uint64_t rank_, world_;
};

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  if (!Parse(argc, argv, &f)) return 2;
  tessera::SetLogLevel("warn").IgnoreError();
  tessera::Client::Options options;
  options.socket_path = f.socket;
  options.use_gpu = false;
  options.dp_restore_timeout_ms = static_cast<int64_t>(f.dp_timeout_ms);
  options.when_busy = f.when_busy == "wait" ? tessera::Client::BusyPolicy::kWait
                                            : tessera::Client::BusyPolicy::kSkip;
  // A daemon that does not answer yet (starting, or too busy for the handshake) is retried, as
  // a launcher would, for as long as a restore would be.
  const auto connect_start = std::chrono::steady_clock::now();
  auto client = tessera::Client::Connect(options);
  while (absl::IsUnavailable(client.status()) &&
         std::chrono::steady_clock::now() - connect_start <
             std::chrono::milliseconds(f.restore_retry_ms)) {
    Say("connect_retry " + client.status().ToString());
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    client = tessera::Client::Connect(options);
  }
  if (!client.ok()) return Fail("connect", client.status());

  // The replicated state (all of it without a DP group), and under DP the rank's own. Without a
  // DP group the history is the rank's own; under DP the replicated one is the group's.
  std::vector<uint32_t> members;
  for (absl::string_view m : absl::StrSplit(f.dp_members, ',', absl::SkipEmpty())) {
    uint32_t rank = 0;
    if (!absl::SimpleAtoi(m, &rank)) return Fail("--dp-members", absl::InvalidArgumentError(f.dp_members));
    members.push_back(rank);
  }
  using tessera::testing::HistoryState;
  const uint64_t own_seed = f.seed * 1000003 + f.rank + 1;
  HistoryState state(f.seed, members.empty() ? Mix(f.seed, f.rank) : f.seed,
                     static_cast<int>(f.tensors), f.min_bytes, f.max_bytes, f.total_bytes);
  std::optional<HistoryState> own;
  if (!members.empty()) {
    own.emplace(own_seed, own_seed, 2, 1000, 100000, 200000);
    for (auto& e : own->entries()) e.spec.set_name("own." + e.spec.name());
  }
  std::vector<HistoryState*> states = {&state};
  if (own) states.push_back(&*own);
  tessera::testing::Scramble(&state.entries(), f.seed * 7 + 3);
  if (own) tessera::testing::Scramble(&own->entries(), f.seed * 11 + f.rank);
  std::vector<tessera::Client::Entry> entries;
  for (HistoryState* s : states) {
    auto more = tessera::testing::ClientEntries(&s->entries());
    entries.insert(entries.end(), more.begin(), more.end());
  }
  if (!members.empty()) {
    tessera::Client::DataParallel dp;
    dp.members = members;
    for (const auto& e : state.entries()) {
      dp.replicated.push_back(e.spec.kind() == tessera::ENTRY_KIND_TENSOR);
    }
    dp.replicated.resize(entries.size(), false);
    absl::Status set = (*client)->SetDataParallel(dp);
    if (!set.ok()) return Fail("set data parallel", set);
  }
  absl::Status registered = (*client)->Register(f.job, static_cast<uint32_t>(f.rank),
                                                static_cast<uint32_t>(f.world), entries);
  if (!registered.ok()) return Fail("register", registered);
  // Points the client at every entry's valid length (blobs change theirs), or reads them back.
  auto push_lengths = [&](bool blobs_only) {
    size_t index = 0;
    for (HistoryState* s : states) {
      for (auto& e : s->entries()) {
        if (!blobs_only || e.spec.kind() == tessera::ENTRY_KIND_BLOB) {
          (*client)->UpdateEntry(index, e.bytes.data(), e.length).IgnoreError();
        }
        ++index;
      }
    }
  };
  auto pull_lengths = [&] {
    size_t index = 0;
    for (HistoryState* s : states) {
      for (auto& e : s->entries()) e.length = (*client)->entries()[index++].length;
    }
  };
  auto digest = [&] {
    uint64_t d = 0;
    for (HistoryState* s : states) d = tessera::testing::DigestState(s->entries(), d);
    return Hex(d);
  };

  int64_t step = 0;
  const auto restore_start = std::chrono::steady_clock::now();
  auto restored = (*client)->Restore(-1);
  while (absl::IsUnavailable(restored.status()) &&
         std::chrono::steady_clock::now() - restore_start <
             std::chrono::milliseconds(f.restore_retry_ms)) {
    Say("restore_retry " + restored.status().ToString());
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    restored = (*client)->Restore(-1);
  }
  if (restored.ok()) {
    Say("restore_ms " + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                           std::chrono::steady_clock::now() - restore_start)
                                           .count()));
    pull_lengths();
    Say("restored " + std::to_string(*restored) + " " + digest());
    std::string diff;
    for (HistoryState* s : states) {
      if (diff.empty()) diff = s->AdoptRestored(*restored);
    }
    if (!diff.empty()) {
      Say("error: MISMATCH after restoring step " + std::to_string(*restored) + ": " + diff);
      return 3;
    }
    step = *restored;
    if (!members.empty()) {
      const auto stats = (*client)->stats();
      Say("gathered " + std::to_string(stats.bytes_gathered) +
          (stats.gathered_with_nccl ? " nccl" : " daemon"));
    }
    Say("history " + state.DescribeLaunches());
    Say("resumed " + std::to_string(step));
  } else if (absl::IsNotFound(restored.status())) {
    for (HistoryState* s : states) s->Reset();
    push_lengths(/*blobs_only=*/false);
    Say("fresh");
  } else {
    return Fail("restore", restored.status());
  }
  if (f.mode == "verify") {
    Say("verified " + std::to_string(step));
    return 0;
  }
  for (HistoryState* s : states) s->StartLaunch(f.launch);
  std::optional<StepBarrier> barrier;
  if (!f.barrier.empty()) {
    barrier.emplace(f.barrier, f.rank, f.world);
    barrier->Publish(step);
  }

  int64_t announced_sealed = -1;
  for (uint64_t n = 0; f.steps == 0 || n < f.steps; ++n) {
    if (barrier) barrier->Wait(step);
    // The optimizer step: the registered memory must not change while a snapshot copies it.
    absl::Status fenced = (*client)->Fence();
    if (!fenced.ok()) return Fail("fence", fenced);
    for (HistoryState* s : states) s->Advance();
    ++step;
    push_lengths(/*blobs_only=*/true);
    if (step % static_cast<int64_t>(f.every) == 0) {
      Say("digest " + std::to_string(step) + " " + digest());
      Say("snapshot " + std::to_string(step));  // before the call: bounds what can be sealed
      auto outcome = (*client)->Snapshot(step);
      if (!outcome.ok()) return Fail("snapshot", outcome.status());
      if (*outcome == tessera::Client::SnapshotOutcome::kSkipped) {
        Say("skipped " + std::to_string(step));
      }
    }
    if (barrier) barrier->Publish(step);
    int64_t sealed = (*client)->stats().last_sealed_step;
    if (sealed > announced_sealed) {
      announced_sealed = sealed;
      Say("sealed " + std::to_string(sealed));
    }
    if (f.step_sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(f.step_sleep_ms));
  }
  absl::Status last = (*client)->Wait();
  if (!last.ok() && !absl::IsUnavailable(last)) return Fail("last snapshot", last);
  Say("sealed " + std::to_string((*client)->stats().last_sealed_step));
  Say("done");
  return 0;
}
