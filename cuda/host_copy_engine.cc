#include "cuda/host_copy_engine.h"

#include <algorithm>
#include <cstring>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"

namespace tessera::cuda::internal {

uint64_t TicketSequence::Mark() { return ++newest_; }

absl::Status TicketSequence::CheckIssuable(uint64_t ticket) const {
  if (ticket == 0 || ticket > newest_) {
    return absl::InvalidArgumentError(
        absl::StrCat("ticket ", ticket, " was never handed out (the newest is ", newest_, ")"));
  }
  auto failure = failures_.find(ticket);
  if (failure != failures_.end() && failure->second.abandoned) return failure->second.status;
  if (ticket <= issued_through_ || ticket == issuing_) {
    return absl::FailedPreconditionError(absl::StrCat("ticket ", ticket, " was already issued"));
  }
  if (ticket != issued_through_ + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("ticket ", ticket, " issued before ticket ", issued_through_ + 1,
                     ": tickets are issued in the order they were marked"));
  }
  return absl::OkStatus();
}

void TicketSequence::BeginIssue(uint64_t ticket) { issuing_ = ticket; }

void TicketSequence::EndIssue(uint64_t ticket, const absl::Status& outcome) {
  issuing_ = 0;
  // Tickets after this one may have been abandoned while it was being issued.
  issued_through_ = std::max(ticket, abandoned_through_);
  if (!outcome.ok()) RecordFailure(ticket, {outcome, /*abandoned=*/false});
}

std::vector<uint64_t> TicketSequence::AbandonUnstarted(absl::Duration waited) {
  std::vector<uint64_t> abandoned;
  uint64_t first = (issuing_ != 0 ? issuing_ : issued_through_) + 1;
  for (uint64_t ticket = first; ticket <= newest_; ++ticket) {
    abandoned.push_back(ticket);
    RecordFailure(
        ticket,
        {absl::AbortedError(absl::StrCat("ticket ", ticket, " was abandoned: Fence waited ",
                                         absl::FormatDuration(waited), " for it to be issued")),
         /*abandoned=*/true});
  }
  abandoned_through_ = newest_;
  if (issuing_ == 0) issued_through_ = newest_;
  return abandoned;
}

absl::Status TicketSequence::Outcome(uint64_t ticket) const {
  if (ticket == 0 || ticket > newest_) {
    return absl::InvalidArgumentError(
        absl::StrCat("ticket ", ticket, " was never handed out (the newest is ", newest_, ")"));
  }
  if (ticket > issued_through_) {
    return absl::FailedPreconditionError(
        absl::StrCat("ticket ", ticket, " has not been issued (IssueCopies) yet"));
  }
  auto failure = failures_.find(ticket);
  return failure == failures_.end() ? absl::OkStatus() : failure->second.status;
}

void TicketSequence::RecordFailure(uint64_t ticket, Failure failure) {
  failures_[ticket] = std::move(failure);
  while (failures_.size() > kMaxFailures) failures_.erase(failures_.begin());
}

std::vector<uint64_t> AwaitAllIssued(absl::Mutex& mu, TicketSequence& tickets,
                                     absl::Duration timeout, CopyEngineStats& stats) {
  ++stats.fences;
  if (tickets.AllIssued()) return {};
  const absl::Condition all_issued(
      +[](TicketSequence* sequence) { return sequence->AllIssued(); }, &tickets);
  const absl::Time start = absl::Now();
  std::vector<uint64_t> abandoned;
  if (!mu.AwaitWithTimeout(all_issued, timeout)) {
    abandoned = tickets.AbandonUnstarted(absl::Now() - start);
    if (!abandoned.empty()) {
      Logger("copy-engine")
          ->warn("Fence abandoned snapshot ticket(s) {} after waiting {} for them to be issued",
                 absl::StrJoin(abandoned, ","), absl::FormatDuration(absl::Now() - start));
    }
    mu.Await(all_issued);  // a ticket already being issued is waited for in full
  }
  ++stats.fence_cpu_waits;
  stats.fence_cpu_wait_ns += absl::ToInt64Nanoseconds(absl::Now() - start);
  stats.tickets_abandoned += abandoned.size();
  return abandoned;
}

absl::Status ValidateCopyOps(const std::vector<CopyOp>& ops) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const CopyOp& op = ops[i];
    if (op.bytes == 0 || (op.dst != nullptr && op.src != nullptr)) continue;
    return absl::InvalidArgumentError(absl::StrCat("copy op ", i, " of ", ops.size(), ": null ",
                                                   op.dst == nullptr ? "dst" : "src", " with ",
                                                   op.bytes, " bytes"));
  }
  return absl::OkStatus();
}

