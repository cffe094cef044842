// The CUDA copy engine against a real device: snapshots of device memory into a registered
// POSIX shared-memory mapping (as a daemon slot), the fence, chunking and the restore path.
// Skips, saying why, where no CUDA device is usable.
//
// TESSERA_GPU_TEST_BYTES: bytes per snapshot (default 256 MiB; a few GiB on a large GPU).
// TESSERA_TEST_SEED: the pattern seed (printed by every test).
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "cuda/copy_engine.h"
#include "cuda/test_kernels.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera::cuda {
namespace {

using test::CountPatternMismatches;
using test::FillPattern;
using test::FillPatternHost;
using test::FirstPatternMismatchHost;
using test::Spin;
using ::testing::HasSubstr;
using ::testing::StartsWith;

#define ASSERT_OK(expr)                    \
  do {                                     \
    const ::absl::Status status_ = (expr); \
    ASSERT_TRUE(status_.ok()) << status_;  \
  } while (0)
#define CUDA_ASSERT(call) ASSERT_OK(CudaStatus((call), #call))

constexpr uint64_t kNewSeedOffset = 0x1000;
constexpr uint64_t kSpinNs = 30'000'000;  // keeps the compute stream busy past the snapshot point

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::strtoull(value, nullptr, 0) : fallback;
}

uint64_t TestBytes() { return EnvOr("TESSERA_GPU_TEST_BYTES", uint64_t{256} << 20); }

// Odd sizes, small to large, adding up to `total` bytes.
std::vector<size_t> TensorSizes(uint64_t total) {
  std::vector<size_t> sizes = {1, 3, 4095, 65537, (size_t{1} << 20) + 7};
  uint64_t used = 0;
  for (size_t bytes : sizes) used += bytes;
  for (size_t k = 1; used < total; ++k) {
    const size_t bytes = std::min<uint64_t>(total - used, (size_t{96} << 20) + 13 * k);
    sizes.push_back(bytes);
    used += bytes;
  }
  return sizes;
}

// A shared-memory mapping made as the daemon makes a slot: a file in /dev/shm, preallocated,
// mapped, pre-faulted and registered with the engine. Unlinked at once; unmapped on destruction.
class ShmSlot {
 public:
  ShmSlot(CopyEngine* engine, size_t bytes) : engine_(engine), bytes_(bytes) {}
  ShmSlot(const ShmSlot&) = delete;
  ShmSlot& operator=(const ShmSlot&) = delete;
  ~ShmSlot() {
    if (registered_) engine_->UnregisterHost(data_).IgnoreError();
    if (data_ != nullptr) munmap(data_, bytes_);
  }

  absl::Status Open() {
    static std::atomic<int> counter{0};
    const std::string path =
        absl::StrCat("/dev/shm/tessera-copy-engine-gpu-test-", getpid(), "-", counter++);
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", strerror(errno)));
    unlink(path.c_str());
    const int allocated = posix_fallocate(fd, 0, bytes_);
    if (allocated != 0) {
      close(fd);
      return absl::ResourceExhaustedError(
          absl::StrCat("posix_fallocate(", bytes_, " bytes) in /dev/shm: ", strerror(allocated)));
    }
    void* data = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (data == MAP_FAILED) return absl::InternalError(absl::StrCat("mmap: ", strerror(errno)));
    data_ = static_cast<unsigned char*>(data);
    std::memset(data_, 0xa5, bytes_);  // not zeros: a byte left unwritten must show
    absl::Status registered = engine_->RegisterHost(data_, bytes_);
    registered_ = registered.ok();
    return registered;
  }

  unsigned char* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  CopyEngine* const engine_;
  const size_t bytes_;
  unsigned char* data_ = nullptr;
  bool registered_ = false;
};

// Device tensors of the given sizes, each with its own seed, and where each goes in a slot:
// packed at offsets that are sometimes unaligned.
class DeviceTensors {
 public:
  DeviceTensors() = default;
  DeviceTensors(const DeviceTensors&) = delete;
  DeviceTensors& operator=(const DeviceTensors&) = delete;
  ~DeviceTensors() {
    for (void* ptr : ptrs_) cudaFree(ptr);
  }

  absl::Status Allocate(const std::vector<size_t>& sizes) {
    size_t offset = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      void* ptr = nullptr;
      TESSERA_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&ptr, std::max<size_t>(sizes[i], 1)),
                                         absl::StrCat("cudaMalloc(", sizes[i], " bytes)")));
      ptrs_.push_back(ptr);
      sizes_.push_back(sizes[i]);
      offsets_.push_back(offset);
      offset += sizes[i] + i % 4;
    }
    slot_bytes_ = offset;
    return absl::OkStatus();
  }

  // Writes the pattern for `seed + i` to tensor i, on `stream`.
  absl::Status Fill(uint64_t seed, cudaStream_t stream) {
    for (size_t i = 0; i < ptrs_.size(); ++i) {
      TESSERA_RETURN_IF_ERROR(
          CudaStatus(FillPattern(ptrs_[i], sizes_[i], seed + i, stream), "FillPattern"));
    }
    return absl::OkStatus();
  }

  std::vector<CopyOp> SnapshotOps(unsigned char* slot) const {
    std::vector<CopyOp> ops;
    for (size_t i = 0; i < ptrs_.size(); ++i)
      ops.push_back({slot + offsets_[i], ptrs_[i], sizes_[i]});
    return ops;
  }

  std::vector<CopyOp> RestoreOps(const unsigned char* slot) const {
    std::vector<CopyOp> ops;
    for (size_t i = 0; i < ptrs_.size(); ++i)
      ops.push_back({ptrs_[i], slot + offsets_[i], sizes_[i]});
    return ops;
  }

  // "" if tensor i's copy in `slot` holds the pattern for `seed + i` for every i; else the first
  // difference.
  std::string CheckSlot(const unsigned char* slot, uint64_t seed) const {
    for (size_t i = 0; i < ptrs_.size(); ++i) {
      const size_t at = FirstPatternMismatchHost(slot + offsets_[i], sizes_[i], seed + i);
      if (at != sizes_[i]) {
        return absl::StrCat("tensor ", i, " (", sizes_[i], " bytes at slot offset ", offsets_[i],
                            ") differs from seed ", seed + i, " at byte ", at);
      }
    }
    return "";
  }

  size_t size() const { return ptrs_.size(); }
  void* ptr(size_t i) const { return ptrs_[i]; }
  size_t bytes(size_t i) const { return sizes_[i]; }
  size_t slot_bytes() const { return slot_bytes_; }
  uint64_t total_bytes() const {
    uint64_t total = 0;
    for (size_t bytes : sizes_) total += bytes;
    return total;
  }

 private:
  std::vector<void*> ptrs_;
  std::vector<size_t> sizes_;
  std::vector<size_t> offsets_;
  size_t slot_bytes_ = 0;
};

class GpuCopyEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    const cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) GTEST_SKIP() << "no CUDA device: " << cudaGetErrorName(error);
    if (count == 0) GTEST_SKIP() << "no CUDA device: none found";
    seed_ = EnvOr("TESSERA_TEST_SEED", 0x7e55e7a);
    std::cout << "seed " << seed_ << " (TESSERA_TEST_SEED), " << TestBytes()
              << " bytes per snapshot (TESSERA_GPU_TEST_BYTES)\n";
    RecordProperty("seed", std::to_string(seed_));
    engine_ = CopyEngine::Create(0);
    ASSERT_TRUE(engine_->has_gpu()) << engine_->Describe();
    CUDA_ASSERT(cudaSetDevice(0));
    CUDA_ASSERT(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
    CUDA_ASSERT(cudaMalloc(reinterpret_cast<void**>(&mismatches_), sizeof(*mismatches_)));
  }

  void TearDown() override {
    engine_.reset();
    if (compute_ != nullptr) cudaStreamDestroy(compute_);
    if (mismatches_ != nullptr) cudaFree(mismatches_);
  }

  // Bytes of device memory [ptr, ptr + bytes) that differ from the pattern for `seed`.
  uint64_t DeviceMismatches(const void* ptr, size_t bytes, uint64_t seed) {
    unsigned long long count = ~0ull;
    if (cudaMemsetAsync(mismatches_, 0, sizeof(count), compute_) != cudaSuccess ||
        CountPatternMismatches(ptr, bytes, seed, mismatches_, compute_) != cudaSuccess ||
        cudaMemcpyAsync(&count, mismatches_, sizeof(count), cudaMemcpyDeviceToHost, compute_) !=
            cudaSuccess ||
        cudaStreamSynchronize(compute_) != cudaSuccess) {
      ADD_FAILURE() << "counting mismatches failed: " << cudaGetErrorName(cudaGetLastError());
    }
    return count;
  }

  uint64_t seed_ = 0;
  std::unique_ptr<CopyEngine> engine_;
  cudaStream_t compute_ = nullptr;
  unsigned long long* mismatches_ = nullptr;
};

TEST_F(GpuCopyEngineTest, DescribesItsDevice) {
  EXPECT_THAT(engine_->Describe(), StartsWith("cuda device 0 ("));
  std::cout << engine_->Describe() << "\n";
}

TEST_F(GpuCopyEngineTest, LocatesDeviceAndHostMemory) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({4096}));
  ShmSlot slot(engine_.get(), 1 << 20);
  ASSERT_OK(slot.Open());
  std::vector<unsigned char> pageable(4096);

  absl::StatusOr<MemoryKind> kind = engine_->Locate(tensors.ptr(0));
  ASSERT_TRUE(kind.ok()) << kind.status();
  EXPECT_EQ(*kind, MemoryKind::kDevice);
  kind = engine_->Locate(slot.data() + 12345);
  ASSERT_TRUE(kind.ok()) << kind.status();
  EXPECT_EQ(*kind, MemoryKind::kHost);
  kind = engine_->Locate(pageable.data());
  ASSERT_TRUE(kind.ok()) << kind.status();
  EXPECT_EQ(*kind, MemoryKind::kHost);
  EXPECT_EQ(engine_->Locate(nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(GpuCopyEngineTest, CudaErrorsAreStatusesNamingTheCall) {
  ShmSlot slot(engine_.get(), 1 << 20);
  ASSERT_OK(slot.Open());
  const absl::Status again = engine_->RegisterHost(slot.data(), slot.bytes());
  EXPECT_EQ(again.code(), absl::StatusCode::kAlreadyExists) << again;
  EXPECT_THAT(std::string(again.message()),
              StartsWith("cudaHostRegister(1048576 bytes): cudaErrorHostMemoryAlreadyRegistered"));

  std::vector<unsigned char> never_registered(4096);
  const absl::Status unregister = engine_->UnregisterHost(never_registered.data());
  EXPECT_EQ(unregister.code(), absl::StatusCode::kNotFound) << unregister;
  EXPECT_THAT(std::string(unregister.message()), HasSubstr("cudaErrorHostMemoryNotRegistered"));
}

TEST_F(GpuCopyEngineTest, SnapshotIntoRegisteredShmIsBitExact) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate(TensorSizes(TestBytes())));
  ShmSlot slot(engine_.get(), tensors.slot_bytes());
  ASSERT_OK(slot.Open());
  ASSERT_OK(tensors.Fill(seed_, compute_));

  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  const absl::Time start = absl::Now();
  ASSERT_OK(engine_->IssueCopies(*ticket, tensors.SnapshotOps(slot.data())));
  ASSERT_OK(engine_->WaitCopies(*ticket));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::cout << tensors.size() << " tensors, " << tensors.total_bytes() << " bytes device to "
            << "registered shm in " << seconds * 1e3 << " ms ("
            << tensors.total_bytes() / seconds / 1e9
            << " GB/s, including the fill kernels still running at the snapshot point)\n";

  EXPECT_EQ(tensors.CheckSlot(slot.data(), seed_), "");
  const CopyEngineStats stats = engine_->stats();
  EXPECT_EQ(stats.bytes_device_to_host, tensors.total_bytes());
  EXPECT_EQ(stats.bytes_device_to_pageable_host, 0u);
  EXPECT_GE(stats.device_copy_chunks, tensors.size());
}

