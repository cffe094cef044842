// The CUDA snapshot path on a real GPU, one run, one table: Tessera's rates next to the limits
// measured in the same run.
//   - raw pinned device-to-host (cudaMemcpyAsync into cudaHostAlloc memory), the copy engine's
//     snapshot copy into registered /dev/shm (copy only, MarkSnapshotPoint..WaitCopies), and
//     Client::Snapshot..Wait through a real tesserad (copies checksummed block by block as they
//     land, manifest, and the daemon's seal, which takes the client's CRC32C);
//   - the wall time Snapshot() blocks the calling thread;
//   - a loop of bf16 GEMMs on a compute stream standing in for training, with an optimizer step
//     that rewrites the whole state, snapshotting every N iterations: iteration time and overhead;
//   - Client::Restore (host to device) next to raw pinned host-to-device.
//
// gpu_snapshot_bench [--bytes=10G] [--tensors=256] [--repeats=3] [--iteration-ms=80]
//                    [--iterations=30] [--every=1,2,10] [--gemm-n=8192] [--crc-threads=8]
//                    [--checksum-threads=4] [--checksum-on=gpu|host]
//                    [--tesserad=PATH]
// Sizes take a K, M or G suffix (binary) or none (bytes). --tesserad defaults to $TESSERAD, then
// daemon/tesserad in this binary's runfiles. cuBLAS is loaded at run time (libcublas.so.13, .12);
// without it the GEMMs are a plain tiled kernel, and the table says so.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/client.h"
#include "bench/bench_daemon.h"
#include "bench/gpu_kernels/gpu_bench_kernels.h"
#include "common/logging.h"
#include "common/status.h"
#include "cuda/copy_engine.h"

namespace tessera {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kAlign = 256;  // packing of tensors in the raw pinned buffer, as in a slot

struct Options {
  uint64_t bytes = 10'000'000'000ull;
  int tensors = 256;
  int repeats = 3;
  double iteration_ms = 80;
  int iterations = 30;
  std::vector<int> every = {1, 2, 10};
  int gemm_n = 8192;
  int crc_threads = 8;
  int checksum_threads = 4;  // Client::Options::checksum_threads
  bool checksum_on_device = true;  // Client::Options::checksum_on_device
  std::string tesserad;
};

double Seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

absl::Status Cuda(cudaError_t error, absl::string_view call) {
  return cuda::CudaStatus(error, call);
}

absl::Status ErrnoStatus(int error, absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(error)));
}

// The training state: `tensors` device allocations of odd sizes (within 0.5x..1.5x of the mean)
// summing to about `bytes`, filled with random bytes.
struct DeviceState {
  std::vector<void*> ptrs;
  std::vector<uint64_t> sizes;
  std::vector<uint64_t> offsets;  // in a packed host buffer
  uint64_t total = 0, packed = 0;

  ~DeviceState() {
    for (void* p : ptrs) cudaFree(p);
  }

  absl::Status Allocate(uint64_t bytes, int tensors, cudaStream_t stream) {
    const uint64_t mean = bytes / tensors;
    uint64_t x = 0x5EED;
    for (int i = 0; i < tensors; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      uint64_t size = mean / 2 + (x >> 11) % (mean + 1);
      if (i == tensors - 1) size = bytes > total ? bytes - total : 1;
      size = std::max<uint64_t>(size | 1, 1);  // odd sizes
      void* p = nullptr;
      TESSERA_RETURN_IF_ERROR(Cuda(cudaMalloc(&p, size), absl::StrCat("cudaMalloc(", size, ")")));
      TESSERA_RETURN_IF_ERROR(Cuda(bench::FillRandom(p, size, 1000 + i, stream), "FillRandom"));
      ptrs.push_back(p);
      sizes.push_back(size);
      offsets.push_back(packed);
      packed += (size + kAlign - 1) / kAlign * kAlign;
      total += size;
    }
    return Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

  absl::Status Optimizer(uint64_t mask, cudaStream_t stream) {
    for (size_t i = 0; i < ptrs.size(); ++i) {
      TESSERA_RETURN_IF_ERROR(Cuda(bench::XorWords(ptrs[i], sizes[i], mask, stream), "XorWords"));
    }
    return absl::OkStatus();
  }
};

// Seconds for one pass of per-tensor copies between the device state and `host` (packed), timed
// with events on `stream`.
absl::StatusOr<double> RawCopy(const DeviceState& s, uint8_t* host, bool to_host,
                               cudaStream_t stream) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, stream);
  for (size_t i = 0; i < s.ptrs.size(); ++i) {
    const cudaError_t e =
        to_host ? cudaMemcpyAsync(host + s.offsets[i], s.ptrs[i], s.sizes[i],
                                  cudaMemcpyDeviceToHost, stream)
                : cudaMemcpyAsync(s.ptrs[i], host + s.offsets[i], s.sizes[i],
                                  cudaMemcpyHostToDevice, stream);
    TESSERA_RETURN_IF_ERROR(Cuda(e, "cudaMemcpyAsync"));
  }
  cudaEventRecord(stop, stream);
  TESSERA_RETURN_IF_ERROR(Cuda(cudaEventSynchronize(stop), "cudaEventSynchronize"));
  float ms = 0;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / 1e3;
}

