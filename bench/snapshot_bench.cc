// Snapshot and restore throughput of the host path into a real tesserad's shared memory, and
// CRC32C throughput, each next to single-thread memcpy of the same buffers measured in the same
// run, with the ratio between them.
//
// Two layouts: a few large tensors (--bytes over --tensors) and many small ones (--small-bytes
// over --small-tensors, sizes spread log-uniformly over a 16x range). For each, every repeat
// measures, in this order and on the same buffers:
//   memcpy      each tensor into a pre-faulted shm segment laid out like a slot (the limit);
//   snapshot    Snapshot() until Fence() returns (the copies are done; on the host path that
//               includes the BeginSnapshot round trip, and the client's CRC32C of each block
//               right after copying it), and until Wait() returns (the daemon has sealed, with
//               the client's CRC32C), and how long Snapshot() itself blocked the caller;
//   restore     Restore() into the registered buffers (each block checked against its CRC32C
//               just before it is copied);
//   crc         Crc32c on one thread and ParallelCrc32c on 2 and 4 threads over the segment.
// Interleaving the measurements keeps load drift on a shared machine out of the ratios, which are
// the median over repeats of (rate / memcpy rate of the same repeat). Rates are medians, in
// decimal GB/s (1e9 bytes per second) of tensor bytes.
//
// At the end of each layout, the sources get new contents, are snapshotted, scrambled and
// restored, and must come back bit-exact: a benchmark that measured a no-op fails here.
//
// Usage: bazel run -c opt //bench:snapshot_bench -- [--bytes=1G] [--tensors=8]
//          [--small-bytes=256M] [--small-tensors=300] [--repeats=7] [--crc-threads=4]
//          [--tesserad=PATH]
// Sizes take a K, M or G suffix (binary). --crc-threads is the daemon's store.crc_threads.
// --tesserad defaults to daemon/tesserad in this binary's runfiles.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "agent/client.h"
#include "bench/bench_daemon.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/segment.h"
#include "common/status.h"
#include "cuda/copy_engine.h"

