#include "daemon/admin/admin_service.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/version.h"
#include "daemon/coordination/shard_rebuild.h"
#include "daemon/metrics/metrics.h"
#include "ec/erasure_codec.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/server_context.h"

namespace tessera {
namespace {

// Verify and Recover read whole shards and fragments.
constexpr absl::Duration kPeerDataCallTimeout = absl::Minutes(10);
constexpr int kMaxRebuildAttempts = 4;

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

void AddError(google::protobuf::RepeatedPtrField<admin::NodeError>* errors,
              const std::string& node_id, const std::string& address, const std::string& error) {
  admin::NodeError* e = errors->Add();
  e->set_node_id(node_id);
  e->set_address(address);
  e->set_error(error);
}

absl::Status CheckStep(const char* field, int64_t step) {
  if (step >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be >= 0 (or absent for the default); got ", step));
}

// Names (as paths) of the files in `dir` whose name ends in `suffix`.
std::set<std::string> FilesEndingIn(const std::string& dir, const std::string& suffix) {
  std::set<std::string> found;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        found.insert(dir + "/" + name);
      }
    }
    closedir(d);
  }
  return found;
}

}  // namespace

Admin::Admin(Parts parts) : parts_(std::move(parts)), hostname_(HostName()) {}

bool Admin::IsDrillTarget(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  return drill_targets_.count(job_id) > 0;
}

admin::Admin::Stub* Admin::StubFor(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto& stub = stubs_[address];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    stub = admin::Admin::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  }
  return stub.get();
}

template <typename Request, typename Response>
absl::Status Admin::AskPeer(const std::string& node_id, StubMethod<Request, Response> method,
                            const Request& request, Response* response, absl::Duration timeout) {
  if (parts_.cluster == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "node '", node_id, "' is not this daemon ('", parts_.node_id,
        "'), and this daemon is standalone (no peer.listen_address): it reaches no other node"));
  }
  std::optional<std::string> address = parts_.cluster->AddressOf(node_id);
  if (!address) {
    return absl::NotFoundError(absl::StrCat("node '", node_id, "' is not a live member; live: ",
                                            absl::StrJoin(parts_.cluster->LiveNodeIds(), ", ")));
  }
  if (parts_.config->cluster.token.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot ask node '", node_id,
                                                      "': cluster.token is not set, so daemons "
                                                      "cannot call each other's admin service"));
  }
  grpc::ClientContext context;
  context.AddMetadata(kAdminTokenMetadataKey, parts_.config->cluster.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  absl::Status status = FromGrpcStatus((StubFor(*address)->*method)(&context, request, response));
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("node '", node_id, "' (", *address, "): ", status.message()));
  }
  return absl::OkStatus();
}

template <typename Request, typename Response>
std::vector<Admin::PeerAnswer<Response>> Admin::AskPeers(StubMethod<Request, Response> method,
                                                         const Request& request,
                                                         absl::Duration timeout) {
  std::vector<PeerAnswer<Response>> answers;
  if (parts_.cluster == nullptr) return answers;
  for (const Cluster::PeerView& peer : parts_.cluster->Peers()) {
    if (!peer.alive) continue;
    PeerAnswer<Response> answer;
    answer.node_id = peer.node_id;
    answer.address = peer.address;
    answers.push_back(std::move(answer));
  }
  std::vector<std::thread> threads;
  for (auto& answer : answers) {
    threads.emplace_back([&, method] {
      if (parts_.config->cluster.token.empty()) {
        answer.status = absl::FailedPreconditionError(
            "not asked: cluster.token is not set, so daemons cannot call each other's admin "
            "service");
        return;
      }
      grpc::ClientContext context;
      context.AddMetadata(kAdminTokenMetadataKey, parts_.config->cluster.token);
      context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
      answer.status =
          FromGrpcStatus((StubFor(answer.address)->*method)(&context, request, &answer.response));
    });
  }
  for (std::thread& t : threads) t.join();
  return answers;
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
    auto held = parts_.peer_client->ListHeld(peer.address, job_id);
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

void Admin::FillJobStatus(const JobView& view, admin::JobStatus* out) const {
  out->set_job_id(view.job_id);
  out->set_world_size(view.world_size);
  out->set_newest_step(view.newest_step);
  out->set_committed_step(view.committed_step);
  out->set_restorable_step(view.restorable_step);
  out->set_health(ToProto(view.health));
  out->set_reason(view.reason);
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
          "cluster.token is not set: the admin service does not answer over TCP, and this "
          "daemon cannot ask other members for their memory, trainers or CRC checks");
    }
  } else {
    response->add_warnings(
        "standalone daemon (peer.listen_address is empty): no cross-node protection");
  }
  for (const JobView& view : AssessJobs("", request.local_only(), response->mutable_errors())) {
    FillJobStatus(view, response->add_jobs());
  }
  return absl::OkStatus();
}

