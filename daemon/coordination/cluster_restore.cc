#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/coordination/protection_pipeline.h"
#include "daemon/coordination/shard_rebuild.h"
#include "daemon/metrics/metrics.h"
#include "ec/erasure_codec.h"
#include "proto/manifest.pb.h"

// ClusterCoordination's restore side (docs/PROTOCOL.md, Restore): resolving the restore point at
// the job's coordinator from a complete view of the job's nodes, listing what is held here, and
// making a shard local.
namespace tessera {
namespace {

// Writes a fetched shard into a segment's payload.
class SegmentSink final : public ShardSink {
 public:
  explicit SegmentSink(Segment* segment) : segment_(segment) {}
  absl::Status Begin(const ShardInfo& info) override {
    if (info.payload_bytes > segment_->capacity_bytes()) {
      return absl::FailedPreconditionError(absl::StrCat("shard of ", info.payload_bytes,
                                                        " bytes does not fit the ",
                                                        segment_->capacity_bytes(),
                                                        " bytes prepared for it"));
    }
    info_ = info;
    return absl::OkStatus();
  }
  absl::Status Write(uint64_t offset, const uint8_t* data, size_t size) override {
    if (offset + size > segment_->capacity_bytes()) {
      return absl::DataLossError("fetched bytes past the end of the shard");
    }
    std::memcpy(segment_->payload() + offset, data, size);
    return absl::OkStatus();
  }
  const ShardInfo& info() const { return info_; }

 private:
  Segment* const segment_;
  ShardInfo info_;
};

// Finds the manifest of a shard payload: the agent writes it at the first 4 KiB boundary at or
// after the data (SlotLayout), and it records data_bytes, so a candidate is only accepted when
// it parses, names (job, rank, step) and says the data ends just before it.
absl::StatusOr<std::pair<uint64_t, uint64_t>> LocateManifest(const uint8_t* payload,
                                                             uint64_t payload_bytes,
                                                             const std::string& job_id,
                                                             uint32_t rank, int64_t step) {
  constexpr uint64_t kAlign = 4096;
  for (uint64_t offset = (payload_bytes / kAlign) * kAlign;; offset -= kAlign) {
    if (offset < payload_bytes) {
      ShardManifest manifest;
      const uint64_t bytes = payload_bytes - offset;
      if (manifest.ParseFromArray(payload + offset, static_cast<int>(bytes)) &&
          manifest.job_id() == job_id && manifest.rank() == rank && manifest.step() == step &&
          (manifest.data_bytes() + kAlign - 1) / kAlign * kAlign == offset) {
        return std::make_pair(offset, bytes);
      }
    }
    if (offset == 0) break;
  }
  return absl::DataLossError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                          ": the rebuilt shard holds no readable manifest"));
}

}  // namespace

