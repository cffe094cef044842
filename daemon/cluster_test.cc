// Cluster liveness over FakePeerClient: joins, suspicion of a peer that stops answering, return,
// and restarts as new incarnations.
#include "daemon/cluster.h"

#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using Ids = std::vector<std::string>;

// Polls `done` for up to 5 s.
template <typename F>
bool Eventually(F done) {
  for (int i = 0; i < 500; ++i) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return done();
}

class ClusterTest : public ::testing::Test {
 protected:
  void AddPeer(const std::string& id, const std::string& address, uint64_t incarnation) {
    FakePeerClient::Peer peer;
    peer.self = MemberInfo{id, incarnation, address};
    client_.AddPeer(address, peer);
  }
  std::unique_ptr<Cluster> MakeCluster() {
    Cluster::Options options;
    options.self_id = "a";
    options.self_address = "a:1";
    options.incarnation = 100;
    options.members = {"a:1", "b:1", "c:1"};
    options.heartbeat_ms = 10;
    options.timeout_ms = 200;
    return std::make_unique<Cluster>(options, &client_);
  }
  FakePeerClient client_{FakePeerClient::Options{absl::Milliseconds(50)}};
};

TEST_F(ClusterTest, MembersJoinAreSuspectedWhenSilentAndComeBack) {
  AddPeer("b", "b:1", 1);
  AddPeer("c", "c:1", 1);
  auto cluster = MakeCluster();
  EXPECT_EQ(cluster->LiveNodeIds(), Ids{"a"});  // nobody heard yet
  cluster->Start();
  ASSERT_TRUE(Eventually([&] { return cluster->LiveNodeIds() == Ids({"a", "b", "c"}); }));
  EXPECT_EQ(cluster->AddressOf("c"), "c:1");
  EXPECT_EQ(cluster->AddressOf("a"), "a:1");

  client_.Pause("c:1");  // a SIGSTOPped daemon
  ASSERT_TRUE(Eventually([&] { return cluster->LiveNodeIds() == Ids({"a", "b"}); }));
  EXPECT_EQ(cluster->AddressOf("c"), std::nullopt);
  // b keeps answering although c does not: one silent peer does not delay the others.
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(cluster->LiveNodeIds(), Ids({"a", "b"}));

  client_.Resume("c:1");
  ASSERT_TRUE(Eventually([&] { return cluster->LiveNodeIds() == Ids({"a", "b", "c"}); }));
  cluster->Stop();
  cluster->Stop();  // idempotent
}

TEST_F(ClusterTest, ReceivedHeartbeatsCountAndRestartsAreNewIncarnations) {
  auto cluster = MakeCluster();
  HeartbeatMessage message;
  message.from = MemberInfo{"d", 7, "d:1"};
  std::vector<MemberInfo> reply = cluster->OnHeartbeat(message);
  ASSERT_EQ(reply.size(), 2u);
  EXPECT_EQ(reply[0].node_id, "a");
  EXPECT_EQ(reply[0].incarnation, 100u);
  EXPECT_EQ(cluster->LiveNodeIds(), Ids({"a", "d"}));
  message.from.incarnation = 8;  // d restarted
  cluster->OnHeartbeat(message);
  reply = cluster->OnHeartbeat(message);
  EXPECT_EQ(reply[1].incarnation, 8u);
  // Its own address in a heartbeat is ignored.
  message.from = MemberInfo{"a", 100, "a:1"};
  EXPECT_EQ(cluster->OnHeartbeat(message).size(), 2u);
}

}  // namespace
}  // namespace tessera
