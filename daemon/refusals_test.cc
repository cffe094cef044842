#include "daemon/refusals.h"

#include <string>

#include "absl/status/status.h"
#include "daemon/metrics/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

// A client repeating a refused request: every refusal is counted, one line per 10 s is logged
// (checked through the count of each kind, since the log is spdlog's).
TEST(RefusalsTest, EveryRefusalIsCountedByKind) {
  int64_t now = 1'000'000'000;
  SetRefusalClockForTesting([&] { return now; });
  for (int i = 0; i < 1000; ++i) {
    RecordRefusal("agent", "PrepareRestore", absl::PermissionDeniedError("not yours"));
    now += 1'000'000;  // 1 ms apart: 1 s in all
  }
  RecordRefusal("agent", "PrepareRestore", absl::NotFoundError("no such step"));
  RecordRefusal("admin", "Corrupt", absl::PermissionDeniedError("not root"));
  const std::string page = GlobalMetrics().Render();
  EXPECT_THAT(page, ::testing::HasSubstr(
                        "tessera_rpc_refusals_total{service=\"agent\",method=\"PrepareRestore\","
                        "code=\"PERMISSION_DENIED\"} 1000"));
  EXPECT_THAT(page, ::testing::HasSubstr(
                        "tessera_rpc_refusals_total{service=\"agent\",method=\"PrepareRestore\","
                        "code=\"NOT_FOUND\"} 1"));
  EXPECT_THAT(page, ::testing::HasSubstr(
                        "tessera_rpc_refusals_total{service=\"admin\",method=\"Corrupt\","
                        "code=\"PERMISSION_DENIED\"} 1"));
  SetRefusalClockForTesting(nullptr);
}

}  // namespace
}  // namespace tessera
