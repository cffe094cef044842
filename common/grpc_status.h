// The one place where absl::Status and grpc::Status convert into each other. Codes map one to
// one (both use the canonical codes); messages pass through unchanged. A status's payload under
// kStatusDetailsUrl (bytes that back the error, such as the proof behind a membership refusal)
// travels as the grpc::Status's error_details and back; other payloads are not carried.
#ifndef TESSERA_COMMON_GRPC_STATUS_H_
#define TESSERA_COMMON_GRPC_STATUS_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace tessera {

inline constexpr const char* kStatusDetailsUrl = "type.tessera/status-details";

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// The bytes a status carries under kStatusDetailsUrl, if any.
std::optional<std::string> StatusDetails(const absl::Status& status);
// `status` (not OK) carrying `details` under kStatusDetailsUrl.
absl::Status WithStatusDetails(absl::Status status, const std::string& details);

}  // namespace tessera

#endif  // TESSERA_COMMON_GRPC_STATUS_H_
