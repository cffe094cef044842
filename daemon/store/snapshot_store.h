// SnapshotStore: the daemon's shared-memory arena of snapshot slots, transport-free.
//
// Every (job, rank) gets two slot segments (double buffering): one holds the newest sealed step,
// the other receives the next snapshot. Slots live as files in one directory
// (`<store.directory>/<node.id>`), are preallocated and pre-faulted when the rank registers, and
// are owned by the trainer's uid so it can map them. The store validates every request before it
// touches a byte, so bad input never changes stored data.
//
// Thread-safety: all methods may be called concurrently. Calls for different ranks run in
// parallel; calls for one rank are serialised (a seal's checksum holds only that rank's lock).
#ifndef TESSERA_DAEMON_STORE_SNAPSHOT_STORE_H_
#define TESSERA_DAEMON_STORE_SNAPSHOT_STORE_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/segment.h"
#include "proto/manifest.pb.h"

namespace tessera {

// Who is calling, from SO_PEERCRED.
struct Caller {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};

// Where each entry goes in a slot's payload. Computed once per registration.
struct SlotLayout {
  std::vector<uint64_t> entry_offsets;
  uint64_t data_bytes = 0;        // end of the last entry
  uint64_t manifest_offset = 0;   // 4 KiB aligned, after the data
  uint64_t manifest_capacity = 0;
  uint64_t capacity_bytes = 0;    // payload capacity of each slot
  uint64_t hash = 0;              // identifies the registered entries
};

// Validates `entries` (names, dtypes, shapes, sizes) and computes their layout.
// kInvalidArgument names the first bad entry and what would be valid.
absl::StatusOr<SlotLayout> ComputeSlotLayout(const std::vector<EntrySpec>& entries);

// Bytes per element of a dtype name ("float32" -> 4), or kInvalidArgument listing the known ones.
absl::StatusOr<uint64_t> DtypeItemBytes(const std::string& dtype);

// Checks a job id: 1..128 bytes of [A-Za-z0-9._-], not starting with '.'.
absl::Status ValidateJobId(const std::string& job_id);
// kInvalidArgument unless 1 <= world_size <= 2^20 and rank < world_size: every request that
// names them is checked, so that none makes the daemon do work for an absurd world.
absl::Status ValidateRankAndWorldSize(uint32_t rank, uint32_t world_size);

class SnapshotStore {
 public:
  struct Options {
    std::string directory;        // created if missing
    uint64_t capacity_bytes = 0;  // total bytes of all segments; required > 0
    bool prefault = true;
    int crc_threads = 4;
    // store.seal_checksum = "daemon": recompute every payload CRC32C at seal and refuse one that
    // is not what the agent computed while copying.
    bool verify_client_checksums = false;
    // Whether the process that registered a rank still runs. Defaults to a /proc check of the
    // pid and its start time (so a reused pid is not mistaken for the old trainer).
    std::function<bool(pid_t pid, uint64_t start_ticks)> process_alive;
    // Commits are decided by the job's coordinator in a cluster (docs/PROTOCOL.md) and learned
    // through SetJobState: a sealed step is kept until it is protected (MarkProtected) or
    // released by a commit, a new epoch or a dead step; after a restart, every re-adopted sealed
    // slot is kept until the job's state is learned.
    bool clustered = false;
    // Called before each slot segment is created, with no lock held (tests stall it there).
    std::function<void(const std::string& job_id, uint32_t rank)> before_slot_created;
  };

  struct RegisterResult {
    std::vector<std::string> slot_paths;
    uint64_t segment_bytes = 0;
    SlotLayout layout;
    int64_t newest_sealed_step = -1;
  };

  struct SealResult {
    uint32_t payload_crc32c = 0;
    uint64_t payload_bytes = 0;
    uint32_t world_size = 0;
    uint64_t epoch = 0;
    // The rank's previous seal in this epoch: -1 none, -2 unknown (the daemon restarted since).
    int64_t previous_step = -2;
  };

