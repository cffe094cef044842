#include "daemon/coordination/protection_pipeline.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/coordination/shard_rebuild.h"
#include "daemon/metrics/metrics.h"
#include "ec/erasure_codec.h"
#include "proto/manifest.pb.h"

namespace tessera {
namespace {

constexpr int64_t kMaxBackoffMs = 5000;

}  // namespace

ClusterCoordination::ClusterCoordination(SnapshotStore* store, FragmentStore* fragments,
                                         Cluster* cluster, PeerClient* client,
                                         CoordinationClient* coordination_client, Options options)
    : Coordination(store, /*derive_commits=*/false),
      fragments_(fragments),
      cluster_(cluster),
      client_(client),
      coordination_client_(coordination_client),
      options_(options),
      journal_(options_.state_directory) {
  // Shards made local for a restore are read by the agent during that restore only: what a
  // previous run of the daemon left is stale.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(fragments_->directory(), ec)) {
    if (absl::EndsWith(entry.path().string(), kRestoredSuffix)) {
      std::filesystem::remove(entry.path(), ec);
    }
  }
  LoadJobStates();
}

void ClusterCoordination::LoadJobStates() {
  auto log = Logger("coordinator");
  const JobStateJournal::Loaded loaded = journal_.Load();
  for (const std::string& refused : loaded.refused) {
    log->error(
        "a kept job state is refused and left alone (the job's state is learned from "
        "the other members instead): {}",
        refused);
  }
  for (const JobState& state : loaded.states) {
    {
      absl::MutexLock lock(&mu_);
      known_[state.job_id] = state;
    }
    log->info("job '{}': kept state read back (epoch {}, committed step {}{})", state.job_id,
              state.epoch, state.committed.step,
              state.dropped_epoch > 0 ? absl::StrCat(", dropped at epoch ", state.dropped_epoch)
                                      : std::string());
    // New snapshots are sealed in the newest epoch this daemon knew, not the newest its slot
    // headers name (a resume it learned before it restarted may have sealed nothing here yet).
    store_->RaiseEpoch(state.job_id, state.epoch);
    if (state.dropped_epoch == 0) continue;
    // The previous run kept the drop before acting on it: what it re-adopted of the dropped run
    // goes now, slots and fragments of the epochs up to the drop's. Fragments of no known epoch
    // (from a sender that predates the field) may be of a later run it never heard of: they
    // stay, void for every restore point the drop voids.
    const SnapshotStore::DropJobResult slots = store_->ApplyDrop(state.job_id, state.dropped_epoch);
    uint64_t fragment_bytes = 0;
    const size_t fragments = fragments_->DropJob(state.job_id, state.dropped_epoch,
                                                 /*unknown_too=*/false, &fragment_bytes);
    if (slots.segments_deleted > 0 || fragments > 0) {
      log->warn(
          "job '{}' was dropped at epoch {}: deleted {} re-adopted slots ({} bytes) and {} "
          "fragments ({} bytes)",
          state.job_id, state.dropped_epoch, slots.segments_deleted, slots.bytes_deleted, fragments,
          fragment_bytes);
    }
  }
}

void ClusterCoordination::SaveJobState(const std::string& job_id) {
  absl::MutexLock writing(&journal_mu_);
  std::optional<JobState> state;
  {
    absl::MutexLock lock(&mu_);
    auto known = known_.find(job_id);
    if (known != known_.end()) state = known->second;
  }
  absl::Status saved = absl::OkStatus();
  if (state) {
    saved = journal_.Save(*state);
  } else {
    journal_.Remove(job_id);
  }
  absl::MutexLock lock(&mu_);
  if (saved.ok()) {
    stats_.job_states_kept += state.has_value();
    return;
  }
  ++stats_.job_state_failures;
  Logger("coordinator")
      ->error("job '{}': its state (epoch, commit, drop) could not be kept for a restart: {}",
              job_id, saved.ToString());
}

ClusterCoordination::~ClusterCoordination() { Stop(); }

void ClusterCoordination::Start() {
  if (worker_.joinable()) return;
  {
    // After a restart, what was sealed may never have been protected (the queue died with the
    // previous run): protect it again. Peers replace fragments of an older incarnation.
    absl::MutexLock lock(&mu_);
    for (const auto& v : store_->ListVersions("")) {
      if (v.state == SegmentState::kSealed) queue_.push_back(Work{v.job_id, v.rank, v.step, 0, 0});
    }
  }
  worker_ = std::thread([this] { Run(); });
  reporter_ = std::thread([this] { ReportLoop(); });
  pusher_ = std::thread([this] { PushLoop(); });
}

void ClusterCoordination::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (worker_.joinable()) worker_.join();
  if (reporter_.joinable()) reporter_.join();
  if (pusher_.joinable()) pusher_.join();
}


void ClusterCoordination::OnSealed(const std::string& job_id, uint32_t rank, int64_t step,
                                   const SnapshotStore::SealResult& /*sealed*/) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(Work{job_id, rank, step, 0, 0});
}

void ClusterCoordination::InParallel(size_t count, size_t at_once,
                                     const std::function<void(size_t)>& task) {
  std::vector<std::thread> threads;
  for (size_t i = 0; i < count; ++i) {
    threads.emplace_back([&task, i] { task(i); });
    if (threads.size() >= std::max<size_t>(1, at_once) || i + 1 == count) {
      for (std::thread& t : threads) t.join();
      threads.clear();
    }
  }
}

