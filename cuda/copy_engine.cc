#include "cuda/copy_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <map>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status.h"
#include "cuda/checksum_queue.h"
#include "cuda/device_checksum.h"
#include "cuda/host_copy_engine.h"

namespace tessera::cuda {

absl::Status CudaStatus(int cuda_error, absl::string_view call) {
  const auto error = static_cast<cudaError_t>(cuda_error);
  if (error == cudaSuccess) return absl::OkStatus();
  // The runtime also keeps the error as the thread's last error; a later, unrelated launch check
  // (cudaGetLastError) must not report it again. Sticky errors stay whatever is done here.
  cudaGetLastError();
  const std::string message =
      absl::StrCat(call, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")");
  switch (error) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
      return absl::InvalidArgumentError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorHostMemoryAlreadyRegistered:
      return absl::AlreadyExistsError(message);
    case cudaErrorHostMemoryNotRegistered:
      return absl::NotFoundError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

CopyEngine::~CopyEngine() = default;

absl::Status CopyEngine::CopySyncVerified(const std::vector<CopyOp>& ops, const BeforeCopy& before,
                                          const std::vector<std::vector<uint32_t>>& expected,
                                          uint64_t block_bytes) {
  TESSERA_RETURN_IF_ERROR(internal::ValidateExpectedBlocks(ops, expected, block_bytes));
  return CopySyncChecked(ops, [&](size_t op, uint64_t offset, uint64_t bytes) -> absl::Status {
    if (op < expected.size() && !expected[op].empty()) {
      return internal::CheckSourceBlocks(op, ops[op], expected[op], block_bytes, offset, bytes);
    }
    return before ? before(op, offset, bytes) : absl::OkStatus();
  });
}

absl::Status ValidateStagingOptions(const StagingOptions& options) {
  if (!(options.budget_free_fraction > 0 && options.budget_free_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging budget_free_fraction is ", options.budget_free_fraction,
                     "; it must be in (0, 1]"));
  }
  TESSERA_RETURN_IF_ERROR(ParseStagingMode(StagingModeName(options.mode)).status());
  return absl::OkStatus();
}

absl::Status CopyEngine::SetStaging(const StagingOptions& options) {
  return ValidateStagingOptions(options);
}

namespace {

std::shared_ptr<spdlog::logger> Log() { return Logger("copy-engine"); }

// Makes a device current on the calling thread for the scope and restores the previous one, so
// that the engine can be used from threads whose current device is another (or none yet).
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

  absl::Status Enter(int device) {
    int current = 0;
    TESSERA_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&current), "cudaGetDevice"));
    if (current == device) return absl::OkStatus();
    TESSERA_RETURN_IF_ERROR(
        CudaStatus(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")")));
    previous_ = current;
    return absl::OkStatus();
  }

 private:
  int previous_ = -1;
};

enum class Where { kDevice, kRegisteredHost, kPageableHost };

absl::StatusOr<Where> Classify(const void* ptr, absl::string_view what) {
  cudaPointerAttributes attributes;
  TESSERA_RETURN_IF_ERROR(CudaStatus(cudaPointerGetAttributes(&attributes, ptr),
                                     absl::StrCat("cudaPointerGetAttributes(", what, ")")));
  switch (attributes.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return Where::kDevice;
    case cudaMemoryTypeHost:
      return Where::kRegisteredHost;
    default:
      return Where::kPageableHost;
  }
}

struct TransferCounts {
  uint64_t device_to_host = 0;
  uint64_t device_to_pageable_host = 0;
  uint64_t device_to_device = 0;
  uint64_t host_to_device = 0;
  uint64_t host_to_host = 0;
  uint64_t chunks = 0;

  uint64_t total() const {
    return device_to_host + device_to_device + host_to_device + host_to_host;
  }
};

// A ticket's events: its snapshot point; the point on the copy stream after which its sources
// are no longer read (staged bytes are in the staging buffer by then); the end of its copies.
// Reused once the copies are complete.
struct EventPair {
  cudaEvent_t start = nullptr;
  cudaEvent_t released = nullptr;
  cudaEvent_t done = nullptr;
};

void DestroyEvents(const EventPair& events) {
  cudaEventDestroy(events.start);
  cudaEventDestroy(events.released);
  cudaEventDestroy(events.done);
}

// A copy op after classification.
struct RoutedOp {
  CopyOp op;
  size_t index;  // in the ops given
  Where src;
  Where dst;
  // Bytes [stage_from, op.bytes) go through the staging buffer, at staging offset stage_offset.
  size_t stage_from;
  size_t stage_offset = 0;

  bool staged() const { return stage_from < op.bytes; }
};

const char* Direction(const RoutedOp& r) {
  if (r.src != Where::kDevice) return "H2D";
  return r.dst == Where::kDevice ? "D2D" : "D2H";
}

constexpr size_t kStagingAlignment = 256;

// The staged bytes go to the host in groups, each after the staging copies up to its end: the
// first group is one chunk, each next twice the one before, the last takes the rest. So the
// device-to-host copy of an all-staged snapshot starts after one chunk's staging instead of all
// of it, and the staging (at HBM speed) stays ahead.
constexpr int kStagingGroups = 16;

