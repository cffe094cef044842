#include "cli/admin_client.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace tessera::cli {

AdminClient::AdminClient(ConnectionOptions options) : options_(std::move(options)) {
  target_ = options_.address.empty() ? "unix:" + options_.socket_path : options_.address;
  Reconnect();
}

void AdminClient::Reconnect() {
  grpc::ChannelArguments args;
  // A drill waits for a restarted daemon: retry the connection often rather than backing off.
  // (The minimum is also one attempt's time to finish its handshake: seconds, for a busy host.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 5000);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  args.SetMaxReceiveMessageSize(64 << 20);
  // A fresh channel, not one shared with an earlier connection to the same target.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  channel_ = grpc::CreateCustomChannel(
      target_,
      options_.address.empty() ? grpc::InsecureChannelCredentials()
                               : PeerChannelCredentials(options_.tls),
      args);
  stub_ = admin::Admin::NewStub(channel_);
}

template <typename Request, typename Response, typename Method>
absl::StatusOr<Response> AdminClient::Call(const char* name, Method method,
                                           const Request& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(options_.timeout));
  if (!options_.address.empty()) context.AddMetadata("x-tessera-token", options_.token);
  Response response;
  grpc::Status status = (stub_.get()->*method)(&context, request, &response);
  last_failure_ = FailureKind::kAnswered;
  if (status.ok()) return response;

  const absl::Status error = FromGrpcStatus(status);
  const bool connected = channel_->GetState(false) == GRPC_CHANNEL_READY;
  const bool unreachable = (absl::IsUnavailable(error) && !connected) ||
                           absl::IsDeadlineExceeded(error) || absl::IsUnauthenticated(error) ||
                           (absl::IsPermissionDenied(error) && !connected) ||
                           (absl::IsUnimplemented(error) && !connected);
  last_failure_ = unreachable ? FailureKind::kUnreachable : FailureKind::kAnswered;
  if (absl::IsUnauthenticated(error)) {
    return absl::UnauthenticatedError(absl::StrCat(
        "tesserad at ", target_, " refused the token: ", error.message(),
        "; give the cluster token with --token-file PATH (cluster.token_file of the daemons)"));
  }
  if (unreachable && absl::IsDeadlineExceeded(error)) {
    return absl::UnavailableError(absl::StrCat("tesserad at ", target_, " did not answer ", name,
                                               " within ", absl::FormatDuration(options_.timeout),
                                               " (raise --timeout-s for large jobs)"));
  }
  if (unreachable) {
    const std::string hint =
        options_.address.empty()
            ? "is tesserad running on this node, and is --socket its agent.socket_path?"
            : "is tesserad running there, and is HOST:PORT its peer.listen_address?";
    return absl::UnavailableError(
        absl::StrCat("cannot reach tesserad at ", target_, ": ", error.message(), "; ", hint));
  }
  return absl::Status(error.code(), absl::StrCat(name, ": ", error.message()));
}

#define TESSERA_ADMIN_CALL(Name)                                                                 \
  absl::StatusOr<admin::Name##Response> AdminClient::Name(const admin::Name##Request& request) { \
    return Call<admin::Name##Request, admin::Name##Response>(#Name, &admin::Admin::Stub::Name,   \
                                                             request);                           \
  }

TESSERA_ADMIN_CALL(GetStatus)
TESSERA_ADMIN_CALL(ListJobs)
TESSERA_ADMIN_CALL(ListVersions)
TESSERA_ADMIN_CALL(Verify)
TESSERA_ADMIN_CALL(Recover)
TESSERA_ADMIN_CALL(ListTrainers)
TESSERA_ADMIN_CALL(SetDrillTarget)
TESSERA_ADMIN_CALL(DropMemory)
TESSERA_ADMIN_CALL(Corrupt)
TESSERA_ADMIN_CALL(DeclareLost)
TESSERA_ADMIN_CALL(DropJob)

#undef TESSERA_ADMIN_CALL

}  // namespace tessera::cli
