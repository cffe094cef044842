// The CLI without a daemon: help, usage errors and their exit codes, an unreachable daemon, and
// `plan`, whose JSON is read back with protobuf's JSON parser.
#include "cli/cli.h"

#include <cstdlib>
#include <sstream>

#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"

namespace tessera::cli {
namespace {

using ::testing::HasSubstr;

struct CliRun {
  int exit_code;
  std::string out, err;
};

CliRun Tessera(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  int code = RunTessera(args, out, err);
  return {code, out.str(), err.str()};
}

google::protobuf::Struct ParseJson(const std::string& text) {
  google::protobuf::Struct parsed;
  auto status = google::protobuf::util::JsonStringToMessage(text, &parsed);
  EXPECT_TRUE(status.ok()) << status.ToString() << "\n" << text;
  return parsed;
}

TEST(CliTest, HelpListsEveryCommandAndTheExitCodes) {
  CliRun run = Tessera({"--help"});
  EXPECT_EQ(run.exit_code, 0);
  for (const char* command :
       {"status", "jobs", "versions JOB", "verify JOB", "recover JOB", "drop JOB",
        "drill kill-trainer",
        "drill kill-daemon", "drill lose-node NODE", "drill corrupt NODE", "plan"}) {
    EXPECT_THAT(run.out, HasSubstr(std::string("  ") + command)) << command;
  }
  for (const char* code :
       {"  0  ok", "  1  unhealthy", "  2  usage", "  3  cannot reach", "  4  refused"}) {
    EXPECT_THAT(run.out, HasSubstr(code));
  }
  EXPECT_EQ(Tessera({}).exit_code, 2);
  CliRun help = Tessera({"drill", "corrupt", "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("usage: tessera drill corrupt NODE [--job JOB]"));
  EXPECT_THAT(help.out, HasSubstr("--target slot|fragment"));
  EXPECT_EQ(Tessera({"help", "plan"}).out, Tessera({"plan", "--help"}).out);
  CliRun drop = Tessera({"drop", "--help"});
  EXPECT_EQ(drop.exit_code, 0);
  EXPECT_THAT(drop.out, HasSubstr("usage: tessera drop JOB [--force]"));
  EXPECT_THAT(drop.out, HasSubstr("Snapshotter.close(drop=True)"));
}

TEST(CliTest, BadArgumentsExitTwoNamingTheMistake) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {{"stauts"}, "unknown command \"stauts\" (did you mean status?)"},
           {{"drill"}, "drill needs a kind: mark, unmark, kill-trainer"},
           {{"drill", "lose-nod", "n1"},
            "unknown drill kind \"lose-nod\" (did you mean lose-node?)"},
           {{"drill", "lose-node"}, "tessera drill lose-node needs NODE"},
           {{"verify"}, "tessera verify needs JOB"},
           {{"drop"}, "tessera drop needs JOB"},
           {{"drop", "job", "--forse"}, "--forse"},
           {{"recover", "job"}, "tessera recover needs --rank R"},
           {{"recover", "job", "--rank", "-2"}, "--rank \"-2\": need an integer from 0"},
           {{"verify", "job", "--step", "soon"}, "--step \"soon\": need an integer >= 0"},
           {{"status", "--socket"}, "--socket needs a value: --socket PATH"},
           {{"status", "--address", "nohost"}, "--address \"nohost\": need HOST:PORT"},
           {{"status", "--address", "h:1"}, "needs the cluster token: --token-file PATH"},
           {{"status", "--token", "abc"}, "--token and --token-file go with --address"},
           {{"status", "--socket", "/x", "--address", "h:1"}, "--socket and --address both"},
           {{"status", "--address", "h:1", "--token-file", "/nonexistent/token"},
            "--token-file /nonexistent/token: cannot read it"},
           {{"status", "--timeout-s", "0"}, "--timeout-s \"0\": need a number > 0"},
           {{"plan", "--nodes", "4", "--k", "2", "--m", "1", "--node-mtbf-hours", "100"},
            "tessera plan needs --interval-s T"},
           {{"plan", "--nodes", "0", "--k", "2", "--m", "1", "--node-mtbf-hours", "100",
             "--interval-s", "60"},
            "--nodes \"0\": need an integer from 1"},
           {{"drill", "corrupt", "n1", "--target", "header"},
            "--target \"header\": need slot or fragment"},
       }) {
    CliRun run = Tessera(c.args);
    EXPECT_EQ(run.exit_code, 2) << c.args[0] << ": " << run.err;
    EXPECT_THAT(run.err, HasSubstr(c.message));
    EXPECT_EQ(run.out, "");
  }
}

TEST(CliTest, ErrorsComeAsJsonWithJson) {
  CliRun run = Tessera({"verify", "--json"});
  EXPECT_EQ(run.exit_code, 2);
  auto parsed = ParseJson(run.out);
  EXPECT_EQ(parsed.fields().at("ok").bool_value(), false);
  EXPECT_EQ(parsed.fields().at("exit_code").number_value(), 2);
  EXPECT_THAT(parsed.fields().at("error").string_value(), HasSubstr("needs JOB"));
}

// Without --socket the CLI reads TESSERA_SOCKET, as the Python client does; --socket wins.
TEST(CliTest, TheSocketComesFromTesseraSocketUnlessGiven) {
  setenv("TESSERA_SOCKET", "/nonexistent/from-env.sock", 1);
  CliRun run = Tessera({"status", "--timeout-s", "2"});
  EXPECT_EQ(run.exit_code, 3) << run.err;
  EXPECT_THAT(run.err, HasSubstr("unix:/nonexistent/from-env.sock"));
  run = Tessera({"status", "--socket", "/nonexistent/flag.sock", "--timeout-s", "2"});
  EXPECT_THAT(run.err, HasSubstr("unix:/nonexistent/flag.sock"));
  unsetenv("TESSERA_SOCKET");
  run = Tessera({"status", "--timeout-s", "2"});
  EXPECT_THAT(run.err, HasSubstr("unix:/run/tessera/agent.sock"));
}

TEST(CliTest, NoDaemonExitsThree) {
  CliRun run = Tessera({"status", "--socket", "/nonexistent/tessera.sock", "--timeout-s", "2"});
  EXPECT_EQ(run.exit_code, 3) << run.err;
  EXPECT_THAT(run.err, HasSubstr("cannot reach tesserad at unix:/nonexistent/tessera.sock"));
  EXPECT_THAT(run.err, HasSubstr("is --socket its agent.socket_path?"));
  run = Tessera(
      {"jobs", "--address", "127.0.0.1:1", "--token", "0123456789abcdef", "--timeout-s", "2"});
  EXPECT_EQ(run.exit_code, 3) << run.err;
  EXPECT_THAT(run.err, HasSubstr("cannot reach tesserad at 127.0.0.1:1"));
}

TEST(CliTest, PlanPrintsAndParses) {
  CliRun run = Tessera({"plan", "--nodes", "16", "--k", "3", "--m", "2", "--node-mtbf-hours",
                        "5000", "--interval-s", "600"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, HasSubstr("P(snapshot lost) per day:"));
  EXPECT_THAT(run.out, HasSubstr("P(snapshot lost) per month:"));
  EXPECT_THAT(run.out, HasSubstr("placed as RS(3,2)"));

  run = Tessera({"plan", "--nodes", "3", "--k", "3", "--m", "2", "--node-mtbf-hours", "50",
                 "--interval-s", "60", "--json"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  auto parsed = ParseJson(run.out);
  const auto& result = parsed.fields().at("result").struct_value().fields();
  EXPECT_EQ(result.at("k").number_value(), 1);
  EXPECT_EQ(result.at("m").number_value(), 1);
  EXPECT_THAT(result.at("shrink_reason").string_value(), HasSubstr("replication"));
  const double day = result.at("loss_probability_per_day").number_value();
  const double month = result.at("loss_probability_per_month").number_value();
  EXPECT_GT(day, 0);
  EXPECT_LT(day, month);
  EXPECT_LT(month, 1);
}

}  // namespace
}  // namespace tessera::cli
