// The admin service (admin_service.h): Admin's status and listings, how it reaches the other
// members, and AdminService, the gRPC adapter. Verify, Recover and the drills' calls are in
// admin_actions.cc.
#include "daemon/transfer/cluster_tls.h"
#include "daemon/admin/admin_service.h"

#include <unistd.h>

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/version.h"
#include "daemon/admin/admin_internal.h"
#include "daemon/refusals.h"
#include "daemon/transfer/node_identity.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server_context.h"

namespace tessera {
namespace admin_internal {

void AddError(google::protobuf::RepeatedPtrField<admin::NodeError>* errors,
              const std::string& node_id, const std::string& address, const std::string& error) {
  admin::NodeError* e = errors->Add();
  e->set_node_id(node_id);
  e->set_address(address);
  e->set_error(error);
}

}  // namespace admin_internal

namespace {

using admin_internal::AddError;

std::string HostName() {
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) return "";
  return host;
}

admin::Health ToProto(JobHealth health) {
  switch (health) {
    case JobHealth::kProtected:
      return admin::PROTECTED;
    case JobHealth::kDegraded:
      return admin::DEGRADED;
    case JobHealth::kUnprotected:
      return admin::UNPROTECTED;
  }
  return admin::HEALTH_UNSPECIFIED;
}

}  // namespace

Admin::Admin(Parts parts) : parts_(std::move(parts)), hostname_(HostName()) {}

bool Admin::IsDrillTarget(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  return drill_targets_.count(job_id) > 0;
}

admin::Admin::Stub* Admin::StubFor(const PeerTarget& target) {
  absl::MutexLock lock(&mu_);
  auto& stub = stubs_[target.ToString()];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    stub = admin::Admin::NewStub(
        grpc::CreateCustomChannel(target.address, ClusterChannelCredentials(target.node_id), args));
  }
  return stub.get();
}

absl::Duration Admin::ControlTimeout() const {
  // A member that does not answer within the liveness timeout is about to be suspected anyway.
  return absl::Milliseconds(std::max<int64_t>(2000, parts_.config->liveness.timeout_ms));
}

ProtectionContext Admin::Context() const {
  ProtectionContext context;
  context.cluster = parts_.cluster != nullptr;
  context.live_members = parts_.cluster ? parts_.cluster->LiveNodeIds().size() : 1;
  context.k = parts_.config->ec.k;
  context.m = parts_.config->ec.m;
  return context;
}

std::map<std::string, JobHoldings> Admin::GatherHoldings(
    const std::string& job_id, bool local_only,
    google::protobuf::RepeatedPtrField<admin::NodeError>* errors) {
  std::map<std::string, JobHoldings> jobs;
  std::vector<ShardInfo> shards;
  for (const auto& v : parts_.store->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed) continue;
    ShardInfo s;
    s.job_id = v.job_id;
    s.rank = v.rank;
    s.step = v.step;
    s.payload_bytes = v.payload_bytes;
    s.payload_crc32c = v.payload_crc32c;
    shards.push_back(s);
  }
  AddHoldings(parts_.node_id, shards,
              parts_.fragments ? parts_.fragments->List(job_id) : std::vector<FragmentStatus>{},
              &jobs);
  if (local_only || parts_.cluster == nullptr) return jobs;
  for (const Cluster::PeerView& peer : parts_.cluster->Peers()) {
    if (!peer.alive) continue;
    auto held = parts_.peer_client->ListHeld(PeerTarget(peer.address, peer.node_id), job_id);
    if (!held.ok()) {
      AddError(errors, peer.node_id, peer.address,
               absl::StrCat("ListHeld: ", held.status().ToString()));
      continue;
    }
    AddHoldings(peer.node_id, held->shards, held->fragments, &jobs);
  }
  return jobs;
}

std::vector<JobView> Admin::AssessJobs(
    const std::string& job_id, bool local_only,
    google::protobuf::RepeatedPtrField<admin::NodeError>* errors) {
  std::map<std::string, JobHoldings> holdings = GatherHoldings(job_id, local_only, errors);
  std::map<std::string, uint32_t> world_sizes;
  for (const SnapshotStore::RankInfo& r : parts_.store->ListRanks(job_id)) {
    world_sizes[r.job_id] = std::max(world_sizes[r.job_id], r.world_size);
    holdings[r.job_id];  // a registered job that holds nothing yet is listed too
  }
  const ProtectionContext context = Context();
  std::vector<JobView> views;
  for (const auto& [job, held] : holdings) {
    views.push_back(AssessJob(job, held, world_sizes[job], parts_.store->committed(job), context));
  }
  return views;
}

