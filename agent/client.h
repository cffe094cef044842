// The trainer-side client: registers a rank's tensors and blobs with the local tesserad, takes
// snapshots into the daemon's shared memory without blocking the training loop, and restores.
//
//   auto client = Client::Connect({.socket_path = "/run/tessera/agent.sock"});
//   client->Register("job", rank, world, {{spec, ptr}, ...});
//   if (auto step = client->Restore(); step.ok()) resume_from(*step + 1);
//   loop: forward; backward; client->Fence(stream); optimizer.step();
//         if (step % 10 == 0) client->Snapshot(step, stream);
//
// Snapshot() records the snapshot point and hands the copies to the client's own thread, which
// claims a slot, copies every entry (device-to-host on a GPU copy stream, memcpy for host memory),
// writes the manifest and asks the daemon to seal. Fence() must be called before anything
// overwrites registered memory (the optimizer step): on a GPU it is a stream-side wait.
//
// Thread-safety: one training thread calls Snapshot/Fence/Wait/Restore/UpdateEntry; the client's
// thread does the rest. stats() may be called from any thread.
#ifndef TESSERA_AGENT_CLIENT_H_
#define TESSERA_AGENT_CLIENT_H_

#include <condition_variable>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dp_slices.h"
#include "common/segment.h"
#include "cuda/copy_engine.h"
#include "proto/agent.grpc.pb.h"
#include "proto/manifest.pb.h"

namespace tessera {

class Client {
 public:
  // What Snapshot() does when the previous snapshot is still being copied or sealed.
  enum class BusyPolicy { kSkip, kWait };

  struct Options {
    std::string socket_path = "/run/tessera/agent.sock";
    BusyPolicy when_busy = BusyPolicy::kSkip;
    bool use_gpu = true;       // false: host copies only, even where a GPU exists
    int device = -1;           // CUDA device; -1: the current one
    int64_t rpc_timeout_ms = 120000;
    // GPU staging of device-to-host copies that would not fit before the next Fence
    // (cuda/staging_plan.h). Adaptive stages only what the measured window needs.
    cuda::StagingOptions staging = {cuda::StagingMode::kAdaptive, 0, 0.5};
    // DP-sharded restore (SetDataParallel): how long Restore waits for the other members of
    // the group, and whether the replicated bytes may be gathered over NCCL (GPU memory, NCCL
    // loadable on every member); otherwise each member reads the others' slices through the
    // daemon.
    int64_t dp_restore_timeout_ms = 300000;
    bool nccl = true;
    // How long Restore(-1) keeps asking while the cluster cannot answer yet (UNAVAILABLE: the
    // job's coordinator has not heard every node of the job, e.g. replacement daemons starting).
    int64_t restore_resolve_timeout_ms = 120000;
    // Threads that checksum a snapshot's bytes as they land in shared memory (so that the seal
    // does not read them again), and that verify a restore's blocks ahead of their copies.
    int checksum_threads = 4;
    // A snapshot's device-to-host bytes are checksummed by a GPU kernel beside the copies
    // (cuda::CopyEngineOptions::checksum_on_device); false: by the threads above as they land.
    bool checksum_on_device = true;
    // Tests only: called after a snapshot's bytes are checksummed and before it is sealed, with
    // the slot's payload (a test changes a byte there, as a stray write would).
    std::function<void(uint8_t* payload, uint64_t bytes)> after_checksums_for_testing;
  };

  // How long the NCCL gather of a DP-sharded restore may take before the member gives up on it
  // and reads the slices through the daemon: NCCL's setup (30 s) plus the bytes broadcast at
  // 1 GB/s, at most the restore's own timeout. The members all met in the rendezvous just
  // before, so only a member that died since makes it run out; the others then fall back within
  // this bound instead of waiting out the whole restore timeout.
  static absl::Duration NcclGatherTimeout(uint64_t bytes, int64_t dp_restore_timeout_ms);

  // A data-parallel group (see common/dp_slices.h): every member holds the same `replicated`
  // tensors, so each stores only its slice of their bytes, plus all of its other entries.
  struct DataParallel {
    std::vector<uint32_t> members;  // the job ranks of the group in DP-rank order; has this rank
    std::vector<bool> replicated;   // per registered entry, in registration order
  };

  // One registered tensor or blob. `data` is host or device memory the caller owns; it must stay
  // valid until Close() or the next Register(). For a blob, spec.nbytes is its capacity and
  // `length` the bytes currently valid (updated by UpdateEntry and by Restore).
  struct Entry {
    EntrySpec spec;
    void* data = nullptr;
    uint64_t length = 0;  // 0 for a tensor means spec.nbytes
  };

  enum class SnapshotOutcome { kStarted, kSkipped };

