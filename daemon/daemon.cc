#include "daemon/daemon.h"

#include <dirent.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/coordination/job_state_journal.h"
#include "daemon/transfer/cipher_pool.h"
#include "daemon/transfer/data_path_crypto.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace tessera {
namespace {

// Where this node's job state files are kept (store.state_directory, else its store directory).
std::string JobStateDirectory(const DaemonConfig& config, const std::string& node_id) {
  const std::string& root =
      config.store.state_directory.empty() ? config.store.directory : config.store.state_directory;
  return root + "/" + node_id;
}

// Shared memory must be memory: a tmpfs or a hugetlbfs, as large as the capacity asked for.
absl::Status CheckStoreFilesystem(const std::string& dir, uint64_t capacity,
                                  const std::string& policy) {
  struct statfs fs;
  if (statfs(dir.c_str(), &fs) != 0) return ErrnoStatus(errno, "statfs " + dir);
  constexpr int64_t kTmpfsMagic = 0x01021994;
  constexpr int64_t kHugetlbfsMagic = 0x958458f6;
  const int64_t type = static_cast<int64_t>(fs.f_type);
  const uint64_t size = static_cast<uint64_t>(fs.f_blocks) * static_cast<uint64_t>(fs.f_bsize);
  std::vector<std::string> problems;
  if (type != kTmpfsMagic && type != kHugetlbfsMagic) {
    problems.push_back(absl::StrCat(
        "store.directory's filesystem (", dir, ", type 0x", absl::Hex(type),
        ") is not a tmpfs or hugetlbfs: segments there would be written back to disk; use "
        "/dev/shm or a hugetlbfs mount"));
  }
  if (capacity > size) {
    problems.push_back(absl::StrCat("store.capacity_bytes ", capacity,
                                    " exceeds the size of the filesystem of ", dir, " (", size,
                                    " bytes): a snapshot could die of SIGBUS when it fills; set "
                                    "at most ", size, " or enlarge the mount"));
  }
  if (problems.empty()) return absl::OkStatus();
  const std::string all = absl::StrJoin(problems, "; ");
  if (policy == "warn") {
    Logger("daemon")->warn("{} (started anyway: store.filesystem_check = \"warn\")", all);
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat(all, " (store.filesystem_check = \"warn\" starts anyway)"));
}


absl::Status MakeDirectories(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos == dir.size() || dir[pos] == '/') {
      std::string prefix = dir.substr(0, pos);
      if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoStatus(errno, "create directory " + prefix);
      }
    }
  }
  return absl::OkStatus();
}

// The library that seals and opens the encrypted data path's records (cluster.tls_cipher_library).
absl::Status ChooseGcmLibrary(const DaemonConfig::Cluster& cluster) {
  TESSERA_ASSIGN_OR_RETURN(const GcmLibrary library, ParseGcmLibrary(cluster.tls_cipher_library));
  if (absl::Status s = UseGcmLibrary(library); !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cluster.tls_cipher_library = \"", cluster.tls_cipher_library, "\": ", s.message()));
  }
  Logger("daemon")->info("data path records: AES-256-GCM by {} (cluster.tls_cipher_library = {})",
                         GcmLibraryDescription(library), cluster.tls_cipher_library);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonConfig& config) {
  auto log = Logger("daemon");
  std::unique_ptr<Daemon> d(new Daemon());
  d->config_ = config;
  d->started_unix_ms_ = NowUnixMs();
  d->incarnation_ = static_cast<uint64_t>(d->started_unix_ms_);
  TESSERA_ASSIGN_OR_RETURN(d->node_id_, ResolveNodeId(config.node.id));
  const std::string dir = config.store.directory + "/" + d->node_id_;
  TESSERA_RETURN_IF_ERROR(MakeDirectories(dir));

  // One daemon per store directory: a second one would delete the first one's segments.
  const std::string lock_path = dir + "/.lock";
  d->lock_fd_ = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (d->lock_fd_ < 0) return ErrnoStatus(errno, "open " + lock_path);
  if (flock(d->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "another tesserad holds ", dir, " (", lock_path, " is locked); give each daemon its own "
        "node.id or store.directory"));
  }

  uint64_t capacity = static_cast<uint64_t>(config.store.capacity_bytes);
  if (capacity == 0) {
    struct statvfs fs;
    if (statvfs(dir.c_str(), &fs) != 0) return ErrnoStatus(errno, "statvfs " + dir);
    capacity = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize / 2;
    log->info("store.capacity_bytes is 0: using half of the {} free bytes of {}: {} bytes",
              static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize, dir, capacity);
  }
  TESSERA_RETURN_IF_ERROR(CheckStoreFilesystem(dir, capacity, config.store.filesystem_check));
  SnapshotStore::Options options;
  options.directory = dir;
  options.capacity_bytes = capacity;
  options.prefault = config.store.prefault;
  options.crc_threads = config.store.crc_threads;
  options.verify_client_checksums = config.store.seal_checksum == "daemon";
  options.clustered = !config.peer.listen_address.empty();
  TESSERA_ASSIGN_OR_RETURN(d->store_, SnapshotStore::Open(options));

  if (config.peer.listen_address.empty()) {
    d->coordination_ = std::make_unique<Coordination>(d->store_.get());
  } else {
    TESSERA_RETURN_IF_ERROR(d->StartCluster(dir, capacity));
  }
  if (!d->admin_) d->CreateAdmin();
  if (!d->rendezvous_router_) {
    d->rendezvous_router_ = std::make_unique<RendezvousRouter>(&d->rendezvous_table_,
                                                               RendezvousRouter::Options{});
  }
  d->agent_service_ = std::make_unique<AgentService>(d->store_.get(), d->coordination_.get(),
                                                     &d->credentials_, d->rendezvous_router_.get());
  d->admin_unix_service_ = std::make_unique<AdminService>(d->admin_.get(), /*over_tcp=*/false,
                                                          /*token=*/"",
                                                          [credentials = &d->credentials_](
                                                              const std::string& peer) {
                                                            return credentials->Lookup(peer);
                                                          });
  grpc::ServerBuilder builder;
  builder.RegisterService(d->agent_service_.get());
  builder.RegisterService(d->admin_unix_service_.get());
  builder.SetMaxReceiveMessageSize(16 << 20);
  d->agent_server_ = builder.BuildAndStart();
  if (!d->agent_server_) return absl::InternalError("could not start the agent gRPC server");
  TESSERA_ASSIGN_OR_RETURN(
      d->agent_listener_,
      UnixListener::Start(config.agent.socket_path, static_cast<mode_t>(config.agent.socket_mode),
                          d->agent_server_.get(), &d->credentials_,
                          static_cast<int>(config.agent.max_connections_per_uid)));
  if (!config.metrics.listen_address.empty()) {
    TESSERA_ASSIGN_OR_RETURN(d->metrics_server_,
                             MetricsServer::Start(config.metrics.listen_address, &GlobalMetrics()));
    Daemon* raw = d.get();
    d->metrics_collector_ = GlobalMetrics().AddCollector([raw] { return raw->CollectMetrics(); });
    log->info("metrics at http://{}/metrics (port {})", config.metrics.listen_address,
              d->metrics_server_->port());
  }
  SnapshotStore::Stats stats = d->store_->stats();
  log->info("tesserad {} ready: store {} ({} of {} bytes used, {} snapshots re-adopted), agent "
            "socket {}",
            d->node_id_, dir, stats.used_bytes, stats.capacity_bytes, stats.adopted_at_start,
            config.agent.socket_path);
  return d;
}