TEST_F(GpuCopyEngineTest, MixedHostAndDeviceSources) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({(3 << 20) + 1, 4097, 5}));
  DeviceTensors staging;  // a device-to-device copy, as into the agent's staging buffer
  ASSERT_OK(staging.Allocate({tensors.bytes(0)}));
  ASSERT_OK(tensors.Fill(seed_, compute_));
  ASSERT_OK(staging.Fill(seed_ + kNewSeedOffset, compute_));
  std::vector<std::vector<unsigned char>> host_tensors = {std::vector<unsigned char>((1 << 20) + 3),
                                                          std::vector<unsigned char>(999)};
  for (size_t i = 0; i < host_tensors.size(); ++i) {
    FillPatternHost(host_tensors[i].data(), host_tensors[i].size(), seed_ + 100 + i);
  }
  ShmSlot slot(engine_.get(), tensors.slot_bytes() + (2 << 20));
  ASSERT_OK(slot.Open());

  std::vector<CopyOp> ops = tensors.SnapshotOps(slot.data());
  size_t offset = tensors.slot_bytes() + 1;
  std::vector<size_t> host_offsets;
  for (const auto& host : host_tensors) {
    ops.push_back({slot.data() + offset, host.data(), host.size()});
    host_offsets.push_back(offset);
    offset += host.size();
  }
  ops.push_back({staging.ptr(0), tensors.ptr(0), tensors.bytes(0)});

  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine_->IssueCopies(*ticket, ops));
  ASSERT_OK(engine_->WaitCopies(*ticket));

  EXPECT_EQ(tensors.CheckSlot(slot.data(), seed_), "");
  for (size_t i = 0; i < host_tensors.size(); ++i) {
    EXPECT_EQ(FirstPatternMismatchHost(slot.data() + host_offsets[i], host_tensors[i].size(),
                                       seed_ + 100 + i),
              host_tensors[i].size())
        << "host tensor " << i;
  }
  EXPECT_EQ(DeviceMismatches(staging.ptr(0), tensors.bytes(0), seed_), 0u);
  const CopyEngineStats stats = engine_->stats();
  EXPECT_EQ(stats.bytes_device_to_host, tensors.total_bytes());
  EXPECT_EQ(stats.bytes_host_to_host, (1u << 20) + 3 + 999);
  EXPECT_EQ(stats.bytes_device_to_device, tensors.bytes(0));
}

// The snapshot runs as in training: the compute stream is still busy when the snapshot point is
// marked, the agent thread issues the copies a little later, and right after Fence a kernel on
// the compute stream overwrites every tensor. The slot must hold the state of the snapshot
// point. WithoutFenceTheOverwriteRacesTheCopy shows the check sees it when the fence is missing.
class FenceTest : public GpuCopyEngineTest {
 protected:
  // Runs the sequence above, fencing or not; leaves the slot's check in `slot_check`.
  void SnapshotThenOverwrite(bool fence, std::string* slot_check) {
    DeviceTensors tensors;
    ASSERT_OK(tensors.Allocate(TensorSizes(TestBytes())));
    ShmSlot slot(engine_.get(), tensors.slot_bytes());
    ASSERT_OK(slot.Open());
    ASSERT_OK(tensors.Fill(seed_, compute_));
    CUDA_ASSERT(Spin(kSpinNs, compute_));
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
    ASSERT_TRUE(ticket.ok()) << ticket.status();

    absl::Status issued, waited;
    std::thread agent([&] {
      absl::SleepFor(absl::Milliseconds(5));
      issued = engine_->IssueCopies(*ticket, tensors.SnapshotOps(slot.data()));
      waited = engine_->WaitCopies(*ticket);
    });
    const absl::Status fenced = fence ? engine_->Fence(compute_) : absl::OkStatus();
    const absl::Status overwritten = tensors.Fill(seed_ + kNewSeedOffset, compute_);
    agent.join();
    ASSERT_OK(fenced);
    ASSERT_OK(overwritten);
    ASSERT_OK(issued);
    ASSERT_OK(waited);
    CUDA_ASSERT(cudaStreamSynchronize(compute_));

    *slot_check = tensors.CheckSlot(slot.data(), seed_);
    for (size_t i = 0; i < tensors.size(); ++i) {
      ASSERT_EQ(DeviceMismatches(tensors.ptr(i), tensors.bytes(i), seed_ + kNewSeedOffset + i), 0u)
          << "the overwrite kernel did not run on tensor " << i;
    }
    if (fence) {
      EXPECT_EQ(engine_->stats().fence_cpu_waits, 1u) << "Fence did not wait for IssueCopies";
    }
  }
};

TEST_F(FenceTest, FenceOrdersTheCopyBeforeTheNextKernel) {
  std::string slot_check;
  SnapshotThenOverwrite(/*fence=*/true, &slot_check);
  EXPECT_EQ(slot_check, "");
}

