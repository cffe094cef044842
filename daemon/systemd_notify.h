// The daemon's side of systemd's service protocol (Type=notify): READY=1 once it serves,
// WATCHDOG=1 at half of the watchdog interval when the unit sets WatchdogSec, STOPPING=1 when it
// drains, and STATUS= lines. Without NOTIFY_SOCKET (not started by systemd) every call does
// nothing.
#ifndef TESSERA_DAEMON_SYSTEMD_NOTIFY_H_
#define TESSERA_DAEMON_SYSTEMD_NOTIFY_H_

#include <cstdint>
#include <string>

#include "absl/time/time.h"

namespace tessera {

class SystemdNotifier {
 public:
  // Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the environment once.
  SystemdNotifier();

  bool enabled() const { return enabled_; }
  // Zero when no watchdog is asked for.
  absl::Duration watchdog_interval() const { return watchdog_interval_; }

  void Ready(const std::string& status);
  void Status(const std::string& status);
  void Stopping(const std::string& status);
  // Sends WATCHDOG=1 when half the watchdog interval has passed since the last ping (or since
  // Ready). Call it from the loop whose progress the watchdog vouches for, more often than that.
  void MaybePingWatchdog();

 private:
  void Send(const std::string& message);

  bool enabled_ = false;
  absl::Duration watchdog_interval_ = absl::ZeroDuration();
  absl::Time last_ping_ = absl::InfinitePast();
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_SYSTEMD_NOTIFY_H_
