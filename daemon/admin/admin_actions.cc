// Admin's actions (admin_service.h): Verify and Recover, which read shards back and rebuild
// them from fragments, and the recovery drills' calls (SetDrillTarget, DropMemory, Corrupt).
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/admin/admin_internal.h"
#include "daemon/admin/admin_service.h"
#include "daemon/coordination/shard_rebuild.h"
#include "daemon/membership/cluster.h"
#include "daemon/metrics/metrics.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace {

using admin_internal::AddError;

// Verify and Recover read whole shards and fragments.
constexpr absl::Duration kPeerDataCallTimeout = absl::Minutes(10);
constexpr int kMaxRebuildAttempts = 4;

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
        parts_.peer_client->GetFragment(PeerTarget(*address, node), key, 0, dst, bytes);
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
  const std::set<std::string> already_local =
      FilesEndingIn(parts_.store->directory(), kRestoredSuffix);
  const absl::Time start = absl::Now();
  auto info = parts_.coordination->PrepareRestore(request.job_id(), request.rank(), step,
                                                  /*verify=*/true);
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
    TESSERA_RETURN_IF_ERROR(CheckForwardable("DropMemory", request.node_id()));
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
      // The segments; the jobs' state files (JobStateJournal) go with them, uncounted.
      if (absl::EndsWith(name, ".frag")) {
        response->set_fragments_deleted(response->fragments_deleted() + 1);
      } else if (absl::EndsWith(name, ".slot")) {
        response->set_slots_deleted(response->slots_deleted() + 1);
      } else {
        continue;
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
    TESSERA_RETURN_IF_ERROR(CheckForwardable("Corrupt", request.node_id()));
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

absl::Status Admin::DropJob(const admin::DropJobRequest& request, std::optional<uid_t> owner_uid,
                            admin::DropJobResponse* response) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(request.job_id()));
  TESSERA_ASSIGN_OR_RETURN(JobDrop dropped, parts_.coordination->DropJob(
                                                request.job_id(), owner_uid, request.force()));
  response->set_node_id(parts_.node_id);
  response->set_job_id(request.job_id());
  response->set_dropped_epoch(dropped.dropped_epoch);
  response->set_coordinator(dropped.coordinator);
  std::set<uint32_t> ranks;
  int64_t newest = -1;
  for (NodeDrop& node : dropped.nodes) {
    if (node.node_id.empty()) node.node_id = parts_.node_id;
    ranks.insert(node.ranks.begin(), node.ranks.end());
    newest = std::max(newest, node.newest_sealed_step);
    response->set_slots_deleted(response->slots_deleted() + node.slots_deleted);
    response->set_bytes_deleted(response->bytes_deleted() + node.slot_bytes_deleted);
    response->set_fragments_deleted(response->fragments_deleted() + node.fragments_deleted);
    response->set_fragment_bytes_deleted(response->fragment_bytes_deleted() +
                                         node.fragment_bytes_deleted);
    for (uint32_t rank : node.running_ranks) response->add_running_ranks(rank);
    for (int32_t pid : node.running_pids) response->add_running_pids(pid);
    if (dropped.dropped_epoch == 0) continue;  // standalone: the summary is the node
    admin::DropJobNode* n = response->add_nodes();
    n->set_node_id(node.node_id);
    for (uint32_t rank : node.ranks) n->add_ranks(rank);
    n->set_slots_deleted(node.slots_deleted);
    n->set_slot_bytes_deleted(node.slot_bytes_deleted);
    n->set_fragments_deleted(node.fragments_deleted);
    n->set_fragment_bytes_deleted(node.fragment_bytes_deleted);
    n->set_newest_sealed_step(node.newest_sealed_step);
    for (uint32_t rank : node.running_ranks) n->add_running_ranks(rank);
    for (int32_t pid : node.running_pids) n->add_running_pids(pid);
  }
  for (uint32_t rank : ranks) response->add_ranks(rank);
  response->set_newest_sealed_step(newest);
  for (const auto& [node, why] : dropped.unanswered) {
    AddError(response->mutable_unanswered(), node, "", why);
  }
  return absl::OkStatus();
}

absl::Status Admin::CheckForwardable(const char* method, const std::string& node_id) const {
  if (parts_.config->cluster.tls_cert_file.empty()) return absl::OkStatus();
  const std::string address =
      parts_.cluster ? parts_.cluster->AddressOf(node_id).value_or("ADDRESS") : "ADDRESS";
  return absl::FailedPreconditionError(absl::StrCat(
      "with mutual TLS ", method, " is not forwarded to '", node_id, "': a member takes it only "
      "from an operator's certificate, never from another member's. Run it on ", node_id,
      " (its agent socket), or over TCP as the operator: tessera --address ", address,
      " --tls-cert OPERATOR.crt --tls-key OPERATOR.key --tls-ca ca.crt ..."));
}

