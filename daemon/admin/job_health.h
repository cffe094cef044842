// What the operator is told about a job: for each step, where every rank is held and whether it
// can be rebuilt, and the job's protection health, decided from what the live members hold
// (their ListHeld answers). Transport-free; the admin service gathers the holdings.
#ifndef TESSERA_DAEMON_ADMIN_JOB_HEALTH_H_
#define TESSERA_DAEMON_ADMIN_JOB_HEALTH_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "daemon/coordination/protection.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/peer_service.h"

namespace tessera {

// One rank at one step.
struct RankAtStep {
  uint32_t rank = 0;
  std::vector<std::string> shard_nodes;  // members holding the sealed shard
  uint64_t shard_bytes = 0;
  uint32_t shard_crc32c = 0;
  uint32_t k = 0;  // of the fragments that agree with each other (most of them)
  uint32_t m = 0;
  std::vector<std::pair<uint32_t, std::string>> fragments;  // (index, member), one per index
  bool restorable = false;       // a sealed shard, or at least k fragments
  bool fully_protected = false;  // all k+m fragments
};

struct StepView {
  int64_t step = -1;
  std::vector<RankAtStep> ranks;        // by rank; ranks held nowhere are absent
  std::vector<uint32_t> missing_ranks;  // ranks of the world held nowhere
  bool restorable = false;              // every rank of the world is restorable
  bool fully_protected = false;         // every rank of the world has all k+m fragments
};

enum class JobHealth { kProtected, kDegraded, kUnprotected };

struct JobView {
  std::string job_id;
  uint32_t world_size = 0;
  int64_t newest_step = -1;
  int64_t committed_step = -1;
  int64_t restorable_step = -1;
  JobHealth health = JobHealth::kUnprotected;
  std::string reason;  // empty when kProtected
  uint32_t k = 0;      // in effect at committed_step
  uint32_t m = 0;
  std::vector<std::string> nodes;  // members holding anything of the job, sorted
  std::vector<StepView> steps;     // newest first
};

// What protection can offer where the job lives.
struct ProtectionContext {
  bool cluster = false;     // peer.listen_address set
  size_t live_members = 1;  // this daemon included
  int k = 0;                // configured
  int m = 0;
};

// Decides the views and health of one job. world_size_hint: the world size known from local
// registrations (0: unknown; then the highest rank held plus one). committed_hint: the newest
// step this daemon knows committed (-1: none); the newest step at which every rank has all its
// fragments counts as committed too, as the commit rule decides it everywhere.
JobView AssessJob(const std::string& job_id, const JobHoldings& holdings, uint32_t world_size_hint,
                  int64_t committed_hint, const ProtectionContext& context);

// Adds what `node` holds (sealed shards and SEALED fragments; WRITING ones are skipped) to the
// holdings of each job in `jobs`.
void AddHoldings(const std::string& node, const std::vector<ShardInfo>& shards,
                 const std::vector<FragmentStatus>& fragments,
                 std::map<std::string, JobHoldings>* jobs);

}  // namespace tessera

#endif  // TESSERA_DAEMON_ADMIN_JOB_HEALTH_H_
