// tessera: the operator CLI for tesserad (status, verification, recovery, drills, planning).
#include <csignal>
#include <iostream>

#include "cli/cli.h"

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  return tessera::cli::RunTessera(std::vector<std::string>(argv + 1, argv + argc), std::cout,
                                  std::cerr);
}