void ClusterCoordination::Run() {
  auto log = Logger("protection");
  while (true) {
    std::optional<Work> work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (stopping_) return true;
        const int64_t now = NowUnixMs();
        for (const Work& w : queue_) {
          if (w.not_before_ms <= now) return true;
        }
        return false;
      };
      // Sleeps until the earliest retry is due; new work wakes it (the condition is evaluated
      // whenever mu_ is released), so an idle daemon does not poll.
      int64_t wait_ms = 60 * 1000;
      const int64_t before = NowUnixMs();
      for (const Work& w : queue_) wait_ms = std::min(wait_ms, w.not_before_ms - before);
      mu_.AwaitWithTimeout(absl::Condition(&ready),
                           absl::Milliseconds(std::max<int64_t>(1, wait_ms)));
      if (stopping_) return;
      const int64_t now = NowUnixMs();
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->not_before_ms <= now) {
          work = *it;
          queue_.erase(it);
          break;
        }
      }
    }
    if (work && !work->repair && !store_->CommitKnown(work->job_id)) {
      // A restarted daemon protects what it re-adopted only once it has learned the job's state
      // (docs/PROTOCOL.md, Dropping a job, 6): a drop it missed voids those slots, and their
      // fragments, sent to members that took the drop, would stay there until the next run's
      // commits. The state query is the reporter's (ReportJob): this waits for it, no longer.
      if (!work->deferred) {
        log->info(
            "job '{}' rank {} step {}: re-adopted; protected once this daemon has learned "
            "the job's state from its coordinator",
            work->job_id, work->rank, work->step);
      }
      Work later = *work;
      later.deferred = true;
      later.not_before_ms = NowUnixMs() + options_.retry_backoff_ms;
      absl::MutexLock lock(&mu_);
      stats_.protections_deferred += work->deferred ? 0 : 1;
      queue_.push_back(later);
      continue;
    }
    if (work) {
      absl::Status status = Protect(*work);
      if (!status.ok()) {
        Work retry = *work;
        ++retry.attempts;
        const int64_t backoff = std::min<int64_t>(
            kMaxBackoffMs, options_.retry_backoff_ms << std::min(retry.attempts - 1, 8));
        retry.not_before_ms = NowUnixMs() + backoff;
        log->warn("job '{}' rank {} step {}: protection attempt {} failed, retrying in {} ms: {}",
                  work->job_id, work->rank, work->step, retry.attempts, backoff,
                  status.ToString());
        absl::MutexLock lock(&mu_);
        ++stats_.protection_failures;
        queue_.push_back(retry);
      }
    }
  }
}

