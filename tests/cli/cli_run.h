// One run of the `tessera` binary from a test: its exit code, output, and --json output parsed
// with protobuf's JSON parser. Shared by the CLI tests against live clusters.
#ifndef TESSERA_TESTS_CLI_CLI_RUN_H_
#define TESSERA_TESTS_CLI_CLI_RUN_H_

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/harness.h"

namespace tessera::testing {

using JsonObject = google::protobuf::Map<std::string, google::protobuf::Value>;

struct CliRun {
  int exit_code = -1;
  std::string out, err;
  google::protobuf::Struct json;  // parsed from `out` when --json was given

  std::string Describe() const {
    return absl::StrCat("exit ", exit_code, "\nstdout:\n", out, "\nstderr:\n", err);
  }
  // The "result" object of --json output.
  const JsonObject& result() const { return json.fields().at("result").struct_value().fields(); }
};

inline const JsonObject& Obj(const google::protobuf::Value& v) {
  return v.struct_value().fields();
}
inline const google::protobuf::ListValue& List(const google::protobuf::Value& v) {
  return v.list_value();
}

// Runs `argv` (the tessera binary first), its stderr in `err_path`; prints the run; parses --json
// output (a test failure when it is not JSON).
inline CliRun RunCli(const std::vector<std::string>& argv, const std::string& err_path,
                     std::chrono::seconds timeout) {
  auto process = Process::Start(argv, err_path);
  CliRun run;
  run.exit_code = process->Wait(timeout);
  run.out = absl::StrJoin(process->lines(), "\n");
  run.err = ReadFile(err_path);
  std::printf("$ %s -> %d\n%s\n%s", absl::StrJoin(argv, " ").c_str(), run.exit_code,
              run.out.c_str(), run.err.c_str());
  if (std::find(argv.begin(), argv.end(), "--json") != argv.end()) {
    auto status = google::protobuf::util::JsonStringToMessage(run.out, &run.json);
    EXPECT_TRUE(status.ok()) << "not JSON: " << status.ToString() << "\n" << run.Describe();
  }
  return run;
}

// The flags of member `i` of a token cluster on `addresses` (RS(k, m), 100 ms heartbeats), then
// `extra`.
inline std::vector<std::string> TokenClusterFlags(const std::vector<std::string>& addresses,
                                                  size_t i, const std::string& token_file, int k,
                                                  int m,
                                                  const std::vector<std::string>& extra = {}) {
  std::vector<std::string> flags = {"--set", "peer.listen_address=" + addresses[i],
                                    "--set", "cluster.members=" + absl::StrJoin(addresses, ","),
                                    "--set", "cluster.token_file=" + token_file,
                                    "--set", absl::StrCat("ec.k=", k),
                                    "--set", absl::StrCat("ec.m=", m),
                                    "--set", "liveness.heartbeat_ms=100",
                                    "--set", "liveness.timeout_ms=1000"};
  flags.insert(flags.end(), extra.begin(), extra.end());
  return flags;
}

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_CLI_CLI_RUN_H_
