// Command-line parsing for `tessera`: a command name, its positional arguments, and flags given
// as `--flag VALUE` or `--flag=VALUE`, checked against the command's declared flags so that every
// mistake gets an error naming the argument and what would be right.
#ifndef TESSERA_CLI_ARGS_H_
#define TESSERA_CLI_ARGS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera::cli {

struct FlagSpec {
  std::string name;        // without the dashes: "rank"
  std::string value_name;  // empty: a switch that takes no value ("json")
  std::string help;
  bool required = false;
};

struct CommandSpec {
  std::string name;                     // "drill kill-trainer"
  std::vector<std::string> positional;  // names of the required positional arguments, in order
  std::vector<FlagSpec> flags;          // the command's own flags; global flags come on top
  std::string summary;                  // one line for `tessera --help`
  std::string help;                     // a paragraph for `tessera COMMAND --help`
};

// The flags every command accepts (connection, --json, --timeout-s, --help).
const std::vector<FlagSpec>& GlobalFlags();

class ParsedArgs {
 public:
  const std::vector<std::string>& positional() const { return positional_; }
  bool Has(const std::string& flag) const { return values_.count(flag) > 0; }
  // The value of a flag given with a value; `fallback` when absent.
  std::string Get(const std::string& flag, const std::string& fallback = "") const;
  // A flag's value as an integer within [min, max], or `fallback` when absent. Errors:
  // kInvalidArgument naming the flag, the value and the valid range.
  absl::StatusOr<int64_t> GetInt(const std::string& flag, int64_t fallback, int64_t min,
                                 int64_t max) const;
  // Likewise for a finite number > `min` (>= `min` when `min_inclusive`).
  absl::StatusOr<double> GetDouble(const std::string& flag, double fallback, double min,
                                   bool min_inclusive = false) const;
  // A required flag: kInvalidArgument "COMMAND needs --FLAG VALUE" when absent.
  absl::StatusOr<std::string> Require(const std::string& flag) const;

 private:
  friend absl::StatusOr<ParsedArgs> ParseCommandArgs(const CommandSpec&,
                                                     const std::vector<std::string>&);
  std::string command_;
  std::vector<std::string> positional_;
  std::map<std::string, std::string> values_;  // switches map to ""
  std::map<std::string, std::string> value_names_;
};

// Parses `args`, the arguments after the command's name, against `spec` plus GlobalFlags().
// Errors: kInvalidArgument naming the argument: an unknown flag (with the valid ones), a missing
// or empty value, a value given to a switch, a flag given twice, a missing required flag, a
// missing or extra positional argument (with the usage line). With --help nothing else is
// checked.
absl::StatusOr<ParsedArgs> ParseCommandArgs(const CommandSpec& spec,
                                            const std::vector<std::string>& args);

// "tessera drill corrupt NODE [--job JOB] [--rank R] ..." for `spec`.
std::string UsageLine(const CommandSpec& spec);

// The closest of `candidates` to `word` when it is a likely typo (edit distance <= 2), else "".
std::string Closest(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace tessera::cli

#endif  // TESSERA_CLI_ARGS_H_
