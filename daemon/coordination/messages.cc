#include "daemon/coordination/messages.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "daemon/store/snapshot_store.h"

namespace tessera::coordination_wire {
namespace {

absl::Status CheckJobId(const std::string& job_id) {
  absl::Status s = ValidateJobId(job_id);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("job_id: ", s.message()));
  return absl::OkStatus();
}

absl::Status CheckWorld(uint32_t world_size) {
  if (world_size == 0 || world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size ", world_size, " must be 1..", kMaxWorldSize));
  }
  return absl::OkStatus();
}

}  // namespace

void ToProto(const NodeIdentity& in, coordination::NodeIdentity* out) {
  out->set_node_id(in.node_id);
  out->set_incarnation(in.incarnation);
}

NodeIdentity FromProto(const coordination::NodeIdentity& in) {
  return NodeIdentity{in.node_id(), in.incarnation()};
}

void ToProto(const CommitRecord& in, coordination::CommitRecord* out) {
  out->set_epoch(in.epoch);
  out->set_step(in.step);
  out->set_confirmed_epoch(in.confirmed_epoch);
  for (const CommitRecord::Rank& r : in.ranks) {
    coordination::RankDigest* d = out->add_ranks();
    d->set_rank(r.rank);
    d->set_shard_crc32c(r.shard_crc32c);
    d->set_shard_bytes(r.shard_bytes);
  }
  for (const std::string& n : in.nodes) out->add_nodes(n);
}

absl::Status FromProto(const coordination::CommitRecord& in, CommitRecord* out) {
  *out = CommitRecord();
  if (in.step() < 0) return absl::OkStatus();  // none
  if (in.ranks_size() == 0 || static_cast<uint32_t>(in.ranks_size()) > kMaxWorldSize ||
      in.nodes_size() > kMaxListedItems) {
    return absl::InvalidArgumentError(absl::StrCat("commit record of step ", in.step(), " has ",
                                                   in.ranks_size(), " ranks and ",
                                                   in.nodes_size(), " nodes; need 1..",
                                                   kMaxWorldSize, " ranks"));
  }
  out->epoch = in.epoch();
  out->step = in.step();
  // A step is in the history of the epoch it was committed in, whatever a sender says.
  out->confirmed_epoch = std::max(in.confirmed_epoch(), in.epoch());
  for (int i = 0; i < in.ranks_size(); ++i) {
    const coordination::RankDigest& d = in.ranks(i);
    if (d.rank() != static_cast<uint32_t>(i)) {
      return absl::InvalidArgumentError(absl::StrCat("commit record of step ", in.step(),
                                                     ": entry ", i, " names rank ", d.rank(),
                                                     "; ranks must be listed 0, 1, 2, ..."));
    }
    out->ranks.push_back({d.rank(), d.shard_crc32c(), d.shard_bytes()});
  }
  out->nodes.assign(in.nodes().begin(), in.nodes().end());
  return absl::OkStatus();
}

void ToProto(const JobState& in, coordination::JobState* out) {
  out->set_job_id(in.job_id);
  out->set_epoch(in.epoch);
  ToProto(in.committed, out->mutable_committed());
  for (int64_t s : in.dead_steps) out->add_dead_steps(s);
  out->set_dropped_epoch(in.dropped_epoch);
}

absl::Status FromProto(const coordination::JobState& in, JobState* out) {
  TESSERA_RETURN_IF_ERROR(CheckJobId(in.job_id()));
  if (in.dead_steps_size() > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat(in.dead_steps_size(), " dead steps; at most 4096 are sent"));
  }
  out->job_id = in.job_id();
  out->epoch = in.epoch();
  TESSERA_RETURN_IF_ERROR(FromProto(in.committed(), &out->committed));
  out->dead_steps.assign(in.dead_steps().begin(), in.dead_steps().end());
  out->dropped_epoch = in.dropped_epoch();
  return absl::OkStatus();
}

void ToProto(const ProtectedReport& in, coordination::ReportProtectedRequest* out) {
  out->set_job_id(in.job_id);
  out->set_world_size(in.world_size);
  out->set_epoch(in.epoch);
  out->set_rank(in.rank);
  out->set_step(in.step);
  out->set_previous_step(in.previous_step);
  out->set_shard_crc32c(in.shard_crc32c);
  out->set_shard_bytes(in.shard_bytes);
  for (const std::string& h : in.holders) out->add_holders(h);
}

