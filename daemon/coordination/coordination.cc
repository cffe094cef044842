#include "daemon/coordination/coordination.h"

#include <set>

#include "common/logging.h"
#include "common/status.h"

namespace tessera {

Coordination::Coordination(SnapshotStore* store, bool derive_commits) : store_(store) {
  if (!derive_commits) return;
  std::set<std::string> jobs;
  for (const auto& v : store_->ListVersions("")) jobs.insert(v.job_id);
  for (const std::string& job : jobs) {
    if (!store_->HoldsWholeJob(job)) continue;  // its commits are not decided here
    auto step = FindLatestRestorable(job);
    if (!step.ok()) continue;
    store_->Commit(job, *step);
    Logger("coordinator")->info("job '{}': restore point after restart is step {}", job, *step);
  }
}

void Coordination::OnSealed(const std::string& job_id, uint32_t /*rank*/, int64_t /*step*/,
                            const SnapshotStore::SealResult& /*sealed*/) {
  // Commit the newest step that every rank here holds now (a rank that ran ahead may have
  // replaced a step the others sealed later, so reports alone are not enough). Only when every
  // rank of the job is here: otherwise this daemon cannot know that a step is complete.
  if (!store_->HoldsWholeJob(job_id)) return;
  auto common = FindLatestRestorable(job_id);
  if (!common.ok() || *common <= store_->committed(job_id)) return;
  store_->Commit(job_id, *common);
  Logger("coordinator")->debug("job '{}' committed step {}", job_id, *common);
}

JobHoldings Coordination::LocalHoldings(const std::string& job_id, uint32_t world_size) const {
  JobHoldings holdings;
  for (const auto& v : store_->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed) continue;
    holdings.shards.push_back({"", v.rank, v.step, world_size, v.payload_bytes, v.payload_crc32c});
  }
  return holdings;
}

absl::StatusOr<int64_t> Coordination::FindLatestRestorable(const std::string& job_id,
                                                           uint32_t world_size_hint,
                                                           std::optional<uint32_t> resuming_rank,
                                                           uint64_t /*run_id*/) {
  const uint32_t ranks_here = static_cast<uint32_t>(store_->RankCount(job_id));
  auto step = tessera::FindLatestRestorable(LocalHoldings(job_id, ranks_here), world_size_hint);
  if (step.ok() && resuming_rank) {
    // A daemon that decides alone has no epochs: steps after the restore point are released on
    // every rank here, so that a rank resuming later cannot combine the abandoned run's steps of
    // the others with the new run's (docs/PROTOCOL.md keeps histories apart with epochs instead).
    for (const auto& r : store_->ListRanks(job_id)) store_->RollbackRank(job_id, r.rank, *step);
  }
  return step;
}

absl::StatusOr<JobDrop> Coordination::DropJob(const std::string& job_id,
                                              std::optional<uid_t> owner_uid, bool force) {
  TESSERA_ASSIGN_OR_RETURN(SnapshotStore::DropJobResult dropped,
                           store_->DropJob(job_id, owner_uid, force));
  NodeDrop node;
  node.ranks = dropped.ranks;
  node.slots_deleted = dropped.segments_deleted;
  node.slot_bytes_deleted = dropped.bytes_deleted;
  node.newest_sealed_step = dropped.newest_sealed_step;
  node.running_ranks = dropped.running_ranks;
  node.running_pids.assign(dropped.running_pids.begin(), dropped.running_pids.end());
  JobDrop drop;
  drop.nodes.push_back(std::move(node));
  return drop;
}

}  // namespace tessera
