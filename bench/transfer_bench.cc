// Fragment transfer rate on loopback next to the limits measured in the same run.
//
// For fragments of 64 MiB .. 1 GiB of random data, prints:
//   memcpy     one thread, heap to pre-faulted heap;
//   tcp        a plain TCP stream on 127.0.0.1: 4 MiB writes, 64 KiB reads into a pre-faulted
//              buffer, 4 MiB socket buffers (the tuned limit of the network path);
//   tcp+crc    the same stream carrying what any checked path must compute: CRC32C of each chunk
//              on the sender before it is written and on the receiver once it has arrived
//              (received straight into the destination): the ceiling of a raw TCP data plane;
//   aes-gcm    one thread sealing the bytes in AES-256-GCM records, memory to memory (the
//              cipher's own limit here: what encrypting the raw data path must spend);
//   aes-gcm pool  the same in records of 256 KiB on the cipher pool's threads (what the
//              encrypted data path seals and opens with: --cipher_threads, by default a daemon's
//              cluster.tls_cipher_threads (8), shared here by both ends of every connection:
//              each end has the pool a daemon has, but both ends share one machine's cores, and
//              a pool of as many threads as cores took them from the connections' own threads
//              (on the 16-core GPU machine four encrypted connections moved 0.69-0.96 of the
//              plain ones with 16 threads, 0.93-1.08 with 8, alternated in one call);
//   put Nch    GrpcPeerClient::PutFragment into a PeerService over a FragmentStore in /dev/shm
//              (both in this process), N channels per peer: the data path of protection,
//              from CRC per chunk on the sender to the sealed fragment in shared memory, over
//              gRPC streams (peer.data_path = grpc);
//   get Nch    GrpcPeerClient::GetFragment of the sealed fragment into a pre-faulted buffer
//              (the data path of a rebuild);
//   raw put / raw get Nch      the same over the raw TCP data path, version 1 (plain: a
//              cluster with a token and no TLS);
//   tls put / tls get Nch      the same over the raw TCP data path, version 2 (AES-256-GCM
//              records: a cluster with mutual TLS; the gRPC calls that open it run over TLS with
//              certificates made for the run), in the same rounds as the plain rows, with the
//              ratio of each to its plain row;
//   tls-grpc put / get Nch     gRPC streams over mutual TLS (what a TLS cluster's fragments
//              take with peer.data_path = grpc), with the ratio to the plain gRPC row;
// each the median of R runs, in GB/s (10^9 bytes/s), with CPU seconds per GiB of both sides
// together (the whole process: sender and receiver share the machine's cores, as in tcp), and
// the ratio of the best put to min(memcpy, tcp) (issue 4's protection goal: >= 0.8) and of the
// best get to tcp (rebuild goal: >= 0.7); a tls row's ratio is to the raw row of the same
// channels, a tls-grpc row's to the plain gRPC row (the cost of encryption).
//
// Puts run in the steady state: the fragment is dropped after each run and its segment recycled
// by the next one, as when each step's fragments replace the previous step's. The first run of
// every path (which creates segments and connections) is untimed, and the paths are sampled
// round-robin (one run of each per round), so load from elsewhere drifts into all of them alike.
//
// The process runs with TuneMallocForBulkTransfers, as tesserad should (--default_malloc: not).
//
// Usage: transfer_bench [--repeats=R] [--max_mib=M] [--channels=1,4,8] [--chunk_kib=1024]
//                       [--dir=/dev/shm] [--default_malloc] [--paths=grpc,raw,tls,tls-grpc]
//                       [--cipher_threads=8] [--cipher_nice=5] [--record_kib=256]
//                       [--cipher_library=auto|openssl|ipsec-mb]
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
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/cipher_pool.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/data_path.h"
#include "daemon/transfer/data_path_crypto.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"
#include "daemon/transfer/test_certificates.h"
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
  std::vector<std::string> paths = {"grpc", "raw", "tls", "tls-grpc"};
  int cipher_threads = kDefaultCipherThreads;
  int cipher_nice = kDefaultCipherNice;     // the cipher pool's threads' nice value
  size_t record_bytes = size_t{256} << 10;  // records sealed on the pool
  std::string cipher_library = "auto";      // as cluster.tls_cipher_library
  bool Has(const std::string& path) const {
    return std::find(paths.begin(), paths.end(), path) != paths.end();
  }
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

