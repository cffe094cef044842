#include "daemon/membership.h"

#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(MembershipTest, LearnsSuspectsAndSeesRestarts) {
  Membership m("n0", "10.0.0.1:7070", 111, /*timeout_ms=*/1000);
  m.SetAddresses({"10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"});
  EXPECT_EQ(m.Addresses().size(), 2u) << "its own address is not a peer";
  EXPECT_EQ(m.LiveNodeIds(), std::vector<std::string>{"n0"});
  EXPECT_TRUE(m.Heard("10.0.0.2:7070", "n1", 5, 0).has_value());
  EXPECT_TRUE(m.Heard("10.0.0.3:7070", "n2", 6, 0).has_value());
  EXPECT_FALSE(m.Heard("10.0.0.3:7070", "n2", 6, 100).has_value());
  EXPECT_EQ(m.LiveNodeIds(), (std::vector<std::string>{"n0", "n1", "n2"}));
  EXPECT_TRUE(m.Tick(900).empty());
  m.Heard("10.0.0.2:7070", "n1", 5, 900);
  EXPECT_EQ(m.Tick(1500), std::vector<std::string>{"n2"});
  EXPECT_EQ(m.LiveNodeIds(), (std::vector<std::string>{"n0", "n1"}));
  EXPECT_TRUE(m.Tick(1600).empty()) << "suspected once";
  auto restarted = m.Heard("10.0.0.3:7070", "n2", 7, 1700);
  ASSERT_TRUE(restarted.has_value());
  EXPECT_NE(restarted->find("restarted: incarnation 6 -> 7"), std::string::npos) << *restarted;
  m.Tick(1700);
  EXPECT_EQ(m.LiveNodeIds(), (std::vector<std::string>{"n0", "n1", "n2"}));
  EXPECT_EQ(m.AddressOf("n2"), "10.0.0.3:7070");
  EXPECT_EQ(m.AddressOf("n0"), "10.0.0.1:7070");
  EXPECT_FALSE(m.AddressOf("n9").has_value());
}

TEST(MembershipTest, DeclaredLostStaysLostUntilANewIncarnation) {
  Membership m("n0", "a:1", 1, 1000);
  m.SetAddresses({"b:1"});
  m.Heard("b:1", "n1", 5, 0);
  m.Tick(0);
  ASSERT_TRUE(m.DeclareLost("n1").ok());
  EXPECT_EQ(m.DeclareLost("nX").code(), absl::StatusCode::kNotFound);
  m.Heard("b:1", "n1", 5, 10);
  m.Tick(10);
  EXPECT_EQ(m.LiveNodeIds(), std::vector<std::string>{"n0"});
  m.Heard("b:1", "n1", 6, 20);
  m.Tick(20);
  EXPECT_EQ(m.LiveNodeIds(), (std::vector<std::string>{"n0", "n1"}));
}

TEST(MembershipTest, SetAddressesKeepsKnownState) {
  Membership m("n0", "a:1", 1, 1000);
  m.SetAddresses({"b:1", "c:1"});
  m.Heard("b:1", "n1", 5, 0);
  m.SetAddresses({"b:1", "d:1"});  // c went away from DNS, d appeared
  m.Tick(10);
  EXPECT_EQ(m.LiveNodeIds(), (std::vector<std::string>{"n0", "n1"}));
  EXPECT_EQ(m.Addresses(), (std::vector<std::string>{"b:1", "d:1"}));
}

TEST(ResolveMembersTest, ResolvesLocalhostAndRejectsGarbage) {
  auto r = ResolveMembers("localhost", 7070);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(r->empty());
  bool loopback = false;
  for (const auto& a : *r) loopback |= a == "127.0.0.1:7070" || a == "[::1]:7070";
  EXPECT_TRUE(loopback);
  EXPECT_EQ(ResolveMembers("no-such-host.invalid", 1).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace tessera
