// CRC32C of a snapshot's device-to-host bytes computed on the GPU, on a stream of its own, beside
// the copies that read the same bytes: the host spends no pass over them, so the checksum keeps
// up with any copy rate (the kernel reads GPU memory at several hundred GB/s; the host's CRC32C
// runs at about 10 GB/s per core).
//
// For one ticket, with the copy engine's copy and staging streams:
//
//   staging stream: wait(snapshot point) -> staging D2D, group by group -> staged_ready
//                   -> wait(direct D2H done) -> wait(direct_read) -> released
//   copy stream: wait(snapshot point) -> direct D2H -> staged D2H, each group after its
//                staging -> wait(done) -> copies done
//   checksum stream: wait(snapshot point) -> direct pieces -> direct_read
//                    -> wait(staged_ready) -> staged pieces -> results -> done
//
// The direct pieces are read from the sources, so the sources are released (Fence) only once the
// kernel has read them; the staged pieces are read from the staging buffer, which the next
// ticket overwrites only after `done`. The checksum is of the bytes the copies read: bytes that
// change after they were read (or a copy that delivered other bytes) fail the restore's check.
//
// Internal to //cuda:copy_engine. Thread-safe.
#ifndef TESSERA_CUDA_DEVICE_CHECKSUM_H_
#define TESSERA_CUDA_DEVICE_CHECKSUM_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cuda/checksum_queue.h"

namespace tessera::cuda::internal {

class DeviceChecksummer {
 public:
  // Device memory to checksum: `bytes` at `data`, which are bytes [offset, offset + bytes) of
  // range `range`.
  struct Piece {
    size_t range;
    uint64_t offset;
    const void* data;
    uint64_t bytes;
  };
  struct Scratch;
  // One ticket's work in flight. The copy stream waits for `direct_read` before the sources are
  // released and for `done` before the ticket's copies count as done; both are null when there
  // was nothing to checksum.
  struct Pending {
    cudaEvent_t direct_read = nullptr;
    cudaEvent_t done = nullptr;
    std::vector<PieceChecksum> pieces;  // crc filled in by Finish
    std::unique_ptr<Scratch> scratch;
    Pending();
    Pending(Pending&&) noexcept;
    Pending& operator=(Pending&&) noexcept;
    ~Pending();
  };

  // A checksum stream on the calling thread's current device.
  static absl::StatusOr<std::unique_ptr<DeviceChecksummer>> Create();
  // REQUIRES: the current device is this one's. A Pending may outlive it.
  ~DeviceChecksummer();
  DeviceChecksummer(const DeviceChecksummer&) = delete;
  DeviceChecksummer& operator=(const DeviceChecksummer&) = delete;

  // Enqueues the checksums of `direct` once `sources_ready` has passed, and of `staged` once
  // `staged_on` reaches the point it is at now (the staging copies just enqueued on it). Pieces
  // must be at least 1 byte. On error nothing is left in flight.
  absl::StatusOr<Pending> Enqueue(const std::vector<Piece>& direct,
                                  const std::vector<Piece>& staged, cudaEvent_t sources_ready,
                                  cudaStream_t staged_on);

  // Waits for `pending` and returns each range's checksums (CombinePieces).
  absl::StatusOr<std::vector<RangeChecksum>> Finish(Pending pending, uint64_t block_bytes,
                                                    const std::vector<uint64_t>& range_bytes);

  // Waits for `pending`'s work (if any) and drops its results.
  void Abandon(Pending pending);

 private:
  explicit DeviceChecksummer(cudaStream_t stream);
  absl::StatusOr<std::unique_ptr<Scratch>> AcquireScratch(size_t pieces, uint64_t tiles);
  void ReleaseScratch(std::unique_ptr<Scratch> scratch);

  cudaStream_t const stream_;
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Scratch>> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera::cuda::internal

#endif  // TESSERA_CUDA_DEVICE_CHECKSUM_H_