void Admin::FillJobStatus(const JobView& view, bool local_view, admin::JobStatus* out) const {
  out->set_job_id(view.job_id);
  out->set_world_size(view.world_size);
  out->set_newest_step(view.newest_step);
  out->set_committed_step(view.committed_step);
  out->set_restorable_step(local_view ? -1 : view.restorable_step);
  out->set_health(local_view ? admin::LOCAL_VIEW : ToProto(view.health));
  out->set_reason(local_view ? absl::StrCat("local view of ", parts_.node_id,
                                            ": ask without --local for the job's protection")
                             : view.reason);
  out->set_ec_k(view.k);
  out->set_ec_m(view.m);
  for (const std::string& node : view.nodes) out->add_nodes(node);
  out->set_drill_target(IsDrillTarget(view.job_id));
  uint32_t here = 0;
  for (const SnapshotStore::RankInfo& r : parts_.store->ListRanks(view.job_id)) {
    here += r.registered && r.alive;
  }
  out->set_ranks_here(here);
}

void Admin::FillNodeInfo(admin::NodeInfo* info) const {
  const DaemonConfig& config = *parts_.config;
  info->set_node_id(parts_.node_id);
  info->set_incarnation(parts_.incarnation);
  info->set_pid(static_cast<int32_t>(getpid()));
  info->set_version(kVersion);
  info->set_peer_address(parts_.cluster ? config.PeerAddress() : "");
  info->set_agent_socket(config.agent.socket_path);
  info->set_metrics_address(config.metrics.listen_address);
  info->set_started_unix_ms(parts_.started_unix_ms);
  info->set_ec_k(config.ec.k);
  info->set_ec_m(config.ec.m);
  info->set_hostname(hostname_);
  const SnapshotStore::Stats stats = parts_.store->stats();
  admin::MemoryUsage* memory = info->mutable_memory();
  memory->set_capacity_bytes(stats.capacity_bytes);
  memory->set_slot_bytes(stats.used_bytes);
  memory->set_slot_segments(stats.segments);
  if (parts_.fragment_budget != nullptr) {
    memory->set_fragment_bytes(parts_.fragment_budget->used_bytes());
    memory->set_fragment_capacity_bytes(parts_.fragment_budget->capacity_bytes());
  }
  if (parts_.fragments != nullptr) {
    const FragmentStore::Stats f = parts_.fragments->stats();
    memory->set_fragments(f.fragments_writing + f.fragments_sealed);
  }
  uint32_t registered = 0;
  for (const SnapshotStore::RankInfo& r : parts_.store->ListRanks("")) {
    registered += r.registered && r.alive;
  }
  info->set_ranks_registered(registered);
}

