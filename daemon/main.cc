// tesserad: parse flags, load the config once, run the daemon until SIGTERM or SIGINT, drain.
// systemd (Type=notify) hears READY=1, watchdog pings and STOPPING=1.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <pthread.h>

#include <algorithm>
#include <memory>
#include <thread>

#include "absl/time/time.h"
#include "common/logging.h"
#include "common/version.h"
#include "daemon/daemon.h"
#include "daemon/daemon_config.h"
#include "daemon/flags.h"
#include "daemon/systemd_notify.h"

namespace {

// Runs `step`, which bounds its own duration (a drain, a start), while another thread keeps
// systemd's watchdog fed: a long drain is progress, not a hang.
template <typename Step>
void WhileFeedingWatchdog(tessera::SystemdNotifier& systemd, Step step) {
  std::atomic<bool> done{false};
  std::thread feeder([&] {
    while (!done.load()) {
      systemd.MaybePingWatchdog();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  step();
  done.store(true);
  feeder.join();
}

}  // namespace

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
  sigaddset(&stop, SIGUSR1);  // the daemon's wakeup: DropMemory accepted, or fenced
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  const pthread_t main_thread = pthread_self();
  std::signal(SIGPIPE, SIG_IGN);

  auto log = tessera::Logger("daemon");
  tessera::SystemdNotifier systemd;
  // One pass per incarnation: an admin DropMemory ends one and starts the next with an empty
  // store, in this same process.
  while (true) {
    absl::StatusOr<std::unique_ptr<tessera::Daemon>> daemon;
    WhileFeedingWatchdog(systemd, [&] { daemon = tessera::Daemon::Start(*config); });
    if (!daemon.ok()) {
      log->critical("cannot start: {}", daemon.status().ToString());
      systemd.Status("cannot start: " + daemon.status().ToString());
      return 1;
    }
    systemd.Ready("serving as node " + (*daemon)->node_id());
    // No polling: DropMemory and fencing wake this thread with SIGUSR1. It wakes on its own
    // only to feed systemd's watchdog (a quarter of its interval), or every 10 s without one.
    (*daemon)->SetWakeup([main_thread] { pthread_kill(main_thread, SIGUSR1); });
    const absl::Duration watchdog = systemd.watchdog_interval();
    const timespec tick = absl::ToTimespec(watchdog > absl::ZeroDuration()
                                               ? std::min(watchdog / 4, absl::Seconds(10))
                                               : absl::Seconds(10));
    int signal = 0;
    while ((signal <= 0 || signal == SIGUSR1) &&
           !(*daemon)->WaitForDropMemory(absl::ZeroDuration()) && !(*daemon)->fenced()) {
      systemd.MaybePingWatchdog();
      signal = sigtimedwait(&stop, nullptr, &tick);
    }
    (*daemon)->SetWakeup(nullptr);
    if (signal == SIGUSR1) signal = 0;
    if ((*daemon)->fenced()) {
      log->critical("node {} has a newer incarnation in the cluster: this process (incarnation "
                    "{}) is fenced out and exits without serving its trainers further",
                    (*daemon)->node_id(), (*daemon)->incarnation());
      systemd.Stopping("fenced: replaced by a newer incarnation");
      WhileFeedingWatchdog(systemd, [&] { (*daemon)->Shutdown(); });
      return 4;
    }
    if (signal > 0) {
      log->info("received {}", signal == SIGTERM ? "SIGTERM" : "SIGINT");
      systemd.Stopping("draining");
      WhileFeedingWatchdog(systemd, [&] { (*daemon)->Shutdown(); });
      return 0;
    }
    systemd.Status("dropping memory (admin DropMemory) and restarting");
    WhileFeedingWatchdog(systemd, [&] { daemon->reset(); });  // shuts down, then destroys
    auto deleted = tessera::Daemon::DeleteSegments(*config);
    if (!deleted.ok()) {
      log->critical("DropMemory: {}", deleted.status().ToString());
      return 1;
    }
    log->warn("DropMemory: deleted {} segment files; starting a new incarnation", *deleted);
  }
}