  struct Stats {
    uint64_t started = 0;
    uint64_t skipped = 0;       // snapshots skipped: the previous was in flight, the slot was
                                // still being protected, or the daemon was unavailable
    uint64_t busy_waits = 0;    // Snapshot() calls that waited for the previous (kWait)
    uint64_t busy_wait_ns = 0;
    uint64_t sealed = 0;
    uint64_t failed = 0;
    uint64_t bytes_copied = 0;
    int64_t last_sealed_step = -1;
    // Where the last sealed snapshot's time went, in nanoseconds: from Snapshot() until the
    // daemon handed out a slot (the worker's wake-up and BeginSnapshot), the copies with their
    // checksums (issue to the last checksum), and the manifest, the payload CRC32C and
    // SealSnapshot.
    int64_t last_begin_ns = 0;
    int64_t last_copy_ns = 0;
    int64_t last_seal_ns = 0;
    // Where the last Restore()'s time went, in nanoseconds: finding the step and opening its
    // payload (FindLatestRestorable, PrepareRestore, the manifest), and the copies with their
    // checks.
    int64_t last_restore_open_ns = 0;
    int64_t last_restore_copy_ns = 0;
    std::string last_error;
    std::string engine;         // the copy engine's description
    // The last DP-sharded restore: the members' slices gathered, and how.
    uint32_t dp_size = 0;       // 0: not DP-sharded
    uint64_t bytes_gathered = 0;
    bool gathered_with_nccl = false;
    std::string gather_note;    // why the daemon path was taken, when it was
    // The copy engine's counters: staging, its plan and the measurements behind it.
    cuda::CopyEngineStats copies;
  };

  // Connects to the daemon's agent socket (checked with a ListVersions round trip).
  // kUnavailable names the socket when no daemon answers.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const Options& options);

  // Waits for an in-flight snapshot, then releases the rank (keeping its snapshots).
  ~Client();

  // Registers the rank's state and maps its two slots (pinned for DMA on a GPU). May be called
  // again, with new entries, after Wait(). Errors come from the daemon with its message.
  absl::Status Register(const std::string& job_id, uint32_t rank, uint32_t world_size,
                        std::vector<Entry> entries);

  // Makes the snapshots DP-sharded from the next Register on (which validates it against the
  // entries): each member of the group copies a disjoint, balanced slice of the replicated
  // tensors' bytes. Restore then needs every member's shard of the step: all members call
  // Restore together, restore their own slice and gather the others' (over NCCL on GPUs).
  // An empty `members` turns sharding off again.
  absl::Status SetDataParallel(DataParallel dp);

  // Changes the GPU staging of the snapshots started from now on (validated; see StagingOptions).
  absl::Status SetStaging(const cuda::StagingOptions& staging);

  // Points entry `index` at new memory and/or sets a blob's valid length (<= its capacity).
  absl::Status UpdateEntry(size_t index, void* data, uint64_t length);

  // Starts a snapshot of `step`: records the snapshot point on `stream` (a cudaStream_t, nullptr
  // for the default stream) and returns at once. If the previous snapshot is in flight, skips
  // (kSkipped, counted and logged) or waits, as configured. Errors of the asynchronous part
  // show in Wait(), stats() and the log.
  absl::StatusOr<SnapshotOutcome> Snapshot(int64_t step, void* stream = nullptr);

  // Orders `stream` after the copies of every started snapshot (GPU-side on a GPU; on host
  // memory it waits for the copies). Call before overwriting registered memory.
  absl::Status Fence(void* stream = nullptr);

  // Waits until the last started snapshot is sealed, skipped or failed; returns its outcome
  // (kUnavailable when the daemon skipped it).
  absl::Status Wait();

  // Restores `step` into the registered memory and returns the step. -1: the newest step that
  // every rank of the job can restore (FindLatestRestorable), so that all ranks resume together.
  // The snapshot's manifest must match the registration exactly; otherwise kFailedPrecondition
  // lists the differences and nothing is written. kNotFound when the daemon holds no snapshot.
  absl::StatusOr<int64_t> Restore(int64_t step = -1);

  // The snapshots the daemon holds for the registered job (or for `job_id`).
  absl::StatusOr<std::vector<agent::Version>> ListVersions(const std::string& job_id = "");

  // Reading a sealed snapshot of any rank, without registering it. Nothing is claimed: the
  // rank's trainer may be running and snapshotting meanwhile, and this client need not have
  // registered anything. The daemon answers for a job of this process's uid (root: any job; for
  // another uid, the daemon must hold snapshots of the job of that uid, or a rank of the job
  // registered under it, or it is kFailedPrecondition), and first makes a shard held only by
  // other nodes local (copied or rebuilt from fragments), as for a restore. kPermissionDenied
  // for another uid's job.
  //
  // Verification: the manifest, the bytes between the entries and the manifest itself must make
  // the sealed payload CRC32C together with the entries' checksums, and each entry's block
  // checksums its checksum (this reads no entry bytes); ReadRange then checks every block it
  // returns bytes of. So a damaged block fails the ranges that overlap it, and only those.
  //
  // Both may be called from several threads at once, beside the training thread's calls.

