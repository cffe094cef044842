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

}  // namespace
}  // namespace tessera
