// `tessera drill`: break something real in a live cluster, watch it being detected, rebuild, and
// judge the result bit-exact by the CRC32C its owner sealed.
//
// Who restarts what: kill-trainer needs the job's launcher to start the trainer again (torchrun
// elastic in production; the test's own loop in tests/cli), kill-daemon needs the daemon's
// supervisor (systemd Restart=always, a Kubernetes DaemonSet; a restart loop in tests). Both
// signal a local process, so they run on the node they drill. lose-node and corrupt act through
// the admin service and work from anywhere.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "cli/format.h"
#include "cli/verify.h"
#include "common/status.h"

namespace tessera::cli {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string LocalHostname() {
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return host;
}

// The command name of process `pid` (/proc/PID/comm), empty if it does not run.
std::string ProcessName(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
  std::string name;
  std::getline(in, name);
  return name;
}

// What a drill found, printed as its report.
struct DrillReport {
  std::string kind;
  std::string job;
  int64_t step = -1;
  std::string broken;  // what was broken
  Json broken_json = Json::Object();
  std::string detected;  // how it was detected
  double detected_after_s = -1;
  std::vector<std::string> recovery_lines;
  Json recovery = Json::Array();
  double time_to_rebuild_s = -1;
  uint64_t bytes_moved = 0;
  bool bit_exact = false;
  // Who read the bytes back against the CRC32C their owner sealed: "daemon" (the drill's own
  // Recover check), "trainer" (the restarted trainer's restore, when the job committed a newer
  // step before the drill could read the old one); empty when nobody did.
  std::string checked_by;
  std::string verdict;  // why, when not bit-exact; or a note when it is
  std::vector<std::string> notes;

  void AddRecover(const admin::RecoverResponse& r) {
    recovery_lines.push_back(RecoverText(r));
    recovery.Add(RecoverJson(r));
    bytes_moved += r.bytes_moved();
  }

  Outcome ToOutcome() const {
    Outcome outcome;
    outcome.exit_code = bit_exact ? kExitOk : kExitUnhealthy;
    Json& j = outcome.json;
    j.Set("drill", kind);
    j.Set("job", job);
    j.Set("step", step);
    j.Set("broken", broken);
    j.Set("broken_detail", broken_json);
    j.Set("detected", detected);
    j.Set("detected_after_ms", detected_after_s < 0 ? Json() : Json(detected_after_s * 1e3));
    j.Set("recovery", recovery);
    j.Set("time_to_rebuild_ms", time_to_rebuild_s < 0 ? Json() : Json(time_to_rebuild_s * 1e3));
    j.Set("bytes_moved", bytes_moved);
    j.Set("bit_exact", bit_exact);
    j.Set("checked_by", checked_by);
    j.Set("verdict", bit_exact ? "bit-exact" : "failed: " + verdict);
    j.Set("notes", Json::ArrayOf(notes));
    std::string& t = outcome.text;
    absl::StrAppend(&t, "drill ", kind, " on job ", job,
                    step >= 0 ? absl::StrCat(" (step ", step, ")") : "", "\n");
    absl::StrAppend(&t, "  broken:    ", broken, "\n");
    absl::StrAppend(
        &t, "  detected:  ", detected.empty() ? "-" : detected,
        detected_after_s >= 0 ? absl::StrCat(" (after ", HumanSeconds(detected_after_s), ")") : "",
        "\n");
    for (size_t i = 0; i < recovery_lines.size(); ++i) {
      absl::StrAppend(&t, i == 0 ? "  recovered: " : "             ", recovery_lines[i]);
    }
    if (recovery_lines.empty()) absl::StrAppend(&t, "  recovered: -\n");
    absl::StrAppend(
        &t, "  time to rebuild: ", time_to_rebuild_s < 0 ? "-" : HumanSeconds(time_to_rebuild_s),
        "; bytes moved: ", HumanBytes(bytes_moved), "\n");
    for (const std::string& n : notes) absl::StrAppend(&t, "  note: ", n, "\n");
    absl::StrAppend(
        &t, "  verdict:   ",
        bit_exact ? "BIT-EXACT" + (verdict.empty() ? "" : ": " + verdict) : "FAILED: " + verdict,
        "\n");
    return outcome;
  }
};

// Polls `done` every 20 ms until it returns true or `limit` passes; returns whether it did.
template <typename Done>
bool WaitFor(double limit_s, Done&& done) {
  const auto start = Clock::now();
  while (true) {
    if (done()) return true;
    if (SecondsSince(start) >= limit_s) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// The job a drill acts on: --job, else the one job marked as a drill target; refused unless it is
// marked or --yes is given.
absl::StatusOr<admin::JobStatus> ChooseDrillJob(Context& ctx,
                                                const admin::GetStatusResponse& status) {
  std::vector<std::string> all, marked;
  for (const auto& job : status.jobs()) {
    all.push_back(job.job_id());
    if (job.drill_target()) marked.push_back(job.job_id());
  }
  std::string name = ctx.args().Get("job");
  if (name.empty()) {
    if (marked.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no job is marked as a drill target: mark one with `tessera drill mark JOB`, or name "
          "one with --job JOB --yes",
          all.empty() ? "; the cluster holds no job" : "; jobs: " + absl::StrJoin(all, ", ")));
    }
    if (marked.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat("several jobs are drill targets (",
                                                     absl::StrJoin(marked, ", "),
                                                     "): choose one with --job JOB"));
    }
    name = marked[0];
  }
  for (const auto& job : status.jobs()) {
    if (job.job_id() != name) continue;
    if (!job.drill_target() && !ctx.args().Has("yes")) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", name, " is not marked as a drill target: mark it with `tessera drill mark ", name,
          "`, or pass --yes to drill it anyway"));
    }
    return job;
  }
  return absl::NotFoundError(
      absl::StrCat("job ", name, " is not held by the cluster",
                   all.empty() ? "" : "; jobs: " + absl::StrJoin(all, ", ")));
}

