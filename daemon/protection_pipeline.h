// Cross-node protection and cluster-wide coordination of a daemon that has peers.
//
// ClusterCoordination replaces the standalone Coordination when peer.listen_address is set:
//   - OnSealed queues (job, rank, step) for protection. A worker pins the sealed slot, places its
//     k+m fragments on live members (PlaceFragments) and sends them with PutFragment in
//     parallel: the data fragments at once, as views of the payload (only a padded last one is
//     copied); meanwhile the parity is encoded on several threads (ErasureCodec::EncodeOnThreads)
//     and each parity fragment is sent once complete. Then it unpins. The scratch for parity
//     and the padded fragment is kept for the next shard, so the steady state takes no page
//     faults: (m + 1) / k of the largest shard protected stays allocated. A failed send is
//     retried in the background with backoff (counted and logged); it never blocks a snapshot,
//     whose slot is only pinned while sending.
//   - Commit (on its own thread, so protection never waits for it): after each protected shard
//     and periodically, the daemon lists what every live member holds (ListHeld) and commits the
//     newest step at which every rank of the job has all its k+m fragments sealed:
//     SnapshotStore::Commit, and fragments of older steps dropped. Every daemon derives the same
//     commit from the same holdings, so no coordinator needs to survive.
//   - FindLatestRestorable looks at the holdings of all live members.
//   - PrepareRestore makes a shard that is not local (or whose local copy fails its CRC32C)
//     readable here: copied whole from the node that holds it, or rebuilt from k fragments (a
//     corrupt one is excluded and the plan redone), checked against the shard's CRC32C, in a
//     new segment file of this daemon's directory, charged to the FragmentStore's capacity
//     budget until a newer commit deletes it. The step restored becomes the job's committed
//     step here (the job resumes from it).
//
// World size: taken from the seals this daemon saw, else the highest rank held plus one.
// Thread-safe.
#ifndef TESSERA_DAEMON_PROTECTION_PIPELINE_H_
#define TESSERA_DAEMON_PROTECTION_PIPELINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/segment.h"
#include "daemon/cluster.h"
#include "daemon/coordination.h"
#include "daemon/fragment_store.h"
#include "daemon/peer_client.h"
#include "daemon/snapshot_store.h"

namespace tessera {

class ClusterCoordination final : public Coordination {
 public:
  struct Options {
    int k = 3;
    int m = 2;
    int64_t commit_check_ms = 500;     // periodic commit check
    int64_t retry_backoff_ms = 200;    // first retry of a failed protection; doubles to 5 s
  };
  // None is owned; all must outlive this object.
  ClusterCoordination(SnapshotStore* store, FragmentStore* fragments, Cluster* cluster,
                      PeerClient* client, Options options);
  ~ClusterCoordination() override;

  // Starts the protection worker, first queueing every sealed shard held (after a restart they
  // may not be protected). Stop() ends it (queued work is dropped); idempotent.
  void Start();
  void Stop();

  void OnSealed(const std::string& job_id, uint32_t rank, int64_t step,
                uint32_t world_size) override;
  absl::StatusOr<int64_t> FindLatestRestorable(const std::string& job_id,
                                               uint32_t world_size_hint = 0) override;
  absl::StatusOr<SnapshotStore::RestoreInfo> PrepareRestore(const std::string& job_id,
                                                            uint32_t rank, int64_t step) override;

  struct Stats {
    uint64_t protected_shards = 0;
    uint64_t protection_failures = 0;  // attempts that failed and were retried
    uint64_t commits = 0;
    uint64_t rebuilt_shards = 0;
    uint64_t copied_shards = 0;
  };
  Stats stats() const;

 private:
  struct Work {
    std::string job_id;
    uint32_t rank = 0;
    int64_t step = 0;
    int attempts = 0;
    int64_t not_before_ms = 0;
  };
  void Run();
  // Commits: the jobs of newly protected shards at once, every job every commit_check_ms.
  void CommitLoop();
  // OK: protected (or superseded: nothing to do). An error: retry later.
  absl::Status Protect(const Work& work);
  // The worker's scratch, at least `bytes` long; its contents are not kept. Worker thread only.
  uint8_t* Scratch(size_t bytes);
  static int EncodeThreads();
  void CheckCommits();
  void MaybeCommit(const std::string& job_id);
  uint32_t WorldSize(const std::string& job_id, const JobHoldings& holdings);
  JobHoldings GatherHoldings(const std::string& job_id);
  // skip_local_shard: this daemon's own shard of (rank, step) is damaged; do not plan from it.
  absl::StatusOr<SnapshotStore::RestoreInfo> MakeLocal(const std::string& job_id, uint32_t rank,
                                                       int64_t step, bool skip_local_shard = false);
  // A rank restoring `step` resumes the job from it, so the step is the job's restore point
  // here: committed, as when every rank has it protected. A step restored after a node loss may
  // never be protected on every rank again (the lost node's fragments are gone), and under the
  // wait policy no rank could snapshot past an uncommitted step.
  void AdoptRestorePoint(const std::string& job_id, int64_t step);

  FragmentStore* const fragments_;
  Cluster* const cluster_;
  PeerClient* const client_;
  const Options options_;

  mutable absl::Mutex mu_;
  std::deque<Work> queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint32_t> world_sizes_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::set<std::string> commit_due_ ABSL_GUARDED_BY(mu_);  // jobs with a newly protected shard
  std::thread worker_;
  std::thread committer_;
  std::unique_ptr<uint8_t[]> scratch_;  // worker thread only
  size_t scratch_bytes_ = 0;

  absl::Mutex restore_mu_;  // one restore at a time; guards restored_
  std::map<std::tuple<std::string, uint32_t, int64_t>,
           std::pair<std::unique_ptr<Segment>, SnapshotStore::RestoreInfo>>
      restored_ ABSL_GUARDED_BY(restore_mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_PROTECTION_PIPELINE_H_
