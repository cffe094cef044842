// The agent service: a thin gRPC adapter over SnapshotStore. Each method identifies the caller
// from SO_PEERCRED (via PeerCredentials), calls the store, and converts the status.
#ifndef TESSERA_DAEMON_AGENT_SERVICE_H_
#define TESSERA_DAEMON_AGENT_SERVICE_H_

#include <map>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "daemon/coordination/coordination.h"
#include "daemon/coordination/rendezvous.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/unix_listener.h"
#include "proto/agent.grpc.pb.h"

namespace tessera {

class AgentService final : public agent::Agent::Service {
 public:
  // No pointer is owned; all must outlive the service.
  AgentService(SnapshotStore* store, Coordination* coordination,
               const PeerCredentials* credentials, RendezvousRouter* rendezvous)
      : store_(store),
        coordination_(coordination),
        credentials_(credentials),
        rendezvous_(rendezvous) {}

  grpc::Status Register(grpc::ServerContext* context, const agent::RegisterRequest* request,
                        agent::RegisterResponse* response) override;
  grpc::Status BeginSnapshot(grpc::ServerContext* context,
                             const agent::BeginSnapshotRequest* request,
                             agent::BeginSnapshotResponse* response) override;
  grpc::Status SealSnapshot(grpc::ServerContext* context,
                            const agent::SealSnapshotRequest* request,
                            agent::SealSnapshotResponse* response) override;
  grpc::Status ListVersions(grpc::ServerContext* context,
                            const agent::ListVersionsRequest* request,
                            agent::ListVersionsResponse* response) override;
  grpc::Status FindLatestRestorable(grpc::ServerContext* context,
                                    const agent::FindLatestRestorableRequest* request,
                                    agent::FindLatestRestorableResponse* response) override;
  grpc::Status PrepareRestore(grpc::ServerContext* context,
                              const agent::PrepareRestoreRequest* request,
                              agent::PrepareRestoreResponse* response) override;
  grpc::Status Unregister(grpc::ServerContext* context, const agent::UnregisterRequest* request,
                          agent::UnregisterResponse* response) override;
  grpc::Status Rendezvous(grpc::ServerContext* context, const rendezvous::JoinRequest* request,
                          rendezvous::JoinResponse* response) override;

 private:
  absl::StatusOr<Caller> CallerOf(grpc::ServerContext* context) const;
  // Adds what the agent newly reports skipped to the skips metric.
  void CountSkips(const std::string& job_id, uint32_t rank, uint64_t skipped_total);

  SnapshotStore* const store_;
  Coordination* const coordination_;
  const PeerCredentials* const credentials_;
  RendezvousRouter* const rendezvous_;
  absl::Mutex skips_mu_;
  // The last cumulative skip count each rank's agent reported.
  std::map<std::pair<std::string, uint32_t>, uint64_t> skips_reported_ ABSL_GUARDED_BY(skips_mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_AGENT_SERVICE_H_
