// Cross-node protection per node on this machine, each rate next to the limit measured in the
// same run (issue 4's goals: protection >= 0.8 x min(memcpy, tcp); rebuild >= 0.7 x tcp).
//
// For shards of 64 MiB, 256 MiB, 1, 2 and 4 GiB (up to --max_mib) of random data:
//   memcpy      one thread, the shard into a pre-faulted buffer;
//   tcp         a plain TCP stream on 127.0.0.1 (bench_util's TcpOnce, as transfer_bench);
//   encode      ErasureCodec RS(k, m) parity of the shard on one thread, as the daemon's
//               protection computes it (rate in shard bytes);
//   put         GrpcPeerClient::PutFragment of one fragment (shard / k) into a real tesserad,
//               over the raw TCP data path and over gRPC streams, the two data paths a daemon can
//               use (--data_path picks the one the cluster below uses); each run a newer owner
//               incarnation, so it replaces the last one;
//   protection  real daemons, a loopback cluster of k + m + 1 tesserad processes: a trainer
//               process's client on node 0 snapshots the shard; from the moment node 0's daemon
//               sealed it until every peer acknowledged its fragment sealed, as that daemon logs
//               it ("protected (N bytes) in M ms ...; T ms after it was sealed", read every
//               --poll_ms from its log, so no polling of the peers competes for the CPU); then
//               ListHeld checks, untimed, that the peers hold them; rate in shard bytes;
//   rebuild     node 0 is then lost (SIGTERMed, its directory deleted), and a client on node 1
//               restores the shard: the daemon's PrepareRestore rebuilds it from k fragments.
//               Its own timing (the "rebuilt from k of k+m fragments (N bytes) in M ms" line of
//               its log, CRC32C check included) and the client's whole Restore() (find, rebuild,
//               copy into the trainer's memory, check), which must return the bytes sealed.
// Each is the median of --repeats runs except rebuild (once per size: it needs a lost node).
// Protection also prints its first run apart (an untimed warm-up elsewhere) and every run's time:
// the peers create new segments for the first snapshots and reuse those of the steps they have
// dropped once commits free them (from about the third snapshot on; a peer commits on its own
// timer, so back-to-back snapshots of small shards take one more), which is the steady state.
// A size whose memory (about 6 x the shard under RS(3, 2), in /dev/shm and the heap) is not
// available is skipped, and the line says so.
//
// Usage: protection_bench [--min_mib=64] [--max_mib=4096] [--k=3] [--m=2] [--repeats=3] [--poll_ms=2]
//                         [--data_path=tcp|grpc]
//                         [--tesserad=PATH]   (bazel run -c opt //bench:protection_bench)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "agent/client.h"
#include "bench/bench_daemon.h"
#include "bench/bench_util.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "daemon/transfer/peer_client.h"
#include "ec/erasure_codec.h"
#include "tests/ports.h"

namespace tessera {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kGB = 1e9;

struct Options {
  uint64_t min_mib = 64;
  uint64_t max_mib = 4096;
  int k = 3;
  int m = 2;
  int repeats = 3;
  int poll_ms = 2;
  std::string data_path = "tcp";  // the daemons' peer.data_path
  std::string tesserad;
};

void Check(const absl::Status& status, const std::string& what) {
  if (!status.ok()) BenchDie(what + ": " + status.ToString());
}

// MemAvailable from /proc/meminfo, and the free bytes of /dev/shm, whichever is smaller.
uint64_t AvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  uint64_t available = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") available = kib << 10;
  }
  return available;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

constexpr char kBenchToken[] = "protection-bench-token";  // the cluster's cluster.token