absl::Status Daemon::StartCluster(const std::string& dir, uint64_t capacity) {
  if (config_.cluster.token.empty()) {
    Logger("daemon")->warn(
        "INSECURE: cluster.insecure = true and no cluster.token: any process that reaches {} "
        "can read and write every job's state and join as a member; set cluster.token_file "
        "outside a private test network",
        config_.peer.listen_address);
  }
  auto log = Logger("daemon");
  const DaemonConfig& config = config_;
  // Every daemon-to-daemon channel made from here on uses the peer port's TLS (or none), and a
  // channel to a member reaches only the daemon whose certificate names it.
  const ClusterTlsFiles tls = ClusterTls(config.cluster);
  SetClusterCredentials(tls.enabled() ? ClusterCredentials::Tls(tls)
                                      : ClusterCredentials::Insecure());
  if (tls.enabled()) {
    log->info("peer port: mutual TLS, certificate {} of node {}, CA {} (read again every {} s)",
              tls.cert_file, node_id_, tls.ca_file, tls.refresh_s);
  }
  TuneMallocForBulkTransfers();
  const uint64_t incarnation = incarnation_;
  // The fragments held for peers are accounted apart from the snapshot slots, against the same
  // store.capacity_bytes.
  fragment_budget_ = std::make_unique<CapacityBudget>(capacity);
  FragmentStore::Options fragment_options;
  fragment_options.directory = dir;
  fragment_options.budget = fragment_budget_.get();
  fragment_options.prefault = config.store.prefault;
  fragment_options.crc_threads = std::max(1, config.store.crc_threads / 2);
  TESSERA_ASSIGN_OR_RETURN(fragments_, FragmentStore::Open(fragment_options));
  shard_source_ = std::make_unique<SnapshotStoreShardSource>(store_.get());

  GrpcPeerClient::Options client_options;
  // A peer that has not answered within the liveness timeout is about to be suspected: give up
  // on it then (data calls add time for their bytes), and let protection re-place the fragment.
  client_options.control_timeout =
      absl::Milliseconds(std::max<int64_t>(1000, config.liveness.timeout_ms));
  client_options.token = config.cluster.token;
  client_options.self_node_id = node_id_;
  // With TLS, fragments travel only encrypted: over the raw data path's version 2, or over gRPC;
  // and only to the member they are for (every bulk call names its node).
  client_options.encrypted_data_path_only = tls.enabled();
  client_options.require_node_id = tls.enabled();
  // Fragments go to a few peers per job: channels stay open for the 64 most recently used.
  client_options.max_peers_with_channels = 64;
  TESSERA_ASSIGN_OR_RETURN(peer_client_, GrpcPeerClient::Create(client_options));
  // Heartbeats get one attempt: a peer that does not answer in time is simply not heard. An
  // answer counts until the probe window (liveness.timeout_ms) closes, so a busy peer's late
  // answer still keeps it alive.
  GrpcPeerClient::Options heartbeat_options;
  heartbeat_options.channels_per_peer = 1;
  heartbeat_options.max_attempts = 1;
  heartbeat_options.token = config.cluster.token;
  heartbeat_options.control_timeout =
      absl::Milliseconds(std::max<int64_t>(100, config.liveness.timeout_ms));
  // Membership probes every member in turn: channels stay open for at most 64 peers, whatever
  // the cluster's size (in a larger cluster a probe may have to connect first).
  heartbeat_options.max_peers_with_channels = 64;
  heartbeat_options.reconnect_at_once = true;
  heartbeat_options.bdp_probe = false;
  TESSERA_ASSIGN_OR_RETURN(heartbeat_client_, GrpcPeerClient::Create(heartbeat_options));
  UdpHeartbeats::Options udp_options;
  udp_options.listen_address = config.peer.listen_address;
  udp_options.token = config.cluster.token;
  // What a flood of forged datagrams or proofs may cost a second (cluster.*_per_s).
  udp_options.throttle = DatagramThrottleOptions(config.cluster);
  // Signed datagrams carry it, so that receivers refuse replays unchecked (replay_window.h).
  udp_options.incarnation = incarnation;
  if (tls.enabled()) {
    // Datagrams carry their sender's certificate and signature: a daemon speaks for its own
    // node only, over UDP as over gRPC (datagram_signer.h).
    TESSERA_ASSIGN_OR_RETURN(udp_options.signer, DatagramSigner::Create(tls, node_id_));
    // And gossip about a member introduces it, or raises its incarnation, only with a proof the
    // member signed (incarnation_proof.h).
    IncarnationProofs::Options proof_options;
    proof_options.signer = udp_options.signer;
    proof_options.self = IncarnationClaim{node_id_, incarnation, config.PeerAddress()};
    proof_options.throttle = ProofThrottleOptions(config.cluster, proof_options.throttle);
    TESSERA_ASSIGN_OR_RETURN(incarnation_proofs_,
                             IncarnationProofs::Create(std::move(proof_options)));
  }
  udp_options.timeout = heartbeat_options.control_timeout;
  udp_options.on_request = [this](const HeartbeatMessage& m) -> absl::StatusOr<HeartbeatReply> {
    Cluster* const cluster = heartbeat_target_.load();
    if (cluster == nullptr) return absl::UnavailableError("membership is starting");
    return cluster->OnHeartbeat(m);
  };
  TESSERA_ASSIGN_OR_RETURN(udp_heartbeats_, UdpHeartbeats::Start(std::move(udp_options)));

  Cluster::Options cluster_options;
  cluster_options.self_id = node_id_;
  cluster_options.self_address = config.PeerAddress();
  cluster_options.incarnation = incarnation;
  cluster_options.members = config.cluster.members;
  cluster_options.dns_name = config.cluster.dns_name;
  cluster_options.dns_port = static_cast<int>(config.cluster.dns_port);
  cluster_options.dns_refresh_ms = config.cluster.dns_refresh_ms;
  cluster_options.heartbeat_ms = config.liveness.heartbeat_ms;
  cluster_options.timeout_ms = config.liveness.timeout_ms;
  cluster_options.indirect_probes = config.liveness.indirect_probes;
  cluster_options.suspicion_mult = config.liveness.suspicion_mult;
  cluster_options.proofs = incarnation_proofs_;
  cluster_options.on_self_fenced = [this] {
    if (!fenced_.HasBeenNotified()) fenced_.Notify();
    Wake();
  };
  // Called on the protocol thread only, so no two calls race.
  auto converged = std::make_shared<absl::Notification>();
  GrpcPeerClient* const peers = peer_client_.get();
  cluster_options.after_round = [this, converged, peers] {
    if (!converged->HasBeenNotified() && cluster_->Converged()) converged->Notify();
    // In a cluster of up to 32 peers, live peers get their data path negotiated and connections
    // opened ahead of the first fragment (in the background; a peer already prepared is
    // skipped). In a larger one each daemon talks to a few peers and connects on demand, so
    // that its connections do not grow with the cluster.
    const std::vector<Cluster::PeerView> members = cluster_->Peers();
    const size_t alive = std::count_if(members.begin(), members.end(),
                                       [](const Cluster::PeerView& p) { return p.alive; });
    if (alive > 32) return;
    for (const Cluster::PeerView& p : members) {
      if (p.alive) {
        peers->Prepare(PeerTarget(p.address, p.node_id), p.incarnation, /*open_connections=*/true);
      }
    }
  };
  HeartbeatSender* const heartbeats = config.liveness.transport == "grpc"
                                          ? static_cast<HeartbeatSender*>(heartbeat_client_.get())
                                          : udp_heartbeats_.get();
  // Set before the cluster's threads start (Cluster::Start) and before requests reach it
  // (heartbeat_target_), so the callback reads it without a race.
  cluster_options.on_live_set_change = [this] {
    if (cluster_coordination_ != nullptr) cluster_coordination_->MembershipChanged();
  };
  cluster_ = std::make_unique<Cluster>(cluster_options, heartbeats);

  Cluster* cluster = cluster_.get();
  // An older incarnation of a node is fenced out everywhere: its fragment writes, protection
  // reports and restore questions are refused (docs/PROTOCOL.md, "Membership").
  const WriterFence fenced = [cluster](const std::string& node_id, uint64_t node_incarnation) {
    return cluster->IsFenced(node_id, node_incarnation);
  };
  PeerService::Options service_options;
  service_options.self = MemberInfo{node_id_, incarnation, config.PeerAddress()};
  service_options.token = config.cluster.token;
  service_options.is_fenced = fenced;
  if (config.peer.data_path == "tcp") {
    DataPathServer::Options data_options;
    data_options.host = HostOfAddress(config.peer.listen_address);
    data_options.port = static_cast<uint16_t>(config.peer.data_port);
    data_options.is_fenced = fenced;
    data_options.encrypt = tls.enabled();
    CipherPool::Configure(static_cast<int>(config.cluster.tls_cipher_threads),
                          static_cast<int>(config.cluster.tls_cipher_nice));
    if (data_options.encrypt) TESSERA_RETURN_IF_ERROR(ChooseGcmLibrary(config.cluster));
    TESSERA_ASSIGN_OR_RETURN(data_path_server_,
                             DataPathServer::Start(fragments_.get(), data_options));
    service_options.data_path_port = data_path_server_->port();
    service_options.data_path_version = data_path_server_->version();
    service_options.data_path_session_key = [server = data_path_server_.get()](
                                                const std::string& node_id) {
      return server->SessionKeyFor(node_id);
    };
  }
  service_options.on_heartbeat = [cluster](const HeartbeatMessage& m) {
    return cluster->OnHeartbeat(m);
  };
  if (incarnation_proofs_ != nullptr) {
    // A member is declared lost only on a majority's signed word (Cluster::SignLostDeclaration).
    service_options.on_declare_lost =
        [cluster](const LostDeclarationRequest& r) -> absl::StatusOr<LostDeclarationReply> {
      TESSERA_ASSIGN_OR_RETURN(
          Cluster::LostTally tally,
          cluster->TakeLostDeclarations(r.node_id, r.incarnation, r.declarations));
      LostDeclarationReply reply;
      reply.declaration = std::move(tally.own_declaration);
      reply.applied = tally.applied;
      reply.signers = static_cast<uint32_t>(tally.signers.size());
      reply.live_members = static_cast<uint32_t>(tally.live);
      reply.reason = std::move(tally.reason);
      return reply;
    };
  }
  peer_service_ = std::make_unique<PeerService>(fragments_.get(), shard_source_.get(),
                                                service_options);
  GrpcCoordinationClient::Options coordination_client_options;
  coordination_client_options.self = NodeIdentity{node_id_, incarnation};
  coordination_client_options.token = config.cluster.token;
  coordination_client_options.timeout =
      absl::Milliseconds(std::max<int64_t>(1000, config.liveness.timeout_ms));
  coordination_client_ = std::make_unique<GrpcCoordinationClient>(coordination_client_options);
  ClusterCoordination::Options coordination_options;
  coordination_options.k = config.ec.k;
  coordination_options.m = config.ec.m;
  coordination_options.report_interval_ms = std::max<int64_t>(100, config.liveness.heartbeat_ms);
  coordination_options.degraded_settle = [cluster = cluster_.get()] {
    return absl::Milliseconds(cluster->SuspicionTimeoutMs());
  };
  // A drop's check and push are each a round of calls bounded by the coordination timeout.
  coordination_options.drop_fence = std::max(absl::Milliseconds(config.cluster.drop_fence_ms),
                                             3 * coordination_client_options.timeout);
  // Each job's state is kept beside its slots (it lasts as long as they do), or on a disk.
  coordination_options.state_directory = JobStateDirectory(config, node_id_);
  if (!config.store.state_directory.empty()) {
    const std::string& state_dir = coordination_options.state_directory;
    std::error_code ec;
    std::filesystem::create_directories(state_dir, ec);
    if (ec || access(state_dir.c_str(), W_OK | X_OK) != 0 || chmod(state_dir.c_str(), 0700) != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "store.state_directory: cannot create or write ", state_dir, " (",
          ec ? ec.message() : std::string(std::strerror(errno)),
          "): give the daemon a directory of its own that it can write (on a disk, e.g. "
          "/var/lib/tessera), or leave the key empty to keep the files beside the segments"));
    }
    log->info("job state files (epoch, commit, drop) are kept in {}", state_dir);
  }
  if (const char* hold = std::getenv("TESSERA_TEST_HOLD_DROP_FILE")) {
    coordination_options.test_hold_drop_file = hold;  // test only: see the option
  }
  auto coordination = std::make_unique<ClusterCoordination>(
      store_.get(), fragments_.get(), cluster_.get(), peer_client_.get(),
      coordination_client_.get(), coordination_options);
  cluster_coordination_ = coordination.get();
  coordination_ = std::move(coordination);
  CoordinationService::Options coordination_service_options;
  coordination_service_options.token = config.cluster.token;
  coordination_service_options.is_fenced = fenced;
  coordination_service_ = std::make_unique<CoordinationService>(cluster_coordination_,
                                                                coordination_service_options);
  CreateAdmin();
  // The admin service shares the peer port; over TCP it answers only with cluster.token.
  admin_tcp_service_ =
      std::make_unique<AdminService>(admin_.get(), /*over_tcp=*/true, config.cluster.token);
  RendezvousRouter::Options rendezvous_options;
  rendezvous_options.self_id = node_id_;
  rendezvous_options.token = config.cluster.token;
  rendezvous_options.live_members = [cluster] {
    std::vector<RendezvousRouter::Member> live;
    for (const std::string& id : cluster->LiveNodeIds()) {
      if (auto address = cluster->AddressOf(id)) live.push_back({id, *address});
    }
    return live;
  };
  rendezvous_router_ =
      std::make_unique<RendezvousRouter>(&rendezvous_table_, std::move(rendezvous_options));
  rendezvous_service_ =
      std::make_unique<RendezvousService>(&rendezvous_table_, config.cluster.token);
  grpc::ServerBuilder builder;
  PeerService::ConfigureServerBuilder(&builder);
  builder.AddListeningPort(config.peer.listen_address, PeerServerCredentials(tls));
  builder.RegisterService(peer_service_.get());
  builder.RegisterService(admin_tcp_service_.get());
  builder.RegisterService(rendezvous_service_.get());
  builder.RegisterService(coordination_service_.get());
  peer_server_ = builder.BuildAndStart();
  if (!peer_server_) {
    return absl::UnavailableError(absl::StrCat("could not listen for peers on ",
                                               config.peer.listen_address,
                                               " (peer.listen_address): is the port in use?"));
  }

  heartbeat_target_ = cluster_.get();  // membership datagrams are answered from here on
  cluster_->Start();
  if (incarnation_proofs_ != nullptr) {
    // Under mutual TLS a member is lost only on signed declarations: they are handed to the
    // members that were away when they were made.
    LostDeclarationHerald::Options herald;
    herald.self = MemberInfo{node_id_, incarnation, config.PeerAddress()};
    herald.period = absl::Milliseconds(std::max<int64_t>(1000, 4 * config.liveness.heartbeat_ms));
    herald.lost = [cluster] { return cluster->LostDeclarationsHeld(); };
    herald.peers = [cluster] { return cluster->Peers(); };
    lost_herald_ = std::make_unique<LostDeclarationHerald>(peer_client_.get(), std::move(herald));
    lost_herald_->Start();
  }
  // Hear the members before protecting or answering restores: a daemon that knows no peer yet
  // would place no fragments and find nothing restorable.
  const int64_t converge_ms = cluster_->ConvergenceBoundMs();
  if (!converged->WaitForNotificationWithTimeout(absl::Milliseconds(converge_ms))) {
    log->warn("membership did not converge within {} ms (not every configured address answered "
              "or timed out); starting anyway", converge_ms);
  }
  log->info("{} live members after start-up: {}", cluster_->LiveNodeIds().size(),
            absl::StrJoin(cluster_->LiveNodeIds(), ", "));
  cluster_coordination_->Start();
  FragmentStore::Stats fstats = fragments_->stats();
  log->info("peer service on {} (advertised {}), incarnation {}, RS({}, {}), {} member "
            "addresses, {} fragments re-adopted",
            config.peer.listen_address, config.PeerAddress(), incarnation, config.ec.k,
            config.ec.m, config.cluster.members.size(), fstats.adopted_at_start);
  return absl::OkStatus();
}

