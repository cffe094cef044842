// The admin service (proto/admin.proto): what the tessera CLI asks a daemon.
//
//   Admin         the logic, one per daemon: validates each request, reads the stores and the
//                 cluster, asks the other members (their admin services over TCP, with the
//                 cluster token) for what only they know, and forwards node-targeted calls.
//   AdminService  the gRPC adapter, one per listening server: over TCP it first checks the
//                 cluster token in the call's metadata; on the agent Unix socket it does not.
//
// Every method returns a canonical status whose message says what was wrong and what would be
// right (admin.proto lists the codes). Thread-safe.
#ifndef TESSERA_DAEMON_ADMIN_ADMIN_SERVICE_H_
#define TESSERA_DAEMON_ADMIN_ADMIN_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/admin/job_health.h"
#include "daemon/coordination/coordination.h"
#include "daemon/coordination/shard_rebuild.h"
#include "daemon/daemon_config.h"
#include "daemon/membership/cluster.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/cluster_token.h"
#include "daemon/transfer/peer_client.h"
#include "grpcpp/channel.h"
#include "proto/admin.grpc.pb.h"

namespace tessera {

// The metadata key that carries cluster.token on admin calls over TCP.
inline constexpr const char* kAdminTokenMetadataKey = kClusterTokenMetadataKey;

class Admin {
 public:
  // What the daemon lends the admin logic. Pointers are not owned and must outlive the Admin;
  // the cluster ones are null for a standalone daemon.
  struct Parts {
    const DaemonConfig* config = nullptr;
    std::string node_id;
    uint64_t incarnation = 0;
    int64_t started_unix_ms = 0;
    SnapshotStore* store = nullptr;
    Coordination* coordination = nullptr;
    FragmentStore* fragments = nullptr;
    CapacityBudget* fragment_budget = nullptr;
    Cluster* cluster = nullptr;
    PeerClient* peer_client = nullptr;
    // Called once DropMemory is accepted, after its reply is built: the daemon then shuts down,
    // deletes its segments and starts again as a new incarnation.
    std::function<void()> drop_memory;
  };
  explicit Admin(Parts parts);

  absl::Status GetStatus(const admin::GetStatusRequest& request,
                         admin::GetStatusResponse* response);
  absl::Status ListJobs(const admin::ListJobsRequest& request, admin::ListJobsResponse* response);
  absl::Status ListVersions(const admin::ListVersionsRequest& request,
                            admin::ListVersionsResponse* response);
  absl::Status Verify(const admin::VerifyRequest& request, admin::VerifyResponse* response);
  absl::Status Recover(const admin::RecoverRequest& request, admin::RecoverResponse* response);
  absl::Status ListTrainers(const admin::ListTrainersRequest& request,
                            admin::ListTrainersResponse* response);
  absl::Status SetDrillTarget(const admin::SetDrillTargetRequest& request,
                              admin::SetDrillTargetResponse* response);
  absl::Status DropMemory(const admin::DropMemoryRequest& request,
                          admin::DropMemoryResponse* response);
  absl::Status Corrupt(const admin::CorruptRequest& request, admin::CorruptResponse* response);
  absl::Status DeclareLost(const admin::DeclareLostRequest& request,
                           admin::DeclareLostResponse* response);
  // `owner_uid` set: the caller may drop only a job of that uid (SnapshotStore::DropJob).
  absl::Status DropJob(const admin::DropJobRequest& request, std::optional<uid_t> owner_uid,
                       admin::DropJobResponse* response);

  bool IsDrillTarget(const std::string& job_id) const;

