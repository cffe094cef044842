// The copy engine moves a rank's state between GPU memory and the daemon's shared-memory slots.
//
// A snapshot is three calls on two threads:
//
//   trainer thread                        agent thread
//   ticket = MarkSnapshotPoint(compute)
//                                         IssueCopies(ticket, ops)  enqueues the device copies
//   forward, backward                                               on the engine's copy stream
//   Fence(compute)                        WaitCopies(ticket)        then seals the slot
//   optimizer step
//
// The copy stream starts at the point MarkSnapshotPoint recorded, so the copies see exactly the
// state of that moment, and Fence makes the compute stream wait (on the GPU) for them before the
// optimizer step changes that state.
//
// Two implementations share this interface: the CUDA engine, and the host engine used where no
// CUDA device is usable, which copies host memory with memcpy and has the same ticket semantics
// (every pointer given to it must be host memory).
//
// Tickets. MarkSnapshotPoint returns tickets 1, 2, 3, ... Each ticket must then be passed to
// IssueCopies exactly once, in the order the tickets were marked (an empty `ops` stands for a
// skipped snapshot). Fence waits on the CPU for every marked ticket to be issued; a ticket not
// issued within CopyEngineOptions::fence_issue_timeout_ms is abandoned: it is logged and counted,
// Fence goes on, and IssueCopies later returns kAborted for it without copying anything.
//
// Thread safety: every method may be called from any thread, concurrently with the others;
// IssueCopies calls are serialised internally. The intended split is the one drawn above.
//
// Errors are absl::Status; no method exits or aborts. A failing CUDA call is reported with the
// call and the CUDA error name, e.g. "cudaMemcpyAsync(D2H, 1048576 bytes): cudaErrorInvalidValue
// (invalid argument)".
#ifndef TESSERA_CUDA_COPY_ENGINE_H_
#define TESSERA_CUDA_COPY_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "cuda/staging_plan.h"