absl::StatusOr<int64_t> ClusterCoordination::FindLatestRestorable(
    const std::string& job_id, uint32_t world_size_hint, std::optional<uint32_t> resuming_rank,
    uint64_t run_id) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  ResolveQuestion question;
  question.job_id = job_id;
  question.world_size = world_size_hint;
  question.rank = resuming_rank.value_or(0);
  question.resume = resuming_rank.has_value();
  question.run_id = run_id;
  for (const auto& r : store_->ListRanks(job_id)) {
    question.world_size = std::max(question.world_size, r.world_size);
  }
  {
    absl::MutexLock lock(&mu_);
    auto known = known_.find(job_id);
    if (known != known_.end()) question.known = known->second.committed;
  }
  // This daemon may coordinate the job without holding any of it (an operator's query).
  const CommitRecord coordinated = coordinator_.State(job_id).committed;
  if (coordinated.NewerThan(question.known)) question.known = coordinated;
  if (question.world_size == 0) question.world_size = question.known.ranks.size();
  if (question.world_size == 0) {
    return absl::NotFoundError(absl::StrCat("job '", job_id, "' is not registered on this node "
                                            "and no commit of it is known here"));
  }
  if (question.rank >= question.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", question.rank, " is outside the job's "
                                                   "world of ", question.world_size));
  }
  TESSERA_ASSIGN_OR_RETURN(auto coordinator, CoordinatorOf(job_id));
  absl::StatusOr<ResolveAnswer> answer =
      coordinator.first == cluster_->self_id()
          ? ResolveAsCoordinator(question)
          : coordination_client_->Resolve(PeerTarget(coordinator.second, coordinator.first),
                                          question);
  if (!answer.ok()) {
    // A coordinator that did not answer in time (cut off before membership suspects it, or
    // stopped) decided nothing: the caller asks again, and by then the answer may come from
    // another coordinator. Only what the coordinator itself answered is passed on as it is.
    const absl::StatusCode code = absl::IsDeadlineExceeded(answer.status())
                                      ? absl::StatusCode::kUnavailable
                                      : answer.status().code();
    return absl::Status(code,
                        absl::StrCat("job '", job_id, "': the coordinator ", coordinator.first,
                                     " could not resolve the restore point: ",
                                     answer.status().message()));
  }
  JobState state;
  state.job_id = job_id;
  state.epoch = answer->epoch;
  state.committed = answer->restore_point;
  state.dropped_epoch = answer->dropped_epoch;
  ApplyJobState(state);
  // A new run of a dropped job: what this rank sealed of the dropped history is released.
  if (resuming_rank && answer->dropped_epoch > 0) store_->ReleaseDroppedSlots(job_id, *resuming_rank);
  if (answer->restore_point.empty()) {
    return absl::NotFoundError(absl::StrCat("job '", job_id, "' has no committed step on any "
                                            "live node"));
  }
  const int64_t step = answer->restore_point.step;
  {
    absl::MutexLock lock(&mu_);
    restore_points_[job_id] = answer->restore_point;
  }
  if (resuming_rank) store_->RollbackRank(job_id, *resuming_rank, step);
  Logger("coordinator")->info("job '{}'{}: restore point step {} (epoch {}), new snapshots in "
                              "epoch {}",
                              job_id,
                              resuming_rank ? absl::StrCat(" rank ", *resuming_rank, " resumes")
                                            : std::string(),
                              step, answer->restore_point.epoch, answer->epoch);
  return step;
}

absl::StatusOr<ResolveAnswer> ClusterCoordination::OnResolve(const NodeIdentity& /*from*/,
                                                             const ResolveQuestion& question) {
  return ResolveAsCoordinator(question);
}

absl::StatusOr<ResolveAnswer> ClusterCoordination::ResolveAsCoordinator(
    const ResolveQuestion& question) {
  absl::StatusOr<ResolveAnswer> answer = DecideRestorePoint(question);
  if (absl::IsUnavailable(answer.status())) {
    Metrics().restore_deferred->Increment();
    // The trainers ask again every 250 ms: one line per 10 s says why they wait.
    const int64_t now = NowUnixMs();
    bool log = false;
    {
      absl::MutexLock lock(&mu_);
      if (now - deferred_logged_ms_ >= 10000) {
        deferred_logged_ms_ = now;
        log = true;
      }
    }
    if (log) {
      Logger("coordinator")->warn("job '{}' rank {}: restore point not decided yet: {}",
                                  question.job_id, question.rank,
                                  std::string(answer.status().message()));
    }
  }
  return answer;
}

absl::Status ClusterCoordination::RequireMajority() const {
  // A daemon that has not yet heard every configured member decides nothing: a start-up view
  // may lack the very nodes that hold the job (the caller retries kUnavailable).
  if (!cluster_->Converged()) {
    return absl::UnavailableError(
        "this daemon's membership has not converged yet (not every configured member has "
        "answered or timed out); ask again shortly");
  }
  const Cluster::Quorum quorum = cluster_->CountQuorum();
  if (quorum.majority()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "only ", quorum.live, " of ", quorum.members, " members are live here, not a majority: "
      "this daemon may be cut off from the others, whose restore point could differ. Ask "
      "again once they are back; members gone for good must be declared lost "
      "(`tessera declare-lost NODE` on a live member)"));
}

absl::Status ClusterCoordination::RefuseWhileDropping(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  if (dropping_.count(job_id) == 0) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("job '", job_id,
                   "' is being dropped (this daemon, its coordinator, is deciding the drop): "
                   "ask again once the drop has been decided"));
}

