#include "cuda/device_checksum.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "cuda/copy_engine.h"
#include "cuda/crc32c_kernel.h"

namespace tessera::cuda::internal {

// Pinned host memory for the piece list and the results, device memory for the piece list, the
// results and the tiles' CRCs, and the ticket's events. Reused across tickets; grown as needed.
struct DeviceChecksummer::Scratch {
  size_t piece_capacity = 0;
  uint64_t tile_capacity = 0;
  void* host = nullptr;    // DeviceCrcPiece[piece_capacity], then uint32_t[piece_capacity]
  void* device = nullptr;  // the same, then uint32_t[tile_capacity]
  cudaEvent_t staged_ready = nullptr;
  cudaEvent_t direct_read = nullptr;
  cudaEvent_t done = nullptr;  // blocking sync: Finish sleeps instead of spinning

  DeviceCrcPiece* host_pieces() { return static_cast<DeviceCrcPiece*>(host); }
  uint32_t* host_crcs() { return reinterpret_cast<uint32_t*>(host_pieces() + piece_capacity); }
  DeviceCrcPiece* device_pieces() { return static_cast<DeviceCrcPiece*>(device); }
  uint32_t* device_crcs() { return reinterpret_cast<uint32_t*>(device_pieces() + piece_capacity); }
  uint32_t* device_tiles() { return device_crcs() + piece_capacity; }

  void FreeMemory() {
    if (host != nullptr) cudaFreeHost(host);
    if (device != nullptr) cudaFree(device);
    cudaGetLastError();
    host = device = nullptr;
    piece_capacity = tile_capacity = 0;
  }
  ~Scratch() {
    // Work still in flight (an abandoned ticket) finishes before its memory goes.
    if (done != nullptr) cudaEventSynchronize(done);
    FreeMemory();
    for (cudaEvent_t event : {staged_ready, direct_read, done}) {
      if (event != nullptr) cudaEventDestroy(event);
    }
    cudaGetLastError();
  }
};

DeviceChecksummer::Pending::Pending() = default;
DeviceChecksummer::Pending::Pending(Pending&&) noexcept = default;
DeviceChecksummer::Pending& DeviceChecksummer::Pending::operator=(Pending&&) noexcept = default;
DeviceChecksummer::Pending::~Pending() = default;

absl::StatusOr<std::unique_ptr<DeviceChecksummer>> DeviceChecksummer::Create() {
  cudaStream_t stream = nullptr;
  TESSERA_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                     "cudaStreamCreateWithFlags(checksum stream)"));
  return std::unique_ptr<DeviceChecksummer>(new DeviceChecksummer(stream));
}

DeviceChecksummer::DeviceChecksummer(cudaStream_t stream) : stream_(stream) {}

DeviceChecksummer::~DeviceChecksummer() {
  cudaStreamSynchronize(stream_);
  {
    absl::MutexLock lock(&mu_);
    free_.clear();
  }
  cudaStreamDestroy(stream_);
  cudaGetLastError();
}

absl::StatusOr<std::unique_ptr<DeviceChecksummer::Scratch>> DeviceChecksummer::AcquireScratch(
    size_t pieces, uint64_t tiles) {
  std::unique_ptr<Scratch> scratch;
  {
    absl::MutexLock lock(&mu_);
    if (!free_.empty()) {
      scratch = std::move(free_.back());
      free_.pop_back();
    }
  }
  if (scratch == nullptr) {
    scratch = std::make_unique<Scratch>();
    TESSERA_RETURN_IF_ERROR(CudaStatus(
        cudaEventCreateWithFlags(&scratch->staged_ready, cudaEventDisableTiming),
        "cudaEventCreateWithFlags(staged)"));
    TESSERA_RETURN_IF_ERROR(CudaStatus(
        cudaEventCreateWithFlags(&scratch->direct_read, cudaEventDisableTiming),
        "cudaEventCreateWithFlags(sources read)"));
    TESSERA_RETURN_IF_ERROR(CudaStatus(
        cudaEventCreateWithFlags(&scratch->done, cudaEventDisableTiming | cudaEventBlockingSync),
        "cudaEventCreateWithFlags(checksums done)"));
  }
  if (pieces > scratch->piece_capacity || tiles > scratch->tile_capacity) {
    // Grown with room to spare, so that a slowly growing layout does not reallocate each time;
    // the memory was last used by a finished ticket, so nothing is in flight in it.
    const size_t piece_capacity = std::max(pieces + pieces / 4, scratch->piece_capacity);
    const uint64_t tile_capacity = std::max(tiles + tiles / 4, scratch->tile_capacity);
    scratch->FreeMemory();
    const size_t host_bytes = piece_capacity * (sizeof(DeviceCrcPiece) + sizeof(uint32_t));
    const size_t device_bytes = host_bytes + tile_capacity * sizeof(uint32_t);
    TESSERA_RETURN_IF_ERROR(CudaStatus(cudaMallocHost(&scratch->host, host_bytes),
                                       absl::StrCat("cudaMallocHost(", host_bytes, " bytes)")));
    const absl::Status allocated = CudaStatus(
        cudaMalloc(&scratch->device, device_bytes), absl::StrCat("cudaMalloc(", device_bytes,
                                                                 " bytes of checksum scratch)"));
    if (!allocated.ok()) {
      scratch->FreeMemory();
      return allocated;
    }
    scratch->piece_capacity = piece_capacity;
    scratch->tile_capacity = tile_capacity;
  }
  return scratch;
}

