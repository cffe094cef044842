// Erasure-coding throughput next to the memory bandwidth of the same machine.
//
// For RS(3,2), RS(4,2), RS(8,4) and shards of 64 MiB and 256 MiB of random data, prints the rate
// of Encode and Reconstruct (1 and m lost fragments), on one thread and on N threads splitting
// every fragment into 1 MiB chunks (EncodeRange / ReconstructRange), next to single-thread
// memcpy of the same shard buffer measured in the same run, and the ratio between them.
//
// Usage: ec_bench [--threads=N] [--repeats=R]   (defaults: all hardware threads, 5)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kChunkBytes = 1 * kMiB;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Options {
  int threads = std::max(1u, std::thread::hardware_concurrency());
  int repeats = 5;
};

// Best (shortest) wall time of `repeats` runs of `body`, after one untimed warm-up run.
double BestSeconds(int repeats, const std::function<void()>& body) {
  body();
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    body();
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    best = std::min(best, elapsed.count());
  }
  return best;
}

// Runs `chunk(offset, length)` over [0, fragment_bytes) in kChunkBytes pieces on `threads` threads.
void ParallelChunks(int threads, size_t fragment_bytes,
                    const std::function<void(size_t, size_t)>& chunk) {
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t offset; (offset = next.fetch_add(kChunkBytes)) < fragment_bytes;) {
      chunk(offset, std::min(kChunkBytes, fragment_bytes - offset));
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& thread : pool) thread.join();
}

void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, status.ToString().c_str());
    std::exit(1);
  }
}

double GiBps(size_t bytes, double seconds) { return bytes / seconds / kGiB; }

void Run(const Options& options) {
  const int n = options.threads;
  std::printf(
      "ec_bench: %d hardware threads, N=%d worker threads, best of %d runs, %zu MiB "
      "chunks per fragment for N threads\n",
      static_cast<int>(std::thread::hardware_concurrency()), n, options.repeats,
      kChunkBytes / kMiB);
  std::printf(
      "Rates are shard bytes per second in GiB/s (encode reads k fragments, writes m; a "
      "rebuild reads k, writes the lost ones); memcpy copies the shard once, 1 thread.\n\n");
  std::printf("%-7s %-7s %-4s %8s | %8s %6s | %8s %6s\n", "shard", "code", "op", "memcpy",
              "1 thread", "ratio", "N thread", "ratio");
  std::printf("%-7s %-7s %-4s %8s | %8s %6s | %8s %6s\n", "", "", "", "GiB/s", "GiB/s", "x mcp",
              "GiB/s", "x mcp");
  std::printf("--------------------------------------------------------------------\n");

  const struct {
    int k;
    int m;
  } shapes[] = {{3, 2}, {4, 2}, {8, 4}};
  for (size_t shard_bytes : {64 * kMiB, 256 * kMiB}) {
    size_t region_bytes = 0;
    for (const auto& shape : shapes) {
      region_bytes = std::max(
          region_bytes, (shape.k + shape.m) * ErasureCodec::FragmentBytes(shard_bytes, shape.k));
    }
    Buffer region = RandomBuffer(region_bytes, shard_bytes);
    Buffer copy = RandomBuffer(shard_bytes, shard_bytes + 1);

    for (const auto& shape : shapes) {
      absl::StatusOr<ErasureCodec> created = ErasureCodec::Create(shape.k, shape.m);
      Check(created.status(), "Create");
      const ErasureCodec codec = *std::move(created);
      const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, shape.k);
      // A fresh random shard for each code; FragmentsInPlace zeroes its padding.
      Buffer shard = RandomBuffer(shard_bytes, shard_bytes ^ (shape.k * 31 + shape.m));
      std::memcpy(region.get(), shard.get(), shard_bytes);
      absl::StatusOr<std::vector<uint8_t*>> data =
          codec.FragmentsInPlace(region.get(), shard_bytes, region_bytes);
      Check(data.status(), "FragmentsInPlace");
      std::vector<uint8_t*> fragments = *data;
      for (int i = 0; i < shape.m; ++i) {
        fragments.push_back(region.get() + (shape.k + i) * fragment_bytes);
      }
      // Measured per code, right before it, so that drift in the machine's load shows in both.
      const double memcpy_rate = GiBps(shard_bytes, BestSeconds(options.repeats, [&] {
                                         std::memcpy(copy.get(), region.get(), shard_bytes);
                                       }));
      uint8_t* const* all = fragments.data();
      uint8_t* const* parity = all + shape.k;

      char shard_name[32], code_name[32];
      std::snprintf(shard_name, sizeof(shard_name), "%zuMiB", shard_bytes / kMiB);
      std::snprintf(code_name, sizeof(code_name), "RS(%d,%d)", shape.k, shape.m);
      auto row = [&](const char* op, double seconds_1t, double seconds_nt) {
        const double r1 = GiBps(shard_bytes, seconds_1t), rn = GiBps(shard_bytes, seconds_nt);
        std::printf("%-7s %-7s %-4s %8.2f | %8.2f %6.2f | %8.2f %6.2f\n", shard_name, code_name, op,
                    memcpy_rate, r1, r1 / memcpy_rate, rn, rn / memcpy_rate);
      };

      const double encode_1t = BestSeconds(
          options.repeats, [&] { Check(codec.Encode(all, parity, fragment_bytes), "Encode"); });
      const double encode_nt = BestSeconds(options.repeats, [&] {
        ParallelChunks(n, fragment_bytes, [&](size_t offset, size_t length) {
          Check(codec.EncodeRange(all, parity, offset, length), "EncodeRange");
        });
      });
      row("enc", encode_1t, encode_nt);

      // Timed rebuilds overwrite fragments with identical bytes; a last rebuild over scribbled
      // fragments must give the shard back.
      for (int lost : {1, shape.m}) {
        std::vector<int> erased;
        for (int i = 0; i < lost; ++i) erased.push_back(i);
        const double rebuild_1t = BestSeconds(options.repeats, [&] {
          Check(codec.Reconstruct(erased, all, fragment_bytes), "Reconstruct");
        });
        const double rebuild_nt = BestSeconds(options.repeats, [&] {
          ParallelChunks(n, fragment_bytes, [&](size_t offset, size_t length) {
            Check(codec.ReconstructRange(erased, all, offset, length), "ReconstructRange");
          });
        });
        char op[8];
        std::snprintf(op, sizeof(op), "-%d", lost);
        row(op, rebuild_1t, rebuild_nt);
        for (int i : erased) std::memset(all[i], 0xA5, fragment_bytes);
        Check(codec.Reconstruct(erased, all, fragment_bytes), "Reconstruct");
        if (std::memcmp(region.get(), shard.get(), shard_bytes) != 0) {
          std::fprintf(stderr, "%s: rebuilding %d fragments changed the shard\n", code_name, lost);
          std::exit(1);
        }
      }
    }
  }
  std::printf("\nop: enc = Encode; -j = Reconstruct of data fragments 0..j-1 from the rest.\n");
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--threads=", 0) == 0) {
      options.threads = std::max(1, std::atoi(arg.c_str() + 10));
    } else if (arg.rfind("--repeats=", 0) == 0) {
      options.repeats = std::max(1, std::atoi(arg.c_str() + 10));
    } else {
      std::fprintf(stderr, "usage: %s [--threads=N] [--repeats=R]\n", argv[0]);
      return 2;
    }
  }
  tessera::Run(options);
  return 0;
}
