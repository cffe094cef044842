// What every `tessera` command shares: its parsed arguments, a lazily made connection to the
// daemon, where progress goes, and what it hands back (exit code, JSON, text).
#ifndef TESSERA_CLI_COMMAND_H_
#define TESSERA_CLI_COMMAND_H_

#include <memory>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "cli/admin_client.h"
#include "cli/args.h"
#include "common/json.h"

namespace tessera::cli {

// Exit codes of every command (printed by `tessera --help`).
enum ExitCode {
  kExitOk = 0,           // healthy, verified, recovered bit-exact, drill passed
  kExitUnhealthy = 1,    // something is degraded, unprotected, damaged or not bit-exact
  kExitUsage = 2,        // bad arguments: the message says what was wrong and what is right
  kExitUnreachable = 3,  // no daemon answered (not running, wrong socket or address, bad token)
  kExitRefused = 4,      // the daemon answered with an error (no such job, not a drill target)
};

struct Outcome {
  int exit_code = kExitOk;
  Json json = Json::Object();
  std::string text;  // ends with a newline
};

class Context {
 public:
  Context(const ParsedArgs& args, std::ostream& progress) : args_(args), progress_(progress) {}

  const ParsedArgs& args() const { return args_; }
  bool json() const { return args_.Has("json"); }
  // Lines of progress for long commands (drills), on stderr; silent with --json.
  void Progress(const std::string& line);
  // The connection named by --socket / --address / --token(-file) / --timeout-s.
  // Errors: kInvalidArgument for contradictory or unreadable connection flags.
  absl::StatusOr<AdminClient*> Client();
  // The connection if Client() made one, else null.
  const AdminClient* client_made() const { return client_.get(); }

 private:
  const ParsedArgs& args_;
  std::ostream& progress_;
  std::unique_ptr<AdminClient> client_;
};

// The commands. Each returns what to print and the exit code, or an error status; the caller
// maps the status to an exit code (ExitCodeFor) and prints its message.
absl::StatusOr<Outcome> RunStatus(Context& ctx);
absl::StatusOr<Outcome> RunJobs(Context& ctx);
absl::StatusOr<Outcome> RunVersions(Context& ctx);
absl::StatusOr<Outcome> RunVerify(Context& ctx);
absl::StatusOr<Outcome> RunRecover(Context& ctx);
absl::StatusOr<Outcome> RunDeclareLost(Context& ctx);
absl::StatusOr<Outcome> RunDropJob(Context& ctx);
absl::StatusOr<Outcome> RunPlan(Context& ctx);
absl::StatusOr<Outcome> RunDrillMark(Context& ctx, bool enabled);
absl::StatusOr<Outcome> RunDrillKillTrainer(Context& ctx);
absl::StatusOr<Outcome> RunDrillKillDaemon(Context& ctx);
absl::StatusOr<Outcome> RunDrillLoseNode(Context& ctx);
absl::StatusOr<Outcome> RunDrillCorrupt(Context& ctx);

// The exit code for a command's error status: kInvalidArgument -> usage; any failure to reach
// the daemon (no answer, refused token) -> unreachable; the daemon answering kUnavailable (a
// member it needed) or kDataLoss (cannot be rebuilt) -> unhealthy; any other answer -> refused.
int ExitCodeFor(const absl::Status& status, const Context& ctx);

// Shared by the commands' output.
std::string HealthName(admin::Health health);
std::string MemberStateName(admin::MemberStatus::State state);
Json JobJson(const admin::JobStatus& job);
Json NodeErrorsJson(const google::protobuf::RepeatedPtrField<admin::NodeError>& errors);
std::string NodeErrorsText(const google::protobuf::RepeatedPtrField<admin::NodeError>& errors);

}  // namespace tessera::cli

#endif  // TESSERA_CLI_COMMAND_H_
