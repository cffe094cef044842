// `tessera drop JOB`: the end of a job, made explicit. Deletes every snapshot of the job (held by
// the daemon connected to, or on every member of its cluster), so that a later launch with the
// same job id starts afresh instead of resuming a run that has ended.
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "cli/format.h"
#include "common/status.h"

namespace tessera::cli {

absl::StatusOr<Outcome> RunDropJob(Context& ctx) {
  TESSERA_ASSIGN_OR_RETURN(AdminClient * client, ctx.Client());
  admin::DropJobRequest request;
  request.set_job_id(ctx.args().positional()[0]);
  request.set_force(ctx.args().Has("force"));
  absl::StatusOr<admin::DropJobResponse> answer = client->DropJob(request);
  if (!answer.ok()) {
    if (absl::IsFailedPrecondition(answer.status()) && !request.force() &&
        answer.status().message().find("still being trained") != absl::string_view::npos) {
      return absl::FailedPreconditionError(absl::StrCat(
          answer.status().message(), " (here: tessera drop ", request.job_id(), " --force)"));
    }
    return answer.status();
  }
  const admin::DropJobResponse& dropped = *answer;
  Outcome outcome;
  outcome.json.Set("node", dropped.node_id());
  outcome.json.Set("job", dropped.job_id());
  outcome.json.Set("ranks", Json::ArrayOf(dropped.ranks()));
  outcome.json.Set("slots_deleted", dropped.slots_deleted());
  outcome.json.Set("bytes_deleted", dropped.bytes_deleted());
  outcome.json.Set("newest_sealed_step", dropped.newest_sealed_step());
  outcome.json.Set("running_ranks", Json::ArrayOf(dropped.running_ranks()));
  outcome.json.Set("running_pids", Json::ArrayOf(dropped.running_pids()));
  if (dropped.dropped_epoch() > 0) {
    outcome.json.Set("dropped_epoch", dropped.dropped_epoch());
    outcome.json.Set("coordinator", dropped.coordinator());
    outcome.json.Set("fragments_deleted", dropped.fragments_deleted());
    outcome.json.Set("fragment_bytes_deleted", dropped.fragment_bytes_deleted());
    Json nodes = Json::Array();
    for (const admin::DropJobNode& n : dropped.nodes()) {
      Json node = Json::Object();
      node.Set("node", n.node_id());
      node.Set("ranks", Json::ArrayOf(n.ranks()));
      node.Set("slots_deleted", n.slots_deleted());
      node.Set("slot_bytes_deleted", n.slot_bytes_deleted());
      node.Set("fragments_deleted", n.fragments_deleted());
      node.Set("fragment_bytes_deleted", n.fragment_bytes_deleted());
      node.Set("newest_sealed_step", n.newest_sealed_step());
      node.Set("running_ranks", Json::ArrayOf(n.running_ranks()));
      node.Set("running_pids", Json::ArrayOf(n.running_pids()));
      nodes.Add(std::move(node));
    }
    outcome.json.Set("nodes", std::move(nodes));
    Json unanswered = Json::Array();
    for (const admin::NodeError& e : dropped.unanswered()) {
      Json node = Json::Object();
      node.Set("node", e.node_id());
      node.Set("error", e.error());
      unanswered.Add(std::move(node));
    }
    outcome.json.Set("unanswered", std::move(unanswered));
    outcome.text = absl::StrCat("dropped job ", dropped.job_id(), " across the cluster at epoch ",
                                dropped.dropped_epoch(), " (decided by ", dropped.coordinator(),
                                "):\n");
    for (const admin::DropJobNode& n : dropped.nodes()) {
      absl::StrAppend(
          &outcome.text, "  ", n.node_id(), ": ", n.slots_deleted(),
          n.slots_deleted() == 1 ? " slot" : " slots",
          n.ranks_size() > 0 ? absl::StrCat(" (ranks ", absl::StrJoin(n.ranks(), ","), ")") : "",
          ", ", HumanBytes(n.slot_bytes_deleted()), "; ", n.fragments_deleted(),
          n.fragments_deleted() == 1 ? " fragment, " : " fragments, ",
          HumanBytes(n.fragment_bytes_deleted()), " deleted\n");
    }
    for (const admin::NodeError& e : dropped.unanswered()) {
      absl::StrAppend(&outcome.text, "  ", e.node_id(), ": did not answer (", e.error(),
                      "); its copies are deleted when it learns the drop\n");
    }
    absl::StrAppend(&outcome.text, "  in all: ", dropped.ranks_size(),
                    dropped.ranks_size() == 1 ? " rank, " : " ranks, ", dropped.slots_deleted(),
                    dropped.slots_deleted() == 1 ? " slot, " : " slots, ",
                    dropped.fragments_deleted(),
                    dropped.fragments_deleted() == 1 ? " fragment, " : " fragments, ",
                    HumanBytes(dropped.bytes_deleted() + dropped.fragment_bytes_deleted()),
                    " freed",
                    dropped.newest_sealed_step() < 0
                        ? std::string(" (no step was sealed)")
                        : absl::StrCat(" (its newest sealed step was ",
                                       dropped.newest_sealed_step(), ")"),
                    "\n");
  } else {
  outcome.text = absl::StrCat(
      "dropped job ", dropped.job_id(), " on ", dropped.node_id(), ": ", dropped.ranks_size(),
      dropped.ranks_size() == 1 ? " rank, " : " ranks, ", dropped.slots_deleted(),
      dropped.slots_deleted() == 1 ? " slot, " : " slots, ", HumanBytes(dropped.bytes_deleted()),
      " freed",
      dropped.newest_sealed_step() < 0
          ? std::string(" (no step was sealed)")
          : absl::StrCat(" (its newest sealed step was ", dropped.newest_sealed_step(), ")"),
      "\n");
  }
  if (dropped.running_ranks_size() > 0) {
    std::vector<std::string> running;
    for (int i = 0; i < dropped.running_ranks_size(); ++i) {
      running.push_back(absl::StrCat("rank ", dropped.running_ranks(i), " (pid ",
                                     dropped.running_pids(i), ")"));
    }
    absl::StrAppend(&outcome.text, "  forced while still running: ",
                    absl::StrJoin(running, ", "),
                    "; a trainer that still runs registers again at its next snapshot\n");
  }
  return outcome;
}

}  // namespace tessera::cli