namespace tessera {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kEntryAlignment = 256;  // the daemon's packing of entries in a slot
constexpr uint64_t kSeed = 0x5EED0B5E;

struct Options {
  uint64_t bytes = 1024 * kMiB;
  int tensors = 8;
  uint64_t small_bytes = 256 * kMiB;
  int small_tensors = 300;
  int repeats = 7;
  int crc_threads = 4;
  std::string tesserad;
};

struct Layout {
  std::string name;
  uint64_t total_bytes;
  int tensors;
  bool spread;  // sizes spread log-uniformly over 16x; otherwise equal
};

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

double Seconds(std::chrono::steady_clock::time_point from,
               std::chrono::steady_clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

uint64_t SplitMix(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Random bytes (never zeros: zeros hide unwritten bytes), writing every page.
void FillRandom(uint8_t* data, uint64_t bytes, uint64_t seed) {
  uint64_t state = seed;
  uint64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t word = SplitMix(&state);
    std::memcpy(data + i, &word, 8);
  }
  for (; i < bytes; ++i) data[i] = static_cast<uint8_t>(SplitMix(&state));
}

// Tensor sizes, multiples of 4 bytes (float32), summing to total_bytes rounded down to 4.
std::vector<uint64_t> TensorSizes(const Layout& layout) {
  const uint64_t elements = layout.total_bytes / 4;
  std::vector<double> weights;
  uint64_t state = kSeed ^ layout.total_bytes;
  for (int i = 0; i < layout.tensors; ++i) {
    const double u = (SplitMix(&state) % 1000000) / 1e6;
    weights.push_back(layout.spread ? std::exp(u * std::log(16.0)) : 1.0);
  }
  double weight_sum = 0;
  for (double w : weights) weight_sum += w;
  std::vector<uint64_t> sizes;
  uint64_t assigned = 0;
  for (int i = 0; i < layout.tensors; ++i) {
    // Leaves at least one element for each tensor still to size.
    const uint64_t after = layout.tensors - i - 1;
    const uint64_t share = static_cast<uint64_t>(elements * weights[i] / weight_sum);
    const uint64_t n = after == 0 ? elements - assigned
                                  : std::clamp<uint64_t>(share, 1, elements - assigned - after);
    assigned += n;
    sizes.push_back(n * 4);
  }
  return sizes;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Copies the concatenation of the sources to the same ranges of the destinations, its bytes split
// into page-aligned shares over `threads` threads (the calling thread included).
struct Span {
  uint8_t* dst;
  const uint8_t* src;
  uint64_t bytes;
};
void CopySpans(const std::vector<Span>& spans, int threads) {
  auto copy_range = [&spans](uint64_t begin, uint64_t end) {
    uint64_t start = 0;
    for (const Span& s : spans) {
      const uint64_t from = std::max(begin, start), to = std::min(end, start + s.bytes);
      if (from < to) std::memcpy(s.dst + (from - start), s.src + (from - start), to - from);
      start += s.bytes;
      if (start >= end) break;
    }
  };
  uint64_t total = 0;
  for (const Span& s : spans) total += s.bytes;
  const uint64_t share = (total / threads + 4095) / 4096 * 4096;
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) {
    workers.emplace_back(copy_range, std::min(total, t * share), std::min(total, (t + 1) * share));
  }
  copy_range(0, std::min(total, share));
  for (std::thread& w : workers) w.join();
}

// One measurement's samples: seconds per repeat, and the rate ratio to the same repeat's memcpy.
struct Series {
  std::vector<double> seconds;
  std::vector<double> ratios;
};

struct CaseResult {
  Layout layout;
  std::vector<uint64_t> sizes;
  Series memcpy1, memcpy_n, snapshot_copy, snapshot_e2e, restore, crc1, crc2, crc4;
  std::vector<double> block_us;      // wall time Snapshot() took
  std::vector<double> block_cpu_us;  // of which the calling thread ran on a CPU
  int64_t verified_step = -1;
  std::string engine;  // the client's copy engine, as it describes itself
};

absl::Status RunCase(const Options& options, const BenchDaemon& daemon, int copy_threads,
                     CaseResult* result) {
  const Layout& layout = result->layout;
  result->sizes = TensorSizes(layout);
  const std::vector<uint64_t>& sizes = result->sizes;
  uint64_t total = 0;
  for (uint64_t s : sizes) total += s;

  // The registered tensors: separate 64-byte-aligned allocations, as a framework's would be.
  std::vector<Buffer> tensors;
  std::vector<Client::Entry> entries;
  for (size_t i = 0; i < sizes.size(); ++i) {
    Buffer b(static_cast<uint8_t*>(std::aligned_alloc(64, (sizes[i] + 63) / 64 * 64)));
    if (!b) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", sizes[i]));
    FillRandom(b.get(), sizes[i], kSeed + i);
    Client::Entry e;
    e.spec.set_name(absl::StrCat(layout.name, ".t", i));
    e.spec.set_dtype("float32");
    e.spec.add_shape(static_cast<int64_t>(sizes[i] / 4));
    e.spec.set_nbytes(sizes[i]);
    e.spec.set_kind(ENTRY_KIND_TENSOR);
    e.data = b.get();
    entries.push_back(e);
    tensors.push_back(std::move(b));
  }

  // The memcpy destination: a segment like a slot (tmpfs, preallocated, pre-faulted), entries at
  // the daemon's offsets.
  std::vector<uint64_t> offsets;
  uint64_t data_bytes = 0;
  for (uint64_t s : sizes) {
    data_bytes = (data_bytes + kEntryAlignment - 1) / kEntryAlignment * kEntryAlignment;
    offsets.push_back(data_bytes);
    data_bytes += s;
  }
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Segment> copy,
                           Segment::Create(daemon.dir() + "/memcpy-" + layout.name,
                                           SegmentKind::kSlot, data_bytes, SegmentCreateOptions{}));
  TESSERA_RETURN_IF_ERROR(copy->Unlink());
  std::vector<Span> spans;
  for (size_t i = 0; i < sizes.size(); ++i) {
    spans.push_back({copy->payload() + offsets[i], tensors[i].get(), sizes[i]});
  }

  Client::Options client_options;
  client_options.socket_path = daemon.socket_path();
  client_options.use_gpu = false;
  client_options.when_busy = Client::BusyPolicy::kWait;
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(client_options));
  TESSERA_RETURN_IF_ERROR(client->Register("bench-" + layout.name, 0, 1, entries));
  result->engine = client->stats().engine;

