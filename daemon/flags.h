// The command line of tesserad. Flags only locate the config file and override its keys; all
// settings live in the config (daemon/daemon_config.h).
//
//   tesserad [--config PATH] [--set KEY=VALUE]...
//   tesserad --print-default-config | --help | --version
#ifndef TESSERA_DAEMON_FLAGS_H_
#define TESSERA_DAEMON_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera {

struct TesseradFlags {
  enum class Action { kRun, kPrintDefaultConfig, kHelp, kVersion };

  Action action = Action::kRun;
  std::string config_path;             // --config; empty: none, defaults and overrides only
  std::vector<std::string> overrides;  // --set, in command-line order ("key=value")
};

// Parses `args`, the arguments after the program name (argv[1..argc-1]). Values are given as
// `--flag VALUE` or `--flag=VALUE`. --help (or -h) and --version win over every other flag;
// --print-default-config takes no --config or --set, since it prints the built-in defaults.
// Errors: kInvalidArgument naming the offending argument and listing the valid flags: an
// unknown flag or a positional argument, a missing or empty value, a value given to a flag that
// takes none, --config given twice, a --set without '=', --print-default-config with others.
// The keys and values of --set are checked by LoadDaemonConfig, not here.
absl::StatusOr<TesseradFlags> ParseTesseradFlags(const std::vector<std::string>& args);

// The text of `tesserad --help`.
std::string TesseradUsage();

}  // namespace tessera

#endif  // TESSERA_DAEMON_FLAGS_H_