  struct VersionInfo {
    std::string job_id;
    uint32_t rank = 0;
    int64_t step = -1;
    uint64_t payload_bytes = 0;
    uint32_t payload_crc32c = 0;
    SegmentState state = SegmentState::kEmpty;
    uint64_t epoch = 0;
    bool is_protected = false;  // clustered: its fragments are all stored
    uint32_t world_size = 0;
    int64_t previous_step = -2;  // as in SealResult
  };

  struct RestoreInfo {
    int64_t step = -1;
    std::string segment_path;
    uint64_t payload_bytes = 0;
    uint64_t manifest_offset = 0;
    uint64_t manifest_bytes = 0;
    uint32_t payload_crc32c = 0;
    bool verified = true;  // the payload was checked against payload_crc32c
  };

  struct Stats {
    uint64_t capacity_bytes = 0;
    uint64_t used_bytes = 0;
    uint64_t segments = 0;
    uint64_t seals = 0;
    uint64_t sealed_bytes = 0;
    uint64_t crc_failures = 0;
    uint64_t adopted_at_start = 0;
    uint64_t discarded_at_start = 0;
    uint64_t reclaimed_bytes = 0;  // slots of ranks nobody would write (ReclaimAbandoned)
  };

  // Opens (creating if needed) the directory, re-adopts every SEALED slot whose header and
  // payload CRC verify (the newest per rank), and deletes the other slot files.
  static absl::StatusOr<std::unique_ptr<SnapshotStore>> Open(Options options);

  ~SnapshotStore();

  // Creates or re-attaches the rank's two slots, owned by caller.uid. Idempotent for the same
  // caller and entries. Errors: kInvalidArgument (bad request), kFailedPrecondition (another live
  // process holds the rank), kPermissionDenied (the rank's snapshots belong to another uid),
  // kResourceExhausted (capacity: the message has bytes asked and free), kUnavailable (the job
  // is being dropped: see CheckDrop; register again once the drop has finished).
  absl::StatusOr<RegisterResult> Register(const std::string& job_id, uint32_t rank,
                                          uint32_t world_size,
                                          const std::vector<EntrySpec>& entries,
                                          const Caller& caller);

  // Claims the slot that holds neither the restore point (the newest committed step, or without
  // commits the newest sealed step) and marks it WRITING `step`. Returns its index. Idempotent
  // for the step being written. kUnavailable when that slot is still being protected (the
  // snapshot is skipped or retried by the agent; protection never blocks training).
  // With replace_uncommitted false, a slot holding a sealed step newer than the job's commit is
  // not reused either: kUnavailable until that step is committed, unless another rank of the job
  // already sealed a newer step (then that step can never be committed: some rank skipped it), or
  // the job's commits are not decided here (not HoldsWholeJob and no cluster commit seen).
  absl::StatusOr<uint32_t> BeginSnapshot(const std::string& job_id, uint32_t rank, int64_t step,
                                         const Caller& caller, bool replace_uncommitted = true);

  // Validates the manifest the agent wrote into the WRITING slot against the registration,
  // checksums the payload and publishes the slot as SEALED; then releases older steps.
  // Idempotent for a sealed step. A bad manifest leaves the slot unsealed and older data intact.
  // `client_crc` is the payload CRC32C the agent computed while copying: taken as the payload's
  // (no second pass over it) unless Options::verify_client_checksums, which checks it and
  // refuses a mismatch with kDataLoss, leaving the slot unsealed. Without it the store computes
  // the CRC.
  absl::StatusOr<SealResult> SealSnapshot(const std::string& job_id, uint32_t rank, int64_t step,
                                          uint64_t manifest_bytes, const Caller& caller,
                                          std::optional<uint32_t> client_crc = std::nullopt);

  // Deletes the slots of ranks (other than `except`) that hold no snapshot, not even one being
  // written, and that nobody will write: released, or registered by a process that has exited.
  // Their trainers would register again to snapshot. Logged per rank; returns the bytes freed.
  uint64_t ReclaimAbandoned(const std::string& except_job, uint32_t except_rank);

  // Records that the process registered as (job, rank) was told to resume from `step`
  // (RankInfo::resume_step, until the rank is registered again). No-op for an unknown rank.
  void NoteResume(const std::string& job_id, uint32_t rank, int64_t step);