absl::Status Admin::ListJobs(const admin::ListJobsRequest& request,
                             admin::ListJobsResponse* response) {
  for (const JobView& view : AssessJobs("", request.local_only(), response->mutable_errors())) {
    FillJobStatus(view, response->add_jobs());
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

void Admin::VerifyLocal(const std::string& job_id, const std::optional<int64_t>& step,
                        admin::VerifyResponse* response) {
  const absl::Time start = absl::Now();
  admin::NodeVerify* node = response->add_nodes();
  node->set_node_id(parts_.node_id);
  for (const auto& v : parts_.store->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed || (step && v.step != *step)) continue;
    node->set_shards_checked(node->shards_checked() + 1);
    node->set_bytes_checked(node->bytes_checked() + v.payload_bytes);
    absl::Status s = parts_.store->PrepareRestore(job_id, v.rank, v.step).status();
    if (s.ok()) continue;
    admin::Damage* d = response->add_damaged();
    d->set_node_id(parts_.node_id);
    d->set_kind(admin::Damage::SHARD);
    d->set_rank(v.rank);
    d->set_step(v.step);
    d->set_detail(std::string(s.message()));
  }
  if (parts_.fragments != nullptr) {
    for (const FragmentStatus& f : parts_.fragments->List(job_id)) {
      if (f.state != SegmentState::kSealed || (step && f.key.step != *step)) continue;
      node->set_fragments_checked(node->fragments_checked() + 1);
      node->set_bytes_checked(node->bytes_checked() + f.meta.fragment_bytes);
      absl::Status s = parts_.fragments->VerifyFragment(f.key);
      if (s.ok()) continue;
      if (absl::IsDataLoss(s)) Metrics().fragment_crc_failures->Increment();
      admin::Damage* d = response->add_damaged();
      d->set_node_id(parts_.node_id);
      d->set_kind(admin::Damage::FRAGMENT);
      d->set_rank(f.key.rank);
      d->set_step(f.key.step);
      d->set_fragment_index(f.key.fragment_index);
      d->set_detail(std::string(s.message()));
    }
  }
  node->set_duration_ms(absl::ToInt64Milliseconds(absl::Now() - start));
}

void Admin::DecodeVerdict(const std::string& job_id, JobHoldings holdings,
                          admin::RankVerdict* verdict) {
  auto add_reason = [verdict](const std::string& why) {
    verdict->set_reason(verdict->reason().empty() ? why : verdict->reason() + "; " + why);
  };
  holdings.shards.clear();  // decode from fragments only
  auto plan = PlanRestore(holdings, parts_.node_id, verdict->rank(), verdict->step());
  if (!plan.ok()) {
    add_reason(absl::StrCat("not decoded: ", plan.status().message()));
    return;
  }
  if (parts_.fragments == nullptr) return;
  std::atomic<uint64_t> moved{0};
  std::vector<uint8_t> shard(std::max<uint64_t>(plan->shard_bytes, 1));
  auto decoded =
      DecodeShard(*plan, ReaderFor(job_id, verdict->rank(), verdict->step(), &moved), shard.data());
  if (!decoded.ok() || !decoded->failed.empty()) {
    add_reason(absl::StrCat("not decoded: ", decoded.ok()
                                                 ? decoded->failed.front().status.ToString()
                                                 : decoded.status().ToString()));
    return;
  }
  verdict->set_decoded_crc32c(decoded->crc32c);
  verdict->set_decoded(decoded->crc32c == plan->shard_crc32c);
  if (!verdict->decoded()) {
    add_reason(absl::StrCat("k fragments that each verified decode to CRC32C 0x",
                            absl::Hex(decoded->crc32c), ", not the shard's 0x",
                            absl::Hex(plan->shard_crc32c)));
  }
}

absl::Status Admin::Verify(const admin::VerifyRequest& request, admin::VerifyResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  std::optional<int64_t> step;
  if (request.has_step()) {
    TESSERA_RETURN_IF_ERROR(CheckStep("step", request.step()));
    step = request.step();
  }
  response->set_job_id(request.job_id());
  if (request.local_only()) {
    VerifyLocal(request.job_id(), step, response);
    return absl::OkStatus();
  }
  // What exists (peer listings), then what verifies (every member checks its own bytes).
  std::map<std::string, JobHoldings> all =
      GatherHoldings(request.job_id(), false, response->mutable_errors());
  JobHoldings holdings = all[request.job_id()];
  VerifyLocal(request.job_id(), step, response);
  admin::VerifyRequest local = request;
  local.set_local_only(true);
  for (auto& answer : AskPeers(&admin::Admin::Stub::Verify, local, kPeerDataCallTimeout)) {
    if (!answer.status.ok()) {
      AddError(response->mutable_errors(), answer.node_id, answer.address,
               absl::StrCat("not verified: ", answer.status.ToString()));
      continue;
    }
    for (const auto& d : answer.response.damaged()) *response->add_damaged() = d;
    for (const auto& n : answer.response.nodes()) *response->add_nodes() = n;
  }
  // Damaged pieces do not count toward restorability.
  auto damaged = [&](const std::string& node, admin::Damage::Kind kind, uint32_t rank, int64_t s,
                     uint32_t index) {
    for (const admin::Damage& d : response->damaged()) {
      if (d.node_id() == node && d.kind() == kind && d.rank() == rank && d.step() == s &&
          (kind == admin::Damage::SHARD || d.fragment_index() == index)) {
        return true;
      }
    }
    return false;
  };
  JobHoldings good;
  std::set<int64_t> steps_held;
  for (const HeldShard& s : holdings.shards) {
    if (step && s.step != *step) continue;
    steps_held.insert(s.step);
    if (!damaged(s.node, admin::Damage::SHARD, s.rank, s.step, 0)) good.shards.push_back(s);
  }
  for (const HeldFragment& f : holdings.fragments) {
    if (step && f.step != *step) continue;
    steps_held.insert(f.step);
    if (!damaged(f.node, admin::Damage::FRAGMENT, f.rank, f.step, f.index)) {
      good.fragments.push_back(f);
    }
  }
  if (steps_held.empty()) {
    std::set<int64_t> any;
    for (const HeldShard& s : holdings.shards) any.insert(s.step);
    for (const HeldFragment& f : holdings.fragments) any.insert(f.step);
    return absl::NotFoundError(absl::StrCat(
        "job '", request.job_id(), "' has ", step ? absl::StrCat("no step ", *step) : "nothing",
        " on the live members; steps held: ",
        any.empty() ? std::string("none") : absl::StrJoin(any, ", ")));
  }
  uint32_t world = 0;
  for (const SnapshotStore::RankInfo& r : parts_.store->ListRanks(request.job_id())) {
    world = std::max(world, r.world_size);
  }
  // The world of the job, from every piece held, damaged ones included.
  JobView all_view = AssessJob(request.job_id(), holdings, world, -1, Context());
  JobView view = AssessJob(request.job_id(), good, all_view.world_size, -1, Context());
  bool ok = response->damaged().empty() && response->errors().empty();
  for (auto it = steps_held.rbegin(); it != steps_held.rend(); ++it) {
    response->add_steps(*it);
    const StepView* sv = nullptr;
    for (const StepView& candidate : view.steps) {
      if (candidate.step == *it) sv = &candidate;
    }
    for (uint32_t rank = 0; rank < view.world_size; ++rank) {
      admin::RankVerdict* verdict = response->add_ranks();
      verdict->set_rank(rank);
      verdict->set_step(*it);
      uint32_t shards_damaged = 0, fragments_damaged = 0;
      for (const admin::Damage& d : response->damaged()) {
        if (d.rank() != rank || d.step() != *it) continue;
        (d.kind() == admin::Damage::SHARD ? shards_damaged : fragments_damaged)++;
      }
      verdict->set_shards_damaged(shards_damaged);
      verdict->set_fragments_damaged(fragments_damaged);
      const RankAtStep* r = nullptr;
      if (sv != nullptr) {
        for (const RankAtStep& candidate : sv->ranks) {
          if (candidate.rank == rank) r = &candidate;
        }
      }
      if (r == nullptr) {
        verdict->set_restorable(false);
        verdict->set_reason("no shard or fragment that verified is held by a live member");
        ok = false;
        continue;
      }
      verdict->set_restorable(r->restorable);
      verdict->set_shards_ok(static_cast<uint32_t>(r->shard_nodes.size()));
      verdict->set_fragments_ok(static_cast<uint32_t>(r->fragments.size()));
      verdict->set_ec_k(r->k);
      verdict->set_ec_m(r->m);
      if (!r->restorable) {
        ok = false;
        verdict->set_reason(absl::StrCat("no sealed shard verified and ", r->fragments.size(),
                                         " fragments verified, ", r->k, " needed"));
      } else if (r->k > 0 && r->fragments.size() < r->k + r->m) {
        verdict->set_reason(
            absl::StrCat(r->fragments.size(), " of ", r->k + r->m, " fragments verified"));
      } else if (r->k == 0) {
        verdict->set_reason("restorable only from the sealed shard: no fragments held");
      }
      if (request.decode()) {
        DecodeVerdict(request.job_id(), good, verdict);
        ok = ok && verdict->decoded();
      }
    }
  }
  response->set_ok(ok);
  return absl::OkStatus();
}

FragmentReader Admin::ReaderFor(const std::string& job_id, uint32_t rank, int64_t step,
                                std::atomic<uint64_t>* bytes_moved) {
  // This node's fragments are read from its store, the others' from their peer service; both
  // are checked against the fragment's CRC32C.
  return [this, job_id, rank, step, bytes_moved](uint32_t index, const std::string& node,
                                                 uint8_t* dst,
                                                 size_t bytes) -> absl::StatusOr<uint32_t> {
    const FragmentKey key{job_id, rank, step, index};
    if (node == parts_.node_id) {
      TESSERA_ASSIGN_OR_RETURN(FragmentView view, parts_.fragments->Get(key));
      if (view.size() != bytes || Crc32c(view.data(), view.size()) != view.fragment_crc32c()) {
        Metrics().fragment_crc_failures->Increment();
        return absl::DataLossError("the held fragment does not match its CRC32C");
      }
      std::memcpy(dst, view.data(), bytes);
      return view.fragment_crc32c();
    }
    auto address = parts_.cluster->AddressOf(node);
    if (!address) return absl::UnavailableError("not live");
    absl::StatusOr<FragmentStatus> got =
        parts_.peer_client->GetFragment(*address, key, 0, dst, bytes);
    if (!got.ok()) {
      if (absl::IsDataLoss(got.status())) Metrics().fragment_crc_failures->Increment();
      return got.status();
    }
    bytes_moved->fetch_add(bytes);
    return got->fragment_crc32c;  // GetFragment checked the bytes against it
  };
}

absl::Status Admin::RebuildFromFragments(const std::string& job_id, uint32_t rank, int64_t step,
                                         admin::RecoverResponse* response) {
  if (parts_.fragments == nullptr) {
    return absl::FailedPreconditionError(
        "from_fragments needs cross-node protection: this daemon is standalone (no "
        "peer.listen_address), so no fragments exist");
  }
  google::protobuf::RepeatedPtrField<admin::NodeError> errors;
  JobHoldings holdings = GatherHoldings(job_id, false, &errors)[job_id];
  holdings.shards.clear();  // the point is to prove the fragments decode
  std::atomic<uint64_t> moved{0};
  FragmentReader read = ReaderFor(job_id, rank, step, &moved);
  std::set<std::pair<uint32_t, std::string>> exclude;
  const absl::Time start = absl::Now();
  for (int attempt = 0; attempt < kMaxRebuildAttempts; ++attempt) {
    auto plan = PlanRestore(holdings, parts_.node_id, rank, step, exclude);
    if (!plan.ok()) {
      return absl::Status(plan.status().code(),
                          absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                       " cannot be rebuilt from fragments on the live members: ",
                                       plan.status().message()));
    }
    std::vector<uint8_t> shard(std::max<uint64_t>(plan->shard_bytes, 1));
    TESSERA_ASSIGN_OR_RETURN(ShardDecode decoded, DecodeShard(*plan, read, shard.data()));
    if (!decoded.failed.empty()) {
      for (const ShardDecode::FailedRead& f : decoded.failed) {
        Logger("admin")->warn(
            "recover: job '{}' rank {} step {} fragment {} from {}: {}; counted as an erasure",
            job_id, rank, step, f.index, f.node, f.status.ToString());
        exclude.insert({f.index, f.node});
      }
      continue;
    }
    response->set_source(admin::RecoverResponse::REBUILD);
    for (const auto& [index, node] : decoded.used) {
      response->add_fragment_indexes(index);
      response->add_fragment_nodes(node);
    }
    response->set_bytes_moved(moved.load());
    response->set_shard_bytes(plan->shard_bytes);
    response->set_expected_crc32c(plan->shard_crc32c);
    response->set_actual_crc32c(decoded.crc32c);
    response->set_crc_matched(decoded.crc32c == plan->shard_crc32c);
    response->set_ec_k(plan->k);
    response->set_ec_m(plan->m);
    response->set_duration_us(absl::ToInt64Microseconds(absl::Now() - start));
    if (response->crc_matched()) {
      // A damaged shard held here is repaired with the rebuilt bytes.
      auto repaired =
          parts_.store->RepairSealed(job_id, rank, step, shard.data(), plan->shard_bytes);
      if (repaired.ok()) {
        response->set_repaired(*repaired);
      } else if (!absl::IsNotFound(repaired.status())) {
        return repaired.status();
      }
    }
    return absl::OkStatus();
  }
  return absl::DataLossError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                          ": no rebuild succeeded in ", kMaxRebuildAttempts,
                                          " attempts (fragments kept failing their checks)"));
}