absl::StatusOr<double> WaitLimit(Context& ctx) { return ctx.args().GetDouble("wait-s", 120, 0); }

// The member `node` of a cluster, alive; its incarnation.
absl::StatusOr<admin::MemberStatus> LiveMember(const admin::GetStatusResponse& status,
                                               const std::string& node) {
  if (status.members_size() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("daemon ", status.self().node_id(),
                     " is standalone (no peer.listen_address): this drill needs a cluster"));
  }
  std::vector<std::string> names;
  for (const auto& member : status.members()) {
    names.push_back(member.node_id());
    if (member.node_id() != node) continue;
    if (member.state() != admin::MemberStatus::SELF &&
        member.state() != admin::MemberStatus::ALIVE) {
      return absl::FailedPreconditionError(absl::StrCat(
          "member ", node, " is ", MemberStateName(member.state()), ": drill a live member"));
    }
    return member;
  }
  return absl::NotFoundError(
      absl::StrCat("no member ", node, "; members: ", absl::StrJoin(names, ", ")));
}

const admin::StepVersion* FindStep(const admin::ListVersionsResponse& versions, int64_t step) {
  for (const auto& s : versions.steps()) {
    if (s.step() == step) return &s;
  }
  return nullptr;
}

bool Contains(const google::protobuf::RepeatedPtrField<std::string>& list,
              const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

// The committed step of `job`, which lose-node and corrupt break and rebuild.
absl::StatusOr<int64_t> CommittedStep(const admin::JobStatus& job) {
  if (job.committed_step() < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(),
                     " has no committed step yet: nothing is protected to drill; let "
                     "every rank snapshot first"));
  }
  return job.committed_step();
}

// What lose-node and corrupt start from: a live member NODE, the drilled job, its committed
// step, and who holds what of that step.
struct NodeDrillTarget {
  admin::JobStatus job;
  int64_t step = -1;
  admin::StepVersion committed;
  admin::ListVersionsResponse versions;  // every step held, newest first
};

// Whether `node` owns `rank`: it holds the rank's sealed shard at the committed step or, when no
// node still holds that one whole (only its fragments), the rank's newest sealed shard.
bool Owns(const NodeDrillTarget& target, const admin::RankVersion& rank, const std::string& node) {
  if (rank.shard_nodes_size() > 0) return Contains(rank.shard_nodes(), node);
  for (const auto& step : target.versions.steps()) {
    for (const auto& r : step.ranks()) {
      if (r.rank() == rank.rank() && r.shard_nodes_size() > 0) {
        return Contains(r.shard_nodes(), node);
      }
    }
  }
  return false;
}

absl::StatusOr<NodeDrillTarget> ChooseNodeDrillTarget(Context& ctx, AdminClient* client,
                                                      const std::string& node) {
  TESSERA_ASSIGN_OR_RETURN(admin::GetStatusResponse status, client->GetStatus({}));
  TESSERA_RETURN_IF_ERROR(LiveMember(status, node).status());
  NodeDrillTarget target;
  TESSERA_ASSIGN_OR_RETURN(target.job, ChooseDrillJob(ctx, status));
  TESSERA_ASSIGN_OR_RETURN(target.step, CommittedStep(target.job));
  admin::ListVersionsRequest versions_request;
  versions_request.set_job_id(target.job.job_id());
  TESSERA_ASSIGN_OR_RETURN(admin::ListVersionsResponse versions,
                           client->ListVersions(versions_request));
  const admin::StepVersion* committed = FindStep(versions, target.step);
  if (committed == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("step ", target.step, " of job ",
                                                      target.job.job_id(),
                                                      " is not listed by ListVersions; retry"));
  }
  target.committed = *committed;
  target.versions = std::move(versions);
  return target;
}

}  // namespace

absl::StatusOr<Outcome> RunDrillMark(Context& ctx, bool enabled) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::SetDrillTargetRequest request;
  request.set_job_id(ctx.args().positional()[0]);
  request.set_enabled(enabled);
  TESSERA_ASSIGN_OR_RETURN(admin::SetDrillTargetResponse marked, client->SetDrillTarget(request));
  Outcome outcome;
  outcome.exit_code = marked.errors_size() == 0 ? kExitOk : kExitUnhealthy;
  outcome.json.Set("job", request.job_id());
  outcome.json.Set("drill_target", enabled);
  outcome.json.Set("nodes", Json::ArrayOf(marked.nodes()));
  outcome.json.Set("errors", NodeErrorsJson(marked.errors()));
  outcome.text =
      absl::StrCat("job ", request.job_id(), enabled ? " marked" : " unmarked",
                   " as a drill target on ", marked.nodes_size(), " members (",
                   absl::StrJoin(marked.nodes(), ", "), ")\n", NodeErrorsText(marked.errors()));
  return outcome;
}

