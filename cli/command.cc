#include "cli/command.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "cli/format.h"

namespace tessera::cli {

void Context::Progress(const std::string& line) {
  if (!json()) progress_ << line << std::endl;
}

absl::StatusOr<AdminClient*> Context::Client() {
  if (client_) return client_.get();
  ConnectionOptions options;
  if (args_.Has("socket") && args_.Has("address")) {
    return absl::InvalidArgumentError(
        "--socket and --address both given: use --socket PATH for the daemon on this node, or "
        "--address HOST:PORT (with --token-file) for one over TCP");
  }
  if (args_.Has("token") && args_.Has("token-file")) {
    return absl::InvalidArgumentError("--token and --token-file both given: use one");
  }
  // --socket, else TESSERA_SOCKET (as the Python client reads it), else the daemon's default.
  const char* env_socket = std::getenv("TESSERA_SOCKET");
  options.socket_path = args_.Get(
      "socket", env_socket != nullptr && *env_socket != '\0' ? env_socket : kDefaultSocketPath);
  options.address = args_.Get("address");
  if (!options.address.empty()) {
    const size_t colon = options.address.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == options.address.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--address \"", options.address, "\": need HOST:PORT, e.g. 10.0.0.1:7070"));
    }
    if (args_.Has("token-file")) {
      const std::string path = args_.Get("token-file");
      std::ifstream in(path);
      if (!in) {
        return absl::InvalidArgumentError(absl::StrCat("--token-file ", path, ": cannot read it"));
      }
      std::stringstream contents;
      contents << in.rdbuf();
      options.token = std::string(absl::StripAsciiWhitespace(contents.str()));
      if (options.token.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("--token-file ", path, " is empty"));
      }
    } else if (args_.Has("token")) {
      options.token = args_.Get("token");
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--address ", options.address,
                       " needs the cluster token: --token-file PATH (or --token TOKEN)"));
    }
    options.tls = ClusterTlsFiles{args_.Get("tls-cert"), args_.Get("tls-key"), args_.Get("tls-ca")};
    if (absl::Status tls = CheckClusterTlsFiles(options.tls); !tls.ok()) {
      return absl::InvalidArgumentError(absl::StrReplaceAll(
          tls.message(), {{"cluster.tls_cert_file", "--tls-cert"},
                          {"cluster.tls_key_file", "--tls-key"},
                          {"cluster.tls_ca_file", "--tls-ca"}}));
    }
  } else if (args_.Has("token") || args_.Has("token-file")) {
    return absl::InvalidArgumentError(
        "--token and --token-file go with --address: over the Unix socket no token is needed");
  } else if (args_.Has("tls-cert") || args_.Has("tls-key") || args_.Has("tls-ca")) {
    return absl::InvalidArgumentError(
        "--tls-cert, --tls-key and --tls-ca go with --address: the Unix socket needs no TLS");
  }
  auto timeout_s = args_.GetDouble("timeout-s", 60, 0);
  if (!timeout_s.ok()) return timeout_s.status();
  options.timeout = absl::Milliseconds(static_cast<int64_t>(*timeout_s * 1000));
  client_ = std::make_unique<AdminClient>(options);
  return client_.get();
}

int ExitCodeFor(const absl::Status& status, const Context& ctx) {
  if (status.ok()) return kExitOk;
  if (absl::IsInvalidArgument(status)) return kExitUsage;
  const bool unreachable = ctx.client_made() != nullptr &&
                           ctx.client_made()->last_failure() == FailureKind::kUnreachable;
  if (unreachable) return kExitUnreachable;
  // The daemon answered: a member it needed could not be reached, or data cannot be rebuilt.
  if (absl::IsUnavailable(status) || absl::IsDataLoss(status)) return kExitUnhealthy;
  return kExitRefused;
}

std::string HealthName(admin::Health health) {
  switch (health) {
    case admin::PROTECTED:
      return "protected";
    case admin::DEGRADED:
      return "DEGRADED";
    case admin::UNPROTECTED:
      return "UNPROTECTED";
    case admin::LOCAL_VIEW:
      return "local-view";
    default:
      return "unknown";
  }
}

std::string MemberStateName(admin::MemberStatus::State state) {
  switch (state) {
    case admin::MemberStatus::SELF:
      return "self";
    case admin::MemberStatus::ALIVE:
      return "alive";
    case admin::MemberStatus::SUSPECTED:
      return "SUSPECTED";
    case admin::MemberStatus::UNKNOWN:
      return "UNKNOWN";
    default:
      return "unknown";
  }
}

Json JobJson(const admin::JobStatus& job) {
  Json j = Json::Object();
  j.Set("job", job.job_id());
  j.Set("world_size", job.world_size());
  j.Set("newest_step", job.newest_step());
  j.Set("committed_step", job.committed_step());
  j.Set("restorable_step", job.restorable_step());
  std::string health = HealthName(job.health());
  j.Set("health", absl::AsciiStrToLower(health));
  j.Set("reason", job.reason());
  j.Set("k", job.ec_k());
  j.Set("m", job.ec_m());
  j.Set("nodes", Json::ArrayOf(job.nodes()));
  j.Set("drill_target", job.drill_target());
  j.Set("ranks_here", job.ranks_here());
  return j;
}

Json NodeErrorsJson(const google::protobuf::RepeatedPtrField<admin::NodeError>& errors) {
  Json array = Json::Array();
  for (const auto& e : errors) {
    Json j = Json::Object();
    j.Set("node", e.node_id());
    j.Set("address", e.address());
    j.Set("error", e.error());
    array.Add(std::move(j));
  }
  return array;
}

std::string NodeErrorsText(const google::protobuf::RepeatedPtrField<admin::NodeError>& errors) {
  std::string text;
  for (const auto& e : errors) {
    absl::StrAppend(&text, "  could not ask ", e.node_id().empty() ? e.address() : e.node_id(),
                    e.node_id().empty() || e.address().empty() ? "" : " (" + e.address() + ")",
                    ": ", e.error(), "\n");
  }
  return text;
}

}  // namespace tessera::cli
