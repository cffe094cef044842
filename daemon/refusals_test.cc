#include "daemon/refusals.h"

#include <string>

#include "absl/status/status.h"
#include "common/log_capture.h"
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

// A peer (or a coordinator) repeating a refused call: every one is counted; each kind logs at most
// 20 lines per 10 s, and the first line of the next window says how many went unlogged. Kinds
// do not share their allowance.
TEST(RefusalsTest, PeerAndCoordinationRefusalsAreRateLimitedPerKind) {
  int64_t now = 5'000'000'000'000;
  SetRefusalClockForTesting([&] { return now; });
  LogCapture peer_log("peer-service");
  LogCapture coordination_log("coordination-service");
  const absl::Status fenced = absl::FailedPreconditionError("node 'n4' incarnation 1 is fenced");
  for (int i = 0; i < 500; ++i) {
    RecordRefusal("peer", "PutFragment", fenced);
    if (i % 5 == 0) {
      RecordRefusal("coordination", "ReportProtected",
                    absl::PermissionDeniedError("from claims node 'n1'"));
    }
    now += 10'000'000;  // 10 ms apart: 5 s in all, one window
  }
  EXPECT_EQ(RefusalCount("peer", "PutFragment", absl::StatusCode::kFailedPrecondition), 500u);
  EXPECT_EQ(RefusalCount("coordination", "ReportProtected", absl::StatusCode::kPermissionDenied),
            100u);
  EXPECT_EQ(peer_log.Count("PutFragment: FAILED_PRECONDITION"), 20u);
  EXPECT_EQ(coordination_log.Count("ReportProtected: PERMISSION_DENIED"), 20u);
  // The next window: one more line, saying how many were not logged.
  now += 10'000'000'000;
  RecordRefusal("peer", "PutFragment", fenced);
  EXPECT_EQ(peer_log.Count("PutFragment: FAILED_PRECONDITION"), 21u);
  EXPECT_EQ(peer_log.Count("(and 480 more PutFragment FAILED_PRECONDITION since the last such "
                           "line)"),
            1u)
      << peer_log.Lines().back();
  const std::string page = GlobalMetrics().Render();
  EXPECT_THAT(page, ::testing::HasSubstr(
                        "tessera_rpc_refusals_total{service=\"peer\",method=\"PutFragment\","
                        "code=\"FAILED_PRECONDITION\"} 501"));
  SetRefusalClockForTesting(nullptr);
}

}  // namespace
}  // namespace tessera
