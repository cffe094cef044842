#include "common/grpc_status.h"

#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(GrpcStatusTest, RoundTripsEveryCanonicalCode) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status original(static_cast<absl::StatusCode>(code), code == 0 ? "" : "what went wrong");
    grpc::Status wire = ToGrpcStatus(original);
    EXPECT_EQ(static_cast<int>(wire.error_code()), code);
    absl::Status back = FromGrpcStatus(wire);
    EXPECT_EQ(back, original) << code;
  }
  EXPECT_EQ(ToGrpcStatus(absl::DataLossError("crc")).error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(ToGrpcStatus(absl::DataLossError("crc")).error_message(), "crc");
}

TEST(GrpcStatusTest, DetailsTravelAsErrorDetails) {
  const std::string details("proof\0bytes\xff", 12);
  absl::Status original = WithStatusDetails(absl::FailedPreconditionError("fenced"), details);
  EXPECT_EQ(StatusDetails(original), details);
  grpc::Status wire = ToGrpcStatus(original);
  EXPECT_EQ(wire.error_details(), details);
  absl::Status back = FromGrpcStatus(wire);
  EXPECT_EQ(back.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(back.message(), "fenced");
  EXPECT_EQ(StatusDetails(back), details);
  EXPECT_EQ(StatusDetails(absl::FailedPreconditionError("fenced")), std::nullopt);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("fenced")).error_details(), "");
}

}  // namespace
}  // namespace tessera