absl::StatusOr<ResolveAnswer> ClusterCoordination::DecideRestorePoint(
    const ResolveQuestion& question) {
  const std::string& job_id = question.job_id;
  // A restore point is a decision for good: taken on both sides of a partition, the two sides
  // would resume different histories. Only a coordinator that sees a majority of the members
  // live takes it; the side cut off waits until it is joined again.
  TESSERA_RETURN_IF_ERROR(RequireMajority());
  TESSERA_RETURN_IF_ERROR(RefuseWhileDropping(job_id));
  // A coordinator that took over (or whose membership changed) first learns the job's epoch,
  // commit and drop from every live member: a job dropped while the nodes that hold it were away
  // must not be resumed from what they bring back (docs/PROTOCOL.md, Dropping a job).
  TESSERA_RETURN_IF_ERROR(EnsureCoordinatorView(job_id, 0));
  if (!question.known.empty()) LearnCommit(job_id, question.known, question.known.epoch);
  std::vector<std::string> nodes = coordinator_.Nodes(job_id);
  // With no record of the job, every live member is asked once (a coordinator that took over
  // after a loss); otherwise only the job's nodes, and those their records name.
  std::vector<JobListing> listings;
  std::set<std::string> asked;
  std::set<std::string> not_live;  // nodes of the job not asked because they are not live
  for (int round = 0; round < 4; ++round) {
    std::vector<std::string> ask;
    if (round == 0 && nodes.empty()) {
      ask = cluster_->LiveNodeIds();
    } else {
      for (const std::string& n : nodes) {
        if (asked.count(n) == 0) ask.push_back(n);
      }
    }
    if (ask.empty()) break;
    asked.insert(ask.begin(), ask.end());
    TESSERA_ASSIGN_OR_RETURN(std::vector<JobListing> more,
                             ListNodes(job_id, ask, /*require_complete=*/true, &not_live));
    for (JobListing& l : more) {
      LearnCommit(job_id, l.committed, l.epoch, l.dropped_epoch);
      listings.push_back(std::move(l));
    }
    nodes = coordinator_.Nodes(job_id);
  }
  // The majority may have been lost while the listings were gathered (seed 1001), and a drop
  // may have begun.
  TESSERA_RETURN_IF_ERROR(RequireMajority());
  TESSERA_RETURN_IF_ERROR(RefuseWhileDropping(job_id));
  // Nodes of the job that are not live but not declared lost may come back with what they
  // hold (a partition heals, a stopped daemon resumes): nothing found is no reason to give up.
  std::vector<std::string> away;
  for (const std::string& n : not_live) {
    if (!cluster_->IsDeclaredLost(n)) away.push_back(n);
  }
  auto wait_for_away = [&](const std::string& what) {
    return absl::UnavailableError(absl::StrCat(
        what, ", and nodes of the job are not live: ", absl::StrJoin(away, ", "),
        ". Waiting for them (what they hold may make the job restorable); nodes gone for good "
        "must be declared lost (`tessera declare-lost NODE`)"));
  };
  const JobState state = coordinator_.State(job_id);
  const CommitRecord& point = state.committed;
  // Whether the current epoch may hold a shard of the resuming rank: one listed as sealed in it,
  // a fragment of the rank past the restore point (fragments do not record their epoch), or a
  // node of the job that is not live.
  bool may_hold = !not_live.empty();
  for (const JobListing& l : listings) {
    for (const HeldShard& s : l.shards) {
      may_hold = may_hold || (s.rank == question.rank && s.epoch >= state.epoch);
    }
    for (const HeldFragment& f : l.fragments) {
      may_hold = may_hold || (f.rank == question.rank && f.step > point.step);
    }
  }
  auto resume = [&] {
    return coordinator_.Resume(job_id, question.rank, question.run_id, may_hold, NowUnixMs());
  };
  ResolveAnswer answer;
  answer.restore_point = point;
  answer.dropped_epoch = state.dropped_epoch;
  if (point.empty()) {
    if (!away.empty()) return wait_for_away("no commit of the job is known on its live nodes");
    answer.epoch = question.resume ? resume() : state.epoch;
    // Nothing committed: the caller starts fresh.
    TESSERA_RETURN_IF_ERROR(TellJobNodes(job_id, asked, answer.epoch, point));
    return answer;
  }
  if (point.ranks.size() != question.world_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the committed step ", point.step, " has ", point.ranks.size(),
        " ranks, but the job registers a world of ", question.world_size,
        " (a job restarted at another world size needs a new job id, or the DCP reader)"));
  }
  JobHoldings holdings;
  for (const JobListing& l : listings) {
    for (const HeldShard& s : l.shards) {
      const CommitRecord::Rank* r = point.Find(s.rank);
      if (s.step == point.step && r && s.payload_crc32c == r->shard_crc32c) {
        holdings.shards.push_back(s);
      }
    }
    for (const HeldFragment& f : l.fragments) {
      const CommitRecord::Rank* r = point.Find(f.rank);
      if (f.step == point.step && r && f.shard_crc32c == r->shard_crc32c) {
        holdings.fragments.push_back(f);
      }
    }
  }
  std::vector<std::string> missing;
  for (const CommitRecord::Rank& r : point.ranks) {
    auto plan = PlanRestore(holdings, "", r.rank, point.step);
    if (!plan.ok()) missing.push_back(std::string(plan.status().message()));
  }
  if (!missing.empty()) {
    if (!away.empty()) {
      return wait_for_away(absl::StrCat("the committed step ", point.step,
                                        " cannot be restored on every rank from the live nodes"));
    }
    // NOT_FOUND, as when nothing is held: the job cannot resume from memory (the agent's
    // contract: start fresh, or from the persistent tier), and the message names what is lost.
    return absl::NotFoundError(absl::StrCat("the committed step ", point.step, " (epoch ",
                                            point.epoch, ") cannot be restored on every rank: ",
                                            absl::StrJoin(missing, "; ")));
  }
  answer.epoch = question.resume ? resume() : state.epoch;
  if (question.resume) {
    // The rank resumes from this step in answer.epoch: that history now contains it, and a commit
    // of an older epoch that no node of this view knew (its coordinator was cut off as it
    // committed) no longer outranks it anywhere (docs/PROTOCOL.md, Restore 3).
    answer.restore_point.confirmed_epoch =
        std::max(answer.restore_point.confirmed_epoch, answer.epoch);
    LearnCommit(job_id, answer.restore_point, answer.epoch);
  }
  TESSERA_RETURN_IF_ERROR(TellJobNodes(job_id, asked, answer.epoch, answer.restore_point));
  return answer;
}

