#include "daemon/daemon.h"

#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace tessera {
namespace {

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

absl::StatusOr<std::string> ResolveNodeId(const std::string& configured) {
  if (!configured.empty()) return configured;
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) return ErrnoStatus(errno, "gethostname");
  std::string id = host;
  for (char& c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) c = '_';
  }
  return id;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonConfig& config) {
  auto log = Logger("daemon");
  std::unique_ptr<Daemon> d(new Daemon());
  d->config_ = config;
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
  SnapshotStore::Options options;
  options.directory = dir;
  options.capacity_bytes = capacity;
  options.prefault = config.store.prefault;
  options.crc_threads = config.store.crc_threads;
  TESSERA_ASSIGN_OR_RETURN(d->store_, SnapshotStore::Open(options));

  if (config.peer.listen_address.empty()) {
    d->coordination_ = std::make_unique<Coordination>(d->store_.get());
  } else {
    TESSERA_RETURN_IF_ERROR(d->StartCluster(dir, capacity));
  }
  d->agent_service_ = std::make_unique<AgentService>(d->store_.get(), d->coordination_.get(),
                                                     &d->credentials_);
  grpc::ServerBuilder builder;
  builder.RegisterService(d->agent_service_.get());
  builder.SetMaxReceiveMessageSize(16 << 20);
  d->agent_server_ = builder.BuildAndStart();
  if (!d->agent_server_) return absl::InternalError("could not start the agent gRPC server");
  TESSERA_ASSIGN_OR_RETURN(
      d->agent_listener_,
      UnixListener::Start(config.agent.socket_path, static_cast<mode_t>(config.agent.socket_mode),
                          d->agent_server_.get(), &d->credentials_));
  SnapshotStore::Stats stats = d->store_->stats();
  log->info("tesserad {} ready: store {} ({} of {} bytes used, {} snapshots re-adopted), agent "
            "socket {}",
            d->node_id_, dir, stats.used_bytes, stats.capacity_bytes, stats.adopted_at_start,
            config.agent.socket_path);
  return d;
}

absl::Status Daemon::StartCluster(const std::string& dir, uint64_t capacity) {
  auto log = Logger("daemon");
  const DaemonConfig& config = config_;
  TuneMallocForBulkTransfers();
  const uint64_t incarnation = static_cast<uint64_t>(NowUnixMs());
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
  TESSERA_ASSIGN_OR_RETURN(peer_client_, GrpcPeerClient::Create(client_options));
  // Heartbeats get one short attempt: a peer that does not answer in time is simply not heard.
  GrpcPeerClient::Options heartbeat_options;
  heartbeat_options.channels_per_peer = 1;
  heartbeat_options.max_attempts = 1;
  heartbeat_options.control_timeout =
      absl::Milliseconds(std::max<int64_t>(100, config.liveness.timeout_ms / 2));
  TESSERA_ASSIGN_OR_RETURN(heartbeat_client_, GrpcPeerClient::Create(heartbeat_options));

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
  cluster_ = std::make_unique<Cluster>(cluster_options, heartbeat_client_.get());

  PeerService::Options service_options;
  service_options.self = MemberInfo{node_id_, incarnation, config.PeerAddress()};
  Cluster* cluster = cluster_.get();
  service_options.on_heartbeat = [cluster](const HeartbeatMessage& m) {
    return cluster->OnHeartbeat(m);
  };
  peer_service_ = std::make_unique<PeerService>(fragments_.get(), shard_source_.get(),
                                                service_options);
  grpc::ServerBuilder builder;
  PeerService::ConfigureServerBuilder(&builder);
  builder.AddListeningPort(config.peer.listen_address, grpc::InsecureServerCredentials());
  builder.RegisterService(peer_service_.get());
  peer_server_ = builder.BuildAndStart();
  if (!peer_server_) {
    return absl::UnavailableError(absl::StrCat("could not listen for peers on ",
                                               config.peer.listen_address,
                                               " (peer.listen_address): is the port in use?"));
  }

  ClusterCoordination::Options coordination_options;
  coordination_options.k = config.ec.k;
  coordination_options.m = config.ec.m;
  coordination_options.commit_check_ms = std::max<int64_t>(100, config.liveness.heartbeat_ms);
  auto coordination = std::make_unique<ClusterCoordination>(
      store_.get(), fragments_.get(), cluster_.get(), peer_client_.get(), coordination_options);
  cluster_coordination_ = coordination.get();
  coordination_ = std::move(coordination);
  cluster_->Start();
  cluster_coordination_->Start();
  FragmentStore::Stats fstats = fragments_->stats();
  log->info("peer service on {} (advertised {}), incarnation {}, RS({}, {}), {} member "
            "addresses, {} fragments re-adopted",
            config.peer.listen_address, config.PeerAddress(), incarnation, config.ec.k,
            config.ec.m, config.cluster.members.size(), fstats.adopted_at_start);
  return absl::OkStatus();
}

void Daemon::Shutdown() {
  if (shut_down_ || !agent_server_) return;  // never started: nothing to drain
  shut_down_ = true;
  auto log = Logger("daemon");
  log->info("draining: no new connections; in-flight calls get {} ms",
            config_.daemon.drain_timeout_ms);
  agent_listener_.reset();
  if (agent_server_) {
    agent_server_->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(config_.daemon.drain_timeout_ms));
    agent_server_->Wait();
  }
  if (cluster_coordination_ != nullptr) cluster_coordination_->Stop();
  if (cluster_) cluster_->Stop();
  if (peer_server_) {
    peer_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    peer_server_->Wait();
  }
  if (lock_fd_ >= 0) close(lock_fd_);
  lock_fd_ = -1;
  log->info("stopped");
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace tessera