absl::StatusOr<Outcome> RunDrillKillTrainer(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(double wait_s, WaitLimit(ctx));
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  TESSERA_ASSIGN_OR_RETURN(admin::GetStatusResponse status, client->GetStatus({}));
  TESSERA_ASSIGN_OR_RETURN(admin::JobStatus job, ChooseDrillJob(ctx, status));
  if (job.restorable_step() < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(),
                     " has no restorable step yet: a restarted trainer would start "
                     "afresh; let every rank snapshot first"));
  }
  admin::ListTrainersRequest trainers_request;
  trainers_request.set_job_id(job.job_id());
  TESSERA_ASSIGN_OR_RETURN(admin::ListTrainersResponse trainers,
                           client->ListTrainers(trainers_request));
  const std::string host = LocalHostname();
  std::optional<int64_t> wanted_rank;
  if (ctx.args().Has("rank")) {
    TESSERA_ASSIGN_OR_RETURN(wanted_rank, ctx.args().GetInt("rank", 0, 0, UINT32_MAX));
  }
  std::optional<admin::Trainer> victim;
  std::vector<std::string> seen;
  for (const auto& t : trainers.trainers()) {
    if (t.job_id() != job.job_id() || !t.registered() || !t.alive()) continue;
    seen.push_back(
        absl::StrCat("rank ", t.rank(), " on ", t.node_id(), " (host ", t.hostname(), ")"));
    if (wanted_rank ? t.rank() == *wanted_rank : t.hostname() == host) {
      if (!victim || t.rank() < victim->rank()) victim = t;
    }
  }
  if (!victim) {
    return absl::NotFoundError(absl::StrCat(
        "no live trainer of job ", job.job_id(),
        wanted_rank ? absl::StrCat(" with rank ", *wanted_rank) : " on this host (" + host + ")",
        seen.empty() ? "; none is registered" : "; live trainers: " + absl::StrJoin(seen, ", ")));
  }
  if (victim->hostname() != host) {
    return absl::FailedPreconditionError(absl::StrCat(
        "rank ", victim->rank(), "'s trainer runs on host ", victim->hostname(), " (node ",
        victim->node_id(), "), not here (", host, "): run the drill there"));
  }
  if (victim->pid() <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the daemon does not know the pid of rank ", victim->rank(), "'s trainer"));
  }

  DrillReport report;
  report.kind = "kill-trainer";
  report.job = job.job_id();
  report.step = job.restorable_step();
  const uint32_t rank = victim->rank();
  const int old_pid = victim->pid();
  const int64_t sealed_before = victim->newest_sealed_step();
  ctx.Progress(absl::StrCat("killing the trainer of rank ", rank, " (pid ", old_pid, ", ",
                            ProcessName(old_pid), ") on ", victim->node_id(),
                            " with SIGKILL; the job can restore step ", report.step));
  const auto start = Clock::now();
  if (kill(old_pid, SIGKILL) != 0) {
    return ErrnoStatus(errno, absl::StrCat("kill pid ", old_pid, " (rank ", rank, "'s trainer)"));
  }
  report.broken = absl::StrCat("SIGKILLed the trainer of rank ", rank, " (pid ", old_pid, ") on ",
                               victim->node_id(), ", which had sealed step ", sealed_before);
  report.broken_json.Set("rank", rank);
  report.broken_json.Set("pid", old_pid);
  report.broken_json.Set("node", victim->node_id());
  report.broken_json.Set("newest_sealed_step", sealed_before);

  // Detection, re-registration and resumption, seen through ListTrainers.
  std::optional<admin::Trainer> now;
  auto look = [&]() -> bool {
    auto answer = client->ListTrainers(trainers_request);
    if (!answer.ok()) return false;
    now.reset();
    for (const auto& t : answer->trainers()) {
      if (t.job_id() == job.job_id() && t.rank() == rank && (!now || t.pid() != old_pid)) now = t;
    }
    return true;
  };
  const bool detected = WaitFor(wait_s, [&] {
    return look() && (!now || now->pid() != old_pid || !now->alive() || !now->registered());
  });
  if (detected) {
    report.detected_after_s = SecondsSince(start);
    report.detected = "the daemon saw the trainer's process gone (ListTrainers)";
  } else {
    report.detected = "the daemon still lists the killed trainer as alive";
    report.verdict = absl::StrCat("the daemon did not notice within ", HumanSeconds(wait_s));
    return report.ToOutcome();
  }
  ctx.Progress("waiting for the launcher to restart rank " + std::to_string(rank));
  const bool registered = WaitFor(wait_s, [&] {
    return look() && now && now->pid() != old_pid && now->alive() && now->registered();
  });
  if (!registered) {
    report.verdict =
        absl::StrCat("rank ", rank, " did not register again within ", HumanSeconds(wait_s),
                     ": is its launcher (torchrun elastic) restarting it?");
    return report.ToOutcome();
  }
  const double registered_after_s = SecondsSince(start);
  const int new_pid = now->pid();
  // The restore point: the step the new trainer was told to resume from, once it has asked (a
  // commit of a step the killed rank had sealed may land while it restarts, so the job's
  // restorable step alone can be newer than what the trainer restored). Its shard is checked on
  // the trainer's node (made local there first if the launcher moved the rank) before training
  // moves past it.
  const bool asked = WaitFor(wait_s, [&] {
    return look() && now && now->pid() == new_pid && now->resume_step() >= 0;
  });
  absl::StatusOr<admin::RecoverResponse> checked =
      absl::FailedPreconditionError("the job is no longer listed");
  // Tests make the drill late here, as a loaded machine would, to see the job move on first.
  if (const char* delay = std::getenv("TESSERA_TEST_DRILL_CHECK_DELAY_MS")) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(delay)));
  }
  auto status_now = client->GetStatus({});
  if (status_now.ok()) {
    for (const auto& j : status_now->jobs()) {
      if (j.job_id() != job.job_id()) continue;
      report.step = asked ? now->resume_step() : j.restorable_step();
      admin::RecoverRequest check;
      check.set_job_id(job.job_id());
      check.set_rank(rank);
      check.set_step(report.step);
      check.set_node_id(now->node_id());
      checked = client->Recover(check);
    }
  } else {
    checked = status_now.status();
  }
  ctx.Progress(absl::StrCat("rank ", rank, " registered again as pid ", new_pid, " after ",
                            HumanSeconds(registered_after_s), "; waiting for it to seal a step"));
  const bool resumed = WaitFor(wait_s, [&] {
    return look() && now && now->pid() == new_pid &&
           now->newest_sealed_step() > std::max(sealed_before, report.step);
  });
  report.time_to_rebuild_s = SecondsSince(start);
  report.broken_json.Set("new_pid", new_pid);
  report.broken_json.Set("registered_after_ms", registered_after_s * 1e3);
  if (!resumed) {
    report.verdict = absl::StrCat(
        "rank ", rank, " registered again (pid ", new_pid, ") but sealed no step after ",
        std::max(sealed_before, report.step), " within ", HumanSeconds(wait_s));
    return report.ToOutcome();
  }
  report.notes.push_back(absl::StrCat("registered again as pid ", new_pid, " after ",
                                      HumanSeconds(registered_after_s), "; sealed step ",
                                      now->newest_sealed_step(), " after ",
                                      HumanSeconds(report.time_to_rebuild_s)));
  if (!checked.ok() && absl::IsNotFound(checked.status())) {
    // The restarted trainer may seal its first step at once, and the job commit it (the other
    // ranks were ahead), before the drill has read the restore point back: that step's shard and
    // fragments are then released as superseded. The trainer's own restore checked every byte
    // against the committed CRC32C (the client hands back no tensor otherwise), and it sealed a
    // newer step only after that check passed: that is the evidence left.
    int64_t committed_now = -1;
    if (auto again = client->GetStatus({}); again.ok()) {
      for (const auto& j : again->jobs()) {
        if (j.job_id() == job.job_id()) committed_now = j.committed_step();
      }
    }
    if (committed_now > report.step && now->newest_sealed_step() > report.step) {
      report.bit_exact = true;
      report.checked_by = "trainer";
      report.notes.push_back(
          absl::StrCat("checked by the restarted trainer's restore: the job committed step ",
                       committed_now, " before the drill could read step ", report.step, " back (",
                       checked.status().message(), ")"));
      return report.ToOutcome();
    }
  }
  if (!checked.ok()) {
    report.verdict = absl::StrCat("the shard of rank ", rank, " at step ", report.step,
                                  " could not be checked: ", checked.status().message());
    return report.ToOutcome();
  }
  report.AddRecover(*checked);
  report.checked_by = "daemon";
  report.bit_exact = checked->crc_matched();
  if (!report.bit_exact) {
    report.verdict = absl::StrCat("the shard the trainer restores from fails its CRC32C (",
                                  HexCrc(checked->actual_crc32c()), ", sealed ",
                                  HexCrc(checked->expected_crc32c()), ")");
  }
  return report.ToOutcome();
}

