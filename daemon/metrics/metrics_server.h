// Serves a MetricsRegistry over HTTP at /metrics (Prometheus text format 0.0.4), with
// cpp-httplib on its own threads.
#ifndef TESSERA_DAEMON_METRICS_METRICS_SERVER_H_
#define TESSERA_DAEMON_METRICS_METRICS_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "daemon/metrics/metrics.h"

namespace httplib {
class Server;
}

namespace tessera {

class MetricsServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks a free one). kUnavailable when the address
  // cannot be bound, naming it. `registry` is not owned and must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& address,
                                                              MetricsRegistry* registry);
  // Stops serving and joins the server thread.
  ~MetricsServer();

  int port() const { return port_; }

 private:
  MetricsServer() = default;

  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_METRICS_METRICS_SERVER_H_
