// FragmentStore: the erasure-coded fragments this node holds for other nodes' shards,
// transport-free (PeerService is the gRPC adapter over it).
//
// Each fragment lives in its own preallocated, pre-faulted shared-memory segment of kind
// kFragment (file suffix ".frag") in the same directory as the snapshot slots. The 4 KiB header
// records job, rank, step, fragment index, RS(k, m), shard bytes and CRC32C, the fragment's own
// CRC32C, the job's epoch and the owner's incarnation. A fragment is WRITING while its chunks
// arrive, in any order, each checked against its CRC32C; it becomes SEALED (a release-store of the
// header state) once every byte has arrived and the whole fragment's CRC32C matches the one the
// sender gives. A restarted store re-adopts every SEALED fragment whose header and payload CRC
// verify and deletes every other ".frag" file.
//
// Keys, epochs and incarnations. A fragment is keyed by (job, rank, step, fragment index); the
// job's epoch says which history its shard was sealed in, and the owner's incarnation which run
// of the owner's daemon encoded it. BeginFragment with the key of a held fragment:
//   same metadata                       -> the held fragment (idempotent; a retry resumes)
//   newer epoch                         -> the held one is replaced, whatever the incarnations
//                                          (the job resumed, perhaps with the rank on another
//                                          node, whose incarnation says nothing against this one)
//   older epoch                         -> kFailedPrecondition (a write from an abandoned
//                                          history must not replace the step the job went on
//                                          with: docs/PROTOCOL.md, "a holder refuses a fragment
//                                          of an older epoch")
// and within one epoch (or where either epoch is 0, not known):
//   higher incarnation                  -> the held one is replaced (the owner restarted)
//   lower incarnation                   -> kFailedPrecondition (a stale sender)
//   same incarnation, other metadata    -> the held one is replaced, WRITING or SEALED (the
//                                          owner encoded the step again: fewer members were
//                                          live and k changed)
//
// Memory. Every segment's bytes are reserved from the CapacityBudget before the file is created
// (kResourceExhausted says how much was asked and how much is free). The segments of dropped or
// replaced fragments are kept as spares and recycled for the next fragment of about the same
// size (at most an eighth plus 64 KiB larger), so the steady state (every step's fragments
// replace the previous step's) creates no files and takes no page faults. Spares are bounded
// (Options::max_spares_per_rank per (job, rank) they came from, Options::pool_max_bytes in all),
// stay charged to the budget, and are the first memory given back when a Reserve runs short (the
// store is one of the budget's reclaimers). DropJob keeps no spares: the job is gone.
//
// Spares ahead of need. A fragment that finds no spare creates and pre-faults a segment on the
// critical path of its transfer. The store remembers, per (job, rank), the most fragments it has
// held at once (counting the one being stored), and takes it to be at least two (the committed
// step's and the next); a rank that holds fewer now, with no spare that would fit its next
// fragment, is short of a segment it will need (its first fragment has arrived, its spares were
// reclaimed or bounded away, or its fragments changed size). Then, once a fragment of that (job,
// rank) is sealed here or had to get a new segment, one background thread creates one
// (Options::precreate_spares): EMPTY, pre-faulted, counted toward max_spares_per_rank and
// pool_max_bytes, and charged to the budget only if the bytes are free now (it never makes a
// reclaimer run; a spare skipped for want of budget is counted, and for a second after the
// budget ran short none is tried). A rank that holds as many fragments as ever gets none: the
// segment of the step its commit drops comes back as its spare, so the steady state (each step's
// fragment arrives, seals, and the commit drops the step before) neither creates nor deletes a
// segment. (Creating one at every seal did: the created one or the one dropped was deleted again, a
// whole fragment's pages faulted in for nothing at every step.) So a rank pays a created segment
// on its transfer for its first fragment, and when it holds more fragments at once than ever
// before (its commits lag its snapshots). When a Reserve runs short while a spare is being created,
// TrimPool waits for that creation and discards it (at most one segment's creation), rather than
// refusing for bytes it holds.
//
// Recycling and crashes. A spare's header is moved to EMPTY (and its header CRC cleared) before
// the spare is kept; a reused one is rewritten while EMPTY and only then becomes WRITING, before
// any payload byte is reused. A spare keeps its file name (fragment files are named by a
// generation number, not by key). So a crash at any point leaves at most EMPTY or WRITING files
// besides the sealed fragments, and a restarted store deletes them: a spare is never adopted,
// listed or served as a fragment.
//
// Thread-safety: all methods may be called concurrently. Chunks of different fragments are
// copied in parallel; chunks of one fragment are copied one at a time. A FragmentView stays valid
// (its memory mapped and never recycled) however the store changes meanwhile.
#ifndef TESSERA_DAEMON_STORE_FRAGMENT_STORE_H_
#define TESSERA_DAEMON_STORE_FRAGMENT_STORE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/segment.h"
#include "daemon/store/capacity_budget.h"