TEST_F(FenceTest, WithoutFenceTheOverwriteRacesTheCopy) {
  std::string slot_check;
  SnapshotThenOverwrite(/*fence=*/false, &slot_check);
  EXPECT_NE(slot_check, "") << "without a fence the overwrite kernel (HBM speed) should overtake "
                               "the device-to-host copy (PCIe speed); if it never does, "
                               "FenceOrdersTheCopyBeforeTheNextKernel proves nothing";
  std::cout << "without fence: " << slot_check << "\n";
}

TEST_F(GpuCopyEngineTest, ChunksATensorLargerThanTheChunkSize) {
  CopyEngineOptions options;
  options.chunk_bytes = size_t{1} << 20;
  std::unique_ptr<CopyEngine> engine = CopyEngine::Create(0, options);
  ASSERT_TRUE(engine->has_gpu());
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({(size_t{10} << 20) + 5}));
  ShmSlot slot(engine.get(), tensors.slot_bytes());
  ASSERT_OK(slot.Open());
  ASSERT_OK(tensors.Fill(seed_, compute_));

  absl::StatusOr<uint64_t> ticket = engine->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine->IssueCopies(*ticket, tensors.SnapshotOps(slot.data())));
  ASSERT_OK(engine->WaitCopies(*ticket));
  EXPECT_EQ(tensors.CheckSlot(slot.data(), seed_), "");
  EXPECT_EQ(engine->stats().device_copy_chunks, 11u);
}

TEST_F(GpuCopyEngineTest, PageableDestinationsWorkAndAreCounted) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({(2 << 20) + 3}));
  ASSERT_OK(tensors.Fill(seed_, compute_));
  std::vector<unsigned char> pageable(tensors.slot_bytes(), 0xa5);
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine_->IssueCopies(*ticket, tensors.SnapshotOps(pageable.data())));
  ASSERT_OK(engine_->WaitCopies(*ticket));
  EXPECT_EQ(tensors.CheckSlot(pageable.data(), seed_), "");
  EXPECT_EQ(engine_->stats().bytes_device_to_pageable_host, tensors.total_bytes());
}

// Restore: the slot is copied back into freshly initialised tensors. The initialisation is still
// queued on the legacy default stream when CopySync is called, as after a model's construction.
TEST_F(GpuCopyEngineTest, RestoresWithCopySync) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate(TensorSizes(TestBytes())));
  ShmSlot slot(engine_.get(), tensors.slot_bytes() + 4096);
  ASSERT_OK(slot.Open());
  const std::vector<CopyOp> snapshot = tensors.SnapshotOps(slot.data());
  for (size_t i = 0; i < snapshot.size(); ++i) {
    FillPatternHost(snapshot[i].dst, snapshot[i].bytes, seed_ + i);
  }
  DeviceTensors copy;  // device to device
  ASSERT_OK(copy.Allocate({tensors.bytes(tensors.size() - 1)}));
  std::vector<unsigned char> host_blob(777);  // host to host, like the RNG state
  unsigned char* slot_blob = slot.data() + tensors.slot_bytes() + 1;
  FillPatternHost(slot_blob, host_blob.size(), seed_ + 999);

  CUDA_ASSERT(Spin(kSpinNs, nullptr));
  ASSERT_OK(tensors.Fill(seed_ + kNewSeedOffset, nullptr));
  ASSERT_OK(engine_->CopySync(tensors.RestoreOps(slot.data())));
  ASSERT_OK(engine_->CopySync({{copy.ptr(0), tensors.ptr(tensors.size() - 1), copy.bytes(0)},
                               {host_blob.data(), slot_blob, host_blob.size()}}));

  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(DeviceMismatches(tensors.ptr(i), tensors.bytes(i), seed_ + i), 0u) << "tensor " << i;
  }
  EXPECT_EQ(DeviceMismatches(copy.ptr(0), copy.bytes(0), seed_ + tensors.size() - 1), 0u);
  EXPECT_EQ(FirstPatternMismatchHost(host_blob.data(), host_blob.size(), seed_ + 999),
            host_blob.size());
  EXPECT_EQ(engine_->stats().bytes_copied_sync,
            tensors.total_bytes() + copy.bytes(0) + host_blob.size());
}

// A restore verified on the GPU: each block of each device destination is checksummed where it
// landed, beside the copies; a block whose recorded CRC32C differs is reported, naming it, once
// every copy is done. Host destinations are checked before they are copied.
TEST_F(GpuCopyEngineTest, CopySyncVerifiedChecksEveryBlockWhereItLanded) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate(TensorSizes(TestBytes())));
  ShmSlot slot(engine_.get(), tensors.slot_bytes() + 4096);
  ASSERT_OK(slot.Open());
  std::vector<CopyOp> ops = tensors.RestoreOps(slot.data());
  std::vector<unsigned char> host_blob(5000);
  unsigned char* slot_blob = slot.data() + tensors.slot_bytes() + 1;
  ops.push_back({host_blob.data(), slot_blob, host_blob.size()});
  const size_t block = (size_t{1} << 20) + 4096;
  std::vector<std::vector<uint32_t>> expected;
  for (size_t i = 0; i < ops.size(); ++i) {
    FillPatternHost(const_cast<void*>(ops[i].src), ops[i].bytes, seed_ + i);
    expected.emplace_back();
    for (size_t at = 0; at < ops[i].bytes; at += block) {
      expected[i].push_back(
          Crc32c(static_cast<const char*>(ops[i].src) + at, std::min(block, ops[i].bytes - at)));
    }
  }
  ASSERT_OK(tensors.Fill(seed_ + kNewSeedOffset, nullptr));
  ASSERT_OK(engine_->CopySyncVerified(ops, nullptr, expected, block));
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(DeviceMismatches(tensors.ptr(i), tensors.bytes(i), seed_ + i), 0u) << "tensor " << i;
  }
  EXPECT_EQ(FirstPatternMismatchHost(host_blob.data(), host_blob.size(), seed_ + ops.size() - 1),
            host_blob.size());
  EXPECT_EQ(engine_->stats().bytes_verified_on_device, tensors.total_bytes());

  // A recorded CRC that differs from what landed, in the second block of the last tensor.
  const size_t bad = tensors.size() - 1;
  ASSERT_GE(expected[bad].size(), 2u);
  const uint32_t landed = expected[bad][1];
  expected[bad][1] ^= 0x00400000u;
  const absl::Status status = engine_->CopySyncVerified(ops, nullptr, expected, block);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()),
              ::testing::HasSubstr(absl::StrCat("bytes [", block, ", +", block, ") of copy op ",
                                                bad, " have CRC32C 0x", absl::Hex(landed),
                                                " where they landed on the GPU")));
}

