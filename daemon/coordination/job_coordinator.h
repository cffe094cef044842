// JobCoordinator: the coordinator's side of docs/PROTOCOL.md, transport-free. It keeps, for each
// job this daemon coordinates, the job's epoch, its newest commit record, the protection reports
// of the steps that are still open, and what it learned about which steps can never commit.
// Everything here is soft state: owners re-send their reports, so a coordinator that restarts or
// takes over rebuilds it from the job's daemons alone.
//
// Work is per job: a report touches only its job, and a commit names only the job's nodes.
//
// Thread-safe.
#ifndef TESSERA_DAEMON_COORDINATION_JOB_COORDINATOR_H_
#define TESSERA_DAEMON_COORDINATION_JOB_COORDINATOR_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

// A committed step: every rank of the job reported it protected in `epoch`.
struct CommitRecord {
  struct Rank {
    uint32_t rank = 0;
    uint32_t shard_crc32c = 0;
    uint64_t shard_bytes = 0;
  };
  uint64_t epoch = 0;
  int64_t step = -1;  // -1: nothing committed
  std::vector<Rank> ranks;         // by rank, one per rank of the world
  std::vector<std::string> nodes;  // owners and holders of the step, sorted
  // The newest epoch whose history is known to contain this step: `epoch` when the step was
  // committed, raised to the new epoch when a restore decision resumes from it (a commit that a
  // coordinator made while cut off, which no node of the deciding majority knew, never is).
  uint64_t confirmed_epoch = 0;

  bool empty() const { return step < 0; }
  // Ordered by (confirmed_epoch, epoch, step). A commit of a newer epoch is newer whatever its
  // step; and a restore point that a newer epoch resumed from is newer than any commit of an older
  // epoch not known to be in that history: such a commit was made on the far side of a partition
  // while the majority resumed without it, and restoring it on some ranks would mix two histories
  // (docs/PROTOCOL.md, Restore 3).
  bool NewerThan(const CommitRecord& other) const;
  // Whether adopting `newer` in place of this record goes back to an older step: this record's
  // step was abandoned by a decision taken without it.
  bool SupersededBy(const CommitRecord& newer) const;
  // The committed digest of `rank`, or nullptr.
  const Rank* Find(uint32_t rank) const;
};

// What the coordinator tells an owner or a node of the job.
struct JobState {
  std::string job_id;
  uint64_t epoch = 0;
  CommitRecord committed;
  std::vector<int64_t> dead_steps;  // steps of `epoch` that can never commit (recent ones)
  // The job was dropped at this epoch (0: not, or the tombstone was collected): every commit,
  // shard and fragment of an epoch up to it is void, and the next run starts a later epoch
  // (docs/PROTOCOL.md, Dropping a job).
  uint64_t dropped_epoch = 0;
};

// Whether `record` is void under a drop at `dropped_epoch`: its history is the dropped one.
inline bool DroppedBy(const CommitRecord& record, uint64_t dropped_epoch) {
  return !record.empty() && dropped_epoch > 0 &&
         std::max(record.epoch, record.confirmed_epoch) <= dropped_epoch;
}

// One owner's report that (job, rank, step) is protected.
struct ProtectedReport {
  std::string job_id;
  uint32_t world_size = 0;  // registered; > 0
  uint64_t epoch = 0;
  uint32_t rank = 0;
  int64_t step = 0;
  // The rank's previous seal in this epoch: -1 none, kUnknownStep when the owner does not know
  // (it restarted since).
  int64_t previous_step = -1;
  uint32_t shard_crc32c = 0;
  uint64_t shard_bytes = 0;
  std::string owner;                 // node id
  std::vector<std::string> holders;  // node ids
};

inline constexpr int64_t kUnknownStep = -2;

