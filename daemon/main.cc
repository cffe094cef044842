// tesserad: parse flags, load the config once, run the daemon until SIGTERM or SIGINT, drain.
#include <csignal>
#include <cstdio>

#include "common/logging.h"
#include "common/version.h"
#include "daemon/daemon.h"
#include "daemon/daemon_config.h"
#include "daemon/flags.h"

int main(int argc, char** argv) {
  auto flags = tessera::ParseTesseradFlags(std::vector<std::string>(argv + 1, argv + argc));
  if (!flags.ok()) {
    std::fprintf(stderr, "tesserad: %s\n\n%s", std::string(flags.status().message()).c_str(),
                 tessera::TesseradUsage().c_str());
    return 2;
  }
  switch (flags->action) {
    case tessera::TesseradFlags::Action::kHelp:
      std::fputs(tessera::TesseradUsage().c_str(), stdout);
      return 0;
    case tessera::TesseradFlags::Action::kVersion:
      std::printf("tesserad %s\n", tessera::kVersion);
      return 0;
    case tessera::TesseradFlags::Action::kPrintDefaultConfig:
      std::fputs(tessera::DefaultDaemonConfigToml().c_str(), stdout);
      return 0;
    case tessera::TesseradFlags::Action::kRun:
      break;
  }
  auto config = tessera::LoadDaemonConfig(flags->config_path, flags->overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "tesserad: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  tessera::SetLogLevel(config->log.level).IgnoreError();  // validated by LoadDaemonConfig

  // Block the stop signals before any thread starts, then wait for one here.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  auto daemon = tessera::Daemon::Start(*config);
  if (!daemon.ok()) {
    tessera::Logger("daemon")->critical("cannot start: {}", daemon.status().ToString());
    return 1;
  }
  int signal = 0;
  sigwait(&stop, &signal);
  tessera::Logger("daemon")->info("received {}", signal == SIGTERM ? "SIGTERM" : "SIGINT");
  (*daemon)->Shutdown();
  return 0;
}