 private:
  // A call to another member's admin service.
  template <typename Response>
  struct PeerAnswer {
    std::string node_id;
    std::string address;
    absl::Status status;
    Response response;
  };
  template <typename Request, typename Response>
  using StubMethod = grpc::Status (admin::Admin::Stub::*)(grpc::ClientContext*, const Request&,
                                                          Response*);
  // Asks every live member other than this one, in parallel.
  template <typename Request, typename Response>
  std::vector<PeerAnswer<Response>> AskPeers(StubMethod<Request, Response> method,
                                             const Request& request, absl::Duration timeout);
  // Asks one member (by node id, which must be live).
  template <typename Request, typename Response>
  absl::Status AskPeer(const std::string& node_id, StubMethod<Request, Response> method,
                       const Request& request, Response* response, absl::Duration timeout);
  // With mutual TLS, the stub's channel reaches only the daemon whose certificate names the
  // target's node.
  admin::Admin::Stub* StubFor(const PeerTarget& target);
  // With mutual TLS, kFailedPrecondition: the members take `method` only from an operator's
  // certificate (AdminService::RequireOperator), so this daemon does not forward it.
  absl::Status CheckForwardable(const char* method, const std::string& node_id) const;
  // With mutual TLS: gathers signed declarations that node_id at `incarnation` is lost, this
  // daemon's `own` first, from the live members, and hands them on until every live member took
  // the declaration or the members' timers had time to find it dead. Adds the members that took
  // it to response->nodes and the others, with why, to response->errors.
  void SpreadLostDeclaration(const std::string& node_id, uint64_t incarnation, std::string own,
                             admin::DeclareLostResponse* response);

  // What the live members hold, by job (job_id empty: every job). Members that could not be
  // asked are added to `errors`.
  std::map<std::string, JobHoldings> GatherHoldings(
      const std::string& job_id, bool local_only,
      google::protobuf::RepeatedPtrField<admin::NodeError>* errors);
  std::vector<JobView> AssessJobs(const std::string& job_id, bool local_only,
                                  google::protobuf::RepeatedPtrField<admin::NodeError>* errors);
  ProtectionContext Context() const;
  // Deadline of a call to another member that reads no bulk data.
  absl::Duration ControlTimeout() const;
  // `local_view`: the view holds only this member's shards and fragments, which cannot tell
  // whether the cluster protects the job: its health is LOCAL_VIEW and its restorable step -1.
  void FillJobStatus(const JobView& view, bool local_view, admin::JobStatus* out) const;
  void FillNodeInfo(admin::NodeInfo* info) const;
  void VerifyLocal(const std::string& job_id, const std::optional<int64_t>& step,
                   admin::VerifyResponse* response);
  // Reads fragments of (job, rank, step) from this node's store or a peer (thread-safe); adds the
  // bytes read over the network to *bytes_moved, which must outlive the reader.
  FragmentReader ReaderFor(const std::string& job_id, uint32_t rank, int64_t step,
                           std::atomic<uint64_t>* bytes_moved);
  // Verify's decode: rebuilds verdict's rank and step from k fragments of `holdings`.
  void DecodeVerdict(const std::string& job_id, JobHoldings holdings, admin::RankVerdict* verdict);
  absl::Status RebuildFromFragments(const std::string& job_id, uint32_t rank, int64_t step,
                                    admin::RecoverResponse* response);
  // Whether a node-targeted call is for this daemon: node_id empty or ours.
  bool IsSelf(const std::string& node_id) const {
    return node_id.empty() || node_id == parts_.node_id;
  }

  const Parts parts_;
  const std::string hostname_;
  mutable absl::Mutex mu_;
  std::set<std::string> drill_targets_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<admin::Admin::Stub>> stubs_ ABSL_GUARDED_BY(mu_);
};

class AdminService final : public admin::Admin::Service {
 public:
  // `admin` is not owned and must outlive the service. With over_tcp, every call must carry
  // `token` under kAdminTokenMetadataKey; an empty token refuses every call. Over the agent
  // socket (`caller_of` a peer's SO_PEERCRED), the calls that change data (Recover,
  // SetDrillTarget, DropMemory, Corrupt, DeclareLost) answer only root and the daemon's own uid:
  // the socket also admits trainers of other users. DropJob also answers the uid that registered
  // the job. Over TCP with mutual TLS, DropMemory, Corrupt, DeclareLost and DropJob answer only
  // an operator's certificate (one naming no node), never a member's.
  using CallerLookup = std::function<std::optional<Caller>(const std::string& peer)>;
  AdminService(Admin* admin, bool over_tcp, std::string token, CallerLookup caller_of = nullptr)
      : admin_(admin),
        over_tcp_(over_tcp),
        token_(std::move(token)),
        caller_of_(std::move(caller_of)) {}