  int64_t step = 0;
  auto snapshot = [&](double* block_s, double* block_cpu_s, double* copy_s,
                      double* e2e_s) -> absl::Status {
    timespec cpu0, cpu1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu0);
    const auto t0 = std::chrono::steady_clock::now();
    TESSERA_ASSIGN_OR_RETURN(Client::SnapshotOutcome outcome, client->Snapshot(++step));
    const auto t1 = std::chrono::steady_clock::now();
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu1);
    TESSERA_RETURN_IF_ERROR(client->Fence());
    const auto t2 = std::chrono::steady_clock::now();
    TESSERA_RETURN_IF_ERROR(client->Wait());
    const auto t3 = std::chrono::steady_clock::now();
    if (outcome != Client::SnapshotOutcome::kStarted) {
      return absl::InternalError(absl::StrCat("snapshot of step ", step, " was skipped"));
    }
    if (block_s) *block_s = Seconds(t0, t1);
    if (block_cpu_s) {
      *block_cpu_s = (cpu1.tv_sec - cpu0.tv_sec) + (cpu1.tv_nsec - cpu0.tv_nsec) * 1e-9;
    }
    if (copy_s) *copy_s = Seconds(t0, t2);
    if (e2e_s) *e2e_s = Seconds(t0, t3);
    return absl::OkStatus();
  };
  auto restore = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(int64_t restored, client->Restore(-1));
    if (restored != step) {
      return absl::InternalError(absl::StrCat("restored step ", restored, ", expected ", step));
    }
    return absl::OkStatus();
  };
  auto timed = [](const std::function<void()>& body) {
    const auto start = std::chrono::steady_clock::now();
    body();
    return Seconds(start, std::chrono::steady_clock::now());
  };

  // Warm-up: both slots written once, one restore, one copy.
  for (int i = 0; i < 2; ++i) TESSERA_RETURN_IF_ERROR(snapshot(nullptr, nullptr, nullptr, nullptr));
  TESSERA_RETURN_IF_ERROR(restore());
  CopySpans(spans, 1);

  uint32_t crcs[3];
  for (int r = 0; r < options.repeats; ++r) {
    const double memcpy_s = timed([&] {
      for (const Span& s : spans) std::memcpy(s.dst, s.src, s.bytes);
    });
    auto add = [&](Series* series, double seconds) {
      series->seconds.push_back(seconds);
      series->ratios.push_back(memcpy_s / seconds);
    };
    add(&result->memcpy1, memcpy_s);
    add(&result->memcpy_n, timed([&] { CopySpans(spans, copy_threads); }));
    double block_s, block_cpu_s, copy_s, e2e_s;
    TESSERA_RETURN_IF_ERROR(snapshot(&block_s, &block_cpu_s, &copy_s, &e2e_s));
    result->block_us.push_back(block_s * 1e6);
    result->block_cpu_us.push_back(block_cpu_s * 1e6);
    add(&result->snapshot_copy, copy_s);
    add(&result->snapshot_e2e, e2e_s);
    absl::Status restored;
    add(&result->restore, timed([&] { restored = restore(); }));
    TESSERA_RETURN_IF_ERROR(restored);
    // Over the copied tensors, padding included, as the daemon's seal runs over the payload.
    add(&result->crc1, timed([&] { crcs[0] = Crc32c(copy->payload(), data_bytes); }));
    add(&result->crc2, timed([&] { crcs[1] = ParallelCrc32c(copy->payload(), data_bytes, 2); }));
    add(&result->crc4, timed([&] { crcs[2] = ParallelCrc32c(copy->payload(), data_bytes, 4); }));
    if (crcs[1] != crcs[0] || crcs[2] != crcs[0]) {
      return absl::DataLossError(absl::StrCat("CRC32C disagree: 1 thread ", crcs[0], ", 2 threads ",
                                              crcs[1], ", 4 threads ", crcs[2]));
    }
  }

  // Correctness: new contents, snapshot, keep the expected bytes, scramble, restore, compare.
  for (size_t i = 0; i < sizes.size(); ++i) FillRandom(tensors[i].get(), sizes[i], ~kSeed + i);
  TESSERA_RETURN_IF_ERROR(snapshot(nullptr, nullptr, nullptr, nullptr));
  CopySpans(spans, 1);
  for (size_t i = 0; i < sizes.size(); ++i) FillRandom(tensors[i].get(), sizes[i], kSeed * 7 + i);
  TESSERA_RETURN_IF_ERROR(restore());
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (std::memcmp(tensors[i].get(), copy->payload() + offsets[i], sizes[i]) != 0) {
      return absl::DataLossError(absl::StrCat("tensor ", entries[i].spec.name(), " (", sizes[i],
                                              " bytes) differs after restoring step ", step));
    }
  }
  result->verified_step = step;
  return client->Close(/*drop_snapshots=*/true);
}

