// `tessera plan`: the closed form of cli/plan.h, printed.
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/command.h"
#include "cli/format.h"
#include "cli/plan.h"
#include "common/status.h"

namespace tessera::cli {

absl::StatusOr<Outcome> RunPlan(Context& ctx) {
  const ParsedArgs& args = ctx.args();
  PlanInput in;
  constexpr int64_t kMaxNodes = 1 << 20;
  auto nodes = args.GetInt("nodes", 0, 1, kMaxNodes);
  auto k = args.GetInt("k", 0, 1, 128);
  auto m = args.GetInt("m", 0, 0, 128);
  auto mtbf = args.GetDouble("node-mtbf-hours", 0, 0);
  auto interval = args.GetDouble("interval-s", 0, 0);
  auto rebuild = args.GetDouble("rebuild-s", 60, 0, /*min_inclusive=*/true);
  auto ranks = args.GetInt("ranks-per-node", 1, 1, 1 << 16);
  for (const absl::Status& s : {nodes.status(), k.status(), m.status(), mtbf.status(),
                                interval.status(), rebuild.status(), ranks.status()}) {
    if (!s.ok()) return s;
  }
  in.nodes = static_cast<int>(*nodes);
  in.k = static_cast<int>(*k);
  in.m = static_cast<int>(*m);
  in.node_mtbf_hours = *mtbf;
  in.interval_s = *interval;
  in.rebuild_s = *rebuild;
  in.ranks_per_node = static_cast<int>(*ranks);
  TESSERA_ASSIGN_OR_RETURN(PlanResult plan, PlanSnapshotLoss(in));

  Outcome outcome;
  Json& j = outcome.json;
  Json input = Json::Object();
  input.Set("nodes", in.nodes);
  input.Set("k", in.k);
  input.Set("m", in.m);
  input.Set("node_mtbf_hours", in.node_mtbf_hours);
  input.Set("interval_s", in.interval_s);
  input.Set("rebuild_s", in.rebuild_s);
  input.Set("ranks_per_node", in.ranks_per_node);
  j.Set("input", std::move(input));
  j.Set("k", plan.k);
  j.Set("m", plan.m);
  j.Set("protected_across_nodes", plan.protected_across_nodes);
  j.Set("shrink_reason", plan.shrink_reason);
  j.Set("storage_overhead", plan.storage_overhead);
  j.Set("holder_failure_probability", plan.holder_failure_probability);
  j.Set("stripe_loss_given_owner_failure", plan.stripe_loss_given_owner_failure);
  j.Set("node_loss_given_failure", plan.node_loss_given_failure);
  j.Set("losses_per_day", plan.losses_per_day);
  j.Set("loss_probability_per_day", plan.loss_probability_per_day);
  j.Set("loss_probability_per_month", plan.loss_probability_per_month);
  j.Set("mean_days_between_losses", plan.mean_days_between_losses);

  std::string& t = outcome.text;
  absl::StrAppend(
      &t, "plan: ", in.nodes, " nodes, RS(", in.k, ",", in.m, "), node MTBF ",
      absl::StrFormat("%g", in.node_mtbf_hours), " h, a snapshot every ",
      HumanSeconds(in.interval_s), ", rebuild within ", HumanSeconds(in.rebuild_s),
      in.ranks_per_node > 1 ? absl::StrCat(", ", in.ranks_per_node, " ranks per node") : "", "\n");
  if (!plan.shrink_reason.empty()) absl::StrAppend(&t, "  note: ", plan.shrink_reason, "\n");
  if (plan.protected_across_nodes) {
    absl::StrAppend(&t, "  placed as RS(", plan.k, ",", plan.m,
                    "): a shard survives its owner and ", plan.m, " of its ", plan.k + plan.m,
                    " fragment holders; fragments cost ",
                    absl::StrFormat("%.2f", plan.storage_overhead),
                    "x the shard in memory and "
                    "network\n");
  }
  absl::StrAppend(&t, "  a node fails during a snapshot's exposure with probability ",
                  HumanProbability(plan.holder_failure_probability), "\n");
  absl::StrAppend(&t, "  when an owner fails, its snapshot cannot be rebuilt with probability ",
                  HumanProbability(plan.node_loss_given_failure), "\n");
  absl::StrAppend(
      &t, "  P(snapshot lost) per day:   ", HumanProbability(plan.loss_probability_per_day), "\n");
  absl::StrAppend(&t, "  P(snapshot lost) per month: ",
                  HumanProbability(plan.loss_probability_per_month), " (30 days)\n");
  absl::StrAppend(
      &t, "  mean time between losses:   ",
      plan.losses_per_day > 0 ? HumanSeconds(plan.mean_days_between_losses * 86400) : "never",
      "\n");
  return outcome;
}

}  // namespace tessera::cli