// Many snapshots as the agent takes them: the trainer thread changes the state, marks and fences
// on the legacy default stream; an agent thread issues and waits into two alternating slots and
// checks each one. Exercises the reuse of the tickets' events.
TEST_F(GpuCopyEngineTest, SnapshotLoopOnTheDefaultStream) {
  constexpr int kSteps = 12;
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate(TensorSizes(std::min<uint64_t>(TestBytes(), uint64_t{64} << 20))));
  ShmSlot slot_a(engine_.get(), tensors.slot_bytes());
  ShmSlot slot_b(engine_.get(), tensors.slot_bytes());
  ASSERT_OK(slot_a.Open());
  ASSERT_OK(slot_b.Open());
  ShmSlot* slots[2] = {&slot_a, &slot_b};

  std::vector<uint64_t> tickets(kSteps);
  std::vector<absl::Notification> marked(kSteps);
  std::vector<std::string> failures;
  std::thread agent([&] {
    for (int step = 0; step < kSteps; ++step) {
      marked[step].WaitForNotification();
      unsigned char* slot = slots[step % 2]->data();
      absl::Status status = engine_->IssueCopies(tickets[step], tensors.SnapshotOps(slot));
      if (status.ok()) status = engine_->WaitCopies(tickets[step]);
      if (!status.ok()) failures.push_back(status.ToString());
      const std::string check = tensors.CheckSlot(slot, seed_ + step * kNewSeedOffset);
      if (!check.empty()) failures.push_back(absl::StrCat("step ", step, ": ", check));
    }
  });
  for (int step = 0; step < kSteps; ++step) {
    const absl::Status filled = tensors.Fill(seed_ + step * kNewSeedOffset, nullptr);
    EXPECT_TRUE(filled.ok()) << filled;
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
    EXPECT_TRUE(ticket.ok()) << ticket.status();
    tickets[step] = ticket.value_or(0);
    marked[step].Notify();
    const absl::Status fenced = engine_->Fence(nullptr);
    EXPECT_TRUE(fenced.ok()) << fenced;
  }
  agent.join();
  EXPECT_THAT(failures, ::testing::IsEmpty());
  EXPECT_EQ(engine_->stats().tickets, static_cast<uint64_t>(kSteps));
}

// MarkSnapshotPoint runs on the trainer thread at every snapshot and Fence before every optimizer
// step: both must cost microseconds. Prints the latencies; fails only far outside that range.
TEST_F(GpuCopyEngineTest, MarkAndFenceTakeMicroseconds) {
  constexpr int kRounds = 2000;
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({4096}));
  ShmSlot slot(engine_.get(), tensors.slot_bytes());
  ASSERT_OK(slot.Open());
  std::vector<double> mark_us, fence_us;
  for (int i = 0; i < kRounds; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
    const auto t1 = std::chrono::steady_clock::now();
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    ASSERT_OK(engine_->IssueCopies(*ticket, tensors.SnapshotOps(slot.data())));
    const auto t2 = std::chrono::steady_clock::now();
    ASSERT_OK(engine_->Fence(compute_));
    const auto t3 = std::chrono::steady_clock::now();
    mark_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    fence_us.push_back(std::chrono::duration<double, std::micro>(t3 - t2).count());
    if (i % 64 == 63) CUDA_ASSERT(cudaStreamSynchronize(compute_));
  }
  CUDA_ASSERT(cudaStreamSynchronize(compute_));
  auto percentile = [](std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    return v[static_cast<size_t>(p * (v.size() - 1))];
  };
  std::cout << "MarkSnapshotPoint p50 " << percentile(mark_us, 0.5) << " us, p99 "
            << percentile(mark_us, 0.99) << " us; Fence p50 " << percentile(fence_us, 0.5)
            << " us, p99 " << percentile(fence_us, 0.99) << " us\n";
  EXPECT_LT(percentile(mark_us, 0.5), 100.0);
  EXPECT_LT(percentile(fence_us, 0.5), 100.0);
}

// Staging: snapshots whose sources the "optimizer" overwrites right after the fence.
class StagingTest : public GpuCopyEngineTest {
 protected:
  // A new engine with `staging`, new tensors and a new slot.
  void Prepare(const StagingOptions& staging, bool checksum = false, bool on_device = true) {
    slot_.reset();  // unregisters from the engine it was made with
    CopyEngineOptions options;
    options.staging = staging;
    options.checksum_on_device = on_device;
    checksum_ = checksum;
    if (checksum) {
      // Chunks and blocks whose boundaries do not line up, and staged parts starting mid-block.
      options.chunk_bytes = (3 << 20) + 4096;
      options.checksum_block_bytes = 1 << 20;
      options.checksum_threads = 3;
    } else {
      // Small chunks, so that the staged bytes go to the host in several groups (each waiting
      // for its own staging) and a group ends inside a tensor.
      options.chunk_bytes = (5 << 20) + 8192;
    }
    engine_ = CopyEngine::Create(0, options);
    ASSERT_TRUE(engine_->has_gpu());
    tensors_ = std::make_unique<DeviceTensors>();
    ASSERT_OK(tensors_->Allocate(TensorSizes(TestBytes())));
    slot_ = std::make_unique<ShmSlot>(engine_.get(), tensors_->slot_bytes());
    ASSERT_OK(slot_->Open());
  }