// cuBLAS, loaded at run time so that the benchmark runs against whichever cuBLAS the GPU
// machine has (the build machine's is 13; a PyTorch wheel may bring 12).
class Gemm {
 public:
  ~Gemm() {
    if (handle_ != nullptr) destroy_(handle_);
    for (void* p : {a_, b_, c_}) cudaFree(p);
  }

  absl::Status Init(int n, cudaStream_t stream) {
    n_ = n;
    stream_ = stream;
    const size_t bytes = size_t{2} * n * n;
    for (void** p : {&a_, &b_, &c_}) {
      TESSERA_RETURN_IF_ERROR(Cuda(cudaMalloc(p, bytes), "cudaMalloc(GEMM operand)"));
    }
    // Small values: 0x3c00..0x3cff are bf16 numbers near 0.008.
    TESSERA_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(a_, 0x3c, bytes, stream), "cudaMemsetAsync"));
    TESSERA_RETURN_IF_ERROR(Cuda(cudaMemsetAsync(b_, 0x3c, bytes, stream), "cudaMemsetAsync"));
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib == nullptr) continue;
      create_ = reinterpret_cast<decltype(create_)>(dlsym(lib, "cublasCreate_v2"));
      destroy_ = reinterpret_cast<decltype(destroy_)>(dlsym(lib, "cublasDestroy_v2"));
      set_stream_ = reinterpret_cast<decltype(set_stream_)>(dlsym(lib, "cublasSetStream_v2"));
      gemm_ex_ = reinterpret_cast<decltype(gemm_ex_)>(dlsym(lib, "cublasGemmEx"));
      if (create_ && destroy_ && set_stream_ && gemm_ex_ &&
          create_(&handle_) == CUBLAS_STATUS_SUCCESS &&
          set_stream_(handle_, stream) == CUBLAS_STATUS_SUCCESS) {
        what_ = absl::StrCat("cublasGemmEx bf16 (", name, ")");
        return absl::OkStatus();
      }
      handle_ = nullptr;
    }
    what_ = "a plain tiled bf16 kernel (no cuBLAS could be loaded)";
    return absl::OkStatus();
  }

  absl::Status Run() {
    if (handle_ != nullptr) {
      const float alpha = 1.f, beta = 0.f;
      const cublasStatus_t s =
          gemm_ex_(handle_, CUBLAS_OP_N, CUBLAS_OP_N, n_, n_, n_, &alpha, a_, CUDA_R_16BF, n_, b_,
                   CUDA_R_16BF, n_, &beta, c_, CUDA_R_16BF, n_, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
      if (s != CUBLAS_STATUS_SUCCESS) return absl::InternalError(absl::StrCat("cublasGemmEx: ", s));
      return absl::OkStatus();
    }
    return Cuda(bench::FallbackGemmBf16(static_cast<uint16_t*>(a_), static_cast<uint16_t*>(b_),
                                        static_cast<uint16_t*>(c_), n_, stream_),
                "FallbackGemmBf16");
  }

  double flops() const { return 2.0 * n_ * n_ * n_; }
  const std::string& what() const { return what_; }

 private:
  int n_ = 0;
  cudaStream_t stream_ = nullptr;
  void *a_ = nullptr, *b_ = nullptr, *c_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  decltype(&cublasCreate_v2) create_ = nullptr;
  decltype(&cublasDestroy_v2) destroy_ = nullptr;
  decltype(&cublasSetStream_v2) set_stream_ = nullptr;
  // cublasGemmEx is overloaded in C++ (a legacy computeType of cudaDataType): name the C one.
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                    int, int, const void*, const void*, cudaDataType, int,
                                    const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  GemmEx gemm_ex_ = nullptr;
  std::string what_;
};