void Daemon::CreateAdmin() {
  Admin::Parts parts;
  parts.config = &config_;
  parts.node_id = node_id_;
  parts.incarnation = incarnation_;
  parts.started_unix_ms = started_unix_ms_;
  parts.store = store_.get();
  parts.coordination = coordination_.get();
  parts.fragments = fragments_.get();
  parts.fragment_budget = fragment_budget_.get();
  parts.cluster = cluster_.get();
  parts.peer_client = peer_client_.get();
  parts.drop_memory = [this] {
    if (!drop_memory_requested_.exchange(true)) drop_memory_.Notify();
    Wake();
  };
  admin_ = std::make_unique<Admin>(std::move(parts));
}

void Daemon::SetWakeup(std::function<void()> wake) {
  absl::MutexLock lock(&wake_mu_);
  wake_ = std::move(wake);
}

void Daemon::Wake() {
  absl::MutexLock lock(&wake_mu_);
  if (wake_) wake_();
}

bool Daemon::WaitForDropMemory(absl::Duration timeout) {
  return drop_memory_.WaitForNotificationWithTimeout(timeout);
}

absl::StatusOr<int> Daemon::DeleteSegments(const DaemonConfig& config) {
  TESSERA_ASSIGN_OR_RETURN(std::string node_id, ResolveNodeId(config.node.id));
  const std::string dir = config.store.directory + "/" + node_id;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus(errno, "open directory " + dir);
  int deleted = 0;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.empty() || name[0] == '.') continue;  // ".", "..", ".lock"
    const std::string path = dir + "/" + name;
    struct stat st;
    if (lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && unlink(path.c_str()) == 0) {
      ++deleted;
    }
  }
  closedir(d);
  if (!config.store.state_directory.empty()) {
    // A lost machine loses its job state files too, wherever they are kept.
    JobStateJournal(JobStateDirectory(config, node_id)).RemoveAll();
  }
  return deleted;
}