  void TearDown() override {
    slot_.reset();
    GpuCopyEngineTest::TearDown();
  }

  static uint64_t TotalBytes() {
    uint64_t sum = 0;
    for (size_t bytes : TensorSizes(TestBytes())) sum += bytes;
    return sum;
  }

  // Fills the tensors with `seed`, marks the snapshot point, keeps the compute stream busy for
  // `window_ns` (forward and backward), fences, and overwrites every tensor at once (the
  // optimizer step), while an agent thread issues and waits for the copies. The slot must hold
  // the state of the snapshot point.
  void SnapshotAndOverwrite(uint64_t seed, uint64_t window_ns) {
    ASSERT_OK(tensors_->Fill(seed, compute_));
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    absl::Status issued, waited;
    const std::vector<CopyOp> ops = tensors_->SnapshotOps(slot_->data());
    std::vector<OpChecksum> sums;
    std::thread agent([&] {
      if (checksum_) {
        issued = engine_->IssueChecksummedCopies(*ticket, ops);
        absl::StatusOr<std::vector<OpChecksum>> taken = engine_->WaitChecksums(*ticket);
        waited = taken.status();
        if (taken.ok()) sums = std::move(*taken);
      } else {
        issued = engine_->IssueCopies(*ticket, ops);
        waited = engine_->WaitCopies(*ticket);
      }
    });
    if (window_ns > 0) CUDA_ASSERT(Spin(window_ns, compute_));
    const absl::Status fenced = engine_->Fence(compute_);
    const absl::Status overwritten = tensors_->Fill(seed + kNewSeedOffset, compute_);
    agent.join();
    ASSERT_OK(fenced);
    ASSERT_OK(overwritten);
    ASSERT_OK(issued);
    ASSERT_OK(waited);
    CUDA_ASSERT(cudaStreamSynchronize(compute_));
    ASSERT_EQ(tensors_->CheckSlot(slot_->data(), seed), "") << "seed " << seed;
    if (!checksum_) return;
    // Each op's checksum, whole and per 1 MiB block, is of the bytes that landed.
    ASSERT_EQ(sums.size(), ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      const auto* dst = static_cast<const unsigned char*>(ops[i].dst);
      ASSERT_EQ(sums[i].crc, Crc32c(dst, ops[i].bytes)) << "op " << i << " seed " << seed;
      const size_t block = 1 << 20;
      ASSERT_EQ(sums[i].blocks.size(), (ops[i].bytes + block - 1) / block) << "op " << i;
      for (size_t b = 0; b < sums[i].blocks.size(); ++b) {
        ASSERT_EQ(sums[i].blocks[b],
                  Crc32c(dst + b * block, std::min(block, ops[i].bytes - b * block)))
            << "op " << i << " block " << b << " seed " << seed;
      }
    }
  }

  bool checksum_ = false;
  std::unique_ptr<DeviceTensors> tensors_;
  std::unique_ptr<ShmSlot> slot_;
};

TEST_F(StagingTest, EveryModeHoldsTheSnapshotPointWhenTheOptimizerOverwritesAtOnce) {
  struct Case {
    const char* name;
    StagingMode mode;
    int budget_divisor;  // budget = total / divisor; 0: the default fraction of free memory
  };
  for (const Case& c : {Case{"off", StagingMode::kOff, 0}, Case{"partial", StagingMode::kFull, 3},
                        Case{"full", StagingMode::kFull, 0}}) {
    SCOPED_TRACE(c.name);
    const uint64_t total = TotalBytes();
    const uint64_t budget = c.budget_divisor > 0 ? total / c.budget_divisor : 0;
    ASSERT_NO_FATAL_FAILURE(Prepare({c.mode, budget, 0.5}));
    for (uint64_t i = 0; i < 3; ++i) {
      SnapshotAndOverwrite(seed_ + 100 * i, 0);
      if (HasFatalFailure()) return;
    }
    const CopyEngineStats stats = engine_->stats();
    std::cout << c.name << ": staged " << stats.bytes_staged << " of "
              << stats.bytes_device_to_host << " bytes, buffer " << stats.staging_buffer_bytes
              << "\n";
    EXPECT_EQ(stats.bytes_device_to_host, 3 * total);
    switch (c.mode) {
      case StagingMode::kOff:
        EXPECT_EQ(stats.bytes_staged, 0u);
        EXPECT_EQ(stats.staging_buffer_bytes, 0u);
        break;
      case StagingMode::kFull:
        if (budget > 0) {
          EXPECT_EQ(stats.plan_staged_bytes, budget);
          EXPECT_EQ(stats.bytes_staged, 3 * budget);
          EXPECT_EQ(stats.staging_budget_short, 3u);
        } else {
          EXPECT_EQ(stats.plan_staged_bytes, total);
          EXPECT_EQ(stats.bytes_staged, 3 * total);
        }
        break;
      default:
        break;
    }
  }
}

