// The cluster token: the shared secret (cluster.token) daemons send each other in the
// kClusterTokenMetadataKey metadata of calls on the peer port that need it (admin, rendezvous).
#ifndef TESSERA_DAEMON_TRANSFER_CLUSTER_TOKEN_H_
#define TESSERA_DAEMON_TRANSFER_CLUSTER_TOKEN_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/server_context.h"

namespace tessera {

inline constexpr char kClusterTokenMetadataKey[] = "x-tessera-token";

// Constant-time comparison, so a wrong token's timing says nothing about the right one.
bool SameToken(const std::string& a, const std::string& b);

// kUnauthenticated unless the call carries `token` (which must not be empty). `what` names the
// service in the error ("admin calls").
absl::Status CheckClusterToken(const grpc::ServerContextBase& context, const std::string& token,
                               const std::string& what);

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_CLUSTER_TOKEN_H_
