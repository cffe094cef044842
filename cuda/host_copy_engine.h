// The host engine, and the ticket bookkeeping and host copying it shares with the CUDA engine.
// Internal to //cuda:copy_engine: users go through CopyEngine::Create / CreateHostOnly.
#ifndef TESSERA_CUDA_HOST_COPY_ENGINE_H_
#define TESSERA_CUDA_HOST_COPY_ENGINE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cuda/copy_engine.h"

namespace tessera::cuda::internal {

// Ticket numbering and issue order (see "Tickets" in copy_engine.h). A ticket is, in turn,
// marked, issuing (inside IssueCopies), then issued with an outcome, or abandoned instead of
// issued. Not thread-safe: its owner guards it.
class TicketSequence {
 public:
  // Hands out the next ticket, starting at 1.
  uint64_t Mark();

  // OK if `ticket` is the next one to issue; otherwise the error IssueCopies returns for it.
  absl::Status CheckIssuable(uint64_t ticket) const;
  // REQUIRES: CheckIssuable(ticket).ok().
  void BeginIssue(uint64_t ticket);
  // REQUIRES: BeginIssue(ticket) was the last BeginIssue.
  void EndIssue(uint64_t ticket, const absl::Status& outcome);

  bool AllIssued() const { return issued_through_ == newest_; }
  // Abandons the marked tickets whose issue has not begun and returns them, oldest first.
  std::vector<uint64_t> AbandonUnstarted(absl::Duration waited);

  // For an issued ticket, its IssueCopies outcome (failures older than the newest
  // kMaxFailures read as OK); otherwise the error WaitCopies returns for it.
  absl::Status Outcome(uint64_t ticket) const;

  uint64_t newest() const { return newest_; }

 private:
  static constexpr size_t kMaxFailures = 256;
  struct Failure {
    absl::Status status;
    bool abandoned;
  };
  void RecordFailure(uint64_t ticket, Failure failure);

  uint64_t newest_ = 0;             // the newest ticket handed out
  uint64_t issued_through_ = 0;     // every ticket up to this one is issued or abandoned
  uint64_t issuing_ = 0;            // the ticket inside IssueCopies, or 0
  uint64_t abandoned_through_ = 0;  // the newest ticket abandoned
  // Failed and abandoned tickets, the newest kMaxFailures of them.
  std::map<uint64_t, Failure> failures_;
};

// Fence's CPU side, shared by both engines: waits until every marked ticket in `tickets` is
// issued. After `timeout`, abandons the tickets whose issue has not begun (logging them) and
// waits only for one that is being issued. Counts the Fence and its wait in `stats`.
// Returns the abandoned tickets.
// REQUIRES: `mu` is held and guards `tickets` and `stats`.
std::vector<uint64_t> AwaitAllIssued(absl::Mutex& mu, TicketSequence& tickets,
                                     absl::Duration timeout, CopyEngineStats& stats)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

// kInvalidArgument naming the first op with a null pointer and nonzero bytes; OK otherwise.
absl::Status ValidateCopyOps(const std::vector<CopyOp>& ops);

// memcpy of every op, on the calling thread, or split evenly by bytes across `threads` threads
// (the calling thread one of them) when the ops total at least `parallel_min_bytes`. With
// `crcs`, also sets (*crcs)[i] to the checksums of op i's destination as copied, in blocks of
// `block_bytes`: each thread checksums every 256 KiB it copies right after copying it, while
// those bytes are in its cache.
// Returns the bytes copied. REQUIRES: ValidateCopyOps(ops).ok(); host memory only.
uint64_t CopyHostMemory(const std::vector<CopyOp>& ops, int threads, size_t parallel_min_bytes,
                        std::vector<OpChecksum>* crcs = nullptr, uint64_t block_bytes = 0);

// WaitChecksums's error for a ticket with no checksums to take.
absl::Status NoChecksums(uint64_t ticket);

// CopySyncVerified's argument checks: `expected` empty or one list per op, each empty or of
// ceil(bytes / block_bytes) CRCs; block_bytes > 0.
absl::Status ValidateExpectedBlocks(const std::vector<CopyOp>& ops,
                                    const std::vector<std::vector<uint32_t>>& expected,
                                    uint64_t block_bytes);

// kDataLoss for the first block of `op` (index `index`) overlapping [offset, offset + bytes)
// whose CRC32C (of its source, host memory) is not `expected`'s; OK if none.
absl::Status CheckSourceBlocks(size_t index, const CopyOp& op,
                               const std::vector<uint32_t>& expected, uint64_t block_bytes,
                               uint64_t offset, uint64_t bytes);

// The kDataLoss of block `block` of copy op `index`.
absl::Status BlockMismatch(size_t index, uint64_t block, uint64_t block_bytes, uint64_t op_bytes,
                           uint32_t actual, uint32_t expected, const char* where);

// Checksums kept for tickets nobody took them of, at most (the oldest go first).
constexpr size_t kMaxUntakenChecksums = 64;

// The engine without a GPU: every pointer is host memory and every copy a memcpy, done by
// IssueCopies before it returns. Thread-safe.
class HostCopyEngine final : public CopyEngine {
 public:
  // `reason` says why this engine is used ("no CUDA device: cudaErrorNoDevice").
  HostCopyEngine(const CopyEngineOptions& options, std::string reason);
  ~HostCopyEngine() override;

  bool has_gpu() const override { return false; }
  std::string Describe() const override;
  absl::Status RegisterHost(void* ptr, size_t bytes) override;
  absl::Status UnregisterHost(void* ptr) override;
  absl::StatusOr<MemoryKind> Locate(const void* ptr) override;
  absl::StatusOr<uint64_t> MarkSnapshotPoint(void* compute_stream) override;
  absl::Status IssueCopies(uint64_t ticket, const std::vector<CopyOp>& ops) override;
  absl::Status IssueChecksummedCopies(uint64_t ticket, const std::vector<CopyOp>& ops) override;
  absl::Status Fence(void* stream) override;
  absl::Status WaitCopies(uint64_t ticket) override;
  absl::StatusOr<std::vector<OpChecksum>> WaitChecksums(uint64_t ticket) override;
  absl::Status CopySync(const std::vector<CopyOp>& ops) override;
  absl::Status CopySyncChecked(const std::vector<CopyOp>& ops, const BeforeCopy& before) override;
  CopyEngineStats stats() const override;

 private:
  absl::Status Issue(uint64_t ticket, const std::vector<CopyOp>& ops, bool checksum);

  const CopyEngineOptions options_;
  const std::string reason_;

  absl::Mutex issue_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // serialises IssueCopies
  mutable absl::Mutex mu_;
  TicketSequence tickets_ ABSL_GUARDED_BY(mu_);
  CopyEngineStats stats_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::vector<OpChecksum>> checksums_ ABSL_GUARDED_BY(mu_);  // not taken yet
};

}  // namespace tessera::cuda::internal

#endif  // TESSERA_CUDA_HOST_COPY_ENGINE_H_