absl::Status ClusterCoordination::Protect(const Work& work) {
  auto log = Logger("protection");
  const absl::Time started = absl::Now();
  if (!work.repair) {
    // A step that can never commit (a rank skipped it) or that a commit has passed is not
    // protected: its holders drop such fragments, and its slot is free for the next step.
    absl::MutexLock lock(&mu_);
    auto known = known_.find(work.job_id);
    if (known != known_.end()) {
      const JobState& k = known->second;
      const bool passed = !k.committed.empty() && k.committed.step >= work.step;
      const bool dead = std::find(k.dead_steps.begin(), k.dead_steps.end(), work.step) !=
                        k.dead_steps.end();
      if (passed || dead) {
        log->debug("job '{}' rank {} step {}: not protected, {}", work.job_id, work.rank,
                   work.step, dead ? "it can never commit (a rank skipped it)"
                                   : "a commit has passed it");
        return absl::OkStatus();
      }
    }
  }
  auto pinned = store_->Pin(work.job_id, work.rank, work.step);
  if (!pinned.ok()) {
    // A sealed slot is only reused once its step is protected, committed past, dead or void
    // (docs/PROTOCOL.md), so nothing is lost here.
    log->info("job '{}' rank {} step {} is no longer sealed here: nothing to protect ({})",
              work.job_id, work.rank, work.step, pinned.status().ToString());
    return absl::OkStatus();
  }
  struct Unpinner {
    SnapshotStore* store;
    const Work& work;
    ~Unpinner() { store->Unpin(work.job_id, work.rank, work.step); }
  } unpin{store_, work};
  if (const uint64_t dropped = store_->dropped_epoch(work.job_id);
      dropped > 0 && pinned->epoch <= dropped) {
    log->info("job '{}' rank {} step {}: not protected, the job was dropped since (epoch {})",
              work.job_id, work.rank, work.step, dropped);
    return absl::OkStatus();
  }

  TESSERA_ASSIGN_OR_RETURN(FragmentPlacement placement,
                           PlaceFragments(cluster_->LiveNodeIds(), cluster_->self_id(),
                                          work.rank, options_.k, options_.m));
  if (placement.nodes.empty()) {
    if (!cluster_->Peers().empty()) {
      // Members are configured but none is live (yet: a restarted daemon protects what it
      // re-adopted before it has heard its peers): retry, or the step is never committed.
      return absl::UnavailableError(
          absl::StrCat("no live member can hold fragments yet (", placement.reason, ")"));
    }
    log->warn("job '{}' rank {} step {}: {}", work.job_id, work.rank, work.step,
              placement.reason);
    Protected(work, *pinned, {});
    return absl::OkStatus();
  }
  if (work.repair && (placement.degraded || placement.nodes.empty())) {
    // A repair re-creates fragments in the shard's own code. With too few live members for it,
    // re-encoding in a smaller one would replace the surviving fragments (same keys, other
    // metadata) and lose what they still protect: the repair waits for members instead.
    log->warn("job '{}' rank {} step {}: not repaired yet: {} (the surviving fragments are kept)",
              work.job_id, work.rank, work.step,
              placement.reason.empty() ? std::string("no live member") : placement.reason);
    return absl::OkStatus();
  }
  if (placement.degraded && options_.degraded_settle) {
    const absl::Duration settle = options_.degraded_settle();
    absl::Duration steady;
    {
      absl::MutexLock lock(&mu_);
      steady = absl::Now() - members_changed_;
    }
    if (steady < settle) {
      return absl::UnavailableError(absl::StrCat(
          placement.reason, ", but the live members changed ", absl::ToInt64Milliseconds(steady),
          " ms ago: a smaller code waits until they have been steady for ",
          absl::ToInt64Milliseconds(settle), " ms"));
    }
  }
  if (placement.degraded) {
    log->info("job '{}' rank {} step {}: RS({}, {}) instead of RS({}, {}): {}", work.job_id,
              work.rank, work.step, placement.k, placement.m, options_.k, options_.m,
              placement.reason);
  }
  TESSERA_ASSIGN_OR_RETURN(ErasureCodec codec, ErasureCodec::Create(placement.k, placement.m));
  const uint64_t shard_bytes = pinned->payload_bytes;
  // The slot is shared memory, written after its seal by a bit flip or by the trainer: fragments
  // encoded from damaged bytes would carry the sealed CRC and pass every fragment check, and a
  // rebuild from them would fail for good (seed 6000711: a repair re-encoded a flipped slot of a
  // committed step, and the restore of that rank failed its CRC32C three times). Check first.
  const uint32_t payload_crc =
      ParallelCrc32c(pinned->payload, shard_bytes, EncodeThreads());
  if (payload_crc != pinned->payload_crc32c) {
    Metrics().slot_crc_failures->Increment();
    log->error("job '{}' rank {} step {}: the sealed slot is damaged (payload CRC32C {:#010x}, "
               "sealed {:#010x}): not {} from it{}",
               work.job_id, work.rank, work.step, payload_crc, pinned->payload_crc32c,
               work.repair ? "repaired" : "protected",
               work.repair ? "; the fragments already held still protect the step" : "");
    return absl::OkStatus();  // retrying would read the same bytes
  }
  const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, placement.k);
  // Data fragments that lie wholly inside the payload are sent from it in place; the others
  // (the padded last one, if any) are copied into scratch, which also takes the parity.
  std::vector<const uint8_t*> data(placement.k);
  std::vector<int> copied;
  for (int i = 0; i < placement.k; ++i) {
    if ((i + 1) * fragment_bytes <= shard_bytes) {
      data[i] = pinned->payload + i * fragment_bytes;
    } else {
      copied.push_back(i);
    }
  }
  uint8_t* const scratch = Scratch((copied.size() + placement.m) * fragment_bytes);
  for (size_t c = 0; c < copied.size(); ++c) {
    const uint64_t begin = copied[c] * fragment_bytes;
    uint8_t* dst = scratch + c * fragment_bytes;
    const uint64_t present = begin < shard_bytes ? std::min<uint64_t>(fragment_bytes, shard_bytes - begin) : 0;
    if (present > 0) std::memcpy(dst, pinned->payload + begin, present);
    std::memset(dst + present, 0, fragment_bytes - present);
    data[copied[c]] = dst;
  }
  std::vector<uint8_t*> parity(placement.m);
  for (int j = 0; j < placement.m; ++j) {
    parity[j] = scratch + (copied.size() + j) * fragment_bytes;
  }

  FragmentMeta meta;
  meta.owner_incarnation = cluster_->incarnation();
  meta.ec_k = static_cast<uint32_t>(placement.k);
  meta.ec_m = static_cast<uint32_t>(placement.m);
  meta.fragment_bytes = fragment_bytes;
  meta.shard_bytes = shard_bytes;
  meta.shard_crc32c = pinned->payload_crc32c;
  meta.epoch = pinned->epoch;
  const int total = placement.k + placement.m;
  // A member of the placement that is live but cannot be reached from here (a cut link between
  // two nodes keeps both live: the others answer probes for them) would hold the step back for as
  // long as the link is down. Its fragment goes to a spare instead, the next member outside the
  // placement: the report names the members that hold the fragments, and restores find them by
  // listing (docs/PROTOCOL.md, Actors: Placement). Members that failed lately are passed over at
  // once.
  absl::Mutex spares_mu;
  std::deque<std::string> spares(placement.spares.begin(), placement.spares.end());
  auto take_spare = [&]() -> std::optional<std::string> {
    absl::MutexLock lock(&spares_mu);
    while (!spares.empty()) {
      std::string spare = std::move(spares.front());
      spares.pop_front();
      if (!Unreachable(spare)) return spare;
    }
    return std::nullopt;
  };
  for (int i = 0; i < total; ++i) {
    if (!Unreachable(placement.nodes[i])) continue;
    if (std::optional<std::string> spare = take_spare()) {
      // Counted; logged when the member was found unreachable (below), once per kUnreachableFor.
      log->debug("job '{}' rank {} step {} fragment {}: to {}, {} was not reachable lately",
                 work.job_id, work.rank, work.step, i, *spare, placement.nodes[i]);
      Metrics().fragments_rerouted->Increment();
      placement.nodes[i] = *spare;
    }
  }
  std::vector<absl::Status> results(total);
  std::vector<std::thread> senders;
  auto send = [&](int i) {
    FragmentKey key{work.job_id, work.rank, work.step, static_cast<uint32_t>(i)};
    const uint8_t* bytes = i < placement.k ? data[i] : parity[i - placement.k];
    while (true) {
      const std::string node = placement.nodes[i];  // this thread's own element
      auto address = cluster_->AddressOf(node);
      if (address) {
        results[i] =
            client_->PutFragment(PeerTarget(*address, node), key, meta, bytes, fragment_bytes)
                .status();
      } else {
        results[i] = absl::UnavailableError(absl::StrCat("member ", node, " is not live"));
      }
      if (results[i].ok()) {
        MarkReachable(node);
        return;
      }
      results[i] = absl::Status(results[i].code(), absl::StrCat("fragment ", i, " to ", node,
                                                                ": ", results[i].message()));
      if (!absl::IsUnavailable(results[i]) && !absl::IsDeadlineExceeded(results[i])) return;
      if (address) MarkUnreachable(node);
      std::optional<std::string> spare = take_spare();
      if (!spare) return;
      log->warn("job '{}' rank {} step {}: {}; sending the fragment to {} instead", work.job_id,
                work.rank, work.step, std::string(results[i].message()), *spare);
      Metrics().fragments_rerouted->Increment();
      placement.nodes[i] = *spare;
    }
  };
  // The data fragments go at once; the parity is encoded on several threads meanwhile (it takes
  // a fraction of the transfer time) and each parity fragment goes as soon as it is complete.
  for (int i = 0; i < placement.k; ++i) senders.emplace_back(send, i);
  absl::Status encoded =
      placement.m > 0 ? codec.EncodeOnThreads(data.data(), parity.data(), fragment_bytes,
                                              EncodeThreads())
                      : absl::OkStatus();
  if (encoded.ok()) {
    for (int i = placement.k; i < total; ++i) senders.emplace_back(send, i);
  } else {
    for (int i = placement.k; i < total; ++i) results[i] = encoded;
  }
  for (std::thread& t : senders) t.join();
  std::vector<std::string> failed;
  for (const absl::Status& s : results) {
    if (!s.ok()) failed.push_back(s.ToString());
  }
  if (!failed.empty()) return absl::UnavailableError(absl::StrJoin(failed, "; "));
  const absl::Duration took = absl::Now() - started;
  log->info("job '{}' rank {} step {}: protected ({} bytes) in {} ms, RS({}, {}) on {}; {} ms "
            "after it was sealed",
            work.job_id, work.rank, work.step, shard_bytes, absl::ToInt64Milliseconds(took),
            placement.k, placement.m, absl::StrJoin(placement.nodes, ","),
            std::max<int64_t>(0, NowUnixMs() - pinned->sealed_unix_ms));
  Metrics().protection_seconds->Observe(
      static_cast<double>(std::max<int64_t>(0, NowUnixMs() - pinned->sealed_unix_ms)) / 1000.0);
  Protected(work, *pinned, placement.nodes);
  return absl::OkStatus();
}