namespace tessera::cuda {

enum class MemoryKind { kHost, kDevice };

// The CRC32C of an op's destination as its copy left it: of the whole, and of each block of
// CopyEngineOptions::checksum_block_bytes from its start (the last one shorter).
struct OpChecksum {
  uint32_t crc = 0;
  std::vector<uint32_t> blocks;
};

// Copies `bytes` from `src` to `dst`. The ranges must not overlap. Either pointer may be null
// only when `bytes` is 0.
struct CopyOp {
  void* dst;
  const void* src;
  size_t bytes;
};

// GPU staging (see staging_plan.h): device-to-host bytes first copied device-to-device into a
// staging buffer, so that the fence waits only for that copy and the device-to-host copies that
// were not staged.
struct StagingOptions {
  StagingMode mode = StagingMode::kOff;
  // GPU memory the staging buffer may take. 0: `budget_free_fraction` of the device's free memory
  // (plus the buffer's own size) when the buffer would grow.
  uint64_t budget_bytes = 0;
  double budget_free_fraction = 0.5;  // in (0, 1]
};

// kInvalidArgument naming the field, for a fraction outside (0, 1].
absl::Status ValidateStagingOptions(const StagingOptions& options);

struct CopyEngineOptions {
  // Device copies are enqueued in pieces of at most this many bytes, so that one huge tensor
  // does not hold the copy stream in a single operation. 0 stands for the default.
  size_t chunk_bytes = size_t{64} << 20;
  // How long Fence waits on the CPU for a marked ticket to be issued before abandoning it.
  int64_t fence_issue_timeout_ms = 10'000;
  // Host-to-host copies totalling at least `host_parallel_min_bytes` in one call are split
  // across this many threads (the calling thread included); 1 copies on the calling thread alone.
  // Measured on a 2-core VM, into pre-faulted memory: one thread 11 GB/s, two 20-24 GB/s from
  // 16 MiB up, three or four no better than two; below 16 MiB splitting does not pay. Into
  // fresh shm pages every setting runs at the page-fault rate (about 1.9 GB/s).
  int host_copy_threads = 2;
  size_t host_parallel_min_bytes = size_t{16} << 20;
  StagingOptions staging;
  // IssueChecksummedCopies: worker threads for device-to-host chunks (started on first use), and
  // the checksum block: every op's bytes are checksummed in blocks of this many bytes from its
  // start (the last one shorter), each block's CRC32C reported, so that a restore can verify a
  // block before it copies it. A chunk's blocks are checksummed in parallel once it lands, so
  // the last chunk's checksum takes about a block's time. ISA-L's CRC32C runs at about 24 GB/s
  // per core from memory on the 2-core build machine, so 4 threads keep up with 55 GB/s.
  int checksum_threads = 4;
  size_t checksum_block_bytes = size_t{8} << 20;  // at least 4096
  // Device-to-host bytes are checksummed on the GPU instead (device_checksum.h): a kernel on a
  // stream of the engine's reads the same bytes the copies read, beside them, and the host only
  // combines one CRC per block. The host's CRC32C (10 GB/s per core on an H100 host) cannot keep
  // up with a 55 GB/s copy on 4 threads; the kernel reads GPU memory at hundreds of GB/s. The
  // sources are released (Fence) once both the copies and the kernel have read them. Falls back
  // to the threads above, logged once, if the checksum stream cannot be created.
  bool checksum_on_device = true;
};

// Monotonic counters since the engine was created.
struct CopyEngineStats {
  uint64_t tickets = 0;            // tickets handed out by MarkSnapshotPoint
  uint64_t tickets_abandoned = 0;  // tickets Fence stopped waiting for
  uint64_t fences = 0;
  uint64_t fence_cpu_waits = 0;    // Fences that waited on the CPU for a ticket to be issued
  uint64_t fence_cpu_wait_ns = 0;  // total CPU time those Fences spent waiting
  // Bytes copied by IssueCopies, by direction.
  uint64_t bytes_device_to_host = 0;
  uint64_t bytes_device_to_device = 0;
  uint64_t bytes_host_to_device = 0;
  uint64_t bytes_host_to_host = 0;
  // Of bytes_device_to_host, those written to pageable (not registered) host memory, which
  // copies an order of magnitude slower than registered memory.
  uint64_t bytes_device_to_pageable_host = 0;
  uint64_t device_copy_chunks = 0;  // cudaMemcpyAsync calls made by IssueCopies
  uint64_t bytes_copied_sync = 0;   // bytes copied by CopySync, every direction
  uint64_t bytes_checksummed = 0;   // destination bytes checksummed (IssueChecksummedCopies)
  uint64_t bytes_checksummed_on_device = 0;  // of those, checksummed by the GPU
  uint64_t bytes_verified_on_device = 0;     // CopySyncVerified bytes checked by the GPU

  // Staging. bytes_staged counts device-to-device copies into the staging buffer (also counted,
  // as they go on to the host, in bytes_device_to_host).
  uint64_t bytes_staged = 0;
  uint64_t staging_budget_short = 0;    // snapshots whose plan wanted more than the budget
  uint64_t staging_alloc_failures = 0;  // staging buffers the device could not allocate
  uint64_t staging_buffer_bytes = 0;    // the buffer's size now
  // The last snapshot's plan, and the measurements it was made from (< 0: unknown): the shortest
  // of the last 8 windows, smoothed rates.
  uint64_t plan_staged_bytes = 0;
  uint64_t plan_device_to_host_bytes = 0;
  int64_t plan_expected_stall_ns = -1;
  int64_t window_ns = -1;          // GPU time from the snapshot point to the next fence
  double d2h_bytes_per_s = -1;     // device-to-host rate of snapshot copies
  double d2d_bytes_per_s = -1;     // device-to-device rate of staging copies
  uint64_t windows_measured = 0;
};

class CopyEngine {
 public:
  // A CUDA engine on `device` (the calling thread's current device when -1) when that device is
  // usable; otherwise the host engine, after logging once, at warn, why the GPU path is off.
  // Never fails.
  static std::unique_ptr<CopyEngine> Create(int device = -1);
  static std::unique_ptr<CopyEngine> Create(int device, const CopyEngineOptions& options);
  // The host engine, whether or not a GPU is present. Makes no CUDA call.
  static std::unique_ptr<CopyEngine> CreateHostOnly();
  static std::unique_ptr<CopyEngine> CreateHostOnly(const CopyEngineOptions& options);

  CopyEngine() = default;
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Waits for copies in flight, then releases the engine's stream and events.
  // REQUIRES: no other call on this engine is in progress or follows.
  virtual ~CopyEngine();

