// Cross-node protection and the per-job commit and restore protocol of a daemon that has peers
// (docs/PROTOCOL.md). ClusterCoordination replaces the standalone Coordination when
// peer.listen_address is set. It plays three roles:
//   - Owner. OnSealed queues (job, rank, step) for protection. A worker pins the sealed slot,
//     places its k+m fragments on live members (PlaceFragments) and sends them with PutFragment
//     in parallel: the data fragments at once, as views of the payload (only a padded last one is
//     copied); meanwhile the parity is encoded on several threads and each parity fragment is
//     sent once complete. Then it unpins and marks the slot PROTECTED. The scratch for parity
//     and the padded fragment is kept for the next shard. A failed send is retried in the
//     background with backoff (counted and logged); it never blocks a snapshot.
//     Each protected shard is reported to the job's coordinator (ReportProtected), and re-reported
//     every report_interval_ms until the step is committed, dead or void; every reply carries the
//     job's state (epoch, commit, dead steps), which releases older slots and fragments here.
//     When a member dies, committed shards whose fragments it held are protected again on the
//     new membership, so health returns without waiting for a new commit.
//   - Coordinator (of the jobs whose rendezvous hash picks this daemon): a JobCoordinator over
//     the reports; a commit is pushed to the job's nodes only. ResolveRestore answers the restore
//     point from a complete view of the job's nodes (ListJob), or kUnavailable.
//   - Node of a job: PushJobState releases what a commit or a dead step makes useless, and
//     ListJob says what is held here.
// PrepareRestore makes a shard that is not local (or whose local copy fails its CRC32C, or is of
// another history than the restore point) readable here: copied whole from the node that holds
// it, or rebuilt from k fragments (a corrupt one is excluded and the plan redone), checked
// against the committed CRC32C, in a new segment file of this daemon's directory, charged to the
// FragmentStore's capacity budget until a newer commit deletes it.
//
// Thread-safe.
#ifndef TESSERA_DAEMON_COORDINATION_PROTECTION_PIPELINE_H_
#define TESSERA_DAEMON_COORDINATION_PROTECTION_PIPELINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/segment.h"
#include "daemon/coordination/coordination.h"
#include "daemon/coordination/job_coordinator.h"
#include "daemon/coordination/job_state_journal.h"
#include "daemon/coordination/messages.h"
#include "daemon/coordination/service.h"
#include "daemon/membership/cluster.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/peer_client.h"

namespace tessera {

class ClusterCoordination final : public Coordination, public CoordinationHandler {
 public:
  struct Options {
    int k = 3;
    int m = 2;
    int64_t report_interval_ms = 500;  // re-sending reports, asking for a restarted job's state
    int64_t retry_backoff_ms = 200;    // first retry of a failed protection; doubles to 5 s
    // Drops of jobs remembered at most (docs/PROTOCOL.md, Dropping a job); past it the oldest is
    // forgotten, with a log line. A drop is also forgotten once a later run of its job commits.
    size_t max_tombstones = 4096;
    // How long a member refuses registrations of a job after the job's coordinator checked it
    // for a drop, unless the drop comes first (SnapshotStore::CheckDrop): longer than a drop
    // takes from its check to its push, short enough that a coordinator that died mid-drop
    // does not block the job for long.
    absl::Duration drop_fence = absl::Seconds(10);
    // Test only (TESSERA_TEST_HOLD_DROP_FILE): while this file exists, a drop this daemon
    // decides waits between its check and its decision, having created "<file>.held", so that a
    // test can act in that window deterministically.
    std::string test_hold_drop_file;
    // A shard is protected in a smaller code than RS(k, m) (too few live members, as
    // PlaceFragments shrinks it) only once the live members have not changed for this long;
    // until then its protection waits and retries. A view in flux is no reason to lower a
    // step's protection: members coming back from a partition one by one, or suspicions that a
    // rejoining member relayed and that are refuted a moment later, left steps committed with
    // one copy where RS(2, 2) was configured, and two losses then lost them (campaign trial
    // 32001002). Asked at each such protection: the daemon answers SWIM's suspicion timeout for
    // the members known then (it grows with them). Empty: no wait.
    std::function<absl::Duration()> degraded_settle;
    // Where each job's learned state (epoch, commit record, drop) is kept across restarts
    // (JobStateJournal; the daemon's store directory). Empty: nowhere (soft state only).
    std::string state_directory;
  };
  // None is owned; all must outlive this object.
  ClusterCoordination(SnapshotStore* store, FragmentStore* fragments, Cluster* cluster,
                      PeerClient* client, CoordinationClient* coordination_client,
                      Options options);
  ~ClusterCoordination() override;