size_t AlignUp(size_t value, size_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// The engine on one CUDA device. Copies run on its own non-blocking stream.
//
// Locking: issue_mu_ serialises the users of copy_stream_ (IssueCopies, CopySync), which enqueue
// without holding mu_, so that MarkSnapshotPoint and Fence on the trainer thread never wait for
// a long enqueue. mu_ guards the ticket state and the event pool. Outside mu_, a ticket's events
// are used only by the thread issuing it and by WaitCopies, which pins them (waiters); they go
// back to the pool, under mu_, once their copies are complete and neither holds them.
class CudaCopyEngine final : public CopyEngine {
 public:
  // Opens `device` (-1: the current one). The error message says why the GPU path is off.
  static absl::StatusOr<std::unique_ptr<CopyEngine>> Open(int device,
                                                          const CopyEngineOptions& options);
  ~CudaCopyEngine() override;

  bool has_gpu() const override { return true; }
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
  absl::Status CopySyncVerified(const std::vector<CopyOp>& ops, const BeforeCopy& before,
                                const std::vector<std::vector<uint32_t>>& expected,
                                uint64_t block_bytes) override;
  CopyEngineStats stats() const override;
  absl::Status SetStaging(const StagingOptions& options) override;

 private:
  // What IssueChecksummedCopies leaves for WaitChecksums: the host copies' checksums, and the
  // batch checksumming the device-to-host chunks (one range per such op) as they land.
  struct TicketChecksums {
    std::vector<OpChecksum> crcs;          // per op; the host copies' filled in
    std::vector<size_t> range_ops;         // the ranges: op indices
    std::vector<uint64_t> range_bytes;
    std::shared_ptr<internal::ChecksumBatch> batch;
    std::vector<cudaEvent_t> chunk_events; // back to the pool once the batch is done
    std::optional<internal::DeviceChecksummer::Pending> device;  // checksummed on the GPU
    internal::DeviceChecksummer* checksummer = nullptr;           // the engine's, for `device`
  };
  // Where EnqueueChunks records each chunk's landing and the pieces to checksum after it.
  struct ChunkSink {
    size_t range;
    uint64_t offset;  // of the first chunk within its op
    std::vector<internal::ChecksumQueue::Piece>* pieces;
    std::vector<cudaEvent_t>* events;
  };

  absl::Status Issue(uint64_t ticket, const std::vector<CopyOp>& ops, bool checksum);
  // CopySyncChecked; with `expected` (non-null), ops to device memory that have expected block
  // CRCs are verified on the GPU (CopySyncVerified), other ops with them on the host.
  absl::Status CopySyncImpl(const std::vector<CopyOp>& ops, const BeforeCopy& before,
                            const std::vector<std::vector<uint32_t>>* expected,
                            uint64_t block_bytes);
  // Whether device-to-host bytes are checksummed on the GPU: the option, and a checksum stream
  // (created on first use; if that fails, logged once and the host threads are used).
  bool ChecksumOnDevice() ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  // Enqueues the GPU checksums of the device ops' sources (and staged bytes), cut at blocks.
  absl::StatusOr<internal::DeviceChecksummer::Pending> EnqueueDeviceChecksums(
      const std::vector<RoutedOp>& device_ops, cudaEvent_t sources_ready,
      cudaStream_t staged_on) ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  uint64_t BlockBytes() const { return options_.checksum_block_bytes; }
  // A blocking-sync event for a chunk's landing, from the pool or new.
  absl::StatusOr<cudaEvent_t> AcquireChunkEvent();
  void ReleaseChunkEvents(const std::vector<cudaEvent_t>& events);

  // The events of a ticket handed out and not yet retired.
  struct TicketEvents {
    EventPair events;
    bool complete = false;
    int waiters = 0;  // threads in cudaEventSynchronize(events.done)
  };

  // The staging stream: staging copies (device to device) run on it beside the copy stream's
  // device-to-host copies of the bytes not staged, and the staged bytes go to the host, on the
  // copy stream, group by group as their staging completes.
  struct StagingStream {
    cudaStream_t stream = nullptr;
    cudaEvent_t go = nullptr;           // on the copy stream: the snapshot point, the buffer free
    cudaEvent_t direct_done = nullptr;  // on the copy stream: the bytes not staged are copied
    std::array<cudaEvent_t, kStagingGroups> staged{};  // on the staging stream: group g staged
  };
  // A contiguous piece of an op's staged bytes, and the group it goes to the host with.
  struct StagedPiece {
    size_t op;      // in device_ops
    uint64_t from;  // offset within the op
    uint64_t bytes;
    int group;
  };

  // Timing events of the staging plan's measurements.
  struct MeasurementEvents {
    cudaEvent_t window_start = nullptr;  // on the compute stream, at a snapshot point
    cudaEvent_t window_end = nullptr;    // on the compute stream, at the next Fence
    cudaEvent_t copy_begin = nullptr;    // on the copy stream: staging and copies start
    cudaEvent_t staged = nullptr;        // on the staging stream: staging done
    cudaEvent_t copy_end = nullptr;      // on the copy stream: device-to-host copies done
  };
  enum class Window { kIdle, kStarted, kEnded };

  CudaCopyEngine(int device, std::string name, const CopyEngineOptions& options,
                 cudaStream_t copy_stream, cudaEvent_t restore_event,
                 const MeasurementEvents& measure, const StagingStream& staging_stream,
                 bool memory_pools);

  // Sorts `ops` into those that involve device memory (`device_ops`) and host-to-host ones
  // (`host_ops`), counting bytes by direction.
  absl::Status RouteOps(const std::vector<CopyOp>& ops, std::vector<RoutedOp>* device_ops,
                        std::vector<CopyOp>* host_ops, TransferCounts* counts,
                        std::vector<size_t>* host_indices = nullptr);
  // Enqueues one copy on `stream` (null: copy_stream_) in chunks of options_.chunk_bytes. With
  // a sink, records an event after each chunk and adds its pieces to checksum once that event
  // has passed.
  absl::Status EnqueueChunks(void* dst, const void* src, size_t bytes, const char* direction,
                             TransferCounts* counts, const ChunkSink* sink = nullptr,
                             cudaStream_t stream = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  // The staged bytes of `device_ops` in pieces of at most a chunk, in staging order, with their
  // groups (kStagingGroups).
  std::vector<StagedPiece> CutStaged(const std::vector<RoutedOp>& device_ops) const;
  // Plans the staging of `device_ops` (setting their stage_from and stage_offset) and makes the
  // staging buffer large enough, or plans less if it cannot be.
  void PlanStagingFor(std::vector<RoutedOp>* device_ops) ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  // Grows the staging buffer to at least `bytes`; false (counted, logged) if the device has no
  // memory for it.
  bool EnsureStagingBuffer(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  void FreeStagingBuffer() ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  // Takes the copy rates of the last measured ticket, once its copies are complete.
  void HarvestCopyRates() ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);
  // Takes the window of the last snapshot point and Fence, once the GPU has passed both.
  void HarvestWindowLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Status AcquireEventsLocked(EventPair* events) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks the tickets up to `ticket` complete and returns to the pool the events of those that
  // nobody waits on.
  void RetireThroughLocked(uint64_t ticket) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns the events of `ticket`, which nothing waits on or for, to the pool.
  void ReleaseEventsLocked(uint64_t ticket) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddCountsLocked(const TransferCounts& counts) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int device_;
  const std::string name_;
  const CopyEngineOptions options_;
  const MeasurementEvents measure_;
  const StagingStream staging_stream_;
  const bool memory_pools_;  // cudaMallocAsync is available
  std::atomic<bool> warned_pageable_{false};

  absl::Mutex issue_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  cudaStream_t const copy_stream_;
  cudaEvent_t const restore_event_ ABSL_GUARDED_BY(issue_mu_);
  void* staging_buffer_ ABSL_GUARDED_BY(issue_mu_) = nullptr;
  size_t staging_capacity_ ABSL_GUARDED_BY(issue_mu_) = 0;
  // After an allocation failure, the buffer is not grown to this size or beyond.
  size_t staging_ceiling_ ABSL_GUARDED_BY(issue_mu_) = SIZE_MAX;
  // The copy-rate events are recorded for a ticket whose rates are not taken yet.
  bool rates_pending_ ABSL_GUARDED_BY(issue_mu_) = false;
  uint64_t rates_staged_bytes_ ABSL_GUARDED_BY(issue_mu_) = 0;
  uint64_t rates_d2h_bytes_ ABSL_GUARDED_BY(issue_mu_) = 0;
  uint64_t logged_staged_bytes_ ABSL_GUARDED_BY(issue_mu_) = UINT64_MAX;
  bool logged_budget_short_ ABSL_GUARDED_BY(issue_mu_) = false;
  std::unique_ptr<internal::DeviceChecksummer> device_checksummer_ ABSL_GUARDED_BY(issue_mu_);
  bool device_checksummer_failed_ ABSL_GUARDED_BY(issue_mu_) = false;

  mutable absl::Mutex mu_;
  internal::TicketSequence tickets_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, TicketEvents> in_flight_ ABSL_GUARDED_BY(mu_);
  std::vector<EventPair> free_events_ ABSL_GUARDED_BY(mu_);
  // The newest ticket whose done-event is recorded and which is not retired, or 0. The copy
  // stream is in order and tickets are issued in order, so its done-event covers every ticket.
  uint64_t fence_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  CopyEngineStats stats_ ABSL_GUARDED_BY(mu_);
  StagingOptions staging_ ABSL_GUARDED_BY(mu_);
  Window window_ ABSL_GUARDED_BY(mu_) = Window::kIdle;
  // Measurements (seconds, bytes per second): the shortest recent window, smoothed rates.
  RecentMin window_s_ ABSL_GUARDED_BY(mu_);
  Ewma d2h_rate_ ABSL_GUARDED_BY(mu_){0.3};
  Ewma d2d_rate_ ABSL_GUARDED_BY(mu_){0.3};
  std::map<uint64_t, TicketChecksums> checksums_ ABSL_GUARDED_BY(mu_);  // not taken yet

  absl::Mutex chunk_events_mu_;
  std::vector<cudaEvent_t> free_chunk_events_ ABSL_GUARDED_BY(chunk_events_mu_);
  // Declared last: destroyed first, finishing its pieces while the events above still exist.
  internal::ChecksumQueue checksum_queue_;
};

absl::StatusOr<std::unique_ptr<CopyEngine>> CudaCopyEngine::Open(int device,
                                                                 const CopyEngineOptions& options) {
  int count = 0;
  const cudaError_t counted = cudaGetDeviceCount(&count);
  if (counted != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", cudaGetErrorName(counted)));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device: none found");
  if (device == -1) TESSERA_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda device ", device, " does not exist (", count, count == 1 ? " device)" : " devices)"));
  }
  const std::string unusable = absl::StrCat("cuda device ", device, " unusable");
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(Annotate(scoped.Enter(device), unusable));
  cudaDeviceProp properties;
  TESSERA_RETURN_IF_ERROR(
      Annotate(CudaStatus(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties"),
               unusable));
  cudaStream_t stream = nullptr;
  TESSERA_RETURN_IF_ERROR(
      Annotate(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                          "cudaStreamCreateWithFlags"),
               unusable));
  cudaEvent_t restore_event = nullptr;
  MeasurementEvents measure;
  StagingStream staging;
  std::vector<cudaEvent_t*> timing = {&measure.window_start, &measure.window_end,
                                      &measure.copy_begin, &measure.staged, &measure.copy_end};
  std::vector<cudaEvent_t*> ordering = {&restore_event, &staging.go, &staging.direct_done};
  for (cudaEvent_t& event : staging.staged) ordering.push_back(&event);
  absl::Status created = CudaStatus(cudaStreamCreateWithFlags(&staging.stream,
                                                              cudaStreamNonBlocking),
                                    "cudaStreamCreateWithFlags(staging)");
  for (cudaEvent_t* event : ordering) {
    if (created.ok()) {
      created = CudaStatus(cudaEventCreateWithFlags(event, cudaEventDisableTiming),
                           "cudaEventCreateWithFlags");
    }
  }
  for (cudaEvent_t* event : timing) {
    if (created.ok()) created = CudaStatus(cudaEventCreate(event), "cudaEventCreate");
  }
  if (!created.ok()) {
    for (const std::vector<cudaEvent_t*>* events : {&timing, &ordering}) {
      for (cudaEvent_t* event : *events) {
        if (*event != nullptr) cudaEventDestroy(*event);
      }
    }
    if (staging.stream != nullptr) cudaStreamDestroy(staging.stream);
    cudaStreamDestroy(stream);
    return Annotate(created, unusable);
  }
  int memory_pools = 0;
  if (cudaDeviceGetAttribute(&memory_pools, cudaDevAttrMemoryPoolsSupported, device) !=
      cudaSuccess) {
    cudaGetLastError();
    memory_pools = 0;
  }
  return std::unique_ptr<CopyEngine>(new CudaCopyEngine(device, properties.name, options, stream,
                                                        restore_event, measure, staging,
                                                        memory_pools != 0));
}