absl::Status Admin::GetStatus(const admin::GetStatusRequest& request,
                              admin::GetStatusResponse* response) {
  FillNodeInfo(response->mutable_self());
  admin::MemberStatus* self = response->add_members();
  self->set_node_id(parts_.node_id);
  self->set_address(parts_.cluster ? parts_.config->PeerAddress() : "");
  self->set_incarnation(parts_.incarnation);
  self->set_state(admin::MemberStatus::SELF);
  self->set_last_heard_ms_ago(0);
  *self->mutable_info() = response->self();
  if (parts_.cluster != nullptr) {
    std::vector<Cluster::PeerView> peers = parts_.cluster->Peers();
    std::sort(peers.begin(), peers.end(), [](const auto& a, const auto& b) {
      return std::tie(a.node_id, a.address) < std::tie(b.node_id, b.address);
    });
    std::map<std::string, admin::MemberStatus*> by_address;
    const int64_t now = NowUnixMs();
    for (const Cluster::PeerView& peer : peers) {
      admin::MemberStatus* m = response->add_members();
      m->set_node_id(peer.node_id);
      m->set_address(peer.address);
      m->set_incarnation(peer.incarnation);
      m->set_state(peer.alive                    ? admin::MemberStatus::ALIVE
                   : peer.last_heard_unix_ms < 0 ? admin::MemberStatus::UNKNOWN
                                                 : admin::MemberStatus::SUSPECTED);
      m->set_last_heard_ms_ago(peer.last_heard_unix_ms < 0 ? -1 : now - peer.last_heard_unix_ms);
      if (!peer.alive) {
        m->set_error(peer.last_heard_unix_ms < 0
                         ? "never heard from"
                         : absl::StrCat("suspected: not heard for ", now - peer.last_heard_unix_ms,
                                        " ms (liveness.timeout_ms is ",
                                        parts_.config->liveness.timeout_ms, ")"));
        response->add_warnings(absl::StrCat(
            "member ", peer.node_id.empty() ? peer.address : peer.node_id, " at ", peer.address,
            " is ", peer.last_heard_unix_ms < 0 ? "not heard from yet" : "suspected",
            ": its fragments count as erasures"));
      }
      by_address[peer.address] = m;
    }
    if (!request.local_only()) {
      admin::GetStatusRequest local;
      local.set_local_only(true);
      for (auto& answer : AskPeers(&admin::Admin::Stub::GetStatus, local, ControlTimeout())) {
        admin::MemberStatus* m = by_address[answer.address];
        if (answer.status.ok()) {
          *m->mutable_info() = answer.response.self();
        } else {
          m->set_error(answer.status.ToString());
          AddError(response->mutable_errors(), answer.node_id, answer.address,
                   answer.status.ToString());
        }
      }
    }
    if (parts_.config->cluster.token.empty()) {
      response->add_warnings(
          "INSECURE (cluster.insecure = true): no cluster.token, so any process that reaches "
          "the peer port can read and write every job's state; the admin service does not "
          "answer over TCP, and this daemon cannot ask other members for their memory, "
          "trainers or CRC checks");
    }
  } else {
    response->add_warnings(
        "standalone daemon (peer.listen_address is empty): no cross-node protection");
  }
  const bool local_view = request.local_only() && parts_.cluster != nullptr;
  for (const JobView& view : AssessJobs("", request.local_only(), response->mutable_errors())) {
    FillJobStatus(view, local_view, response->add_jobs());
  }
  return absl::OkStatus();
}

absl::Status Admin::ListJobs(const admin::ListJobsRequest& request,
                             admin::ListJobsResponse* response) {
  const bool local_view = request.local_only() && parts_.cluster != nullptr;
  for (const JobView& view : AssessJobs("", request.local_only(), response->mutable_errors())) {
    FillJobStatus(view, local_view, response->add_jobs());
  }
  return absl::OkStatus();
}

absl::Status Admin::ListVersions(const admin::ListVersionsRequest& request,
                                 admin::ListVersionsResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  std::vector<JobView> views = AssessJobs(request.job_id(), false, response->mutable_errors());
  if (views.empty()) {
    std::vector<std::string> known;
    google::protobuf::RepeatedPtrField<admin::NodeError> ignored;
    for (const JobView& v : AssessJobs("", false, &ignored)) known.push_back(v.job_id);
    return absl::NotFoundError(
        absl::StrCat("job '", request.job_id(), "' is not held by any live member; jobs held: ",
                     known.empty() ? std::string("none") : absl::StrJoin(known, ", ")));
  }
  const JobView& view = views.front();
  response->set_job_id(view.job_id);
  response->set_world_size(view.world_size);
  for (const StepView& sv : view.steps) {
    admin::StepVersion* out = response->add_steps();
    out->set_step(sv.step);
    out->set_committed(sv.step == view.committed_step);
    out->set_restorable(sv.restorable);
    for (uint32_t rank : sv.missing_ranks) out->add_missing_ranks(rank);
    for (const RankAtStep& r : sv.ranks) {
      admin::RankVersion* rv = out->add_ranks();
      rv->set_rank(r.rank);
      for (const std::string& node : r.shard_nodes) rv->add_shard_nodes(node);
      rv->set_shard_bytes(r.shard_bytes);
      rv->set_shard_crc32c(r.shard_crc32c);
      rv->set_ec_k(r.k);
      rv->set_ec_m(r.m);
      for (const auto& [index, node] : r.fragments) {
        rv->add_fragment_indexes(index);
        rv->add_fragment_nodes(node);
      }
      rv->set_restorable(r.restorable);
    }
  }
  return absl::OkStatus();
}

