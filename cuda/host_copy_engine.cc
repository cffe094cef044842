#include "cuda/host_copy_engine.h"

#include <algorithm>
#include <cstring>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
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

absl::Status NoChecksums(uint64_t ticket) {
  return absl::FailedPreconditionError(absl::StrCat(
      "ticket ", ticket, " has no checksums: it was not issued by IssueChecksummedCopies, or they "
      "were taken already"));
}

namespace {

// The CRC32C of bytes [offset, offset + bytes) of op `op`'s destination.
struct CrcPart {
  size_t op;
  uint64_t offset;
  uint64_t bytes;
  uint32_t crc;
};

// Copied, then checksummed from the cache while it is still there: a block fits a core's L2.
constexpr uint64_t kChecksumBlock = uint64_t{256} << 10;

// Copies bytes [begin, end) of the concatenation of `ops`' sources to the same range of their
// destinations; with `parts`, appends the CRC32C of each op's part of the range, in order, cut
// at the multiples of `block_bytes` within each op.
void CopyByteRange(const std::vector<CopyOp>& ops, uint64_t begin, uint64_t end,
                   std::vector<CrcPart>* parts, uint64_t block_bytes) {
  uint64_t op_start = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    const CopyOp& op = ops[i];
    const uint64_t op_end = op_start + op.bytes;
    const uint64_t from = std::max(begin, op_start);
    const uint64_t to = std::min(end, op_end);
    if (from < to) {
      char* dst = static_cast<char*>(op.dst) + (from - op_start);
      const char* src = static_cast<const char*>(op.src) + (from - op_start);
      if (parts == nullptr) {
        std::memcpy(dst, src, to - from);
      } else {
        for (uint64_t at = from - op_start; at < to - op_start;) {
          const uint64_t part_end = std::min(to - op_start, (at / block_bytes + 1) * block_bytes);
          uint32_t crc = 0;
          for (uint64_t done = at; done < part_end; done += kChecksumBlock) {
            const uint64_t n = std::min(kChecksumBlock, part_end - done);
            char* d = static_cast<char*>(op.dst) + done;
            std::memcpy(d, static_cast<const char*>(op.src) + done, n);
            crc = Crc32c(d, n, crc);
          }
          parts->push_back({i, at, part_end - at, crc});
          at = part_end;
        }
      }
    }
    if (op_end >= end) break;
    op_start = op_end;
  }
}

}  // namespace

uint64_t CopyHostMemory(const std::vector<CopyOp>& ops, int threads, size_t parallel_min_bytes,
                        std::vector<OpChecksum>* crcs, uint64_t block_bytes) {
  uint64_t total = 0;
  for (const CopyOp& op : ops) total += op.bytes;
  block_bytes = std::max<uint64_t>(block_bytes, 1);
  if (crcs != nullptr) {
    crcs->assign(ops.size(), OpChecksum{});
    for (size_t i = 0; i < ops.size(); ++i) {
      (*crcs)[i].blocks.assign((ops[i].bytes + block_bytes - 1) / block_bytes, 0);
    }
  }
  // Shares are page-aligned so that two threads do not fault in the same destination page.
  constexpr uint64_t kPage = 4096;
  const bool split = threads > 1 && total >= parallel_min_bytes;
  const uint64_t share = split ? (total / threads + kPage - 1) / kPage * kPage : total;
  std::vector<std::thread> workers;
  // One list of parts per share, in byte order: the calling thread's first, the leftover last.
  std::vector<std::vector<CrcPart>> parts(split ? threads + 1 : 1);
  auto parts_of = [&](size_t k) { return crcs == nullptr ? nullptr : &parts[k]; };
  uint64_t next = share;  // the calling thread takes [0, share)
  while (split && next < total && workers.size() + 1 < static_cast<size_t>(threads)) {
    const uint64_t begin = next;
    const uint64_t end = std::min(total, begin + share);
    try {
      workers.emplace_back(CopyByteRange, std::cref(ops), begin, end, parts_of(workers.size() + 1),
                           block_bytes);
    } catch (const std::system_error&) {
      break;  // no thread to be had: the calling thread copies the rest
    }
    next = end;
  }
  CopyByteRange(ops, 0, std::min(total, share), parts_of(0), block_bytes);
  if (next < total) CopyByteRange(ops, next, total, parts_of(parts.size() - 1), block_bytes);
  for (std::thread& worker : workers) worker.join();
  if (crcs != nullptr) {
    for (const std::vector<CrcPart>& list : parts) {
      for (const CrcPart& part : list) {
        OpChecksum& sum = (*crcs)[part.op];
        uint32_t& block = sum.blocks[part.offset / block_bytes];
        block = Crc32cCombine(block, part.crc, part.bytes);
        sum.crc = Crc32cCombine(sum.crc, part.crc, part.bytes);
      }
    }
  }
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
  return Issue(ticket, ops, /*checksum=*/false);
}

absl::Status HostCopyEngine::IssueChecksummedCopies(uint64_t ticket,
                                                    const std::vector<CopyOp>& ops) {
  return Issue(ticket, ops, /*checksum=*/true);
}

