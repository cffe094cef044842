#include "daemon/coordination/service.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/status.h"
#include "daemon/refusals.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/cluster_token.h"
#include "daemon/transfer/node_identity.h"

namespace tessera {

using coordination_wire::FromProto;
using coordination_wire::ToProto;

namespace {

// A call's answer; a failure is counted and logged (refusals.h).
grpc::Status Answer(const char* method, const absl::Status& status) {
  return AnswerCall("coordination", method, status);
}

}  // namespace

absl::StatusOr<NodeIdentity> CoordinationService::Admit(
    const grpc::ServerContext& context, const coordination::NodeIdentity& from) const {
  if (!options_.token.empty()) {
    TESSERA_RETURN_IF_ERROR(CheckClusterToken(context, options_.token, "coordination calls"));
  }
  if (from.node_id().empty() || from.node_id().size() > 256 || from.incarnation() == 0) {
    return absl::InvalidArgumentError(
        "from: the sender's node_id (1..256 bytes) and incarnation (> 0) are required");
  }
  TESSERA_RETURN_IF_ERROR(RequireNodeCaller(context, "coordination calls").status());
  TESSERA_RETURN_IF_ERROR(CheckCallerIs(context, from.node_id(), "from.node_id"));
  if (options_.is_fenced && options_.is_fenced(from.node_id(), from.incarnation())) {
    return absl::FailedPreconditionError(
        absl::StrCat("node '", from.node_id(), "' incarnation ", from.incarnation(),
                     " is fenced: a newer incarnation of that node is a member"));
  }
  return FromProto(from);
}

grpc::Status CoordinationService::ReportProtected(
    grpc::ServerContext* context, const coordination::ReportProtectedRequest* request,
    coordination::JobState* response) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    ProtectedReport report;
    TESSERA_RETURN_IF_ERROR(FromProto(*request, &report));
    TESSERA_ASSIGN_OR_RETURN(JobState state, handler_->OnReport(from, report));
    ToProto(state, response);
    return absl::OkStatus();
  }();
  return Answer("ReportProtected", status);
}

grpc::Status CoordinationService::PushJobState(grpc::ServerContext* context,
                                               const coordination::PushJobStateRequest* request,
                                               coordination::PushJobStateResponse*) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    JobState state;
    TESSERA_RETURN_IF_ERROR(FromProto(request->state(), &state));
    return handler_->OnPush(from, state);
  }();
  return Answer("PushJobState", status);
}

grpc::Status CoordinationService::ResolveRestore(
    grpc::ServerContext* context, const coordination::ResolveRestoreRequest* request,
    coordination::ResolveRestoreResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    ResolveQuestion question;
    TESSERA_RETURN_IF_ERROR(FromProto(*request, &question));
    TESSERA_ASSIGN_OR_RETURN(ResolveAnswer answer, handler_->OnResolve(from, question));
    ToProto(answer, response);
    return absl::OkStatus();
  }();
  return Answer("ResolveRestore", status);
}

grpc::Status CoordinationService::ListJob(grpc::ServerContext* context,
                                          const coordination::ListJobRequest* request,
                                          coordination::ListJobResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    TESSERA_ASSIGN_OR_RETURN(JobListing listing, handler_->OnListJob(from, request->job_id()));
    ToProto(listing, response);
    return absl::OkStatus();
  }();
  return Answer("ListJob", status);
}

grpc::Status CoordinationService::DropJob(grpc::ServerContext* context,
                                          const coordination::DropJobRequest* request,
                                          coordination::DropJobResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    DropQuestion question;
    TESSERA_RETURN_IF_ERROR(FromProto(*request, &question));
    TESSERA_ASSIGN_OR_RETURN(JobDrop drop, handler_->OnDropJob(from, question));
    ToProto(drop, response);
    return absl::OkStatus();
  }();
  return Answer("DropJob", status);
}

grpc::Status CoordinationService::ApplyDrop(grpc::ServerContext* context,
                                            const coordination::ApplyDropRequest* request,
                                            coordination::NodeDrop* response) {
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(NodeIdentity from, Admit(*context, request->from()));
    JobState state;
    TESSERA_RETURN_IF_ERROR(FromProto(request->state(), &state));
    if (request->check_only() && request->abandon()) {
      return absl::InvalidArgumentError(
          "check_only and abandon: a drop's check, or the drop abandoned, not both");
    }
    const DropStep step = request->check_only() ? DropStep::kCheck
                          : request->abandon()  ? DropStep::kAbandon
                                                : DropStep::kApply;
    if (step == DropStep::kApply && state.dropped_epoch == 0) {
      return absl::InvalidArgumentError("state.dropped_epoch: a drop needs its epoch (> 0)");
    }
    std::optional<uint32_t> owner_uid;
    if (request->restrict_to_uid()) owner_uid = request->owner_uid();
    TESSERA_ASSIGN_OR_RETURN(NodeDrop drop, handler_->OnApplyDrop(from, state, step, owner_uid));
    ToProto(drop, response);
    return absl::OkStatus();
  }();
  return Answer("ApplyDrop", status);
}

