#include "cli/cli.h"

#include <algorithm>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/command.h"
#include "common/version.h"

namespace tessera::cli {
namespace {

struct Command {
  CommandSpec spec;
  std::function<absl::StatusOr<Outcome>(Context&)> run;
};

const FlagSpec kJob{"job", "JOB",
                    "the job to drill (default: the one job marked with `tessera drill mark`)"};
const FlagSpec kYes{"yes", "", "drill a job that is not marked as a drill target"};
const FlagSpec kWait{"wait-s", "SECONDS",
                     "how long to wait for detection and recovery (default 120)"};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {{"status",
        {},
        {{"local", "", "ask only the daemon connected to, not the whole cluster"},
         {"probe", "", "readiness check: exit 0 if the local daemon answers, 3 if not"}},
        "members, memory, jobs and protection health of the cluster",
        "Shows every member with its liveness, memory used of capacity and registered ranks, "
        "and every job with its newest, committed and restorable steps and its protection "
        "health (protected, DEGRADED or UNPROTECTED, with the reason). Exits 1 when a job is "
        "not protected or a member is suspected or could not be asked."},
       RunStatus},
      {{"jobs",
        {},
        {{"local", "", "only the jobs the daemon connected to knows"}},
        "the jobs held by the cluster and their protection health",
        "One line per job: world size, steps, health. Exits 1 when a job is not protected."},
       RunJobs},
      {{"versions",
        {"JOB"},
        {},
        "the steps of a job held in the cluster, and where each rank is held",
        "For every step held, newest first: whether it is committed and restorable, and for "
        "every rank the nodes holding its sealed shard and its fragments. Exits 1 when no step "
        "is restorable."},
       RunVersions},
      {{"verify",
        {"JOB"},
        {{"step", "S", "verify only this step (default: every step held)"},
         {"local", "", "only the shards and fragments held by the daemon connected to"}},
        "re-check every shard and fragment CRC32C of a job and that every rank can be rebuilt",
        "Every live member re-reads what it holds of the job and checks its CRC32C; then every "
        "rank is judged restorable or not from what verified. Changes nothing. Exits 0 when "
        "nothing is damaged and every rank is restorable, 1 otherwise, listing exactly what is "
        "damaged (node, rank, step, fragment)."},
       RunVerify},
      {{"recover",
        {"JOB"},
        {{"rank", "R", "the rank to make local", true},
         {"step", "S", "the step (default: the newest step the whole job can restore)"},
         {"node", "NODE", "the member to rebuild on (default: the daemon connected to)"},
         {"from-fragments", "", "rebuild from k fragments even when a sealed shard is held"}},
        "force a rebuild of one rank's shard on a node",
        "Makes (JOB, rank, step) local on a node: kept if already there, copied whole from the "
        "member holding it, or rebuilt from any k fragments. Reports the source, bytes moved, "
        "time, and whether the result matches the CRC32C its owner sealed (bit-exact). Exits 1 "
        "when it cannot be rebuilt or does not match."},
       RunRecover},
      {{"declare-lost",
        {"NODE"},
        {{"force", "", "declare it lost even though the daemon connected to sees it alive"}},
        "declare a member gone for good, so that jobs resume without it",
        "A node cut off by a partition looks the same as a lost one, so a job that lost more "
        "than m nodes (or most of the cluster) waits for them before it resumes: its restore "
        "questions need a majority of the members live. Declaring NODE lost fences it on every "
        "member and stops counting it. Refused for a member the daemon connected to sees alive, "
        "unless --force (that daemon then exits). A replacement with the same node id joins as "
        "usual. With mutual TLS each other member takes the declaration only once members that "
        "are a majority of those live in its view signed it (each signs only a member dead by "
        "its own timer); the answer names the members that took it and why the others did not. "
        "Over TCP with mutual TLS it needs an operator's certificate, not a member's."},
       RunDeclareLost},
      {{"drop",
        {"JOB"},
        {{"force", "", "drop it even while a trainer of the job is registered and running"}},
        "end a job: delete its snapshots (on every member of a cluster), so it is never resumed",
        "The end of a job, made explicit: every snapshot of JOB is deleted and the job is "
        "forgotten, so that the next launch with that job id starts afresh instead of resuming "
        "the run that ended. On a standalone daemon, what that daemon holds. On a member of a "
        "cluster the job's coordinator records the drop and every live member deletes the job's "
        "slots and fragments; the answer lists what each member deleted and the members that "
        "did not answer (their copies are deleted when they come back, and never restored "
        "meanwhile). Refused while a trainer of the job is registered and still running (on any "
        "member), unless --force (what is held now is deleted; a trainer that still runs "
        "registers again at its next snapshot: stop the trainers to end the job; on a cluster "
        "what it seals after the drop is never restored). A trainer does the same at the end "
        "of its run with Snapshotter.close(drop=True) on every rank. Allowed to root, the "
        "daemon's uid and the uid that registered the job."},
       RunDropJob},
      {{"drill mark",
        {"JOB"},
        {},
        "mark a job as a drill target on every member",
        "Drills act only on a marked job (or with --yes). The mark lives in the daemons' "
        "memory: a restarted daemon forgets it."},
       [](Context& ctx) { return RunDrillMark(ctx, true); }},
      {{"drill unmark", {"JOB"}, {}, "remove the drill-target mark of a job", ""},
       [](Context& ctx) { return RunDrillMark(ctx, false); }},
      {{"drill kill-trainer",
        {},
        {kJob,
         {"rank", "R", "the rank whose trainer is killed (default: the lowest on this host)"},
         kYes,
         kWait},
        "SIGKILL a trainer on this host; wait for its launcher to restart it and for it to resume",
        "Kills the trainer process of one rank (it must run on this host) with SIGKILL, waits "
        "for the daemon to see it gone, for its launcher (torchrun elastic) "
        "to start it again, for it to register and to seal a new step; checks that the shard it "
        "restores from matches its CRC32C. Reports the times."},
       RunDrillKillTrainer},
      {{"drill kill-daemon",
        {},
        {kJob, kYes, kWait},
        "SIGKILL the daemon connected to; wait for its supervisor to restart it",
        "Kills the daemon (it must run on this host) with SIGKILL, waits for systemd or "
        "Kubernetes (Restart=always; in tests a restart loop) to start it again, and checks "
        "that it re-adopted every shard and fragment of the job it held, each verifying "
        "against its CRC32C."},
       RunDrillKillDaemon},
      {{"drill lose-node",
        {"NODE"},
        {kJob, kYes, kWait},
        "a member drops its memory as a lost machine would; its ranks are rebuilt from fragments",
        "NODE deletes every slot and fragment and restarts as a new incarnation with an empty "
        "store. The drill waits until the cluster sees the new incarnation, rebuilds on NODE "
        "every rank it owned at the committed step from the fragments on the other members "
        "(or, when it owned none, rebuilds on it the ranks whose fragments it held), and "
        "checks each against the CRC32C its owner sealed."},
       RunDrillLoseNode},
      {{"drill corrupt",
        {"NODE"},
        {kJob,
         {"rank", "R", "the rank whose shard or fragment is corrupted"},
         {"target", "slot|fragment",
          "corrupt NODE's sealed shard (slot) or a fragment it holds (default: slot if it holds "
          "one)"},
         kYes},
        "flip a byte held by a member; check that verify finds it and the rank rebuilds around it",
        "Flips one byte of a sealed shard or fragment held by NODE at the job's committed step, "
        "as a bit flip in memory would, runs verify to find it, and rebuilds the rank around "
        "the damage, checking the result against the CRC32C its owner sealed."},
       RunDrillCorrupt},
      {{"plan",
        {},
        {{"nodes", "N", "nodes in the cluster", true},
         {"k", "K", "data fragments per shard (ec.k)", true},
         {"m", "M", "parity fragments per shard (ec.m)", true},
         {"node-mtbf-hours", "H", "mean time between failures of one node, in hours", true},
         {"interval-s", "T", "seconds between snapshots", true},
         {"rebuild-s", "R",
          "seconds from a node's failure until its shards are rebuilt "
          "(default 60)"},
         {"ranks-per-node", "P", "ranks (shards) owned by each node (default 1)"}},
        "the probability of losing the newest snapshot per day and per month",
        "A survival analysis: a snapshot is lost when its owner fails and more than m of the "
        "k+m nodes holding its fragments fail between its protection and the rebuild. Assumes "
        "independent node failures at the given MTBF. Needs no daemon."},
       RunPlan},
  };
  return *commands;
}

