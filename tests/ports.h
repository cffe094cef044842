// TCP ports for the loopback servers that tests start (daemons' peer and metrics addresses),
// chosen so that no other process can take one between its choice and the server's bind:
//   - only ports outside the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range):
//     a bind to port 0 and every outgoing connection get an ephemeral port, never one of these;
//   - each port reserved across processes by an flock(2) on <lock directory>/<port>.lock, held
//     until the reserver is destroyed (FreePort's: when the process exits). Every test process
//     takes ports this way; tests/python/conftest.py's free_port() uses the same files;
//   - bindable on 127.0.0.1 (plain bind, no SO_REUSEADDR) at the moment it is reserved.
#ifndef TESSERA_TESTS_PORTS_H_
#define TESSERA_TESTS_PORTS_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tessera::testing {

struct PortRange {
  int first = 0;  // inclusive
  int last = 0;   // inclusive
  bool Contains(int port) const { return port >= first && port <= last; }
};

// The kernel's ephemeral range; Linux's default (32768-60999) when the file cannot be read.
PortRange EphemeralPortRange();

// Thread-safe. Reservations made through different PortReserver objects exclude each other
// (flock locks of separate opens conflict, within one process too).
class PortReserver {
 public:
  struct Options {
    std::string lock_directory = "/tmp/tessera-test-ports";  // created (mode 1777) if missing
    PortRange candidates = {10000, 65535};                   // minus `ephemeral`
    PortRange ephemeral = EphemeralPortRange();
  };

  explicit PortReserver(Options options);
  // Releases every reservation.
  ~PortReserver();
  PortReserver(const PortReserver&) = delete;
  PortReserver& operator=(const PortReserver&) = delete;

  // Reserves some port, starting the search at a random candidate.
  // Errors: kResourceExhausted when every candidate is reserved or in use (it says how many
  // candidates there were), kInternal when the lock directory cannot be made.
  absl::StatusOr<int> Reserve();

  // Reserves `port`. Errors: kInvalidArgument when it is not a candidate (ephemeral or out of
  // range), kAlreadyExists when a reserver (this one included) holds it, kUnavailable when
  // something is bound to it.
  absl::Status Reserve(int port);

  // The candidates, in ascending order.
  std::vector<int> Candidates() const;

 private:
  const Options options_;
  absl::Mutex mu_;
  std::vector<int> lock_fds_ ABSL_GUARDED_BY(mu_);
};

// A port reserved for the rest of this process's life (a process-wide PortReserver with the
// default options). Aborts the test process, saying why, when none can be reserved.
int FreePort();

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_PORTS_H_