  // Whether `caller` may read or roll back `job_id` here: root may; another uid only when it
  // registered a rank of the job on this daemon or a rank here holds snapshots of its uid, and no
  // rank of it here holds another uid's snapshots or registration (a job belongs to the uid that
  // registered it). kPermissionDenied names the uids; kFailedPrecondition when no rank of the
  // job here is the caller's.
  absl::Status CheckJobAccess(const std::string& job_id, const Caller& caller) const;

  // Sealed and in-flight snapshots of a job (all jobs when job_id is empty), by rank then step.
  std::vector<VersionInfo> ListVersions(const std::string& job_id) const;

  // Verifies (job, rank, step) against its payload CRC and says where to read it.
  // step -1 means the newest sealed step. kNotFound lists the steps held; kDataLoss on mismatch.
  // With `verify` false the payload is not read (RestoreInfo::verified false): the caller
  // checks it as it copies it.
  absl::StatusOr<RestoreInfo> PrepareRestore(const std::string& job_id, uint32_t rank,
                                             int64_t step, bool verify = true);

  // A sealed slot's payload, pinned so that no snapshot overwrites it while protection reads it.
  struct PinnedShard {
    const uint8_t* payload = nullptr;
    uint64_t payload_bytes = 0;
    uint32_t payload_crc32c = 0;
    uint32_t world_size = 0;
    uint64_t manifest_offset = 0;
    uint64_t manifest_bytes = 0;
    int64_t sealed_unix_ms = 0;
    uint64_t epoch = 0;
    int64_t previous_step = -2;  // SealResult::previous_step
  };
  // Pins sealed (job, rank, step). REQUIRES: a matching Unpin. kNotFound if not sealed here.
  absl::StatusOr<PinnedShard> Pin(const std::string& job_id, uint32_t rank, int64_t step);
  void Unpin(const std::string& job_id, uint32_t rank, int64_t step);

  // `step` of the job is protected on every rank: it is kept as the restore point, and every
  // older sealed step of the job's ranks here is released. Idempotent; older commits are ignored.
  void Commit(const std::string& job_id, int64_t step);
  // The job's commit goes back to `step`: the newer commit held here was made on the far side of
  // a partition and a restore decided without it resumed from `step` (docs/PROTOCOL.md,
  // Restore 3). Its slots become void with the newer epoch; nothing is released here.
  void SupersedeCommit(const std::string& job_id, int64_t step);
  // Rank `rank` of the job resumes from `step`: its sealed steps after it are released. Other
  // ranks are never touched (docs/PROTOCOL.md, Restore).
  void RollbackRank(const std::string& job_id, uint32_t rank, int64_t step);
  // Clustered: what the job's coordinator says (docs/PROTOCOL.md). The epoch new snapshots are
  // sealed in, the committed step (older sealed steps are released, as by Commit), and steps
  // of that epoch that can never commit. Only grows: an older epoch or commit is ignored.
  void SetJobState(const std::string& job_id, uint64_t epoch, int64_t committed_step,
                   const std::vector<int64_t>& dead_steps);
  // Clustered, at start: the epoch this daemon had learned before it restarted (kept in its job
  // state file), which may be newer than every re-adopted slot's. New snapshots are sealed in it;
  // the commit stays unknown until the coordinator says it. Only grows.
  void RaiseEpoch(const std::string& job_id, uint64_t epoch);
  // The job's epoch here (0 before any is learned).
  uint64_t epoch(const std::string& job_id) const;
  // Whether this store has learned the job's commit state since it started (clustered), so
  // that a sealed slot which is not the commit may be reused.
  bool CommitKnown(const std::string& job_id) const;
  // Clustered: the sealed (job, rank, step) has all its fragments stored. No-op if not held.
  void MarkProtected(const std::string& job_id, uint32_t rank, int64_t step);
  // The newest committed step of the job known here, -1 if none.
  int64_t committed(const std::string& job_id) const;

  // Drops caller's claim on the rank. With drop_snapshots, deletes the rank's segments too; once
  // no rank of the job is left here, an unclustered store also forgets the job (as DropJob).
  absl::Status Unregister(const std::string& job_id, uint32_t rank, bool drop_snapshots,
                          const Caller& caller);