class JobCoordinator {
 public:
  struct Limits {
    size_t max_open_steps = 64;       // per job; the oldest are forgotten (owners re-report)
    size_t max_intervals_per_rank = 16;
    size_t max_dead_steps = 64;       // remembered per job
  };
  JobCoordinator() : JobCoordinator(Limits()) {}
  explicit JobCoordinator(Limits limits) : limits_(limits) {}

  struct Outcome {
    JobState state;                 // the reply to the reporter
    // Nodes to push `state` to: the job's nodes when a step was committed or found dead.
    std::vector<std::string> push_to;
    bool committed_now = false;
  };
  // Records a report. A report of an older epoch, or of a step at or before the commit, changes
  // nothing. A report of a newer epoch moves the job to it (open steps of the older one are void).
  // When every rank of the world has reported a step, it is committed. REQUIRES: world_size > 0.
  Outcome Report(const ProtectedReport& report);

  // Adopts a commit record (and its epoch, and a drop) learned from a node of the job. A record
  // that the job's drop voids is ignored, and a newer drop voids the record held. Returns the
  // record it held when `record` supersedes it (CommitRecord::SupersededBy), for the caller to
  // log.
  std::optional<CommitRecord> Learn(const std::string& job_id, const CommitRecord& record,
                                    uint64_t epoch, uint64_t dropped_epoch = 0);

  // Drops the job (docs/PROTOCOL.md, Dropping a job): a new epoch E = max(every epoch known + 1,
  // `now_ms`) is recorded as the job's drop, which voids every commit, report and shard of an
  // epoch up to E. Returns the job's state, to be pushed to every member.
  JobState Drop(const std::string& job_id, uint64_t now_ms);

  // Rank `rank`'s trainer run `run_id` asks to resume (docs/PROTOCOL.md, Epochs). A retry of the
  // run answered last for this rank in the current epoch gets that epoch again. Otherwise a new
  // epoch starts when another run of this rank was answered in it or reported a step in it, or
  // when it may hold a shard of
  // this rank (`may_hold`: a complete view found one sealed in it, or could not rule it out), so
  // that two runs of a rank never seal in one epoch; otherwise the run joins it (a rank of the
  // same restart that asks later than the others). `now_ms` bounds a new epoch
  // from below, so that it outgrows what another coordinator may have handed out. Returns the
  // epoch the job's new snapshots are sealed in.
  uint64_t Resume(const std::string& job_id, uint32_t rank, uint64_t run_id, bool may_hold,
                  uint64_t now_ms);

  JobState State(const std::string& job_id) const;
  // The jobs whose drop is kept here (JobState::dropped_epoch > 0), with their state.
  std::vector<JobState> Dropped() const;
  // The nodes named by the job's commit record and open reports, sorted.
  std::vector<std::string> Nodes(const std::string& job_id) const;
  // Forgets a job (dropped by its owner).
  void Forget(const std::string& job_id);
  size_t jobs() const;

 private:
  struct Job {
    uint64_t epoch = 0;
    uint32_t world_size = 0;
    CommitRecord committed;
    std::map<int64_t, std::map<uint32_t, ProtectedReport>> open;  // step -> rank -> report
    // Per rank: recent (previous, step) seal intervals of this epoch; steps strictly inside one
    // were never sealed by that rank in this epoch, so they can never commit.
    std::map<uint32_t, std::deque<std::pair<int64_t, int64_t>>> intervals;
    std::set<int64_t> dead;
    std::map<uint32_t, uint64_t> answered_run;  // per rank: the run last answered in this epoch
    std::set<uint32_t> reported;  // ranks whose reports of this epoch came in
    std::set<std::string> nodes;
    uint64_t dropped_epoch = 0;  // JobState::dropped_epoch
  };
  bool IsDead(const Job& job, int64_t step) const;
  void EnterEpoch(Job* job, uint64_t epoch);
  JobState StateOf(const std::string& job_id, const Job& job) const;
  Job& FindOrCreate(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Limits limits_;
  mutable absl::Mutex mu_;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_JOB_COORDINATOR_H_
