#include "daemon/admin/job_health.h"

#include <algorithm>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera {
namespace {

// Fragments of one rank at one step that agree on how the shard was coded.
using CodingKey = std::tuple<uint32_t, uint32_t, uint64_t, uint32_t>;  // k, m, bytes, crc

RankAtStep AssessRank(uint32_t rank, const std::vector<const HeldShard*>& shards,
                      const std::vector<const HeldFragment*>& fragments) {
  RankAtStep r;
  r.rank = rank;
  for (const HeldShard* s : shards) {
    r.shard_nodes.push_back(s->node);
    r.shard_bytes = s->payload_bytes;
    r.shard_crc32c = s->payload_crc32c;
  }
  std::sort(r.shard_nodes.begin(), r.shard_nodes.end());
  r.shard_nodes.erase(std::unique(r.shard_nodes.begin(), r.shard_nodes.end()), r.shard_nodes.end());
  // The coding most fragments agree on; with a sealed shard, only one matching its CRC32C.
  std::map<CodingKey, std::map<uint32_t, std::string>> by_coding;
  for (const HeldFragment* f : fragments) {
    if (!shards.empty() && f->shard_crc32c != r.shard_crc32c) continue;
    by_coding[{f->k, f->m, f->shard_bytes, f->shard_crc32c}].emplace(f->index, f->node);
  }
  const std::map<uint32_t, std::string>* best = nullptr;
  for (const auto& [coding, indexes] : by_coding) {
    if (best == nullptr || indexes.size() > best->size()) {
      best = &indexes;
      std::tie(r.k, r.m, r.shard_bytes, r.shard_crc32c) = coding;
    }
  }
  if (best != nullptr) r.fragments.assign(best->begin(), best->end());
  r.restorable = !r.shard_nodes.empty() || (r.k > 0 && r.fragments.size() >= r.k);
  r.fully_protected = r.k > 0 && r.fragments.size() >= r.k + r.m;
  return r;
}

}  // namespace

void AddHoldings(const std::string& node, const std::vector<ShardInfo>& shards,
                 const std::vector<FragmentStatus>& fragments,
                 std::map<std::string, JobHoldings>* jobs) {
  for (const ShardInfo& s : shards) {
    (*jobs)[s.job_id].shards.push_back(
        {node, s.rank, s.step, s.world_size, s.payload_bytes, s.payload_crc32c});
  }
  for (const FragmentStatus& f : fragments) {
    if (f.state != SegmentState::kSealed) continue;
    (*jobs)[f.key.job_id].fragments.push_back({node, f.key.rank, f.key.step, 0,
                                               f.key.fragment_index, f.meta.ec_k, f.meta.ec_m,
                                               f.meta.shard_bytes, f.meta.shard_crc32c});
  }
}

