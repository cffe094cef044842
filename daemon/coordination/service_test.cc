// The Coordination service over a real in-process gRPC server: what it refuses is counted by
// method and code and logged at most 20 lines per 10 s of each kind (daemon/refusals.h), and
// what it accepts reaches the handler.
#include "daemon/coordination/service.h"

#include <atomic>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/log_capture.h"
#include "daemon/refusals.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

constexpr char kToken[] = "coordination-test-token";

class CountingHandler final : public CoordinationHandler {
 public:
  absl::StatusOr<JobState> OnReport(const NodeIdentity&, const ProtectedReport& report) override {
    ++calls;
    JobState state;
    state.job_id = report.job_id;
    return state;
  }
  absl::Status OnPush(const NodeIdentity&, const JobState&) override {
    ++calls;
    return absl::OkStatus();
  }
  absl::StatusOr<ResolveAnswer> OnResolve(const NodeIdentity&, const ResolveQuestion&) override {
    ++calls;
    return absl::UnavailableError("not a majority");
  }
  absl::StatusOr<JobListing> OnListJob(const NodeIdentity&, const std::string&) override {
    ++calls;
    return absl::NotFoundError("no such job");
  }
  std::atomic<int> calls{0};
};

class CoordinationServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CoordinationService::Options options;
    options.token = kToken;
    options.is_fenced = [](const std::string& node_id, uint64_t) { return node_id == "old"; };
    service_ = std::make_unique<CoordinationService>(&handler_, options);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    address_ = absl::StrCat("127.0.0.1:", port);
  }
  void TearDown() override { server_->Shutdown(); }

  ProtectedReport Report() const {
    ProtectedReport report;
    report.job_id = "job";
    report.world_size = 2;
    report.rank = 1;
    report.step = 5;
    report.owner = "n1";
    return report;
  }

  CountingHandler handler_;
  std::unique_ptr<CoordinationService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

TEST_F(CoordinationServiceTest, RefusedCallsAreCountedByKindAndTheirLogLinesLimited) {
  LogCapture log("coordination-service");
  auto count = [](const char* method, absl::StatusCode code) {
    return RefusalCount("coordination", method, code);
  };
  const uint64_t unauthenticated = count("ReportProtected", absl::StatusCode::kUnauthenticated);
  const uint64_t fenced = count("PushJobState", absl::StatusCode::kFailedPrecondition);
  const uint64_t unavailable = count("ResolveRestore", absl::StatusCode::kUnavailable);

  GrpcCoordinationClient wrong_token({NodeIdentity{"n1", 7}, "not-the-token"});
  GrpcCoordinationClient old({NodeIdentity{"old", 7}, kToken});
  GrpcCoordinationClient n1({NodeIdentity{"n1", 7}, kToken});
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(wrong_token.Report(address_, Report()).status().code(),
              absl::StatusCode::kUnauthenticated);
    EXPECT_EQ(old.Push(PeerTarget(address_, "n2"), JobState{"job", 1, {}, {}}).code(),
              absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_EQ(handler_.calls.load(), 0) << "a refused call reached the handler";
  // The handler's own refusal is counted the same way.
  EXPECT_EQ(n1.Resolve(address_, ResolveQuestion{"job", 2, 1}).status().code(),
            absl::StatusCode::kUnavailable);
  // Accepted calls are not refusals.
  for (int i = 0; i < 2; ++i) {
    auto state = n1.Report(address_, Report());
    ASSERT_TRUE(state.ok()) << state.status();
    EXPECT_EQ(state->job_id, "job");
  }
  EXPECT_EQ(count("ReportProtected", absl::StatusCode::kUnauthenticated), unauthenticated + 50);
  EXPECT_EQ(count("PushJobState", absl::StatusCode::kFailedPrecondition), fenced + 50);
  EXPECT_EQ(count("ResolveRestore", absl::StatusCode::kUnavailable), unavailable + 1);
  EXPECT_EQ(count("ReportProtected", absl::StatusCode::kOk), 0u);
  for (const char* kind :
       {"ReportProtected: UNAUTHENTICATED", "PushJobState: FAILED_PRECONDITION"}) {
    EXPECT_GE(log.Count(kind), 1u) << kind;
    EXPECT_LE(log.Count(kind), 20u) << kind;
  }
  EXPECT_EQ(log.Count("ResolveRestore: UNAVAILABLE: not a majority"), 1u);
}

}  // namespace
}  // namespace tessera
