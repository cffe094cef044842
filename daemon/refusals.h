// Refused requests of the daemon's services (the agent socket's, and on the peer port the admin,
// peer, coordination and rendezvous services): each is counted
// (tessera_rpc_refusals_total{service, method, code}), and logged, at most 20 lines per 10 s per
// (service, method, code); the next line logged says how many like it went unlogged. A client or
// a peer repeating a bad request cannot fill the disk with the daemon's log.
#ifndef TESSERA_DAEMON_REFUSALS_H_
#define TESSERA_DAEMON_REFUSALS_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace tessera {

// Records a request `method` of `service` ("agent", "admin", "peer", "coordination",
// "rendezvous") that failed with `status`. REQUIRES: !status.ok(). Thread-safe.
void RecordRefusal(const char* service, const char* method, const absl::Status& status);

// A service method's answer: `status` as a grpc::Status, recorded first when it is not OK.
grpc::Status AnswerCall(const char* service, const char* method, const absl::Status& status);

// How many refusals of (service, method, code) were recorded so far.
uint64_t RefusalCount(const char* service, const char* method, absl::StatusCode code);

// Tests: the clock RecordRefusal reads (nanoseconds); nullptr restores the real one.
void SetRefusalClockForTesting(std::function<int64_t()> now_ns);

}  // namespace tessera

#endif  // TESSERA_DAEMON_REFUSALS_H_
