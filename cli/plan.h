// `tessera plan`: how likely a cluster is to lose its newest snapshot, from the node count, the
// erasure code, the nodes' mean time between failures and the snapshot interval. Pure math, no
// I/O.
//
// The model (a survival analysis in the manner of the REFT paper):
//   - Nodes fail independently; a node's failures form a Poisson process of rate
//     lambda = 1 / node_mtbf (a failed machine is replaced, and the replacement fails alike).
//   - Snapshots are protected every T = interval seconds. Each rank's shard is a stripe: its owner
//     holds it whole and k+m other nodes each hold one fragment (k and m shrink as the daemon's
//     placement shrinks them when fewer than k+m other nodes exist). When the stripe is placed,
//     all its nodes are up.
//   - The restore point is the newest protected snapshot. The snapshot is lost when its owner
//     fails and the shard cannot be rebuilt: more than m of its k+m fragment holders have failed
//     between the snapshot's protection and the rebuild, which reads the fragments R = rebuild
//     seconds after the owner's failure (detection, restart and rebuild).
//   - The owner fails at an age a of the snapshot, uniform on [0, T) (the failure process does
//     not know when snapshots are taken). A holder fails within a + R with probability
//     q(a) = 1 - exp(-lambda (a + R)), so with n = k + m holders
//         p(a) = P[Binomial(n, q(a)) >= m + 1] = sum_{i=m+1}^{n} C(n,i) q(a)^i (1 - q(a))^(n-i).
//   - A node owns r ranks (r stripes with different holder sets). Given its failure at age a, it
//     loses the job's snapshot with probability 1 - (1 - p(a))^r. The stripes share holders, and
//     their losses rise together with the holders' failures, so by the Harris (FKG) inequality
//     this is an upper bound; it is exact for r = 1.
//         P_node = (1/T) integral_0^T [1 - (1 - p(a))^r] da          (Simpson's rule)
//   - Owner failures arrive at rate N lambda, so snapshot losses arrive at rate
//         Lambda = N lambda P_node   (per second),
//     and the probability of losing a snapshot within a duration D is 1 - exp(-Lambda D).
//   - With one node there is no cross-node protection: every failure of it loses the snapshot.
#ifndef TESSERA_CLI_PLAN_H_
#define TESSERA_CLI_PLAN_H_

#include <string>

#include "absl/status/statusor.h"

namespace tessera::cli {

struct PlanInput {
  int nodes = 0;
  int k = 0;
  int m = 0;
  double node_mtbf_hours = 0;
  double interval_s = 0;
  double rebuild_s = 60;   // from the owner's failure to reading its fragments
  int ranks_per_node = 1;  // stripes owned by each node
};

struct PlanResult {
  int k = 0;  // as placed: shrunk when nodes - 1 < k + m
  int m = 0;
  bool protected_across_nodes = true;          // false with one node
  std::string shrink_reason;                   // empty unless k or m shrank
  double holder_failure_probability = 0;       // q averaged over the snapshot's age
  double stripe_loss_given_owner_failure = 0;  // p averaged over the age
  double node_loss_given_failure = 0;          // P_node
  double losses_per_day = 0;                   // Lambda in days
  double loss_probability_per_day = 0;
  double loss_probability_per_month = 0;  // 30 days
  double mean_days_between_losses = 0;    // infinity when nothing can be lost
  double storage_overhead = 0;            // (k + m) / k: fragment bytes per shard byte
};

// Errors: kInvalidArgument naming the input and what is valid (nodes >= 1, k >= 1, m >= 0,
// positive MTBF and interval, rebuild >= 0, ranks_per_node >= 1).
absl::StatusOr<PlanResult> PlanSnapshotLoss(const PlanInput& input);

// P[Binomial(n, q) >= at_least], summed term by term so that tiny values keep their precision.
double BinomialTailAtLeast(int n, double q, int at_least);

}  // namespace tessera::cli

#endif  // TESSERA_CLI_PLAN_H_