absl::Status ClusterCoordination::TellJobNodes(const std::string& job_id,
                                               const std::set<std::string>& nodes, uint64_t epoch,
                                               const CommitRecord& point) {
  {
    absl::MutexLock lock(&mu_);
    auto told = told_.find(job_id);
    if (told != told_.end() && told->second == std::make_pair(epoch, point.step)) {
      return absl::OkStatus();  // every node of the job has this state already
    }
  }
  JobState state = coordinator_.State(job_id);
  state.epoch = std::max(state.epoch, epoch);
  if (point.NewerThan(state.committed)) state.committed = point;
  std::vector<std::pair<std::string, std::string>> targets;  // (node, address)
  for (const std::string& node : nodes) {
    if (node == cluster_->self_id()) {
      ApplyJobState(state);
    } else if (auto address = cluster_->AddressOf(node)) {
      targets.emplace_back(node, *address);
    }  // a node that is not live learns the state when it comes back
  }
  std::vector<absl::Status> results(targets.size());
  InParallel(targets.size(), kMaxConcurrentCalls, [&](size_t i) {
    results[i] = coordination_client_->Push(PeerTarget(targets[i].second, targets[i].first), state);
  });
  std::vector<std::string> failed;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (!results[i].ok()) failed.push_back(targets[i].first);
  }
  if (!failed.empty()) {
    return absl::UnavailableError(absl::StrCat(
        "job '", job_id, "': nodes ", absl::StrJoin(failed, ", "),
        " did not take the job's new state; a restore is answered once every live node of the "
        "job knows it"));
  }
  absl::MutexLock lock(&mu_);
  told_[job_id] = {epoch, point.step};
  return absl::OkStatus();
}