void Admin::SpreadLostDeclaration(const std::string& node_id, uint64_t incarnation,
                                  std::string own, admin::DeclareLostResponse* response) {
  // Long enough for every member's own timer to find a member that just died dead (suspicion
  // included), short of the CLI's default deadline.
  const absl::Time deadline =
      absl::Now() + std::min(absl::Seconds(30),
                             absl::Milliseconds(2 * parts_.config->liveness.timeout_ms + 2000));
  std::map<std::string, std::string> declarations = {{parts_.node_id, std::move(own)}};
  std::map<std::string, std::string> waiting;  // members that did not take it yet, and why
  std::set<std::string> took;
  for (;;) {
    std::vector<Cluster::PeerView> asked;
    for (const Cluster::PeerView& p : parts_.cluster->Peers()) {
      if (p.alive && p.node_id != node_id && took.count(p.node_id) == 0) asked.push_back(p);
    }
    for (auto it = waiting.begin(); it != waiting.end();) {  // no longer live: not waited for
      const bool live = std::any_of(asked.begin(), asked.end(), [&](const Cluster::PeerView& p) {
        return p.node_id == it->first;
      });
      it = live ? std::next(it) : waiting.erase(it);
    }
    if (asked.empty()) break;
    LostDeclarationRequest ask;
    ask.from = MemberInfo{parts_.node_id, parts_.incarnation, parts_.config->PeerAddress()};
    ask.node_id = node_id;
    ask.incarnation = incarnation;
    for (const auto& [declarer, d] : declarations) ask.declarations.push_back(d);
    std::vector<absl::StatusOr<LostDeclarationReply>> replies(asked.size(),
                                                              absl::UnknownError("not asked"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < asked.size(); ++i) {
      threads.emplace_back([&, i] {
        replies[i] =
            parts_.peer_client->DeclareLost(PeerTarget(asked[i].address, asked[i].node_id), ask);
      });
    }
    for (std::thread& t : threads) t.join();
    bool news = false;
    for (size_t i = 0; i < asked.size(); ++i) {
      const std::string& member = asked[i].node_id;
      if (!replies[i].ok()) {
        waiting[member] = replies[i].status().ToString();
        continue;
      }
      const LostDeclarationReply& reply = *replies[i];
      if (!reply.declaration.empty() && declarations.count(member) == 0) {
        // Checked before it is handed on: a receiver refuses a call carrying a forged one.
        absl::StatusOr<LostDeclaration> d = parts_.cluster->CheckLostDeclaration(reply.declaration);
        if (d.ok() && d->declarer == member && d->node_id == node_id &&
            d->incarnation == incarnation) {
          declarations[member] = reply.declaration;
          news = true;
        }
      }
      if (reply.applied) {
        took.insert(member);
        waiting.erase(member);
      } else {
        waiting[member] = reply.reason;
      }
    }
    if (waiting.empty() || absl::Now() >= deadline) break;
    if (!news) absl::SleepFor(absl::Milliseconds(250));  // the members' timers are running
  }
  // Kept, so that members away now are handed them when they come back
  // (LostDeclarationHerald).
  std::vector<std::string> gathered;
  for (const auto& [declarer, d] : declarations) gathered.push_back(d);
  parts_.cluster->KeepLostDeclarations(node_id, incarnation, gathered);
  for (const std::string& member : took) response->add_nodes(member);
  for (const auto& [member, why] : waiting) {
    AddError(response->mutable_errors(), member, parts_.cluster->AddressOf(member).value_or(""),
             why);
  }
  Logger("admin")->info("{} declared lost here and on {} other member(s){}", node_id, took.size(),
                        waiting.empty() ? std::string()
                                        : absl::StrCat("; not on ", waiting.size(), ": ",
                                                       waiting.begin()->first, " (",
                                                       waiting.begin()->second, ")..."));
}

absl::Status Admin::DeclareLost(const admin::DeclareLostRequest& request,
                                admin::DeclareLostResponse* response) {
  if (parts_.cluster == nullptr) {
    return absl::FailedPreconditionError(
        "this daemon runs alone (no cluster.members or cluster.dns_name): it has no members to "
        "declare lost");
  }
  const std::string& node = request.node_id();
  if (node.empty() || node.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat(
        "node_id must name the member that is gone (1 to 255 bytes); got ", node.size(),
        " bytes"));
  }
  const std::optional<uint64_t> incarnation = parts_.cluster->IncarnationOf(node);
  TESSERA_RETURN_IF_ERROR(parts_.cluster->DeclareLost(node, request.force()));
  const bool tls = parts_.config != nullptr && !parts_.config->cluster.tls_cert_file.empty();
  if (tls && !request.local_only() && incarnation) {
    // Under mutual TLS no member takes another's word alone (a relayed "lost" is never taken):
    // the others declare it lost on signed declarations of a majority of their live members,
    // this daemon's signed on its operator's word (Cluster::SignLostDeclaration).
    TESSERA_ASSIGN_OR_RETURN(
        std::string own,
        parts_.cluster->SignLostDeclaration(node, *incarnation, /*operator_word=*/true));
    response->add_nodes(parts_.node_id);
    SpreadLostDeclaration(node, *incarnation, std::move(own), response);
  }
  const Cluster::Quorum quorum = parts_.cluster->CountQuorum();
  response->set_node_id(node);
  response->set_incarnation(incarnation.value_or(0));
  response->set_live_members(static_cast<uint32_t>(quorum.live));
  response->set_members(static_cast<uint32_t>(quorum.members));
  response->set_majority(quorum.majority());
  return absl::OkStatus();
}

}  // namespace tessera