  // What DropJob deleted.
  struct DropJobResult {
    std::vector<uint32_t> ranks;      // the job's ranks that were known here, in order
    uint32_t segments_deleted = 0;    // slot segment files (a retained older layout's included)
    uint64_t bytes_deleted = 0;       // their file sizes
    int64_t newest_sealed_step = -1;  // the newest step that was sealed here, -1: none
    // Ranks that were registered by a process still running (dropped only with `force`), and
    // those processes.
    std::vector<uint32_t> running_ranks;
    std::vector<pid_t> running_pids;
  };
  // Deletes every snapshot of `job_id` held here (the slot segments of all its ranks) and forgets
  // the job (its commit and world size), so that a trainer registering it later starts afresh
  // instead of resuming a run that has ended. The ranks are checked and deleted under their locks
  // all at once: either every rank is dropped or none is.
  //   owner_uid: when set, the job must belong to that uid (every rank of it here registered by
  //              it, or holding its snapshots); unset: any job (root, the daemon's own uid).
  //   force:     drop it even while a rank is registered by a process that still runs: what
  //              is held now is deleted; that trainer's next BeginSnapshot gets kNotFound (its
  //              rank is no longer registered), on which the agent registers again and goes on
  //              snapshotting into new slots.
  // Errors: kInvalidArgument (job id), kNotFound (no rank of the job known here; the message
  // lists the jobs that are), kPermissionDenied (another uid's job; names both uids),
  // kFailedPrecondition (a running trainer without `force`, naming its rank and pid; or a
  // clustered store, where a job is dropped by its coordinator through CheckDrop and ApplyDrop).
  // Nothing is deleted on an error.
  absl::StatusOr<DropJobResult> DropJob(const std::string& job_id, std::optional<uid_t> owner_uid,
                                        bool force);
  // Clustered, before the job's coordinator drops it: what DropJob would find here, changing
  // nothing held. `ranks`, `segments_deleted`, `bytes_deleted` and `newest_sealed_step` describe
  // what is held; `running_ranks` and `running_pids` the trainers registered and running.
  // From the check on, Register refuses the job (kUnavailable) until LiftDropFence, a newer
  // ApplyDrop, or `fence` has passed (a coordinator that died mid-drop blocks nothing for
  // longer): a trainer registering between the check and the drop would otherwise seal into
  // the dropped epoch, silently void. The fence is set before the ranks are looked at, so a
  // registration is either seen by the check or refused. Errors (nothing fenced then):
  // kPermissionDenied as DropJob's when `owner_uid` is set and a rank here is another uid's.
  absl::StatusOr<DropJobResult> CheckDrop(const std::string& job_id,
                                          std::optional<uid_t> owner_uid, absl::Duration fence);
  // The job's drop was applied (or its check abandoned): Register accepts the job again.
  void LiftDropFence(const std::string& job_id);
  // Clustered: the job's coordinator dropped it at `dropped_epoch` (docs/PROTOCOL.md, Dropping a
  // job): every slot sealed in an epoch up to it is void. Deletes those segments (a slot being
  // protected is emptied instead, and reclaimed later); a rank left with nothing of a later epoch
  // is forgotten, as DropJob forgets it (a trainer that still runs registers again). The job's
  // epoch here becomes at least `dropped_epoch`, its commit is forgotten unless `keep_commit`
  // (a commit of a later run was learned with the drop), and a slot sealed later in an epoch up
  // to `dropped_epoch` is free for reuse. Idempotent; an older drop changes nothing.
  DropJobResult ApplyDrop(const std::string& job_id, uint64_t dropped_epoch);
  // A new run of the dropped job's `rank` starts here: its slots sealed in an epoch up to the
  // drop (a trainer that ran on through a forced drop sealed them) are released, so that the
  // run's steps start over. No-op without a drop.
  void ReleaseDroppedSlots(const std::string& job_id, uint32_t rank);
  // The epoch the job was last dropped at here (0: none, or forgotten by ForgetDrop).
  uint64_t dropped_epoch(const std::string& job_id) const;
  // Forgets the job's drop (its tombstone was garbage-collected: a later run committed, or the
  // bound on tombstones was reached).
  void ForgetDrop(const std::string& job_id);