// The checksums of IssueChecksummedCopies are of what landed, in every staging mode, whether
// computed on the GPU (the kernel over the sources and the staging buffer, read before the
// optimizer overwrites them) or on host threads (each chunk's pieces behind its event).
TEST_F(StagingTest, ChecksumsOfWhatLandedInEveryMode) {
  for (const bool on_device : {true, false}) {
    for (const auto& [name, mode, divisor] :
         {std::tuple<const char*, StagingMode, int>{"off", StagingMode::kOff, 0},
          {"partial", StagingMode::kFull, 3}, {"full", StagingMode::kFull, 0}}) {
      SCOPED_TRACE(absl::StrCat(name, on_device ? ", on the GPU" : ", on host threads"));
      const uint64_t budget = divisor > 0 ? TotalBytes() / divisor : 0;
      ASSERT_NO_FATAL_FAILURE(Prepare({mode, budget, 0.5}, /*checksum=*/true, on_device));
      for (uint64_t i = 0; i < 2; ++i) {
        SnapshotAndOverwrite(seed_ + 300 + i, 0);
        if (HasFatalFailure()) return;
      }
      EXPECT_EQ(engine_->stats().bytes_checksummed, 2 * TotalBytes());
      EXPECT_EQ(engine_->stats().bytes_checksummed_on_device, on_device ? 2 * TotalBytes() : 0);
    }
  }
  // A device destination cannot be checksummed.
  ASSERT_NO_FATAL_FAILURE(Prepare({StagingMode::kOff, 0, 0.5}, /*checksum=*/true));
  DeviceTensors other;
  ASSERT_OK(other.Allocate({4096}));
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  const absl::Status issued =
      engine_->IssueChecksummedCopies(*ticket, {{other.ptr(0), tensors_->ptr(0), 4096}});
  EXPECT_EQ(issued.code(), absl::StatusCode::kInvalidArgument) << issued;
}

// The GPU checksum of sources at every alignment and of lengths around its stretch (1 KiB) and
// tile (256 KiB) sizes, many snapshots in flight at once: each equals ISA-L's CRC32C of the
// bytes that landed.
TEST_F(GpuCopyEngineTest, DeviceChecksumsOfUnalignedSourcesMatchTheHost) {
  CopyEngineOptions options;
  options.checksum_block_bytes = (1 << 20) + 4096;
  std::unique_ptr<CopyEngine> engine = CopyEngine::Create(0, options);
  ASSERT_TRUE(engine->has_gpu());
  const size_t total = size_t{24} << 20;
  DeviceTensors source;
  ASSERT_OK(source.Allocate({total}));
  ASSERT_OK(source.Fill(seed_, compute_));
  ShmSlot slot(engine.get(), total);
  ASSERT_OK(slot.Open());
  std::mt19937_64 rng(seed_);
  const std::vector<size_t> sizes = {1, 15, 16, 17, 1023, 1024, 1025, 262143, 262144, 262145,
                                     (size_t{1} << 20) + 4095, (size_t{1} << 20) + 4096,
                                     (size_t{3} << 20) + 12345};
  std::vector<CopyOp> ops;
  size_t at = 0;
  for (size_t bytes : sizes) {
    at += 1 + rng() % 31;  // every alignment
    ops.push_back({slot.data() + at, static_cast<const char*>(source.ptr(0)) + at, bytes});
    at += bytes;
  }
  ASSERT_LT(at, total);
  std::vector<uint64_t> tickets;
  for (int round = 0; round < 3; ++round) {
    absl::StatusOr<uint64_t> ticket = engine->MarkSnapshotPoint(compute_);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    ASSERT_OK(engine->IssueChecksummedCopies(*ticket, ops));
    tickets.push_back(*ticket);
  }
  for (uint64_t ticket : tickets) {
    absl::StatusOr<std::vector<OpChecksum>> sums = engine->WaitChecksums(ticket);
    ASSERT_TRUE(sums.ok()) << sums.status();
    ASSERT_EQ(sums->size(), ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      const auto* dst = static_cast<const unsigned char*>(ops[i].dst);
      ASSERT_EQ((*sums)[i].crc, Crc32c(dst, ops[i].bytes))
          << "op " << i << " of " << ops[i].bytes << " bytes, seed " << seed_;
      const size_t block = options.checksum_block_bytes;
      for (size_t b = 0; b < (*sums)[i].blocks.size(); ++b) {
        ASSERT_EQ((*sums)[i].blocks[b],
                  Crc32c(dst + b * block, std::min(block, ops[i].bytes - b * block)))
            << "op " << i << " block " << b << " seed " << seed_;
      }
    }
  }
  EXPECT_GT(engine->stats().bytes_checksummed_on_device, 0u);
}

// A restore that checks each chunk before copying it copies what passed and stops at the first
// that does not.
TEST_F(GpuCopyEngineTest, CopySyncCheckedStopsAtTheFirstFailedCheck) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({(5 << 20) + 77}));
  ShmSlot slot(engine_.get(), tensors.slot_bytes());
  ASSERT_OK(slot.Open());
  const std::vector<CopyOp> snapshot = tensors.SnapshotOps(slot.data());
  FillPatternHost(snapshot[0].dst, snapshot[0].bytes, seed_);
  CopyEngineOptions options;
  options.chunk_bytes = 1 << 20;
  std::unique_ptr<CopyEngine> engine = CopyEngine::Create(0, options);
  ASSERT_OK(tensors.Fill(seed_ + kNewSeedOffset, nullptr));
  std::vector<uint64_t> asked;
  const absl::Status status = engine->CopySyncChecked(
      tensors.RestoreOps(slot.data()), [&](size_t, uint64_t offset, uint64_t) -> absl::Status {
        asked.push_back(offset);
        return offset >= (3 << 20) ? absl::DataLossError("chunk 3") : absl::OkStatus();
      });
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_EQ(asked, (std::vector<uint64_t>{0, 1 << 20, 2 << 20, 3 << 20}));
  // The first three chunks hold the slot's pattern; the rest still the tensor's own.
  EXPECT_EQ(DeviceMismatches(tensors.ptr(0), 3 << 20, seed_), 0u);
  ASSERT_OK(engine->CopySyncChecked(tensors.RestoreOps(slot.data()),
                                    [](size_t, uint64_t, uint64_t) { return absl::OkStatus(); }));
  EXPECT_EQ(DeviceMismatches(tensors.ptr(0), tensors.bytes(0), seed_), 0u);
}