JobView AssessJob(const std::string& job_id, const JobHoldings& holdings, uint32_t world_size_hint,
                  int64_t committed_hint, const ProtectionContext& context) {
  JobView view;
  view.job_id = job_id;
  view.world_size = world_size_hint;
  std::map<int64_t, std::map<uint32_t, std::vector<const HeldShard*>>> shards;
  std::map<int64_t, std::map<uint32_t, std::vector<const HeldFragment*>>> fragments;
  std::set<std::string> nodes;
  for (const HeldShard& s : holdings.shards) {
    shards[s.step][s.rank].push_back(&s);
    view.world_size = std::max({view.world_size, s.world_size, s.rank + 1});
    nodes.insert(s.node);
  }
  for (const HeldFragment& f : holdings.fragments) {
    fragments[f.step][f.rank].push_back(&f);
    view.world_size = std::max({view.world_size, f.world_size, f.rank + 1});
    nodes.insert(f.node);
  }
  view.nodes.assign(nodes.begin(), nodes.end());
  std::set<int64_t, std::greater<int64_t>> steps;
  for (const auto& entry : shards) steps.insert(entry.first);
  for (const auto& entry : fragments) steps.insert(entry.first);

  for (int64_t step : steps) {
    StepView sv;
    sv.step = step;
    sv.restorable = sv.fully_protected = true;
    for (uint32_t rank = 0; rank < view.world_size; ++rank) {
      const auto& rank_shards = shards[step][rank];
      const auto& rank_fragments = fragments[step][rank];
      if (rank_shards.empty() && rank_fragments.empty()) {
        sv.missing_ranks.push_back(rank);
        sv.restorable = sv.fully_protected = false;
        continue;
      }
      sv.ranks.push_back(AssessRank(rank, rank_shards, rank_fragments));
      sv.restorable = sv.restorable && sv.ranks.back().restorable;
      sv.fully_protected = sv.fully_protected && sv.ranks.back().fully_protected;
    }
    view.newest_step = std::max(view.newest_step, step);
    if (sv.restorable) view.restorable_step = std::max(view.restorable_step, step);
    if (sv.fully_protected) view.committed_step = std::max(view.committed_step, step);
    view.steps.push_back(std::move(sv));
  }
  view.committed_step = std::max(view.committed_step, committed_hint);

  if (!context.cluster) {
    view.health = JobHealth::kUnprotected;
    view.reason =
        "standalone daemon (peer.listen_address is empty): snapshots survive trainer "
        "and daemon restarts, not the loss of this node";
    return view;
  }
  if (context.live_members <= 1) {
    view.health = JobHealth::kUnprotected;
    view.reason = "this daemon is the only live member: no cross-node protection";
    return view;
  }
  const StepView* at = nullptr;
  for (const StepView& sv : view.steps) {
    if (sv.step == view.committed_step) at = &sv;
  }
  if (at == nullptr) {
    view.health = JobHealth::kUnprotected;
    if (view.committed_step >= 0) {
      view.reason = absl::StrCat("committed step ", view.committed_step,
                                 " is no longer held by the live members");
    } else if (view.newest_step >= 0) {
      view.reason = absl::StrCat("no step is protected on every rank yet (newest step ",
                                 view.newest_step, "): protection is in progress or failing");
    } else {
      view.reason = "nothing is held for this job";
    }
    return view;
  }
  std::vector<std::string> below_k, missing, other_coding;
  std::set<std::pair<uint32_t, uint32_t>> codings;
  for (uint32_t rank : at->missing_ranks) {
    below_k.push_back(absl::StrCat("rank ", rank, " is held nowhere"));
  }
  for (const RankAtStep& r : at->ranks) {
    codings.insert({r.k, r.m});
    const size_t n = r.fragments.size();
    if (r.k == 0 || n < r.k) {
      below_k.push_back(absl::StrCat("rank ", r.rank, ": ", n, " fragments on live members, ",
                                     r.k == 0 ? std::string("none") : absl::StrCat(r.k),
                                     " needed to rebuild it"));
    } else if (n < r.k + r.m) {
      missing.push_back(
          absl::StrCat("rank ", r.rank, ": ", n, " of ", r.k + r.m, " fragments on live members"));
    }
  }
  if (!at->ranks.empty()) {
    view.k = std::max_element(at->ranks.begin(), at->ranks.end(),
                              [](const RankAtStep& a, const RankAtStep& b) { return a.k < b.k; })
                 ->k;
    for (const RankAtStep& r : at->ranks) {
      if (r.k == view.k) view.m = std::max(view.m, r.m);
    }
  }
  for (const auto& [k, m] : codings) {
    if (k != static_cast<uint32_t>(context.k) || m != static_cast<uint32_t>(context.m)) {
      other_coding.push_back(absl::StrCat("RS(", k, ", ", m,
                                          ") in effect instead of the "
                                          "configured RS(",
                                          context.k, ", ", context.m, ") (", context.live_members,
                                          " live members)"));
    }
  }
  const std::string where = absl::StrCat("step ", at->step, ": ");
  if (!below_k.empty()) {
    view.health = JobHealth::kUnprotected;
    view.reason = where + absl::StrJoin(below_k, "; ");
  } else if (!missing.empty() || !other_coding.empty()) {
    view.health = JobHealth::kDegraded;
    std::vector<std::string> all = other_coding;
    all.insert(all.end(), missing.begin(), missing.end());
    view.reason = where + absl::StrJoin(all, "; ");
  } else {
    view.health = JobHealth::kProtected;
  }
  return view;
}

}  // namespace tessera