absl::StatusOr<std::vector<JobListing>> ClusterCoordination::ListNodes(
    const std::string& job_id, std::vector<std::string> nodes, bool require_complete,
    std::set<std::string>* not_live) {
  if (nodes.empty()) nodes = cluster_->LiveNodeIds();
  std::vector<absl::StatusOr<JobListing>> results(nodes.size(),
                                                  absl::UnavailableError("not asked"));
  std::vector<bool> lost(nodes.size(), false);
  std::vector<std::pair<size_t, std::string>> remote;  // (index in nodes, address)
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i] == cluster_->self_id()) {
      results[i] = LocalListing(job_id);
    } else if (auto address = cluster_->AddressOf(nodes[i])) {
      remote.emplace_back(i, *address);
    } else {
      lost[i] = true;  // not live: its holdings count as lost
    }
  }
  InParallel(remote.size(), kMaxConcurrentCalls, [&](size_t j) {
    results[remote[j].first] =
        coordination_client_->ListJob(PeerTarget(remote[j].second, nodes[remote[j].first]), job_id);
  });
  // A connection to a daemon that just started (a replacement) can fail its first handshakes:
  // a node that did not answer is asked again, up to 3 times, 300 ms apart.
  for (int retry = 0; retry < 3; ++retry) {
    bool again = false;
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (lost[i] || results[i].ok()) continue;
      auto address = cluster_->AddressOf(nodes[i]);
      if (!address) {
        lost[i] = true;  // suspected since: its holdings count as lost
        continue;
      }
      if (!again) absl::SleepFor(absl::Milliseconds(300));
      again = true;
      results[i] = coordination_client_->ListJob(PeerTarget(*address, nodes[i]), job_id);
    }
    if (!again) break;
  }
  std::vector<JobListing> out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (lost[i] && not_live != nullptr) not_live->insert(nodes[i]);
    if (lost[i]) continue;
    if (!results[i].ok() && !require_complete) {
      Logger("recovery")->warn("job '{}': node {} did not answer its listing ({}); planning "
                               "without it",
                               job_id, nodes[i], results[i].status().ToString());
      continue;
    }
    if (!results[i].ok()) {
      // A live node that does not answer may hold what decides the answer: never decide from a
      // partial view.
      return absl::UnavailableError(absl::StrCat("node ", nodes[i], " of job '", job_id,
                                                 "' did not answer (", results[i].status().message(),
                                                 "); retry"));
    }
    out.push_back(std::move(*results[i]));
  }
  return out;
}

absl::StatusOr<JobListing> ClusterCoordination::OnListJob(const NodeIdentity& /*from*/,
                                                          const std::string& job_id) {
  return LocalListing(job_id);
}

JobListing ClusterCoordination::LocalListing(const std::string& job_id) const {
  JobListing listing;
  listing.node = Self();
  for (const auto& v : store_->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed) continue;
    listing.shards.push_back({listing.node.node_id, v.rank, v.step, v.world_size, v.payload_bytes,
                              v.payload_crc32c, v.epoch});
  }
  for (const FragmentStatus& f : fragments_->List(job_id)) {
    if (f.state != SegmentState::kSealed) continue;
    listing.fragments.push_back({listing.node.node_id, f.key.rank, f.key.step, 0,
                                 f.key.fragment_index, f.meta.ec_k, f.meta.ec_m,
                                 f.meta.shard_bytes, f.meta.shard_crc32c});
  }
  absl::MutexLock lock(&mu_);
  auto known = known_.find(job_id);
  if (known != known_.end()) {
    listing.committed = known->second.committed;
    listing.epoch = known->second.epoch;
    listing.dropped_epoch = known->second.dropped_epoch;
  }
  listing.epoch = std::max(listing.epoch, store_->epoch(job_id));
  listing.dropped_epoch = std::max(listing.dropped_epoch, store_->dropped_epoch(job_id));
  return listing;
}