CudaCopyEngine::CudaCopyEngine(int device, std::string name, const CopyEngineOptions& options,
                               cudaStream_t copy_stream, cudaEvent_t restore_event,
                               const MeasurementEvents& measure,
                               const StagingStream& staging_stream, bool memory_pools)
    : device_(device),
      name_(std::move(name)),
      options_(options),
      measure_(measure),
      staging_stream_(staging_stream),
      memory_pools_(memory_pools),
      copy_stream_(copy_stream),
      restore_event_(restore_event),
      staging_(options.staging),
      checksum_queue_(options.checksum_threads) {}

CudaCopyEngine::~CudaCopyEngine() {
  ScopedDevice scoped;
  absl::Status status = scoped.Enter(device_);
  if (status.ok()) {
    status = CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaStreamSynchronize(staging_stream_.stream),
                        "cudaStreamSynchronize(staging stream)");
  }
  if (!status.ok()) Log()->warn("closing {}: {}", Describe(), status.ToString());
  absl::MutexLock issue_lock(&issue_mu_);
  FreeStagingBuffer();
  absl::MutexLock lock(&mu_);
  for (const auto& [ticket, state] : in_flight_) DestroyEvents(state.events);
  for (const EventPair& events : free_events_) DestroyEvents(events);
  for (auto& [ticket, pending] : checksums_) {
    if (pending.batch) pending.batch->Wait().IgnoreError();  // the stream is drained: quick
    for (cudaEvent_t event : pending.chunk_events) cudaEventDestroy(event);
    pending.device.reset();  // its memory is freed on this device
  }
  device_checksummer_.reset();
  {
    absl::MutexLock events_lock(&chunk_events_mu_);
    for (cudaEvent_t event : free_chunk_events_) cudaEventDestroy(event);
  }
  for (cudaEvent_t event : {measure_.window_start, measure_.window_end, measure_.copy_begin,
                            measure_.staged, measure_.copy_end}) {
    cudaEventDestroy(event);
  }
  cudaEventDestroy(restore_event_);
  cudaEventDestroy(staging_stream_.go);
  cudaEventDestroy(staging_stream_.direct_done);
  for (cudaEvent_t event : staging_stream_.staged) cudaEventDestroy(event);
  cudaStreamDestroy(staging_stream_.stream);
  cudaStreamDestroy(copy_stream_);
}

std::string CudaCopyEngine::Describe() const {
  return absl::StrCat("cuda device ", device_, " (", name_, ")");
}

absl::Status CudaCopyEngine::RegisterHost(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("RegisterHost: empty range (",
                                                   ptr == nullptr ? "null" : "non-null",
                                                   " pointer, ", bytes, " bytes)"));
  }
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  return CudaStatus(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable),
                    absl::StrCat("cudaHostRegister(", bytes, " bytes)"));
}

absl::Status CudaCopyEngine::UnregisterHost(void* ptr) {
  if (ptr == nullptr) return absl::InvalidArgumentError("UnregisterHost: null pointer");
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  return CudaStatus(cudaHostUnregister(ptr), "cudaHostUnregister");
}

absl::StatusOr<MemoryKind> CudaCopyEngine::Locate(const void* ptr) {
  if (ptr == nullptr) return absl::InvalidArgumentError("Locate: null pointer");
  TESSERA_ASSIGN_OR_RETURN(const Where where, Classify(ptr, "Locate"));
  return where == Where::kDevice ? MemoryKind::kDevice : MemoryKind::kHost;
}

absl::StatusOr<uint64_t> CudaCopyEngine::MarkSnapshotPoint(void* compute_stream) {
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  absl::MutexLock lock(&mu_);
  EventPair events;
  TESSERA_RETURN_IF_ERROR(AcquireEventsLocked(&events));
  const absl::Status recorded =
      CudaStatus(cudaEventRecord(events.start, static_cast<cudaStream_t>(compute_stream)),
                 "cudaEventRecord(snapshot point)");
  if (!recorded.ok()) {
    free_events_.push_back(events);
    return recorded;
  }
  const uint64_t ticket = tickets_.Mark();
  in_flight_[ticket].events = events;
  ++stats_.tickets;
  // The window is measured from a snapshot point to the first Fence after it. A snapshot point
  // with no Fence since the previous one restarts the measurement; one whose window end the GPU
  // has not reached yet leaves it alone.
  HarvestWindowLocked();
  if (window_ != Window::kEnded &&
      cudaEventRecord(measure_.window_start, static_cast<cudaStream_t>(compute_stream)) ==
          cudaSuccess) {
    window_ = Window::kStarted;
  }
  return ticket;
}

absl::Status CudaCopyEngine::IssueCopies(uint64_t ticket, const std::vector<CopyOp>& ops) {
  return Issue(ticket, ops, /*checksum=*/false);
}

absl::Status CudaCopyEngine::IssueChecksummedCopies(uint64_t ticket,
                                                    const std::vector<CopyOp>& ops) {
  return Issue(ticket, ops, /*checksum=*/true);
}