// `text` broken into lines of at most 100 columns; lines after the first start with `indent`
// spaces (the first is taken to start at that column too).
std::string Wrap(const std::string& text, size_t indent) {
  constexpr size_t kWidth = 100;
  std::string out, line;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line.empty() && indent + line.size() + 1 + word.size() > kWidth) {
      absl::StrAppend(&out, line, "\n", std::string(indent, ' '));
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", word);
  }
  return out + line;
}

std::string CommandHelp(const CommandSpec& spec) {
  std::string text = absl::StrCat("usage: ", UsageLine(spec), "\n\n", spec.summary, ".\n");
  if (!spec.help.empty()) absl::StrAppend(&text, "\n", Wrap(spec.help, 0), "\n");
  auto flag_lines = [&](const std::vector<FlagSpec>& flags) {
    for (const FlagSpec& f : flags) {
      std::string name = absl::StrCat("--", f.name, f.value_name.empty() ? "" : " ", f.value_name);
      absl::StrAppend(&text, "  ", name, std::string(name.size() < 24 ? 24 - name.size() : 1, ' '),
                      Wrap(f.help + (f.required ? " (required)" : ""), 26), "\n");
    }
  };
  if (!spec.flags.empty()) {
    absl::StrAppend(&text, "\nflags:\n");
    flag_lines(spec.flags);
  }
  absl::StrAppend(&text, "\nconnection and output (every command):\n");
  flag_lines(GlobalFlags());
  return text;
}

}  // namespace

