// Refused requests on the agent socket and the admin service: each is counted
// (tessera_rpc_refusals_total{service, method, code}), and logged, at most 20 lines per 10 s per
// (service, method, code); the next line logged says how many like it went unlogged. A client
// repeating a bad request cannot fill the disk with the daemon's log.
#ifndef TESSERA_DAEMON_REFUSALS_H_
#define TESSERA_DAEMON_REFUSALS_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"

namespace tessera {

// Records a request `method` of `service` ("agent", "admin") that failed with `status`.
// REQUIRES: !status.ok(). Thread-safe.
void RecordRefusal(const char* service, const char* method, const absl::Status& status);

// Tests: the clock RecordRefusal reads (nanoseconds); nullptr restores the real one.
void SetRefusalClockForTesting(std::function<int64_t()> now_ns);

}  // namespace tessera

#endif  // TESSERA_DAEMON_REFUSALS_H_