  virtual bool has_gpu() const = 0;

  // "cuda device 0 (NVIDIA H100 80GB HBM3)", or "host (<why>)" for the host engine.
  virtual std::string Describe() const = 0;

  // Pins [ptr, ptr + bytes) for DMA from any device (cudaHostRegister, portable). Slow (about
  // 30 ms per GiB): call once when a slot is mapped, never in the snapshot path. The memory must
  // stay mapped until UnregisterHost(ptr). A no-op on the host engine.
  // Errors: kInvalidArgument for a null or empty range, kAlreadyExists if already registered.
  virtual absl::Status RegisterHost(void* ptr, size_t bytes) = 0;
  // REQUIRES: `ptr` was registered by RegisterHost and no copy into it is in flight.
  // Errors: kNotFound if `ptr` is not the start of a registered range.
  virtual absl::Status UnregisterHost(void* ptr) = 0;

  // Whether `ptr` is device memory (device or managed allocations) or host memory (pinned,
  // registered or pageable). Always kHost on the host engine. kInvalidArgument for null.
  virtual absl::StatusOr<MemoryKind> Locate(const void* ptr) = 0;

  // Records the snapshot point on `compute_stream` (a cudaStream_t; nullptr is the legacy default
  // stream; ignored by the host engine) and returns the snapshot's ticket. Never blocks: about
  // 1 us on an H100 (p99 under 4 us).
  virtual absl::StatusOr<uint64_t> MarkSnapshotPoint(void* compute_stream) = 0;

  // Copies the snapshot `ticket`: the copy stream waits for the snapshot point, the device copies
  // are enqueued in chunks of options.chunk_bytes, then a done-event is recorded and the call
  // returns without waiting for them. With staging (StagingOptions), the device-to-host bytes
  // the plan picks are copied device-to-device into the staging buffer (on a stream of their
  // own) while the others go device-to-host, and the staged ones go from the buffer to the host
  // after those, group by group as their staging completes: Fence waits for the first two, not
  // the third. Ops whose source and destination are both host memory are
  // then copied with memcpy on the calling thread, once the compute stream has reached the
  // snapshot point (so host memory written by GPU work queued before it is copied as written);
  // with such ops the call blocks until that point.
  //
  // REQUIRES: every op's memory stays valid, and its source unchanged, until the copies complete
  // (WaitCopies). Device-to-host copies belong in registered memory (RegisterHost): into pageable
  // memory they run about 30x slower and IssueCopies blocks until they are done (warned about
  // once, counted in stats).
  // Errors (the ticket is not consumed): kInvalidArgument for a ticket never handed out,
  // kFailedPrecondition for a ticket already issued or issued before an earlier one, kAborted for
  // a ticket that Fence abandoned.
  // Errors (the ticket is consumed, and WaitCopies returns the same error): kInvalidArgument for
  // an op with a null pointer and nonzero bytes (nothing is copied), or the failing CUDA call;
  // copies already enqueued for the ticket are drained before such an error returns.
  virtual absl::Status IssueCopies(uint64_t ticket, const std::vector<CopyOp>& ops) = 0;

  // IssueCopies that also checksums what lands: the CRC32C of every op's destination, computed
  // beside the copies, so that it is known within one block of the copies' end instead of after
  // a second pass over the bytes. Device-to-host bytes are checksummed on the GPU as they are
  // read (options.checksum_on_device), or else each chunk once it has landed, on
  // options.checksum_threads threads that do not delay the copies after it; a host-to-host copy
  // checksums each block right after copying it, from the cache. WaitChecksums returns the
  // results. Every destination must be host memory (kInvalidArgument, ticket consumed,
  // otherwise). The checksum is of the destination's bytes
  // as the copy left them: bytes changed afterwards no longer match it.
  // REQUIRES: WaitChecksums is called for each ticket this accepted (until then its events and
  // results are held).
  virtual absl::Status IssueChecksummedCopies(uint64_t ticket, const std::vector<CopyOp>& ops) = 0;

