// The CRC32C of byte ranges that become readable over time (device-to-host copies landing chunk
// by chunk), computed on a few worker threads beside the copies that fill them, so that a
// snapshot's checksum is known within a piece of its last copy's end.
//
//   auto batch = queue.Submit({range_bytes...}, {pieces in the order they land...}, {waits...});
//   ... the copies run ...
//   absl::StatusOr<std::vector<uint32_t>> crcs = batch->Wait();  // one per range
//
// Each piece names its range, its offset in the range, its bytes, and the wait (a callable that
// blocks until those bytes have landed, e.g. a CUDA event's synchronize) it must pass first. A
// wait shared by many pieces runs until one of them sees it succeed. Workers take pieces in the
// order given across batches, so pieces of the first chunk to land are checksummed first.
//
// Internal to //cuda:copy_engine. Thread-safe.
#ifndef TESSERA_CUDA_CHECKSUM_QUEUE_H_
#define TESSERA_CUDA_CHECKSUM_QUEUE_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tessera::cuda::internal {

class ChecksumBatch;

// A range's CRC32C, and of each of its blocks (the last one shorter).
struct RangeChecksum {
  uint32_t crc = 0;
  std::vector<uint32_t> blocks;
};

// The CRC32C of `bytes` bytes at `offset` in range `range`, computed elsewhere.
struct PieceChecksum {
  size_t range;
  uint64_t offset;
  uint64_t bytes;
  uint32_t crc;
};

// Each range's checksums from its pieces' (in any order), which must tile each range
// [0, range_bytes[r]) without gaps or overlaps, none crossing a multiple of `block_bytes`
// (kInternal, saying where, otherwise).
absl::StatusOr<std::vector<RangeChecksum>> CombinePieces(uint64_t block_bytes,
                                                         const std::vector<uint64_t>& range_bytes,
                                                         std::vector<PieceChecksum> pieces);

class ChecksumQueue {
 public:
  struct Piece {
    size_t range;
    uint64_t offset;  // within the range
    const void* data;
    size_t bytes;
    int wait;  // index into the batch's waits; -1: readable now
  };
  // Blocks until some bytes are readable; OK, or why they never will be.
  using Wait = std::function<absl::Status()>;

  // `threads` workers (at least 1), started by the first Submit.
  explicit ChecksumQueue(int threads);
  // Finishes every piece queued.
  ~ChecksumQueue();
  ChecksumQueue(const ChecksumQueue&) = delete;
  ChecksumQueue& operator=(const ChecksumQueue&) = delete;

  // Queues `pieces`, which must tile each range [0, range_bytes[i]) without gaps or overlaps,
  // none crossing a multiple of `block_bytes` (checked by ChecksumBatch::Wait). Pieces with a
  // wait index out of range count as failed.
  std::shared_ptr<ChecksumBatch> Submit(uint64_t block_bytes, std::vector<uint64_t> range_bytes,
                                        std::vector<Piece> pieces, std::vector<Wait> waits);

  int threads() const { return threads_; }

 private:
  struct Task {
    std::shared_ptr<ChecksumBatch> batch;
    size_t piece;
  };
  void WorkerLoop();

  const int threads_;
  absl::Mutex mu_;
  std::deque<Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);
};

// One Submit's pieces and their results.
class ChecksumBatch {
 public:
  // Blocks until every piece is checksummed. The checksums of each range, its pieces combined in
  // offset order; or the first error of a wait (kInternal if the pieces did not tile a range or
  // one crossed a block boundary).
  absl::StatusOr<std::vector<RangeChecksum>> Wait();

 private:
  friend class ChecksumQueue;
  ChecksumBatch(uint64_t block_bytes, std::vector<uint64_t> range_bytes,
                std::vector<ChecksumQueue::Piece> pieces, std::vector<ChecksumQueue::Wait> waits);
  // Passes piece i's wait and checksums it (on a worker).
  void Run(size_t i);

  const uint64_t block_bytes_;
  const std::vector<uint64_t> range_bytes_;
  const std::vector<ChecksumQueue::Piece> pieces_;
  const std::vector<ChecksumQueue::Wait> waits_;
  absl::Mutex mu_;
  std::vector<uint32_t> crcs_ ABSL_GUARDED_BY(mu_);   // per piece
  std::vector<bool> passed_ ABSL_GUARDED_BY(mu_);     // per wait: seen to succeed
  size_t remaining_ ABSL_GUARDED_BY(mu_);
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera::cuda::internal

#endif  // TESSERA_CUDA_CHECKSUM_QUEUE_H_
