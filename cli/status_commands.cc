// `tessera status`, `jobs` and `versions`: read-only views of the cluster.
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "cli/format.h"
#include "common/status.h"

namespace tessera::cli {
namespace {

std::string StepText(int64_t step) { return step < 0 ? "-" : absl::StrCat(step); }

std::string RsText(uint32_t k, uint32_t m) {
  return k == 0 ? "-" : absl::StrCat("RS(", k, ",", m, ")");
}

std::string MemoryText(const admin::MemoryUsage& memory) {
  const uint64_t used = memory.slot_bytes() + memory.fragment_bytes();
  const uint64_t capacity = memory.capacity_bytes();
  std::string text = absl::StrCat(HumanBytes(memory.slot_bytes()), " slots + ",
                                  HumanBytes(memory.fragment_bytes()), " fragments");
  if (capacity > 0) {
    absl::StrAppend(&text, " of ", HumanBytes(capacity), " (",
                    static_cast<int>(100.0 * used / capacity + 0.5), "%)");
  }
  return text;
}

Json MemoryJson(const admin::MemoryUsage& memory) {
  Json j = Json::Object();
  j.Set("capacity_bytes", memory.capacity_bytes());
  j.Set("slot_bytes", memory.slot_bytes());
  j.Set("slot_segments", memory.slot_segments());
  j.Set("fragment_bytes", memory.fragment_bytes());
  j.Set("fragment_capacity_bytes", memory.fragment_capacity_bytes());
  j.Set("fragments", memory.fragments());
  return j;
}

Json NodeJson(const admin::NodeInfo& info) {
  Json j = Json::Object();
  j.Set("node", info.node_id());
  j.Set("hostname", info.hostname());
  j.Set("pid", info.pid());
  j.Set("incarnation", info.incarnation());
  j.Set("version", info.version());
  j.Set("peer_address", info.peer_address());
  j.Set("agent_socket", info.agent_socket());
  j.Set("metrics_address", info.metrics_address());
  j.Set("started_unix_ms", info.started_unix_ms());
  j.Set("k", info.ec_k());
  j.Set("m", info.ec_m());
  j.Set("ranks_registered", info.ranks_registered());
  j.Set("memory", MemoryJson(info.memory()));
  return j;
}

Table JobsTable(const google::protobuf::RepeatedPtrField<admin::JobStatus>& jobs) {
  // The reasons of unhealthy jobs are listed as problems, one per line, not squeezed in here.
  Table table({"JOB", "WORLD", "NEWEST", "COMMITTED", "RESTORABLE", "HEALTH", "CODE", "NODES"});
  for (const auto& job : jobs) {
    table.AddRow({job.job_id() + (job.drill_target() ? " (drill)" : ""),
                  absl::StrCat(job.world_size()), StepText(job.newest_step()),
                  StepText(job.committed_step()), StepText(job.restorable_step()),
                  HealthName(job.health()), RsText(job.ec_k(), job.ec_m()),
                  absl::StrCat(job.nodes_size())});
  }
  return table;
}

// The problems that make `status` and `jobs` exit 1, one phrase each.
std::vector<std::string> JobProblems(
    const google::protobuf::RepeatedPtrField<admin::JobStatus>& jobs) {
  std::vector<std::string> problems;
  for (const auto& job : jobs) {
    if (job.health() != admin::PROTECTED && job.health() != admin::LOCAL_VIEW) {
      problems.push_back(absl::StrCat("job ", job.job_id(), " is ", HealthName(job.health()),
                                      job.reason().empty() ? "" : ": " + job.reason()));
    }
  }
  return problems;
}

}  // namespace

absl::StatusOr<Outcome> RunStatus(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::GetStatusRequest request;
  request.set_local_only(ctx.args().Has("local") || ctx.args().Has("probe"));
  TESSERA_ASSIGN_OR_RETURN(admin::GetStatusResponse status, client->GetStatus(request));
  Outcome outcome;
  if (ctx.args().Has("probe")) {
    outcome.json.Set("node", status.self().node_id());
    outcome.json.Set("pid", status.self().pid());
    outcome.json.Set("ready", true);
    outcome.text = absl::StrCat("tesserad ", status.self().node_id(), " (pid ", status.self().pid(),
                                ") answers at ", client->target(), "\n");
    return outcome;
  }

  std::vector<std::string> problems;
  for (const auto& member : status.members()) {
    const std::string name = member.node_id().empty() ? member.address() : member.node_id();
    if (member.state() == admin::MemberStatus::SUSPECTED) {
      problems.push_back(absl::StrCat("member ", name, " is suspected (silent for ",
                                      HumanSeconds(member.last_heard_ms_ago() / 1000.0), ")"));
    } else if (member.state() == admin::MemberStatus::UNKNOWN) {
      problems.push_back(absl::StrCat("member ", name, " was never heard from"));
    }
  }
  for (const std::string& p : JobProblems(status.jobs())) problems.push_back(p);
  for (const auto& e : status.errors()) {
    problems.push_back(absl::StrCat(
        "could not ask ", e.node_id().empty() ? e.address() : e.node_id(), ": ", e.error()));
  }
  outcome.exit_code = problems.empty() ? kExitOk : kExitUnhealthy;

  Json& j = outcome.json;
  j.Set("healthy", problems.empty());
  j.Set("problems", Json::ArrayOf(problems));
  j.Set("self", NodeJson(status.self()));
  Json members = Json::Array();
  for (const auto& member : status.members()) {
    Json m = Json::Object();
    m.Set("node", member.node_id());
    m.Set("address", member.address());
    m.Set("state", absl::AsciiStrToLower(MemberStateName(member.state())));
    m.Set("incarnation", member.incarnation());
    m.Set("last_heard_ms_ago", member.last_heard_ms_ago());
    m.Set("info", member.has_info() ? NodeJson(member.info()) : Json());
    m.Set("error", member.error());
    members.Add(std::move(m));
  }
  j.Set("members", std::move(members));
  Json jobs = Json::Array();
  for (const auto& job : status.jobs()) jobs.Add(JobJson(job));
  j.Set("jobs", std::move(jobs));
  j.Set("warnings", Json::ArrayOf(status.warnings()));
  j.Set("errors", NodeErrorsJson(status.errors()));

  const admin::NodeInfo& self = status.self();
  std::string& t = outcome.text;
  absl::StrAppend(&t, "tessera status: ", problems.empty() ? "HEALTHY" : "ATTENTION", " (",
                  status.members_size(), " members, ", status.jobs_size(), " jobs) via ",
                  self.node_id(), " (tesserad ", self.version(), ", pid ", self.pid(), ", ",
                  RsText(self.ec_k(), self.ec_m()), " configured)\n");
  for (const std::string& p : problems) absl::StrAppend(&t, "  ! ", p, "\n");
  for (const std::string& w : status.warnings()) absl::StrAppend(&t, "  warning: ", w, "\n");

  Table members_table({"NODE", "STATE", "ADDRESS", "HEARD", "MEMORY", "RANKS", "PID"});
  for (const auto& member : status.members()) {
    const bool has_info = member.has_info();
    members_table.AddRow(
        {member.node_id().empty() ? "?" : member.node_id(), MemberStateName(member.state()),
         member.address().empty() ? "-" : member.address(),
         member.state() == admin::MemberStatus::SELF ? "-"
         : member.last_heard_ms_ago() < 0
             ? "never"
             : HumanSeconds(member.last_heard_ms_ago() / 1000.0) + " ago",
         has_info ? MemoryText(member.info().memory()) : "(" + member.error() + ")",
         has_info ? absl::StrCat(member.info().ranks_registered()) : "-",
         has_info ? absl::StrCat(member.info().pid()) : "-"});
  }
  if (status.members_size() == 0) {
    absl::StrAppend(&t, "\nstandalone daemon ", self.node_id(), ": memory ",
                    MemoryText(self.memory()), ", ", self.ranks_registered(),
                    " ranks registered\n");
  } else {
    absl::StrAppend(&t, "\nmembers:\n", members_table.Render());
  }
  if (status.jobs_size() == 0) {
    absl::StrAppend(&t, "\njobs: none\n");
  } else {
    absl::StrAppend(&t, "\njobs:\n", JobsTable(status.jobs()).Render());
  }
  return outcome;
}

absl::StatusOr<Outcome> RunJobs(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::ListJobsRequest request;
  request.set_local_only(ctx.args().Has("local"));
  TESSERA_ASSIGN_OR_RETURN(admin::ListJobsResponse jobs, client->ListJobs(request));
  std::vector<std::string> problems = JobProblems(jobs.jobs());
  for (const auto& e : jobs.errors()) {
    problems.push_back(absl::StrCat(
        "could not ask ", e.node_id().empty() ? e.address() : e.node_id(), ": ", e.error()));
  }
  Outcome outcome;
  outcome.exit_code = problems.empty() ? kExitOk : kExitUnhealthy;
  Json list = Json::Array();
  for (const auto& job : jobs.jobs()) list.Add(JobJson(job));
  outcome.json.Set("jobs", std::move(list));
  outcome.json.Set("problems", Json::ArrayOf(problems));
  outcome.json.Set("errors", NodeErrorsJson(jobs.errors()));
  if (jobs.jobs_size() == 0) {
    outcome.text = "no jobs\n";
  } else {
    outcome.text = JobsTable(jobs.jobs()).Render();
  }
  for (const std::string& p : problems) absl::StrAppend(&outcome.text, "  ! ", p, "\n");
  return outcome;
}

absl::StatusOr<Outcome> RunVersions(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::ListVersionsRequest request;
  request.set_job_id(ctx.args().positional()[0]);
  TESSERA_ASSIGN_OR_RETURN(admin::ListVersionsResponse versions, client->ListVersions(request));

  Outcome outcome;
  bool any_restorable = false;
  Json steps = Json::Array();
  std::string body;
  for (const auto& step : versions.steps()) {
    any_restorable = any_restorable || step.restorable();
    Json s = Json::Object();
    s.Set("step", step.step());
    s.Set("committed", step.committed());
    s.Set("restorable", step.restorable());
    s.Set("missing_ranks", Json::ArrayOf(step.missing_ranks()));
    Json ranks = Json::Array();
    int restorable_ranks = 0;
    std::string rank_lines;
    for (const auto& rank : step.ranks()) {
      restorable_ranks += rank.restorable() ? 1 : 0;
      Json r = Json::Object();
      r.Set("rank", rank.rank());
      r.Set("restorable", rank.restorable());
      r.Set("shard_nodes", Json::ArrayOf(rank.shard_nodes()));
      r.Set("shard_bytes", rank.shard_bytes());
      r.Set("shard_crc32c", rank.shard_crc32c());
      r.Set("k", rank.ec_k());
      r.Set("m", rank.ec_m());
      Json fragments = Json::Array();
      std::vector<std::string> fragment_text;
      for (int i = 0; i < rank.fragment_indexes_size(); ++i) {
        const std::string node = i < rank.fragment_nodes_size() ? rank.fragment_nodes(i) : "?";
        Json f = Json::Object();
        f.Set("index", rank.fragment_indexes(i));
        f.Set("node", node);
        fragments.Add(std::move(f));
        fragment_text.push_back(absl::StrCat(rank.fragment_indexes(i), "@", node));
      }
      r.Set("fragments", std::move(fragments));
      ranks.Add(std::move(r));
      absl::StrAppend(
          &rank_lines, "    rank ", rank.rank(), ": ", rank.restorable() ? "" : "NOT RESTORABLE; ",
          rank.shard_nodes_size() > 0
              ? absl::StrCat("shard on ", absl::StrJoin(rank.shard_nodes(), ","))
              : "no sealed shard",
          " (", HumanBytes(rank.shard_bytes()), ", crc ", HexCrc(rank.shard_crc32c()), ")",
          rank.ec_k() > 0
              ? absl::StrCat("; ", RsText(rank.ec_k(), rank.ec_m()), " fragments ",
                             fragment_text.empty() ? "none" : absl::StrJoin(fragment_text, " "))
              : "; no fragments",
          "\n");
    }
    s.Set("ranks", std::move(ranks));
    steps.Add(std::move(s));
    absl::StrAppend(
        &body, "  step ", step.step(), step.committed() ? " (committed)" : "", ": ",
        step.restorable() ? "restorable" : "NOT restorable", ", ", restorable_ranks, " of ",
        versions.world_size(), " ranks restorable",
        step.missing_ranks_size() > 0
            ? absl::StrCat(", ranks held nowhere: ", absl::StrJoin(step.missing_ranks(), ","))
            : "",
        "\n", rank_lines);
  }
  outcome.exit_code = any_restorable && versions.errors_size() == 0 ? kExitOk : kExitUnhealthy;
  outcome.json.Set("job", versions.job_id());
  outcome.json.Set("world_size", versions.world_size());
  outcome.json.Set("steps", std::move(steps));
  outcome.json.Set("errors", NodeErrorsJson(versions.errors()));
  outcome.text =
      absl::StrCat("job ", versions.job_id(), ", world ", versions.world_size(), ": ",
                   versions.steps_size(), " steps held", any_restorable ? "" : ", none restorable",
                   "\n", body, NodeErrorsText(versions.errors()));
  return outcome;
}

absl::StatusOr<Outcome> RunDeclareLost(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::DeclareLostRequest request;
  request.set_node_id(ctx.args().positional()[0]);
  request.set_force(ctx.args().Has("force"));
  TESSERA_ASSIGN_OR_RETURN(admin::DeclareLostResponse lost, client->DeclareLost(request));
  Outcome outcome;
  outcome.json.Set("node", lost.node_id());
  outcome.json.Set("incarnation", lost.incarnation());
  outcome.json.Set("live_members", lost.live_members());
  outcome.json.Set("members", lost.members());
  outcome.json.Set("majority", lost.majority());
  outcome.json.Set("declared_on", Json::ArrayOf(lost.nodes()));
  outcome.json.Set("errors", NodeErrorsJson(lost.errors()));
  const std::vector<std::string> declared_on(lost.nodes().begin(), lost.nodes().end());
  outcome.text = absl::StrCat(
      lost.node_id(), " (incarnation ", lost.incarnation(), ") declared lost: ",
      lost.live_members(), " of ", lost.members(), " members live",
      lost.majority() ? ", a majority: jobs can resume\n"
                      : ", not a majority: jobs wait until more members are back or declared "
                        "lost\n");
  if (!declared_on.empty()) {
    absl::StrAppend(&outcome.text, "  declared on ", absl::StrJoin(declared_on, ", "), "\n");
  }
  for (const admin::NodeError& e : lost.errors()) {
    absl::StrAppend(&outcome.text, "  not declared on ",
                    e.node_id().empty() ? e.address() : e.node_id(), ": ", e.error(), "\n");
  }
  outcome.exit_code = lost.majority() ? kExitOk : kExitUnhealthy;
  return outcome;
}

}  // namespace tessera::cli