  // Makes `stream` (a cudaStream_t, nullptr the legacy default stream) wait, on the GPU, until the
  // copies of every ticket marked so far have read their sources (staged bytes: once they are in
  // the staging buffer), so that work enqueued on it afterwards may overwrite them. If a marked
  // ticket is not issued yet, first waits on the CPU until it is (counted in stats), or abandons
  // it after options.fence_issue_timeout_ms. The first Fence after a snapshot point also marks
  // the end of that snapshot's window on `stream` (the staging plan's measurement).
  // The host engine returns once every marked ticket's copies are done.
  virtual absl::Status Fence(void* stream) = 0;

  // Blocks until the copies of `ticket` are complete, then returns the outcome of its
  // IssueCopies. Errors: kInvalidArgument for a ticket never handed out, kFailedPrecondition for
  // a ticket not issued yet, kAborted for an abandoned one.
  virtual absl::Status WaitCopies(uint64_t ticket) = 0;

  // WaitCopies, then waits for the checksums of a ticket issued by IssueChecksummedCopies and
  // returns them, per op in op order (an empty op: crc 0, no blocks). Once per ticket:
  // kFailedPrecondition for a ticket issued without checksums or already taken.
  virtual absl::StatusOr<std::vector<OpChecksum>> WaitChecksums(uint64_t ticket) = 0;

  // Restore path: performs `ops` (host to device, device to device, device to host or host to
  // host) and returns once they are complete. The copies start after the work already queued on
  // the legacy default stream; work on other streams that still touches the destinations must
  // be synchronised by the caller first. Errors: kInvalidArgument for a null pointer with nonzero
  // bytes (nothing is copied), or the failing CUDA call.
  virtual absl::Status CopySync(const std::vector<CopyOp>& ops) = 0;

  // CopySync that first calls `before(op, offset, bytes)` for each piece of an op it is about to
  // copy, and copies that piece only once it returns OK (on the first error, copies nothing more,
  // drains what is in flight and returns that error). A device copy calls it per chunk, after
  // enqueueing the chunks before, so that a restore verifies chunk k+1 while chunk k copies; a
  // host copy calls it once per op.
  using BeforeCopy = std::function<absl::Status(size_t op, uint64_t offset, uint64_t bytes)>;
  virtual absl::Status CopySyncChecked(const std::vector<CopyOp>& ops,
                                       const BeforeCopy& before) = 0;

  // CopySyncChecked that also verifies ops against the CRC32C of each block of `block_bytes`
  // recorded for them: expected[op] (empty: not verified here; `expected` may be empty or one
  // list per op, each of ceil(bytes / block_bytes) CRCs, kInvalidArgument otherwise).
  // On a GPU, a verified op whose destination is device memory is copied at once, and a CRC32C
  // kernel checksums the blocks that landed beside the copies that follow (CPU: none); any other
  // verified op's source blocks are checked on the calling thread before they are copied. A
  // block whose CRC32C differs is kDataLoss naming the op, the bytes and both CRC32Cs: on the
  // GPU path reported once every copy is done, its bytes having landed; on the host path before
  // they are copied. `before` still runs for the ops not verified here (may be null).
  virtual absl::Status CopySyncVerified(const std::vector<CopyOp>& ops, const BeforeCopy& before,
                                        const std::vector<std::vector<uint32_t>>& expected,
                                        uint64_t block_bytes);

  virtual CopyEngineStats stats() const = 0;

  // Changes the staging of the snapshots issued from now on. The host engine, which has nothing
  // to stage, accepts and ignores it. Errors: ValidateStagingOptions's.
  virtual absl::Status SetStaging(const StagingOptions& options);
};

// The Status for a CUDA runtime result (a cudaError_t): OK for cudaSuccess, otherwise
// "<call>: <cudaGetErrorName> (<cudaGetErrorString>)" with a canonical code
// (cudaErrorInvalidValue -> kInvalidArgument, cudaErrorMemoryAllocation -> kResourceExhausted,
// cudaErrorHostMemoryAlreadyRegistered -> kAlreadyExists, cudaErrorHostMemoryNotRegistered ->
// kNotFound, no device or driver -> kFailedPrecondition, anything else kInternal).
// Clears the runtime's last-error state for non-sticky errors.
absl::Status CudaStatus(int cuda_error, absl::string_view call);

}  // namespace tessera::cuda

#endif  // TESSERA_CUDA_COPY_ENGINE_H_