struct Row {
  std::string what, value, limit, ratio, goal;
};

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

void PrintTable(const std::string& title, const std::vector<Row>& rows) {
  size_t w[5] = {11, 7, 19, 5, 4};
  for (const Row& r : rows) {
    w[0] = std::max(w[0], r.what.size());
    w[1] = std::max(w[1], r.value.size());
    w[2] = std::max(w[2], r.limit.size());
    w[3] = std::max(w[3], r.ratio.size());
    w[4] = std::max(w[4], r.goal.size());
  }
  auto line = [&](const std::string& a, const std::string& b, const std::string& c,
                  const std::string& d, const std::string& e) {
    std::printf("| %-*s | %*s | %-*s | %*s | %-*s |\n", int(w[0]), a.c_str(), int(w[1]), b.c_str(),
                int(w[2]), c.c_str(), int(w[3]), d.c_str(), int(w[4]), e.c_str());
  };
  std::printf("\n%s\n", title.c_str());
  line("measurement", "Tessera", "limit measured here", "ratio", "goal");
  line(std::string(w[0], '-'), std::string(w[1], '-'), std::string(w[2], '-'),
       std::string(w[3], '-'), std::string(w[4], '-'));
  for (const Row& r : rows) line(r.what, r.value, r.limit, r.ratio, r.goal);
  std::fflush(stdout);
}

void Progress(const std::string& what) {
  std::fprintf(stderr, "[gpu_snapshot_bench] %s\n", what.c_str());
}