namespace {

// Copies bytes [begin, end) of the concatenation of `ops`' sources to the same range of their
// destinations.
void CopyByteRange(const std::vector<CopyOp>& ops, uint64_t begin, uint64_t end) {
  uint64_t op_start = 0;
  for (const CopyOp& op : ops) {
    const uint64_t op_end = op_start + op.bytes;
    const uint64_t from = std::max(begin, op_start);
    const uint64_t to = std::min(end, op_end);
    if (from < to) {
      std::memcpy(static_cast<char*>(op.dst) + (from - op_start),
                  static_cast<const char*>(op.src) + (from - op_start), to - from);
    }
    if (op_end >= end) break;
    op_start = op_end;
  }
}

}  // namespace

uint64_t CopyHostMemory(const std::vector<CopyOp>& ops, int threads, size_t parallel_min_bytes) {
  uint64_t total = 0;
  for (const CopyOp& op : ops) total += op.bytes;
  if (threads <= 1 || total < parallel_min_bytes) {
    for (const CopyOp& op : ops) {
      if (op.bytes != 0) std::memcpy(op.dst, op.src, op.bytes);
    }
    return total;
  }
  // Shares are page-aligned so that two threads do not fault in the same destination page.
  constexpr uint64_t kPage = 4096;
  const uint64_t share = (total / threads + kPage - 1) / kPage * kPage;
  std::vector<std::thread> workers;
  uint64_t next = share;  // the calling thread takes [0, share)
  while (next < total && workers.size() + 1 < static_cast<size_t>(threads)) {
    const uint64_t begin = next;
    const uint64_t end = std::min(total, begin + share);
    try {
      workers.emplace_back(CopyByteRange, std::cref(ops), begin, end);
    } catch (const std::system_error&) {
      break;  // no thread to be had: the calling thread copies the rest
    }
    next = end;
  }
  CopyByteRange(ops, 0, std::min(total, share));
  if (next < total) CopyByteRange(ops, next, total);
  for (std::thread& worker : workers) worker.join();
  return total;
}

HostCopyEngine::HostCopyEngine(const CopyEngineOptions& options, std::string reason)
    : options_(options), reason_(std::move(reason)) {}

HostCopyEngine::~HostCopyEngine() = default;

std::string HostCopyEngine::Describe() const { return absl::StrCat("host (", reason_, ")"); }

absl::Status HostCopyEngine::RegisterHost(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("RegisterHost: empty range (",
                                                   ptr == nullptr ? "null" : "non-null",
                                                   " pointer, ", bytes, " bytes)"));
  }
  return absl::OkStatus();
}

absl::Status HostCopyEngine::UnregisterHost(void* ptr) {
  if (ptr == nullptr) return absl::InvalidArgumentError("UnregisterHost: null pointer");
  return absl::OkStatus();
}

absl::StatusOr<MemoryKind> HostCopyEngine::Locate(const void* ptr) {
  if (ptr == nullptr) return absl::InvalidArgumentError("Locate: null pointer");
  return MemoryKind::kHost;
}

absl::StatusOr<uint64_t> HostCopyEngine::MarkSnapshotPoint(void* /*compute_stream*/) {
  absl::MutexLock lock(&mu_);
  ++stats_.tickets;
  return tickets_.Mark();
}

absl::Status HostCopyEngine::IssueCopies(uint64_t ticket, const std::vector<CopyOp>& ops) {
  absl::MutexLock issue_lock(&issue_mu_);
  {
    absl::MutexLock lock(&mu_);
    TESSERA_RETURN_IF_ERROR(tickets_.CheckIssuable(ticket));
    tickets_.BeginIssue(ticket);
  }
  absl::Status status = ValidateCopyOps(ops);
  uint64_t bytes = 0;
  if (status.ok()) {
    bytes = CopyHostMemory(ops, options_.host_copy_threads, options_.host_parallel_min_bytes);
  }
  absl::MutexLock lock(&mu_);
  tickets_.EndIssue(ticket, status);
  stats_.bytes_host_to_host += bytes;
  return status;
}

absl::Status HostCopyEngine::Fence(void* /*stream*/) {
  absl::MutexLock lock(&mu_);
  AwaitAllIssued(mu_, tickets_, absl::Milliseconds(options_.fence_issue_timeout_ms), stats_);
  return absl::OkStatus();
}

absl::Status HostCopyEngine::WaitCopies(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  return tickets_.Outcome(ticket);
}

absl::Status HostCopyEngine::CopySync(const std::vector<CopyOp>& ops) {
  TESSERA_RETURN_IF_ERROR(ValidateCopyOps(ops));
  const uint64_t bytes =
      CopyHostMemory(ops, options_.host_copy_threads, options_.host_parallel_min_bytes);
  absl::MutexLock lock(&mu_);
  stats_.bytes_copied_sync += bytes;
  return absl::OkStatus();
}

CopyEngineStats HostCopyEngine::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tessera::cuda::internal