void DeviceChecksummer::ReleaseScratch(std::unique_ptr<Scratch> scratch) {
  if (scratch == nullptr) return;
  absl::MutexLock lock(&mu_);
  free_.push_back(std::move(scratch));
}

absl::StatusOr<DeviceChecksummer::Pending> DeviceChecksummer::Enqueue(
    const std::vector<Piece>& direct, const std::vector<Piece>& staged,
    cudaEvent_t sources_ready, cudaStream_t staged_on) {
  Pending pending;
  const size_t count = direct.size() + staged.size();
  if (count == 0) return pending;
  uint64_t direct_tiles = 0, staged_tiles = 0;
  for (const Piece& piece : direct) direct_tiles += CrcTiles(piece.bytes);
  for (const Piece& piece : staged) staged_tiles += CrcTiles(piece.bytes);
  TESSERA_ASSIGN_OR_RETURN(pending.scratch, AcquireScratch(count, direct_tiles + staged_tiles));
  Scratch& scratch = *pending.scratch;

  // The piece list, each launch's tiles numbered from 0.
  DeviceCrcPiece* host_pieces = scratch.host_pieces();
  pending.pieces.reserve(count);
  uint64_t tile = 0;
  for (const std::vector<Piece>* list : {&direct, &staged}) {
    tile = 0;
    for (const Piece& piece : *list) {
      const uint64_t tiles = CrcTiles(piece.bytes);
      *host_pieces++ = DeviceCrcPiece{piece.data, piece.bytes, tile, tiles};
      pending.pieces.push_back({piece.range, piece.offset, piece.bytes, 0});
      tile += tiles;
    }
  }

  absl::Status status = CudaStatus(cudaStreamWaitEvent(stream_, sources_ready, 0),
                                   "cudaStreamWaitEvent(snapshot point)");
  if (status.ok()) {
    status = CudaStatus(cudaMemcpyAsync(scratch.device_pieces(), scratch.host_pieces(),
                                        count * sizeof(DeviceCrcPiece), cudaMemcpyHostToDevice,
                                        stream_),
                        "cudaMemcpyAsync(checksum pieces)");
  }
  if (status.ok()) {
    status = CudaStatus(
        LaunchRawCrc32c(scratch.device_pieces(), static_cast<uint32_t>(direct.size()), direct_tiles,
                        scratch.device_tiles(), scratch.device_crcs(), stream_),
        "CRC32C kernel (sources)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(scratch.direct_read, stream_),
                        "cudaEventRecord(sources read)");
  }
  if (status.ok() && !staged.empty()) {
    status = CudaStatus(cudaEventRecord(scratch.staged_ready, staged_on),
                        "cudaEventRecord(staged)");
    if (status.ok()) {
      status = CudaStatus(cudaStreamWaitEvent(stream_, scratch.staged_ready, 0),
                          "cudaStreamWaitEvent(staged)");
    }
    if (status.ok()) {
      status = CudaStatus(
          LaunchRawCrc32c(scratch.device_pieces() + direct.size(),
                          static_cast<uint32_t>(staged.size()), staged_tiles,
                          scratch.device_tiles() + direct_tiles,
                          scratch.device_crcs() + direct.size(), stream_),
          "CRC32C kernel (staging buffer)");
    }
  }
  if (status.ok()) {
    status = CudaStatus(cudaMemcpyAsync(scratch.host_crcs(), scratch.device_crcs(),
                                        count * sizeof(uint32_t), cudaMemcpyDeviceToHost, stream_),
                        "cudaMemcpyAsync(checksums)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(scratch.done, stream_), "cudaEventRecord(checksums done)");
  }
  if (!status.ok()) {
    cudaStreamSynchronize(stream_);  // nothing of this ticket may stay in flight
    cudaGetLastError();
    ReleaseScratch(std::move(pending.scratch));
    return status;
  }
  pending.direct_read = scratch.direct_read;
  pending.done = scratch.done;
  return pending;
}

absl::StatusOr<std::vector<RangeChecksum>> DeviceChecksummer::Finish(
    Pending pending, uint64_t block_bytes, const std::vector<uint64_t>& range_bytes) {
  if (pending.scratch != nullptr) {
    const absl::Status waited = CudaStatus(cudaEventSynchronize(pending.scratch->done),
                                           "cudaEventSynchronize(checksums done)");
    if (!waited.ok()) {
      ReleaseScratch(std::move(pending.scratch));
      return waited;
    }
    const uint32_t* raw = pending.scratch->host_crcs();
    for (size_t i = 0; i < pending.pieces.size(); ++i) {
      pending.pieces[i].crc = raw[i] ^ Crc32cOfZeros(pending.pieces[i].bytes);
    }
    ReleaseScratch(std::move(pending.scratch));
  }
  return CombinePieces(block_bytes, range_bytes, std::move(pending.pieces));
}

void DeviceChecksummer::Abandon(Pending pending) {
  if (pending.scratch == nullptr) return;
  cudaEventSynchronize(pending.scratch->done);
  cudaGetLastError();
  ReleaseScratch(std::move(pending.scratch));
}

}  // namespace tessera::cuda::internal