absl::Status Admin::Recover(const admin::RecoverRequest& request,
                            admin::RecoverResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  if (request.has_step()) TESSERA_RETURN_IF_ERROR(CheckStep("step", request.step()));
  if (!IsSelf(request.node_id())) {
    return AskPeer(request.node_id(), &admin::Admin::Stub::Recover, request, response,
                   kPeerDataCallTimeout);
  }
  int64_t step;
  if (request.has_step()) {
    step = request.step();
  } else {
    auto latest = parts_.coordination->FindLatestRestorable(request.job_id());
    if (!latest.ok()) {
      return absl::Status(
          latest.status().code(),
          absl::StrCat("no step given, and the newest restorable step of job '", request.job_id(),
                       "' is unknown: ", latest.status().message()));
    }
    step = *latest;
  }
  response->set_node_id(parts_.node_id);
  response->set_job_id(request.job_id());
  response->set_rank(request.rank());
  response->set_step(step);
  if (request.from_fragments()) {
    return RebuildFromFragments(request.job_id(), request.rank(), step, response);
  }
  // How it will be made local, for the report (PrepareRestore follows the same plan).
  google::protobuf::RepeatedPtrField<admin::NodeError> errors;
  JobHoldings holdings = GatherHoldings(request.job_id(), false, &errors)[request.job_id()];
  auto plan = PlanRestore(holdings, parts_.node_id, request.rank(), step);
  // A shard made local by an earlier call (this one's or a trainer's) is returned as it is.
  const std::set<std::string> already_local = FilesEndingIn(parts_.store->directory(), ".restored");
  const absl::Time start = absl::Now();
  auto info = parts_.coordination->PrepareRestore(request.job_id(), request.rank(), step);
  response->set_duration_us(absl::ToInt64Microseconds(absl::Now() - start));
  if (!info.ok()) return info.status();
  response->set_shard_bytes(info->payload_bytes);
  response->set_segment_path(info->segment_path);
  response->set_expected_crc32c(info->payload_crc32c);
  if (already_local.count(info->segment_path) > 0) {
    response->set_source(admin::RecoverResponse::LOCAL);
  } else if (plan.ok()) {
    response->set_ec_k(plan->k);
    response->set_ec_m(plan->m);
    switch (plan->source) {
      case RestorePlan::Source::kLocal:
        response->set_source(admin::RecoverResponse::LOCAL);
        break;
      case RestorePlan::Source::kCopy:
        response->set_source(admin::RecoverResponse::COPY);
        response->set_source_node(plan->node);
        response->set_bytes_moved(info->payload_bytes);
        break;
      case RestorePlan::Source::kRebuild:
        response->set_source(admin::RecoverResponse::REBUILD);
        for (const auto& [index, node] : plan->fragments) {
          response->add_fragment_indexes(index);
          response->add_fragment_nodes(node);
          if (node != parts_.node_id) {
            response->set_bytes_moved(response->bytes_moved() +
                                      ErasureCodec::FragmentBytes(plan->shard_bytes, plan->k));
          }
        }
        break;
    }
  }
  // Read back what is here now, independently of PrepareRestore's own check.
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Segment> segment,
                           Segment::Open(info->segment_path, /*writable=*/false));
  if (segment->capacity_bytes() < info->payload_bytes) {
    return absl::DataLossError(absl::StrCat(info->segment_path, " holds ",
                                            segment->capacity_bytes(),
                                            " payload bytes, less than "
                                            "the shard's ",
                                            info->payload_bytes));
  }
  const uint32_t crc = Crc32c(segment->payload(), info->payload_bytes);
  response->set_actual_crc32c(crc);
  response->set_crc_matched(crc == info->payload_crc32c);
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