absl::StatusOr<Outcome> RunDrillKillDaemon(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(double wait_s, WaitLimit(ctx));
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  TESSERA_ASSIGN_OR_RETURN(admin::GetStatusResponse status, client->GetStatus({}));
  TESSERA_ASSIGN_OR_RETURN(admin::JobStatus job, ChooseDrillJob(ctx, status));
  const admin::NodeInfo self = status.self();
  const std::string host = LocalHostname();
  if (!self.hostname().empty() && self.hostname() != host) {
    return absl::FailedPreconditionError(
        absl::StrCat("daemon ", self.node_id(), " runs on host ", self.hostname(), ", not here (",
                     host, "): run kill-daemon on its node, connected through its socket"));
  }
  const std::string name = ProcessName(self.pid());
  if (self.pid() <= 0 || !absl::StartsWith(name, "tesserad")) {
    return absl::FailedPreconditionError(
        absl::StrCat("pid ", self.pid(), " of daemon ", self.node_id(), " is ",
                     name.empty() ? "not running here" : "\"" + name + "\", not tesserad",
                     ": run kill-daemon on the daemon's node"));
  }
  admin::ListVersionsRequest versions_request;
  versions_request.set_job_id(job.job_id());
  TESSERA_ASSIGN_OR_RETURN(admin::ListVersionsResponse before,
                           client->ListVersions(versions_request));
  // What this node holds of the job: (step, rank) -> shard CRC, and fragments.
  std::map<std::pair<int64_t, uint32_t>, uint32_t> shards;
  std::set<std::tuple<int64_t, uint32_t, uint32_t>> fragments;
  for (const auto& step : before.steps()) {
    for (const auto& rank : step.ranks()) {
      if (Contains(rank.shard_nodes(), self.node_id())) {
        shards[{step.step(), rank.rank()}] = rank.shard_crc32c();
      }
      for (int i = 0; i < rank.fragment_nodes_size() && i < rank.fragment_indexes_size(); ++i) {
        if (rank.fragment_nodes(i) == self.node_id()) {
          fragments.insert({step.step(), rank.rank(), rank.fragment_indexes(i)});
        }
      }
    }
  }
  if (shards.empty() && fragments.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("daemon ", self.node_id(),
                                                      " holds nothing of job ", job.job_id(),
                                                      ": drill it on a node that does"));
  }

  DrillReport report;
  report.kind = "kill-daemon";
  report.job = job.job_id();
  report.step = job.committed_step();
  ctx.Progress(absl::StrCat("killing tesserad ", self.node_id(), " (pid ", self.pid(),
                            ") with SIGKILL; it holds ", shards.size(), " shards and ",
                            fragments.size(), " fragments of ", job.job_id()));
  const auto start = Clock::now();
  if (kill(self.pid(), SIGKILL) != 0) {
    return ErrnoStatus(errno, absl::StrCat("kill pid ", self.pid(), " (tesserad)"));
  }
  report.broken =
      absl::StrCat("SIGKILLed tesserad ", self.node_id(), " (pid ", self.pid(), "), holding ",
                   shards.size(), " shards and ", fragments.size(), " fragments of the job");
  report.broken_json.Set("node", self.node_id());
  report.broken_json.Set("pid", self.pid());
  report.broken_json.Set("shards_held", shards.size());
  report.broken_json.Set("fragments_held", fragments.size());

  admin::GetStatusRequest local;
  local.set_local_only(true);
  std::optional<admin::NodeInfo> back;
  const bool detected = WaitFor(wait_s, [&] {
    client->Reconnect();
    auto answer = client->GetStatus(local);
    if (answer.ok() && answer->self().pid() != self.pid()) back = answer->self();
    return !answer.ok() || back.has_value();
  });
  if (!detected) {
    report.verdict = "the daemon still answers with its old pid";
    return report.ToOutcome();
  }
  report.detected_after_s = SecondsSince(start);
  report.detected = back ? "it answered with a new pid at once"
                         : absl::StrCat("its socket stopped answering (", client->target(), ")");
  ctx.Progress("waiting for the supervisor to restart tesserad " + self.node_id());
  const bool restarted = back || WaitFor(wait_s, [&] {
                           client->Reconnect();
                           auto answer = client->GetStatus(local);
                           if (answer.ok() && answer->self().pid() != self.pid())
                             back = answer->self();
                           return back.has_value();
                         });
  if (!restarted) {
    report.verdict = absl::StrCat("tesserad ", self.node_id(), " did not come back within ",
                                  HumanSeconds(wait_s),
                                  ": is it supervised (systemd Restart=always, a DaemonSet)?");
    return report.ToOutcome();
  }
  const double back_after_s = SecondsSince(start);
  TESSERA_ASSIGN_OR_RETURN(admin::ListVersionsResponse after,
                           client->ListVersions(versions_request));
  admin::VerifyRequest verify_request;
  verify_request.set_job_id(job.job_id());
  verify_request.set_local_only(true);
  TESSERA_ASSIGN_OR_RETURN(admin::VerifyResponse verified, client->Verify(verify_request));
  report.time_to_rebuild_s = SecondsSince(start);

  int64_t committed_after = -1;
  std::map<std::pair<int64_t, uint32_t>, uint32_t> shards_after;
  std::set<std::tuple<int64_t, uint32_t, uint32_t>> fragments_after;
  for (const auto& step : after.steps()) {
    if (step.committed()) committed_after = step.step();
    for (const auto& rank : step.ranks()) {
      if (Contains(rank.shard_nodes(), self.node_id())) {
        shards_after[{step.step(), rank.rank()}] = rank.shard_crc32c();
      }
      for (int i = 0; i < rank.fragment_nodes_size() && i < rank.fragment_indexes_size(); ++i) {
        if (rank.fragment_nodes(i) == self.node_id()) {
          fragments_after.insert({step.step(), rank.rank(), rank.fragment_indexes(i)});
        }
      }
    }
  }
  std::vector<std::string> missing;
  int kept_shards = 0, kept_fragments = 0, released = 0;
  for (const auto& [key, crc] : shards) {
    auto it = shards_after.find(key);
    if (it != shards_after.end() && it->second == crc) {
      ++kept_shards;
    } else if (key.first < committed_after) {
      ++released;  // a newer commit since the restart freed it, as it should
    } else {
      missing.push_back(absl::StrCat("shard of rank ", key.second, " step ", key.first,
                                     it == shards_after.end() ? " is gone" : " changed CRC32C"));
    }
  }
  for (const auto& f : fragments) {
    if (fragments_after.count(f)) {
      ++kept_fragments;
    } else if (std::get<0>(f) < committed_after) {
      ++released;
    } else {
      missing.push_back(absl::StrCat("fragment ", std::get<2>(f), " of rank ", std::get<1>(f),
                                     " step ", std::get<0>(f), " is gone"));
    }
  }
  report.recovery_lines.push_back(absl::StrCat(
      "tesserad ", self.node_id(), " back as pid ", back->pid(), " after ",
      HumanSeconds(back_after_s), "; re-adopted ", kept_shards, " of ", shards.size(),
      " shards and ", kept_fragments, " of ", fragments.size(), " fragments from shared memory",
      released > 0 ? absl::StrCat(" (", released, " released since by a newer commit)") : "",
      "\n"));
  // A local verify judges no rank restorable from this node alone; what counts here is that
  // every shard and fragment it re-read matches its CRC32C.
  uint64_t shards_checked = 0, fragments_checked = 0, bytes_checked = 0;
  for (const auto& n : verified.nodes()) {
    shards_checked += n.shards_checked();
    fragments_checked += n.fragments_checked();
    bytes_checked += n.bytes_checked();
  }
  std::vector<std::string> damaged;
  for (const auto& d : verified.damaged()) damaged.push_back(DamageText(d));
  for (const auto& e : verified.errors()) damaged.push_back("could not verify: " + e.error());
  report.recovery_lines.push_back(absl::StrCat(
      "verify on ", self.node_id(), ": ", shards_checked, " shards and ", fragments_checked,
      " fragments (", HumanBytes(bytes_checked), ") re-read, ",
      damaged.empty() ? "every CRC32C matches" : absl::StrCat(damaged.size(), " DAMAGED"), "\n"));
  Json readopted = Json::Object();
  readopted.Set("new_pid", back->pid());
  readopted.Set("back_after_ms", back_after_s * 1e3);
  readopted.Set("shards_readopted", kept_shards);
  readopted.Set("fragments_readopted", kept_fragments);
  readopted.Set("released_by_newer_commit", released);
  readopted.Set("missing", Json::ArrayOf(missing));
  readopted.Set("shards_verified", shards_checked);
  readopted.Set("fragments_verified", fragments_checked);
  readopted.Set("damaged", Json::ArrayOf(damaged));
  report.recovery.Add(std::move(readopted));
  report.checked_by = "daemon";
  report.bit_exact = missing.empty() && damaged.empty();
  if (!missing.empty()) {
    report.verdict = "not re-adopted: " + absl::StrJoin(missing, "; ");
  } else if (!damaged.empty()) {
    report.verdict = "what was re-adopted does not verify: " + absl::StrJoin(damaged, "; ");
  } else {
    report.verdict =
        "every re-adopted shard and fragment verifies against its CRC32C; no byte "
        "moved over the network";
  }
  return report.ToOutcome();
}