  // How many ranks of the job this store knows (registered or holding snapshots).
  size_t RankCount(const std::string& job_id) const;
  // Whether every rank of the job (its world size) is known here, so this store alone can decide
  // the job's commits. Ranks spread over daemons that are not one cluster cannot be committed.
  bool HoldsWholeJob(const std::string& job_id) const;

  // A rank known here, with the trainer that registered it (status and drills).
  struct RankInfo {
    std::string job_id;
    uint32_t rank = 0;
    uint32_t world_size = 0;
    Caller owner;             // the registering process (SO_PEERCRED); pid 0: never registered
    bool registered = false;  // not unregistered since
    bool alive = false;       // that process (pid and start time) still runs
    int64_t newest_sealed_step = -1;
    uid_t data_uid = 0;       // whose snapshots the rank's slots hold
    // The step the registering process was told to resume from (FindLatestRestorable with
    // resume), -1: it has not asked.
    int64_t resume_step = -1;
  };
  // Ranks of a job (all jobs when job_id is empty), by job then rank.
  std::vector<RankInfo> ListRanks(const std::string& job_id) const;

  // Where the sealed (job, rank, step) lives (-1: the newest sealed step), for recovery drills
  // that damage it on purpose. kNotFound lists the steps held.
  struct SealedSlot {
    std::string path;
    int64_t step = -1;
    uint64_t payload_bytes = 0;
  };
  absl::StatusOr<SealedSlot> FindSealedSlot(const std::string& job_id, uint32_t rank,
                                            int64_t step) const;
  // Recovery drills: flips (XOR 0xFF) byte `offset` of the sealed payload of (job, rank, step)
  // through the store's own mapping, as a bit flip in memory would, leaving the header as it is.
  // Returns the byte as it was. kNotFound when not sealed here; kInvalidArgument for an offset
  // past the payload.
  absl::StatusOr<uint8_t> FlipPayloadByte(const std::string& job_id, uint32_t rank, int64_t step,
                                          uint64_t offset);

  // Rewrites the payload of the sealed (job, rank, step) here with `payload`, a copy rebuilt
  // from redundancy, when the held payload no longer matches its CRC32C. The new bytes must have
  // the sealed length and CRC32C. Returns true when it rewrote, false when the held payload was
  // intact (nothing changed). kNotFound when not sealed here; kInvalidArgument when `payload`
  // is not that shard.
  absl::StatusOr<bool> RepairSealed(const std::string& job_id, uint32_t rank, int64_t step,
                                    const uint8_t* payload, uint64_t payload_bytes);

  Stats stats() const;
  const std::string& directory() const { return options_.directory; }
  bool clustered() const { return options_.clustered; }

 private:
  struct Slot {
    std::unique_ptr<Segment> segment;
  };
  struct RankState {
    absl::Mutex mu;
    bool registered ABSL_GUARDED_BY(mu) = false;
    Caller owner ABSL_GUARDED_BY(mu);
    uint64_t owner_start_ticks ABSL_GUARDED_BY(mu) = 0;
    int64_t resume_step ABSL_GUARDED_BY(mu) = -1;  // RankInfo::resume_step
    uid_t data_uid ABSL_GUARDED_BY(mu) = 0;
    uint32_t world_size ABSL_GUARDED_BY(mu) = 0;
    std::vector<EntrySpec> entries ABSL_GUARDED_BY(mu);
    SlotLayout layout ABSL_GUARDED_BY(mu);
    std::unique_ptr<Segment> slots[2] ABSL_GUARDED_BY(mu);
    int pins[2] ABSL_GUARDED_BY(mu) = {0, 0};  // protection reading the slot
    bool is_protected[2] ABSL_GUARDED_BY(mu) = {false, false};
    int64_t previous_step[2] ABSL_GUARDED_BY(mu) = {-2, -2};  // SealResult::previous_step
    // The rank's newest seal since this daemon started, and its epoch (-2: none seen).
    int64_t last_seal_step ABSL_GUARDED_BY(mu) = -2;
    uint64_t last_seal_epoch ABSL_GUARDED_BY(mu) = 0;
    bool adopted ABSL_GUARDED_BY(mu) = false;  // re-adopted at start: its history is unknown
    // Sealed segments of an earlier layout, kept until the new layout seals a step.
    std::vector<std::unique_ptr<Segment>> retained ABSL_GUARDED_BY(mu);
    // A Register is creating (and pre-faulting) this rank's slots with mu released, so that
    // listings and other callers are not held for the seconds a large slot takes; another
    // Register of the rank waits for it.
    bool creating_slots ABSL_GUARDED_BY(mu) = false;
    // Erased from ranks_ (DropJob, Unregister with drop_snapshots): a caller that found it
    // before must not register into it.
    bool dropped ABSL_GUARDED_BY(mu) = false;
  };
  using RankKey = std::pair<std::string, uint32_t>;