  // The manifest of (job_id, rank, step), step -1 being the newest sealed step there: its
  // entries' names, dtypes, shapes, kinds, sizes, valid lengths and, for a DP-sharded snapshot,
  // slices and group. Its step() is the step the daemon answered. Checked as hostile input (a
  // trainer can write its slot): the bounds, the checksums above, and CheckReadableManifest.
  // kNotFound when the daemon holds no such step; kDataLoss when the snapshot does not verify,
  // here and then on the daemon (which restores a damaged one from other nodes if it can);
  // kUnimplemented for a snapshot without block checksums (from before they were taken).
  absl::StatusOr<ShardManifest> ReadManifest(const std::string& job_id, uint32_t rank,
                                             int64_t step = -1);

  // Copies bytes [offset, offset + length) of entry `entry`'s stored bytes in step `step` (>= 0;
  // ReadManifest answers the newest) of (job_id, rank) into `dst`, host memory of at least
  // `length` bytes. The stored bytes are a tensor's nbytes, a blob's valid length, and of a
  // tensor that a DP-sharded snapshot stores as a slice only that slice: offset 0 is then the
  // slice's first byte (EntrySpec.slice.offset within the tensor); the other members' manifests
  // say which rank stores the rest. The bytes are copied first, then every block they overlap is
  // checked on the copy, so a slot rewritten meanwhile (its trainer reused it) fails the check
  // rather than returning other bytes. On a mismatch the daemon is asked once more to check
  // the snapshot itself (as Restore does), and the range read again.
  //
  // kInvalidArgument when the range is not within the entry's valid bytes (the message gives
  // them), step < 0, or dst is null; kNotFound for an unknown entry (naming some that exist) or
  // a step the daemon does not hold (any more); kDataLoss names job, rank, step, entry and
  // block. The opened snapshot (its mapping and manifest) is kept for the next reads of the
  // same step, a few steps at a time, and dropped when a read of it fails.
  absl::Status ReadRange(const std::string& job_id, uint32_t rank, int64_t step,
                         const std::string& entry, uint64_t offset, uint64_t length, void* dst);

  // Waits for in-flight work and unregisters; with drop_snapshots the daemon deletes them.
  absl::Status Close(bool drop_snapshots = false);

  const std::vector<Entry>& entries() const { return entries_; }
  Stats stats() const;

 private:
  // What one snapshot copies: each entry's memory and length as of Snapshot().
  struct Source {
    const void* data;
    uint64_t length;
  };
  struct Job {
    int64_t step;
    uint64_t ticket;
    std::vector<Source> sources;
    int64_t called_ns = 0;  // NowNs() when Snapshot() was called
  };
  struct Phases {
    int64_t begin_ns = 0, copy_ns = 0, seal_ns = 0;
  };
  struct MappedSlot {
    std::unique_ptr<Segment> segment;
    bool pinned = false;
  };