std::vector<MetricsRegistry::Sample> Daemon::CollectMetrics() const {
  std::vector<MetricsRegistry::Sample> out;
  auto gauge = [&out](const char* name, const char* help, double value, MetricLabels labels = {}) {
    out.push_back({name, help, "gauge", std::move(labels), value});
  };
  auto counter = [&out](const char* name, const char* help, double value,
                        MetricLabels labels = {}) {
    out.push_back({name, help, "counter", std::move(labels), value});
  };
  const SnapshotStore::Stats s = store_->stats();
  gauge("tessera_store_capacity_bytes",
        "store.capacity_bytes in effect: shared memory for slots (and, apart, for fragments).",
        static_cast<double>(s.capacity_bytes));
  gauge("tessera_store_slot_bytes", "Bytes of this node's snapshot slot segments.",
        static_cast<double>(s.used_bytes));
  gauge("tessera_store_slot_segments", "Snapshot slot segments on this node.",
        static_cast<double>(s.segments));
  counter("tessera_snapshot_seals_total", "Snapshots sealed on this node.",
          static_cast<double>(s.seals));
  counter("tessera_snapshot_sealed_bytes_total",
          "Payload bytes of the snapshots sealed on this node.",
          static_cast<double>(s.sealed_bytes));
  const char* crc_help = "Data that failed its CRC32C check, by what it was.";
  counter("tessera_crc_failures_total", crc_help, static_cast<double>(s.crc_failures),
          {{"kind", "slot"}});
  gauge("tessera_daemon_start_time_seconds",
        "When this incarnation of the daemon started (its incarnation, in seconds).",
        static_cast<double>(started_unix_ms_) / 1000.0);
  if (fragments_) {
    const FragmentStore::Stats f = fragments_->stats();
    counter("tessera_crc_failures_total", crc_help,
            static_cast<double>(f.crc_failures + Metrics().fragment_crc_failures->value()),
            {{"kind", "fragment"}});
    const char* held_help = "Fragments this node holds for other nodes' shards, by state.";
    gauge("tessera_fragments_held", held_help, static_cast<double>(f.fragments_sealed),
          {{"state", "sealed"}});
    gauge("tessera_fragments_held", held_help, static_cast<double>(f.fragments_writing),
          {{"state", "writing"}});
    gauge("tessera_fragment_bytes",
          "Bytes of the fragment segments held for other nodes, recycling pool included.",
          static_cast<double>(fragment_budget_->used_bytes()));
    gauge("tessera_fragment_capacity_bytes", "Shared memory available for fragments.",
          static_cast<double>(fragment_budget_->capacity_bytes()));
    const char* segments_help =
        "Fragment segments by how they were obtained: created new when a fragment arrived, "
        "recycled from a dropped one, created ahead of need in the background, or created in the "
        "background and deleted again, no longer needed (precreated_discarded).";
    counter("tessera_fragment_segments_total", segments_help,
            static_cast<double>(f.segments_created), {{"how", "created"}});
    counter("tessera_fragment_segments_total", segments_help,
            static_cast<double>(f.segments_recycled), {{"how", "recycled"}});
    counter("tessera_fragment_segments_total", segments_help,
            static_cast<double>(f.spares_precreated), {{"how", "precreated"}});
    counter("tessera_fragment_segments_total", segments_help,
            static_cast<double>(f.spares_precreate_discarded), {{"how", "precreated_discarded"}});
    gauge("tessera_fragment_spare_bytes",
          "Bytes of dropped fragment segments kept for recycling (reclaimed first under pressure).",
          static_cast<double>(f.pool_bytes));
  }
  if (data_path_server_) {
    const DataPathWaits w = DataPathWaitTotals();
    const char* waits_help =
        "Seconds this daemon's raw data path threads waited, by what for: records sealed (seal) "
        "or opened (open) on the cipher pool, room in a socket (send), bytes in the middle of a "
        "range (recv), another daemon's answer (reply). seal and open growing against recv and "
        "send: the cipher pool (cluster.tls_cipher_threads) is short of cores.";
    for (const auto& [kind, ns] :
         {std::pair{"seal", w.seal_ns}, std::pair{"open", w.open_ns}, std::pair{"send", w.send_ns},
          std::pair{"recv", w.recv_ns}, std::pair{"reply", w.reply_ns}}) {
      counter("tessera_data_path_wait_seconds_total", waits_help, static_cast<double>(ns) / 1e9,
              {{"wait", kind}});
    }
  }
  if (cluster_) {
    counter("tessera_peer_servers_refused_total",
            "Connections to another daemon refused in the TLS handshake because the server's "
            "certificate does not name the member called (another node's certificate at its "
            "address); each is logged, at most once per 10 s per pair of nodes.",
            static_cast<double>(ProcessClusterCredentials()->stats().servers_refused));
  }
  if (peer_client_) {
    const GrpcPeerClient::Stats p = peer_client_->stats();
    const char* transfers_help =
        "Fragments this daemon sent to (put) or read from (get) other members, by path: the raw "
        "TCP data path, or gRPC streams (peer.data_path = grpc here or on the peer).";
    counter("tessera_fragment_transfers_total", transfers_help, static_cast<double>(p.raw_puts),
            {{"op", "put"}, {"path", "tcp"}});
    counter("tessera_fragment_transfers_total", transfers_help, static_cast<double>(p.grpc_puts),
            {{"op", "put"}, {"path", "grpc"}});
    counter("tessera_fragment_transfers_total", transfers_help, static_cast<double>(p.raw_gets),
            {{"op", "get"}, {"path", "tcp"}});
    counter("tessera_fragment_transfers_total", transfers_help, static_cast<double>(p.grpc_gets),
            {{"op", "get"}, {"path", "grpc"}});
  }
  if (data_path_server_) {
    const DataPathServer::Stats d = data_path_server_->stats();
    const char* bytes_help = "Fragment bytes the raw TCP data path received and sent.";
    counter("tessera_data_path_bytes_total", bytes_help, static_cast<double>(d.bytes_received),
            {{"direction", "received"}});
    counter("tessera_data_path_bytes_total", bytes_help, static_cast<double>(d.bytes_sent),
            {{"direction", "sent"}});
    gauge("tessera_data_path_connections", "Open connections of the raw TCP data path.",
          static_cast<double>(d.connections_open));
    counter("tessera_data_path_refused_total",
            "Data path connections refused (wrong session key or version, bad framing).",
            static_cast<double>(d.connections_refused));
    counter("tessera_data_path_request_errors_total",
            "Data path requests answered with an error (each is also logged).",
            static_cast<double>(d.request_errors));
    counter("tessera_data_path_records_refused_total",
            "Encrypted data path records that did not authenticate (altered, replayed or "
            "reordered on the way); each closed its connection and is logged.",
            static_cast<double>(d.records_refused));
  }
  gauge("tessera_rendezvous_groups",
        "Data-parallel rendezvous groups this daemon hosts (forgotten after 10 idle minutes).",
        static_cast<double>(rendezvous_table_.groups()));
  if (cluster_) {
    double alive = 0, suspected = 0, unknown = 0;
    for (const Cluster::PeerView& p : cluster_->Peers()) {
      (p.alive ? alive : p.last_heard_unix_ms < 0 ? unknown : suspected) += 1;
    }
    const char* peers_help = "Other members by liveness (unknown: never heard from).";
    gauge("tessera_peers", peers_help, alive, {{"state", "alive"}});
    gauge("tessera_peers", peers_help, suspected, {{"state", "suspected"}});
    gauge("tessera_peers", peers_help, unknown, {{"state", "unknown"}});
    gauge("tessera_cluster_insecure",
          "1 when this cluster daemon runs without cluster.token (cluster.insecure = true).",
          config_.cluster.token.empty() ? 1 : 0);
    gauge("tessera_cluster_tls",
          "1 when the peer port runs mutual TLS (cluster.tls_cert_file and the others).",
          config_.cluster.tls_cert_file.empty() ? 0 : 1);
    const Cluster::Stats m = cluster_->stats();
    const char* sent_help = "Membership (SWIM) messages this daemon sent, by kind.";
    const char* received_help = "Membership (SWIM) messages this daemon received, by kind.";
    struct ByKind {
      const char* kind;
      uint64_t sent, received;
    };
    for (const ByKind& k : {ByKind{"probe", m.swim.probes_sent, m.swim.probes_received},
                            ByKind{"ping_req", m.swim.ping_reqs_sent, m.swim.ping_reqs_received},
                            ByKind{"indirect_ack", m.swim.indirect_acks_sent,
                                   m.swim.indirect_acks_received},
                            ByKind{"ack", m.swim.acks_sent, m.swim.acks_received}}) {
      counter("tessera_membership_messages_sent_total", sent_help, static_cast<double>(k.sent),
              {{"kind", k.kind}});
      counter("tessera_membership_messages_received_total", received_help,
              static_cast<double>(k.received), {{"kind", k.kind}});
    }
    counter("tessera_membership_suspicions_total",
            "Members this daemon suspected after its own probe failed.",
            static_cast<double>(m.swim.suspicions_raised));
    counter("tessera_membership_refused_total",
            "Heartbeats refused because their sender is a fenced (older) incarnation.",
            static_cast<double>(m.swim.refused));
    if (incarnation_proofs_ != nullptr) {
      const char* updates_help =
          "Relayed membership updates dropped because they would introduce a member or raise its "
          "incarnation without a proof that member signed, by reason (unproven: none came with "
          "the update; refused: the proof did not verify; unchecked: its sender had spent its "
          "allowance of proof checks; refusal: a member refused this daemon's heartbeat as "
          "fenced without this node's own proof of a newer incarnation, and was not obeyed); "
          "each reason logged at most once per 10 s.";
      counter("tessera_membership_updates_dropped_total", updates_help,
              static_cast<double>(m.updates_unproven), {{"reason", "unproven"}});
      counter("tessera_membership_updates_dropped_total", updates_help,
              static_cast<double>(m.updates_proof_refused), {{"reason", "refused"}});
      counter("tessera_membership_updates_dropped_total", updates_help,
              static_cast<double>(m.updates_proof_unchecked), {{"reason", "unchecked"}});
      counter("tessera_membership_updates_dropped_total", updates_help,
              static_cast<double>(m.refusals_unproven), {{"reason", "refusal"}});
      counter("tessera_membership_relayed_dropped_total",
              "Relayed news of a member's incarnation dropped for claiming a liveness version "
              "beyond the member's own word, or a \"lost\" (bounded gossip under mutual TLS).",
              static_cast<double>(m.swim.relayed_dropped));
      counter(
          "tessera_membership_relayed_damped_total",
          "Relayed suspicions of a member whose suspicions were refuted too often lately, taken "
          "only as a reason to probe it (bounded gossip under mutual TLS).",
          static_cast<double>(m.swim.relayed_damped));
      const IncarnationProofs::Stats p = incarnation_proofs_->stats();
      const char* proofs_help =
          "Members' proofs of their incarnations checked here (each member's incarnation once), "
          "by outcome (refused: malformed, or did not verify).";
      counter("tessera_membership_proofs_checked_total", proofs_help,
              static_cast<double>(p.verified), {{"outcome", "verified"}});
      counter("tessera_membership_proofs_checked_total", proofs_help,
              static_cast<double>(p.refused), {{"outcome", "refused"}});
    }
    if (udp_heartbeats_ != nullptr) {
      const UdpHeartbeats::Stats u = udp_heartbeats_->stats();
      const char* dropped_help =
          "Membership datagrams dropped unread, by reason (unauthenticated: no or a wrong "
          "cluster.token MAC, or with mutual TLS a signature or certificate that does not "
          "verify; throttled: dropped unchecked, their source having failed too many checks "
          "lately; replayed: with mutual TLS, taken already, below its sender's window or of an "
          "older incarnation, dropped before its signature is checked; unexpected: an answer "
          "that came after its sender gave up).";
      counter("tessera_membership_datagrams_dropped_total", dropped_help,
              static_cast<double>(u.dropped_malformed), {{"reason", "malformed"}});
      counter("tessera_membership_datagrams_dropped_total", dropped_help,
              static_cast<double>(u.dropped_unauthenticated), {{"reason", "unauthenticated"}});
      counter("tessera_membership_datagrams_dropped_total", dropped_help,
              static_cast<double>(u.dropped_unexpected), {{"reason", "unexpected"}});
      counter("tessera_membership_datagrams_dropped_total", dropped_help,
              static_cast<double>(u.dropped_throttled), {{"reason", "throttled"}});
      counter("tessera_membership_datagrams_dropped_total", dropped_help,
              static_cast<double>(u.dropped_replayed), {{"reason", "replayed"}});
      counter("tessera_membership_datagram_timeouts_total",
              "Membership datagrams sent that got no answer within the probe window.",
              static_cast<double>(u.timeouts));
      counter("tessera_membership_datagrams_unreachable_total",
              "Membership datagrams answered by ICMP port unreachable (no daemon there).",
              static_cast<double>(u.unreachable));
    }
  }
  if (cluster_coordination_ != nullptr) {
    const ClusterCoordination::Stats c = cluster_coordination_->stats();
    counter("tessera_protection_shards_total",
            "Shards whose k+m fragments were all stored on other members.",
            static_cast<double>(c.protected_shards));
    counter("tessera_protection_failures_total",
            "Protection attempts that failed (a peer unreachable or full) and were retried.",
            static_cast<double>(c.protection_failures));
    counter("tessera_protections_deferred_total",
            "Shards a restarted daemon re-adopted and protected only once it had learned their "
            "job's state (a drop it missed voids them).",
            static_cast<double>(c.protections_deferred));
    counter("tessera_commits_total",
            "Steps this daemon committed as its jobs' coordinator (protected on every rank).",
            static_cast<double>(c.commits));
    counter("tessera_commits_learned_total",
            "Newer commits this daemon learned as a node of a job (it releases older data).",
            static_cast<double>(c.commits_learned));
    counter("tessera_job_states_kept_total",
            "Job states (epoch, commit, drop) written to the store directory for a restart.",
            static_cast<double>(c.job_states_kept));
    counter("tessera_job_state_failures_total",
            "Job states that could not be written for a restart (see the log): they stay soft.",
            static_cast<double>(c.job_state_failures));
    const char* reports_help =
        "Protection reports sent to jobs' coordinators, by outcome (a failed one is re-sent).";
    counter("tessera_coordination_reports_total", reports_help,
            static_cast<double>(c.reports_sent - c.report_failures), {{"outcome", "ok"}});
    counter("tessera_coordination_reports_total", reports_help,
            static_cast<double>(c.report_failures), {{"outcome", "failed"}});
    counter("tessera_coordination_pushes_failed_total",
            "Job state pushes (commits, dead steps) that did not reach a node of the job.",
            static_cast<double>(c.pushes_failed));
    counter("tessera_dead_steps_total",
            "Steps found dead by this coordinator: some rank skipped them, so they never commit.",
            static_cast<double>(c.dead_steps));
    counter("tessera_fragments_released_total",
            "Fragments dropped because a newer step committed or their step was dead.",
            static_cast<double>(c.fragments_dropped));
    counter("tessera_repairs_total",
            "Committed shards protected again after a holder of their fragments was lost.",
            static_cast<double>(c.repairs));
    gauge("tessera_jobs_coordinated", "Jobs this daemon currently coordinates.",
          static_cast<double>(c.jobs_coordinated));
    const char* restore_help = "Shards made local from other members, by how.";
    counter("tessera_restore_shards_total", restore_help,
            static_cast<double>(c.rebuilt_shards), {{"source", "rebuild"}});
    counter("tessera_restore_shards_total", restore_help,
            static_cast<double>(c.copied_shards), {{"source", "copy"}});
  }
  return out;
}

void Daemon::Shutdown() {
  if (shut_down_ || !agent_server_) return;  // never started: nothing to drain
  shut_down_ = true;
  auto log = Logger("daemon");
  if (metrics_collector_ != 0) GlobalMetrics().RemoveCollector(metrics_collector_);
  metrics_collector_ = 0;
  metrics_server_.reset();
  log->info("draining: no new connections; in-flight calls get {} ms",
            config_.daemon.drain_timeout_ms);
  agent_listener_.reset();
  if (agent_server_) {
    agent_server_->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(config_.daemon.drain_timeout_ms));
    agent_server_->Wait();
  }
  if (lost_herald_) lost_herald_->Stop();
  if (cluster_coordination_ != nullptr) cluster_coordination_->Stop();
  if (cluster_) cluster_->Stop();
  if (peer_server_) {
    peer_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    peer_server_->Wait();
  }
  udp_heartbeats_.reset();
  if (data_path_server_) data_path_server_->Stop();
  if (lock_fd_ >= 0) close(lock_fd_);
  lock_fd_ = -1;
  log->info("stopped");
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace tessera