absl::Status HostCopyEngine::Issue(uint64_t ticket, const std::vector<CopyOp>& ops,
                                   bool checksum) {
  absl::MutexLock issue_lock(&issue_mu_);
  {
    absl::MutexLock lock(&mu_);
    TESSERA_RETURN_IF_ERROR(tickets_.CheckIssuable(ticket));
    tickets_.BeginIssue(ticket);
  }
  absl::Status status = ValidateCopyOps(ops);
  uint64_t bytes = 0;
  std::vector<OpChecksum> crcs;
  if (status.ok()) {
    bytes = CopyHostMemory(ops, options_.host_copy_threads, options_.host_parallel_min_bytes,
                           checksum ? &crcs : nullptr, options_.checksum_block_bytes);
  }
  absl::MutexLock lock(&mu_);
  tickets_.EndIssue(ticket, status);
  stats_.bytes_host_to_host += bytes;
  if (status.ok() && checksum) {
    stats_.bytes_checksummed += bytes;
    checksums_[ticket] = std::move(crcs);
    // Bounded even for a caller that never takes them.
    while (checksums_.size() > kMaxUntakenChecksums) checksums_.erase(checksums_.begin());
  }
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

absl::StatusOr<std::vector<OpChecksum>> HostCopyEngine::WaitChecksums(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  TESSERA_RETURN_IF_ERROR(tickets_.Outcome(ticket));
  auto it = checksums_.find(ticket);
  if (it == checksums_.end()) return NoChecksums(ticket);
  std::vector<OpChecksum> crcs = std::move(it->second);
  checksums_.erase(it);
  return crcs;
}

absl::Status ValidateExpectedBlocks(const std::vector<CopyOp>& ops,
                                    const std::vector<std::vector<uint32_t>>& expected,
                                    uint64_t block_bytes) {
  if (expected.empty()) return absl::OkStatus();
  if (block_bytes == 0) {
    return absl::InvalidArgumentError("verified copy: block_bytes is 0; it must be at least 1");
  }
  if (expected.size() != ops.size()) {
    return absl::InvalidArgumentError(absl::StrCat("verified copy: ", expected.size(),
                                                   " lists of block CRCs for ", ops.size(),
                                                   " ops; give one per op (empty: unverified)"));
  }
  for (size_t i = 0; i < ops.size(); ++i) {
    const uint64_t blocks = (ops[i].bytes + block_bytes - 1) / block_bytes;
    if (!expected[i].empty() && expected[i].size() != blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "verified copy: op ", i, " of ", ops[i].bytes, " bytes has ", expected[i].size(),
          " block CRCs; blocks of ", block_bytes, " bytes make ", blocks));
    }
  }
  return absl::OkStatus();
}

absl::Status BlockMismatch(size_t index, uint64_t block, uint64_t block_bytes, uint64_t op_bytes,
                           uint32_t actual, uint32_t expected, const char* where) {
  const uint64_t offset = block * block_bytes;
  return absl::DataLossError(absl::StrCat(
      "bytes [", offset, ", +", std::min(block_bytes, op_bytes - offset), ") of copy op ", index,
      " have CRC32C 0x", absl::Hex(actual), where, ", not the 0x", absl::Hex(expected),
      " recorded when they were snapshotted"));
}

absl::Status CheckSourceBlocks(size_t index, const CopyOp& op,
                               const std::vector<uint32_t>& expected, uint64_t block_bytes,
                               uint64_t offset, uint64_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  const uint64_t last = std::min<uint64_t>((offset + bytes - 1) / block_bytes, expected.size() - 1);
  for (uint64_t b = offset / block_bytes; b <= last; ++b) {
    const uint64_t from = b * block_bytes;
    const uint32_t crc = Crc32c(static_cast<const char*>(op.src) + from,
                                std::min(block_bytes, op.bytes - from));
    if (crc != expected[b]) {
      return BlockMismatch(index, b, block_bytes, op.bytes, crc, expected[b], "");
    }
  }
  return absl::OkStatus();
}

absl::Status HostCopyEngine::CopySync(const std::vector<CopyOp>& ops) {
  TESSERA_RETURN_IF_ERROR(ValidateCopyOps(ops));
  const uint64_t bytes =
      CopyHostMemory(ops, options_.host_copy_threads, options_.host_parallel_min_bytes);
  absl::MutexLock lock(&mu_);
  stats_.bytes_copied_sync += bytes;
  return absl::OkStatus();
}

absl::Status HostCopyEngine::CopySyncChecked(const std::vector<CopyOp>& ops,
                                             const BeforeCopy& before) {
  TESSERA_RETURN_IF_ERROR(ValidateCopyOps(ops));
  uint64_t bytes = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].bytes == 0) continue;
    TESSERA_RETURN_IF_ERROR(before(i, 0, ops[i].bytes));
    bytes += CopyHostMemory({ops[i]}, options_.host_copy_threads, options_.host_parallel_min_bytes);
  }
  absl::MutexLock lock(&mu_);
  stats_.bytes_copied_sync += bytes;
  return absl::OkStatus();
}

CopyEngineStats HostCopyEngine::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tessera::cuda::internal