  Client(const Options& options, std::shared_ptr<grpc::Channel> channel);
  // Registers job_id_/rank_/entries_ with the daemon and maps the slots it returns.
  absl::Status Attach();
  void WorkerLoop();
  // On success, *bytes_copied is the bytes the snapshot copied.
  absl::Status RunSnapshot(const Job& job, uint64_t* bytes_copied, Phases* phases);
  // The manifest of (rank, step) must match the registration; for another member of the DP
  // group (dp_rank >= 0), its slices must be the ones that member stores.
  absl::Status CheckRestorable(const ShardManifest& manifest, uint64_t payload_bytes,
                               uint32_t rank, int dp_rank) const;
  // A segment the daemon prepared for a restore, mapped (and pinned on a GPU) until destroyed.
  class RestoreSource;
  // With `client_verifies`, the daemon may answer without checking a local payload
  // (response_.verified() false): the caller checks it (VerifyLayout, then each block). With
  // `for_reader`, the segment is mapped apart and not pinned, even when it is one of this
  // client's slots: a reader's source may outlive the slots' mapping.
  absl::StatusOr<std::unique_ptr<RestoreSource>> OpenRestore(const std::string& job_id,
                                                             uint32_t rank, int64_t step,
                                                             bool client_verifies = false,
                                                             bool for_reader = false);
  // A source for ReadManifest and ReadRange of (job_id, rank, step), checked (VerifyLayout,
  // CheckReadableManifest). With `daemon_verifies` the daemon checks the payload first; without,
  // a cached source of the step is taken when there is one. With `use_cache` the source is
  // cached either way; without, it is neither taken from the cache nor kept in it.
  absl::StatusOr<std::shared_ptr<const RestoreSource>> OpenForReading(const std::string& job_id,
                                                                     uint32_t rank, int64_t step,
                                                                     bool daemon_verifies,
                                                                     bool use_cache);
  // Runs `read` on a source of (job_id, rank, step) that this client checks and, when that
  // fails with kDataLoss, once more on one that the daemon checked. Drops the rank's cached
  // sources on a failure other than the caller's (kInvalidArgument, kNotFound).
  absl::Status ReadVerified(const std::string& job_id, uint32_t rank, int64_t step,
                            bool use_cache,
                            const std::function<absl::Status(const RestoreSource&)>& read);
  void ForgetReadSources(const std::string& job_id, uint32_t rank);
  // The restore of this rank's own entries from `source`, each block checked against the
  // manifest's block checksums just before it is copied (while the previous block copies),
  // after VerifyLayout has checked the manifest and the bytes between entries. kDataLoss on a
  // mismatch (the blocks before it are copied, it and those after are not); kUnimplemented
  // when the snapshot carries no block checksums.
  absl::Status CopyVerified(const RestoreSource& source, const std::vector<cuda::CopyOp>& ops);
  // The snapshot's payload CRC32C from its manifest's entry checksums, the bytes between the
  // entries and the manifest itself, against the sealed one; and each entry's block checksums
  // against its whole-entry checksum. Reads only what lies outside the entries.
  absl::Status VerifyLayout(const RestoreSource& source) const;
  // DP-sharded restore: agrees with the other members on the step and the gather path.
  struct DpAgreement {
    int64_t step = -1;
    bool nccl = false;          // the GPU-resident replicated tensors go over NCCL
    std::string nccl_id;
    std::string note;           // why not NCCL
    std::vector<bool> on_device;  // per entry: replicated and GPU memory
  };
  absl::StatusOr<DpAgreement> AgreeOnRestore(int64_t step);
  // Copies the other members' slices into the registered memory, through the daemon: of every
  // replicated entry, or, with `skip`, of the entries it does not mark (those it marks came over
  // NCCL). Returns the bytes.
  absl::StatusOr<uint64_t> GatherFromDaemon(int64_t step, const std::vector<bool>* skip);
  // Broadcasts every member's slices of the GPU-resident replicated entries. Returns the bytes
  // this member received.
  absl::StatusOr<uint64_t> GatherWithNccl(const DpAgreement& agreement);
  // Where entry i's stored bytes start within the entry (its slice's offset, else 0).
  uint64_t StoredOffset(size_t i) const;
  void UnmapSlots();
  grpc::ClientContext* NewContext(grpc::ClientContext* context) const;

  const Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<agent::Agent::Stub> stub_;
  std::unique_ptr<cuda::CopyEngine> engine_;

  // Set by Register; read by the worker while a job runs (Register waits for it first).
  std::string job_id_;
  uint32_t rank_ = 0;
  uint32_t world_size_ = 0;
  bool registered_ = false;
  std::vector<Entry> entries_;
  // What is registered with the daemon: entries_' specs, with the slice of each replicated
  // tensor when DP-sharded.
  std::vector<EntrySpec> specs_;
  DataParallel dp_config_;          // as given to SetDataParallel
  struct DpState {
    std::vector<uint32_t> members;
    uint32_t dp_rank = 0;
    uint64_t fingerprint = 0;
    std::shared_ptr<const DpSlicing> slicing;
  };
  std::optional<DpState> dp_;       // set by Register when DP-sharded
  agent::RegisterResponse layout_;
  std::vector<MappedSlot> slots_;

  // The sources ReadRange read last, oldest first: (job, rank, step) and the source.
  struct ReadSource {
    std::string job_id;
    uint32_t rank;
    int64_t step;
    std::shared_ptr<const RestoreSource> source;
  };
  std::mutex read_mu_;
  std::vector<ReadSource> read_sources_;  // guarded by read_mu_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::optional<Job> pending_;  // guarded by mu_
  int64_t last_skip_log_ns_ = 0;   // guarded by mu_: skips are logged at most every 10 s
  uint64_t skips_logged_ = 0;      // guarded by mu_: the skip count at that log line
  bool busy_ = false;           // guarded by mu_: a job is pending or running
  bool stopping_ = false;       // guarded by mu_
  absl::Status last_status_;    // guarded by mu_
  Stats stats_;                 // guarded by mu_
  std::thread worker_;
};

// Converts a status into the C ABI's return code: 0 for OK, otherwise -(canonical code).
int StatusToReturnCode(const absl::Status& status);

}  // namespace tessera

#endif  // TESSERA_AGENT_CLIENT_H_