std::string TesseraUsage() {
  std::string text =
      "usage: tessera COMMAND [ARGS] [--json] [--socket PATH | --address HOST:PORT "
      "--token-file PATH]\n\n"
      "The operator CLI of tesserad: status, verification, recovery, ending jobs, drills, "
      "planning.\n\n"
      "commands:\n";
  for (const Command& c : Commands()) {
    std::string name = c.spec.name;
    for (const std::string& p : c.spec.positional) absl::StrAppend(&name, " ", p);
    absl::StrAppend(&text, "  ", name, std::string(name.size() < 26 ? 26 - name.size() : 1, ' '),
                    c.spec.summary, "\n");
  }
  absl::StrAppend(
      &text, "\nconnection: the daemon on this node through its Unix socket (--socket, default ",
      kDefaultSocketPath,
      "),\nor any daemon's peer port over TCP with --address HOST:PORT and the cluster token\n"
      "(--token-file PATH). Cluster-wide commands are answered by that daemon for all members.\n"
      "\nexit codes:\n"
      "  0  ok: healthy, verified, recovered bit-exact, drill passed\n"
      "  1  unhealthy or damaged: a job degraded or unprotected, a member suspected, damage\n"
      "     found, a rank not restorable, a rebuild not bit-exact, a drill that failed\n"
      "  2  usage error: bad arguments (the message says what was wrong and what is right)\n"
      "  3  cannot reach the daemon: not running, wrong --socket or --address, token refused\n"
      "  4  refused by the daemon: no such job, rank, step or node; not a drill target;\n"
      "     not allowed to this uid; a job still being trained\n"
      "\n`tessera COMMAND --help` describes a command and its flags; every command takes "
      "--json.\n");
  return text;
}

