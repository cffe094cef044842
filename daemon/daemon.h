// Daemon: one tesserad. Owns the snapshot store and the services in front of it, from start to
// drained shutdown. main() parses flags and config, calls Start, waits for SIGTERM, Shutdown.
#ifndef TESSERA_DAEMON_DAEMON_H_
#define TESSERA_DAEMON_DAEMON_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "daemon/agent_service.h"
#include "daemon/daemon_config.h"
#include "daemon/snapshot_store.h"
#include "daemon/unix_listener.h"
#include "grpcpp/server.h"

namespace tessera {

class Daemon {
 public:
  // Resolves the node id, locks `<store.directory>/<node id>` against a second daemon, opens the
  // store there (re-adopting sealed snapshots), and starts serving the agent socket.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const DaemonConfig& config);

  // Stops accepting connections, lets in-flight calls (a seal's checksum) finish for up to
  // daemon.drain_timeout_ms, then cancels the rest. Idempotent.
  void Shutdown();
  ~Daemon();

  const std::string& node_id() const { return node_id_; }
  SnapshotStore* store() { return store_.get(); }

 private:
  Daemon() = default;

  DaemonConfig config_;
  std::string node_id_;
  int lock_fd_ = -1;
  std::unique_ptr<SnapshotStore> store_;
  std::unique_ptr<Coordination> coordination_;
  PeerCredentials credentials_;
  std::unique_ptr<AgentService> agent_service_;
  std::unique_ptr<grpc::Server> agent_server_;
  std::unique_ptr<UnixListener> agent_listener_;
  bool shut_down_ = false;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_DAEMON_H_
