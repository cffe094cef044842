// `tessera`, the operator CLI: the command table, help, dispatch, and the mapping of outcomes
// and errors to output and exit codes. main() only calls RunTessera.
#ifndef TESSERA_CLI_CLI_H_
#define TESSERA_CLI_CLI_H_

#include <ostream>
#include <string>
#include <vector>

namespace tessera::cli {

// Runs `tessera` with `args` (argv[1..]), printing results to `out` and errors and progress to
// `err`; returns the exit code (see ExitCode in cli/command.h).
int RunTessera(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// The text of `tessera --help`.
std::string TesseraUsage();

}  // namespace tessera::cli

#endif  // TESSERA_CLI_CLI_H_