// How a fixture's peer moves fragments: gRPC streams only (plain, or over mutual TLS), or a raw
// data path (plain, or encrypted with its gRPC port on mutual TLS).
enum class PeerPath { kGrpc, kRaw, kTls, kTlsGrpc };

class PeerFixture {
 public:
  // `ca` (kTls only) issues the server's certificate.
  PeerFixture(const Options& options, PeerPath path, TestCa* ca) {
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
    std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
    if (path == PeerPath::kRaw || path == PeerPath::kTls) {
      DataPathServer::Options dpo;
      dpo.host = "127.0.0.1";
      dpo.encrypt = path == PeerPath::kTls;
      auto data = DataPathServer::Start(store_.get(), dpo);
      Check(data.status(), "DataPathServer::Start");
      data_path_ = std::move(*data);
      so.data_path_port = data_path_->port();
      so.data_path_version = data_path_->version();
      so.data_path_session_key = [server = data_path_.get()](const std::string& node_id) {
        return server->SessionKeyFor(node_id);
      };
    }
    if (path == PeerPath::kTls || path == PeerPath::kTlsGrpc) {
      auto files = ca->IssueNode("bench-node");
      Check(files.status(), "a certificate");
      credentials = PeerServerCredentials(*files);
    }
    service_ = std::make_unique<PeerService>(store_.get(), nullptr, so);
    grpc::ServerBuilder builder;
    PeerService::ConfigureServerBuilder(&builder);
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    if (!server_ || port == 0) Die("cannot start the gRPC server");
    address_ = "127.0.0.1:" + std::to_string(port);
  }

  ~PeerFixture() {
    server_->Shutdown();
    server_.reset();
    service_.reset();
    if (data_path_) data_path_->Stop();
    store_.reset();
    std::filesystem::remove_all(root_);
  }

  FragmentStore* store() { return store_.get(); }
  const std::string& address() const { return address_; }
  // Raw data path connections accepted so far (each a TCP connect, and a key exchange when
  // encrypted): a path that keeps its connections adds none after its warm-up.
  uint64_t connections_accepted() const {
    return data_path_ ? data_path_->stats().connections_accepted : 0;
  }

 private:
  std::string root_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> store_;
  std::unique_ptr<DataPathServer> data_path_;
  std::unique_ptr<PeerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

// `credentials`: null for insecure; with them the client is node "bench-client" and takes only
// an encrypted raw data path.
std::unique_ptr<GrpcPeerClient> MakeClient(
    int channels, size_t chunk_bytes, std::shared_ptr<ClusterCredentials> credentials = nullptr) {
  GrpcPeerClient::Options o;
  o.channels_per_peer = channels;
  o.chunk_bytes = chunk_bytes;
  o.min_range_bytes = std::max<size_t>(8 * kMiB, chunk_bytes);
  o.max_attempts = 1;
  o.self_node_id = "bench-client";
  if (credentials) {
    o.credentials = std::move(credentials);
    o.encrypted_data_path_only = true;
  }
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
      "together; chunks of %zu KiB; cipher pool of %d threads at nice %d, sealing records of "
      "%zu KiB with %s; for tls rows, the time per GiB the data path's threads waited for "
      "records to be sealed and opened, for their sockets to send and receive mid-range, and "
      "for answers (ms/GiB), and the longest of each wait in any round (ms); for raw and tls rows, "
      "the slowest and fastest round, with the segments the host's TCP retransmitted and queued "
      "out of order in each (over loopback: packets reordered between cores), the process's "
      "page faults and its threads' involuntary context switches in each, and the connections "
      "made in the rounds\n\n",
      std::thread::hardware_concurrency(), options.repeats, options.chunk_bytes >> 10,
      CipherPool::Shared().threads(), options.cipher_nice, SealedRecordBytes() >> 10,
      GcmLibraryDescription(CurrentGcmLibrary()).c_str());
  std::printf("%-8s %-16s %7s %9s %7s\n", "fragment", "path", "GB/s", "cpu-s/GiB", "ratio");
  std::printf("------------------------------------------------------\n");

