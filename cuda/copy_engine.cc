#include "cuda/copy_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status.h"
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

// A snapshot point and the end of that snapshot's copies. Reused once the copies are complete.
struct EventPair {
  cudaEvent_t start = nullptr;
  cudaEvent_t done = nullptr;
};

void DestroyEvents(const EventPair& events) {
  cudaEventDestroy(events.start);
  cudaEventDestroy(events.done);
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
  absl::Status Fence(void* stream) override;
  absl::Status WaitCopies(uint64_t ticket) override;
  absl::Status CopySync(const std::vector<CopyOp>& ops) override;
  CopyEngineStats stats() const override;

 private:
  // The events of a ticket handed out and not yet retired.
  struct TicketEvents {
    EventPair events;
    bool complete = false;
    int waiters = 0;  // threads in cudaEventSynchronize(events.done)
  };

  CudaCopyEngine(int device, std::string name, const CopyEngineOptions& options,
                 cudaStream_t copy_stream, cudaEvent_t restore_event);

  // Enqueues the ops that involve device memory on copy_stream_, in chunks, and appends the
  // host-to-host ones to `host_ops`.
  absl::Status EnqueueDeviceCopies(const std::vector<CopyOp>& ops, std::vector<CopyOp>* host_ops,
                                   TransferCounts* counts) ABSL_EXCLUSIVE_LOCKS_REQUIRED(issue_mu_);

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
  std::atomic<bool> warned_pageable_{false};

  absl::Mutex issue_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  cudaStream_t const copy_stream_;
  cudaEvent_t const restore_event_ ABSL_GUARDED_BY(issue_mu_);

  mutable absl::Mutex mu_;
  internal::TicketSequence tickets_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, TicketEvents> in_flight_ ABSL_GUARDED_BY(mu_);
  std::vector<EventPair> free_events_ ABSL_GUARDED_BY(mu_);
  // The newest ticket whose done-event is recorded and which is not retired, or 0. The copy
  // stream is in order and tickets are issued in order, so its done-event covers every ticket.
  uint64_t fence_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  CopyEngineStats stats_ ABSL_GUARDED_BY(mu_);
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
  absl::Status created = CudaStatus(
      cudaEventCreateWithFlags(&restore_event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  if (!created.ok()) {
    cudaStreamDestroy(stream);
    return Annotate(created, unusable);
  }
  return std::unique_ptr<CopyEngine>(
      new CudaCopyEngine(device, properties.name, options, stream, restore_event));
}

CudaCopyEngine::CudaCopyEngine(int device, std::string name, const CopyEngineOptions& options,
                               cudaStream_t copy_stream, cudaEvent_t restore_event)
    : device_(device),
      name_(std::move(name)),
      options_(options),
      copy_stream_(copy_stream),
      restore_event_(restore_event) {}

CudaCopyEngine::~CudaCopyEngine() {
  ScopedDevice scoped;
  absl::Status status = scoped.Enter(device_);
  if (status.ok()) {
    status = CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
  }
  if (!status.ok()) Log()->warn("closing {}: {}", Describe(), status.ToString());
  absl::MutexLock issue_lock(&issue_mu_);
  absl::MutexLock lock(&mu_);
  for (const auto& [ticket, state] : in_flight_) DestroyEvents(state.events);
  for (const EventPair& events : free_events_) DestroyEvents(events);
  cudaEventDestroy(restore_event_);
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
  return ticket;
}

absl::Status CudaCopyEngine::IssueCopies(uint64_t ticket, const std::vector<CopyOp>& ops) {
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
  std::vector<CopyOp> host_ops;
  bool enqueued = false;
  bool done_recorded = false;
  absl::Status status = internal::ValidateCopyOps(ops);
  if (status.ok()) {
    enqueued = true;
    status = CudaStatus(cudaStreamWaitEvent(copy_stream_, events.start, 0),
                        "cudaStreamWaitEvent(snapshot point)");
  }
  if (status.ok()) status = EnqueueDeviceCopies(ops, &host_ops, &counts);
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(events.done, copy_stream_), "cudaEventRecord(copies done)");
    done_recorded = status.ok();
  }
  if (status.ok() && !host_ops.empty()) {
    status = CudaStatus(cudaEventSynchronize(events.start), "cudaEventSynchronize(snapshot point)");
    if (status.ok()) {
      internal::CopyHostMemory(host_ops, options_.host_copy_threads,
                               options_.host_parallel_min_bytes);
    }
  }
  if (!status.ok() && enqueued) {
    // A failed snapshot's slot is about to be reused: none of its copies may stay in flight.
    const absl::Status drained =
        CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
    if (!drained.ok()) {
      Log()->error("ticket {} failed ({}) and its copies could not be drained: {}", ticket,
                   status.ToString(), drained.ToString());
    }
  }

  absl::MutexLock lock(&mu_);
  tickets_.EndIssue(ticket, status);
  if (status.ok()) AddCountsLocked(counts);
  if (done_recorded) {
    fence_ticket_ = ticket;
  } else {
    ReleaseEventsLocked(ticket);  // nothing of this ticket is in flight
  }
  return status;
}