namespace tessera {

struct FragmentKey {
  std::string job_id;
  uint32_t rank = 0;
  int64_t step = -1;
  uint32_t fragment_index = 0;

  // "job 'j' rank 3 step 40 fragment 2"
  std::string ToString() const;
  bool operator<(const FragmentKey& o) const {
    return std::tie(job_id, rank, step, fragment_index) <
           std::tie(o.job_id, o.rank, o.step, o.fragment_index);
  }
  bool operator==(const FragmentKey& o) const {
    return std::tie(job_id, rank, step, fragment_index) ==
           std::tie(o.job_id, o.rank, o.step, o.fragment_index);
  }
};

// What the sender says about a fragment before its bytes arrive.
struct FragmentMeta {
  uint64_t owner_incarnation = 0;  // > 0
  uint32_t ec_k = 0;               // 1..ErasureCodec::kMaxDataFragments
  uint32_t ec_m = 0;               // 0..ErasureCodec::kMaxParityFragments
  uint64_t fragment_bytes = 0;     // == ErasureCodec::FragmentBytes(shard_bytes, ec_k)
  uint64_t shard_bytes = 0;
  uint32_t shard_crc32c = 0;
  // The job's epoch (docs/PROTOCOL.md, Epochs) the shard was sealed in; 0: not known (a standalone
  // daemon's, or a sender's from before fragments carried it).
  uint64_t epoch = 0;

