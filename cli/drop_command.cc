// `tessera drop JOB`: the end of a job, made explicit. Deletes every snapshot of the job held by
// the daemon connected to, so that a later launch with the same job id starts afresh instead of
// resuming a run that has ended.
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
  outcome.text = absl::StrCat(
      "dropped job ", dropped.job_id(), " on ", dropped.node_id(), ": ", dropped.ranks_size(),
      dropped.ranks_size() == 1 ? " rank, " : " ranks, ", dropped.slots_deleted(),
      dropped.slots_deleted() == 1 ? " slot, " : " slots, ", HumanBytes(dropped.bytes_deleted()),
      " freed",
      dropped.newest_sealed_step() < 0
          ? std::string(" (no step was sealed)")
          : absl::StrCat(" (its newest sealed step was ", dropped.newest_sealed_step(), ")"),
      "\n");
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