absl::Status CudaCopyEngine::Issue(uint64_t ticket, const std::vector<CopyOp>& ops,
                                   bool checksum) {
  absl::MutexLock issue_lock(&issue_mu_);
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  EventPair events;
  {
    absl::MutexLock lock(&mu_);
    TESSERA_RETURN_IF_ERROR(tickets_.CheckIssuable(ticket));
    tickets_.BeginIssue(ticket);
    events = in_flight_.at(ticket).events;
  }

  TransferCounts counts;
  std::vector<RoutedOp> device_ops;
  std::vector<CopyOp> host_ops;
  std::vector<size_t> host_indices;
  bool enqueued = false;
  bool done_recorded = false;
  absl::Status status = internal::ValidateCopyOps(ops);
  if (status.ok()) status = RouteOps(ops, &device_ops, &host_ops, &counts, &host_indices);
  // Checksums: one range per device op, in device_ops order.
  TicketChecksums sums;
  std::vector<internal::ChecksumQueue::Piece> pieces;
  for (size_t i = 0; checksum && status.ok() && i < device_ops.size(); ++i) {
    if (device_ops[i].dst == Where::kDevice) {
      status = absl::InvalidArgumentError(absl::StrCat(
          "copy op ", device_ops[i].index, ": a checksummed copy's destination must be host "
          "memory, not device memory"));
    }
    sums.range_ops.push_back(device_ops[i].index);
  }
  const bool on_device = checksum && status.ok() && !device_ops.empty() && ChecksumOnDevice();
  auto sink = [&](size_t range, uint64_t offset) -> std::optional<ChunkSink> {
    if (!checksum || on_device) return std::nullopt;
    return ChunkSink{range, offset, &pieces, &sums.chunk_events};
  };
  if (status.ok()) {
    HarvestCopyRates();
    PlanStagingFor(&device_ops);
    enqueued = true;
    status = CudaStatus(cudaStreamWaitEvent(copy_stream_, events.start, 0),
                        "cudaStreamWaitEvent(snapshot point)");
  }
  // The staged bytes go device-to-device into the buffer on the staging stream while the bytes
  // not staged go to the host on the copy stream; the sources are released once both (and the
  // checksum kernel) have read them; the staged bytes then go from the buffer to the host, each
  // group once its staging is done. The staging waits for the snapshot point and for the copy
  // stream's earlier work (the previous ticket's copies out of the buffer, and the buffer's
  // allocation). The rate events are recorded while no earlier measurement is pending.
  const bool measure = status.ok() && !rates_pending_;
  uint64_t staged_bytes = 0;
  const std::vector<StagedPiece> staged =
      status.ok() ? CutStaged(device_ops) : std::vector<StagedPiece>{};
  const cudaStream_t staging_stream = staging_stream_.stream;
  if (measure) {
    status = CudaStatus(cudaEventRecord(measure_.copy_begin, copy_stream_), "cudaEventRecord");
  }
  if (status.ok() && !staged.empty()) {
    status = CudaStatus(cudaEventRecord(staging_stream_.go, copy_stream_),
                        "cudaEventRecord(staging may start)");
    if (status.ok()) {
      status = CudaStatus(cudaStreamWaitEvent(staging_stream, staging_stream_.go, 0),
                          "cudaStreamWaitEvent(staging may start)");
    }
  }
  for (size_t p = 0; status.ok() && p < staged.size(); ++p) {
    const StagedPiece& piece = staged[p];
    const RoutedOp& r = device_ops[piece.op];
    status = EnqueueChunks(static_cast<char*>(staging_buffer_) + r.stage_offset +
                               (piece.from - r.stage_from),
                           static_cast<const char*>(r.op.src) + piece.from, piece.bytes,
                           "D2D staging", &counts, nullptr, staging_stream);
    staged_bytes += piece.bytes;
    if (!status.ok()) status = Annotate(status, absl::StrCat("staging copy op ", piece.op));
    if (status.ok() && (p + 1 == staged.size() || staged[p + 1].group != piece.group)) {
      status = CudaStatus(cudaEventRecord(staging_stream_.staged[piece.group], staging_stream),
                          "cudaEventRecord(staged)");
    }
  }
  if (status.ok() && measure) {
    status = CudaStatus(cudaEventRecord(measure_.staged,
                                        staged.empty() ? copy_stream_ : staging_stream),
                        "cudaEventRecord");
  }
  if (status.ok() && on_device) {
    absl::StatusOr<internal::DeviceChecksummer::Pending> pending =
        EnqueueDeviceChecksums(device_ops, events.start, staging_stream);
    if (pending.ok()) {
      sums.device = std::move(*pending);
      sums.checksummer = device_checksummer_.get();
    } else {
      status = pending.status();
    }
  }
  for (size_t i = 0; status.ok() && i < device_ops.size(); ++i) {
    const RoutedOp& r = device_ops[i];
    const size_t direct = std::min(r.stage_from, r.op.bytes);
    if (direct == 0) continue;
    const std::optional<ChunkSink> landed = sink(i, 0);
    status = EnqueueChunks(r.op.dst, r.op.src, direct, Direction(r), &counts,
                           landed ? &*landed : nullptr);
    if (!status.ok()) status = Annotate(status, absl::StrCat("copy op ", i));
  }
  // The sources are released once the checksum kernel has read them too, and the staging: on
  // the staging stream when there is any, so that the copy stream goes on with the staged bytes.
  const cudaStream_t release_on = staged.empty() ? copy_stream_ : staging_stream;
  if (status.ok() && !staged.empty()) {
    status = CudaStatus(cudaEventRecord(staging_stream_.direct_done, copy_stream_),
                        "cudaEventRecord(direct copies done)");
    if (status.ok()) {
      status = CudaStatus(cudaStreamWaitEvent(staging_stream, staging_stream_.direct_done, 0),
                          "cudaStreamWaitEvent(direct copies done)");
    }
  }
  if (status.ok() && sums.device && sums.device->direct_read != nullptr) {
    status = CudaStatus(cudaStreamWaitEvent(release_on, sums.device->direct_read, 0),
                        "cudaStreamWaitEvent(checksum read the sources)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(events.released, release_on),
                        "cudaEventRecord(sources released)");
  }
  for (size_t p = 0; status.ok() && p < staged.size(); ++p) {
    const StagedPiece& piece = staged[p];
    const RoutedOp& r = device_ops[piece.op];
    if (p == 0 || staged[p - 1].group != piece.group) {
      status = CudaStatus(cudaStreamWaitEvent(copy_stream_, staging_stream_.staged[piece.group], 0),
                          "cudaStreamWaitEvent(staged)");
      if (!status.ok()) break;
    }
    const std::optional<ChunkSink> landed = sink(piece.op, piece.from);
    status = EnqueueChunks(
        static_cast<char*>(r.op.dst) + piece.from,
        static_cast<const char*>(staging_buffer_) + r.stage_offset + (piece.from - r.stage_from),
        piece.bytes, "D2H from staging", &counts, landed ? &*landed : nullptr);
    if (!status.ok()) {
      status = Annotate(status, absl::StrCat("copy op ", piece.op, " from staging"));
    }
  }
  // Done includes the checksums: the staging buffer is not overwritten before they have read it.
  if (status.ok() && sums.device && sums.device->done != nullptr) {
    status = CudaStatus(cudaStreamWaitEvent(copy_stream_, sums.device->done, 0),
                        "cudaStreamWaitEvent(checksums done)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(events.done, copy_stream_), "cudaEventRecord(copies done)");
    done_recorded = status.ok();
  }
  if (status.ok() && measure) {
    status = CudaStatus(cudaEventRecord(measure_.copy_end, copy_stream_), "cudaEventRecord");
    rates_pending_ = status.ok();
    rates_staged_bytes_ = staged_bytes;
    rates_d2h_bytes_ = counts.device_to_host;
  }
  if (status.ok() && !host_ops.empty()) {
    status = CudaStatus(cudaEventSynchronize(events.start), "cudaEventSynchronize(snapshot point)");
    if (status.ok()) {
      std::vector<OpChecksum> host_crcs;
      internal::CopyHostMemory(host_ops, options_.host_copy_threads,
                               options_.host_parallel_min_bytes, checksum ? &host_crcs : nullptr,
                               BlockBytes());
      if (checksum) {
        sums.crcs.assign(ops.size(), OpChecksum{});
        for (size_t h = 0; h < host_ops.size(); ++h) sums.crcs[host_indices[h]] = host_crcs[h];
      }
    }
  }
  if (checksum && status.ok()) {
    std::vector<uint64_t> range_bytes;
    for (const RoutedOp& r : device_ops) range_bytes.push_back(r.op.bytes);
    std::vector<internal::ChecksumQueue::Wait> waits;
    for (cudaEvent_t event : sums.chunk_events) {
      waits.push_back([this, event]() -> absl::Status {
        ScopedDevice scoped;
        TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
        return CudaStatus(cudaEventSynchronize(event), "cudaEventSynchronize(chunk landed)");
      });
    }
    if (sums.crcs.empty()) sums.crcs.assign(ops.size(), OpChecksum{});
    if (!pieces.empty()) {  // host copies only: no worker is needed
      sums.batch = checksum_queue_.Submit(BlockBytes(), range_bytes, std::move(pieces),
                                          std::move(waits));
    }
    sums.range_bytes = std::move(range_bytes);
  }
  if (!status.ok() && enqueued) {
    // A failed snapshot's slot is about to be reused: none of its copies may stay in flight.
    absl::Status drained =
        CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
    if (drained.ok()) {
      drained = CudaStatus(cudaStreamSynchronize(staging_stream_.stream),
                           "cudaStreamSynchronize(staging stream)");
    }
    if (!drained.ok()) {
      Log()->error("ticket {} failed ({}) and its copies could not be drained: {}", ticket,
                   status.ToString(), drained.ToString());
    }
  }

  if (!status.ok()) {
    ReleaseChunkEvents(sums.chunk_events);  // drained above: none is pending
    sums.chunk_events.clear();
    if (sums.device) device_checksummer_->Abandon(std::move(*sums.device));
    sums.device.reset();
  }
  absl::MutexLock lock(&mu_);
  tickets_.EndIssue(ticket, status);
  if (status.ok()) {
    AddCountsLocked(counts);
    stats_.bytes_staged += staged_bytes;
    if (checksum) {
      stats_.bytes_checksummed += counts.total();
      if (on_device) stats_.bytes_checksummed_on_device += counts.device_to_host;
      checksums_[ticket] = std::move(sums);
    }
  }
  if (done_recorded) {
    fence_ticket_ = ticket;
  } else {
    ReleaseEventsLocked(ticket);  // nothing of this ticket is in flight
  }
  return status;
}

bool CudaCopyEngine::ChecksumOnDevice() {
  if (!options_.checksum_on_device || device_checksummer_failed_) return false;
  if (device_checksummer_ != nullptr) return true;
  absl::StatusOr<std::unique_ptr<internal::DeviceChecksummer>> created =
      internal::DeviceChecksummer::Create();
  if (!created.ok()) {
    device_checksummer_failed_ = true;
    Log()->warn("{}: snapshots are checksummed on {} host threads, not on the GPU: {}", Describe(),
                options_.checksum_threads, created.status().ToString());
    return false;
  }
  device_checksummer_ = std::move(*created);
  return true;
}

absl::StatusOr<internal::DeviceChecksummer::Pending> CudaCopyEngine::EnqueueDeviceChecksums(
    const std::vector<RoutedOp>& device_ops, cudaEvent_t sources_ready, cudaStream_t staged_on) {
  const uint64_t block = BlockBytes();
  // Bytes [offset, offset + bytes) of range `range`, at `data`, cut at the range's blocks.
  auto add = [block](size_t range, uint64_t offset, const char* data, uint64_t bytes,
                     std::vector<internal::DeviceChecksummer::Piece>* out) {
    for (uint64_t at = offset; at < offset + bytes;) {
      const uint64_t end = std::min<uint64_t>(offset + bytes, (at / block + 1) * block);
      out->push_back({range, at, data + (at - offset), end - at});
      at = end;
    }
  };
  std::vector<internal::DeviceChecksummer::Piece> direct, staged;
  for (size_t i = 0; i < device_ops.size(); ++i) {
    const RoutedOp& r = device_ops[i];
    add(i, 0, static_cast<const char*>(r.op.src), std::min(r.stage_from, r.op.bytes), &direct);
    if (r.staged()) {
      add(i, r.stage_from, static_cast<const char*>(staging_buffer_) + r.stage_offset,
          r.op.bytes - r.stage_from, &staged);
    }
  }
  return device_checksummer_->Enqueue(direct, staged, sources_ready, staged_on);
}

absl::Status CudaCopyEngine::RouteOps(const std::vector<CopyOp>& ops,
                                      std::vector<RoutedOp>* device_ops,
                                      std::vector<CopyOp>* host_ops, TransferCounts* counts,
                                      std::vector<size_t>* host_indices) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const CopyOp& op = ops[i];
    if (op.bytes == 0) continue;
    const std::string context = absl::StrCat("copy op ", i);
    absl::StatusOr<Where> src = Classify(op.src, "src");
    if (!src.ok()) return Annotate(src.status(), context);
    absl::StatusOr<Where> dst = Classify(op.dst, "dst");
    if (!dst.ok()) return Annotate(dst.status(), context);
    const bool from_device = *src == Where::kDevice;
    const bool to_device = *dst == Where::kDevice;
    if (!from_device && !to_device) {
      host_ops->push_back(op);
      if (host_indices != nullptr) host_indices->push_back(i);
      counts->host_to_host += op.bytes;
      continue;
    }
    device_ops->push_back(RoutedOp{op, i, *src, *dst, /*stage_from=*/op.bytes});
    if (from_device && to_device) {
      counts->device_to_device += op.bytes;
    } else if (from_device) {
      counts->device_to_host += op.bytes;
      if (*dst == Where::kPageableHost) {
        counts->device_to_pageable_host += op.bytes;
        if (!warned_pageable_.exchange(true)) {
          Log()->warn(
              "{}: device-to-host copy into pageable memory ({} bytes at {}): it runs about 30x "
              "slower than into memory registered with RegisterHost",
              Describe(), op.bytes, op.dst);
        }
      }
    } else {
      counts->host_to_device += op.bytes;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::EnqueueChunks(void* dst, const void* src, size_t bytes,
                                           const char* direction, TransferCounts* counts,
                                           const ChunkSink* sink, cudaStream_t stream) {
  if (stream == nullptr) stream = copy_stream_;
  const uint64_t block = BlockBytes();
  for (size_t offset = 0; offset < bytes; offset += options_.chunk_bytes) {
    const size_t chunk = std::min(options_.chunk_bytes, bytes - offset);
    TESSERA_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(static_cast<char*>(dst) + offset, static_cast<const char*>(src) + offset,
                        chunk, cudaMemcpyDefault, stream),
        absl::StrCat("cudaMemcpyAsync(", direction, ", ", chunk, " bytes)")));
    ++counts->chunks;
    if (sink == nullptr) continue;
    TESSERA_ASSIGN_OR_RETURN(cudaEvent_t landed, AcquireChunkEvent());
    sink->events->push_back(landed);
    TESSERA_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(landed, stream), "cudaEventRecord(chunk landed)"));
    // The chunk's pieces, cut at the op's block boundaries.
    const int wait = static_cast<int>(sink->events->size() - 1);
    const uint64_t first = sink->offset + offset;  // the chunk's offset within its op
    for (uint64_t at = first; at < first + chunk;) {
      const uint64_t end = std::min<uint64_t>(first + chunk, (at / block + 1) * block);
      sink->pieces->push_back({sink->range, at, static_cast<const char*>(dst) + (at - sink->offset),
                               end - at, wait});
      at = end;
    }
  }
  return absl::OkStatus();
}