absl::Status Run(const Options& o) {
  TESSERA_RETURN_IF_ERROR(Cuda(cudaSetDevice(0), "cudaSetDevice(0)"));
  cudaDeviceProp prop{};
  TESSERA_RETURN_IF_ERROR(Cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties"));
  cudaStream_t stream = nullptr;
  TESSERA_RETURN_IF_ERROR(
      Cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  std::vector<Row> rows;

  DeviceState state;
  Progress(absl::StrCat("allocating ", o.tensors, " tensors, ", o.bytes, " bytes"));
  TESSERA_RETURN_IF_ERROR(state.Allocate(o.bytes, o.tensors, stream));
  const double gb = state.total / 1e9;

  // 1. Raw pinned rates.
  double raw_d2h = 0, raw_h2d = 0;
  {
    Progress("raw pinned D2H / H2D");
    uint8_t* pinned = nullptr;
    const auto t0 = Clock::now();
    TESSERA_RETURN_IF_ERROR(Cuda(cudaHostAlloc(reinterpret_cast<void**>(&pinned), state.packed,
                                               cudaHostAllocDefault),
                                 "cudaHostAlloc"));
    Progress(absl::StrCat("cudaHostAlloc of ", state.packed, " bytes: ",
                          Seconds(t0, Clock::now()), " s"));
    std::vector<double> d2h, h2d;
    for (int r = 0; r < o.repeats + 1; ++r) {  // the first pass warms up
      TESSERA_ASSIGN_OR_RETURN(double s, RawCopy(state, pinned, true, stream));
      if (r > 0) d2h.push_back(gb / s);
    }
    for (int r = 0; r < o.repeats + 1; ++r) {
      TESSERA_ASSIGN_OR_RETURN(double s, RawCopy(state, pinned, false, stream));
      if (r > 0) h2d.push_back(gb / s);
    }
    cudaFreeHost(pinned);
    raw_d2h = Median(d2h);
    raw_h2d = Median(h2d);
  }

  // 2. The copy engine alone: device to registered /dev/shm, MarkSnapshotPoint..WaitCopies.
  double engine_rate = 0, engine_checksummed_rate = 0;
  {
    Progress("copy engine into registered /dev/shm");
    auto engine = cuda::CopyEngine::Create(0);
    if (!engine->has_gpu()) return absl::FailedPreconditionError(engine->Describe());
    const std::string path = absl::StrCat("/dev/shm/tessera-gpu-bench-slot-", getpid());
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return ErrnoStatus(errno, "open " + path);
    unlink(path.c_str());
    const int allocated = posix_fallocate(fd, 0, state.packed);
    if (allocated != 0) {
      close(fd);
      return ErrnoStatus(allocated,
                         absl::StrCat("posix_fallocate(", state.packed, ") in /dev/shm"));
    }
    void* slot =
        mmap(nullptr, state.packed, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (slot == MAP_FAILED) return ErrnoStatus(errno, "mmap");
    TESSERA_RETURN_IF_ERROR(engine->RegisterHost(slot, state.packed));
    std::vector<cuda::CopyOp> ops;
    for (size_t i = 0; i < state.ptrs.size(); ++i) {
      ops.push_back(
          {static_cast<uint8_t*>(slot) + state.offsets[i], state.ptrs[i], state.sizes[i]});
    }
    std::vector<double> rates;
    for (int r = 0; r < o.repeats + 1; ++r) {
      TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
      const auto t0 = Clock::now();
      TESSERA_ASSIGN_OR_RETURN(uint64_t ticket, engine->MarkSnapshotPoint(stream));
      TESSERA_RETURN_IF_ERROR(engine->IssueCopies(ticket, ops));
      TESSERA_RETURN_IF_ERROR(engine->WaitCopies(ticket));
      if (r > 0) rates.push_back(gb / Seconds(t0, Clock::now()));
    }
    engine_rate = Median(rates);
    // The same copies checksummed (on the GPU unless --checksum-on=host): what the seal waits for
    // before the daemon is involved.
    std::vector<double> checksummed;
    for (int r = 0; r < o.repeats + 1; ++r) {
      TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
      const auto t0 = Clock::now();
      TESSERA_ASSIGN_OR_RETURN(uint64_t ticket, engine->MarkSnapshotPoint(stream));
      TESSERA_RETURN_IF_ERROR(engine->IssueChecksummedCopies(ticket, ops));
      TESSERA_ASSIGN_OR_RETURN(std::vector<cuda::OpChecksum> sums, engine->WaitChecksums(ticket));
      if (r > 0) checksummed.push_back(gb / Seconds(t0, Clock::now()));
      if (sums.size() != ops.size()) return absl::InternalError("checksums missing");
    }
    engine_checksummed_rate = Median(checksummed);
    TESSERA_RETURN_IF_ERROR(engine->UnregisterHost(slot));
    munmap(slot, state.packed);
  }
  rows.push_back({"snapshot copy D2H into registered /dev/shm (copy engine, copy only)",
                  Fmt("%.1f GB/s", engine_rate), Fmt("raw pinned D2H %.1f GB/s", raw_d2h),
                  Fmt("%.3f", engine_rate / raw_d2h), ">= 0.95"});
  rows.push_back({absl::StrCat("  the same, checksummed (",
                               o.checksum_on_device ? "GPU kernel" : "host threads",
                               ", MarkSnapshotPoint..WaitChecksums)"),
                  Fmt("%.1f GB/s", engine_checksummed_rate),
                  Fmt("raw pinned D2H %.1f GB/s", raw_d2h),
                  Fmt("%.3f", engine_checksummed_rate / raw_d2h), "-"});

  // 3. Through tesserad.
  Progress("starting tesserad");
  TESSERA_ASSIGN_OR_RETURN(auto daemon,
                           BenchDaemon::Start(o.tesserad, "gpubench", 2 * state.packed + 2 * kGiB,
                                              o.crc_threads));
  Client::Options copts;
  copts.checksum_threads = o.checksum_threads;
  copts.checksum_on_device = o.checksum_on_device;
  copts.socket_path = daemon->socket_path();
  copts.when_busy = Client::BusyPolicy::kWait;
  TESSERA_ASSIGN_OR_RETURN(auto client, Client::Connect(copts));
  std::vector<Client::Entry> entries;
  for (size_t i = 0; i < state.ptrs.size(); ++i) {
    Client::Entry e;
    e.spec.set_name(absl::StrCat("t", i));
    e.spec.set_dtype("uint8");
    e.spec.set_kind(ENTRY_KIND_TENSOR);
    e.spec.add_shape(static_cast<int64_t>(state.sizes[i]));
    e.spec.set_nbytes(state.sizes[i]);
    e.data = state.ptrs[i];
    entries.push_back(e);
  }
  Progress("Register (creates and pins two slots)");
  auto t_reg = Clock::now();
  TESSERA_RETURN_IF_ERROR(client->Register("gpu-bench", 0, 1, entries));
  const double register_s = Seconds(t_reg, Clock::now());
  if (client->stats().engine.rfind("cuda", 0) != 0) {
    return absl::FailedPreconditionError("the client's engine is " + client->stats().engine);
  }
  int64_t step = 0;
  std::vector<double> block_us, sealed_rates, begin_ms, copy_ms, seal_ms;
  Progress("Snapshot..Wait");
  for (int r = 0; r < o.repeats + 2; ++r) {
    TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
    const auto t0 = Clock::now();
    TESSERA_ASSIGN_OR_RETURN(auto outcome, client->Snapshot(++step, stream));
    const auto t1 = Clock::now();
    TESSERA_RETURN_IF_ERROR(client->Wait());
    const auto t2 = Clock::now();
    if (outcome != Client::SnapshotOutcome::kStarted) return absl::InternalError("skipped");
    block_us.push_back(Seconds(t0, t1) * 1e6);
    if (r > 0) {
      sealed_rates.push_back(gb / Seconds(t0, t2));
      const Client::Stats stats = client->stats();
      begin_ms.push_back(stats.last_begin_ns / 1e6);
      copy_ms.push_back(stats.last_copy_ns / 1e6);
      seal_ms.push_back(stats.last_seal_ns / 1e6);
    }
  }
  const double sealed_rate = Median(sealed_rates);
  rows.push_back({"Snapshot() -> sealed through tesserad (copy + manifest + seal with CRC32C)",
                  Fmt("%.1f GB/s", sealed_rate), Fmt("raw pinned D2H %.1f GB/s", raw_d2h),
                  Fmt("%.3f", sealed_rate / raw_d2h), "-"});
  rows.push_back({"  of which (medians): to a slot / copies + checksums / manifest + seal",
                  Fmt("%.2f / ", Median(begin_ms)) + Fmt("%.2f / ", Median(copy_ms)) +
                      Fmt("%.2f ms", Median(seal_ms)),
                  Fmt("raw copy %.2f ms", gb / raw_d2h * 1e3), "-", "-"});
  rows.push_back(
      {absl::StrCat("Snapshot() blocks the caller, ", Fmt("%.2f", gb), " GB in ", state.ptrs.size(),
                    " tensors (median / max of ", block_us.size(), ")"),
       Fmt("%.3f", Median(block_us) / 1e3) + " / " +
           Fmt("%.3f ms", *std::max_element(block_us.begin(), block_us.end()) / 1e3),
       "-", "-", "< 1 ms"});

  // 4. Restore.
  Progress("Restore");
  std::vector<double> restore_rates, open_ms, restore_copy_ms, rest_ms;
  for (int r = 0; r < o.repeats; ++r) {
    const auto t0 = Clock::now();
    TESSERA_ASSIGN_OR_RETURN(int64_t restored, client->Restore(-1));
    const double seconds = Seconds(t0, Clock::now());
    restore_rates.push_back(gb / seconds);
    if (restored != step) return absl::InternalError(absl::StrCat("restored ", restored));
    const Client::Stats stats = client->stats();
    open_ms.push_back(stats.last_restore_open_ns / 1e6);
    restore_copy_ms.push_back(stats.last_restore_copy_ns / 1e6);
    rest_ms.push_back(seconds * 1e3 - open_ms.back() - restore_copy_ms.back());
  }
  const double restore_rate = Median(restore_rates);
  rows.push_back({"Restore() H2D, blocks checked beside the copy (incl. PrepareRestore)",
                  Fmt("%.1f GB/s", restore_rate), Fmt("raw pinned H2D %.1f GB/s", raw_h2d),
                  Fmt("%.3f", restore_rate / raw_h2d), "-"});
  rows.push_back({"  of which (medians): find + open / copies + checks / the rest",
                  Fmt("%.2f / ", Median(open_ms)) + Fmt("%.2f / ", Median(restore_copy_ms)) +
                      Fmt("%.2f ms", Median(rest_ms)),
                  Fmt("raw copy %.2f ms", gb / raw_h2d * 1e3), "-", "-"});

  // 5. Training stand-in: GEMMs, fence, optimizer step over the whole state, snapshot every N.
  Progress("GEMM loop");
  Gemm gemm;
  TESSERA_RETURN_IF_ERROR(gemm.Init(o.gemm_n, stream));
  for (int i = 0; i < 3; ++i) TESSERA_RETURN_IF_ERROR(gemm.Run());
  TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
  const auto tg = Clock::now();
  for (int i = 0; i < 10; ++i) TESSERA_RETURN_IF_ERROR(gemm.Run());
  TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
  const double gemm_ms = Seconds(tg, Clock::now()) * 1e3 / 10;
  const int gemms = std::max(1, static_cast<int>(o.iteration_ms / gemm_ms + 0.5));
  uint64_t mask = 0x9E3779B97F4A7C15ull;
  // Returns the mean iteration time in ms; snapshots every `every` iterations (0: never).
  auto loop = [&](int every, double* max_block_ms) -> absl::StatusOr<double> {
    *max_block_ms = 0;
    double total = 0;
    for (int i = -2; i < o.iterations; ++i) {  // two warm-up iterations
      const auto t0 = Clock::now();
      for (int g = 0; g < gemms; ++g) TESSERA_RETURN_IF_ERROR(gemm.Run());  // forward, backward
      if (every > 0) TESSERA_RETURN_IF_ERROR(client->Fence(stream));
      TESSERA_RETURN_IF_ERROR(state.Optimizer(mask = mask * 3 + 1, stream));
      if (every > 0 && i >= 0 && i % every == every - 1) {
        const auto s0 = Clock::now();
        TESSERA_ASSIGN_OR_RETURN(auto outcome, client->Snapshot(++step, stream));
        *max_block_ms = std::max(*max_block_ms, Seconds(s0, Clock::now()) * 1e3);
        if (outcome != Client::SnapshotOutcome::kStarted) return absl::InternalError("skipped");
      }
      TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));
      if (i >= 0) total += Seconds(t0, Clock::now());
    }
    TESSERA_RETURN_IF_ERROR(client->Wait());
    return total * 1e3 / o.iterations;
  };
  double unused = 0;
  TESSERA_ASSIGN_OR_RETURN(const double base_ms, loop(0, &unused));
  rows.push_back({absl::StrCat("training stand-in: iteration (", gemms, " GEMMs ", o.gemm_n,
                               "^3 + ", "optimizer over the state), no snapshots"),
                  Fmt("%.1f ms", base_ms), Fmt("GEMM %.0f TFLOP/s", gemm.flops() / gemm_ms / 1e9),
                  "-", "-"});
  for (int every : o.every) {
    Progress(absl::StrCat("GEMM loop, snapshot every ", every));
    const Client::Stats before = client->stats();
    double max_block_ms = 0;
    TESSERA_ASSIGN_OR_RETURN(const double ms, loop(every, &max_block_ms));
    const Client::Stats after = client->stats();
    rows.push_back({absl::StrCat("  snapshot every ", every, " (", after.sealed - before.sealed,
                                 " sealed, ", after.busy_waits - before.busy_waits,
                                 " waited for the previous; Snapshot() max ",
                                 Fmt("%.2f ms", max_block_ms), ")"),
                    Fmt("%.1f ms", ms), Fmt("no snapshots %.1f ms", base_ms),
                    Fmt("%+.1f%%", (ms / base_ms - 1) * 100), "-"});
  }

  char title[512];
  std::snprintf(title, sizeof(title),
                "Tessera GPU snapshot benchmark: %s, %zu tensors, %.2f GB (odd sizes), medians of "
                "%d; tesserad store in /dev/shm, crc_threads %d, snapshot checksums %s; Register "
                "(two slots, pinned) "
                "%.2f s; GEMMs: %s, %.2f ms each",
                prop.name, state.ptrs.size(), gb, o.repeats, o.crc_threads,
                o.checksum_on_device
                    ? "on the GPU"
                    : absl::StrCat("on ", o.checksum_threads, " host threads").c_str(),
                register_s, gemm.what().c_str(), gemm_ms);
  PrintTable(title, rows);
  TESSERA_RETURN_IF_ERROR(client->Close(/*drop_snapshots=*/true));
  cudaStreamDestroy(stream);
  return absl::OkStatus();
}

bool ParseSize(const std::string& text, uint64_t* out) {
  if (text.empty()) return false;
  uint64_t scale = 1;
  std::string digits = text;
  switch (text.back()) {
    case 'K': case 'k': scale = uint64_t{1} << 10; break;
    case 'M': case 'm': scale = uint64_t{1} << 20; break;
    case 'G': case 'g': scale = uint64_t{1} << 30; break;
    default: break;
  }
  if (scale != 1) digits.pop_back();
  uint64_t n = 0;
  if (!absl::SimpleAtoi(digits, &n)) return false;
  *out = n * scale;
  return true;
}

std::string FindTesserad() {
  if (const char* env = std::getenv("TESSERAD"); env != nullptr && *env != '\0') return env;
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::vector<std::string> candidates;
  if (const char* dir = std::getenv("RUNFILES_DIR")) {
    candidates.push_back(absl::StrCat(dir, "/tessera/daemon/tesserad"));
  }
  if (n > 0) candidates.push_back(std::string(exe, n) + ".runfiles/tessera/daemon/tesserad");
  for (const std::string& c : candidates) {
    if (access(c.c_str(), X_OK) == 0) return c;
  }
  return "";
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  using tessera::Options;
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    bool ok = true;
    if (name == "--bytes") {
      ok = tessera::ParseSize(value, &o.bytes);
    } else if (name == "--tensors") {
      ok = absl::SimpleAtoi(value, &o.tensors) && o.tensors > 0;
    } else if (name == "--repeats") {
      ok = absl::SimpleAtoi(value, &o.repeats) && o.repeats > 0;
    } else if (name == "--iteration-ms") {
      ok = absl::SimpleAtod(value, &o.iteration_ms) && o.iteration_ms > 0;
    } else if (name == "--iterations") {
      ok = absl::SimpleAtoi(value, &o.iterations) && o.iterations > 0;
    } else if (name == "--gemm-n") {
      ok = absl::SimpleAtoi(value, &o.gemm_n) && o.gemm_n > 0;
    } else if (name == "--crc-threads") {
      ok = absl::SimpleAtoi(value, &o.crc_threads) && o.crc_threads > 0;
    } else if (name == "--checksum-on") {
      ok = value == "gpu" || value == "host";
      o.checksum_on_device = value == "gpu";
    } else if (name == "--checksum-threads") {
      ok = absl::SimpleAtoi(value, &o.checksum_threads) && o.checksum_threads > 0 &&
           o.checksum_threads <= 64;
    } else if (name == "--tesserad") {
      o.tesserad = value;
      ok = !value.empty();
    } else if (name == "--every") {
      o.every.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int n = 0;
        ok = ok && absl::SimpleAtoi(part, &n) && n > 0;
        o.every.push_back(n);
      }
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr,
                   "usage: gpu_snapshot_bench [--bytes=10G] [--tensors=256] [--repeats=3] "
                   "[--iteration-ms=80] [--iterations=30] [--every=1,2,10] [--gemm-n=8192] "
                   "[--crc-threads=8] [--checksum-threads=4] [--checksum-on=gpu|host] "
                   "[--tesserad=PATH]\n(bad argument '%s')\n",
                   argv[i]);
      return 2;
    }
  }
  tessera::SetLogLevel("warn").IgnoreError();
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "gpu_snapshot_bench: no usable CUDA device (%s); nothing measured\n",
                 cudaGetErrorName(cudaGetLastError()));
    return 1;
  }
  if (o.tesserad.empty()) o.tesserad = tessera::FindTesserad();
  if (o.tesserad.empty()) {
    std::fprintf(stderr, "gpu_snapshot_bench: no tesserad; pass --tesserad=PATH or set TESSERAD\n");
    return 2;
  }
  const absl::Status status = tessera::Run(o);
  if (!status.ok()) {
    std::fprintf(stderr, "gpu_snapshot_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