absl::StatusOr<uint64_t> ParseBytes(const std::string& flag, std::string text) {
  uint64_t unit = 1;
  const char* const kSuffixes = "KMG";
  if (const char* suffix =
          text.empty() ? nullptr : std::strchr(kSuffixes, std::toupper(text.back()));
      suffix != nullptr && *suffix != '\0') {
    unit = uint64_t{1} << (10 * (suffix - kSuffixes + 1));
    text.pop_back();
  }
  uint64_t value;
  if (!absl::SimpleAtoi(text, &value) || value == 0) {
    return absl::InvalidArgumentError(flag + ": expected a positive size such as 1G or 65536");
  }
  return value * unit;
}

absl::StatusOr<Options> ParseFlags(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq),
                      value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    auto positive_int = [&](int* out) -> absl::Status {
      if (!absl::SimpleAtoi(value, out) || *out < 1) {
        return absl::InvalidArgumentError(name + ": expected a positive integer, got '" + value +
                                          "'");
      }
      return absl::OkStatus();
    };
    if (name == "--bytes") {
      TESSERA_ASSIGN_OR_RETURN(options.bytes, ParseBytes(name, value));
    } else if (name == "--small-bytes") {
      TESSERA_ASSIGN_OR_RETURN(options.small_bytes, ParseBytes(name, value));
    } else if (name == "--tensors") {
      TESSERA_RETURN_IF_ERROR(positive_int(&options.tensors));
    } else if (name == "--small-tensors") {
      TESSERA_RETURN_IF_ERROR(positive_int(&options.small_tensors));
    } else if (name == "--repeats") {
      TESSERA_RETURN_IF_ERROR(positive_int(&options.repeats));
    } else if (name == "--crc-threads") {
      TESSERA_RETURN_IF_ERROR(positive_int(&options.crc_threads));
    } else if (name == "--tesserad" && !value.empty()) {
      options.tesserad = value;
    } else {
      return absl::InvalidArgumentError("unknown flag '" + arg + "'");
    }
  }
  for (const auto& [bytes, tensors] : {std::pair{options.bytes, options.tensors},
                                       std::pair{options.small_bytes, options.small_tensors}}) {
    if (bytes / 4 < static_cast<uint64_t>(tensors)) {
      return absl::InvalidArgumentError(
          absl::StrCat(bytes, " bytes cannot hold ", tensors, " float32 tensors"));
    }
  }
  return options;
}

bool IsExecutable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

// daemon/tesserad in this binary's runfiles (bazel run, or the binary run from bazel-bin).
absl::StatusOr<std::string> FindTesserad(const char* argv0) {
  std::vector<std::string> candidates;
  if (const char* dir = std::getenv("RUNFILES_DIR")) {
    candidates.push_back(absl::StrCat(dir, "/tessera/daemon/tesserad"));
  }
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) candidates.push_back(std::string(exe, n) + ".runfiles/tessera/daemon/tesserad");
  candidates.push_back(std::string(argv0) + ".runfiles/tessera/daemon/tesserad");
  for (const std::string& c : candidates) {
    if (IsExecutable(c)) return c;
  }
  return absl::NotFoundError(absl::StrCat("no tesserad in the runfiles (looked at ",
                                          candidates.front(), "); pass --tesserad=PATH"));
}