absl::Status FromProto(const coordination::ReportProtectedRequest& in, ProtectedReport* out) {
  TESSERA_RETURN_IF_ERROR(CheckJobId(in.job_id()));
  TESSERA_RETURN_IF_ERROR(CheckWorld(in.world_size()));
  if (in.rank() >= in.world_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", in.rank(), " is outside world_size ", in.world_size()));
  }
  if (in.step() < -1 || in.previous_step() < kUnknownStep ||
      (in.step() >= 0 && in.previous_step() >= in.step())) {
    return absl::InvalidArgumentError(absl::StrCat("step ", in.step(), " previous_step ",
                                                   in.previous_step(),
                                                   ": need step >= -1 and previous_step in "
                                                   "[-2, step)"));
  }
  if (in.holders_size() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat(in.holders_size(), " holders; a shard has at most 256 fragments"));
  }
  out->job_id = in.job_id();
  out->world_size = in.world_size();
  out->epoch = in.epoch();
  out->rank = in.rank();
  out->step = in.step();
  out->previous_step = in.previous_step();
  out->shard_crc32c = in.shard_crc32c();
  out->shard_bytes = in.shard_bytes();
  out->owner = in.from().node_id();
  out->holders.assign(in.holders().begin(), in.holders().end());
  return absl::OkStatus();
}

void ToProto(const ResolveQuestion& in, coordination::ResolveRestoreRequest* out) {
  out->set_job_id(in.job_id);
  out->set_world_size(in.world_size);
  out->set_rank(in.rank);
  out->set_resume(in.resume);
  out->set_run_id(in.run_id);
  ToProto(in.known, out->mutable_known());
}

absl::Status FromProto(const coordination::ResolveRestoreRequest& in, ResolveQuestion* out) {
  TESSERA_RETURN_IF_ERROR(CheckJobId(in.job_id()));
  TESSERA_RETURN_IF_ERROR(CheckWorld(in.world_size()));
  if (in.rank() >= in.world_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", in.rank(), " is outside world_size ", in.world_size()));
  }
  out->job_id = in.job_id();
  out->world_size = in.world_size();
  out->rank = in.rank();
  out->resume = in.resume();
  out->run_id = in.run_id();
  return FromProto(in.known(), &out->known);
}

void ToProto(const ResolveAnswer& in, coordination::ResolveRestoreResponse* out) {
  ToProto(in.restore_point, out->mutable_restore_point());
  out->set_epoch(in.epoch);
  out->set_dropped_epoch(in.dropped_epoch);
}

absl::Status FromProto(const coordination::ResolveRestoreResponse& in, ResolveAnswer* out) {
  out->epoch = in.epoch();
  out->dropped_epoch = in.dropped_epoch();
  return FromProto(in.restore_point(), &out->restore_point);
}

void ToProto(const JobListing& in, coordination::ListJobResponse* out) {
  ToProto(in.node, out->mutable_node());
  for (const HeldShard& s : in.shards) {
    coordination::HeldShard* o = out->add_shards();
    o->set_rank(s.rank);
    o->set_step(s.step);
    o->set_payload_bytes(s.payload_bytes);
    o->set_payload_crc32c(s.payload_crc32c);
    o->set_epoch(s.epoch);
  }
  for (const HeldFragment& f : in.fragments) {
    coordination::HeldFragment* o = out->add_fragments();
    o->set_rank(f.rank);
    o->set_step(f.step);
    o->set_index(f.index);
    o->set_ec_k(f.k);
    o->set_ec_m(f.m);
    o->set_shard_bytes(f.shard_bytes);
    o->set_shard_crc32c(f.shard_crc32c);
  }
  ToProto(in.committed, out->mutable_committed());
  out->set_epoch(in.epoch);
  out->set_dropped_epoch(in.dropped_epoch);
}