// A loopback cluster of tesserad processes, node 0 first.
class BenchCluster {
 public:
  BenchCluster(const Options& options, uint64_t capacity_bytes) {
    const int n = options.k + options.m + 1;
    for (int i = 0; i < n; ++i) addresses_.push_back(absl::StrCat("127.0.0.1:", tessera::testing::FreePort()));
    for (int i = 0; i < n; ++i) {
      auto d = BenchDaemon::Start(
          options.tesserad, absl::StrCat("pb", i), capacity_bytes, /*crc_threads=*/2,
          {"peer.listen_address=" + addresses_[i],
           "cluster.members=" + absl::StrJoin(addresses_, ","), absl::StrCat("ec.k=", options.k),
           absl::StrCat("ec.m=", options.m), "liveness.heartbeat_ms=100",
           std::string("cluster.token=") + kBenchToken, "peer.data_path=" + options.data_path,
           // Generous: a peer busy receiving a large fragment on 2 cores must not be suspected.
           "liveness.timeout_ms=5000"});
      Check(d.status(), absl::StrCat("starting tesserad pb", i));
      daemons_.push_back(std::move(*d));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(800));  // every node hears the others
  }
  BenchDaemon* node(int i) { return daemons_[i].get(); }
  const std::string& address(int i) const { return addresses_[i]; }
  int size() const { return static_cast<int>(daemons_.size()); }
  // SIGTERM and delete its directory (BenchDaemon's destructor): the node is gone.
  void Lose(int i) { daemons_[i].reset(); }

 private:
  std::vector<std::string> addresses_;
  std::vector<std::unique_ptr<BenchDaemon>> daemons_;
};

std::unique_ptr<Client> Connect(BenchDaemon* daemon) {
  Client::Options o;
  o.socket_path = daemon->socket_path();
  o.use_gpu = false;
  o.when_busy = Client::BusyPolicy::kWait;
  auto client = Client::Connect(o);
  Check(client.status(), "connect to " + daemon->socket_path());
  return std::move(*client);
}

std::vector<Client::Entry> ShardEntries(uint8_t* data, uint64_t bytes) {
  Client::Entry e;
  e.spec.set_name("shard");
  e.spec.set_dtype("uint8");
  e.spec.add_shape(static_cast<int64_t>(bytes));
  e.spec.set_nbytes(bytes);
  e.spec.set_kind(ENTRY_KIND_TENSOR);
  e.data = data;
  return {e};
}

struct Row {
  std::string what;
  double gbps = 0;
  std::string limit;  // "" or what it is compared with
  double ratio = 0;
  double goal = 0;
};

void Print(const std::string& size, const Row& r) {
  if (r.limit.empty()) {
    std::printf("%-8s %-44s %7.2f\n", size.c_str(), r.what.c_str(), r.gbps);
  } else {
    std::printf("%-8s %-44s %7.2f   %-22s %5.2f  %s\n", size.c_str(), r.what.c_str(), r.gbps,
                r.limit.c_str(), r.ratio,
                r.goal > 0 ? absl::StrCat(r.ratio >= r.goal ? "meets" : "MISSES", " >= ",
                                          absl::StrFormat("%.1f", r.goal))
                                 .c_str()
                           : "");
  }
  std::fflush(stdout);
}

