// Fragment transfer rate on loopback next to the limits measured in the same run.
//
// For fragments of 64 MiB .. 1 GiB of random data, prints:
//   memcpy     one thread, heap to pre-faulted heap;
//   tcp        a plain TCP stream on 127.0.0.1: 4 MiB writes, 64 KiB reads into a pre-faulted
//              buffer, 4 MiB socket buffers (the tuned limit of the network path);
//   tcp+crc    the same stream carrying what any checked path must compute: CRC32C of each chunk
//              on the sender before it is written and on the receiver once it has arrived
//              (received straight into the destination): the ceiling of a raw TCP data plane;
//   put Nch    GrpcPeerClient::PutFragment into a PeerService over a FragmentStore in /dev/shm
//              (both in this process), N channels per peer: the data path of protection,
//              from CRC per chunk on the sender to the sealed fragment in shared memory;
//   get Nch    GrpcPeerClient::GetFragment of the sealed fragment into a pre-faulted buffer
//              (the data path of a rebuild);
// each the median of R runs, in GB/s (10^9 bytes/s), with CPU seconds per GiB of both sides
// together (the whole process: sender and receiver share the machine's cores, as in tcp), and
// the ratio of the best put to min(memcpy, tcp) (issue 4's protection goal: >= 0.8) and of the
// best get to tcp (rebuild goal: >= 0.7).
//
// Puts run in the steady state: the fragment is dropped after each run and its segment recycled
// by the next one, as when each step's fragments replace the previous step's. The first run of
// every path (which creates segments and connections) is untimed, and the paths are sampled
// round-robin (one run of each per round), so load from elsewhere drifts into all of them alike.
//
// The process runs with TuneMallocForBulkTransfers, as tesserad should (--default_malloc: not).
//
// Usage: transfer_bench [--repeats=R] [--max_mib=M] [--channels=1,4,8] [--chunk_kib=1024]
//                       [--dir=/dev/shm] [--default_malloc]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"
#include "ec/erasure_codec.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace tessera {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr double kGB = 1e9;
constexpr double kGiB = 1024.0 * 1024 * 1024;

struct Options {
  int repeats = 5;
  size_t max_mib = 1024;
  std::vector<int> channels = {1, 4, 8};
  size_t chunk_bytes = kMiB;
  std::string dir = "/dev/shm";
  bool default_malloc = false;  // skip TuneMallocForBulkTransfers (to see what it buys)
};

void Die(const std::string& what) {
  std::fprintf(stderr, "transfer_bench: %s\n", what.c_str());
  std::exit(1);
}

void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) Die(std::string(what) + ": " + status.ToString());
}

double CpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

struct Rate {
  double gbps = 0;
  double cpu_s_per_gib = 0;
};

double Since(std::chrono::steady_clock::time_point start) { return SecondsSince(start); }

// --- gRPC peer path -----------------------------------------------------------------------------

class PeerFixture {
 public:
  explicit PeerFixture(const Options& options) {
    char tmpl[4096];
    std::snprintf(tmpl, sizeof(tmpl), "%s/tessera-transfer-bench-XXXXXX", options.dir.c_str());
    if (mkdtemp(tmpl) == nullptr) Die("mkdtemp in " + options.dir);
    root_ = tmpl;
    budget_ = std::make_unique<CapacityBudget>(uint64_t{16} << 30);
    FragmentStore::Options fo;
    fo.directory = root_ + "/node1";
    fo.budget = budget_.get();
    auto store = FragmentStore::Open(fo);
    Check(store.status(), "FragmentStore::Open");
    store_ = std::move(*store);
    PeerService::Options so;
    so.self = MemberInfo{"bench-node", 1, ""};
    service_ = std::make_unique<PeerService>(store_.get(), nullptr, so);
    grpc::ServerBuilder builder;
    PeerService::ConfigureServerBuilder(&builder);
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    if (!server_ || port == 0) Die("cannot start the gRPC server");
    address_ = "127.0.0.1:" + std::to_string(port);
  }

  ~PeerFixture() {
    server_->Shutdown();
    server_.reset();
    service_.reset();
    store_.reset();
    std::filesystem::remove_all(root_);
  }

  FragmentStore* store() { return store_.get(); }
  const std::string& address() const { return address_; }

