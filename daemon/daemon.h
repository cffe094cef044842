// Daemon: one tesserad. Owns the snapshot store and the services in front of it, from start to
// drained shutdown. main() parses flags and config, calls Start, waits for SIGTERM, Shutdown.
#ifndef TESSERA_DAEMON_DAEMON_H_
#define TESSERA_DAEMON_DAEMON_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "daemon/admin/admin_service.h"
#include "daemon/admin/lost_declaration_herald.h"
#include "daemon/agent_service.h"
#include "daemon/coordination/protection_pipeline.h"
#include "daemon/coordination/rendezvous.h"
#include "daemon/coordination/service.h"
#include "daemon/daemon_config.h"
#include "daemon/membership/cluster.h"
#include "daemon/membership/incarnation_proof.h"
#include "daemon/membership/udp_heartbeats.h"
#include "daemon/metrics/metrics_server.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/data_path.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"
#include "daemon/unix_listener.h"
#include "grpcpp/server.h"

namespace tessera {

class Daemon {
 public:
  // Resolves the node id, locks `<store.directory>/<node id>` against a second daemon, opens the
  // store there (re-adopting sealed snapshots), and starts serving the agent socket (agent and
  // admin services). With peer.listen_address set, also opens the fragment store in the same
  // directory, serves the peer service and (with cluster.token) the admin service over TCP,
  // hears the members once, then starts cross-node protection. With metrics.listen_address set,
  // serves /metrics. Returns once all of that serves.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const DaemonConfig& config);

  // Stops accepting connections, lets in-flight calls (a seal's checksum) finish for up to
  // daemon.drain_timeout_ms, then cancels the rest. Idempotent.
  void Shutdown();
  ~Daemon();

  // Waits up to `timeout` for an admin DropMemory call. True once one was accepted: the caller
  // then shuts this daemon down, calls DeleteSegments and starts a new one (a new incarnation
  // with an empty store), as a machine that lost its memory would come back.
  bool WaitForDropMemory(absl::Duration timeout);

  // True once a newer incarnation of this daemon's node id is a member (this process was
  // replaced while it was stopped or cut off): every peer refuses it, and it must exit instead
  // of taking snapshots that can never be protected.
  bool fenced() const { return fenced_.HasBeenNotified(); }

  // `wake` is called (from any thread) when DropMemory is accepted or this daemon is fenced,
  // so that the caller can wait for either without polling. Either may have happened before
  // the call: check WaitForDropMemory and fenced after it.
  void SetWakeup(std::function<void()> wake);

  // Deletes every segment file (slots, fragments, restored shards) of the daemon `config`
  // describes. REQUIRES: that daemon is not running. Returns how many files were deleted.
  static absl::StatusOr<int> DeleteSegments(const DaemonConfig& config);

  const std::string& node_id() const { return node_id_; }
  uint64_t incarnation() const { return incarnation_; }
  SnapshotStore* store() { return store_.get(); }
  // The port metrics are served on (metrics.listen_address may ask for port 0); 0 when off.
  int metrics_port() const { return metrics_server_ ? metrics_server_->port() : 0; }

 private:
  Daemon() = default;
  // Cluster mode: fragment store, peer service, heartbeats and protection.
  absl::Status StartCluster(const std::string& dir, uint64_t capacity);
  // The admin logic over whatever this daemon runs (call once the stores exist).
  void CreateAdmin();
  // What the stores, the cluster and protection count, for /metrics.
  std::vector<MetricsRegistry::Sample> CollectMetrics() const;

  DaemonConfig config_;
  std::string node_id_;
  int lock_fd_ = -1;
  std::unique_ptr<SnapshotStore> store_;
  // Cluster mode only (peer.listen_address set).
  std::unique_ptr<CapacityBudget> fragment_budget_;
  std::unique_ptr<FragmentStore> fragments_;
  std::unique_ptr<SnapshotStoreShardSource> shard_source_;
  std::unique_ptr<GrpcPeerClient> peer_client_;
  std::unique_ptr<GrpcPeerClient> heartbeat_client_;  // liveness.transport = "grpc"
  // Membership datagrams, answered whatever liveness.transport says; sent when it is "udp".
  std::unique_ptr<UdpHeartbeats> udp_heartbeats_;
  // With mutual TLS: this daemon's proof of its incarnation and the members' (cluster_ uses it).
  std::shared_ptr<IncarnationProofs> incarnation_proofs_;
  std::atomic<Cluster*> heartbeat_target_{nullptr};  // cluster_, once it exists
  std::unique_ptr<Cluster> cluster_;
  std::unique_ptr<LostDeclarationHerald> lost_herald_;  // with mutual TLS
  std::unique_ptr<PeerService> peer_service_;
  std::unique_ptr<grpc::Server> peer_server_;
  std::unique_ptr<DataPathServer> data_path_server_;  // peer.data_path = "tcp"
  ClusterCoordination* cluster_coordination_ = nullptr;  // coordination_, in cluster mode
  std::unique_ptr<Coordination> coordination_;
  std::unique_ptr<GrpcCoordinationClient> coordination_client_;
  std::unique_ptr<CoordinationService> coordination_service_;  // on the peer port
  PeerCredentials credentials_;
  RendezvousTable rendezvous_table_;
  std::unique_ptr<RendezvousRouter> rendezvous_router_;
  std::unique_ptr<RendezvousService> rendezvous_service_;  // on the peer port
  std::unique_ptr<AgentService> agent_service_;
  std::unique_ptr<grpc::Server> agent_server_;
  std::unique_ptr<UnixListener> agent_listener_;
  uint64_t incarnation_ = 0;
  int64_t started_unix_ms_ = 0;
  std::unique_ptr<Admin> admin_;
  std::unique_ptr<AdminService> admin_unix_service_;  // on the agent socket, no token
  std::unique_ptr<AdminService> admin_tcp_service_;   // on the peer port, with the token
  std::atomic<bool> drop_memory_requested_{false};
  absl::Notification drop_memory_;
  absl::Notification fenced_;  // a newer incarnation of this node id is a member
  void Wake();
  absl::Mutex wake_mu_;
  std::function<void()> wake_ ABSL_GUARDED_BY(wake_mu_);
  std::unique_ptr<MetricsServer> metrics_server_;
  int metrics_collector_ = 0;
  bool shut_down_ = false;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_DAEMON_H_