std::vector<CudaCopyEngine::StagedPiece> CudaCopyEngine::CutStaged(
    const std::vector<RoutedOp>& device_ops) const {
  std::vector<StagedPiece> pieces;
  const uint64_t chunk = std::max<uint64_t>(options_.chunk_bytes, 1);
  uint64_t cumulative = 0;
  int group = 0;
  uint64_t group_bytes = chunk;
  uint64_t group_end = chunk;  // the cumulative staged bytes at which `group` closes
  for (size_t i = 0; i < device_ops.size(); ++i) {
    const RoutedOp& r = device_ops[i];
    for (uint64_t from = r.stage_from; from < r.op.bytes;) {
      const uint64_t bytes = std::min<uint64_t>(chunk, r.op.bytes - from);
      pieces.push_back({i, from, bytes, group});
      from += bytes;
      cumulative += bytes;
      if (cumulative >= group_end && group + 1 < kStagingGroups) {
        ++group;
        group_bytes *= 2;  // at most chunk << 15: no overflow
        group_end = cumulative + group_bytes;
      }
    }
  }
  return pieces;
}

absl::StatusOr<cudaEvent_t> CudaCopyEngine::AcquireChunkEvent() {
  {
    absl::MutexLock lock(&chunk_events_mu_);
    if (!free_chunk_events_.empty()) {
      cudaEvent_t event = free_chunk_events_.back();
      free_chunk_events_.pop_back();
      return event;
    }
  }
  // Blocking sync: a checksum worker waiting for a chunk sleeps instead of spinning on a core
  // that the trainer's data loading may need.
  cudaEvent_t event = nullptr;
  TESSERA_RETURN_IF_ERROR(CudaStatus(
      cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventBlockingSync),
      "cudaEventCreateWithFlags(chunk landed)"));
  return event;
}