TEST_F(StagingTest, AdaptivePlanFollowsTheMeasuredWindow) {
  const uint64_t total = TotalBytes();
  ASSERT_NO_FATAL_FAILURE(Prepare({StagingMode::kAdaptive, 2 * total, 0.5}));
  // Nothing measured yet: everything is staged. With no work between snapshot and fence, the
  // window is only the time the compute stream idles while the fence waits on the CPU for the
  // copies to be issued: nearly everything stays staged.
  for (uint64_t i = 0; i < 3; ++i) ASSERT_NO_FATAL_FAILURE(SnapshotAndOverwrite(seed_ + i, 0));
  CopyEngineStats stats = engine_->stats();
  ASSERT_GT(stats.d2h_bytes_per_s, 0) << "the device-to-host rate was not measured";
  EXPECT_GT(stats.plan_staged_bytes, total / 2);
  std::cout << "window " << stats.window_ns / 1e6 << " ms: staged " << stats.plan_staged_bytes
            << " of " << total << " bytes\n";
  const double copy_s = total / stats.d2h_bytes_per_s;
  std::cout << "measured " << stats.d2h_bytes_per_s / 1e9 << " GB/s to host, "
            << stats.d2d_bytes_per_s / 1e9 << " GB/s staging; copy " << copy_s * 1e3 << " ms\n";

  // A window of half the copy: part of it is staged, once the near-zero windows have left the
  // last 8 samples (the estimate is their shortest).
  for (uint64_t i = 0; i < 12; ++i) {
    ASSERT_NO_FATAL_FAILURE(
        SnapshotAndOverwrite(seed_ + 10 + i, static_cast<uint64_t>(copy_s * 0.5e9)));
  }
  stats = engine_->stats();
  std::cout << "window " << stats.window_ns / 1e6 << " ms: staged " << stats.plan_staged_bytes
            << " of " << total << " bytes, expected stall " << stats.plan_expected_stall_ns
            << " ns\n";
  EXPECT_GT(stats.plan_staged_bytes, total / 10);
  EXPECT_LT(stats.plan_staged_bytes, total * 9 / 10);

  // A window four times the copy: nothing is staged once the shorter windows have left the last
  // 8 samples (a snapshot's window is taken at the next snapshot point: 8 more, and a margin).
  for (uint64_t i = 0; i < 12; ++i) {
    ASSERT_NO_FATAL_FAILURE(
        SnapshotAndOverwrite(seed_ + 20 + i, static_cast<uint64_t>(copy_s * 4e9)));
  }
  stats = engine_->stats();
  std::cout << "window " << stats.window_ns / 1e6 << " ms: staged " << stats.plan_staged_bytes
            << " bytes\n";
  EXPECT_EQ(stats.plan_staged_bytes, 0u);
  EXPECT_EQ(stats.plan_expected_stall_ns, 0);
  EXPECT_GE(stats.windows_measured, 10u);
}

TEST_F(StagingTest, ABufferTheDeviceCannotAllocateFallsBackToTheFence) {
  const uint64_t total = TotalBytes();
  ASSERT_NO_FATAL_FAILURE(Prepare({StagingMode::kFull, total, 0.5}));
  // Leave the device less free memory than the staging buffer needs.
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_ASSERT(cudaMemGetInfo(&free_bytes, &total_bytes));
  void* hog = nullptr;
  const size_t hog_bytes = free_bytes - std::min<size_t>(free_bytes, total / 4);
  CUDA_ASSERT(cudaMalloc(&hog, hog_bytes));
  for (uint64_t i = 0; i < 3 && !HasFatalFailure(); ++i) SnapshotAndOverwrite(seed_ + i, 0);
  cudaFree(hog);
  ASSERT_FALSE(HasFatalFailure());
  const CopyEngineStats stats = engine_->stats();
  std::cout << "allocation failures " << stats.staging_alloc_failures << ", staged "
            << stats.bytes_staged << " bytes\n";
  EXPECT_GE(stats.staging_alloc_failures, 1u);
  EXPECT_LT(stats.bytes_staged, 3 * total);
}

// A copy the driver refuses: the engine reports it, drains, and goes on working. Its own suite,
// registered last, so that it runs after the others.
class GpuCopyEngineErrorTest : public GpuCopyEngineTest {};

TEST_F(GpuCopyEngineErrorTest, ACopyPastTheEndOfAnAllocationIsAnError) {
  DeviceTensors tensors;
  ASSERT_OK(tensors.Allocate({1 << 20}));
  ShmSlot slot(engine_.get(), 64 << 20);
  ASSERT_OK(slot.Open());
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  const absl::Status status =
      engine_->IssueCopies(*ticket, {{slot.data(), tensors.ptr(0), slot.bytes()}});
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("cudaMemcpyAsync(D2H, "));
  EXPECT_THAT(std::string(status.message()), HasSubstr("cudaError"));
  EXPECT_EQ(engine_->WaitCopies(*ticket), status);
  std::cout << "refused copy: " << status << "\n";

  ASSERT_OK(tensors.Fill(seed_, compute_));
  ticket = engine_->MarkSnapshotPoint(compute_);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine_->IssueCopies(*ticket, tensors.SnapshotOps(slot.data())));
  ASSERT_OK(engine_->WaitCopies(*ticket));
  EXPECT_EQ(tensors.CheckSlot(slot.data(), seed_), "");
}

}  // namespace
}  // namespace tessera::cuda