void RunSize(const Options& options, uint64_t mib, GrpcPeerClient* peers,
             GrpcPeerClient* grpc_peers) {
  const uint64_t bytes = mib * kBenchMiB;
  const std::string label = mib >= 1024 ? absl::StrCat(mib / 1024, "GiB") : absl::StrCat(mib, "MiB");
  const int k = options.k;
  const int m = options.m;
  // At the peak (protection): the shard in this process, node 0's two slots, its encode scratch
  // (a padded data fragment and m parity fragments), the k + m fragments on the peers and the
  // fragment put before them.
  const uint64_t needed = bytes * 3 + bytes * (2 * m + k + 2) / k + (uint64_t{512} << 20);
  if (AvailableBytes() < needed) {
    std::printf("%-8s skipped: needs about %.1f GiB of memory, %.1f GiB available\n\n",
                label.c_str(), needed / 1073741824.0, AvailableBytes() / 1073741824.0);
    return;
  }
  Buffer shard = RandomBuffer(bytes, mib);
  const uint32_t shard_crc = Crc32c(shard.get(), bytes);
  std::vector<double> memcpy_s, tcp_s, encode_s, put_s, grpc_put_s, protect_s;
  double first_protect_s = 0;  // the first snapshot: the peers create its segments
  std::vector<std::string> protect_ms;  // every run, the first included
  {
    Buffer dst = RandomBuffer(bytes, mib + 1);
    for (int r = 0; r <= options.repeats; ++r) {  // run 0 warms up
      auto t = Clock::now();
      std::memcpy(dst.get(), shard.get(), bytes);
      if (r > 0) memcpy_s.push_back(SecondsSince(t));
      const double tcp = TcpOnce(shard.get(), dst.get(), bytes);
      if (r > 0) tcp_s.push_back(tcp);
    }
    if (std::memcmp(dst.get(), shard.get(), bytes) != 0) BenchDie("tcp: bytes differ");
  }
  {
    auto codec = ErasureCodec::Create(k, m);
    Check(codec.status(), "ErasureCodec");
    const size_t fragment_bytes = ErasureCodec::FragmentBytes(bytes, k);
    Buffer padded = RandomBuffer(static_cast<size_t>(k) * fragment_bytes, 1);
    std::memcpy(padded.get(), shard.get(), bytes);
    std::memset(padded.get() + bytes, 0, k * fragment_bytes - bytes);
    Buffer parity = RandomBuffer(static_cast<size_t>(m) * fragment_bytes, 2);
    std::vector<const uint8_t*> data;
    std::vector<uint8_t*> out;
    for (int i = 0; i < k; ++i) data.push_back(padded.get() + i * fragment_bytes);
    for (int i = 0; i < m; ++i) out.push_back(parity.get() + i * fragment_bytes);
    for (int r = 0; r <= options.repeats; ++r) {
      auto t = Clock::now();
      Check(codec->Encode(data.data(), out.data(), fragment_bytes), "Encode");
      if (r > 0) encode_s.push_back(SecondsSince(t));
    }
  }

  const uint64_t fragment_bytes = ErasureCodec::FragmentBytes(bytes, k);
  BenchCluster cluster(options, bytes * 3 + 4 * fragment_bytes + (uint64_t{256} << 20));
  {
    // One fragment into node 1's peer service, as protection sends it.
    FragmentMeta meta;
    meta.ec_k = k;
    meta.ec_m = m;
    meta.fragment_bytes = fragment_bytes;
    meta.shard_bytes = bytes;
    meta.shard_crc32c = shard_crc;
    const FragmentKey key{"bench-put", 0, 1, 0};
    uint64_t incarnation = 0;
    for (int r = 0; r <= options.repeats; ++r) {
      for (GrpcPeerClient* client : {peers, grpc_peers}) {
        meta.owner_incarnation = ++incarnation;
        auto t = Clock::now();
        auto put = client->PutFragment(cluster.address(1), key, meta, shard.get(), fragment_bytes);
        const double s = SecondsSince(t);
        Check(put.status(), "PutFragment");
        if (put->fragment_crc32c != Crc32c(shard.get(), fragment_bytes)) {
          BenchDie("put: CRC differs");
        }
        if (r > 0) (client == peers ? put_s : grpc_put_s).push_back(s);
      }
    }
    if (peers->stats().raw_puts == 0 || grpc_peers->stats().grpc_puts == 0) {
      BenchDie("put: the data paths were not the ones asked for");
    }
  }

  // Protection, end to end.
  const std::string job = "bench-protect";
  auto owner = Connect(cluster.node(0));
  Check(owner->Register(job, 0, 1, ShardEntries(shard.get(), bytes)), "Register");
  int64_t step = 0;
  int degraded = 0;  // runs placed on fewer nodes (a member was suspected meanwhile)
  for (int r = 0; r <= options.repeats; ++r) {
    ++step;
    auto outcome = owner->Snapshot(step);
    Check(outcome.status(), "Snapshot");
    Check(owner->Wait(), "Wait");
    // The owner's daemon logs when every fragment is acknowledged sealed, and how long after the
    // seal (its own clock, so no polling of the peers competes with the transfer for the CPU).
    const std::regex protected_re(absl::StrCat(
        "rank 0 step ", step,
        ": protected \\(([0-9]+) bytes\\) in ([0-9]+) ms, RS\\(([0-9]+), ([0-9]+)\\) on [^;]*; "
        "([0-9]+) ms after it was sealed"));
    const auto sealed = Clock::now();
    std::smatch found;
    std::string log;
    while (true) {
      log = cluster.node(0)->Log();
      if (std::regex_search(log, found, protected_re)) break;
      if (SecondsSince(sealed) > 600) BenchDie("protection did not finish in 10 minutes");
      std::this_thread::sleep_for(std::chrono::milliseconds(options.poll_ms));
    }
    const uint32_t wanted = std::stoul(found[3].str()) + std::stoul(found[4].str());
    const double protect_seconds = std::max(1.0, std::stod(found[5].str())) / 1000.0;
    // Checked, not timed: the peers hold as many sealed fragments as the placement made.
    std::set<int> done;
    for (int node = 1; node < cluster.size(); ++node) {
      auto held = peers->ListHeld(cluster.address(node), job);
      Check(held.status(), "ListHeld");
      for (const FragmentStatus& f : held->fragments) {
        if (f.key.step == step && f.state == SegmentState::kSealed) done.insert(node);
      }
    }
    if (done.size() != wanted) {
      BenchDie(absl::StrCat("step ", step, ": ", done.size(), " peers hold a sealed fragment, ",
                            wanted, " were acknowledged"));
    }
    if (wanted < static_cast<uint32_t>(k + m)) ++degraded;
    protect_ms.push_back(found[5].str());
    if (r == 0) first_protect_s = protect_seconds;
    if (r > 0) protect_s.push_back(protect_seconds);
  }
  Check(owner->Close(), "Close");
  owner.reset();

  // Rebuild: node 0 is lost; node 1 restores the rank.
  cluster.Lose(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(6000));  // suspected everywhere
  std::memset(shard.get(), 0x5a, bytes);  // the restore must write every byte
  auto restorer = Connect(cluster.node(1));
  Check(restorer->Register(job, 0, 1, ShardEntries(shard.get(), bytes)), "Register on node 1");
  const auto restore_start = Clock::now();
  auto restored = restorer->Restore(-1);
  const double restore_s = SecondsSince(restore_start);
  Check(restored.status(), "Restore on node 1");
  if (*restored != step) BenchDie(absl::StrCat("restored step ", *restored, ", not ", step));
  if (Crc32c(shard.get(), bytes) != shard_crc) BenchDie("the rebuilt shard differs");
  const std::string log = cluster.node(1)->Log();
  std::smatch match;
  const std::regex re(
      "rebuilt from ([0-9]+) of ([0-9]+) fragments \\(([0-9]+) bytes\\) in ([0-9]+) ms"
      "( \\(reading [0-9]+ ms, decoding [0-9]+ ms, checking [0-9]+ ms\\))?");
  if (!std::regex_search(log, match, re)) {
    BenchDie("node 1 did not rebuild the shard; its log:\n" + cluster.node(1)->LogTail());
  }
  const double rebuild_s = std::max(1.0, std::stod(match[4].str())) / 1000.0;
  Check(restorer->Close(), "Close");

  const double memcpy_gbps = bytes / Median(memcpy_s) / kGB;
  const double tcp_gbps = bytes / Median(tcp_s) / kGB;
  const double limit = std::min(memcpy_gbps, tcp_gbps);
  const std::string limit_name = memcpy_gbps < tcp_gbps ? "memcpy" : "tcp";
  const double encode_gbps = bytes / Median(encode_s) / kGB;
  const double put_gbps = fragment_bytes / Median(put_s) / kGB;
  const double grpc_put_gbps = fragment_bytes / Median(grpc_put_s) / kGB;
  const double protect_gbps = bytes / Median(protect_s) / kGB;
  const double rebuild_gbps = bytes / rebuild_s / kGB;
  const double restore_gbps = bytes / restore_s / kGB;
  const std::string rs = absl::StrCat("RS(", k, ", ", m, ")");
  Print(label, {"memcpy, 1 thread", memcpy_gbps});
  Print(label, {"tcp loopback stream", tcp_gbps});
  Print(label, {"encode " + rs + ", 1 thread (shard bytes)", encode_gbps, "memcpy",
                encode_gbps / memcpy_gbps});
  Print(label, {absl::StrCat("put one fragment (", fragment_bytes >> 20, " MiB), raw TCP path"),
                put_gbps, "tcp", put_gbps / tcp_gbps});
  Print(label, {absl::StrCat("put one fragment (", fragment_bytes >> 20, " MiB), gRPC streams"),
                grpc_put_gbps, "tcp", grpc_put_gbps / tcp_gbps});
  const double first_protect_gbps = bytes / first_protect_s / kGB;
  Print(label, {"protection, first snapshot (new segments)", first_protect_gbps,
                "min(memcpy, tcp) = " + limit_name, first_protect_gbps / limit});
  Print(label, {"protection: sealed -> k+m fragments sealed", protect_gbps,
                "min(memcpy, tcp) = " + limit_name, protect_gbps / limit, 0.8});
  std::printf("%-8s   (each run in ms, the first included: %s)\n", label.c_str(),
              absl::StrJoin(protect_ms, " ").c_str());
  if (degraded > 0) {
    std::printf("%-8s (%d of %d runs placed with a smaller k: a member was suspected meanwhile)\n",
                label.c_str(), degraded, options.repeats + 1);
  }
  Print(label, {absl::StrCat("rebuild from ", match[1].str(), " of ", match[2].str(),
                             " in the daemon (", match[4].str(), " ms)"),
                rebuild_gbps, "tcp", rebuild_gbps / tcp_gbps, 0.7});
  if (match[5].matched) std::printf("%-8s   %s\n", label.c_str(), match[5].str().c_str() + 1);
  Print(label, {"Restore() on the new node, whole", restore_gbps, "tcp", restore_gbps / tcp_gbps});
  std::printf("\n");
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
    if (const char* s = value("--max_mib="); s && absl::SimpleAtoi(s, &v) && v >= 64) {
      options.max_mib = v;
    } else if (const char* s = value("--min_mib="); s && absl::SimpleAtoi(s, &v)) {
      options.min_mib = v;
    } else if (const char* s = value("--k="); s && absl::SimpleAtoi(s, &v) && v >= 1) {
      options.k = static_cast<int>(v);
    } else if (const char* s = value("--m="); s && absl::SimpleAtoi(s, &v) && v >= 1) {
      options.m = static_cast<int>(v);
    } else if (const char* s = value("--repeats="); s && absl::SimpleAtoi(s, &v) && v >= 1) {
      options.repeats = static_cast<int>(v);
    } else if (const char* s = value("--poll_ms="); s && absl::SimpleAtoi(s, &v)) {
      options.poll_ms = static_cast<int>(v);
    } else if (const char* s = value("--data_path=");
               s && (std::string(s) == "tcp" || std::string(s) == "grpc")) {
      options.data_path = s;
    } else if (const char* s = value("--tesserad=")) {
      options.tesserad = s;
    } else {
      std::fprintf(stderr,
                   "usage: protection_bench [--min_mib=64] [--max_mib=4096] [--k=3] [--m=2] [--repeats=3] "
                   "[--poll_ms=2] [--data_path=tcp|grpc] [--tesserad=PATH]\n");
      return 2;
    }
  }
  if (options.tesserad.empty()) {
    // bazel run: the daemon is in the runfiles next to this binary.
    const std::string self = argv[0];
    for (const std::string& candidate :
         {self + ".runfiles/tessera/daemon/tesserad", std::string("daemon/tesserad")}) {
      if (access(candidate.c_str(), X_OK) == 0) {
        options.tesserad = candidate;
        break;
      }
    }
    if (options.tesserad.empty()) tessera::BenchDie("no tesserad found: pass --tesserad=PATH");
  }
  tessera::SetLogLevel("warn").IgnoreError();
  tessera::TuneMallocForBulkTransfers();
  // The put rows call the daemons as a peer would: with the cluster's token.
  tessera::GrpcPeerClient::Options raw_options;
  raw_options.token = tessera::kBenchToken;
  raw_options.self_node_id = "bench-client";  // the writer a fragment write names
  auto peers = tessera::GrpcPeerClient::Create(raw_options);
  tessera::Check(peers.status(), "GrpcPeerClient");
  tessera::GrpcPeerClient::Options grpc_options = raw_options;
  grpc_options.raw_data_path = false;
  auto grpc_peers = tessera::GrpcPeerClient::Create(grpc_options);
  tessera::Check(grpc_peers.status(), "GrpcPeerClient");
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  std::printf(
      "protection_bench on %s: %u hardware threads; RS(%d, %d) over %d local tesserad processes "
      "(loopback, peer.data_path = %s); median of %d runs; GB/s = 10^9 bytes/s\n"
      "goals (issue 4): protection >= 0.8 x min(memcpy, tcp); rebuild >= 0.7 x tcp\n\n",
      host, std::thread::hardware_concurrency(), options.k, options.m, options.k + options.m + 1,
      options.data_path.c_str(), options.repeats);
  std::printf("%-8s %-44s %7s   %-22s %5s\n", "shard", "what", "GB/s", "limit (same run)", "ratio");
  std::printf("%s\n", std::string(100, '-').c_str());
  for (uint64_t mib : {64, 256, 1024, 2048, 4096}) {
    if (mib >= options.min_mib && mib <= options.max_mib) tessera::RunSize(options, mib, peers->get(), grpc_peers->get());
  }
  return 0;
}