void CudaCopyEngine::ReleaseChunkEvents(const std::vector<cudaEvent_t>& events) {
  absl::MutexLock lock(&chunk_events_mu_);
  free_chunk_events_.insert(free_chunk_events_.end(), events.begin(), events.end());
}

void CudaCopyEngine::PlanStagingFor(std::vector<RoutedOp>* device_ops) {
  // Only device-to-host copies into registered memory are staged: a copy into pageable memory
  // blocks the issuing thread whatever its source.
  uint64_t stageable = 0;
  for (const RoutedOp& r : *device_ops) {
    if (r.src == Where::kDevice && r.dst == Where::kRegisteredHost) stageable += r.op.bytes;
  }
  StagingPlanInput input;
  input.device_to_host_bytes = stageable;
  double fraction = 0;
  {
    absl::MutexLock lock(&mu_);
    input.mode = staging_.mode;
    input.budget_bytes = staging_.budget_bytes;
    fraction = staging_.budget_free_fraction;
    input.measured.window_s = window_s_.value();
    input.measured.d2h_bytes_per_s = d2h_rate_.value();
    input.measured.d2d_bytes_per_s = d2d_rate_.value();
  }
  if (input.mode == StagingMode::kOff) FreeStagingBuffer();
  if (input.mode != StagingMode::kOff && stageable > 0 && input.budget_bytes == 0) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      input.budget_bytes =
          static_cast<uint64_t>(fraction * static_cast<double>(free_bytes + staging_capacity_));
    } else {
      cudaGetLastError();
    }
  }
  if (staging_ceiling_ != SIZE_MAX) {
    input.budget_bytes = std::min<uint64_t>(input.budget_bytes, staging_ceiling_ / 2);
  }
  StagingPlan plan = PlanStaging(input);

  // Take the staged bytes from the end of the op list (a partly staged op stages its tail), each
  // piece aligned in the buffer.
  const auto assign = [&](uint64_t staged) {
    size_t offset = 0;
    uint64_t remaining = staged;
    for (RoutedOp& r : *device_ops) r.stage_from = r.op.bytes;
    for (auto it = device_ops->rbegin(); it != device_ops->rend() && remaining > 0; ++it) {
      if (it->src != Where::kDevice || it->dst != Where::kRegisteredHost) continue;
      const size_t take = static_cast<size_t>(std::min<uint64_t>(it->op.bytes, remaining));
      it->stage_from = it->op.bytes - take;
      it->stage_offset = offset;
      offset = AlignUp(offset + take, kStagingAlignment);
      remaining -= take;
    }
    return offset;
  };
  size_t needed = assign(plan.staged_bytes);
  if (plan.staged_bytes > 0 && !EnsureStagingBuffer(needed)) {
    plan.staged_bytes = 0;
    plan.reason += "; no device memory for the staging buffer: not staging";
    assign(0);
  }
  if (plan.staged_bytes != logged_staged_bytes_ || plan.budget_short != logged_budget_short_) {
    const bool big_change = logged_staged_bytes_ == UINT64_MAX ||
                            plan.budget_short != logged_budget_short_ ||
                            std::llabs(static_cast<long long>(plan.staged_bytes) -
                                       static_cast<long long>(logged_staged_bytes_)) >
                                static_cast<long long>(stageable / 10);
    if (big_change) {
      Log()->info("staging plan ({}): {}; expected fence stall {}",
                  std::string(StagingModeName(input.mode)),
                  plan.reason,
                  plan.expected_stall_s < 0
                      ? std::string("unknown")
                      : absl::StrCat(absl::SixDigits(plan.expected_stall_s * 1e3), " ms"));
      logged_staged_bytes_ = plan.staged_bytes;
      logged_budget_short_ = plan.budget_short;
    }
  }
  absl::MutexLock lock(&mu_);
  stats_.plan_staged_bytes = plan.staged_bytes;
  stats_.plan_device_to_host_bytes = stageable;
  stats_.plan_expected_stall_ns =
      plan.expected_stall_s < 0 ? -1 : static_cast<int64_t>(plan.expected_stall_s * 1e9);
  if (plan.budget_short) ++stats_.staging_budget_short;
  stats_.staging_buffer_bytes = staging_capacity_;
}

bool CudaCopyEngine::EnsureStagingBuffer(size_t bytes) {
  if (bytes <= staging_capacity_) return true;
  // Grown in steps of an eighth at least, so that a slowly rising plan does not reallocate at
  // every snapshot.
  size_t capacity = AlignUp(std::max(bytes, staging_capacity_ + staging_capacity_ / 8),
                            size_t{2} << 20);
  if (capacity >= staging_ceiling_) capacity = bytes;
  FreeStagingBuffer();
  void* buffer = nullptr;
  const cudaError_t error = memory_pools_
                                ? cudaMallocAsync(&buffer, capacity, copy_stream_)
                                : cudaMalloc(&buffer, capacity);
  if (error != cudaSuccess) {
    const absl::Status status = CudaStatus(error, absl::StrCat("staging buffer of ", capacity,
                                                               " bytes"));
    staging_ceiling_ = capacity;
    {
      absl::MutexLock lock(&mu_);
      ++stats_.staging_alloc_failures;
    }
    Log()->warn("{}: {}; snapshots fall back to the lazy fence for the bytes not staged, and the "
                "budget is capped at {} bytes from now on",
                Describe(), status.ToString(), staging_ceiling_ / 2);
    return false;
  }
  staging_buffer_ = buffer;
  staging_capacity_ = capacity;
  return true;
}

void CudaCopyEngine::FreeStagingBuffer() {
  if (staging_buffer_ == nullptr) return;
  // Stream-ordered: the copies already queued from the buffer finish first. Without memory
  // pools, cudaFree would synchronise the whole device; wait for the copy stream only.
  if (memory_pools_) {
    cudaFreeAsync(staging_buffer_, copy_stream_);
  } else {
    cudaStreamSynchronize(copy_stream_);
    cudaFree(staging_buffer_);
  }
  cudaGetLastError();
  staging_buffer_ = nullptr;
  staging_capacity_ = 0;
}

