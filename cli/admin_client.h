// The CLI's connection to a tesserad admin service: over the daemon's Unix socket (no token), or
// over TCP to its peer port with the cluster token in the "x-tessera-token" metadata.
#ifndef TESSERA_CLI_ADMIN_CLIENT_H_
#define TESSERA_CLI_ADMIN_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "daemon/transfer/cluster_tls.h"
#include "grpcpp/channel.h"
#include "proto/admin.grpc.pb.h"

namespace tessera::cli {

// The agent.socket_path default of tesserad.
inline constexpr char kDefaultSocketPath[] = "/run/tessera/agent.sock";

struct ConnectionOptions {
  std::string socket_path = kDefaultSocketPath;  // used when `address` is empty
  std::string address;                           // HOST:PORT of a daemon's peer port
  std::string token;                             // required with `address`
  ClusterTlsFiles tls;                           // with `address`: the peer port's mutual TLS
  absl::Duration timeout = absl::Seconds(60);    // per call
};

// A failed call, classified for the exit code.
//   kUnreachable: no daemon answered at the target (not running, wrong path or address, timeout
//                 before an answer) or it refused the token;
//   kAnswered:    the daemon answered with an error.
enum class FailureKind { kUnreachable, kAnswered };

class AdminClient {
 public:
  explicit AdminClient(ConnectionOptions options);

  // "unix:/run/tessera/agent.sock" or "10.0.0.1:7070", for messages.
  const std::string& target() const { return target_; }
  const ConnectionOptions& options() const { return options_; }

  // Each call returns the daemon's answer or a status whose message names the target.
  // Unreachable daemons give kUnavailable (or kUnauthenticated for a refused token);
  // last_failure() says whether the latest call failed that way.
  absl::StatusOr<admin::GetStatusResponse> GetStatus(const admin::GetStatusRequest& request);
  absl::StatusOr<admin::ListJobsResponse> ListJobs(const admin::ListJobsRequest& request);
  absl::StatusOr<admin::ListVersionsResponse> ListVersions(
      const admin::ListVersionsRequest& request);
  absl::StatusOr<admin::VerifyResponse> Verify(const admin::VerifyRequest& request);
  absl::StatusOr<admin::RecoverResponse> Recover(const admin::RecoverRequest& request);
  absl::StatusOr<admin::ListTrainersResponse> ListTrainers(
      const admin::ListTrainersRequest& request);
  absl::StatusOr<admin::SetDrillTargetResponse> SetDrillTarget(
      const admin::SetDrillTargetRequest& request);
  absl::StatusOr<admin::DropMemoryResponse> DropMemory(const admin::DropMemoryRequest& request);
  absl::StatusOr<admin::CorruptResponse> Corrupt(const admin::CorruptRequest& request);
  absl::StatusOr<admin::DeclareLostResponse> DeclareLost(const admin::DeclareLostRequest& request);
  absl::StatusOr<admin::DropJobResponse> DropJob(const admin::DropJobRequest& request);

  // kUnreachable when the latest call found no daemon to answer it, else kAnswered.
  FailureKind last_failure() const { return last_failure_; }

  // Drops the channel so that the next call connects afresh (after the daemon restarted), without
  // waiting out gRPC's reconnect backoff.
  void Reconnect();

 private:
  template <typename Request, typename Response, typename Method>
  absl::StatusOr<Response> Call(const char* name, Method method, const Request& request);

  ConnectionOptions options_;
  std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<admin::Admin::Stub> stub_;
  FailureKind last_failure_ = FailureKind::kAnswered;
};

}  // namespace tessera::cli

#endif  // TESSERA_CLI_ADMIN_CLIENT_H_