absl::Status Admin::SetDrillTarget(const admin::SetDrillTargetRequest& request,
                                   admin::SetDrillTargetResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  {
    absl::MutexLock lock(&mu_);
    if (request.enabled()) {
      drill_targets_.insert(request.job_id());
    } else {
      drill_targets_.erase(request.job_id());
    }
  }
  Logger("admin")->info("job '{}' {} a drill target", request.job_id(),
                        request.enabled() ? "is now" : "is no longer");
  response->add_nodes(parts_.node_id);
  if (request.local_only()) return absl::OkStatus();
  admin::SetDrillTargetRequest local = request;
  local.set_local_only(true);
  for (auto& answer : AskPeers(&admin::Admin::Stub::SetDrillTarget, local, ControlTimeout())) {
    if (answer.status.ok()) {
      response->add_nodes(answer.node_id);
    } else {
      AddError(response->mutable_errors(), answer.node_id, answer.address,
               answer.status.ToString());
    }
  }
  return absl::OkStatus();
}

absl::Status Admin::DropMemory(const admin::DropMemoryRequest& request,
                               admin::DropMemoryResponse* response) {
  if (!IsSelf(request.node_id())) {
    return AskPeer(request.node_id(), &admin::Admin::Stub::DropMemory, request, response,
                   ControlTimeout());
  }
  if (request.confirm_node_id() != parts_.node_id) {
    return absl::FailedPreconditionError(absl::StrCat(
        "confirm_node_id must name the daemon that is to lose its memory, '", parts_.node_id,
        "'; got '", request.confirm_node_id(), "': nothing was dropped"));
  }
  response->set_node_id(parts_.node_id);
  response->set_old_incarnation(parts_.incarnation);
  const std::string& dir = parts_.store->directory();
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      struct stat st;
      if (name[0] == '.' || stat((dir + "/" + name).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
        continue;
      }
      const bool fragment = name.size() > 5 && name.compare(name.size() - 5, 5, ".frag") == 0;
      if (fragment) {
        response->set_fragments_deleted(response->fragments_deleted() + 1);
      } else {
        response->set_slots_deleted(response->slots_deleted() + 1);
      }
      response->set_bytes_deleted(response->bytes_deleted() + static_cast<uint64_t>(st.st_size));
    }
    closedir(d);
  }
  Logger("admin")->warn(
      "DropMemory: losing {} slot and {} fragment segments ({} bytes) and "
      "restarting as a new incarnation, as a lost machine would",
      response->slots_deleted(), response->fragments_deleted(), response->bytes_deleted());
  if (parts_.drop_memory) parts_.drop_memory();
  return absl::OkStatus();
}