int RunTessera(const std::vector<std::string>& given, std::ostream& out, std::ostream& err) {
  // Global flags may come before the command too (`tessera --socket PATH status`): move them
  // after it, where the command's parser reads them.
  std::vector<std::string> leading, args;
  size_t first = 0;
  while (first < given.size() && given[first].rfind("--", 0) == 0 && given[first] != "--help" &&
         given[first] != "--version") {
    const std::string name = given[first].substr(2, given[first].find('=') - 2);
    const auto& globals = GlobalFlags();
    auto flag = std::find_if(globals.begin(), globals.end(),
                             [&](const FlagSpec& f) { return f.name == name; });
    if (flag == globals.end()) break;
    leading.push_back(given[first++]);
    if (!flag->value_name.empty() && given[first - 1].find('=') == std::string::npos &&
        first < given.size()) {
      leading.push_back(given[first++]);
    }
  }
  args.assign(given.begin() + first, given.end());
  if (!args.empty()) args.insert(args.end(), leading.begin(), leading.end());
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    if (args.size() >= 2 && args[0] == "help") {
      std::vector<std::string> rest(args.begin() + 1, args.end());
      rest.push_back("--help");
      return RunTessera(rest, out, err);
    }
    (args.empty() ? err : out) << TesseraUsage();
    return args.empty() ? kExitUsage : kExitOk;
  }
  if (args[0] == "--version") {
    out << "tessera " << kVersion << "\n";
    return kExitOk;
  }
  // The command is the first argument, or the first two for `drill KIND`.
  std::vector<std::string> names;
  for (const Command& c : Commands()) names.push_back(c.spec.name);
  const Command* command = nullptr;
  size_t consumed = 1;
  std::string asked = args[0];
  if (args[0] == "drill") {
    std::vector<std::string> kinds;
    for (const Command& c : Commands()) {
      if (c.spec.name.rfind("drill ", 0) == 0) kinds.push_back(c.spec.name.substr(6));
    }
    if (args.size() < 2 || args[1].rfind("--", 0) == 0) {
      err << "tessera: drill needs a kind: " << absl::StrJoin(kinds, ", ")
          << "; see tessera drill KIND --help\n";
      return kExitUsage;
    }
    asked = "drill " + args[1];
    consumed = 2;
    for (const Command& c : Commands()) {
      if (c.spec.name == asked) command = &c;
    }
    if (command == nullptr) {
      std::string guess = Closest(args[1], kinds);
      err << "tessera: unknown drill kind \"" << args[1] << "\""
          << (guess.empty() ? "" : " (did you mean " + guess + "?)")
          << "; kinds: " << absl::StrJoin(kinds, ", ") << "\n";
      return kExitUsage;
    }
  } else {
    for (const Command& c : Commands()) {
      if (c.spec.name == asked) command = &c;
    }
    if (command == nullptr) {
      std::vector<std::string> top;
      for (const std::string& n : names) {
        if (n.rfind("drill ", 0) != 0) top.push_back(n);
      }
      top.push_back("drill");
      std::string guess = Closest(asked, top);
      err << "tessera: unknown command \"" << asked << "\""
          << (guess.empty() ? "" : " (did you mean " + guess + "?)")
          << "; commands: " << absl::StrJoin(top, ", ") << "; see tessera --help\n";
      return kExitUsage;
    }
  }

  auto parsed = ParseCommandArgs(command->spec,
                                 std::vector<std::string>(args.begin() + consumed, args.end()));
  const bool json = std::find(args.begin(), args.end(), "--json") != args.end();
  auto fail = [&](const absl::Status& status, int code) {
    err << "tessera: " << status.message() << "\n";
    if (json) {
      Json j = Json::Object();
      j.Set("command", command->spec.name);
      j.Set("ok", false);
      j.Set("exit_code", code);
      j.Set("error", std::string(status.message()));
      j.Set("code", absl::StatusCodeToString(status.code()));
      out << j.Dump() << "\n";
    }
    return code;
  };
  if (!parsed.ok()) return fail(parsed.status(), kExitUsage);
  if (parsed->Has("help")) {
    out << CommandHelp(command->spec);
    return kExitOk;
  }
  Context ctx(*parsed, err);
  absl::StatusOr<Outcome> outcome = command->run(ctx);
  if (!outcome.ok()) return fail(outcome.status(), ExitCodeFor(outcome.status(), ctx));
  if (ctx.json()) {
    Json j = Json::Object();
    j.Set("command", command->spec.name);
    j.Set("ok", outcome->exit_code == kExitOk);
    j.Set("exit_code", outcome->exit_code);
    j.Set("result", std::move(outcome->json));
    out << j.Dump() << "\n";
  } else {
    out << outcome->text;
  }
  return outcome->exit_code;
}

}  // namespace tessera::cli
