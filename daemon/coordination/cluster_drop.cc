// ClusterCoordination's drop side (docs/PROTOCOL.md, Dropping a job): a member asks the job's
// coordinator, which checks every live member for trainers of the job, records the drop as a new
// epoch that voids every older commit, shard and fragment, and tells every live member.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/coordination/protection_pipeline.h"

namespace tessera {

absl::StatusOr<JobDrop> ClusterCoordination::DropJob(const std::string& job_id,
                                                     std::optional<uid_t> owner_uid, bool force) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  DropQuestion question;
  question.job_id = job_id;
  question.force = force;
  if (owner_uid) question.owner_uid = static_cast<uint32_t>(*owner_uid);
  TESSERA_ASSIGN_OR_RETURN(auto coordinator, CoordinatorOf(job_id));
  if (coordinator.first == cluster_->self_id()) return DropAsCoordinator(question);
  absl::StatusOr<JobDrop> drop = coordination_client_->DropJob(
      PeerTarget(coordinator.second, coordinator.first), question);
  if (drop.ok()) return drop;
  // A coordinator that did not answer in time may or may not have decided: asking again is
  // safe (a drop repeated re-sends the same drop or records a newer one).
  const absl::StatusCode code = absl::IsDeadlineExceeded(drop.status())
                                    ? absl::StatusCode::kUnavailable
                                    : drop.status().code();
  return absl::Status(code, absl::StrCat("the job's coordinator ", coordinator.first, ": ",
                                         drop.status().message()));
}

absl::StatusOr<JobDrop> ClusterCoordination::OnDropJob(const NodeIdentity& /*from*/,
                                                       const DropQuestion& question) {
  TESSERA_ASSIGN_OR_RETURN(auto coordinator, CoordinatorOf(question.job_id));
  if (coordinator.first != cluster_->self_id()) {
    return absl::UnavailableError(absl::StrCat(
        "this daemon is not the coordinator of job '", question.job_id, "' in its view (",
        coordinator.first, " is): membership is changing; ask again"));
  }
  return DropAsCoordinator(question);
}

absl::StatusOr<NodeDrop> ClusterCoordination::OnApplyDrop(const NodeIdentity& /*from*/,
                                                          const JobState& state, DropStep step,
                                                          std::optional<uint32_t> owner_uid) {
  if (step == DropStep::kAbandon) {
    store_->LiftDropFence(state.job_id);
    NodeDrop node;
    node.node_id = cluster_->self_id();
    return node;
  }
  if (step == DropStep::kApply) {
    NodeDrop applied = ApplyJobState(state);
    // Also when the drop came before (a repeated drop): its check fenced the job again.
    store_->LiftDropFence(state.job_id);
    // The drop may have come first with a report's reply: answer what it deleted then.
    absl::MutexLock lock(&mu_);
    auto earlier = drop_results_.find(state.job_id);
    if (earlier != drop_results_.end() && earlier->second.first == state.dropped_epoch) {
      return earlier->second.second;
    }
    return applied;
  }
  std::optional<uid_t> uid;
  if (owner_uid) uid = static_cast<uid_t>(*owner_uid);
  TESSERA_ASSIGN_OR_RETURN(SnapshotStore::DropJobResult held,
                           store_->CheckDrop(state.job_id, uid, options_.drop_fence));
  NodeDrop node;
  node.node_id = cluster_->self_id();
  node.ranks = held.ranks;
  node.slots_deleted = held.segments_deleted;
  node.slot_bytes_deleted = held.bytes_deleted;
  node.newest_sealed_step = held.newest_sealed_step;
  node.running_ranks = held.running_ranks;
  node.running_pids.assign(held.running_pids.begin(), held.running_pids.end());
  for (const FragmentStatus& f : fragments_->List(state.job_id)) {
    ++node.fragments_deleted;
    node.fragment_bytes_deleted += f.meta.fragment_bytes;
  }
  return node;
}

std::vector<absl::StatusOr<NodeDrop>> ClusterCoordination::ApplyDropOn(
    const std::vector<std::string>& nodes, const JobState& state, DropStep step,
    std::optional<uint32_t> owner_uid) {
  std::vector<absl::StatusOr<NodeDrop>> results(nodes.size(),
                                                absl::UnavailableError("not asked"));
  InParallel(nodes.size(), kMaxConcurrentCalls, [&](size_t i) {
    if (nodes[i] == cluster_->self_id()) {
      results[i] = OnApplyDrop(Self(), state, step, owner_uid);
      return;
    }
    auto address = cluster_->AddressOf(nodes[i]);
    results[i] = address ? coordination_client_->ApplyDrop(PeerTarget(*address, nodes[i]), state,
                                                           step, owner_uid)
                         : absl::UnavailableError("not live");
  });
  return results;
}