  // Starts the protection worker, the reporter and the pusher, first queueing every sealed shard
  // held (after a restart they may not be protected). Stop() ends them (queued work is dropped);
  // idempotent.
  void Start();
  void Stop();
  // The set of live members may have changed: check for lost holders (and coordination that
  // moved) now rather than at the next report round. Cheap; call it from membership callbacks.
  void MembershipChanged();

  void OnSealed(const std::string& job_id, uint32_t rank, int64_t step,
                const SnapshotStore::SealResult& sealed) override;
  absl::StatusOr<int64_t> FindLatestRestorable(
      const std::string& job_id, uint32_t world_size_hint = 0,
      std::optional<uint32_t> resuming_rank = std::nullopt, uint64_t run_id = 0) override;
  absl::StatusOr<SnapshotStore::RestoreInfo> PrepareRestore(const std::string& job_id,
                                                            uint32_t rank, int64_t step,
                                                            bool verify) override;
  // Asks the job's coordinator (this daemon or another member) to drop the job on every member
  // (docs/PROTOCOL.md, Dropping a job). Errors: kFailedPrecondition (a trainer of the job runs on
  // some member, without force: nothing was dropped), kPermissionDenied (owner_uid set and the
  // job is another uid's on some member), kNotFound (no live member holds or knows anything of
  // it), kUnavailable (no majority, a member did not answer the check, or fewer than a majority
  // took the drop: ask again).
  absl::StatusOr<JobDrop> DropJob(const std::string& job_id, std::optional<uid_t> owner_uid,
                                  bool force) override;

  // CoordinationHandler (the Coordination service's calls).
  absl::StatusOr<JobState> OnReport(const NodeIdentity& from,
                                    const ProtectedReport& report) override;
  absl::Status OnPush(const NodeIdentity& from, const JobState& state) override;
  absl::StatusOr<ResolveAnswer> OnResolve(const NodeIdentity& from,
                                          const ResolveQuestion& question) override;
  absl::StatusOr<JobListing> OnListJob(const NodeIdentity& from,
                                       const std::string& job_id) override;
  absl::StatusOr<JobDrop> OnDropJob(const NodeIdentity& from,
                                    const DropQuestion& question) override;
  absl::StatusOr<NodeDrop> OnApplyDrop(const NodeIdentity& from, const JobState& state,
                                       DropStep step, std::optional<uint32_t> owner_uid) override;

  struct Stats {
    uint64_t protected_shards = 0;
    uint64_t protection_failures = 0;  // attempts that failed and were retried
    uint64_t protections_deferred = 0;  // re-adopted shards held back until the job's state came
    uint64_t commits = 0;              // decided here as coordinator
    uint64_t commits_learned = 0;      // newer commits learned as a node of a job
    uint64_t reports_sent = 0;
    uint64_t report_failures = 0;
    uint64_t pushes_failed = 0;
    uint64_t dead_steps = 0;           // found by this coordinator
    uint64_t fragments_dropped = 0;    // released by commits and dead steps
    uint64_t repairs = 0;              // committed shards protected again after a member died
    uint64_t rebuilt_shards = 0;
    uint64_t copied_shards = 0;
    uint64_t jobs_coordinated = 0;
    uint64_t job_states_kept = 0;     // written to the state directory (JobStateJournal)
    uint64_t job_state_failures = 0;  // writes that failed (the state stays soft)
  };
  Stats stats() const;

 private:
  struct Work {
    std::string job_id;
    uint32_t rank = 0;
    int64_t step = 0;
    int attempts = 0;
    int64_t not_before_ms = 0;
    bool repair = false;
    bool deferred = false;  // held back at least once until the job's state was learned
  };
  using ShardKey = std::tuple<std::string, uint32_t, int64_t>;  // (job, rank, step)
  // How long a live member that a fragment could not be sent to is passed over for a spare
  // (Protect): a link that is down stays down for a while; then it is tried first again.
  static constexpr absl::Duration kUnreachableFor = absl::Seconds(10);

  void Run();
  void ReportLoop();
  void PushLoop();
  // OK: protected (or superseded: nothing to do). An error: retry later.
  absl::Status Protect(const Work& work);
  // `work`'s shard has all its fragments on `holders` (none: no other member exists): marks it
  // protected and queues its report.
  void Protected(const Work& work, const SnapshotStore::PinnedShard& shard,
                 std::vector<std::string> holders);
  uint8_t* Scratch(size_t bytes);
  static int EncodeThreads();