absl::Status Admin::Corrupt(const admin::CorruptRequest& request,
                            admin::CorruptResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  if (request.has_step()) TESSERA_RETURN_IF_ERROR(CheckStep("step", request.step()));
  if (request.target() != admin::CorruptRequest::SLOT &&
      request.target() != admin::CorruptRequest::FRAGMENT) {
    return absl::InvalidArgumentError(
        "target must be SLOT (a sealed snapshot slot's payload) or FRAGMENT (a sealed fragment)");
  }
  if (!IsSelf(request.node_id())) {
    return AskPeer(request.node_id(), &admin::Admin::Stub::Corrupt, request, response,
                   ControlTimeout());
  }
  if (!request.yes() && !IsDrillTarget(request.job_id())) {
    return absl::FailedPreconditionError(
        absl::StrCat("job '", request.job_id(), "' is not a drill target on node '", parts_.node_id,
                     "': mark it with SetDrillTarget, or set yes to damage it anyway"));
  }
  response->set_node_id(parts_.node_id);
  response->set_rank(request.rank());
  const int64_t step = request.has_step() ? request.step() : -1;
  if (request.target() == admin::CorruptRequest::SLOT) {
    TESSERA_ASSIGN_OR_RETURN(SnapshotStore::SealedSlot slot,
                             parts_.store->FindSealedSlot(request.job_id(), request.rank(), step));
    const uint64_t offset = request.has_offset() ? request.offset() : slot.payload_bytes / 2;
    if (offset >= slot.payload_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("offset must be below the payload's ",
                                                     slot.payload_bytes, " bytes; got ", offset));
    }
    TESSERA_ASSIGN_OR_RETURN(
        uint8_t byte,
        parts_.store->FlipPayloadByte(request.job_id(), request.rank(), slot.step, offset));
    const uint8_t flipped = byte ^ 0xFF;
    response->set_path(slot.path);
    response->set_step(slot.step);
    response->set_offset(offset);
    response->set_old_byte(byte);
    response->set_new_byte(flipped);
  } else {
    if (parts_.fragments == nullptr) {
      return absl::FailedPreconditionError(
          "this daemon is standalone (no peer.listen_address): it holds no fragments");
    }
    FragmentKey key{request.job_id(), request.rank(), step, request.fragment_index()};
    if (step < 0) {
      std::vector<int64_t> held;
      for (const FragmentStatus& f : parts_.fragments->List(request.job_id())) {
        if (f.state == SegmentState::kSealed && f.key.rank == request.rank() &&
            f.key.fragment_index == request.fragment_index()) {
          held.push_back(f.key.step);
        }
      }
      if (held.empty()) {
        return absl::NotFoundError(absl::StrCat(
            "node '", parts_.node_id, "' holds no sealed fragment ", request.fragment_index(),
            " of job '", request.job_id(), "' rank ", request.rank()));
      }
      key.step = *std::max_element(held.begin(), held.end());
    }
    TESSERA_ASSIGN_OR_RETURN(FragmentView view, parts_.fragments->Get(key));
    const uint64_t offset = request.has_offset() ? request.offset() : view.size() / 2;
    if (offset >= view.size()) {
      return absl::InvalidArgumentError(absl::StrCat("offset must be below the fragment's ",
                                                     view.size(), " bytes; got ", offset));
    }
    // Behind the store's back, through its own mapping, as a bit flip in memory would be.
    uint8_t* byte = const_cast<uint8_t*>(view.data()) + offset;
    response->set_old_byte(*byte);
    *byte ^= 0xFF;
    response->set_new_byte(*byte);
    response->set_path(view.path());
    response->set_step(key.step);
    response->set_fragment_index(key.fragment_index);
    response->set_offset(offset);
  }
  Logger("admin")->warn("Corrupt: flipped byte {} of job '{}' rank {} step {} {} (drill)",
                        response->offset(), request.job_id(), request.rank(), response->step(),
                        request.target() == admin::CorruptRequest::SLOT
                            ? std::string("slot")
                            : absl::StrCat("fragment ", response->fragment_index()));
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