bool ClusterCoordination::Unreachable(const std::string& node) {
  absl::MutexLock lock(&mu_);
  auto it = unreachable_until_.find(node);
  if (it == unreachable_until_.end()) return false;
  if (absl::Now() < it->second) return true;
  unreachable_until_.erase(it);  // tried first again
  return false;
}

void ClusterCoordination::MarkUnreachable(const std::string& node) {
  absl::MutexLock lock(&mu_);
  unreachable_until_[node] = absl::Now() + kUnreachableFor;
}

void ClusterCoordination::MarkReachable(const std::string& node) {
  absl::MutexLock lock(&mu_);
  unreachable_until_.erase(node);
}

void ClusterCoordination::Protected(const Work& work, const SnapshotStore::PinnedShard& shard,
                                    std::vector<std::string> holders) {
  store_->MarkProtected(work.job_id, work.rank, work.step);
  ProtectedReport report;
  report.job_id = work.job_id;
  report.world_size = shard.world_size;
  report.epoch = shard.epoch;
  report.rank = work.rank;
  report.step = work.step;
  report.previous_step = shard.previous_step;
  report.shard_crc32c = shard.payload_crc32c;
  report.shard_bytes = shard.payload_bytes;
  report.owner = cluster_->self_id();
  report.holders = holders;
  absl::MutexLock lock(&mu_);
  ++stats_.protected_shards;
  if (work.repair) ++stats_.repairs;
  placements_[{work.job_id, work.rank, work.step}] = std::move(holders);
  pending_[work.job_id][{work.rank, work.step}] = std::move(report);
  report_now_ = true;
}

