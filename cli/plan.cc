#include "cli/plan.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace tessera::cli {
namespace {

constexpr double kSecondsPerDay = 86400;
constexpr double kDaysPerMonth = 30;
constexpr int kSimpsonIntervals = 512;  // even; p(a) is smooth in a

// log C(n, i) through lgamma, so large n does not overflow.
double LogChoose(int n, int i) {
  return std::lgamma(n + 1.0) - std::lgamma(i + 1.0) - std::lgamma(n - i + 1.0);
}

}  // namespace

double BinomialTailAtLeast(int n, double q, int at_least) {
  if (at_least <= 0) return 1;
  if (at_least > n || q <= 0) return 0;
  if (q >= 1) return 1;
  double sum = 0;
  for (int i = at_least; i <= n; ++i) {
    sum += std::exp(LogChoose(n, i) + i * std::log(q) + (n - i) * std::log1p(-q));
  }
  return std::min(1.0, sum);
}

absl::StatusOr<PlanResult> PlanSnapshotLoss(const PlanInput& in) {
  if (in.nodes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--nodes ", in.nodes, ": need at least 1"));
  }
  if (in.k < 1) return absl::InvalidArgumentError(absl::StrCat("--k ", in.k, ": need k >= 1"));
  if (in.m < 0) return absl::InvalidArgumentError(absl::StrCat("--m ", in.m, ": need m >= 0"));
  if (!(in.node_mtbf_hours > 0) || !std::isfinite(in.node_mtbf_hours)) {
    return absl::InvalidArgumentError(absl::StrCat("--node-mtbf-hours ", in.node_mtbf_hours,
                                                   ": need a positive number of hours"));
  }
  if (!(in.interval_s > 0) || !std::isfinite(in.interval_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--interval-s ", in.interval_s, ": need a positive number of seconds"));
  }
  if (!(in.rebuild_s >= 0) || !std::isfinite(in.rebuild_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rebuild-s ", in.rebuild_s, ": need zero or more seconds"));
  }
  if (in.ranks_per_node < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ranks-per-node ", in.ranks_per_node, ": need at least 1"));
  }

  PlanResult r;
  // The daemon's placement (PlaceFragments): with fewer than k+m other nodes k shrinks first,
  // then m, down to replication on all the others.
  const int others = in.nodes - 1;
  if (others == 0) {
    r.protected_across_nodes = false;
    r.shrink_reason = "one node: no cross-node protection";
  } else if (others >= in.k + in.m) {
    r.k = in.k;
    r.m = in.m;
  } else if (others > in.m) {
    r.k = others - in.m;
    r.m = in.m;
    r.shrink_reason = absl::StrCat("only ", others, " other nodes: RS(", in.k, ",", in.m,
                                   ") shrinks to RS(", r.k, ",", r.m, ")");
  } else {
    r.k = 1;
    r.m = others - 1;
    r.shrink_reason = absl::StrCat("only ", others, " other nodes: RS(", in.k, ",", in.m,
                                   ") shrinks to replication on all of them");
  }
  r.storage_overhead = r.protected_across_nodes ? static_cast<double>(r.k + r.m) / r.k : 0;

  const double lambda = 1.0 / (in.node_mtbf_hours * 3600);  // failures per node-second
  const double T = in.interval_s;
  const int n = r.k + r.m;
  auto q_at = [&](double age) { return -std::expm1(-lambda * (age + in.rebuild_s)); };
  auto p_at = [&](double age) {
    return r.protected_across_nodes ? BinomialTailAtLeast(n, q_at(age), r.m + 1) : 1.0;
  };
  auto node_loss_at = [&](double age) {
    // 1 - (1 - p)^r without cancellation when p is tiny.
    const double p = p_at(age);
    return p >= 1 ? 1.0 : -std::expm1(in.ranks_per_node * std::log1p(-p));
  };
  auto average = [&](auto&& f) {
    const double h = T / kSimpsonIntervals;
    double sum = f(0.0) + f(T);
    for (int i = 1; i < kSimpsonIntervals; ++i) sum += (i % 2 == 1 ? 4 : 2) * f(i * h);
    return sum * h / 3 / T;
  };
  r.holder_failure_probability = average(q_at);
  r.stripe_loss_given_owner_failure = average(p_at);
  r.node_loss_given_failure = r.protected_across_nodes ? average(node_loss_at) : 1.0;

  const double losses_per_second = in.nodes * lambda * r.node_loss_given_failure;
  r.losses_per_day = losses_per_second * kSecondsPerDay;
  r.loss_probability_per_day = -std::expm1(-r.losses_per_day);
  r.loss_probability_per_month = -std::expm1(-r.losses_per_day * kDaysPerMonth);
  r.mean_days_between_losses =
      r.losses_per_day > 0 ? 1.0 / r.losses_per_day : std::numeric_limits<double>::infinity();
  return r;
}

}  // namespace tessera::cli
