#include "cuda/checksum_queue.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"

namespace tessera::cuda::internal {

ChecksumQueue::ChecksumQueue(int threads) : threads_(std::max(threads, 1)) {}

ChecksumQueue::~ChecksumQueue() {
  std::vector<std::thread> workers;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    workers.swap(workers_);
  }
  for (std::thread& worker : workers) worker.join();
}

std::shared_ptr<ChecksumBatch> ChecksumQueue::Submit(uint64_t block_bytes,
                                                     std::vector<uint64_t> range_bytes,
                                                     std::vector<Piece> pieces,
                                                     std::vector<Wait> waits) {
  std::shared_ptr<ChecksumBatch> batch(new ChecksumBatch(
      block_bytes, std::move(range_bytes), std::move(pieces), std::move(waits)));
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < batch->pieces_.size(); ++i) tasks_.push_back({batch, i});
  while (static_cast<int>(workers_.size()) < threads_) {
    try {
      workers_.emplace_back(&ChecksumQueue::WorkerLoop, this);
    } catch (const std::system_error&) {
      if (workers_.empty()) {
        // No thread to be had: checksum here, now (waiting for each piece to land).
        std::deque<Task> tasks;
        tasks.swap(tasks_);
        mu_.Unlock();
        for (const Task& task : tasks) task.batch->Run(task.piece);
        mu_.Lock();
      }
      break;
    }
  }
  return batch;
}

void ChecksumQueue::WorkerLoop() {
  for (;;) {
    Task task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ChecksumQueue* q) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return q->stopping_ || !q->tasks_.empty();
          },
          this));
      if (tasks_.empty()) return;  // stopping, and nothing left to do
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task.batch->Run(task.piece);
  }
}

ChecksumBatch::ChecksumBatch(uint64_t block_bytes, std::vector<uint64_t> range_bytes,
                             std::vector<ChecksumQueue::Piece> pieces,
                             std::vector<ChecksumQueue::Wait> waits)
    : block_bytes_(std::max<uint64_t>(block_bytes, 1)),
      range_bytes_(std::move(range_bytes)),
      pieces_(std::move(pieces)),
      waits_(std::move(waits)),
      crcs_(pieces_.size(), 0),
      passed_(waits_.size(), false),
      remaining_(pieces_.size()) {}

void ChecksumBatch::Run(size_t i) {
  const ChecksumQueue::Piece& piece = pieces_[i];
  absl::Status status;
  bool skip = false;
  {
    absl::MutexLock lock(&mu_);
    skip = !status_.ok();  // the batch failed already: its result is that error
  }
  if (!skip && piece.wait >= 0) {
    if (static_cast<size_t>(piece.wait) >= waits_.size()) {
      status = absl::InternalError(absl::StrCat("checksum piece ", i, " names wait ", piece.wait,
                                                " of ", waits_.size()));
    } else {
      bool passed;
      {
        absl::MutexLock lock(&mu_);
        passed = passed_[piece.wait];
      }
      if (!passed) status = waits_[piece.wait]();
    }
  }
  const uint32_t crc = skip || !status.ok() ? 0 : Crc32c(piece.data, piece.bytes);
  absl::MutexLock lock(&mu_);
  if (status.ok() && piece.wait >= 0 && static_cast<size_t>(piece.wait) < passed_.size()) {
    passed_[piece.wait] = true;
  }
  if (!status.ok() && status_.ok()) status_ = status;
  crcs_[i] = crc;
  --remaining_;
}

absl::StatusOr<std::vector<RangeChecksum>> ChecksumBatch::Wait() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](ChecksumBatch* b) ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->remaining_ == 0; }, this));
  if (!status_.ok()) return status_;
  std::vector<PieceChecksum> sums;
  sums.reserve(pieces_.size());
  for (size_t i = 0; i < pieces_.size(); ++i) {
    sums.push_back({pieces_[i].range, pieces_[i].offset, pieces_[i].bytes, crcs_[i]});
  }
  return CombinePieces(block_bytes_, range_bytes_, std::move(sums));
}

absl::StatusOr<std::vector<RangeChecksum>> CombinePieces(uint64_t block_bytes,
                                                         const std::vector<uint64_t>& range_bytes,
                                                         std::vector<PieceChecksum> pieces) {
  block_bytes = std::max<uint64_t>(block_bytes, 1);
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const PieceChecksum& a, const PieceChecksum& b) {
                     return std::make_pair(a.range, a.offset) < std::make_pair(b.range, b.offset);
                   });
  std::vector<RangeChecksum> out(range_bytes.size());
  for (size_t r = 0; r < out.size(); ++r) {
    out[r].blocks.assign((range_bytes[r] + block_bytes - 1) / block_bytes, 0);
  }
  std::vector<uint64_t> covered(range_bytes.size(), 0);
  for (const PieceChecksum& piece : pieces) {
    if (piece.range >= out.size() || piece.offset != covered[piece.range] || piece.bytes == 0 ||
        piece.offset + piece.bytes > range_bytes[piece.range] ||
        piece.offset / block_bytes != (piece.offset + piece.bytes - 1) / block_bytes) {
      return absl::InternalError(absl::StrCat(
          "checksum pieces do not tile range ", piece.range, " in blocks of ", block_bytes,
          ": a piece of ", piece.bytes, " bytes at offset ", piece.offset, " follows byte ",
          piece.range < out.size() ? covered[piece.range] : 0));
    }
    uint32_t& block = out[piece.range].blocks[piece.offset / block_bytes];
    block = Crc32cCombine(block, piece.crc, piece.bytes);
    out[piece.range].crc = Crc32cCombine(out[piece.range].crc, piece.crc, piece.bytes);
    covered[piece.range] += piece.bytes;
  }
  for (size_t r = 0; r < out.size(); ++r) {
    if (covered[r] != range_bytes[r]) {
      return absl::InternalError(absl::StrCat("checksum pieces cover ", covered[r], " of range ",
                                              r, "'s ", range_bytes[r], " bytes"));
    }
  }
  return out;
}

}  // namespace tessera::cuda::internal