absl::StatusOr<Outcome> RunDrillLoseNode(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(double wait_s, WaitLimit(ctx));
  const std::string node = ctx.args().positional()[0];
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  TESSERA_ASSIGN_OR_RETURN(NodeDrillTarget target, ChooseNodeDrillTarget(ctx, client, node));
  const admin::JobStatus& job = target.job;
  const int64_t step = target.step;
  const admin::StepVersion* committed = &target.committed;
  std::vector<uint32_t> owned, fragment_ranks;
  for (const auto& rank : committed->ranks()) {
    if (Owns(target, rank, node)) owned.push_back(rank.rank());
    if (Contains(rank.fragment_nodes(), node)) fragment_ranks.push_back(rank.rank());
  }
  if (owned.empty() && fragment_ranks.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("member ", node, " holds nothing of job ", job.job_id(), " at step ", step,
                     ": drill a node that does (see tessera versions ", job.job_id(), ")"));
  }

  DrillReport report;
  report.kind = "lose-node";
  report.job = job.job_id();
  report.step = step;
  if (job.health() != admin::PROTECTED) {
    report.notes.push_back(absl::StrCat("the job was ", HealthName(job.health()),
                                        " before the drill: ", job.reason()));
  }
  ctx.Progress(absl::StrCat("member ", node, " drops its memory (it owns ranks [",
                            absl::StrJoin(owned, ","), "] and holds fragments of ranks [",
                            absl::StrJoin(fragment_ranks, ","), "] at step ", step, ")"));
  admin::DropMemoryRequest drop;
  drop.set_node_id(node);
  drop.set_confirm_node_id(node);
  const auto start = Clock::now();
  TESSERA_ASSIGN_OR_RETURN(admin::DropMemoryResponse dropped, client->DropMemory(drop));
  report.broken = absl::StrCat(node, " lost its memory: ", dropped.slots_deleted(), " slots and ",
                               dropped.fragments_deleted(), " fragments deleted (",
                               HumanBytes(dropped.bytes_deleted()), "), as a lost machine would");
  report.broken_json.Set("node", node);
  report.broken_json.Set("old_incarnation", dropped.old_incarnation());
  report.broken_json.Set("slots_deleted", dropped.slots_deleted());
  report.broken_json.Set("fragments_deleted", dropped.fragments_deleted());
  report.broken_json.Set("bytes_deleted", dropped.bytes_deleted());
  report.broken_json.Set("owned_ranks", Json::ArrayOf(owned));
  report.broken_json.Set("fragment_ranks", Json::ArrayOf(fragment_ranks));

  uint64_t new_incarnation = 0;
  const bool seen = WaitFor(wait_s, [&] {
    auto answer = client->GetStatus({});
    if (!answer.ok()) {
      client->Reconnect();  // the node answering may be the one restarting
      return false;
    }
    for (const auto& m : answer->members()) {
      if (m.node_id() == node && m.incarnation() != dropped.old_incarnation() &&
          (m.state() == admin::MemberStatus::SELF || m.state() == admin::MemberStatus::ALIVE)) {
        new_incarnation = m.incarnation();
        return true;
      }
    }
    return false;
  });
  if (!seen) {
    report.verdict = absl::StrCat("the cluster did not see ", node, " as a new incarnation within ",
                                  HumanSeconds(wait_s));
    return report.ToOutcome();
  }
  report.detected_after_s = SecondsSince(start);
  report.detected =
      absl::StrCat("the cluster sees ", node, " as a new incarnation (", dropped.old_incarnation(),
                   " -> ", new_incarnation, ") with an empty store");

  // Rebuild on the replacement what it owned; with nothing owned, rebuild on it the ranks whose
  // fragments it held, from the fragments that are left.
  const bool from_fragments = owned.empty();
  const std::vector<uint32_t>& ranks = owned.empty() ? fragment_ranks : owned;
  bool all_exact = true;
  std::vector<std::string> failures;
  for (uint32_t rank : ranks) {
    admin::RecoverRequest recover;
    recover.set_job_id(job.job_id());
    recover.set_rank(rank);
    recover.set_step(step);
    recover.set_node_id(node);
    recover.set_from_fragments(from_fragments);
    absl::StatusOr<admin::RecoverResponse> recovered;
    // A new incarnation knows no peer alive until it has heard their heartbeats: until then it
    // finds too few fragments. Retry for a while; a malformed or unknown request is final.
    WaitFor(std::min(wait_s, 15.0), [&] {
      recovered = client->Recover(recover);
      if (!recovered.ok() && absl::IsUnavailable(recovered.status())) client->Reconnect();
      return recovered.ok() || absl::IsInvalidArgument(recovered.status()) ||
             absl::IsNotFound(recovered.status());
    });
    if (!recovered.ok()) {
      all_exact = false;
      failures.push_back(absl::StrCat("rank ", rank, ": ", recovered.status().message()));
      continue;
    }
    report.AddRecover(*recovered);
    if (!recovered->crc_matched()) {
      all_exact = false;
      failures.push_back(absl::StrCat("rank ", rank, " does not match its CRC32C"));
    }
  }
  report.time_to_rebuild_s = SecondsSince(start);
  report.checked_by = "daemon";
  report.bit_exact = all_exact && !ranks.empty();
  if (!report.bit_exact) report.verdict = absl::StrJoin(failures, "; ");
  if (from_fragments) {
    report.notes.push_back(absl::StrCat(node,
                                        " owned no rank of the job: rebuilt on it the ranks "
                                        "whose fragments it held, without them"));
  }
  return report.ToOutcome();
}