uint8_t* ClusterCoordination::Scratch(size_t bytes) {
  if (bytes > scratch_bytes_) {
    scratch_.reset();  // the old buffer goes before the new one is faulted in
    scratch_.reset(new uint8_t[bytes]);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

int ClusterCoordination::EncodeThreads() {
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
}


NodeIdentity ClusterCoordination::Self() const {
  return NodeIdentity{cluster_->self_id(), cluster_->incarnation()};
}

absl::StatusOr<std::pair<std::string, std::string>> ClusterCoordination::CoordinatorOf(
    const std::string& job_id) {
  const std::string node = CoordinatorFor(job_id, cluster_->LiveNodeIds());
  auto address = cluster_->AddressOf(node);
  if (!address) {
    return absl::UnavailableError(absl::StrCat("the coordinator of job '", job_id, "', ", node,
                                               ", has no known address"));
  }
  return std::make_pair(node, *address);
}

void ClusterCoordination::MembershipChanged() {
  absl::MutexLock lock(&mu_);
  report_now_ = true;
  members_changed_ = absl::Now();
  // Coordination may have moved: a coordinator gathers each job's view again before it acts
  // (the reporter does the same each round; this closes the window until its next round).
  view_complete_.clear();
}

void ClusterCoordination::ReportLoop() {
  while (true) {
    // With no report to send, no snapshot held and no fragment placed, there is nothing to do
    // each round: an idle daemon sleeps ten rounds unless a protection, a membership change
    // (MembershipChanged) or Stop wakes it.
    const bool holds_snapshots = !store_->ListVersions("").empty();
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || report_now_; };
      bool idle = !holds_snapshots && placements_.empty();
      for (const auto& [job, reports] : pending_) idle = idle && reports.empty();
      mu_.AwaitWithTimeout(absl::Condition(&ready),
                           absl::Milliseconds(options_.report_interval_ms * (idle ? 10 : 1)));
      if (stopping_) return;
      report_now_ = false;
    }
    RepairAfterLosses();
    std::set<std::string> jobs;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& [job, reports] : pending_) {
        if (!reports.empty()) jobs.insert(job);
      }
    }
    for (const auto& v : store_->ListVersions("")) {
      if (!store_->CommitKnown(v.job_id)) jobs.insert(v.job_id);
    }
    for (const std::string& job : jobs) ReportJob(job);
  }
}

void ClusterCoordination::ReportJob(const std::string& job_id) {
  auto log = Logger("coordinator");
  std::vector<ProtectedReport> reports;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, report] : pending_[job_id]) reports.push_back(report);
  }
  if (reports.empty()) {
    // A restarted daemon asks for the job's state before reusing any slot it re-adopted.
    ProtectedReport query;
    query.job_id = job_id;
    query.step = -1;
    query.owner = cluster_->self_id();
    for (const auto& v : store_->ListVersions(job_id)) {
      query.world_size = std::max(query.world_size, v.world_size);
      query.epoch = std::max(query.epoch, v.epoch);
    }
    if (query.world_size == 0) return;
    reports.push_back(query);
  }
  auto coordinator = CoordinatorOf(job_id);
  for (const ProtectedReport& report : reports) {
    absl::StatusOr<JobState> state =
        !coordinator.ok() ? absl::StatusOr<JobState>(coordinator.status())
        : coordinator->first == cluster_->self_id()
            ? OnReport(Self(), report)
            : coordination_client_->Report(PeerTarget(coordinator->second, coordinator->first),
                                           report);
    {
      absl::MutexLock lock(&mu_);
      ++stats_.reports_sent;
      if (!state.ok()) ++stats_.report_failures;
    }
    if (!state.ok()) {
      log->warn("job '{}' rank {} step {}: report to the coordinator {} failed, retrying in {} ms: "
                "{}",
                job_id, report.rank, report.step,
                coordinator.ok() ? coordinator->first : std::string("(none)"),
                options_.report_interval_ms, state.status().ToString());
      return;
    }
    ApplyJobState(*state);
  }
}

void ClusterCoordination::LogSuperseded(const std::string& job_id, const CommitRecord& held,
                                        const CommitRecord& newer) {
  Logger("coordinator")
      ->warn("job '{}': commit of step {} (epoch {}) superseded by the restore point step {} "
             "(epoch {}) that epoch {} resumed from: the commit was not known to the majority "
             "that decided the restore (it was made on the far side of a partition), so its "
             "step is abandoned",
             job_id, held.step, held.epoch, newer.step, newer.epoch, newer.confirmed_epoch);
}

void ClusterCoordination::LearnCommit(const std::string& job_id, const CommitRecord& record,
                                      uint64_t epoch, uint64_t dropped_epoch) {
  if (std::optional<CommitRecord> held =
          coordinator_.Learn(job_id, record, epoch, dropped_epoch)) {
    LogSuperseded(job_id, *held, record);
  }
}