absl::StatusOr<SnapshotStore::RestoreInfo> ClusterCoordination::PrepareRestore(
    const std::string& job_id, uint32_t rank, int64_t step, bool verify) {
  std::optional<uint32_t> expected;
  {
    absl::MutexLock lock(&mu_);
    auto point = restore_points_.find(job_id);
    if (point != restore_points_.end() && point->second.step == step) {
      if (const CommitRecord::Rank* r = point->second.Find(rank)) expected = r->shard_crc32c;
    }
  }
  auto local = store_->PrepareRestore(job_id, rank, step, verify);
  // A local shard that fails its CRC32C is damaged memory, and one whose CRC32C is not the
  // committed one is another history's: restore as if it were not here.
  const bool damaged = absl::IsDataLoss(local.status()) && step >= 0;
  const bool other_history = local.ok() && expected && local->payload_crc32c != *expected;
  if (!damaged && !other_history &&
      (local.ok() || local.status().code() != absl::StatusCode::kNotFound || step < 0)) {
    return local;
  }
  if (damaged || other_history) {
    Logger("recovery")->warn("job '{}' rank {} step {}: the local shard is {}; restoring it from "
                             "the other nodes instead",
                             job_id, rank, step,
                             damaged ? absl::StrCat("damaged (", local.status().ToString(), ")")
                                     : "of another history than the committed one");
  }
  absl::MutexLock lock(&restore_mu_);
  auto it = restored_.find({job_id, rank, step});
  if (it != restored_.end() && (!expected || it->second.second.payload_crc32c == *expected)) {
    return it->second.second;
  }
  auto made = MakeLocal(job_id, rank, step, expected, /*skip_local_shard=*/damaged || other_history);
  if (!made.ok()) Metrics().restore_failures->Increment();
  return made;
}

void ClusterCoordination::DeleteRestoredOlderThan(const std::string& job_id, int64_t step) {
  // A restore of an older step is over: its trainer has resumed and moved past it. (Skipped
  // while a restore runs, so a commit never waits for one; the next commit cleans up.)
  if (!restore_mu_.TryLock()) return;
  for (auto r = restored_.begin(); r != restored_.end();) {
    if (std::get<0>(r->first) == job_id && std::get<2>(r->first) < step) {
      r->second.first->Unlink().IgnoreError();
      fragments_->budget()->Release(r->second.first->file_bytes());
      r = restored_.erase(r);
    } else {
      ++r;
    }
  }
  restore_mu_.Unlock();
}