  explicit SnapshotStore(Options options) : options_(std::move(options)) {}
  absl::Status AdoptExisting();
  std::shared_ptr<RankState> FindRank(const std::string& job_id, uint32_t rank) const;
  std::shared_ptr<RankState> FindOrCreateRank(const std::string& job_id, uint32_t rank);
  absl::Status CheckOwner(const RankState& state, const std::string& job_id, uint32_t rank,
                          const Caller& caller) const ABSL_SHARED_LOCKS_REQUIRED(state.mu);
  absl::StatusOr<std::unique_ptr<Segment>> CreateSlot(const std::string& job_id, uint32_t rank,
                                                      uint64_t capacity, const Caller& caller);
  void DeleteSegment(std::unique_ptr<Segment> segment);
  absl::Status ValidateManifest(const ShardManifest& manifest, const RankState& state,
                                const std::string& job_id, uint32_t rank, int64_t step) const
      ABSL_SHARED_LOCKS_REQUIRED(state.mu);

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<RankKey, std::shared_ptr<RankState>> ranks_ ABSL_GUARDED_BY(mu_);
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t segments_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  Stats counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> committed_ ABSL_GUARDED_BY(mu_);  // by job
  std::map<std::string, int64_t> newest_sealed_ ABSL_GUARDED_BY(mu_);  // by job, any rank
  std::map<std::string, uint32_t> world_size_ ABSL_GUARDED_BY(mu_);     // by job
  // Clustered: what the coordinator said of each job (SetJobState).
  struct JobView {
    uint64_t epoch = 0;
    bool commit_known = true;  // false for jobs re-adopted at start until SetJobState
    std::set<int64_t> dead_steps;
    uint64_t dropped_epoch = 0;  // ApplyDrop: slots of epochs up to it are void
  };
  std::map<std::string, JobView> jobs_ ABSL_GUARDED_BY(mu_);
  // Jobs whose drop a coordinator is deciding (CheckDrop), with when the fence lapses; at most
  // kMaxDropFences.
  static constexpr size_t kMaxDropFences = 4096;
  std::map<std::string, absl::Time> drop_fences_ ABSL_GUARDED_BY(mu_);
  // kUnavailable while `job_id`'s drop fence stands.
  absl::Status CheckDropFenceLocked(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks slot `index` WRITING `step` of (job, rank) in `epoch`.
  void ClaimSlot(RankState* state, int index, const std::string& job_id, uint32_t rank,
                 int64_t step, uint64_t epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(state->mu);
  // Why sealed slot `i` of `state` may not be reused now ("" when it may). Clustered only.
  std::string SlotBusyReason(const RankState& state, int i, const std::string& job_id,
                             bool replace_uncommitted) const ABSL_SHARED_LOCKS_REQUIRED(state.mu);
  bool HoldsWholeJobLocked(const std::string& job_id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // kPermissionDenied when `owner_uid` is set and the rank is another uid's (DropJob's rule).
  static absl::Status CheckDropOwner(const RankState& state, const std::string& job_id,
                                     uint32_t rank, std::optional<uid_t> owner_uid)
      ABSL_SHARED_LOCKS_REQUIRED(state.mu);
  // Forgets what the store knows of a job beyond its ranks (commit, newest seal, world size, the
  // coordinator's view) once no rank of it is left.
  void ForgetJobIfGoneLocked(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
};

// The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or 0 when the
// process does not exist.
uint64_t ProcessStartTicks(pid_t pid);

}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_SNAPSHOT_STORE_H_