  NodeIdentity Self() const;
  // Runs task(0) .. task(count - 1) on their own threads, at most `at_once` at a time (calls to
  // peers, each bounded by its RPC deadline); returns when all are done.
  static void InParallel(size_t count, size_t at_once, const std::function<void(size_t)>& task);
  static constexpr size_t kMaxConcurrentCalls = 16;
  // The job's coordinator's node id and address in this daemon's view.
  absl::StatusOr<std::pair<std::string, std::string>> CoordinatorOf(const std::string& job_id);
  // Sends the job's pending reports (or a state query) to its coordinator.
  void ReportJob(const std::string& job_id);
  // Adopts what a coordinator says: epoch, commit, dead steps, a drop. Releases slots and
  // fragments; returns what a drop it learned here for the first time deleted.
  NodeDrop ApplyJobState(const JobState& state);
  // The coordinator's side: JobCoordinator::Learn, logging a commit record it held that a restore
  // decision taken without it superseded.
  void LearnCommit(const std::string& job_id, const CommitRecord& record, uint64_t epoch,
                   uint64_t dropped_epoch = 0);
  // Decides the job's drop as its coordinator: checks every live member, records the drop and
  // tells every live member (docs/PROTOCOL.md, Dropping a job).
  absl::StatusOr<JobDrop> DropAsCoordinator(const DropQuestion& question);
  // Options::test_hold_drop_file: waits while `file` exists.
  void HoldDropForTest(const std::string& file);
  // OnApplyDrop on each of `nodes` (this daemon's own share locally), in parallel.
  std::vector<absl::StatusOr<NodeDrop>> ApplyDropOn(const std::vector<std::string>& nodes,
                                                    const JobState& state, DropStep step,
                                                    std::optional<uint32_t> owner_uid);
  // Past Options::max_tombstones drops remembered, forgets the oldest (logged); adds the jobs
  // forgotten to `forgotten`.
  void BoundTombstones(const std::string& keep, std::vector<std::string>* forgotten)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the job's state as known now (or removes its file if none is kept) before it is
  // acted on; a failure is logged and counted.
  void SaveJobState(const std::string& job_id) ABSL_LOCKS_EXCLUDED(mu_);
  // At start: the states kept by the previous run of the daemon, as known state; a drop among
  // them is applied to the re-adopted slots (the daemon may have stopped after keeping it and
  // before acting on it).
  void LoadJobStates();
  static void LogSuperseded(const std::string& job_id, const CommitRecord& held,
                            const CommitRecord& newer);
  // Queues `state` for the given nodes (this daemon's own share is applied at once).
  void PushTo(const std::vector<std::string>& nodes, const JobState& state);
  // Members that died since the last round: queue repairs of the committed shards they held.
  void RepairAfterLosses();
  // Whether a fragment could not be sent to `node` though it was live, less than kUnreachableFor
  // ago (Protect passes it over for a spare).
  bool Unreachable(const std::string& node) ABSL_LOCKS_EXCLUDED(mu_);
  void MarkUnreachable(const std::string& node) ABSL_LOCKS_EXCLUDED(mu_);
  void MarkReachable(const std::string& node) ABSL_LOCKS_EXCLUDED(mu_);