absl::Status Admin::ListTrainers(const admin::ListTrainersRequest& request,
                                 admin::ListTrainersResponse* response) {
  if (!request.job_id().empty()) TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  FillNodeInfo(response->add_daemons());
  for (const SnapshotStore::RankInfo& r : parts_.store->ListRanks(request.job_id())) {
    admin::Trainer* t = response->add_trainers();
    t->set_node_id(parts_.node_id);
    t->set_hostname(hostname_);
    t->set_job_id(r.job_id);
    t->set_rank(r.rank);
    t->set_world_size(r.world_size);
    t->set_pid(static_cast<int32_t>(r.owner.pid));
    t->set_uid(r.owner.uid);
    t->set_registered(r.registered);
    t->set_alive(r.alive);
    t->set_newest_sealed_step(r.newest_sealed_step);
    t->set_resume_step(r.resume_step);
  }
  if (request.local_only()) return absl::OkStatus();
  admin::ListTrainersRequest local = request;
  local.set_local_only(true);
  for (auto& answer : AskPeers(&admin::Admin::Stub::ListTrainers, local, ControlTimeout())) {
    if (!answer.status.ok()) {
      AddError(response->mutable_errors(), answer.node_id, answer.address,
               answer.status.ToString());
      continue;
    }
    for (const auto& t : answer.response.trainers()) *response->add_trainers() = t;
    for (const auto& d : answer.response.daemons()) *response->add_daemons() = d;
  }
  return absl::OkStatus();
}

absl::Status AdminService::Authenticate(const grpc::ServerContext* context) const {
  if (!over_tcp_) return absl::OkStatus();
  if (token_.empty()) {
    return absl::UnauthenticatedError(
        "the admin service does not answer over TCP on this daemon: cluster.token is not set "
        "(set cluster.token or cluster.token_file, or use the agent socket)");
  }
  return CheckClusterToken(*context, token_, "admin calls");
}

absl::Status AdminService::AuthorizeChange(const char* method,
                                           const grpc::ServerContext* context) const {
  if (over_tcp_) return absl::OkStatus();  // the cluster token was checked
  const uid_t self = geteuid();
  std::optional<Caller> caller;
  if (caller_of_) caller = caller_of_(context->peer());
  if (caller && (caller->uid == 0 || caller->uid == self)) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      method, " changes stored data: over the agent socket only root and the daemon's uid (",
      self, ") may call it; the caller is ",
      caller ? absl::StrCat("uid ", caller->uid) : std::string("unidentified"),
      " (run the CLI as root, or over TCP with cluster.token)"));
}

absl::Status AdminService::RequireOperator(const char* method,
                                           const grpc::ServerContext* context) const {
  if (!over_tcp_ || context->auth_context() == nullptr) return absl::OkStatus();
  TESSERA_ASSIGN_OR_RETURN(PeerIdentity caller, IdentityOf(*context->auth_context()));
  if (!caller.certified || caller.node_id.empty()) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      method, " destroys data or fences a member: over TCP with mutual TLS it answers only an "
      "operator's certificate (one naming no node: tools/make-cluster-certs.sh --client NAME), "
      "not ", caller.Describe(), " (a member's certificate is not an operator's word; on that "
      "node, use its agent socket)"));
}

absl::StatusOr<std::optional<uid_t>> AdminService::ChangeLimitedToUid(
    const char* method, const grpc::ServerContext* context) const {
  if (over_tcp_) {  // the cluster token was checked
    TESSERA_RETURN_IF_ERROR(RequireOperator(method, context));
    return std::optional<uid_t>();
  }
  const uid_t self = geteuid();
  std::optional<Caller> caller;
  if (caller_of_) caller = caller_of_(context->peer());
  if (!caller) {
    return absl::PermissionDeniedError(absl::StrCat(
        method, " changes stored data and the caller on the agent socket cannot be identified: "
        "run the CLI as root, as the daemon's uid (", self, ") or as the job's uid"));
  }
  if (caller->uid == 0 || caller->uid == self) return std::optional<uid_t>();
  return std::optional<uid_t>(caller->uid);
}