absl::StatusOr<SnapshotStore::RestoreInfo> ClusterCoordination::MakeLocal(
    const std::string& job_id, uint32_t rank, int64_t step, std::optional<uint32_t> expected_crc,
    bool skip_local_shard) {
  auto log = Logger("recovery");
  std::vector<std::string> nodes;
  {
    absl::MutexLock lock(&mu_);
    auto point = restore_points_.find(job_id);
    if (point != restore_points_.end() && point->second.step == step) nodes = point->second.nodes;
  }
  // Making a shard local needs enough of it, not a complete view: a node that does not answer
  // (lost, not yet suspected) is passed over like a lost one.
  TESSERA_ASSIGN_OR_RETURN(std::vector<JobListing> listings,
                           ListNodes(job_id, nodes, /*require_complete=*/false));
  JobHoldings holdings;
  for (JobListing& l : listings) {
    for (HeldShard& s : l.shards) {
      if (!expected_crc || s.payload_crc32c == *expected_crc) holdings.shards.push_back(s);
    }
    for (HeldFragment& f : l.fragments) {
      if (!expected_crc || f.shard_crc32c == *expected_crc) holdings.fragments.push_back(f);
    }
  }
  if (skip_local_shard) {
    const std::string self = cluster_->self_id();
    auto& shards = holdings.shards;
    shards.erase(std::remove_if(shards.begin(), shards.end(),
                                [&](const HeldShard& s) {
                                  return s.node == self && s.rank == rank && s.step == step;
                                }),
                 shards.end());
  }
  std::set<std::pair<uint32_t, std::string>> exclude;
  static std::atomic<uint64_t> sequence{0};
  for (int attempt = 0;; ++attempt) {
    auto plan = PlanRestore(holdings, cluster_->self_id(), rank, step, exclude);
    if (!plan.ok()) {
      // Members that are not live (and not declared lost) may hold it: a partition heals, a
      // stopped daemon resumes. That is no reason for the trainer to start fresh (NOT_FOUND)
      // or to fail (DATA_LOSS, too few fragments): it asks again (seed 520503531: a node cut
      // off after the restore point was decided found none of the rank's fragments reachable,
      // and its rank started fresh; seed 9000317: with the local slot damaged and one holder
      // lost, the holder of the second fragment was stopped and held dead, and the restore
      // failed although that daemon resumed a moment later).
      const Cluster::Quorum quorum = cluster_->CountQuorum();
      const bool members_may_hold_it =
          absl::IsNotFound(plan.status()) || absl::IsDataLoss(plan.status());
      const absl::StatusCode code = members_may_hold_it && quorum.live < quorum.members
                                        ? absl::StatusCode::kUnavailable
                                        : plan.status().code();
      return absl::Status(code, absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                             " cannot be restored or rebuilt from the live nodes",
                                             code == absl::StatusCode::kUnavailable
                                                 ? absl::StrCat(" (", quorum.members - quorum.live,
                                                                " members are not live)")
                                                 : std::string(),
                                             ": ", plan.status().message()));
    }
    if (plan->source == RestorePlan::Source::kLocal) {
      return store_->PrepareRestore(job_id, rank, step);
    }
    const std::string path = absl::StrCat(fragments_->directory(), "/", job_id, ".r", rank, ".s",
                                          step, ".", sequence.fetch_add(1), kRestoredSuffix);
    SegmentCreateOptions create;
    create.prefault = false;
    // The daemon's alone until the agent service lets the restoring trainer's uid open it
    // (GrantSegmentAccess): not readable by the daemon's group, which every trainer is in.
    create.mode = 0600;
    // The segment counts against the daemon's capacity, like the fragments it holds, from
    // before it is created until it is deleted.
    CapacityBudget* const budget = fragments_->budget();
    // A rebuild reads its data fragments straight into the segment, padding included.
    const uint64_t capacity = std::max<uint64_t>(
        plan->source == RestorePlan::Source::kRebuild
            ? plan->k * ErasureCodec::FragmentBytes(plan->shard_bytes, plan->k)
            : plan->shard_bytes,
        1);
    TESSERA_RETURN_IF_ERROR(budget->Reserve(
        kSegmentHeaderBytes + capacity,
        absl::StrCat("making job '", job_id, "' rank ", rank, " step ", step, " local")));
    auto created = Segment::Create(path, SegmentKind::kSlot, capacity, create);
    if (!created.ok()) {
      budget->Release(kSegmentHeaderBytes + capacity);
      return created.status();
    }
    std::unique_ptr<Segment> segment = std::move(*created);
    // Deletes the segment and gives its bytes back, unless it was kept for the restore.
    struct Discard {
      std::unique_ptr<Segment>* segment;
      CapacityBudget* budget;
      ~Discard() {
        if (*segment == nullptr) return;
        (*segment)->Unlink().IgnoreError();
        budget->Release((*segment)->file_bytes());
      }
    } discard{&segment, budget};
    const absl::Time start = absl::Now();
    absl::Status status;
    uint64_t payload_bytes = plan->shard_bytes;
    uint32_t payload_crc = plan->shard_crc32c;
    std::optional<uint32_t> rebuilt_crc;  // computed by DecodeShard
    std::string phases;                   // where a rebuild's time went, for the log
    if (plan->source == RestorePlan::Source::kCopy) {
      auto address = cluster_->AddressOf(plan->node);
      SegmentSink sink(segment.get());
      if (!address) {
        status = absl::UnavailableError(absl::StrCat("member ", plan->node, " is not live"));
      } else {
        auto fetched =
            client_->FetchShard(PeerTarget(*address, plan->node), job_id, rank, step, &sink);
        status = fetched.status();
        if (fetched.ok()) {
          payload_bytes = fetched->payload_bytes;
          payload_crc = fetched->payload_crc32c;
        }
      }
      if (!status.ok()) {
        return absl::Status(status.code(), absl::StrCat("copying job '", job_id, "' rank ", rank,
                                                        " step ", step, " from ", plan->node,
                                                        ": ", status.message()));
      }
    } else {
      // The k fragments are read in parallel, each from its node (or this daemon's store),
      // the data fragments straight into the segment (its capacity includes their padding).
      FragmentReader read = [&](uint32_t index, const std::string& node, uint8_t* dst,
                                size_t bytes) -> absl::StatusOr<uint32_t> {
        const FragmentKey key{job_id, rank, step, index};
        if (node != cluster_->self_id()) {
          auto address = cluster_->AddressOf(node);
          if (!address) return absl::UnavailableError("not live");
          TESSERA_ASSIGN_OR_RETURN(
              FragmentStatus got,
              client_->GetFragment(PeerTarget(*address, node), key, 0, dst, bytes));
          if (got.bytes_received != bytes) {
            return absl::DataLossError(absl::StrCat("the fragment has ", got.bytes_received,
                                                    " bytes, not ", bytes));
          }
          return got.fragment_crc32c;  // GetFragment checked the bytes against it
        }
        TESSERA_ASSIGN_OR_RETURN(FragmentView view, fragments_->Get(key));
        if (view.size() != bytes) {
          return absl::DataLossError(
              absl::StrCat("held fragment has ", view.size(), " bytes, not ", bytes));
        }
        std::memcpy(dst, view.data(), bytes);
        if (Crc32c(dst, bytes) != view.fragment_crc32c()) {
          return absl::DataLossError("held fragment does not match its CRC32C");
        }
        return view.fragment_crc32c();
      };
      DecodeOptions decode;
      decode.shard_capacity = capacity;
      TESSERA_ASSIGN_OR_RETURN(ShardDecode decoded,
                               DecodeShard(*plan, read, segment->payload(), decode));
      for (const ShardDecode::FailedRead& failed : decoded.failed) {
        if (absl::IsDataLoss(failed.status)) Metrics().fragment_crc_failures->Increment();
        log->warn("{} from {}: {}; counted as an erasure",
                  FragmentKey{job_id, rank, step, failed.index}.ToString(), failed.node,
                  failed.status.ToString());
        exclude.insert({failed.index, failed.node});
      }
      if (!decoded.failed.empty()) continue;
      rebuilt_crc = decoded.crc32c;
      phases = absl::StrCat(" (reading ", absl::ToInt64Milliseconds(decoded.read_time),
                            " ms, decoding ", absl::ToInt64Milliseconds(decoded.decode_time),
                            " ms, checking ", absl::ToInt64Milliseconds(decoded.crc_time), " ms)");
    }
    const uint32_t crc = rebuilt_crc ? *rebuilt_crc
                                      : ParallelCrc32c(segment->payload(), payload_bytes,
                                                       static_cast<int>(std::clamp(
                                                           std::thread::hardware_concurrency(),
                                                           1u, 8u)));
    if (crc != payload_crc) {
      if (attempt < 3 && plan->source == RestorePlan::Source::kRebuild) {
        log->warn("job '{}' rank {} step {}: the rebuilt shard fails its CRC32C; retrying",
                  job_id, rank, step);
        continue;
      }
      return absl::DataLossError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                              ": the shard made local does not match its CRC32C"));
    }
    TESSERA_ASSIGN_OR_RETURN(auto manifest, LocateManifest(segment->payload(), payload_bytes,
                                                           job_id, rank, step));
    SegmentHeader* h = segment->header();
    h->step = step;
    h->rank = rank;
    h->payload_bytes = payload_bytes;
    h->payload_crc32c = payload_crc;
    h->manifest_offset = manifest.first;
    h->manifest_bytes = manifest.second;
    std::snprintf(h->job_id, sizeof(h->job_id), "%s", job_id.c_str());
    h->header_crc32c = ComputeHeaderCrc(*h);
    StoreState(h, SegmentState::kSealed);

    SnapshotStore::RestoreInfo info;
    info.step = step;
    info.segment_path = segment->path();
    info.payload_bytes = payload_bytes;
    info.manifest_offset = manifest.first;
    info.manifest_bytes = manifest.second;
    info.payload_crc32c = payload_crc;
    const bool copied = plan->source == RestorePlan::Source::kCopy;
    log->info("job '{}' rank {} step {}: {} ({} bytes) in {} ms{}", job_id, rank, step,
              copied ? absl::StrCat("copied from ", plan->node)
                     : absl::StrCat("rebuilt from ", plan->k, " of ", plan->k + plan->m,
                                    " fragments"),
              payload_bytes, absl::ToInt64Milliseconds(absl::Now() - start), phases);
    Metrics().restore_seconds->Observe(absl::ToDoubleSeconds(absl::Now() - start));
    {
      absl::MutexLock lock(&mu_);
      ++(copied ? stats_.copied_shards : stats_.rebuilt_shards);
    }
    restored_[{job_id, rank, step}] = {std::move(segment), info};
    return info;
  }
}


}  // namespace tessera
