#include "daemon/systemd_notify.h"

#include <systemd/sd-daemon.h>

#include <cstdlib>
#include <cstring>

#include "absl/time/clock.h"
#include "common/logging.h"

namespace tessera {

SystemdNotifier::SystemdNotifier() {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  enabled_ = socket != nullptr && socket[0] != '\0';
  uint64_t usec = 0;
  if (enabled_ && sd_watchdog_enabled(/*unset_environment=*/0, &usec) > 0 && usec > 0) {
    watchdog_interval_ = absl::Microseconds(usec);
  }
}

void SystemdNotifier::Send(const std::string& message) {
  if (!enabled_) return;
  const int r = sd_notify(/*unset_environment=*/0, message.c_str());
  if (r < 0) Logger("daemon")->warn("sd_notify({}): {}", message, std::strerror(-r));
}

void SystemdNotifier::Ready(const std::string& status) {
  Send("READY=1\nSTATUS=" + status);
  last_ping_ = absl::Now();
}

void SystemdNotifier::Status(const std::string& status) { Send("STATUS=" + status); }

void SystemdNotifier::Stopping(const std::string& status) { Send("STOPPING=1\nSTATUS=" + status); }

void SystemdNotifier::MaybePingWatchdog() {
  if (!enabled_ || watchdog_interval_ == absl::ZeroDuration()) return;
  const absl::Time now = absl::Now();
  if (now - last_ping_ < watchdog_interval_ / 2) return;
  last_ping_ = now;
  Send("WATCHDOG=1");
}

}  // namespace tessera