template <typename Body>
grpc::Status AdminService::Handle(const char* method, const grpc::ServerContext* context,
                                  Body body) {
  absl::Status status = Authenticate(context);
  if (status.ok()) status = body();
  return AnswerCall("admin", method, status);
}

template <typename Body>
grpc::Status AdminService::HandleChange(const char* method, const grpc::ServerContext* context,
                                        Body body) {
  return Handle(method, context, [&]() -> absl::Status {
    TESSERA_RETURN_IF_ERROR(AuthorizeChange(method, context));
    return body();
  });
}

template <typename Body>
grpc::Status AdminService::HandleOperatorChange(const char* method,
                                                const grpc::ServerContext* context, Body body) {
  return HandleChange(method, context, [&]() -> absl::Status {
    TESSERA_RETURN_IF_ERROR(RequireOperator(method, context));
    return body();
  });
}

grpc::Status AdminService::GetStatus(grpc::ServerContext* context,
                                     const admin::GetStatusRequest* request,
                                     admin::GetStatusResponse* response) {
  return Handle("GetStatus", context, [&] { return admin_->GetStatus(*request, response); });
}

grpc::Status AdminService::ListJobs(grpc::ServerContext* context,
                                    const admin::ListJobsRequest* request,
                                    admin::ListJobsResponse* response) {
  return Handle("ListJobs", context, [&] { return admin_->ListJobs(*request, response); });
}

grpc::Status AdminService::ListVersions(grpc::ServerContext* context,
                                        const admin::ListVersionsRequest* request,
                                        admin::ListVersionsResponse* response) {
  return Handle("ListVersions", context, [&] { return admin_->ListVersions(*request, response); });
}

grpc::Status AdminService::Verify(grpc::ServerContext* context, const admin::VerifyRequest* request,
                                  admin::VerifyResponse* response) {
  return Handle("Verify", context, [&] { return admin_->Verify(*request, response); });
}

grpc::Status AdminService::Recover(grpc::ServerContext* context,
                                   const admin::RecoverRequest* request,
                                   admin::RecoverResponse* response) {
  return HandleChange("Recover", context, [&] { return admin_->Recover(*request, response); });
}

grpc::Status AdminService::ListTrainers(grpc::ServerContext* context,
                                        const admin::ListTrainersRequest* request,
                                        admin::ListTrainersResponse* response) {
  return Handle("ListTrainers", context, [&] { return admin_->ListTrainers(*request, response); });
}

grpc::Status AdminService::SetDrillTarget(grpc::ServerContext* context,
                                          const admin::SetDrillTargetRequest* request,
                                          admin::SetDrillTargetResponse* response) {
  return HandleChange("SetDrillTarget", context,
                [&] { return admin_->SetDrillTarget(*request, response); });
}

grpc::Status AdminService::DropMemory(grpc::ServerContext* context,
                                      const admin::DropMemoryRequest* request,
                                      admin::DropMemoryResponse* response) {
  return HandleOperatorChange(
      "DropMemory", context, [&] { return admin_->DropMemory(*request, response); });
}

grpc::Status AdminService::Corrupt(grpc::ServerContext* context,
                                   const admin::CorruptRequest* request,
                                   admin::CorruptResponse* response) {
  return HandleOperatorChange(
      "Corrupt", context, [&] { return admin_->Corrupt(*request, response); });
}

grpc::Status AdminService::DeclareLost(grpc::ServerContext* context,
                                       const admin::DeclareLostRequest* request,
                                       admin::DeclareLostResponse* response) {
  return HandleOperatorChange(
      "DeclareLost", context, [&] { return admin_->DeclareLost(*request, response); });
}

grpc::Status AdminService::DropJob(grpc::ServerContext* context,
                                   const admin::DropJobRequest* request,
                                   admin::DropJobResponse* response) {
  return Handle("DropJob", context, [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(std::optional<uid_t> owner_uid,
                             ChangeLimitedToUid("DropJob", context));
    return admin_->DropJob(*request, owner_uid, response);
  });
}

}  // namespace tessera