  bool operator==(const FragmentMeta& o) const {
    return std::tie(owner_incarnation, ec_k, ec_m, fragment_bytes, shard_bytes, shard_crc32c,
                    epoch) == std::tie(o.owner_incarnation, o.ec_k, o.ec_m, o.fragment_bytes,
                                       o.shard_bytes, o.shard_crc32c, o.epoch);
  }
  bool operator!=(const FragmentMeta& o) const { return !(*this == o); }
};

// Whether a fragment of `incoming` may replace a held fragment of `held` of the same key:
// a newer epoch always does and an older one never (a write from an abandoned history, whatever
// node and incarnation sent it: incarnations of different nodes are not comparable); within one
// epoch, or where either epoch is not known, the owner's incarnation decides (an older one is a
// fenced sender), and the same incarnation re-encoded the step (it replaces).
bool FragmentMayReplace(const FragmentMeta& held, const FragmentMeta& incoming);

// Crc32cCombine(crc_a, crc_b, len_b) (the CRC32C of A || B), with the operator for len_b cached:
// a combine then costs 32 steps instead of about log2(len_b) 32x32 matrix squarings, which
// matters when every 1 MiB chunk of a stream is combined. Thread-safe.
// (A general CRC utility: it belongs in common/crc32c.h.)
uint32_t Crc32cCombineCached(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// kInvalidArgument naming the first bad field and what would be valid.
absl::Status ValidateFragmentKey(const FragmentKey& key);
absl::Status ValidateFragmentMeta(const FragmentKey& key, const FragmentMeta& meta);

// Where a fragment stands.
struct FragmentStatus {
  FragmentKey key;
  FragmentMeta meta;
  SegmentState state = SegmentState::kEmpty;  // kWriting or kSealed
  uint64_t bytes_received = 0;                // == meta.fragment_bytes once sealed
  uint32_t fragment_crc32c = 0;               // once sealed
};

// Bytes handed to WriteChunk in pieces (a received gRPC message's slices), read in order.
struct ConstByteRange {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

// A read-only view of a SEALED fragment. Copyable; keeps the segment mapped and out of the
// recycling pool while any copy lives, even after the fragment is dropped or replaced. The bytes
// are as sealed unless the memory itself was damaged since: a reader that needs certainty
// checks them against fragment_crc32c() (GetFragment does, chunk by chunk).
class FragmentView {
 public:
  const FragmentKey& key() const { return status_.key; }
  const FragmentMeta& meta() const { return status_.meta; }
  uint32_t fragment_crc32c() const { return status_.fragment_crc32c; }
  const uint8_t* data() const { return segment_->payload(); }
  uint64_t size() const { return status_.meta.fragment_bytes; }
  // The segment file (status and drills).
  const std::string& path() const { return segment_->path(); }

 private:
  friend class FragmentStore;
  FragmentView(std::shared_ptr<const Segment> segment, FragmentStatus status)
      : segment_(std::move(segment)), status_(std::move(status)) {}

  std::shared_ptr<const Segment> segment_;
  FragmentStatus status_;
};

class FragmentStore {
 private:
  struct Entry;

 public:
  struct Options {
    std::string directory;             // created if missing; usually SnapshotStore's directory
    CapacityBudget* budget = nullptr;  // required; not owned, must outlive the store
    bool prefault = true;              // pre-fault new segments when they are created
    int crc_threads = 2;               // for whole-fragment checksums (adoption, overlap, Verify)
    // Dropped segments kept for reuse, at most this many bytes (0: delete at once). Pooled bytes
    // stay reserved in the budget until reused or reclaimed.
    uint64_t pool_max_bytes = UINT64_MAX;
    // Spares kept per (job, rank) whose fragments they held (0: none); the oldest goes first.
    // Two cover the steady state: a peer holds the committed step and the next, and while its
    // commits lag, one more.
    int max_spares_per_rank = 2;
    // Create a spare in the background ahead of the next fragment of a (job, rank) (see above).
    bool precreate_spares = true;
  };

  struct Stats {
    uint64_t fragments_writing = 0;
    uint64_t fragments_sealed = 0;
    uint64_t held_bytes = 0;     // file bytes of all fragment segments, pool excluded
    uint64_t pool_segments = 0;  // spares
    uint64_t pool_bytes = 0;     // their file bytes (charged to the budget)
    uint64_t segments_created = 0;   // fragments that got a new segment (spares not included)
    uint64_t segments_recycled = 0;  // fragments that reused a spare instead of a new segment
    uint64_t spares_precreated = 0;  // spares created in the background and kept in the pool
    uint64_t spares_precreate_skipped = 0;  // not created: the budget was short
    uint64_t spares_precreate_discarded = 0;  // created, then not wanted by the time they were
    uint64_t spares_reclaimed = 0;   // spares deleted to make room in the budget
    uint64_t seals = 0;
    uint64_t crc_failures = 0;  // chunks and whole fragments whose CRC32C did not match
    uint64_t adopted_at_start = 0;
    uint64_t discarded_at_start = 0;
  };

  // Opens (creating if needed) the directory, re-adopts every SEALED ".frag" segment whose header
  // and payload CRC32C verify (charging the budget, which may end up over capacity: logged), and
  // deletes the other ".frag" files (spares, and fragments still being written when the previous
  // store stopped). Files with other suffixes are left alone.
  // Errors: kInvalidArgument (no budget or directory), or the directory cannot be opened.
  static absl::StatusOr<std::unique_ptr<FragmentStore>> Open(Options options);

  ~FragmentStore();
  FragmentStore(const FragmentStore&) = delete;
  FragmentStore& operator=(const FragmentStore&) = delete;

  // Makes a WRITING fragment for key with meta (see the header comment for a held key), creating
  // its segment. Returns its status: a retry learns what has arrived already.
  // Errors: kInvalidArgument, kFailedPrecondition (stale incarnation), kResourceExhausted
  // (budget or filesystem full; nothing changed).
  absl::StatusOr<FragmentStatus> BeginFragment(const FragmentKey& key, const FragmentMeta& meta);

  // Stores bytes [offset, offset + size) of the fragment after checking them against
  // chunk_crc32c. Rewriting a range is harmless; a chunk for a SEALED fragment of this
  // incarnation is accepted and ignored (a retry). owner_incarnation must be the fragment's.
  // Errors: kNotFound (no such fragment: BeginFragment first), kFailedPrecondition (another
  // incarnation holds the key), kInvalidArgument (empty chunk or range past the fragment),
  // kDataLoss (CRC mismatch; nothing written).
  absl::StatusOr<FragmentStatus> WriteChunk(const FragmentKey& key, uint64_t owner_incarnation,
                                            uint64_t offset, const uint8_t* data, size_t size,
                                            uint32_t chunk_crc32c);
  // Same, with the chunk's bytes in pieces that are concatenated in order.
  absl::StatusOr<FragmentStatus> WriteChunk(const FragmentKey& key, uint64_t owner_incarnation,
                                            uint64_t offset,
                                            absl::Span<const ConstByteRange> pieces,
                                            uint32_t chunk_crc32c);

  // Receives bytes [offset, offset + size) of the fragment straight into its shared memory:
  // fill(dst) must write exactly `size` bytes at dst (a socket read, say) or fail. The bytes are
  // then checked in place against chunk_crc32c. fill runs without the store's locks, so chunks of
  // one fragment arrive in parallel, and is called at most once: not at all when the fragment is
  // already SEALED for this incarnation (a retry: its status is returned and the caller discards
  // the bytes) or on the errors checked first. Should fill fail or the CRC not match, the range
  // counts as not received (whatever it held before, since it was overwritten) and must be sent
  // again. A fragment dropped or replaced meanwhile keeps its memory until fill returns (the
  // segment is then deleted, not recycled).
  // Errors: those of WriteChunk (kDataLoss: the range must be sent again), and fill's own.
  absl::StatusOr<FragmentStatus> ReceiveChunk(const FragmentKey& key, uint64_t owner_incarnation,
                                              uint64_t offset, size_t size, uint32_t chunk_crc32c,
                                              absl::FunctionRef<absl::Status(uint8_t* dst)> fill);
  // The same, where fill also gives the CRC32C of the bytes it wrote, computed from them once at
  // dst (by the thread that decrypted them, say), so that the store does not read them again.
  absl::StatusOr<FragmentStatus> ReceiveChunkChecked(
      const FragmentKey& key, uint64_t owner_incarnation, uint64_t offset, size_t size,
      uint32_t chunk_crc32c, absl::FunctionRef<absl::StatusOr<uint32_t>(uint8_t* dst)> fill);

  // ReceiveChunkChecked in two halves, for a receiver that reads a chunk while the bytes of the
  // one before are still being decrypted and checked (the encrypted data path): BeginReceive
  // makes the checks ReceiveChunkChecked makes before fill and gives where the bytes go;
  // FinishReceive takes the CRC32C of what was written there (or why nothing was) and records
  // the chunk, as ReceiveChunkChecked does after fill. A receipt dropped unfinished counts its
  // range as not received. Receipts of one fragment may be open together.
  class ChunkReceipt {
   public:
    ChunkReceipt() = default;
    ChunkReceipt(ChunkReceipt&& other) noexcept { *this = std::move(other); }
    ChunkReceipt& operator=(ChunkReceipt&& other) noexcept;
    ~ChunkReceipt();

    // Where the chunk's `size` bytes go; nullptr when none are wanted (the fragment is sealed
    // already: a retry; `done` is its status, and the caller discards the bytes).
    uint8_t* dst() const { return dst_; }
    const std::optional<FragmentStatus>& done() const { return done_; }

   private:
    friend class FragmentStore;
    void Abandon();

    std::shared_ptr<Entry> entry_;
    std::shared_ptr<Segment> segment_;  // ours while the bytes arrive (ReceiveChunkChecked)
    uint8_t* dst_ = nullptr;
    uint64_t offset_ = 0;
    size_t size_ = 0;
    uint32_t chunk_crc32c_ = 0;
    std::optional<FragmentStatus> done_;
  };
  absl::StatusOr<ChunkReceipt> BeginReceive(const FragmentKey& key, uint64_t owner_incarnation,
                                            uint64_t offset, size_t size, uint32_t chunk_crc32c);
  // `received`: the CRC32C of the `size` bytes written at receipt.dst(), or why they were not.
  absl::StatusOr<FragmentStatus> FinishReceive(ChunkReceipt receipt,
                                               absl::StatusOr<uint32_t> received);

  // Seals the fragment once every byte has arrived and the CRC32C of the whole fragment equals
  // fragment_crc32c. Idempotent for a sealed fragment with the same CRC.
  // Errors: kNotFound, kFailedPrecondition (bytes missing: the first missing range is named;
  // or another incarnation), kUnavailable (a ReceiveChunk of it is still in progress: seal
  // again once it returns), kDataLoss (the CRC does not match: the fragment stays WRITING with
  // no bytes counted as received, so the sender must send it again; or it was sealed with
  // another CRC).
  absl::StatusOr<FragmentStatus> SealFragment(const FragmentKey& key, uint64_t owner_incarnation,
                                              uint32_t fragment_crc32c);

  // A view of a SEALED fragment. owner_incarnation 0 accepts any.
  // Errors: kInvalidArgument, kNotFound (lists the fragments held for that shard),
  // kFailedPrecondition (still WRITING: says how much has arrived).
  absl::StatusOr<FragmentView> Get(const FragmentKey& key, uint64_t owner_incarnation = 0) const;

  // Recomputes the CRC32C of a SEALED fragment's bytes. kDataLoss when the memory no longer
  // matches; the errors of Get otherwise.
  absl::Status VerifyFragment(const FragmentKey& key) const;

  // Fragments held for a job (all jobs when job_id is empty), WRITING and SEALED, sorted by key.
  std::vector<FragmentStatus> List(const std::string& job_id) const;

  // Commit GC: drops every fragment of (job, rank) with a step below `step`, sealed or not.
  // Returns how many were dropped.
  size_t DropOlderThan(const std::string& job_id, uint32_t rank, int64_t step);
  // A job's drop at `dropped_epoch` (docs/PROTOCOL.md, Dropping a job): drops the job's fragments
  // of an epoch up to it, and those whose epoch is not known (0) when `unknown_too`; a later
  // run's stay. Deletes the spares the job's fragments left. Returns how many fragments were
  // dropped, and adds their bytes to *bytes_dropped when given. The defaults drop every one.
  size_t DropJob(const std::string& job_id, uint64_t dropped_epoch = UINT64_MAX,
                 bool unknown_too = true, uint64_t* bytes_dropped = nullptr);
  // Drops one fragment. kNotFound if it is not held.
  absl::Status DropFragment(const FragmentKey& key);

  // Deletes spares, largest first, until at least `bytes` were given back (or none is left); if
  // that is not enough while a spare is being created in the background, waits for it and
  // discards it too. Returns the bytes given back to the budget. The budget calls it when a
  // Reserve runs short.
  uint64_t TrimPool(uint64_t bytes);

  Stats stats() const;
  const std::string& directory() const { return options_.directory; }
  // The budget this store charges (shared with what else the daemon keeps in its directory).
  CapacityBudget* budget() const { return options_.budget; }

 private:
  // A recycled segment and the (job, rank) whose fragment it held.
  struct Spare {
    std::shared_ptr<Segment> segment;
    std::string job_id;
    uint32_t rank = 0;
    uint64_t sequence = 0;  // when it was kept: lower is older
  };
  // A spare the background thread is asked to create.
  struct PrecreateRequest {
    std::string job_id;
    uint32_t rank = 0;
    uint64_t capacity_bytes = 0;
    uint64_t job_drops = 0;  // job_drops_ when asked: a DropJob since discards it
  };
  explicit FragmentStore(Options options) : options_(std::move(options)) {}
  absl::Status AdoptExisting();
  std::shared_ptr<Entry> Find(const FragmentKey& key) const;
  absl::StatusOr<std::shared_ptr<Segment>> AcquireSegment(const FragmentKey& key,
                                                          uint64_t capacity_bytes);
  // Removes `entry` (already out of entries_) for good: waits for writers, invalidates its
  // segment's header, then keeps the segment as a spare (when keep_spare and the bounds allow)
  // or deletes it.
  void Retire(const std::shared_ptr<Entry>& entry, bool keep_spare = true);
  // Deletes segments that are no fragment's and gives their bytes back to the budget.
  void DeleteSpares(std::vector<std::shared_ptr<Segment>> spares);
  // all_ranks: the job's fragments of an epoch up to up_to_epoch (and of epoch 0 when
  // unknown_too); otherwise (job, rank)'s below `step`.
  size_t DropMatching(const std::string& job_id, bool all_ranks, uint32_t rank, int64_t step,
                      uint64_t up_to_epoch = UINT64_MAX, bool unknown_too = true,
                      uint64_t* bytes_dropped = nullptr);
  absl::StatusOr<std::shared_ptr<Entry>> FindForWrite(const FragmentKey& key,
                                                      uint64_t owner_incarnation) const;
  // Fragments of (job, rank) held or being given a segment.
  int HeldLocked(const std::string& job_id, uint32_t rank) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a spare of capacity_bytes for (job, rank) should be created now: the rank holds fewer
  // fragments than it has at once (peak_held_), none of its spares fits (PoolFits), and the
  // per-rank and pool bounds leave room for one.
  bool SpareWanted(const std::string& job_id, uint32_t rank, uint64_t capacity_bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Queues a PrecreateRequest when SpareWanted. REQUIRES: mu_ not held.
  void MaybePrecreateSpare(const std::string& job_id, uint32_t rank, uint64_t capacity_bytes);
  void PrecreateLoop();
  void PrecreateSpare(const PrecreateRequest& request);

  const Options options_;
  int reclaimer_id_ = 0;
  mutable absl::Mutex mu_;
  std::map<FragmentKey, std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  // Keys whose segment a BeginFragment is creating (outside mu_); other Begins wait for them.
  std::set<FragmentKey> creating_ ABSL_GUARDED_BY(mu_);
  // Per (job, rank): the most fragments it held at once (HeldLocked when a segment was acquired).
  std::map<std::pair<std::string, uint32_t>, int> peak_held_ ABSL_GUARDED_BY(mu_);
  // Spares by payload capacity; each holds its budget reservation.
  std::multimap<uint64_t, Spare> pool_ ABSL_GUARDED_BY(mu_);
  uint64_t pool_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_spare_sequence_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  Stats counters_ ABSL_GUARDED_BY(mu_);
  // The background creation of one spare: its reserved bytes while in flight (0: none), whether
  // TrimPool wants it discarded, the bytes given back by such discards, and DropJob calls seen.
  uint64_t precreate_in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool precreate_cancel_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t precreate_cancelled_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t precreate_finished_ ABSL_GUARDED_BY(mu_) = 0;  // creations attempted to the end
  uint64_t job_drops_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point last_trim_ ABSL_GUARDED_BY(mu_) =  // last TrimPool
      std::chrono::steady_clock::time_point::min();

  // The background thread's queue (one request per (job, rank)); never held together with mu_.
  absl::Mutex precreate_mu_;
  std::deque<PrecreateRequest> precreate_queue_ ABSL_GUARDED_BY(precreate_mu_);
  bool precreate_stop_ ABSL_GUARDED_BY(precreate_mu_) = false;
  std::thread precreate_thread_;  // joinable iff Options::precreate_spares
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_FRAGMENT_STORE_H_