absl::Status CudaCopyEngine::EnqueueDeviceCopies(const std::vector<CopyOp>& ops,
                                                 std::vector<CopyOp>* host_ops,
                                                 TransferCounts* counts) {
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
      counts->host_to_host += op.bytes;
      continue;
    }
    const char* direction = from_device ? (to_device ? "D2D" : "D2H") : "H2D";
    for (size_t offset = 0; offset < op.bytes; offset += options_.chunk_bytes) {
      const size_t bytes = std::min(options_.chunk_bytes, op.bytes - offset);
      const absl::Status copied =
          CudaStatus(cudaMemcpyAsync(static_cast<char*>(op.dst) + offset,
                                     static_cast<const char*>(op.src) + offset, bytes,
                                     cudaMemcpyDefault, copy_stream_),
                     absl::StrCat("cudaMemcpyAsync(", direction, ", ", bytes, " bytes)"));
      if (!copied.ok()) return Annotate(copied, context);
      ++counts->chunks;
    }
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

absl::Status CudaCopyEngine::Fence(void* stream) {
  ScopedDevice scoped;
  TESSERA_RETURN_IF_ERROR(scoped.Enter(device_));
  absl::MutexLock lock(&mu_);
  const absl::Duration timeout = absl::Milliseconds(options_.fence_issue_timeout_ms);
  for (uint64_t abandoned : internal::AwaitAllIssued(mu_, tickets_, timeout, stats_)) {
    ReleaseEventsLocked(abandoned);
  }
  if (fence_ticket_ == 0) return absl::OkStatus();
  const cudaEvent_t done = in_flight_.at(fence_ticket_).events.done;
  const cudaError_t query = cudaEventQuery(done);
  if (query == cudaSuccess) {
    RetireThroughLocked(fence_ticket_);
    return absl::OkStatus();
  }
  if (query != cudaErrorNotReady) return CudaStatus(query, "cudaEventQuery(copies done)");
  return CudaStatus(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), done, 0),
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

absl::Status CudaCopyEngine::CopySync(const std::vector<CopyOp>& ops) {
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
  TransferCounts counts;
  std::vector<CopyOp> host_ops;
  absl::Status status = EnqueueDeviceCopies(ops, &host_ops, &counts);
  if (status.ok()) {
    internal::CopyHostMemory(host_ops, options_.host_copy_threads,
                             options_.host_parallel_min_bytes);
  }
  const absl::Status synced =
      CudaStatus(cudaStreamSynchronize(copy_stream_), "cudaStreamSynchronize(copy stream)");
  if (status.ok()) status = synced;
  if (status.ok()) {
    absl::MutexLock lock(&mu_);
    stats_.bytes_copied_sync += counts.total();
  }
  return status;
}

CopyEngineStats CudaCopyEngine::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
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
  TESSERA_RETURN_IF_ERROR(
      CudaStatus(cudaEventCreateWithFlags(&created.start, cudaEventDisableTiming),
                 "cudaEventCreateWithFlags"));
  const absl::Status status = CudaStatus(
      cudaEventCreateWithFlags(&created.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  if (!status.ok()) {
    cudaEventDestroy(created.start);
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