void ClusterCoordination::HoldDropForTest(const std::string& file) {
  if (access(file.c_str(), F_OK) != 0) return;
  Logger("coordinator")->warn("test hook: holding a drop while {} exists", file);
  std::ofstream(file + ".held") << cluster_->self_id() << "\n";
  // Bounded, so that a test that forgets the file does not hang the daemon's drops for ever.
  for (int i = 0; i < 6000 && access(file.c_str(), F_OK) == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
}

absl::StatusOr<JobDrop> ClusterCoordination::DropAsCoordinator(const DropQuestion& question) {
  const std::string& job_id = question.job_id;
  // A drop is a decision, like a restore point: taken only from a converged view that sees a
  // majority of the members, so that any later decision's view meets a member that took it.
  TESSERA_RETURN_IF_ERROR(RequireMajority());
  absl::MutexLock dropping(&drop_mu_);
  {
    absl::MutexLock lock(&mu_);
    dropping_.insert(job_id);
  }
  auto dropped = absl::MakeCleanup([&] {
    absl::MutexLock lock(&mu_);
    dropping_.erase(job_id);
  });
  // What every live member knows of the job (its epoch, commit and any earlier drop).
  TESSERA_RETURN_IF_ERROR(EnsureCoordinatorView(job_id, 0));

  // 1. Every live member says what it holds and which trainers of the job run there.
  std::vector<std::string> members = cluster_->LiveNodeIds();
  std::vector<absl::StatusOr<NodeDrop>> checks =
      ApplyDropOn(members, JobState{job_id}, DropStep::kCheck, question.owner_uid);
  // The check fenced the job's registrations on the members; a drop refused from here on lifts
  // the fences again rather than leave them until they lapse (cluster.drop_fence_ms).
  auto abandon = absl::MakeCleanup([&] {
    for (const absl::StatusOr<NodeDrop>& lifted :
         ApplyDropOn(members, JobState{job_id}, DropStep::kAbandon, std::nullopt)) {
      if (!lifted.ok()) {
        Logger("coordinator")
            ->warn("job '{}': a fence of the drop refused stays until it lapses: {}", job_id,
                   lifted.status().ToString());
      }
    }
  });
  std::vector<std::string> running;
  bool held = false;
  for (size_t i = 0; i < members.size(); ++i) {
    if (!checks[i].ok()) {
      if (absl::IsPermissionDenied(checks[i].status())) {
        return absl::PermissionDeniedError(
            absl::StrCat("on node ", members[i], ": ", checks[i].status().message()));
      }
      return absl::UnavailableError(absl::StrCat(
          "member ", members[i], " did not say whether a trainer of job '", job_id,
          "' runs there (", checks[i].status().message(), "); nothing was dropped: ask again"));
    }
    const NodeDrop& c = *checks[i];
    held = held || !c.ranks.empty() || c.fragments_deleted > 0;
    for (size_t r = 0; r < c.running_ranks.size(); ++r) {
      running.push_back(absl::StrCat("rank ", c.running_ranks[r], " on ", members[i], " (pid ",
                                     c.running_pids[r], ")"));
    }
  }
  if (!running.empty() && !question.force) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", job_id, "' is still being trained: ", absl::StrJoin(running, ", "),
        running.size() == 1 ? " is" : " are",
        " registered and running; nothing was dropped. Stop the trainers (or end the run with "
        "Snapshotter.close(drop=True)) first, or drop with force (what a trainer that still runs "
        "seals afterwards is void: it is never restored)"));
  }

  if (!options_.test_hold_drop_file.empty()) HoldDropForTest(options_.test_hold_drop_file);

  // 2. The decision: a new epoch that voids everything of the job before it.
  std::move(abandon).Cancel();
  JobState state = coordinator_.State(job_id);
  if (!held && state.committed.empty()) {
    if (state.dropped_epoch == 0) {
      return absl::NotFoundError(absl::StrCat(
          "job '", job_id, "' has no snapshot, fragment, commit or registered rank on any of the ",
          members.size(), " live members"));
    }
    // Dropped already and nothing left: the same drop is sent again, for members that missed it.
  } else {
    state = coordinator_.Drop(job_id, NowUnixMs());
  }
  {
    absl::MutexLock lock(&mu_);
    told_.erase(job_id);
    restore_points_.erase(job_id);
  }

  // 3. Every live member takes it (the members not live learn it when they come back: every
  // coordinator gathers the job's state from every live member before it acts).
  members = cluster_->LiveNodeIds();
  std::vector<absl::StatusOr<NodeDrop>> applied =
      ApplyDropOn(members, state, DropStep::kApply, std::nullopt);
  JobDrop drop;
  drop.dropped_epoch = state.dropped_epoch;
  drop.coordinator = cluster_->self_id();
  for (size_t i = 0; i < members.size(); ++i) {
    if (applied[i].ok()) {
      NodeDrop node = std::move(*applied[i]);
      node.node_id = members[i];
      drop.nodes.push_back(std::move(node));
    } else {
      drop.unanswered.emplace_back(members[i], applied[i].status().ToString());
    }
  }
  for (const Cluster::PeerView& p : cluster_->Peers()) {
    if (p.alive || p.node_id.empty() || cluster_->IsDeclaredLost(p.node_id)) continue;
    if (std::find(members.begin(), members.end(), p.node_id) != members.end()) continue;
    drop.unanswered.emplace_back(p.node_id, "not live");
  }
  const Cluster::Quorum quorum = cluster_->CountQuorum();
  Logger("coordinator")
      ->warn("job '{}' dropped at epoch {}: taken by {} of {} members{}{}", job_id,
             state.dropped_epoch, drop.nodes.size(), quorum.members,
             drop.unanswered.empty() ? "" : "; not taken by ",
             [&] {
               std::vector<std::string> names;
               for (const auto& [node, why] : drop.unanswered) names.push_back(node);
               return absl::StrJoin(names, ", ");
             }());
  if (drop.nodes.size() * 2 <= quorum.members) {
    return absl::UnavailableError(absl::StrCat(
        "job '", job_id, "': the drop (epoch ", state.dropped_epoch, ") was taken by only ",
        drop.nodes.size(), " of the ", quorum.members,
        " members, not a majority, so a later coordinator might not learn it: ask again"));
  }
  return drop;
}

}  // namespace tessera
