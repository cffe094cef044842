// Job-wide decisions made by a daemon: when a step is committed (every rank of the job has it
// protected) and which step a restarted job restores. A standalone daemon (no cluster members)
// decides over the ranks it holds; it commits a step once each of them has sealed it.
#ifndef TESSERA_DAEMON_COORDINATION_COORDINATION_H_
#define TESSERA_DAEMON_COORDINATION_COORDINATION_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/coordination/protection.h"
#include "daemon/store/snapshot_store.h"

namespace tessera {

// The file name suffix of a shard copied or rebuilt into this daemon's memory for a restore
// (ClusterCoordination::PrepareRestore), read by the restoring trainer during that restore only.
inline constexpr char kRestoredSuffix[] = ".restored";

// The steps of a drop on a member (docs/PROTOCOL.md, Dropping a job): the coordinator's check
// (what is held, which trainers run; fences the job's registrations), the drop itself, or the
// drop abandoned after the check (refused or not decided: the fence is lifted).
enum class DropStep { kCheck, kApply, kAbandon };

// What one node held and deleted of a dropped job.
struct NodeDrop {
  std::string node_id;
  std::vector<uint32_t> ranks;       // ranks whose snapshots were held (or registered) there
  uint32_t slots_deleted = 0;        // slot segment files
  uint64_t slot_bytes_deleted = 0;
  uint32_t fragments_deleted = 0;
  uint64_t fragment_bytes_deleted = 0;
  int64_t newest_sealed_step = -1;   // -1: none
  // Registered by a trainer that still runs (dropped only with force), and those processes.
  std::vector<uint32_t> running_ranks;
  std::vector<int32_t> running_pids;
};

// What dropping a job did (docs/PROTOCOL.md, Dropping a job).
struct JobDrop {
  uint64_t dropped_epoch = 0;  // 0: a standalone daemon (no epochs)
  std::string coordinator;     // the node that decided it; empty: standalone
  std::vector<NodeDrop> nodes;
  // Members that did not take the drop, and why: they delete their copies when they learn it.
  std::vector<std::pair<std::string, std::string>> unanswered;
};

class Coordination {
 public:
  // `store` is not owned and must outlive this object. Recovers each held job's restore point
  // (after a daemon restart the commits are re-derived from the sealed steps held).
  explicit Coordination(SnapshotStore* store) : Coordination(store, /*derive_commits=*/true) {}
  virtual ~Coordination() = default;

  // `rank` of `job_id` sealed `step` on this daemon.
  virtual void OnSealed(const std::string& job_id, uint32_t rank, int64_t step,
                        const SnapshotStore::SealResult& sealed);

  // The newest step at which every rank of the job can be restored. `world_size_hint` (0: none)
  // is a world size the caller knows (a registered rank's): ranks that have not sealed anything
  // yet still count as missing, so a step only some ranks sealed is never taken as complete.
  // With `resuming_rank`, that rank resumes from the answer: sealed steps after it are released
  // (here, on every rank of the job, since a standalone daemon has no epochs; a cluster releases
  // only the resuming rank's, see ClusterCoordination). Errors include kNotFound (nothing to
  // restore) and kUnavailable (not decided yet, e.g. the coordinator did not answer: retry).
  // `run_id` names the resuming trainer run (0: unknown): a retry of the same run's question is
  // answered as the first was.
  virtual absl::StatusOr<int64_t> FindLatestRestorable(
      const std::string& job_id, uint32_t world_size_hint = 0,
      std::optional<uint32_t> resuming_rank = std::nullopt, uint64_t run_id = 0);

  // Makes (job, rank, step) readable on this daemon (SnapshotStore::PrepareRestore's contract;
  // `verify` false leaves the check of a local payload to the caller, who copies it).
  // Standalone: only what the local store holds.
  virtual absl::StatusOr<SnapshotStore::RestoreInfo> PrepareRestore(const std::string& job_id,
                                                                    uint32_t rank, int64_t step,
                                                                    bool verify) {
    return store_->PrepareRestore(job_id, rank, step, verify);
  }

  // Ends the job: deletes every snapshot of it, so that the next launch with its job id starts
  // afresh. Standalone: SnapshotStore::DropJob on this daemon (its errors), reported as one node
  // with an empty node id. ClusterCoordination drops it on every member through the job's
  // coordinator. `owner_uid` set: the job must be that uid's; `force`: drop it even while a
  // trainer of it runs.
  virtual absl::StatusOr<JobDrop> DropJob(const std::string& job_id,
                                          std::optional<uid_t> owner_uid, bool force);

 protected:
  // derive_commits false: a subclass decides commits itself (a step sealed on every local rank
  // may not be protected across the cluster yet, so it must not be committed from local state).
  Coordination(SnapshotStore* store, bool derive_commits);

  // What this daemon holds for the job, with each shard's world size as this daemon sees it.
  JobHoldings LocalHoldings(const std::string& job_id, uint32_t world_size) const;

  SnapshotStore* const store_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_COORDINATION_H_