absl::StatusOr<Outcome> RunDrillCorrupt(Context& ctx) {
  const std::string node = ctx.args().positional()[0];
  const std::string target = ctx.args().Get("target");
  if (!target.empty() && target != "slot" && target != "fragment") {
    return absl::InvalidArgumentError(
        absl::StrCat("--target \"", target, "\": need slot or fragment"));
  }
  std::optional<int64_t> wanted_rank;
  if (ctx.args().Has("rank")) {
    TESSERA_ASSIGN_OR_RETURN(wanted_rank, ctx.args().GetInt("rank", 0, 0, UINT32_MAX));
  }
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  TESSERA_ASSIGN_OR_RETURN(NodeDrillTarget drilled, ChooseNodeDrillTarget(ctx, client, node));
  const admin::JobStatus& job = drilled.job;
  const int64_t step = drilled.step;
  const admin::StepVersion* committed = &drilled.committed;
  // The victim: NODE's shard of a rank, or a fragment NODE holds.
  std::optional<std::pair<uint32_t, int64_t>> slot;       // rank
  std::optional<std::pair<uint32_t, uint32_t>> fragment;  // rank, index
  for (const auto& rank : committed->ranks()) {
    if (wanted_rank && rank.rank() != *wanted_rank) continue;
    if (!slot && Contains(rank.shard_nodes(), node)) slot = {rank.rank(), step};
    for (int i = 0; i < rank.fragment_nodes_size() && i < rank.fragment_indexes_size(); ++i) {
      if (!fragment && rank.fragment_nodes(i) == node) {
        fragment = {rank.rank(), rank.fragment_indexes(i)};
      }
    }
  }
  const bool use_slot = target == "slot" || (target.empty() && slot.has_value());
  const std::string what = wanted_rank ? absl::StrCat(" of rank ", *wanted_rank) : "";
  if (use_slot && !slot) {
    return absl::FailedPreconditionError(absl::StrCat(node, " holds no sealed shard", what,
                                                      " of job ", job.job_id(), " at step ", step,
                                                      fragment ? "; try --target fragment" : ""));
  }
  if (!use_slot && !fragment) {
    return absl::FailedPreconditionError(absl::StrCat(node, " holds no fragment", what, " of job ",
                                                      job.job_id(), " at step ", step,
                                                      slot ? "; try --target slot" : ""));
  }
  const uint32_t rank = use_slot ? slot->first : fragment->first;

  DrillReport report;
  report.kind = "corrupt";
  report.job = job.job_id();
  report.step = step;
  admin::CorruptRequest corrupt;
  corrupt.set_node_id(node);
  corrupt.set_job_id(job.job_id());
  corrupt.set_rank(rank);
  corrupt.set_step(step);
  corrupt.set_target(use_slot ? admin::CorruptRequest::SLOT : admin::CorruptRequest::FRAGMENT);
  if (!use_slot) corrupt.set_fragment_index(fragment->second);
  corrupt.set_yes(ctx.args().Has("yes"));
  ctx.Progress(absl::StrCat("flipping a byte of ", node, "'s ",
                            use_slot ? "shard" : absl::StrCat("fragment ", fragment->second),
                            " of rank ", rank, " at step ", step));
  const auto start = Clock::now();
  TESSERA_ASSIGN_OR_RETURN(admin::CorruptResponse corrupted, client->Corrupt(corrupt));
  const std::string victim =
      use_slot ? absl::StrCat("shard of rank ", rank)
               : absl::StrCat("fragment ", corrupted.fragment_index(), " of rank ", rank);
  report.broken =
      absl::StrCat("flipped byte ", corrupted.offset(), " of ", node, "'s ", victim, " in ",
                   corrupted.path(), " (", corrupted.old_byte(), " -> ", corrupted.new_byte(), ")");
  report.broken_json.Set("node", node);
  report.broken_json.Set("target", use_slot ? "slot" : "fragment");
  report.broken_json.Set("rank", rank);
  report.broken_json.Set("fragment_index", corrupted.fragment_index());
  report.broken_json.Set("path", corrupted.path());
  report.broken_json.Set("offset", corrupted.offset());
  report.broken_json.Set("old_byte", corrupted.old_byte());
  report.broken_json.Set("new_byte", corrupted.new_byte());

  admin::VerifyRequest verify;
  verify.set_job_id(job.job_id());
  verify.set_step(step);
  TESSERA_ASSIGN_OR_RETURN(admin::VerifyResponse verified, client->Verify(verify));
  report.detected_after_s = SecondsSince(start);
  const admin::Damage* found = nullptr;
  for (const auto& d : verified.damaged()) {
    const bool same_kind = use_slot ? d.kind() == admin::Damage::SHARD
                                    : d.kind() == admin::Damage::FRAGMENT &&
                                          d.fragment_index() == corrupted.fragment_index();
    if (d.node_id() == node && d.rank() == rank && d.step() == step && same_kind) found = &d;
  }
  if (found == nullptr) {
    report.detected = "verify did NOT find the flipped byte";
    report.verdict = "undetected damage:\n" + VerifyText(verified);
    return report.ToOutcome();
  }
  report.detected = "verify found it: " + DamageText(*found);

  // Rebuild the rank around the damage, on the node holding it.
  admin::RecoverRequest recover;
  recover.set_job_id(job.job_id());
  recover.set_rank(rank);
  recover.set_step(step);
  recover.set_node_id(node);
  recover.set_from_fragments(true);
  absl::StatusOr<admin::RecoverResponse> recovered = client->Recover(recover);
  report.time_to_rebuild_s = SecondsSince(start);
  if (!recovered.ok()) {
    report.verdict = absl::StrCat(
        "rank ", rank, " could not be rebuilt around the damage: ", recovered.status().message());
    return report.ToOutcome();
  }
  report.AddRecover(*recovered);
  if (!use_slot) {
    for (int i = 0; i < recovered->fragment_indexes_size(); ++i) {
      if (recovered->fragment_indexes(i) == corrupted.fragment_index() &&
          i < recovered->fragment_nodes_size() && recovered->fragment_nodes(i) == node) {
        report.notes.push_back(
            "the rebuild read the corrupted fragment (it should have counted "
            "as an erasure)");
      }
    }
  }
  report.checked_by = "daemon";
  report.bit_exact = recovered->crc_matched() && report.notes.empty();
  if (!report.bit_exact) {
    report.verdict = recovered->crc_matched() ? report.notes.back()
                                              : "the rebuilt shard does not match its CRC32C";
  }
  // Whether the damaged copy itself is gone (a rebuild on its node replaces it) or stays until
  // a newer committed step replaces it.
  absl::StatusOr<admin::VerifyResponse> after = client->Verify(verify);
  bool still_damaged = !after.ok();
  if (after.ok()) {
    for (const auto& d : after->damaged()) {
      if (d.node_id() == found->node_id() && d.kind() == found->kind() && d.rank() == rank &&
          d.step() == step && d.fragment_index() == found->fragment_index()) {
        still_damaged = true;
      }
    }
  }
  report.broken_json.Set("repaired", !still_damaged);
  report.notes.push_back(still_damaged ? absl::StrCat("the damaged copy on ", node,
                                                      " stays until a newer committed step "
                                                      "replaces it; verify reports it until then")
                                       : absl::StrCat("the damaged copy on ", node,
                                                      " was replaced: verify finds it no more"));
  return report.ToOutcome();
}

}  // namespace tessera::cli