NodeDrop ClusterCoordination::ApplyJobState(const JobState& state) {
  auto log = Logger("coordinator");
  NodeDrop deleted;
  deleted.node_id = cluster_->self_id();
  std::vector<int64_t> dead;
  bool newer_commit = false;
  bool drop_news = false;     // a drop this node learns now
  bool drop_fragments = false;
  bool forget_drop = false;   // a later run committed: the drop's tombstone is collected
  std::optional<CommitRecord> superseded;
  CommitRecord committed_record;
  // The commit this node holds once `state` is taken: the newer of `state`'s and the one held
  // (CommitRecord::NewerThan). The store and the fragments follow it, never `state`'s alone: a
  // coordinator that was cut off as it committed pushes its commit again once it is back, and
  // that commit may be older than the point the majority resumed from since (campaign seed
  // 17300003: taking it released the restore point's slots and fragments here).
  CommitRecord held;
  const uint64_t store_epoch = store_->epoch(state.job_id);
  bool keep = false;  // what a restart must know changed (JobStateJournal)
  std::vector<std::string> forgotten;
  {
    absl::MutexLock lock(&mu_);
    JobState& known = known_[state.job_id];
    // What a restart must know of the job as it was (the commit by its order, not its ranks).
    const auto kept_part = [](const JobState& j) {
      return std::make_tuple(j.epoch, j.dropped_epoch, j.committed.confirmed_epoch,
                             j.committed.epoch, j.committed.step);
    };
    const auto before = kept_part(known);
    known.job_id = state.job_id;
    if (state.dropped_epoch > known.dropped_epoch &&
        (known.committed.empty() || DroppedBy(known.committed, state.dropped_epoch))) {
      drop_news = true;
      // Fragments of an epoch up to the drop's are deleted, a later run's are kept. Those of no
      // known epoch (from a sender that predates the field) are deleted only when none can be of
      // a later run: the state is the drop's own (no run has started since) and this node has
      // seen no later epoch. Otherwise they are void and go with the later run's commits.
      drop_fragments = state.epoch == state.dropped_epoch &&
                       std::max(known.epoch, store_epoch) <= state.dropped_epoch;
      known.dropped_epoch = state.dropped_epoch;
      known.committed = CommitRecord();
      if (state.dropped_epoch > known.epoch) {
        known.epoch = state.dropped_epoch;
        known.dead_steps.clear();
      }
      for (auto it = placements_.begin(); it != placements_.end();) {
        it = std::get<0>(it->first) == state.job_id ? placements_.erase(it) : std::next(it);
      }
      restore_points_.erase(state.job_id);
      told_.erase(state.job_id);
      BoundTombstones(state.job_id, &forgotten);
    }
    // A commit of the dropped history is no restore point anywhere.
    committed_record = DroppedBy(state.committed, known.dropped_epoch) ? CommitRecord()
                                                                        : state.committed;
    for (int64_t step : state.dead_steps) {
      if (step > committed_record.step) dead.push_back(step);
    }
    if (committed_record.NewerThan(known.committed)) {
      if (known.committed.SupersededBy(committed_record)) {
        superseded = known.committed;
      } else {
        newer_commit = true;
        ++stats_.commits_learned;
      }
      known.committed = committed_record;
    }
    if (known.dropped_epoch > 0 && !known.committed.empty() &&
        known.committed.epoch > known.dropped_epoch) {
      known.dropped_epoch = 0;
      forget_drop = true;
    }
    held = known.committed;
    if (state.epoch > known.epoch) {
      known.epoch = state.epoch;
      known.dead_steps.clear();
    }
    // Dead steps are of state.epoch: of an older epoch they name steps of another history.
    if (state.epoch != known.epoch) dead.clear();
    if (state.epoch == known.epoch) {
      // Remembered so that protection skips them (bounded: the newest 256).
      known.dead_steps.insert(known.dead_steps.end(), dead.begin(), dead.end());
      std::sort(known.dead_steps.begin(), known.dead_steps.end());
      known.dead_steps.erase(std::unique(known.dead_steps.begin(), known.dead_steps.end()),
                             known.dead_steps.end());
      if (known.dead_steps.size() > 256) {
        known.dead_steps.erase(known.dead_steps.begin(), known.dead_steps.end() - 256);
      }
    }
    // Reports that need no re-sending: committed past, of an older epoch or a dropped one, or
    // dead.
    auto& reports = pending_[state.job_id];
    for (auto it = reports.begin(); it != reports.end();) {
      const ProtectedReport& r = it->second;
      const bool done = r.epoch < known.epoch ||
                        (known.dropped_epoch > 0 && r.epoch <= known.dropped_epoch) ||
                        (r.epoch == known.committed.epoch && r.step <= known.committed.step) ||
                        std::find(dead.begin(), dead.end(), r.step) != dead.end();
      it = done ? reports.erase(it) : std::next(it);
    }
    if (reports.empty()) pending_.erase(state.job_id);
    keep = kept_part(known) != before;
  }
  // Kept before it is acted on: a restart after this remembers it.
  if (keep) SaveJobState(state.job_id);
  for (const std::string& job : forgotten) SaveJobState(job);
  if (drop_news) {
    const SnapshotStore::DropJobResult slots = store_->ApplyDrop(state.job_id, state.dropped_epoch);
    deleted.ranks = slots.ranks;
    deleted.slots_deleted = slots.segments_deleted;
    deleted.slot_bytes_deleted = slots.bytes_deleted;
    deleted.newest_sealed_step = slots.newest_sealed_step;
    deleted.running_ranks = slots.running_ranks;
    deleted.running_pids.assign(slots.running_pids.begin(), slots.running_pids.end());
    deleted.fragments_deleted = static_cast<uint32_t>(fragments_->DropJob(
        state.job_id, state.dropped_epoch, drop_fragments, &deleted.fragment_bytes_deleted));
    const size_t kept = fragments_->List(state.job_id).size();
    DeleteRestoredOlderThan(state.job_id, std::numeric_limits<int64_t>::max());
    {
      absl::MutexLock lock(&mu_);
      if (known_.count(state.job_id) > 0) drop_results_[state.job_id] = {state.dropped_epoch, deleted};
    }
    log->warn(
        "job '{}' dropped at epoch {}: deleted {} slots ({} bytes) and {} fragments ({} "
        "bytes) here{}",
        state.job_id, state.dropped_epoch, deleted.slots_deleted, deleted.slot_bytes_deleted,
        deleted.fragments_deleted, deleted.fragment_bytes_deleted,
        kept == 0 ? std::string()
                  : absl::StrCat("; ", kept,
                                 " fragments of a later epoch (or of none known, while a "
                                 "later epoch is known here) are kept"));
  }
  if (forget_drop) {
    {
      absl::MutexLock lock(&mu_);
      drop_results_.erase(state.job_id);
    }
    store_->ForgetDrop(state.job_id);
    log->info("job '{}': a run after its drop committed step {} (epoch {}); the drop is no "
              "longer kept",
              state.job_id, committed_record.step, committed_record.epoch);
  }
  const int64_t committed = held.step;
  if (superseded) {
    LogSuperseded(state.job_id, *superseded, committed_record);
    store_->SupersedeCommit(state.job_id, committed);
  }
  store_->SetJobState(state.job_id, state.epoch, committed, dead);
  size_t dropped = 0;
  if (committed >= 0) {
    for (const CommitRecord::Rank& r : held.ranks) {
      dropped += fragments_->DropOlderThan(state.job_id, r.rank, committed);
    }
    DeleteRestoredOlderThan(state.job_id, committed);
  }
  if (!dead.empty()) {
    for (const FragmentStatus& f : fragments_->List(state.job_id)) {
      if (std::find(dead.begin(), dead.end(), f.key.step) == dead.end()) continue;
      // The dead steps are the state's epoch's: a later run's fragment of the same step stays.
      if (f.meta.epoch > state.epoch) continue;
      if (fragments_->DropFragment(f.key).ok()) ++dropped;
    }
  }
  if (dropped > 0) {
    absl::MutexLock lock(&mu_);
    stats_.fragments_dropped += dropped;
  }
  if (newer_commit) {
    log->info("job '{}' committed step {} (epoch {}, {} ranks protected){}", state.job_id,
              committed, committed_record.epoch, committed_record.ranks.size(),
              dropped > 0 ? absl::StrCat("; dropped ", dropped, " older fragments") : "");
  }
  return deleted;
}

