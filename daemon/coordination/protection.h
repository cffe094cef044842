// Transport-free decisions of cross-node protection: where a shard's fragments go, which daemon
// coordinates a job, when a step is committed, and how a shard can be made local again.
#ifndef TESSERA_DAEMON_COORDINATION_PROTECTION_H_
#define TESSERA_DAEMON_COORDINATION_PROTECTION_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

// Where the fragments of one shard go. fragment i is stored on nodes[i]; i < k are data.
struct FragmentPlacement {
  int k = 0;
  int m = 0;
  std::vector<std::string> nodes;
  // The other members outside `nodes`, in the order in which they stand in for a node of `nodes`
  // that is live but cannot be reached from the owner (a cut link): the rotation continued.
  std::vector<std::string> spares;
  bool degraded = false;  // k or m is smaller than configured
  std::string reason;     // why, when degraded or unprotected
};

// Places the k+m fragments of `rank`'s shard on k+m distinct members other than `owner`,
// starting at an offset rotated by rank, so that every member receives an even share.
// With fewer than k+m other members, k shrinks first (down to 1), then m: (k', m) with
// k' = others - m, else (1, others - 1), which is replication. With no other member the result
// has no nodes (unprotected). `members` need not be sorted; `owner` must be one of them.
absl::StatusOr<FragmentPlacement> PlaceFragments(std::vector<std::string> members,
                                                 const std::string& owner, uint32_t rank, int k,
                                                 int m);

// The coordinator of `job_id`: the live member with the highest rendezvous weight
// FNV-1a(job_id + "/" + member), so that a membership change moves only the jobs of the members
// that came or went. REQUIRES: live_members is not empty.
std::string CoordinatorFor(const std::string& job_id, std::vector<std::string> live_members);

// What the live nodes hold for one job (from ListHeld answers).
struct HeldShard {
  std::string node;
  uint32_t rank = 0;
  int64_t step = 0;
  uint32_t world_size = 0;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc32c = 0;
  uint64_t epoch = 0;  // the history it was sealed in (0: not known)
};
struct HeldFragment {
  std::string node;
  uint32_t rank = 0;
  int64_t step = 0;
  uint32_t world_size = 0;
  uint32_t index = 0;
  uint32_t k = 0;
  uint32_t m = 0;
  uint64_t shard_bytes = 0;
  uint32_t shard_crc32c = 0;
};
struct JobHoldings {
  std::vector<HeldShard> shards;
  std::vector<HeldFragment> fragments;  // sealed fragments only
};

// How to make (rank, step) local.
struct RestorePlan {
  enum class Source { kLocal, kCopy, kRebuild };
  Source source = Source::kLocal;
  std::string node;  // kLocal / kCopy: the node holding the sealed shard
  // kRebuild: k fragments to read, as (fragment index, node), data fragments preferred.
  std::vector<std::pair<uint32_t, std::string>> fragments;
  uint32_t k = 0, m = 0;
  uint64_t shard_bytes = 0;
  uint32_t shard_crc32c = 0;
};

// Plans (rank, step) for `local_node`: a sealed shard here, else a sealed shard elsewhere, else
// any k fragments agreeing on (k, m, shard size, shard CRC). Fragments listed in `exclude` (e.g.
// found corrupt) are not used. kNotFound / kDataLoss name what is missing.
absl::StatusOr<RestorePlan> PlanRestore(const JobHoldings& holdings, const std::string& local_node,
                                        uint32_t rank, int64_t step,
                                        const std::set<std::pair<uint32_t, std::string>>& exclude = {});

// The newest step at which every rank of the job can be restored from the holdings. Each step's
// world size is the largest of its shards' and fragments' (0 where unknown), `min_world_size`
// and the highest rank held plus one. kNotFound when none; the message names, for the newest
// step seen, the ranks that cannot be rebuilt.
absl::StatusOr<int64_t> FindLatestRestorable(const JobHoldings& holdings,
                                             uint32_t min_world_size = 0);

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_PROTECTION_H_
