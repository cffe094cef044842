#include "common/grpc_status.h"

#include <string>

#include "absl/strings/cord.h"

namespace tessera {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  std::optional<std::string> details = StatusDetails(status);
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()),
                      details.value_or(std::string()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status out(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  if (!status.error_details().empty()) out = WithStatusDetails(out, status.error_details());
  return out;
}

std::optional<std::string> StatusDetails(const absl::Status& status) {
  const auto payload = status.GetPayload(kStatusDetailsUrl);  // absl::optional here
  if (!payload) return std::nullopt;
  return std::string(*payload);
}

absl::Status WithStatusDetails(absl::Status status, const std::string& details) {
  status.SetPayload(kStatusDetailsUrl, absl::Cord(details));
  return status;
}

}  // namespace tessera