void ClusterCoordination::BoundTombstones(const std::string& keep,
                                          std::vector<std::string>* forgotten) {
  size_t held = 0;
  for (const auto& [job, state] : known_) held += state.dropped_epoch > 0;
  while (held > options_.max_tombstones) {
    auto oldest = known_.end();
    for (auto it = known_.begin(); it != known_.end(); ++it) {
      if (it->first == keep || it->second.dropped_epoch == 0) continue;
      if (oldest == known_.end() || it->second.dropped_epoch < oldest->second.dropped_epoch) {
        oldest = it;
      }
    }
    if (oldest == known_.end()) return;
    Logger("coordinator")
        ->warn("forgetting the drop of job '{}' (epoch {}): more than {} dropped jobs are "
               "remembered; a member that held its snapshots "
               "while it was away could make it resumable again",
               oldest->first, oldest->second.dropped_epoch, options_.max_tombstones);
    store_->ForgetDrop(oldest->first);
    coordinator_.Forget(oldest->first);
    drop_results_.erase(oldest->first);
    forgotten->push_back(oldest->first);
    known_.erase(oldest);
    --held;
  }
}

void ClusterCoordination::PushTo(const std::vector<std::string>& nodes, const JobState& state) {
  bool self = false;
  {
    absl::MutexLock lock(&mu_);
    for (const std::string& node : nodes) {
      if (node == cluster_->self_id()) {
        self = true;
      } else {
        pushes_.emplace_back(node, state);
      }
    }
  }
  if (self) ApplyJobState(state);
}

void ClusterCoordination::PushLoop() {
  auto log = Logger("coordinator");
  while (true) {
    std::vector<std::pair<std::string, JobState>> batch;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !pushes_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      // At most 8 at a time: a commit goes to the job's nodes, never to the whole cluster.
      while (!pushes_.empty() && batch.size() < 8) {
        batch.push_back(std::move(pushes_.front()));
        pushes_.pop_front();
      }
    }
    std::vector<absl::Status> results(batch.size());
    InParallel(batch.size(), batch.size(), [&](size_t i) {
      auto address = cluster_->AddressOf(batch[i].first);
      results[i] = address ? coordination_client_->Push(PeerTarget(*address, batch[i].first),
                                                        batch[i].second)
                           : absl::UnavailableError("not live");
    });
    for (size_t i = 0; i < batch.size(); ++i) {
      if (results[i].ok()) continue;
      // The node learns the state from its next report's reply instead.
      log->info("job '{}': telling {} of its state failed: {}", batch[i].second.job_id,
                batch[i].first, results[i].ToString());
      absl::MutexLock lock(&mu_);
      ++stats_.pushes_failed;
    }
  }
}

