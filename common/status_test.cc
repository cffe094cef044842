#include "common/status.h"

#include <cerrno>

#include "gtest/gtest.h"

namespace tessera {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::Status QuarterInto(int x, int* out) {
  TESSERA_ASSIGN_OR_RETURN(int half, Half(x));
  TESSERA_ASSIGN_OR_RETURN(*out, Half(half));
  return absl::OkStatus();
}

absl::Status FailIfNegative(int x) {
  TESSERA_RETURN_IF_ERROR(x < 0 ? absl::OutOfRangeError("negative") : absl::OkStatus());
  return absl::OkStatus();
}

TEST(StatusTest, AssignOrReturnPropagatesFirstError) {
  int out = -1;
  EXPECT_TRUE(QuarterInto(12, &out).ok());
  EXPECT_EQ(out, 3);
  absl::Status s = QuarterInto(6, &out);  // 6 -> 3 -> odd
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out, 3);
}

TEST(StatusTest, ReturnIfError) {
  EXPECT_TRUE(FailIfNegative(1).ok());
  EXPECT_EQ(FailIfNegative(-1).code(), absl::StatusCode::kOutOfRange);
}

TEST(StatusTest, ErrnoStatusMapsCodes) {
  EXPECT_EQ(ErrnoStatus(ENOSPC, "fallocate").code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrnoStatus(ENOENT, "open").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoStatus(EEXIST, "open").code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(ErrnoStatus(ENOENT, "open /x").message().find("open /x"), absl::string_view::npos);
  EXPECT_EQ(Annotate(absl::DataLossError("crc"), "slot 1").message(), "slot 1: crc");
}

}  // namespace
}  // namespace tessera
