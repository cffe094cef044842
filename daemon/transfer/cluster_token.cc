#include "daemon/transfer/cluster_token.h"

#include "absl/strings/str_cat.h"

namespace tessera {

bool SameToken(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const std::string& longer = a.size() >= b.size() ? a : b;
  for (size_t i = 0; i < longer.size(); ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::Status CheckClusterToken(const grpc::ServerContextBase& context, const std::string& token,
                               const std::string& what) {
  auto it = context.client_metadata().find(kClusterTokenMetadataKey);
  if (it == context.client_metadata().end()) {
    return absl::UnauthenticatedError(absl::StrCat(what, " over TCP need the cluster token in the '",
                                                   kClusterTokenMetadataKey, "' metadata"));
  }
  if (!SameToken(std::string(it->second.data(), it->second.size()), token)) {
    return absl::UnauthenticatedError(
        "wrong cluster token: it must equal the daemons' cluster.token");
  }
  return absl::OkStatus();
}

}  // namespace tessera