void ClusterCoordination::RepairAfterLosses() {
  const std::vector<std::string> live_now = cluster_->LiveNodeIds();
  std::set<std::string> live(live_now.begin(), live_now.end());
  std::set<std::string> lost;
  for (const std::string& node : live_last_round_) {
    if (live.count(node) == 0) lost.insert(node);
  }
  std::vector<std::string> returned;
  for (const std::string& node : live) {
    if (live_last_round_.count(node) == 0 && !live_last_round_.empty()) returned.push_back(node);
  }
  if (!returned.empty()) {
    // A member that comes back (it was stopped, cut off or restarted) may hold what a drop it
    // missed voided: the coordinator of each dropped job tells it (docs/PROTOCOL.md, Dropping a
    // job). It would learn it anyway before any decision resumes the job; this frees its memory.
    for (const JobState& dropped : coordinator_.Dropped()) {
      auto coordinator = CoordinatorOf(dropped.job_id);
      if (coordinator.ok() && coordinator->first == cluster_->self_id()) {
        PushTo(returned, dropped);
      }
    }
  }
  if (live != live_last_round_) {
    // Coordination may have moved: a coordinator gathers each job's view again before acting.
    absl::MutexLock lock(&mu_);
    view_complete_.clear();
  }
  live_last_round_ = live;
  if (lost.empty()) return;
  std::vector<Work> repairs;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = placements_.begin(); it != placements_.end();) {
      const auto& [job, rank, step] = it->first;
      auto known = known_.find(job);
      const bool committed_here =
          known != known_.end() && known->second.committed.step == step;
      bool touched = false;
      for (const std::string& node : it->second) touched = touched || lost.count(node) > 0;
      if (touched && committed_here) {
        Work w{job, rank, step, 0, 0, /*repair=*/true};
        repairs.push_back(w);
        queue_.push_back(w);
      }
      // Placements of steps no longer sealed here are forgotten.
      const bool newer_commit = known != known_.end() && known->second.committed.step > step;
      it = newer_commit ? placements_.erase(it) : std::next(it);
    }
  }
  for (const Work& w : repairs) {
    Logger("protection")->warn("job '{}' rank {} step {}: a holder of its fragments was lost ({}); "
                               "protecting the committed step again on the live members",
                               w.job_id, w.rank, w.step, absl::StrJoin(lost, ","));
  }
}

absl::Status ClusterCoordination::EnsureCoordinatorView(const std::string& job_id,
                                                        uint64_t reported_epoch) {
  auto complete = [&] {
    absl::MutexLock lock(&mu_);
    return view_complete_.count(job_id) > 0;
  };
  if (complete()) return absl::OkStatus();  // every report but the first: no gathering lock
  absl::MutexLock gathering(&view_mu_);  // one gathering at a time; later askers find it done
  if (complete()) return absl::OkStatus();
  // Every live member: a coordinator that just started or took over knows nothing of who holds
  // the job, and a node that knows a newer epoch or commit may hold none of its shards.
  absl::StatusOr<std::vector<JobListing>> listings =
      ListNodes(job_id, {}, /*require_complete=*/true);
  if (!listings.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "the coordinator of job '", job_id, "' is gathering the job's state from the live "
        "members and cannot act on reports yet: ", listings.status().message()));
  }
  for (const JobListing& l : *listings) {
    LearnCommit(job_id, l.committed, l.epoch, l.dropped_epoch);
  }
  Logger("coordinator")->info("job '{}': coordinating, after learning its state from {} live "
                              "members (epoch {}, reported epoch {})",
                              job_id, listings->size(), coordinator_.State(job_id).epoch,
                              reported_epoch);
  absl::MutexLock lock(&mu_);
  view_complete_.insert(job_id);
  return absl::OkStatus();
}

absl::StatusOr<JobState> ClusterCoordination::OnReport(const NodeIdentity& from,
                                                       const ProtectedReport& report) {
  TESSERA_RETURN_IF_ERROR(EnsureCoordinatorView(report.job_id, report.epoch));
  if (report.step < 0) {
    // A restarted owner asks for the job's state: it sealed in report.epoch, so that epoch was
    // handed out.
    coordinator_.Learn(report.job_id, CommitRecord(), report.epoch);
    return coordinator_.State(report.job_id);
  }
  ProtectedReport checked = report;
  checked.owner = from.node_id;
  JobCoordinator::Outcome outcome = coordinator_.Report(checked);
  if (outcome.committed_now) {
    absl::MutexLock lock(&mu_);
    ++stats_.commits;
  }
  if (!outcome.push_to.empty()) {
    if (!outcome.committed_now) {
      absl::MutexLock lock(&mu_);
      stats_.dead_steps += outcome.state.dead_steps.size();
    }
    PushTo(outcome.push_to, outcome.state);
  }
  return outcome.state;
}

absl::Status ClusterCoordination::OnPush(const NodeIdentity& /*from*/, const JobState& state) {
  ApplyJobState(state);
  return absl::OkStatus();
}

ClusterCoordination::Stats ClusterCoordination::stats() const {
  Stats out;
  {
    absl::MutexLock lock(&mu_);
    out = stats_;
  }
  out.jobs_coordinated = coordinator_.jobs();
  return out;
}

}  // namespace tessera