template <typename Body>
grpc::Status AdminService::Handle(const char* method, const grpc::ServerContext* context,
                                  Body body) {
  absl::Status status = Authenticate(context);
  if (status.ok()) status = body();
  if (!status.ok()) Logger("admin")->warn("{}: {}", method, status.ToString());
  return ToGrpcStatus(status);
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
  return Handle("Recover", context, [&] { return admin_->Recover(*request, response); });
}

grpc::Status AdminService::ListTrainers(grpc::ServerContext* context,
                                        const admin::ListTrainersRequest* request,
                                        admin::ListTrainersResponse* response) {
  return Handle("ListTrainers", context, [&] { return admin_->ListTrainers(*request, response); });
}

grpc::Status AdminService::SetDrillTarget(grpc::ServerContext* context,
                                          const admin::SetDrillTargetRequest* request,
                                          admin::SetDrillTargetResponse* response) {
  return Handle("SetDrillTarget", context,
                [&] { return admin_->SetDrillTarget(*request, response); });
}

grpc::Status AdminService::DropMemory(grpc::ServerContext* context,
                                      const admin::DropMemoryRequest* request,
                                      admin::DropMemoryResponse* response) {
  return Handle("DropMemory", context, [&] { return admin_->DropMemory(*request, response); });
}

grpc::Status AdminService::Corrupt(grpc::ServerContext* context,
                                   const admin::CorruptRequest* request,
                                   admin::CorruptResponse* response) {
  return Handle("Corrupt", context, [&] { return admin_->Corrupt(*request, response); });
}

}  // namespace tessera
