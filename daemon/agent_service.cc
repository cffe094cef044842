#include "daemon/agent_service.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/segment.h"
#include "common/status.h"
#include "daemon/metrics/metrics.h"
#include "daemon/refusals.h"

namespace tessera {
namespace {

// Runs `body` and converts its status; failures are counted and logged (RecordRefusal).
template <typename Body>
grpc::Status Handle(const char* method, Body body) {
  return AnswerCall("agent", method, body());
}

}  // namespace

absl::StatusOr<Caller> AgentService::CallerOf(grpc::ServerContext* context) const {
  std::optional<Caller> caller = credentials_->Lookup(context->peer());
  if (!caller) {
    return absl::UnauthenticatedError(absl::StrCat(
        "peer '", context->peer(), "' has no credentials: connect through the agent Unix socket"));
  }
  return *caller;
}

void AgentService::CountSkips(const std::string& job_id, uint32_t rank, uint64_t skipped_total) {
  absl::MutexLock lock(&skips_mu_);
  uint64_t& last = skips_reported_[{job_id, rank}];
  // A smaller count comes from a new agent (a restarted trainer): all of it is new.
  const uint64_t added = skipped_total >= last ? skipped_total - last : skipped_total;
  last = skipped_total;
  if (added > 0) Metrics().skips->Increment(added);
}

grpc::Status AgentService::Register(grpc::ServerContext* context,
                                    const agent::RegisterRequest* request,
                                    agent::RegisterResponse* response) {
  return Handle("Register", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    std::vector<EntrySpec> entries(request->entries().begin(), request->entries().end());
    TESSERA_ASSIGN_OR_RETURN(
        SnapshotStore::RegisterResult result,
        store_->Register(request->job_id(), request->rank(), request->world_size(), entries,
                         caller));
    for (const auto& path : result.slot_paths) response->add_slot_paths(path);
    response->set_segment_bytes(result.segment_bytes);
    response->set_header_bytes(kSegmentHeaderBytes);
    for (uint64_t offset : result.layout.entry_offsets) response->add_entry_offsets(offset);
    response->set_manifest_offset(result.layout.manifest_offset);
    response->set_manifest_capacity(result.layout.manifest_capacity);
    response->set_newest_sealed_step(result.newest_sealed_step);
    return absl::OkStatus();
  });
}

grpc::Status AgentService::BeginSnapshot(grpc::ServerContext* context,
                                         const agent::BeginSnapshotRequest* request,
                                         agent::BeginSnapshotResponse* response) {
  return Handle("BeginSnapshot", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    absl::StatusOr<uint32_t> slot =
        store_->BeginSnapshot(request->job_id(), request->rank(), request->step(), caller,
                              request->replace_uncommitted());
    if (absl::IsUnavailable(slot.status())) Metrics().begin_refused->Increment();
    // Counted only for a valid request (one that names a rank the store knows).
    if (slot.ok() || absl::IsUnavailable(slot.status())) {
      CountSkips(request->job_id(), request->rank(), request->skipped_snapshots());
    }
    TESSERA_RETURN_IF_ERROR(slot.status());
    response->set_slot_index(*slot);
    return absl::OkStatus();
  });
}

grpc::Status AgentService::SealSnapshot(grpc::ServerContext* context,
                                        const agent::SealSnapshotRequest* request,
                                        agent::SealSnapshotResponse* response) {
  return Handle("SealSnapshot", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    TESSERA_ASSIGN_OR_RETURN(SnapshotStore::SealResult sealed,
                             store_->SealSnapshot(request->job_id(), request->rank(),
                                                  request->step(), request->manifest_bytes(),
                                                  caller,
                                                  request->has_payload_crc32c()
                                                      ? std::optional<uint32_t>(
                                                            request->payload_crc32c())
                                                      : std::nullopt));
    response->set_payload_crc32c(sealed.payload_crc32c);
    response->set_payload_bytes(sealed.payload_bytes);
    coordination_->OnSealed(request->job_id(), request->rank(), request->step(), sealed);
    return absl::OkStatus();
  });
}

grpc::Status AgentService::ListVersions(grpc::ServerContext* context,
                                        const agent::ListVersionsRequest* request,
                                        agent::ListVersionsResponse* response) {
  return Handle("ListVersions", [&]() -> absl::Status {
    TESSERA_RETURN_IF_ERROR(CallerOf(context).status());
    if (!request->job_id().empty()) TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    for (const auto& v : store_->ListVersions(request->job_id())) {
      agent::Version* out = response->add_versions();
      out->set_rank(v.rank);
      out->set_step(v.step);
      out->set_payload_bytes(v.payload_bytes);
      out->set_payload_crc32c(v.payload_crc32c);
      out->set_state(SegmentStateName(v.state));
    }
    return absl::OkStatus();
  });
}

