// Node identities in certificates: read from files as a daemon starts, and from a real mutual-TLS
// call on both ends (a test service answering Heartbeat over 127.0.0.1).
#include "daemon/transfer/node_identity.h"

#include <atomic>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/test_certificates.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "proto/peer.grpc.pb.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

TEST(NodeIdentityTest, ReadsTheNodeACertificateNames) {
  auto ca = TestCa::Create();
  ASSERT_TRUE(ca.ok()) << ca.status();
  auto node = (*ca)->IssueNode("n1");
  auto operator_files = (*ca)->Issue("operator", {});
  auto two = (*ca)->Issue("two", {"n1", "n2"});
  auto twice = (*ca)->Issue("twice", {"n3", "n3"});
  ASSERT_TRUE(node.ok() && operator_files.ok() && two.ok() && twice.ok());

  EXPECT_EQ(NodeIdOfCertificateFile(node->cert_file).value_or("?"), "n1");
  EXPECT_EQ(NodeIdOfCertificateFile(operator_files->cert_file).value_or("?"), "");
  EXPECT_EQ(NodeIdOfCertificateFile(twice->cert_file).value_or("?"), "n3");
  auto both = NodeIdOfCertificateFile(two->cert_file);
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(both.status().message()), HasSubstr("two nodes ('n1' and 'n2')"));
  EXPECT_EQ(NodeIdOfCertificateFile("/nonexistent/missing.crt").status().code(),
            absl::StatusCode::kInvalidArgument);

  EXPECT_TRUE(CheckCertificateNamesNode(node->cert_file, "n1").ok());
  absl::Status other = CheckCertificateNamesNode(node->cert_file, "n9");
  EXPECT_EQ(other.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(other.message()), HasSubstr("names node 'n1' (tessera-node:n1)"));
  EXPECT_THAT(std::string(other.message()), HasSubstr("node.id is 'n9'"));
  absl::Status none = CheckCertificateNamesNode(operator_files->cert_file, "n1");
  EXPECT_THAT(std::string(none.message()), HasSubstr("names no node"));
}

// Answers Heartbeat as `self`, after checking that the caller is the node its request names.
class CheckingService final : public peer::Peer::Service {
 public:
  explicit CheckingService(std::string self) : self_(std::move(self)) {}
  grpc::Status Heartbeat(grpc::ServerContext* context, const peer::HeartbeatRequest* request,
                         peer::HeartbeatResponse* response) override {
    ++calls;
    absl::Status status = CheckCallerIs(*context, request->node_id(), "Heartbeat node_id");
    if (status.ok()) {
      auto node = RequireNodeCaller(*context, "heartbeats");
      status = node.status();
    }
    if (!status.ok()) {
      return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                          std::string(status.message()));
    }
    response->set_node_id(self_);
    return grpc::Status::OK;
  }

  std::atomic<int> calls{0};  // that reached the service

 private:
  const std::string self_;
};

class MutualTlsCallTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ca = TestCa::Create();
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
    auto server_files = ca_->IssueNode("n2");
    ASSERT_TRUE(server_files.ok()) << server_files.status();
    server_ = Start(PeerServerCredentials(*server_files), "n2", &address_);
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override { server_->Shutdown(); }

  std::unique_ptr<grpc::Server> Start(std::shared_ptr<grpc::ServerCredentials> credentials,
                                      const std::string& self, std::string* address) {
    services_.push_back(std::make_unique<CheckingService>(self));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port);
    builder.RegisterService(services_.back().get());
    auto server = builder.BuildAndStart();
    *address = absl::StrCat("127.0.0.1:", port);
    return server;
  }

  // A heartbeat claiming `claimed`, over `credentials`; the answer's claim is checked against
  // the server's certificate.
  absl::Status Beat(const std::shared_ptr<grpc::ChannelCredentials>& credentials,
                    const std::string& address, const std::string& claimed,
                    const std::string& expected_server = "n2") {
    auto stub = peer::Peer::NewStub(grpc::CreateChannel(address, credentials));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    peer::HeartbeatRequest request;
    request.set_node_id(claimed);
    peer::HeartbeatResponse response;
    const grpc::Status status = stub->Heartbeat(&context, request, &response);
    if (!status.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                          status.error_message());
    }
    EXPECT_EQ(response.node_id(), expected_server);
    return CheckServerIs(context, response.node_id(), "the heartbeat's answer");
  }

  std::shared_ptr<grpc::ChannelCredentials> As(const std::vector<std::string>& node_ids,
                                               const std::string& name) {
    auto files = ca_->Issue(name, node_ids);
    EXPECT_TRUE(files.ok()) << files.status();
    return PeerChannelCredentials(*files);
  }

  std::unique_ptr<TestCa> ca_;
  std::vector<std::unique_ptr<CheckingService>> services_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