  grpc::Status GetStatus(grpc::ServerContext* context, const admin::GetStatusRequest* request,
                         admin::GetStatusResponse* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const admin::ListJobsRequest* request,
                        admin::ListJobsResponse* response) override;
  grpc::Status ListVersions(grpc::ServerContext* context, const admin::ListVersionsRequest* request,
                            admin::ListVersionsResponse* response) override;
  grpc::Status Verify(grpc::ServerContext* context, const admin::VerifyRequest* request,
                      admin::VerifyResponse* response) override;
  grpc::Status Recover(grpc::ServerContext* context, const admin::RecoverRequest* request,
                       admin::RecoverResponse* response) override;
  grpc::Status ListTrainers(grpc::ServerContext* context, const admin::ListTrainersRequest* request,
                            admin::ListTrainersResponse* response) override;
  grpc::Status SetDrillTarget(grpc::ServerContext* context,
                              const admin::SetDrillTargetRequest* request,
                              admin::SetDrillTargetResponse* response) override;
  grpc::Status DropMemory(grpc::ServerContext* context, const admin::DropMemoryRequest* request,
                          admin::DropMemoryResponse* response) override;
  grpc::Status Corrupt(grpc::ServerContext* context, const admin::CorruptRequest* request,
                       admin::CorruptResponse* response) override;
  grpc::Status DeclareLost(grpc::ServerContext* context, const admin::DeclareLostRequest* request,
                           admin::DeclareLostResponse* response) override;
  grpc::Status DropJob(grpc::ServerContext* context, const admin::DropJobRequest* request,
                       admin::DropJobResponse* response) override;

 private:
  absl::Status Authenticate(const grpc::ServerContext* context) const;
  // Over the agent socket: OK for root and the daemon's own uid, kPermissionDenied otherwise.
  absl::Status AuthorizeChange(const char* method, const grpc::ServerContext* context) const;
  // Over TCP with mutual TLS: kPermissionDenied when the caller's certificate names a node (a
  // member's). For the calls that destroy data or fence a member (DropMemory, Corrupt,
  // DeclareLost, DropJob), which no daemon forwards to another's admin service: a member's
  // certificate is not an operator's word.
  absl::Status RequireOperator(const char* method, const grpc::ServerContext* context) const;
  // The uid a change must be limited to: none over TCP (the cluster token was checked) or for
  // root and the daemon's own uid; the caller's uid for any other caller of the agent socket;
  // kPermissionDenied for a caller that cannot be identified.
  absl::StatusOr<std::optional<uid_t>> ChangeLimitedToUid(const char* method,
                                                          const grpc::ServerContext* context) const;
  template <typename Body>
  grpc::Status Handle(const char* method, const grpc::ServerContext* context, Body body);
  // Handle, for a call that changes data: AuthorizeChange first.
  template <typename Body>
  grpc::Status HandleChange(const char* method, const grpc::ServerContext* context, Body body);
  // HandleChange, for a call only an operator may make: RequireOperator too.
  template <typename Body>
  grpc::Status HandleOperatorChange(const char* method, const grpc::ServerContext* context,
                                    Body body);

  Admin* const admin_;
  const bool over_tcp_;
  const std::string token_;
  const CallerLookup caller_of_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_ADMIN_ADMIN_SERVICE_H_
