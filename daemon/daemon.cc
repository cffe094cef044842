#include "daemon/daemon.h"

#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
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

  d->coordination_ = std::make_unique<Coordination>(d->store_.get());
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
  if (lock_fd_ >= 0) close(lock_fd_);
  lock_fd_ = -1;
  log->info("stopped");
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace tessera