TEST_F(MutualTlsCallTest, ACallerSpeaksOnlyForTheNodeItsCertificateNames) {
  EXPECT_TRUE(Beat(As({"n1"}, "n1"), address_, "n1").ok());
  // Twice: the check holds on a channel already open.
  auto n9 = As({"n9"}, "n9");
  for (int i = 0; i < 2; ++i) {
    absl::Status refused = Beat(n9, address_, "n1");
    EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
    EXPECT_THAT(std::string(refused.message()), HasSubstr("claims node 'n1'"));
    EXPECT_THAT(std::string(refused.message()), HasSubstr("of node 'n9'"));
  }
  EXPECT_TRUE(Beat(n9, address_, "n9").ok());
  absl::Status operator_call = Beat(As({}, "operator"), address_, "n1");
  EXPECT_EQ(operator_call.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(operator_call.message()), HasSubstr("(CN=operator) that names no node"));
  absl::Status empty_claim = Beat(As({}, "operator2"), address_, "");
  EXPECT_EQ(empty_claim.code(), absl::StatusCode::kPermissionDenied) << empty_claim;
  EXPECT_THAT(std::string(empty_claim.message()), HasSubstr("are for daemons"));
  absl::Status ambiguous = Beat(As({"n1", "n9"}, "both"), address_, "n1");
  EXPECT_EQ(ambiguous.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(ambiguous.message()), HasSubstr("two nodes"));
}

TEST_F(MutualTlsCallTest, AnAnswerMustComeFromTheNodeItNames) {
  // A server whose certificate names n3 but which answers as n2.
  auto files = ca_->IssueNode("n3");
  ASSERT_TRUE(files.ok());
  std::string address;
  auto liar = Start(PeerServerCredentials(*files), "n2", &address);
  ASSERT_NE(liar, nullptr);
  absl::Status refused = Beat(As({"n1"}, "n1"), address, "n1");
  EXPECT_EQ(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  EXPECT_THAT(std::string(refused.message()),
              HasSubstr("says it comes from node 'n2', but the answering daemon presented a "
                        "certificate (CN=n3) of node 'n3'"));
  liar->Shutdown();
}

// The other way round: a call to node n3 made where n2 answers is refused in the TLS handshake,
// before the call (its token, its request) is sent, and counted; the same client reaches n2 as
// n2, or as any node. A server whose certificate names no node (an operator's) answers no
// daemon's call at all.
TEST_F(MutualTlsCallTest, ACallToANodeReachesOnlyTheDaemonWhoseCertificateNamesIt) {
  auto files = ca_->IssueNode("n1");
  ASSERT_TRUE(files.ok()) << files.status();
  std::shared_ptr<ClusterCredentials> n1 = ClusterCredentials::Tls(*files);
  EXPECT_TRUE(Beat(n1->For("n2"), address_, "n1").ok());
  EXPECT_TRUE(Beat(n1->For(""), address_, "n1").ok());
  EXPECT_EQ(n1->For("n2"), n1->For("n2"));  // one per node: connections shared per node only
  EXPECT_NE(n1->For("n2"), n1->For("n3"));
  const int reached = services_[0]->calls.load();
  for (int i = 0; i < 2; ++i) {
    absl::Status wrong = Beat(n1->For("n3"), address_, "n1");
    EXPECT_EQ(wrong.code(), absl::StatusCode::kUnavailable) << wrong;
    EXPECT_THAT(std::string(wrong.message()),
                HasSubstr("(CN=n2) that names node 'n2', but node 'n3' was called"));
  }
  EXPECT_EQ(services_[0]->calls.load(), reached) << "a call meant for n3 reached n2's service";
  EXPECT_GE(n1->stats().servers_refused, 1u);
  EXPECT_TRUE(Beat(n1->For("n2"), address_, "n1").ok());

  auto operator_files = ca_->Issue("operator-server", {});
  ASSERT_TRUE(operator_files.ok()) << operator_files.status();
  std::string address;
  auto server = Start(PeerServerCredentials(*operator_files), "n2", &address);
  ASSERT_NE(server, nullptr);
  const uint64_t refused = n1->stats().servers_refused;
  EXPECT_EQ(Beat(n1->For(""), address, "n1").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Beat(n1->For("n2"), address, "n1").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(services_.back()->calls.load(), 0);
  EXPECT_GE(n1->stats().servers_refused, refused + 2);
  // Credentials made alone (the CLI's) check the same.
  EXPECT_EQ(Beat(PeerChannelCredentials(*files, "n3"), address_, "n1").code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(Beat(PeerChannelCredentials(*files, "n2"), address_, "n1").ok());
  server->Shutdown();
}

TEST_F(MutualTlsCallTest, WithoutTlsThereIsNoIdentityToCheck) {
  std::string address;
  auto plain = Start(grpc::InsecureServerCredentials(), "n2", &address);
  ASSERT_NE(plain, nullptr);
  EXPECT_TRUE(Beat(grpc::InsecureChannelCredentials(), address, "anyone").ok());
  plain->Shutdown();
}

}  // namespace
}  // namespace tessera
