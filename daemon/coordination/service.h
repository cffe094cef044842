// The Coordination gRPC service (proto/coordination.proto) and its client: thin adapters over a
// CoordinationHandler (ClusterCoordination in the daemon). Every request is validated (counts and
// sizes bounded, ids checked) before the handler sees it; a request from an older incarnation of
// a node (fenced) is refused with kFailedPrecondition; with a cluster token, every call must carry
// it (kUnauthenticated otherwise); with mutual TLS, `from` must be the node the caller's
// certificate names (kPermissionDenied otherwise, daemon/transfer/node_identity.h), and a
// ListJob answer must come from the node it names. A call that fails is counted in
// tessera_rpc_refusals_total{service="coordination"} and logged, at most 20 lines per 10 s per
// (method, code) (daemon/refusals.h).
//
// Thread-safety: handlers run concurrently on gRPC's threads; the client may be used from any
// thread.
#ifndef TESSERA_DAEMON_COORDINATION_SERVICE_H_
#define TESSERA_DAEMON_COORDINATION_SERVICE_H_

#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/coordination/messages.h"
#include "daemon/transfer/cluster_tls.h"
#include "grpcpp/grpcpp.h"
#include "proto/coordination.grpc.pb.h"

namespace tessera {

// What the service calls. Implementations must be thread-safe.
class CoordinationHandler {
 public:
  virtual ~CoordinationHandler() = default;
  // A report with step -1 asks for the job's state only.
  virtual absl::StatusOr<JobState> OnReport(const NodeIdentity& from,
                                            const ProtectedReport& report) = 0;
  virtual absl::Status OnPush(const NodeIdentity& from, const JobState& state) = 0;
  virtual absl::StatusOr<ResolveAnswer> OnResolve(const NodeIdentity& from,
                                                  const ResolveQuestion& question) = 0;
  virtual absl::StatusOr<JobListing> OnListJob(const NodeIdentity& from,
                                               const std::string& job_id) = 0;
  // A member asks this daemon, as the job's coordinator, to drop the job.
  virtual absl::StatusOr<JobDrop> OnDropJob(const NodeIdentity& /*from*/,
                                            const DropQuestion& /*question*/) {
    return absl::UnimplementedError("this daemon does not drop jobs");
  }
  // The job's coordinator dropped the job (kApply, state.dropped_epoch), asks what is held here
  // and which trainers run (kCheck; owner_uid: kPermissionDenied for another uid's job), or
  // abandoned the drop after its check (kAbandon).
  virtual absl::StatusOr<NodeDrop> OnApplyDrop(const NodeIdentity& /*from*/,
                                               const JobState& /*state*/, DropStep /*step*/,
                                               std::optional<uint32_t> /*owner_uid*/) {
    return absl::UnimplementedError("this daemon does not drop jobs");
  }
};

class CoordinationService final : public coordination::Coordination::Service {
 public:
  struct Options {
    std::string token;  // cluster.token; empty: none
    // Whether (node id, incarnation) is an older incarnation of a node (membership). Empty: none.
    std::function<bool(const std::string& node_id, uint64_t incarnation)> is_fenced;
  };
  // `handler` is not owned and must outlive the service.
  CoordinationService(CoordinationHandler* handler, Options options)
      : handler_(handler), options_(std::move(options)) {}

  grpc::Status ReportProtected(grpc::ServerContext* context,
                               const coordination::ReportProtectedRequest* request,
                               coordination::JobState* response) override;
  grpc::Status PushJobState(grpc::ServerContext* context,
                            const coordination::PushJobStateRequest* request,
                            coordination::PushJobStateResponse* response) override;
  grpc::Status ResolveRestore(grpc::ServerContext* context,
                              const coordination::ResolveRestoreRequest* request,
                              coordination::ResolveRestoreResponse* response) override;
  grpc::Status ListJob(grpc::ServerContext* context, const coordination::ListJobRequest* request,
                       coordination::ListJobResponse* response) override;
  grpc::Status DropJob(grpc::ServerContext* context, const coordination::DropJobRequest* request,
                       coordination::DropJobResponse* response) override;
  grpc::Status ApplyDrop(grpc::ServerContext* context,
                         const coordination::ApplyDropRequest* request,
                         coordination::NodeDrop* response) override;

 private:
  // Token and fencing checks, and the sender's identity.
  absl::StatusOr<NodeIdentity> Admit(const grpc::ServerContext& context,
                                     const coordination::NodeIdentity& from) const;

  CoordinationHandler* const handler_;
  const Options options_;
};

// The calling side, by the member called: its peer address ("host:port") and node id (with
// mutual TLS, only the daemon whose certificate names that node is talked to). A fake can stand
// in for it in unit tests.
class CoordinationClient {
 public:
  virtual ~CoordinationClient() = default;
  virtual absl::StatusOr<JobState> Report(const PeerTarget& member,
                                          const ProtectedReport& report) = 0;
  virtual absl::Status Push(const PeerTarget& member, const JobState& state) = 0;
  virtual absl::StatusOr<ResolveAnswer> Resolve(const PeerTarget& member,
                                                const ResolveQuestion& question) = 0;
  virtual absl::StatusOr<JobListing> ListJob(const PeerTarget& member,
                                             const std::string& job_id) = 0;
  virtual absl::StatusOr<JobDrop> DropJob(const PeerTarget& /*member*/,
                                          const DropQuestion& /*question*/) {
    return absl::UnimplementedError("no DropJob in this client");
  }
  virtual absl::StatusOr<NodeDrop> ApplyDrop(const PeerTarget& /*member*/,
                                             const JobState& /*state*/, DropStep /*step*/,
                                             std::optional<uint32_t> /*owner_uid*/) {
    return absl::UnimplementedError("no ApplyDrop in this client");
  }
};

// Over gRPC. Keeps at most `max_channels` channels (least recently used closed first), so the
// connections a daemon holds for coordination stay bounded whatever the cluster's size.
class GrpcCoordinationClient final : public CoordinationClient {
 public:
  struct Options {
    NodeIdentity self;
    std::string token;
    absl::Duration timeout = absl::Seconds(5);
    size_t max_channels = 64;
  };
  explicit GrpcCoordinationClient(Options options) : options_(std::move(options)) {}

  absl::StatusOr<JobState> Report(const PeerTarget& member, const ProtectedReport& report) override;
  absl::Status Push(const PeerTarget& member, const JobState& state) override;
  absl::StatusOr<ResolveAnswer> Resolve(const PeerTarget& member,
                                        const ResolveQuestion& question) override;
  absl::StatusOr<JobListing> ListJob(const PeerTarget& member, const std::string& job_id) override;
  absl::StatusOr<JobDrop> DropJob(const PeerTarget& member, const DropQuestion& question) override;
  absl::StatusOr<NodeDrop> ApplyDrop(const PeerTarget& member, const JobState& state, DropStep step,
                                     std::optional<uint32_t> owner_uid) override;

 private:
  std::shared_ptr<coordination::Coordination::Stub> Stub(const PeerTarget& member);
  void Prepare(grpc::ClientContext* context, absl::Duration timeout) const;

  const Options options_;
  absl::Mutex mu_;
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);  // most recent first
  std::map<std::string, std::pair<std::shared_ptr<coordination::Coordination::Stub>,
                                  std::list<std::string>::iterator>>
      stubs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_SERVICE_H_