 private:
  std::string root_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> store_;
  std::unique_ptr<PeerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

std::unique_ptr<GrpcPeerClient> MakeClient(int channels, size_t chunk_bytes) {
  GrpcPeerClient::Options o;
  o.channels_per_peer = channels;
  o.chunk_bytes = chunk_bytes;
  o.min_range_bytes = std::max<size_t>(8 * kMiB, chunk_bytes);
  o.max_attempts = 1;
  auto client = GrpcPeerClient::Create(o);
  Check(client.status(), "GrpcPeerClient::Create");
  return std::move(*client);
}

void Run(const Options& options) {
  // Loggers to warnings: a per-run line would disturb the timing.
  Check(SetLogLevel("warn"), "SetLogLevel");
  std::printf(
      "transfer_bench: loopback on this machine, %u hardware threads; median of %d rounds; "
      "GB/s = 10^9 bytes/s; cpu = CPU seconds per GiB moved, sender and receiver "
      "together; chunks of %zu KiB\n\n",
      std::thread::hardware_concurrency(), options.repeats, options.chunk_bytes >> 10);
  std::printf("%-8s %-10s %7s %9s %7s\n", "fragment", "path", "GB/s", "cpu-s/GiB", "ratio");
  std::printf("------------------------------------------------\n");

  PeerFixture peer(options);
  std::vector<std::pair<int, std::unique_ptr<GrpcPeerClient>>> clients;
  for (int n : options.channels) clients.emplace_back(n, MakeClient(n, options.chunk_bytes));

  int64_t step = 0;
  for (size_t mib = 64; mib <= options.max_mib; mib *= 4) {
    const size_t bytes = mib * kMiB;
    Buffer src = RandomBuffer(bytes, mib);
    Buffer dst = RandomBuffer(bytes, mib + 1);
    const uint32_t src_crc = Crc32c(src.get(), bytes);
    // RS(4, 2) fragments of exactly `bytes`.
    FragmentMeta meta;
    meta.owner_incarnation = 1;
    meta.ec_k = 4;
    meta.ec_m = 2;
    meta.shard_bytes = 4 * bytes;
    meta.fragment_bytes = ErasureCodec::FragmentBytes(meta.shard_bytes, meta.ec_k);
    meta.shard_crc32c = 1;
    if (meta.fragment_bytes != bytes) Die("fragment size");

    char label[16];
    std::snprintf(label, sizeof(label), "%zuMiB", mib);
    auto row = [&](const std::string& path, const Rate& r, double ratio) {
      if (ratio > 0) {
        std::printf("%-8s %-10s %7.2f %9.2f %7.2f\n", label, path.c_str(), r.gbps, r.cpu_s_per_gib,
                    ratio);
      } else {
        std::printf("%-8s %-10s %7.2f %9.2f %7s\n", label, path.c_str(), r.gbps, r.cpu_s_per_gib,
                    "");
      }
      std::fflush(stdout);
    };

    // Every path is sampled once per round, round after round, so that load from elsewhere on
    // the machine drifts into all of them alike and the ratios stay meaningful.
    struct Path {
      std::string name;
      std::function<double()> sample;  // returns the timed seconds
      std::function<void()> after;     // untimed
      std::vector<double> seconds;
      double cpu = 0;
    };
    std::vector<Path> paths;
    paths.push_back({"memcpy", [&] {
                       const auto start = std::chrono::steady_clock::now();
                       std::memcpy(dst.get(), src.get(), bytes);
                       return Since(start);
                     }});
    paths.push_back({"tcp", [&] { return TcpOnce(src.get(), dst.get(), bytes); }});
    paths.push_back(
        {"tcp+crc",
         [&] { return TcpOnce(src.get(), dst.get(), bytes, /*crc=*/true, options.chunk_bytes); }});
    // Puts go to put_key, dropped after each (its segment is recycled by the next put); gets
    // read get_key, sealed once.
    const FragmentKey put_key{"bench", 0, ++step, 0};
    const FragmentKey get_key{"bench", 0, ++step, 1};
    Check(clients[0].second->PutFragment(peer.address(), get_key, meta, src.get(), bytes).status(),
          "PutFragment");
    for (auto& [channels, client] : clients) {
      GrpcPeerClient* c = client.get();
      paths.push_back({"put " + std::to_string(channels) + "ch",
                       [&, c] {
                         const auto start = std::chrono::steady_clock::now();
                         auto status =
                             c->PutFragment(peer.address(), put_key, meta, src.get(), bytes);
                         const double seconds = Since(start);
                         Check(status.status(), "PutFragment");
                         if (status->fragment_crc32c != src_crc) Die("PutFragment: CRC differs");
                         return seconds;
                       },
                       [&] { Check(peer.store()->DropFragment(put_key), "DropFragment"); }});
      paths.push_back({"get " + std::to_string(channels) + "ch", [&, c] {
                         const auto start = std::chrono::steady_clock::now();
                         auto status = c->GetFragment(peer.address(), get_key, 0, dst.get(), bytes);
                         const double seconds = Since(start);
                         Check(status.status(), "GetFragment");
                         return seconds;
                       }});
    }
    for (Path& path : paths) {  // warm-up: connections, segments, page tables
      path.sample();
      if (path.after) path.after();
    }
    for (int r = 0; r < options.repeats; ++r) {
      for (Path& path : paths) {
        const double cpu0 = CpuSeconds();
        path.seconds.push_back(path.sample());
        path.cpu += CpuSeconds() - cpu0;
        if (path.after) path.after();
      }
    }
    // The bytes arrived intact: the last put, and the last get into dst.
    Check(clients.back()
              .second->PutFragment(peer.address(), put_key, meta, src.get(), bytes)
              .status(),
          "PutFragment");
    auto view = peer.store()->Get(put_key);
    Check(view.status(), "Get");
    if (std::memcmp(view->data(), src.get(), bytes) != 0) Die("PutFragment: bytes differ");
    if (std::memcmp(dst.get(), src.get(), bytes) != 0) Die("GetFragment: bytes differ");
    Check(peer.store()->DropFragment(put_key), "DropFragment");
    Check(peer.store()->DropFragment(get_key), "DropFragment");

    auto rate = [&](Path& path) {
      std::sort(path.seconds.begin(), path.seconds.end());
      const double median = path.seconds[path.seconds.size() / 2];
      return Rate{bytes / median / kGB, path.cpu / options.repeats / (bytes / kGiB)};
    };
    std::vector<Rate> rates;
    for (Path& path : paths) rates.push_back(rate(path));
    const double tcp = rates[1].gbps;
    const double limit = std::min(rates[0].gbps, tcp);
    double best_put = 0;
    double best_get = 0;
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::string& name = paths[i].name;
      double ratio = 0;
      if (name == "tcp+crc" || name.rfind("put", 0) == 0) ratio = rates[i].gbps / limit;
      if (name.rfind("get", 0) == 0) ratio = rates[i].gbps / tcp;
      if (name.rfind("put", 0) == 0) best_put = std::max(best_put, rates[i].gbps);
      if (name.rfind("get", 0) == 0) best_get = std::max(best_get, rates[i].gbps);
      row(name, rates[i], ratio);
    }
    std::printf(
        "%-8s best put / min(memcpy, tcp) = %.2f (goal >= 0.80); best get / tcp = %.2f "
        "(goal >= 0.70)\n\n",
        label, best_put / limit, best_get / tcp);
  }
  std::printf("ratio: tcp+crc and put rows / min(memcpy, tcp); get rows / tcp.\n");
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const size_t n = std::strlen(flag);
      return arg.compare(0, n, flag) == 0 ? arg.c_str() + n : nullptr;
    };
    uint64_t v = 0;
    if (const char* s = value("--repeats="); s && absl::SimpleAtoi(s, &v) && v > 0) {
      options.repeats = static_cast<int>(v);
    } else if (const char* s = value("--max_mib="); s && absl::SimpleAtoi(s, &v) && v >= 64) {
      options.max_mib = v;
    } else if (const char* s = value("--chunk_kib="); s && absl::SimpleAtoi(s, &v)) {
      options.chunk_bytes = v << 10;
    } else if (const char* s = value("--channels=")) {
      options.channels.clear();
      for (absl::string_view part : absl::StrSplit(s, ',')) {
        if (!absl::SimpleAtoi(part, &v) || v < 1 || v > 64) {
          std::fprintf(stderr, "bad --channels\n");
          return 2;
        }
        options.channels.push_back(static_cast<int>(v));
      }
    } else if (const char* s = value("--dir=")) {
      options.dir = s;
    } else if (arg == "--default_malloc") {
      options.default_malloc = true;
    } else {
      std::fprintf(stderr,
                   "usage: transfer_bench [--repeats=R] [--max_mib=M] [--channels=1,4,8] "
                   "[--chunk_kib=1024] [--dir=/dev/shm] [--default_malloc]\n");
      return 2;
    }
  }
  if (!options.default_malloc) tessera::TuneMallocForBulkTransfers();
  tessera::Run(options);
  return 0;
}