  // Certificates for the tls rows, made for this run.
  char cert_dir[] = "/tmp/tessera-transfer-bench-certs-XXXXXX";
  if (mkdtemp(cert_dir) == nullptr) Die("mkdtemp for certificates");
  auto ca = TestCa::Create(cert_dir);
  Check(ca.status(), "a test CA");
  auto client_files = (*ca)->IssueNode("bench-client");
  Check(client_files.status(), "a client certificate");
  // One peer per path, each with its clients: (name prefix, peer, channels, client).
  struct Target {
    std::string prefix;
    std::unique_ptr<PeerFixture> peer;
    std::vector<std::pair<int, std::unique_ptr<GrpcPeerClient>>> clients;
  };
  std::vector<Target> targets;
  for (const std::string& path : options.paths) {
    Target t;
    t.prefix = path == "grpc" ? "" : path + " ";
    const PeerPath kind = path == "grpc"  ? PeerPath::kGrpc
                          : path == "raw" ? PeerPath::kRaw
                          : path == "tls" ? PeerPath::kTls
                                          : PeerPath::kTlsGrpc;
    t.peer = std::make_unique<PeerFixture>(options, kind, ca->get());
    const bool tls = kind == PeerPath::kTls || kind == PeerPath::kTlsGrpc;
    for (int n : options.channels) {
      t.clients.emplace_back(n, MakeClient(n, options.chunk_bytes,
                                           tls ? ClusterCredentials::Tls(*client_files) : nullptr));
    }
    targets.push_back(std::move(t));
  }

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
        std::printf("%-8s %-16s %7.2f %9.2f %7.2f\n", label, path.c_str(), r.gbps, r.cpu_s_per_gib,
                    ratio);
      } else {
        std::printf("%-8s %-16s %7.2f %9.2f %7s\n", label, path.c_str(), r.gbps, r.cpu_s_per_gib,
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
      // Per round, in the order run: the host's TCP segments retransmitted and queued out of
      // order while it ran.
      std::vector<HostTcpCounters> tcp;
      std::vector<ProcessCounters> process;  // the same for the process's page faults, preemptions
      double cpu = 0;
      DataPathWaits waits;          // summed over the timed runs
      PeerFixture* peer = nullptr;  // a raw or tls row's server
      uint64_t connections = 0;     // raw data path connections it accepted in the timed runs
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
    if (options.Has("tls") || options.Has("tls-grpc")) {
      // The cipher alone: seal the bytes in records of a chunk, 256 KiB at a time, into a
      // buffer that stays in the cache (as the data path does before each send).
      paths.push_back({"aes-gcm", [&] {
                         RecordSealer sealer(std::string(32, 'k'), "bench");
                         std::vector<uint8_t> out(256 << 10);
                         uint8_t header[kRecordHeaderBytes];
                         uint8_t tag[kRecordTagBytes];
                         const auto start = std::chrono::steady_clock::now();
                         for (size_t pos = 0; pos < bytes;) {
                           const size_t record = std::min(options.chunk_bytes, bytes - pos);
                           Check(sealer.Begin(record, header), "Begin");
                           for (size_t done = 0; done < record;) {
                             const size_t n = std::min(out.size(), record - done);
                             sealer.Update(src.get() + pos + done, out.data(), n);
                             done += n;
                           }
                           Check(sealer.Finish(tag), "Finish");
                           pos += record;
                         }
                         return Since(start);
                       }});
      paths.push_back({"aes-gcm pool", [&] {
                         CipherPool& pool = CipherPool::Shared();
                         constexpr size_t kRecord = size_t{256} << 10;
                         CipherJobs jobs;
                         const std::string key(32, 'k');
                         const auto start = std::chrono::steady_clock::now();
                         for (size_t pos = 0; pos < bytes; pos += kRecord) {
                           jobs.Add();
                           pool.Run([&, pos] {
                             thread_local std::vector<uint8_t> out(kRecord + 64);
                             SealRecordAt(key, pos / kRecord, src.get() + pos,
                                          std::min(kRecord, bytes - pos), out.data());
                             jobs.Done(true, 0, 0);
                           });
                         }
                         uint64_t sequence = 0;
                         size_t failed = 0;
                         jobs.Wait(&sequence, &failed);
                         return Since(start);
                       }});
    }
    // Puts go to put_key, dropped after each (its segment is recycled by the next put); gets
    // read get_key, sealed once.
    const FragmentKey put_key{"bench", 0, ++step, 0};
    const FragmentKey get_key{"bench", 0, ++step, 1};
    for (Target& t : targets) {
      PeerFixture* peer = t.peer.get();
      Check(t.clients[0]
                .second->PutFragment(peer->address(), get_key, meta, src.get(), bytes)
                .status(),
            "PutFragment");
      for (auto& [channels, client] : t.clients) {
        GrpcPeerClient* c = client.get();
        paths.push_back({t.prefix + "put " + std::to_string(channels) + "ch",
                         [&, c, peer] {
                           const auto start = std::chrono::steady_clock::now();
                           auto status =
                               c->PutFragment(peer->address(), put_key, meta, src.get(), bytes);
                           const double seconds = Since(start);
                           Check(status.status(), "PutFragment");
                           if (status->fragment_crc32c != src_crc) {
                             Die("PutFragment: CRC differs");
                           }
                           return seconds;
                         },
                         [&, peer] {
                           Check(peer->store()->DropFragment(put_key), "DropFragment");
                         }});
        paths.back().peer = peer;
        paths.push_back({t.prefix + "get " + std::to_string(channels) + "ch", [&, c, peer] {
                           const auto start = std::chrono::steady_clock::now();
                           auto status =
                               c->GetFragment(peer->address(), get_key, 0, dst.get(), bytes);
                           const double seconds = Since(start);
                           Check(status.status(), "GetFragment");
                           return seconds;
                         }});
        paths.back().peer = peer;
      }
    }
    for (Path& path : paths) {  // warm-up: connections, segments, page tables
      path.sample();
      if (path.after) path.after();
    }
    for (int r = 0; r < options.repeats; ++r) {
      for (Path& path : paths) {
        const double cpu0 = CpuSeconds();
        ResetLongestDataPathWaits();
        const DataPathWaits waits0 = DataPathWaitTotals();
        const uint64_t connections0 = path.peer ? path.peer->connections_accepted() : 0;
        const HostTcpCounters tcp0 = ReadHostTcpCounters();
        const ProcessCounters process0 = ReadProcessCounters();
        path.seconds.push_back(path.sample());
        const ProcessCounters process1 = ReadProcessCounters();
        const HostTcpCounters tcp1 = ReadHostTcpCounters();
        path.process.push_back(
            {process1.page_faults - process0.page_faults, process1.preempted - process0.preempted});
        path.tcp.push_back(
            {tcp1.retransmitted - tcp0.retransmitted, tcp1.out_of_order - tcp0.out_of_order});
        if (path.peer) path.connections += path.peer->connections_accepted() - connections0;
        path.cpu += CpuSeconds() - cpu0;
        const DataPathWaits waits1 = DataPathWaitTotals();
        path.waits.seal_ns += waits1.seal_ns - waits0.seal_ns;
        path.waits.open_ns += waits1.open_ns - waits0.open_ns;
        path.waits.send_ns += waits1.send_ns - waits0.send_ns;
        path.waits.recv_ns += waits1.recv_ns - waits0.recv_ns;
        path.waits.reply_ns += waits1.reply_ns - waits0.reply_ns;
        for (auto [longest, now] :
             {std::pair{&path.waits.longest_seal_ns, waits1.longest_seal_ns},
              std::pair{&path.waits.longest_open_ns, waits1.longest_open_ns},
              std::pair{&path.waits.longest_send_ns, waits1.longest_send_ns},
              std::pair{&path.waits.longest_recv_ns, waits1.longest_recv_ns},
              std::pair{&path.waits.longest_reply_ns, waits1.longest_reply_ns}}) {
          *longest = std::max(*longest, now);
        }
        if (path.after) path.after();
      }
    }
    // The bytes arrived intact: the last put of each path, and the last get into dst.
    for (Target& t : targets) {
      PeerFixture& peer = *t.peer;
      Check(t.clients.back()
                .second->PutFragment(peer.address(), put_key, meta, src.get(), bytes)
                .status(),
            "PutFragment");
      auto view = peer.store()->Get(put_key);
      Check(view.status(), "Get");
      if (std::memcmp(view->data(), src.get(), bytes) != 0) Die("PutFragment: bytes differ");
      Check(peer.store()->DropFragment(put_key), "DropFragment");
      Check(peer.store()->DropFragment(get_key), "DropFragment");
      const GrpcPeerClient::Stats stats = t.clients.back().second->stats();
      const bool grpc = t.prefix.empty() || t.prefix == "tls-grpc ";
      if (grpc ? stats.raw_puts != 0 : stats.grpc_puts + stats.grpc_gets != 0) {
        Die("a path took another way than its rows say");
      }
    }
    if (std::memcmp(dst.get(), src.get(), bytes) != 0) Die("GetFragment: bytes differ");

    // The slowest and the fastest round with what the host's TCP and the process's threads cost
    // in each, before the rounds are sorted for the median.
    auto spread = [&](const Path& path) {
      const auto [slow, fast] = std::minmax_element(path.seconds.begin(), path.seconds.end(),
                                                    [](double a, double b) { return a > b; });
      const size_t s = slow - path.seconds.begin();
      const size_t f = fast - path.seconds.begin();
      return absl::StrFormat(
          "rounds %.2f-%.2f GB/s (TCP segments retransmitted %d-%d, out of order %d-%d; page "
          "faults %d-%d; threads preempted %d-%d), %d connections made",
          bytes / *slow / kGB, bytes / *fast / kGB, path.tcp[s].retransmitted,
          path.tcp[f].retransmitted, path.tcp[s].out_of_order, path.tcp[f].out_of_order,
          path.process[s].page_faults, path.process[f].page_faults, path.process[s].preempted,
          path.process[f].preempted, path.connections);
    };
    std::vector<std::string> spreads;
    for (const Path& path : paths) spreads.push_back(spread(path));
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
    auto rate_of = [&](const std::string& name) {
      for (size_t i = 0; i < paths.size(); ++i) {
        if (paths[i].name == name) return rates[i].gbps;
      }
      return 0.0;
    };
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::string& name = paths[i].name;
      // "put 4ch", "raw put 4ch", "tls put 4ch", "tls-grpc put 4ch": the operation and channels
      // after the path's prefix.
      const bool tls = name.rfind("tls ", 0) == 0;
      const bool tls_grpc = name.rfind("tls-grpc ", 0) == 0;
      const std::string op = tls_grpc                                       ? name.substr(9)
                             : name.rfind("raw ", 0) == 0 || tls ? name.substr(4)
                                                                          : name;
      double ratio = 0;
      if (tls || tls_grpc) {
        const double plain = rate_of(tls ? "raw " + op : op);
        ratio = plain > 0 ? rates[i].gbps / plain : 0;
      } else if (name == "tcp+crc" || op.rfind("put", 0) == 0) {
        ratio = rates[i].gbps / limit;
      } else if (op.rfind("get", 0) == 0) {
        ratio = rates[i].gbps / tcp;
      } else if (name.rfind("aes-gcm", 0) == 0) {
        ratio = rates[i].gbps / rates[0].gbps;
      }
      if (op.rfind("put", 0) == 0) best_put = std::max(best_put, rates[i].gbps);
      if (op.rfind("get", 0) == 0) best_get = std::max(best_get, rates[i].gbps);
      row(name, rates[i], ratio);
      const std::string& spread = spreads[i];
      if (tls) {
        const double gib = options.repeats * (bytes / kGiB);
        const DataPathWaits& w = paths[i].waits;
        std::printf(
            "%-8s   waits ms/GiB: seal %.1f, open %.1f, send %.1f, recv %.1f, reply %.1f; longest "
            "ms: %.1f, %.1f, %.1f, %.1f, %.1f; %s\n",
            label, w.seal_ns / 1e6 / gib, w.open_ns / 1e6 / gib, w.send_ns / 1e6 / gib,
            w.recv_ns / 1e6 / gib, w.reply_ns / 1e6 / gib, w.longest_seal_ns / 1e6,
            w.longest_open_ns / 1e6, w.longest_send_ns / 1e6, w.longest_recv_ns / 1e6,
            w.longest_reply_ns / 1e6, spread.c_str());
      } else if (paths[i].peer != nullptr && name.rfind("raw ", 0) == 0) {
        std::printf("%-8s   %s\n", label, spread.c_str());
      }
    }
    std::printf(
        "%-8s best put / min(memcpy, tcp) = %.2f (goal >= 0.80); best get / tcp = %.2f "
        "(goal >= 0.70)\n\n",
        label, best_put / limit, best_get / tcp);
  }
  std::printf(
      "ratio: tcp+crc, put and raw put rows / min(memcpy, tcp); get and raw get rows / tcp; "
      "aes-gcm rows / memcpy; tls rows / the raw row of the same operation and channels; tls-grpc "
      "rows / the gRPC row.\n");
  std::filesystem::remove_all(cert_dir);
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
    } else if (const char* s = value("--cipher_threads=");
               s && absl::SimpleAtoi(s, &v) && v >= 1 && v <= tessera::kMaxCipherThreads) {
      options.cipher_threads = static_cast<int>(v);
    } else if (const char* s = value("--cipher_nice="); s && absl::SimpleAtoi(s, &v) && v <= 19) {
      options.cipher_nice = static_cast<int>(v);
    } else if (const char* s = value("--record_kib=");
               s && absl::SimpleAtoi(s, &v) && v >= 32 && v <= 4096) {
      options.record_bytes = v << 10;
    } else if (const char* s = value("--cipher_library="); s && tessera::ParseGcmLibrary(s).ok()) {
      options.cipher_library = s;
    } else if (arg == "--default_malloc") {
      options.default_malloc = true;
    } else if (const char* s = value("--paths=")) {
      options.paths.clear();
      for (absl::string_view part : absl::StrSplit(s, ',')) {
        if (part != "grpc" && part != "raw" && part != "tls" && part != "tls-grpc") {
          std::fprintf(stderr, "bad --paths: grpc, raw, tls and tls-grpc\n");
          return 2;
        }
        options.paths.emplace_back(part);
      }
    } else {
      std::fprintf(stderr,
                   "usage: transfer_bench [--repeats=R] [--max_mib=M] [--channels=1,4,8] "
                   "[--chunk_kib=1024] [--dir=/dev/shm] [--default_malloc] "
                   "[--paths=grpc,raw,tls,tls-grpc] [--cipher_threads=1..64] "
                   "[--cipher_nice=0..19] [--record_kib=32..4096] "
                   "[--cipher_library=auto|openssl|ipsec-mb]\n");
      return 2;
    }
  }
  if (!options.default_malloc) tessera::TuneMallocForBulkTransfers();
  tessera::CipherPool::Configure(options.cipher_threads, options.cipher_nice);
  tessera::SetSealedRecordBytes(options.record_bytes);
  absl::StatusOr<tessera::GcmLibrary> library = tessera::ParseGcmLibrary(options.cipher_library);
  absl::Status s = library.ok() ? tessera::UseGcmLibrary(*library) : library.status();
  if (!s.ok()) {
    std::fprintf(stderr, "--cipher_library=%s: %s\n", options.cipher_library.c_str(),
                 std::string(s.message()).c_str());
    return 2;
  }
  tessera::Run(options);
  return 0;
}