grpc::Status AgentService::FindLatestRestorable(
    grpc::ServerContext* context, const agent::FindLatestRestorableRequest* request,
    agent::FindLatestRestorableResponse* response) {
  return Handle("FindLatestRestorable", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    // A world of 2^32 ranks once grew the daemon by gigabytes past its caller's deadline.
    TESSERA_RETURN_IF_ERROR(ValidateRankAndWorldSize(request->rank(), request->world_size()));
    TESSERA_RETURN_IF_ERROR(store_->CheckJobAccess(request->job_id(), caller));
    // With resume, the caller's later steps belong to the abandoned run and are released (the
    // coordination does it, for this rank only).
    std::optional<uint32_t> resuming;
    if (request->resume()) resuming = request->rank();
    // The trainer run: its process (pid, below 2^22, and start time). A retried question of the
    // same process is the same resume.
    const uint64_t run_id =
        (ProcessStartTicks(caller.pid) << 22) | (static_cast<uint64_t>(caller.pid) & 0x3FFFFF);
    auto job_wide = coordination_->FindLatestRestorable(request->job_id(), request->world_size(),
                                                        resuming, run_id);
    int64_t step;
    if (job_wide.ok()) {
      step = *job_wide;
    } else if (absl::IsNotFound(job_wide.status()) && !store_->clustered() &&
               !store_->HoldsWholeJob(request->job_id())) {
      // The job's other ranks are on daemons this one does not see (no cluster): the best this
      // daemon can answer is the caller's own newest sealed step.
      step = -1;
      for (const auto& v : store_->ListVersions(request->job_id())) {
        if (v.rank == request->rank() && v.state == SegmentState::kSealed) step = std::max(step, v.step);
      }
      if (step < 0) return job_wide.status();
      if (request->resume()) store_->RollbackRank(request->job_id(), request->rank(), step);
      Logger("agent-service")->info(
          "job '{}' rank {}: ranks on other daemons are not visible (no cluster), so it resumes "
          "from its own newest sealed step {}", request->job_id(), request->rank(), step);
    } else {
      return job_wide.status();
    }
    response->set_step(step);
    response->set_committed_step(store_->committed(request->job_id()));
    if (request->resume()) store_->NoteResume(request->job_id(), request->rank(), step);
    return absl::OkStatus();
  });
}

grpc::Status AgentService::PrepareRestore(grpc::ServerContext* context,
                                          const agent::PrepareRestoreRequest* request,
                                          agent::PrepareRestoreResponse* response) {
  return Handle("PrepareRestore", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    TESSERA_RETURN_IF_ERROR(store_->CheckJobAccess(request->job_id(), caller));
    TESSERA_ASSIGN_OR_RETURN(
        SnapshotStore::RestoreInfo info,
        coordination_->PrepareRestore(request->job_id(), request->rank(), request->step(),
                                      /*verify=*/!request->client_verifies()));
    // A shard made local for this restore (copied or rebuilt) is the daemon's: the caller's uid
    // (the job's, checked above) may open it, no other. A slot is its uid's already, and root
    // opens either.
    if (caller.uid != 0 && absl::EndsWith(info.segment_path, kRestoredSuffix)) {
      absl::StatusOr<uid_t> grantee = SegmentGrantee(info.segment_path);
      if (!grantee.ok() || *grantee != caller.uid) {
        TESSERA_RETURN_IF_ERROR(GrantSegmentAccess(info.segment_path, caller.uid));
      }
    }
    response->set_step(info.step);
    response->set_segment_path(info.segment_path);
    response->set_header_bytes(kSegmentHeaderBytes);
    response->set_payload_bytes(info.payload_bytes);
    response->set_manifest_offset(info.manifest_offset);
    response->set_manifest_bytes(info.manifest_bytes);
    response->set_payload_crc32c(info.payload_crc32c);
    response->set_verified(info.verified);
    return absl::OkStatus();
  });
}

grpc::Status AgentService::Unregister(grpc::ServerContext* context,
                                      const agent::UnregisterRequest* request,
                                      agent::UnregisterResponse* response) {
  return Handle("Unregister", [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(Caller caller, CallerOf(context));
    TESSERA_RETURN_IF_ERROR(store_->Unregister(request->job_id(), request->rank(),
                                               request->drop_snapshots(), caller));
    if (!request->drop_snapshots() || !store_->clustered()) return absl::OkStatus();
    // On a cluster the job's fragments on other members and its commit would let the next
    // launch resume it: the rank's close asks for the whole job's drop. Each rank asks as it
    // closes; while other ranks still run it is refused (they drop it as they close), and the
    // last rank to close drops it (docs/PROTOCOL.md, Dropping a job).
    std::optional<uid_t> owner_uid;
    if (caller.uid != 0) owner_uid = caller.uid;
    absl::StatusOr<JobDrop> dropped =
        coordination_->DropJob(request->job_id(), owner_uid, /*force=*/false);
    auto log = Logger("agent-service");
    if (dropped.ok()) {
      log->info("job '{}' rank {} closed with drop: the job was dropped at epoch {}",
                request->job_id(), request->rank(), dropped->dropped_epoch);
      return absl::OkStatus();
    }
    if (absl::IsFailedPrecondition(dropped.status()) || absl::IsNotFound(dropped.status())) {
      log->info("job '{}' rank {} closed with drop; the job itself is left to its other ranks: {}",
                request->job_id(), request->rank(), dropped.status().ToString());
      return absl::OkStatus();
    }
    return absl::Status(
        dropped.status().code(),
        absl::StrCat("job '", request->job_id(), "' rank ", request->rank(),
                     ": its snapshots here are deleted, but the job could not be dropped across "
                     "the cluster (", dropped.status().message(), "); drop it with `tessera drop ",
                     request->job_id(), "`"));
  });
}

grpc::Status AgentService::Rendezvous(grpc::ServerContext* context,
                                      const rendezvous::JoinRequest* request,
                                      rendezvous::JoinResponse* response) {
  // A rendezvous that times out is the caller's to retry, not a daemon problem: not logged.
  absl::Status status = CallerOf(context).status();
  if (status.ok()) {
    absl::StatusOr<rendezvous::JoinResponse> joined = rendezvous_->Join(*request);
    status = joined.status();
    if (joined.ok()) *response = std::move(*joined);
  }
  if (!status.ok() && !absl::IsDeadlineExceeded(status)) {
    Logger("agent-service")->warn("Rendezvous: {}", status.ToString());
  }
  return ToGrpcStatus(status);
}

}  // namespace tessera