absl::Status FromProto(const coordination::ListJobResponse& in, JobListing* out) {
  if (in.shards_size() > kMaxListedItems || in.fragments_size() > kMaxListedItems) {
    return absl::InvalidArgumentError(absl::StrCat("listing of ", in.shards_size(), " shards and ",
                                                   in.fragments_size(), " fragments; at most ",
                                                   kMaxListedItems, " each"));
  }
  out->node = FromProto(in.node());
  for (const coordination::HeldShard& s : in.shards()) {
    out->shards.push_back({out->node.node_id, s.rank(), s.step(), 0, s.payload_bytes(),
                           s.payload_crc32c(), s.epoch()});
  }
  for (const coordination::HeldFragment& f : in.fragments()) {
    out->fragments.push_back({out->node.node_id, f.rank(), f.step(), 0, f.index(), f.ec_k(),
                              f.ec_m(), f.shard_bytes(), f.shard_crc32c()});
  }
  out->epoch = in.epoch();
  out->dropped_epoch = in.dropped_epoch();
  return FromProto(in.committed(), &out->committed);
}

void ToProto(const DropQuestion& in, coordination::DropJobRequest* out) {
  out->set_job_id(in.job_id);
  out->set_force(in.force);
  out->set_restrict_to_uid(in.owner_uid.has_value());
  out->set_owner_uid(in.owner_uid.value_or(0));
}

absl::Status FromProto(const coordination::DropJobRequest& in, DropQuestion* out) {
  TESSERA_RETURN_IF_ERROR(CheckJobId(in.job_id()));
  out->job_id = in.job_id();
  out->force = in.force();
  if (in.restrict_to_uid()) out->owner_uid = in.owner_uid();
  return absl::OkStatus();
}

void ToProto(const NodeDrop& in, coordination::NodeDrop* out) {
  out->set_node_id(in.node_id);
  for (uint32_t r : in.ranks) out->add_ranks(r);
  out->set_slots_deleted(in.slots_deleted);
  out->set_slot_bytes_deleted(in.slot_bytes_deleted);
  out->set_fragments_deleted(in.fragments_deleted);
  out->set_fragment_bytes_deleted(in.fragment_bytes_deleted);
  out->set_newest_sealed_step(in.newest_sealed_step);
  for (uint32_t r : in.running_ranks) out->add_running_ranks(r);
  for (int32_t p : in.running_pids) out->add_running_pids(p);
}

absl::Status FromProto(const coordination::NodeDrop& in, NodeDrop* out) {
  if (in.ranks_size() > kMaxListedItems || in.running_ranks_size() > kMaxListedItems ||
      in.running_ranks_size() != in.running_pids_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a node's drop names ", in.ranks_size(), " ranks and ", in.running_ranks_size(),
        " running ranks with ", in.running_pids_size(), " pids"));
  }
  out->node_id = in.node_id();
  out->ranks.assign(in.ranks().begin(), in.ranks().end());
  out->slots_deleted = in.slots_deleted();
  out->slot_bytes_deleted = in.slot_bytes_deleted();
  out->fragments_deleted = in.fragments_deleted();
  out->fragment_bytes_deleted = in.fragment_bytes_deleted();
  out->newest_sealed_step = in.newest_sealed_step();
  out->running_ranks.assign(in.running_ranks().begin(), in.running_ranks().end());
  out->running_pids.assign(in.running_pids().begin(), in.running_pids().end());
  return absl::OkStatus();
}

void ToProto(const JobDrop& in, coordination::DropJobResponse* out) {
  out->set_dropped_epoch(in.dropped_epoch);
  out->set_coordinator(in.coordinator);
  for (const NodeDrop& n : in.nodes) ToProto(n, out->add_nodes());
  for (const auto& [node, error] : in.unanswered) {
    coordination::UnansweredNode* u = out->add_unanswered();
    u->set_node_id(node);
    u->set_error(error);
  }
}

absl::Status FromProto(const coordination::DropJobResponse& in, JobDrop* out) {
  if (in.nodes_size() > kMaxListedItems || in.unanswered_size() > kMaxListedItems) {
    return absl::InvalidArgumentError("a drop answer naming too many nodes");
  }
  out->dropped_epoch = in.dropped_epoch();
  out->coordinator = in.coordinator();
  for (const coordination::NodeDrop& n : in.nodes()) {
    NodeDrop node;
    TESSERA_RETURN_IF_ERROR(FromProto(n, &node));
    out->nodes.push_back(std::move(node));
  }
  for (const coordination::UnansweredNode& u : in.unanswered()) {
    out->unanswered.emplace_back(u.node_id(), u.error());
  }
  return absl::OkStatus();
}

}  // namespace tessera::coordination_wire