  // Answers a restore question as the job's coordinator (DecideRestorePoint), counting and
  // logging the questions it cannot decide yet.
  absl::StatusOr<ResolveAnswer> ResolveAsCoordinator(const ResolveQuestion& question);
  absl::StatusOr<ResolveAnswer> DecideRestorePoint(const ResolveQuestion& question);
  // kUnavailable while this coordinator decides a drop of the job (from before its check until
  // it has told the members): a member that restarted in that window holds no fence of its own,
  // and a restore answered from the commit the drop is voiding would resume the dropped run.
  absl::Status RefuseWhileDropping(const std::string& job_id) const;
  // kUnavailable unless this daemon's membership has converged and a majority of the members is
  // live here (docs/PROTOCOL.md, Restore 2).
  absl::Status RequireMajority() const;
  JobListing LocalListing(const std::string& job_id) const;
  // What the given nodes (all live members when empty) hold of the job. With require_complete,
  // kUnavailable names a live node that did not answer; otherwise such a node is passed over.
  // `not_live`, when set, gets the given nodes that are not live (not asked).
  absl::StatusOr<std::vector<JobListing>> ListNodes(const std::string& job_id,
                                                    std::vector<std::string> nodes,
                                                    bool require_complete,
                                                    std::set<std::string>* not_live = nullptr);
  // Before a restore is answered, every live node in `nodes` learns the job's epoch and commit
  // (docs/PROTOCOL.md, Restore): kUnavailable names those that did not take it.
  absl::Status TellJobNodes(const std::string& job_id, const std::set<std::string>& nodes,
                            uint64_t epoch, const CommitRecord& point);
  // A coordinator acts on a job's reports only once it has learned the job's epoch and commit
  // from a complete view of the live members (after it starts, or the membership changes).
  absl::Status EnsureCoordinatorView(const std::string& job_id, uint64_t reported_epoch);
  // skip_local_shard: this daemon's own shard of (rank, step) is damaged or of another history.
  absl::StatusOr<SnapshotStore::RestoreInfo> MakeLocal(const std::string& job_id, uint32_t rank,
                                                       int64_t step,
                                                       std::optional<uint32_t> expected_crc,
                                                       bool skip_local_shard);
  void DeleteRestoredOlderThan(const std::string& job_id, int64_t step);

  FragmentStore* const fragments_;
  Cluster* const cluster_;
  PeerClient* const client_;
  CoordinationClient* const coordination_client_;
  const Options options_;
  JobCoordinator coordinator_;

  mutable absl::Mutex mu_;
  std::deque<Work> queue_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Protected shards not yet known committed, dead or void, by job: re-reported until they are.
  std::map<std::string, std::map<std::pair<uint32_t, int64_t>, ProtectedReport>> pending_
      ABSL_GUARDED_BY(mu_);
  bool report_now_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time members_changed_ ABSL_GUARDED_BY(mu_) = absl::Now();  // MembershipChanged
  // Where the fragments of each shard protected here went (for repairs after a loss).
  std::map<ShardKey, std::vector<std::string>> placements_ ABSL_GUARDED_BY(mu_);
  // Members a fragment could not be sent to though they were live, and until when Protect passes
  // them over for spares.
  std::map<std::string, absl::Time> unreachable_until_ ABSL_GUARDED_BY(mu_);
  // Newest state learned per job (commit records answer restores and listings).
  std::map<std::string, JobState> known_ ABSL_GUARDED_BY(mu_);
  // What the newest drop learned here deleted, by job, with its epoch: the coordinator's push of
  // a drop is answered with it even when a report's reply brought the drop here first.
  std::map<std::string, std::pair<uint64_t, NodeDrop>> drop_results_ ABSL_GUARDED_BY(mu_);
  const JobStateJournal journal_;
  absl::Mutex journal_mu_ ABSL_ACQUIRED_BEFORE(mu_);    // one job state written at a time
  absl::Mutex drop_mu_ ABSL_ACQUIRED_BEFORE(view_mu_);  // one drop decided at a time
  // Jobs whose drop this coordinator is deciding (RefuseWhileDropping).
  std::set<std::string> dropping_ ABSL_GUARDED_BY(mu_);
  absl::Mutex view_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // held while a coordinator gathers a view
  // Jobs whose complete view this coordinator has gathered since the membership last changed.
  std::set<std::string> view_complete_ ABSL_GUARDED_BY(mu_);
  // (epoch, committed step) every node of the job was last told before a restore answer.
  std::map<std::string, std::pair<uint64_t, int64_t>> told_ ABSL_GUARDED_BY(mu_);
  // The restore point each job resolved here (PrepareRestore checks against its CRCs).
  std::map<std::string, CommitRecord> restore_points_ ABSL_GUARDED_BY(mu_);
  int64_t deferred_logged_ms_ ABSL_GUARDED_BY(mu_) = 0;  // last "not decided yet" log line
  std::deque<std::pair<std::string, JobState>> pushes_ ABSL_GUARDED_BY(mu_);  // (node, state)
  std::set<std::string> live_last_round_;  // reporter thread only
  std::thread worker_;
  std::thread reporter_;
  std::thread pusher_;
  std::unique_ptr<uint8_t[]> scratch_;  // worker thread only
  size_t scratch_bytes_ = 0;

  absl::Mutex restore_mu_;  // one restore at a time; guards restored_
  std::map<ShardKey, std::pair<std::unique_ptr<Segment>, SnapshotStore::RestoreInfo>> restored_
      ABSL_GUARDED_BY(restore_mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_PROTECTION_PIPELINE_H_