void CudaCopyEngine::HarvestCopyRates() {
  if (!rates_pending_ || cudaEventQuery(measure_.copy_end) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  rates_pending_ = false;
  float staging_ms = 0, to_host_ms = 0;
  if (cudaEventElapsedTime(&staging_ms, measure_.copy_begin, measure_.staged) != cudaSuccess ||
      cudaEventElapsedTime(&to_host_ms, measure_.copy_begin, measure_.copy_end) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  // Small copies say little about the rate: they are mostly launch latency.
  constexpr uint64_t kMinBytes = uint64_t{1} << 20;
  absl::MutexLock lock(&mu_);
  if (rates_staged_bytes_ >= kMinBytes && staging_ms > 0) {
    d2d_rate_.Add(static_cast<double>(rates_staged_bytes_) / (staging_ms / 1e3));
  }
  if (rates_d2h_bytes_ >= kMinBytes && to_host_ms > 0) {
    d2h_rate_.Add(static_cast<double>(rates_d2h_bytes_) / (to_host_ms / 1e3));
  }
}

void CudaCopyEngine::HarvestWindowLocked() {
  if (window_ != Window::kEnded) return;
  if (cudaEventQuery(measure_.window_end) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  window_ = Window::kIdle;
  float ms = 0;
  if (cudaEventElapsedTime(&ms, measure_.window_start, measure_.window_end) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  window_s_.Add(ms / 1e3);
  ++stats_.windows_measured;
}

absl::Status CudaCopyEngine::SetStaging(const StagingOptions& options) {
  TESSERA_RETURN_IF_ERROR(ValidateStagingOptions(options));
  absl::MutexLock lock(&mu_);
  staging_ = options;
  return absl::OkStatus();
}

absl::Status CudaCopyEngine::Fence(void* stream) {
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  absl::MutexLock lock(&mu_);
  const absl::Duration timeout = absl::Milliseconds(options_.fence_issue_timeout_ms);
  for (uint64_t abandoned : internal::AwaitAllIssued(mu_, tickets_, timeout, stats_)) {
    ReleaseEventsLocked(abandoned);
  }
  HarvestWindowLocked();
  if (window_ == Window::kStarted &&
      cudaEventRecord(measure_.window_end, static_cast<cudaStream_t>(stream)) == cudaSuccess) {
    window_ = Window::kEnded;
  }
  if (fence_ticket_ == 0) return absl::OkStatus();
  const EventPair& events = in_flight_.at(fence_ticket_).events;
  const cudaError_t done = cudaEventQuery(events.done);
  if (done == cudaSuccess) {
    RetireThroughLocked(fence_ticket_);
    return absl::OkStatus();
  }
  if (done != cudaErrorNotReady) return CudaStatus(done, "cudaEventQuery(copies done)");
  // The copy stream runs in order: the newest ticket's released event follows every earlier
  // ticket's copies.
  const cudaError_t released = cudaEventQuery(events.released);
  if (released == cudaSuccess) return absl::OkStatus();
  if (released != cudaErrorNotReady) {
    return CudaStatus(released, "cudaEventQuery(sources released)");
  }
  return CudaStatus(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), events.released, 0),
                    "cudaStreamWaitEvent(fence)");
}

absl::Status CudaCopyEngine::WaitCopies(uint64_t ticket) {
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  cudaEvent_t done;
  {
    absl::MutexLock lock(&mu_);
    TESSERA_RETURN_IF_ERROR(tickets_.Outcome(ticket));
    auto it = in_flight_.find(ticket);
    if (it == in_flight_.end()) return absl::OkStatus();  // retired: known complete
    ++it->second.waiters;
    done = it->second.events.done;
  }
  const absl::Status status =
      CudaStatus(cudaEventSynchronize(done), "cudaEventSynchronize(copies done)");
  absl::MutexLock lock(&mu_);
  TicketEvents& state = in_flight_.at(ticket);
  --state.waiters;
  if (status.ok()) {
    RetireThroughLocked(ticket);
  } else if (state.complete && state.waiters == 0) {
    ReleaseEventsLocked(ticket);
  }
  return status;
}

absl::StatusOr<std::vector<OpChecksum>> CudaCopyEngine::WaitChecksums(uint64_t ticket) {
  TESSERA_RETURN_IF_ERROR(WaitCopies(ticket));
  TicketChecksums sums;
  {
    absl::MutexLock lock(&mu_);
    auto it = checksums_.find(ticket);
    if (it == checksums_.end()) return internal::NoChecksums(ticket);
    sums = std::move(it->second);
    checksums_.erase(it);
  }
  absl::StatusOr<std::vector<internal::RangeChecksum>> ranges;
  if (sums.device) {
    ranges = sums.checksummer->Finish(std::move(*sums.device), BlockBytes(), sums.range_bytes);
  } else if (sums.batch != nullptr) {
    ranges = sums.batch->Wait();
    ReleaseChunkEvents(sums.chunk_events);
  } else {
    return std::move(sums.crcs);
  }
  if (!ranges.ok()) return ranges.status();
  for (size_t r = 0; r < ranges->size(); ++r) {
    OpChecksum& sum = sums.crcs[sums.range_ops[r]];
    sum.crc = (*ranges)[r].crc;
    sum.blocks = std::move((*ranges)[r].blocks);
  }
  return std::move(sums.crcs);
}

absl::Status CudaCopyEngine::CopySync(const std::vector<CopyOp>& ops) {
  return CopySyncChecked(ops, nullptr);
}

absl::Status CudaCopyEngine::CopySyncChecked(const std::vector<CopyOp>& ops,
                                             const BeforeCopy& before) {
  return CopySyncImpl(ops, before, nullptr, 0);
}

absl::Status CudaCopyEngine::CopySyncVerified(const std::vector<CopyOp>& ops,
                                              const BeforeCopy& before,
                                              const std::vector<std::vector<uint32_t>>& expected,
                                              uint64_t block_bytes) {
  TESSERA_RETURN_IF_ERROR(internal::ValidateExpectedBlocks(ops, expected, block_bytes));
  bool on_device = false;
  {
    absl::MutexLock issue_lock(&issue_mu_);
    ScopedDevice scoped;
    TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
    on_device = !expected.empty() && ChecksumOnDevice();
  }
  if (!on_device) return CopyEngine::CopySyncVerified(ops, before, expected, block_bytes);
  return CopySyncImpl(ops, before, &expected, block_bytes);
}

absl::Status CudaCopyEngine::CopySyncImpl(const std::vector<CopyOp>& ops, const BeforeCopy& before,
                                          const std::vector<std::vector<uint32_t>>* expected,
                                          uint64_t block_bytes) {
  TESSERA_RETURN_IF_ERROR(internal::ValidateCopyOps(ops));
  absl::MutexLock issue_lock(&issue_mu_);
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  // Start after the work already queued on the legacy default stream (which itself follows the
  // blocking streams), such as the initialisation of the tensors being restored.
  TESSERA_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(restore_event_, cudaStreamLegacy),
                                     "cudaEventRecord(restore start)"));
  TESSERA_RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(copy_stream_, restore_event_, 0),
                                     "cudaStreamWaitEvent(restore start)"));
  auto expected_for = [&](size_t op) -> const std::vector<uint32_t>* {
    if (expected == nullptr || op >= expected->size() || (*expected)[op].empty()) return nullptr;
    return &(*expected)[op];
  };
  const bool checking = before != nullptr || expected != nullptr;
  auto check = [&](size_t op, uint64_t offset, uint64_t bytes) -> absl::Status {
    if (const std::vector<uint32_t>* want = expected_for(op)) {
      return internal::CheckSourceBlocks(op, ops[op], *want, block_bytes, offset, bytes);
    }
    return before ? before(op, offset, bytes) : absl::OkStatus();
  };

  // Ops verified on the GPU, in groups of about kGroupBytes: once a group's copies have landed
  // (an event on the copy stream), the checksum stream checksums its blocks while the next
  // group copies.
  constexpr uint64_t kGroupBytes = uint64_t{256} << 20;
  struct Group {
    std::vector<size_t> ops;             // range r is op ops[r]
    std::vector<uint64_t> range_bytes;
    std::vector<internal::DeviceChecksummer::Piece> pieces;
    uint64_t bytes = 0;
    std::optional<internal::DeviceChecksummer::Pending> pending;
  };
  std::vector<Group> groups(1);
  std::vector<cudaEvent_t> group_events;
  auto flush = [&]() -> absl::Status {
    Group& group = groups.back();
    if (group.pieces.empty()) return absl::OkStatus();
    TESSERA_ASSIGN_OR_RETURN(cudaEvent_t landed, AcquireChunkEvent());
    group_events.push_back(landed);
    TESSERA_RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(landed, copy_stream_), "cudaEventRecord(group landed)"));
    TESSERA_ASSIGN_OR_RETURN(group.pending,
                             device_checksummer_->Enqueue(group.pieces, {}, landed, nullptr));
    groups.emplace_back();
    return absl::OkStatus();
  };

  TransferCounts counts;
  std::vector<RoutedOp> device_ops;
  std::vector<CopyOp> host_ops;
  std::vector<size_t> host_indices;
  absl::Status status = RouteOps(ops, &device_ops, &host_ops, &counts, &host_indices);
  for (size_t i = 0; status.ok() && i < device_ops.size(); ++i) {
    const RoutedOp& r = device_ops[i];
    if (r.dst == Where::kDevice && expected_for(r.index) != nullptr) {
      status = EnqueueChunks(r.op.dst, r.op.src, r.op.bytes, Direction(r), &counts);
      Group& group = groups.back();
      const size_t range = group.ops.size();
      group.ops.push_back(r.index);
      group.range_bytes.push_back(r.op.bytes);
      for (uint64_t at = 0; at < r.op.bytes; at += block_bytes) {
        group.pieces.push_back({range, at, static_cast<const char*>(r.op.dst) + at,
                                std::min<uint64_t>(block_bytes, r.op.bytes - at)});
      }
      group.bytes += r.op.bytes;
      if (status.ok() && group.bytes >= kGroupBytes) status = flush();
    } else if (!checking) {
      status = EnqueueChunks(r.op.dst, r.op.src, r.op.bytes, Direction(r), &counts);
    } else {
      // Chunk by chunk, each once its check passes: chunk k copies while k+1 is checked.
      for (uint64_t offset = 0; status.ok() && offset < r.op.bytes;
           offset += options_.chunk_bytes) {
        const uint64_t chunk = std::min<uint64_t>(options_.chunk_bytes, r.op.bytes - offset);
        status = check(r.index, offset, chunk);
        if (status.ok()) {
          status = EnqueueChunks(static_cast<char*>(r.op.dst) + offset,
                                 static_cast<const char*>(r.op.src) + offset, chunk,
                                 Direction(r), &counts);
        }
      }
    }
    if (!status.ok()) status = Annotate(status, absl::StrCat("copy op ", r.index));
  }
  if (status.ok()) status = flush();
  if (status.ok() && !checking) {
    internal::CopyHostMemory(host_ops, options_.host_copy_threads,
                             options_.host_parallel_min_bytes);
  }
  for (size_t h = 0; status.ok() && checking && h < host_ops.size(); ++h) {
    status = check(host_indices[h], 0, host_ops[h].bytes);
    if (status.ok()) {
      internal::CopyHostMemory({host_ops[h]}, options_.host_copy_threads,
                               options_.host_parallel_min_bytes);
    }
  }
  const absl::Status synced =
      CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
  if (status.ok()) status = synced;
  // The GPU's verdicts, in op order; a group not checked (an error before) is only waited for.
  uint64_t verified = 0;
  for (Group& group : groups) {
    if (!group.pending) continue;
    if (!status.ok()) {
      device_checksummer_->Abandon(std::move(*group.pending));
      continue;
    }
    absl::StatusOr<std::vector<internal::RangeChecksum>> ranges =
        device_checksummer_->Finish(std::move(*group.pending), block_bytes, group.range_bytes);
    if (!ranges.ok()) {
      status = ranges.status();
      continue;
    }
    for (size_t r = 0; status.ok() && r < ranges->size(); ++r) {
      const size_t op = group.ops[r];
      const std::vector<uint32_t>& want = *expected_for(op);
      for (size_t b = 0; b < want.size(); ++b) {
        if ((*ranges)[r].blocks[b] != want[b]) {
          status = internal::BlockMismatch(op, b, block_bytes, ops[op].bytes,
                                           (*ranges)[r].blocks[b], want[b],
                                           " where they landed on the GPU");
          break;
        }
      }
    }
    verified += group.bytes;
  }
  ReleaseChunkEvents(group_events);
  absl::MutexLock lock(&mu_);
  stats_.bytes_verified_on_device += verified;
  if (status.ok()) stats_.bytes_copied_sync += counts.total();
  return status;
}