int UsableCores() {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : -1;
}

// Share of all CPUs' time that was idle during the next `window` (from /proc/stat); -1 if unknown.
// The load average trails by a minute; this says whether the machine is quiet now.
double IdleFraction(std::chrono::milliseconds window) {
  auto sample = [](uint64_t* idle, uint64_t* total) {
    std::ifstream in("/proc/stat");
    std::string label;
    in >> label;
    *idle = *total = 0;
    uint64_t ticks;
    for (int field = 0; field < 8 && in >> ticks; ++field) {
      *total += ticks;
      if (field == 3 || field == 4) *idle += ticks;  // idle, iowait
    }
    return label == "cpu";
  };
  uint64_t idle0, total0, idle1, total1;
  if (!sample(&idle0, &total0)) return -1;
  std::this_thread::sleep_for(window);
  if (!sample(&idle1, &total1) || total1 == total0) return -1;
  return static_cast<double>(idle1 - idle0) / (total1 - total0);
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

void PrintTable(const std::vector<CaseResult>& results, int copy_threads) {
  std::printf("%-6s %-44s %8s %16s %8s %7s\n", "layout", "measurement", "GB/s", "(min - max)",
              "memcpy", "ratio");
  std::printf("%s\n", std::string(94, '-').c_str());
  for (const CaseResult& c : results) {
    uint64_t total = 0;
    for (uint64_t s : c.sizes) total += s;
    const double memcpy_rate = total / Median(c.memcpy1.seconds) / 1e9;
    auto row = [&](const std::string& what, const Series& s) {
      std::vector<double> rates;
      for (double sec : s.seconds) rates.push_back(total / sec / 1e9);
      std::printf("%-6s %-44s %8.2f %7.2f - %6.2f %8.2f %7.2f\n", c.layout.name.c_str(),
                  what.c_str(), total / Median(s.seconds) / 1e9,
                  *std::min_element(rates.begin(), rates.end()),
                  *std::max_element(rates.begin(), rates.end()), memcpy_rate, Median(s.ratios));
    };
    const auto [lo, hi] = std::minmax_element(c.sizes.begin(), c.sizes.end());
    std::printf("%-6s %.3f GB in %zu float32 tensors of %.2f to %.2f MiB\n", c.layout.name.c_str(),
                total / 1e9, c.sizes.size(), *lo / static_cast<double>(kMiB),
                *hi / static_cast<double>(kMiB));
    row("memcpy, 1 thread (the limit)", c.memcpy1);
    row(absl::StrCat("memcpy, ", copy_threads, " threads (reference)"), c.memcpy_n);
    row("snapshot copy: Snapshot() -> Fence()", c.snapshot_copy);
    row("snapshot end-to-end: Snapshot() -> Wait()", c.snapshot_e2e);
    row("restore: Restore() (blocks checked, then copied)", c.restore);
    row("CRC32C, 1 thread", c.crc1);
    row("ParallelCrc32c, 2 threads", c.crc2);
    row("ParallelCrc32c, 4 threads", c.crc4);
    std::printf("%-6s %-44s %8.1f us median wall (max %.1f), %.1f us on-CPU\n",
                c.layout.name.c_str(), "Snapshot() blocks the caller", Median(c.block_us),
                *std::max_element(c.block_us.begin(), c.block_us.end()), Median(c.block_cpu_us));
    std::printf("%-6s verified: step %lld restored bit-exact into scrambled buffers\n",
                c.layout.name.c_str(), static_cast<long long>(c.verified_step));
    std::printf("%s\n", std::string(94, '-').c_str());
  }
}

int Main(int argc, char** argv) {
  absl::StatusOr<Options> parsed = ParseFlags(argc, argv);
  if (!parsed.ok()) {
    std::fprintf(stderr,
                 "%s\nusage: %s [--bytes=1G] [--tensors=8] [--small-bytes=256M] "
                 "[--small-tensors=300] [--repeats=7] [--crc-threads=4] [--tesserad=PATH]\n",
                 std::string(parsed.status().message()).c_str(), argv[0]);
    return 2;
  }
  Options options = *std::move(parsed);
  if (options.tesserad.empty()) {
    absl::StatusOr<std::string> found = FindTesserad(argv[0]);
    if (!found.ok()) {
      std::fprintf(stderr, "%s\n", found.status().ToString().c_str());
      return 2;
    }
    options.tesserad = *found;
  }
  char resolved[PATH_MAX];
  if (!IsExecutable(options.tesserad) || realpath(options.tesserad.c_str(), resolved) == nullptr) {
    std::fprintf(stderr, "--tesserad=%s is not an executable\n", options.tesserad.c_str());
    return 2;
  }
  SetLogLevel("warn").IgnoreError();

  double load[3] = {-1, -1, -1};
  getloadavg(load, 3);
  const int copy_threads = std::max(2, UsableCores());
  const double idle = IdleFraction(std::chrono::seconds(1));
  std::printf(
      "snapshot_bench: %u cores (%d usable by this process), %s; at start: load average %.2f "
      "%.2f %.2f, CPUs %.0f%% idle over the last second\n",
      std::thread::hardware_concurrency(), UsableCores(), CpuModel().c_str(), load[0], load[1],
      load[2], idle * 100);
  std::fflush(stdout);

  const std::vector<Layout> layouts = {{"large", options.bytes, options.tensors, false},
                                       {"small", options.small_bytes, options.small_tensors, true}};
  uint64_t capacity = 64 * kMiB;  // two slots per layout, with room for padding and manifests
  for (const Layout& l : layouts) capacity += 2 * (l.total_bytes + l.tensors * 1024 + 8 * kMiB);
  absl::StatusOr<std::unique_ptr<BenchDaemon>> daemon =
      BenchDaemon::Start(resolved, "bench", capacity, options.crc_threads);
  if (!daemon.ok()) {
    std::fprintf(stderr, "%s\n", daemon.status().ToString().c_str());
    return 1;
  }
  const cuda::CopyEngineOptions engine_defaults;
  std::printf(
      "tesserad %s, store.crc_threads=%d; the Client copies with its host engine at the "
      "default CopyEngineOptions: host_copy_threads=%d from %zu MiB per snapshot\n",
      resolved, options.crc_threads, engine_defaults.host_copy_threads,
      static_cast<size_t>(engine_defaults.host_parallel_min_bytes / kMiB));
  std::printf(
      "%d repeats per layout, interleaved; rates are medians in decimal GB/s (1e9 "
      "bytes/s) of tensor bytes; ratio = median over repeats of rate / the same repeat's "
      "1-thread memcpy rate\n\n",
      options.repeats);
  std::fflush(stdout);

  std::vector<CaseResult> results;
  for (const Layout& layout : layouts) {
    CaseResult result;
    result.layout = layout;
    if (absl::Status s = RunCase(options, **daemon, copy_threads, &result); !s.ok()) {
      std::fprintf(stderr, "%s layout failed: %s\ntesserad log:\n%s\n", layout.name.c_str(),
                   s.ToString().c_str(), (*daemon)->LogTail().c_str());
      return 1;
    }
    results.push_back(std::move(result));
  }
  std::printf("client copy engine: %s\n\n", results[0].engine.c_str());
  PrintTable(results, copy_threads);
  const double ratio = Median(results[0].snapshot_copy.ratios);
  std::printf("target: snapshot copy >= 0.80 x 1-thread memcpy for large tensors: %s (%.2f)\n",
              ratio >= 0.8 ? "met" : "NOT met", ratio);
  getloadavg(load, 3);
  std::printf("load average %.2f %.2f %.2f at the end\n", load[0], load[1], load[2]);
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) { return tessera::Main(argc, argv); }
