#include "daemon/coordination/protection.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera {
namespace {

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Groups a step's fragments of one rank by the shard they encode; returns the largest group of
// distinct indices that agree on (k, m, shard bytes, shard CRC).
std::vector<const HeldFragment*> BestFragmentGroup(
    const JobHoldings& holdings, uint32_t rank, int64_t step,
    const std::set<std::pair<uint32_t, std::string>>& exclude) {
  std::map<std::tuple<uint32_t, uint32_t, uint64_t, uint32_t>, std::map<uint32_t, const HeldFragment*>>
      groups;
  for (const HeldFragment& f : holdings.fragments) {
    if (f.rank != rank || f.step != step || exclude.count({f.index, f.node})) continue;
    groups[{f.k, f.m, f.shard_bytes, f.shard_crc32c}].emplace(f.index, &f);
  }
  std::vector<const HeldFragment*> best;
  for (const auto& [key, by_index] : groups) {
    if (by_index.size() < std::get<0>(key)) continue;
    std::vector<const HeldFragment*> group;
    for (const auto& [index, f] : by_index) group.push_back(f);  // sorted: data fragments first
    if (group.size() > best.size()) best = group;
  }
  return best;
}

}  // namespace

absl::StatusOr<FragmentPlacement> PlaceFragments(std::vector<std::string> members,
                                                 const std::string& owner, uint32_t rank, int k,
                                                 int m) {
  if (k < 1 || m < 0) {
    return absl::InvalidArgumentError(absl::StrCat("k=", k, ", m=", m,
                                                   ": need k >= 1 and m >= 0"));
  }
  std::sort(members.begin(), members.end());
  members.erase(std::unique(members.begin(), members.end()), members.end());
  auto it = std::find(members.begin(), members.end(), owner);
  if (it == members.end()) {
    return absl::InvalidArgumentError("owner '" + owner + "' is not among the members [" +
                                      absl::StrJoin(members, ", ") + "]");
  }
  members.erase(it);
  FragmentPlacement p;
  const int others = static_cast<int>(members.size());
  if (others == 0) {
    p.degraded = true;
    p.reason = "no other node: no cross-node protection";
    return p;
  }
  if (others >= k + m) {
    p.k = k;
    p.m = m;
  } else if (others > m) {
    p.k = others - m;
    p.m = m;
    p.degraded = true;
    p.reason = absl::StrCat("only ", others, " other nodes: RS(", k, ",", m, ") shrinks to RS(",
                            p.k, ",", p.m, ")");
  } else {
    p.k = 1;
    p.m = others - 1;
    p.degraded = true;
    p.reason = absl::StrCat("only ", others, " other nodes: RS(", k, ",", m,
                            ") shrinks to replication on all of them");
  }
  const size_t start = rank % static_cast<size_t>(others);
  for (int i = 0; i < p.k + p.m; ++i) p.nodes.push_back(members[(start + i) % others]);
  for (int i = p.k + p.m; i < others; ++i) p.spares.push_back(members[(start + i) % others]);
  return p;
}

std::string CoordinatorFor(const std::string& job_id, std::vector<std::string> live_members) {
  std::sort(live_members.begin(), live_members.end());
  size_t best = 0;
  uint64_t best_weight = Fnv1a(job_id + "/" + live_members[0]);
  for (size_t i = 1; i < live_members.size(); ++i) {
    const uint64_t weight = Fnv1a(job_id + "/" + live_members[i]);
    if (weight > best_weight) {  // ties: the first in sorted order
      best = i;
      best_weight = weight;
    }
  }
  return live_members[best];
}

absl::StatusOr<RestorePlan> PlanRestore(const JobHoldings& holdings, const std::string& local_node,
                                        uint32_t rank, int64_t step,
                                        const std::set<std::pair<uint32_t, std::string>>& exclude) {
  const HeldShard* remote = nullptr;
  for (const HeldShard& s : holdings.shards) {
    if (s.rank != rank || s.step != step) continue;
    if (s.node == local_node) {
      RestorePlan plan;
      plan.source = RestorePlan::Source::kLocal;
      plan.node = local_node;
      plan.shard_bytes = s.payload_bytes;
      plan.shard_crc32c = s.payload_crc32c;
      return plan;
    }
    if (!remote) remote = &s;
  }
  if (remote) {
    RestorePlan plan;
    plan.source = RestorePlan::Source::kCopy;
    plan.node = remote->node;
    plan.shard_bytes = remote->payload_bytes;
    plan.shard_crc32c = remote->payload_crc32c;
    return plan;
  }
  std::vector<const HeldFragment*> group = BestFragmentGroup(holdings, rank, step, exclude);
  if (group.empty()) {
    size_t found = 0;
    uint32_t k = 0;
    for (const HeldFragment& f : holdings.fragments) {
      if (f.rank == rank && f.step == step && !exclude.count({f.index, f.node})) {
        ++found;
        k = f.k;
      }
    }
    if (found == 0) {
      return absl::NotFoundError(absl::StrCat("rank ", rank, " step ", step,
                                              ": no live node holds its shard or a fragment"));
    }
    return absl::DataLossError(absl::StrCat("rank ", rank, " step ", step, ": only ", found,
                                            " intact fragments on live nodes, ", k,
                                            " are needed to rebuild it"));
  }
  RestorePlan plan;
  plan.source = RestorePlan::Source::kRebuild;
  plan.k = group[0]->k;
  plan.m = group[0]->m;
  plan.shard_bytes = group[0]->shard_bytes;
  plan.shard_crc32c = group[0]->shard_crc32c;
  for (uint32_t i = 0; i < plan.k; ++i) plan.fragments.emplace_back(group[i]->index, group[i]->node);
  return plan;
}

absl::StatusOr<int64_t> FindLatestRestorable(const JobHoldings& holdings,
                                             uint32_t min_world_size) {
  uint32_t floor = min_world_size;
  for (const auto& s : holdings.shards) floor = std::max(floor, s.rank + 1);
  for (const auto& f : holdings.fragments) floor = std::max(floor, f.rank + 1);
  std::map<int64_t, uint32_t> world_by_step;
  for (const auto& s : holdings.shards) {
    world_by_step[s.step] = std::max({world_by_step[s.step], s.world_size, floor});
  }
  for (const auto& f : holdings.fragments) {
    world_by_step[f.step] = std::max({world_by_step[f.step], f.world_size, floor});
  }
  std::string newest_problem;
  for (auto it = world_by_step.rbegin(); it != world_by_step.rend(); ++it) {
    const int64_t step = it->first;
    std::vector<std::string> missing;
    for (uint32_t rank = 0; rank < it->second; ++rank) {
      auto plan = PlanRestore(holdings, "", rank, step);
      if (!plan.ok()) missing.push_back(std::string(plan.status().message()));
    }
    if (missing.empty()) return step;
    if (newest_problem.empty()) {
      newest_problem = absl::StrCat("step ", step, " cannot be restored: ", absl::StrJoin(missing, "; "));
    }
  }
  if (world_by_step.empty()) return absl::NotFoundError("no sealed snapshot of the job on any live node");
  return absl::NotFoundError("no step can be restored on every rank; newest: " + newest_problem);
}

}  // namespace tessera