CopyEngineStats CudaCopyEngine::stats() const {
  absl::MutexLock lock(&mu_);
  CopyEngineStats stats = stats_;
  stats.window_ns = window_s_.value() < 0 ? -1 : static_cast<int64_t>(window_s_.value() * 1e9);
  stats.d2h_bytes_per_s = d2h_rate_.value();
  stats.d2d_bytes_per_s = d2d_rate_.value();
  return stats;
}

absl::Status CudaCopyEngine::AcquireEventsLocked(EventPair* events) {
  if (free_events_.empty() && fence_ticket_ != 0 &&
      cudaEventQuery(in_flight_.at(fence_ticket_).events.done) == cudaSuccess) {
    RetireThroughLocked(fence_ticket_);
  }
  if (!free_events_.empty()) {
    *events = free_events_.back();
    free_events_.pop_back();
    return absl::OkStatus();
  }
  EventPair created;
  absl::Status status;
  for (cudaEvent_t* event : {&created.start, &created.released, &created.done}) {
    if (status.ok()) {
      status = CudaStatus(cudaEventCreateWithFlags(event, cudaEventDisableTiming),
                          "cudaEventCreateWithFlags");
    }
  }
  if (!status.ok()) {
    for (cudaEvent_t event : {created.start, created.released, created.done}) {
      if (event != nullptr) cudaEventDestroy(event);
    }
    return status;
  }
  *events = created;
  return absl::OkStatus();
}

void CudaCopyEngine::RetireThroughLocked(uint64_t ticket) {
  for (auto it = in_flight_.begin(); it != in_flight_.end() && it->first <= ticket;) {
    it->second.complete = true;
    if (it->second.waiters == 0) {
      free_events_.push_back(it->second.events);
      it = in_flight_.erase(it);
    } else {
      ++it;
    }
  }
  if (fence_ticket_ <= ticket) fence_ticket_ = 0;
}

void CudaCopyEngine::ReleaseEventsLocked(uint64_t ticket) {
  auto it = in_flight_.find(ticket);
  if (it == in_flight_.end() || it->second.waiters != 0) return;
  free_events_.push_back(it->second.events);
  in_flight_.erase(it);
  if (fence_ticket_ == ticket) fence_ticket_ = 0;
}

void CudaCopyEngine::AddCountsLocked(const TransferCounts& counts) {
  stats_.bytes_device_to_host += counts.device_to_host;
  stats_.bytes_device_to_pageable_host += counts.device_to_pageable_host;
  stats_.bytes_device_to_device += counts.device_to_device;
  stats_.bytes_host_to_device += counts.host_to_device;
  stats_.bytes_host_to_host += counts.host_to_host;
  stats_.device_copy_chunks += counts.chunks;
}

CopyEngineOptions Checked(const CopyEngineOptions& options) {
  CopyEngineOptions checked = options;
  if (checked.chunk_bytes == 0) checked.chunk_bytes = CopyEngineOptions().chunk_bytes;
  checked.host_copy_threads = std::max(checked.host_copy_threads, 1);
  checked.checksum_threads = std::max(checked.checksum_threads, 1);
  checked.checksum_block_bytes = std::max<size_t>(checked.checksum_block_bytes, 4096);
  checked.fence_issue_timeout_ms = std::max<int64_t>(checked.fence_issue_timeout_ms, 0);
  return checked;
}

}  // namespace

std::unique_ptr<CopyEngine> CopyEngine::Create(int device) {
  return Create(device, CopyEngineOptions());
}

std::unique_ptr<CopyEngine> CopyEngine::Create(int device, const CopyEngineOptions& options) {
  const CopyEngineOptions checked = Checked(options);
  absl::StatusOr<std::unique_ptr<CopyEngine>> engine = CudaCopyEngine::Open(device, checked);
  if (engine.ok()) {
    Log()->info("copy engine on {}", (*engine)->Describe());
    return *std::move(engine);
  }
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true)) {
    Log()->warn("GPU copy path off, copying host memory only: {}",
                std::string(engine.status().message()));
  } else {
    Log()->debug("GPU copy path off, copying host memory only: {}",
                 std::string(engine.status().message()));
  }
  return std::make_unique<internal::HostCopyEngine>(checked,
                                                    std::string(engine.status().message()));
}

std::unique_ptr<CopyEngine> CopyEngine::CreateHostOnly() {
  return CreateHostOnly(CopyEngineOptions());
}

std::unique_ptr<CopyEngine> CopyEngine::CreateHostOnly(const CopyEngineOptions& options) {
  return std::make_unique<internal::HostCopyEngine>(Checked(options), "GPU path not requested");
}

}  // namespace tessera::cuda