std::shared_ptr<coordination::Coordination::Stub> GrpcCoordinationClient::Stub(
    const PeerTarget& member) {
  const std::string id = member.ToString();
  absl::MutexLock lock(&mu_);
  auto it = stubs_.find(id);
  if (it != stubs_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second.second);
    return it->second.first;
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  auto stub = coordination::Coordination::NewStub(
      grpc::CreateCustomChannel(member.address, ClusterChannelCredentials(member.node_id), args));
  std::shared_ptr<coordination::Coordination::Stub> shared(std::move(stub));
  lru_.push_front(id);
  stubs_[id] = {shared, lru_.begin()};
  while (stubs_.size() > options_.max_channels) {
    stubs_.erase(lru_.back());
    lru_.pop_back();
  }
  return shared;
}

void GrpcCoordinationClient::Prepare(grpc::ClientContext* context, absl::Duration timeout) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  if (!options_.token.empty()) context->AddMetadata(kClusterTokenMetadataKey, options_.token);
}

absl::StatusOr<JobState> GrpcCoordinationClient::Report(const PeerTarget& member,
                                                        const ProtectedReport& report) {
  coordination::ReportProtectedRequest request;
  ToProto(options_.self, request.mutable_from());
  ToProto(report, &request);
  coordination::JobState response;
  grpc::ClientContext context;
  Prepare(&context, options_.timeout);
  TESSERA_RETURN_IF_ERROR(
      FromGrpcStatus(Stub(member)->ReportProtected(&context, request, &response)));
  JobState state;
  TESSERA_RETURN_IF_ERROR(FromProto(response, &state));
  return state;
}

absl::Status GrpcCoordinationClient::Push(const PeerTarget& member, const JobState& state) {
  coordination::PushJobStateRequest request;
  ToProto(options_.self, request.mutable_from());
  ToProto(state, request.mutable_state());
  coordination::PushJobStateResponse response;
  grpc::ClientContext context;
  Prepare(&context, options_.timeout);
  return FromGrpcStatus(Stub(member)->PushJobState(&context, request, &response));
}

absl::StatusOr<ResolveAnswer> GrpcCoordinationClient::Resolve(const PeerTarget& member,
                                                              const ResolveQuestion& question) {
  coordination::ResolveRestoreRequest request;
  ToProto(options_.self, request.mutable_from());
  ToProto(question, &request);
  coordination::ResolveRestoreResponse response;
  grpc::ClientContext context;
  // The coordinator asks the job's nodes in turn: give it more than one call's time.
  Prepare(&context, options_.timeout * 3);
  TESSERA_RETURN_IF_ERROR(
      FromGrpcStatus(Stub(member)->ResolveRestore(&context, request, &response)));
  ResolveAnswer answer;
  TESSERA_RETURN_IF_ERROR(FromProto(response, &answer));
  return answer;
}

absl::StatusOr<JobListing> GrpcCoordinationClient::ListJob(const PeerTarget& member,
                                                           const std::string& job_id) {
  coordination::ListJobRequest request;
  ToProto(options_.self, request.mutable_from());
  request.set_job_id(job_id);
  coordination::ListJobResponse response;
  grpc::ClientContext context;
  Prepare(&context, options_.timeout);
  TESSERA_RETURN_IF_ERROR(FromGrpcStatus(Stub(member)->ListJob(&context, request, &response)));
  TESSERA_RETURN_IF_ERROR(CheckServerIs(context, response.node().node_id(), "a ListJob answer"));
  JobListing listing;
  TESSERA_RETURN_IF_ERROR(FromProto(response, &listing));
  return listing;
}

absl::StatusOr<JobDrop> GrpcCoordinationClient::DropJob(const PeerTarget& member,
                                                        const DropQuestion& question) {
  coordination::DropJobRequest request;
  ToProto(options_.self, request.mutable_from());
  ToProto(question, &request);
  coordination::DropJobResponse response;
  grpc::ClientContext context;
  // The coordinator lists every member, then tells every member: two rounds of calls.
  Prepare(&context, options_.timeout * 3);
  TESSERA_RETURN_IF_ERROR(FromGrpcStatus(Stub(member)->DropJob(&context, request, &response)));
  JobDrop drop;
  TESSERA_RETURN_IF_ERROR(FromProto(response, &drop));
  return drop;
}

absl::StatusOr<NodeDrop> GrpcCoordinationClient::ApplyDrop(const PeerTarget& member,
                                                           const JobState& state, DropStep step,
                                                           std::optional<uint32_t> owner_uid) {
  coordination::ApplyDropRequest request;
  ToProto(options_.self, request.mutable_from());
  ToProto(state, request.mutable_state());
  request.set_check_only(step == DropStep::kCheck);
  request.set_abandon(step == DropStep::kAbandon);
  request.set_restrict_to_uid(owner_uid.has_value());
  request.set_owner_uid(owner_uid.value_or(0));
  coordination::NodeDrop response;
  grpc::ClientContext context;
  Prepare(&context, options_.timeout);
  TESSERA_RETURN_IF_ERROR(FromGrpcStatus(Stub(member)->ApplyDrop(&context, request, &response)));
  NodeDrop drop;
  TESSERA_RETURN_IF_ERROR(FromProto(response, &drop));
  return drop;
}

}  // namespace tessera
