#include "daemon/membership/udp_heartbeats.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "daemon/transfer/test_certificates.h"
#include "gtest/gtest.h"
#include "proto/peer.pb.h"
#include "tests/ports.h"

namespace tessera {
namespace {

uint64_t Seed() {
  static const uint64_t seed = [] {
    const uint64_t s = std::random_device{}();
    std::printf("udp_heartbeats_test seed %llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

std::string RandomString(std::mt19937_64& rng, size_t size) {
  std::string s(size, '\0');
  for (char& c : s) c = static_cast<char>('a' + rng() % 26);
  return s;
}

std::vector<SwimUpdate> RandomUpdates(std::mt19937_64& rng, size_t count) {
  std::vector<SwimUpdate> updates(count);
  for (SwimUpdate& u : updates) {
    u.state = static_cast<SwimState>(rng() % 3);
    u.node_id = RandomString(rng, 1 + rng() % 20);
    u.incarnation = rng() | 1;
    u.version = rng() % 1000;
    u.address = absl::StrCat("10.", rng() % 256, ".", rng() % 256, ".1:", 1 + rng() % 65535);
  }
  return updates;
}

void ExpectSameUpdates(const std::vector<SwimUpdate>& a, const std::vector<SwimUpdate>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].state, b[i].state) << i;
    EXPECT_EQ(a[i].node_id, b[i].node_id) << i;
    EXPECT_EQ(a[i].incarnation, b[i].incarnation) << i;
    EXPECT_EQ(a[i].version, b[i].version) << i;
    EXPECT_EQ(a[i].address, b[i].address) << i;
  }
}

// An endpoint on a reserved loopback port whose handler records what it was asked and answers
// `reply` (or `refuse`, when set).
struct Endpoint {
  explicit Endpoint(const std::string& token, absl::Duration timeout = absl::Seconds(2),
                    std::shared_ptr<DatagramSigner> signer = nullptr) {
    address = absl::StrCat("127.0.0.1:", testing::FreePort());
    UdpHeartbeats::Options options;
    options.listen_address = address;
    options.token = token;
    options.signer = std::move(signer);
    // Each endpoint a process of its own: an incarnation of its own.
    static std::atomic<uint64_t> next_incarnation{1000};
    options.incarnation = next_incarnation.fetch_add(1);
    options.timeout = timeout;
    options.on_request = [this](const HeartbeatMessage& m) -> absl::StatusOr<HeartbeatReply> {
      absl::MutexLock lock(&mu);
      received.push_back(m);
      if (!refuse.ok()) return refuse;
      return reply;
    };
    auto started = UdpHeartbeats::Start(std::move(options));
    EXPECT_TRUE(started.ok()) << started.status();
    if (started.ok()) udp = *std::move(started);
  }
  std::string address;
  absl::Mutex mu;
  std::vector<HeartbeatMessage> received;
  HeartbeatReply reply;
  absl::Status refuse;
  std::unique_ptr<UdpHeartbeats> udp;
};

HeartbeatMessage RandomMessage(std::mt19937_64& rng, size_t updates) {
  HeartbeatMessage m;
  m.from = MemberInfo{RandomString(rng, 8), rng() | 1, "127.0.0.1:1234"};
  m.kind = HeartbeatMessage::Kind::kPingReq;
  m.seq = rng();
  m.version = rng() % 100;
  m.probe_seq = rng();
  m.target = MemberInfo{RandomString(rng, 6), rng() | 1, "127.0.0.2:99"};
  m.known_members = static_cast<uint32_t>(rng() % 10000);
  m.sent_unix_ms = rng() % (uint64_t{1} << 42);
  m.updates = RandomUpdates(rng, updates);
  return m;
}

TEST(UdpHeartbeatsTest, ARequestAndItsReplyArriveBitExact) {
  std::mt19937_64 rng(Seed());
  Endpoint a("secret-token"), b("secret-token");
  ASSERT_TRUE(a.udp && b.udp);
  b.reply.peer = MemberInfo{"b", rng() | 1, ""};
  b.reply.version = rng() % 100;
  b.reply.known_members = 7;
  b.reply.updates = RandomUpdates(rng, 9);
  for (int i = 0; i < 20; ++i) {
    const HeartbeatMessage sent = RandomMessage(rng, rng() % 12);
    absl::StatusOr<HeartbeatReply> got = a.udp->Heartbeat(b.address, sent);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->peer.node_id, "b");
    EXPECT_EQ(got->peer.incarnation, b.reply.peer.incarnation);
    EXPECT_EQ(got->peer.address, b.address);  // the address the request went to
    EXPECT_EQ(got->version, b.reply.version);
    EXPECT_EQ(got->known_members, 7u);
    ExpectSameUpdates(got->updates, b.reply.updates);
    absl::MutexLock lock(&b.mu);
    ASSERT_EQ(b.received.size(), static_cast<size_t>(i + 1));
    const HeartbeatMessage& r = b.received.back();
    EXPECT_EQ(r.from.node_id, sent.from.node_id);
    EXPECT_EQ(r.from.incarnation, sent.from.incarnation);
    EXPECT_EQ(r.from.address, sent.from.address);
    EXPECT_EQ(r.kind, sent.kind);
    EXPECT_EQ(r.seq, sent.seq);
    EXPECT_EQ(r.version, sent.version);
    EXPECT_EQ(r.probe_seq, sent.probe_seq);
    EXPECT_EQ(r.target.node_id, sent.target.node_id);
    EXPECT_EQ(r.target.incarnation, sent.target.incarnation);
    EXPECT_EQ(r.known_members, sent.known_members);
    EXPECT_EQ(r.sent_unix_ms, sent.sent_unix_ms);
    ExpectSameUpdates(r.updates, sent.updates);
  }
  EXPECT_EQ(a.udp->stats().replies_received, 20u);
  EXPECT_EQ(b.udp->stats().requests_received, 20u);
}

TEST(UdpHeartbeatsTest, ARefusalCarriesTheHandlersCodeAndMessage) {
  std::mt19937_64 rng(Seed() + 1);
  Endpoint a(""), b("");
  ASSERT_TRUE(a.udp && b.udp);
  b.refuse = absl::FailedPreconditionError("incarnation 5 of node x is fenced");
  absl::StatusOr<HeartbeatReply> got = a.udp->Heartbeat(b.address, RandomMessage(rng, 2));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kFailedPrecondition) << got.status();
  EXPECT_EQ(got.status().message(), "incarnation 5 of node x is fenced");
}

TEST(UdpHeartbeatsTest, AnotherTokenIsNotAnsweredAndIsCounted) {
  std::mt19937_64 rng(Seed() + 2);
  Endpoint a("wrong-token", absl::Milliseconds(300)), b("right-token");
  Endpoint c("", absl::Milliseconds(300));  // no token at all: no MAC
  ASSERT_TRUE(a.udp && b.udp && c.udp);
  EXPECT_EQ(a.udp->Heartbeat(b.address, RandomMessage(rng, 3)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(c.udp->Heartbeat(b.address, RandomMessage(rng, 3)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(b.udp->stats().dropped_unauthenticated, 2u);
  EXPECT_EQ(b.udp->stats().requests_received, 0u);
  absl::MutexLock lock(&b.mu);
  EXPECT_TRUE(b.received.empty());
}

TEST(UdpHeartbeatsTest, TheMacCoversEveryByte) {
  std::mt19937_64 rng(Seed() + 3);
  const std::string body = RandomString(rng, 1 + rng() % 500);
  absl::StatusOr<std::string> d = UdpHeartbeats::Encode(1, rng(), body, "k");
  ASSERT_TRUE(d.ok()) << d.status();
  auto decode = [](const std::string& s, const std::string& token) {
    return UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(s.data()), s.size(), token);
  };
  ASSERT_TRUE(decode(*d, "k").ok());
  EXPECT_EQ(decode(*d, "k")->body, body);
  for (size_t i = 0; i < d->size(); ++i) {
    std::string flipped = *d;
    flipped[i] = static_cast<char>(flipped[i] ^ (1 + rng() % 255));
    const absl::Status s = decode(flipped, "k").status();
    EXPECT_FALSE(s.ok()) << "a flipped byte " << i << " was accepted";
  }
  EXPECT_EQ(decode(*d, "other").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(decode(d->substr(0, 40), "k").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UdpHeartbeats::Encode(1, 1, std::string(UdpHeartbeats::kMaxDatagramBytes, 'x'), "k")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(UdpHeartbeatsTest, HostileDatagramsAreDroppedAndTheEndpointStillAnswers) {
  std::mt19937_64 rng(Seed() + 4);
  Endpoint a("t"), b("t");
  ASSERT_TRUE(a.udp && b.udp);
  const int fd = socket(AF_INET, SOCK_DGRAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  to.sin_port = htons(static_cast<uint16_t>(b.udp->port()));
  auto send = [&](const std::string& bytes) {
    ASSERT_EQ(sendto(fd, bytes.data(), bytes.size(), 0, reinterpret_cast<sockaddr*>(&to),
                     sizeof(to)),
              static_cast<ssize_t>(bytes.size()));
  };
  send(RandomString(rng, 3));
  send(RandomString(rng, 200));
  send(std::string(UdpHeartbeats::kMaxDatagramBytes + 100, 'x'));  // oversized
  // Well-formed and signed, but not a protobuf request; and a reply nobody waits for.
  send(*UdpHeartbeats::Encode(1, rng(), std::string("\xff\xff\xff\xff", 4), "t"));
  send(*UdpHeartbeats::Encode(2, rng(), "", "t"));
  send(*UdpHeartbeats::Encode(9, rng(), "", "t"));  // unknown type
  close(fd);
  absl::StatusOr<HeartbeatReply> got = a.udp->Heartbeat(b.address, RandomMessage(rng, 1));
  EXPECT_TRUE(got.ok()) << got.status();
  const UdpHeartbeats::Stats s = b.udp->stats();
  EXPECT_EQ(s.dropped_malformed, 5u);
  EXPECT_EQ(s.dropped_unexpected, 1u);
  EXPECT_EQ(s.requests_received, 1u);
}

TEST(UdpHeartbeatsTest, NoListenerFailsAtOnceAndTooLargeAMessageIsNotSent) {
  std::mt19937_64 rng(Seed() + 5);
  // A long timeout: the ICMP port unreachable from the host ends the call long before it.
  Endpoint a("", absl::Seconds(20));
  ASSERT_TRUE(a.udp);
  const std::string nobody = absl::StrCat("127.0.0.1:", testing::FreePort());
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    const absl::Status s = a.udp->Heartbeat(nobody, RandomMessage(rng, 1)).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_NE(s.message().find("port unreachable"), std::string::npos) << s;
    EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "the call waited for its timeout";
  }
  EXPECT_EQ(a.udp->stats().unreachable, 3u);
  EXPECT_EQ(a.udp->stats().timeouts, 0u);
  // The error about one peer does not fail a call to another.
  Endpoint b("");
  ASSERT_TRUE(b.udp);
  EXPECT_TRUE(a.udp->Heartbeat(b.address, RandomMessage(rng, 1)).ok());
  EXPECT_EQ(a.udp->Heartbeat(nobody, RandomMessage(rng, 3000)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.udp->Heartbeat("no-port-here", RandomMessage(rng, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(UdpHeartbeatsTest, APortInUseIsAClearError) {
  Endpoint a("");
  ASSERT_TRUE(a.udp);
  UdpHeartbeats::Options options;
  options.listen_address = a.address;
  options.on_request = [](const HeartbeatMessage&) { return HeartbeatReply{}; };
  absl::StatusOr<std::unique_ptr<UdpHeartbeats>> second = UdpHeartbeats::Start(options);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find("is the UDP port in use?"), std::string::npos)
      << second.status();
  EXPECT_NE(second.status().message().find(a.address), std::string::npos) << second.status();
}

// With mutual TLS: datagrams are signed, a receiver learns the sender's node from its
// certificate, and a message naming another node is dropped, both ways.
class SignedHeartbeatsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ca = TestCa::Create();
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
  }
  std::shared_ptr<DatagramSigner> SignerFor(const std::string& node) {
    auto files = ca_->IssueNode(node);
    EXPECT_TRUE(files.ok()) << files.status();
    auto signer = DatagramSigner::Create(*files);
    EXPECT_TRUE(signer.ok()) << signer.status();
    return std::move(*signer);
  }
  std::unique_ptr<TestCa> ca_;
};

HeartbeatMessage From(const std::string& node) {
  HeartbeatMessage m;
  m.from = MemberInfo{node, 42, "127.0.0.1:1"};
  return m;
}

TEST_F(SignedHeartbeatsTest, EachSideLearnsTheOthersNodeFromItsCertificate) {
  Endpoint a("token-0123456789abcdef", absl::Seconds(2), SignerFor("n1"));
  Endpoint b("token-0123456789abcdef", absl::Seconds(2), SignerFor("n2"));
  ASSERT_TRUE(a.udp && b.udp);
  b.reply.peer = MemberInfo{"n2", 7, ""};
  for (int i = 0; i < 3; ++i) {
    auto got = a.udp->Heartbeat(b.address, From("n1"));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->peer.node_id, "n2");
  }
  absl::MutexLock lock(&b.mu);
  ASSERT_EQ(b.received.size(), 3u);
  EXPECT_EQ(b.received[0].from.node_id, "n1");
}

TEST_F(SignedHeartbeatsTest, ANodeSpeakingForAnotherIsDroppedBothWays) {
  // n9's certificate, claiming n1: not answered, counted.
  Endpoint impostor("", absl::Milliseconds(300), SignerFor("n9"));
  Endpoint b("", absl::Milliseconds(300), SignerFor("n2"));
  ASSERT_TRUE(impostor.udp && b.udp);
  b.reply.peer = MemberInfo{"n2", 7, ""};
  EXPECT_EQ(impostor.udp->Heartbeat(b.address, From("n1")).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(b.udp->stats().dropped_unauthenticated, 1u);
  EXPECT_EQ(b.udp->stats().requests_received, 0u);
  {
    absl::MutexLock lock(&b.mu);
    EXPECT_TRUE(b.received.empty());
  }
  // Speaking for itself, it is heard.
  EXPECT_TRUE(impostor.udp->Heartbeat(b.address, From("n9")).ok());
  // An answer naming another node than the answering certificate: dropped by the asker.
  Endpoint liar("", absl::Milliseconds(300), SignerFor("n3"));
  ASSERT_TRUE(liar.udp);
  liar.reply.peer = MemberInfo{"n2", 7, ""};
  EXPECT_EQ(b.udp->Heartbeat(liar.address, From("n2")).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(b.udp->stats().dropped_unauthenticated, 2u);
}

// A socket bound to `host` (a loopback address), or -1 when it cannot be.
int BoundSocket(const std::string& host) {
  const int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in local{};
  local.sin_family = AF_INET;
  if (fd < 0 || inet_pton(AF_INET, host.c_str(), &local.sin_addr) != 1 ||
      bind(fd, reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

// A flood of forged datagrams (a real node's certificate chain, a signature that does not verify)
// costs a bounded number of signature checks, from one source and from many, while a member
// keeps being answered; the rest are dropped unchecked and counted. Forged datagrams that claim
// another node than their (known) certificate cost no signature check at all.
TEST_F(SignedHeartbeatsTest, AFloodOfForgedDatagramsCostsBoundedChecksAndMembersGetThrough) {
  std::shared_ptr<DatagramSigner> b_signer = SignerFor("n2");
  Endpoint a("", absl::Seconds(2), SignerFor("n1"));
  Endpoint b("", absl::Seconds(2), b_signer);
  ASSERT_TRUE(a.udp && b.udp);
  b.reply.peer = MemberInfo{"n2", 7, ""};
  ASSERT_TRUE(a.udp->Heartbeat(b.address, From("n1")).ok());  // n1 is a member b has heard

  std::shared_ptr<DatagramSigner> n9 = SignerFor("n9");
  auto forged = [&](const std::string& claimed, uint64_t id) {
    peer::HeartbeatRequest request;
    request.set_node_id(claimed);
    request.set_incarnation(5);
    auto datagram = UdpHeartbeats::Encode(1, id, request.SerializeAsString(), "", n9.get(), 5);
    EXPECT_TRUE(datagram.ok()) << datagram.status();
    std::string bytes = *datagram;
    bytes[bytes.size() - UdpHeartbeats::kMacBytes - 1] ^= 0x01;  // the signature's last byte
    return bytes;
  };
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  to.sin_port = htons(b.udp->port());
  // n1's heartbeat is answered, at the latest on its third try. A flood that outruns b's receive
  // buffer (the kernel's, 208 KiB by default) makes the kernel drop datagrams before b reads them,
  // a member's among them, whatever b does; membership probes again, as this does. What the
  // throttle must keep is that a member that tries gets through.
  int retries = 0;
  auto member_gets_through = [&](const std::string& when) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (a.udp->Heartbeat(b.address, From("n1")).ok()) return;
      ++retries;
    }
    ADD_FAILURE() << "n1's heartbeat was not answered in 3 tries " << when;
  };
  // Sends `count` forged datagrams from the sockets in turn, n1's heartbeat answered every 200;
  // returns how long it took, until b had read them all.
  auto flood = [&](const std::vector<int>& fds, int count, const std::string& claimed) {
    const absl::Time start = absl::Now();
    for (int i = 0; i < count; ++i) {
      const std::string bytes = forged(claimed, static_cast<uint64_t>(i) + 1000);
      sendto(fds[i % fds.size()], bytes.data(), bytes.size(), 0,
             reinterpret_cast<const sockaddr*>(&to), sizeof(to));
      if (i % 200 == 199) member_gets_through(absl::StrCat("during the flood, at ", i));
    }
    // Read and answered, after everything sent before it.
    member_gets_through("after the flood");
    return absl::Now() - start;
  };
  auto failed_checks = [&] {
    const DatagramSigner::Stats s = b_signer->stats();
    return s.signatures_checked - s.verified_datagrams;
  };

  // One source (127.0.0.2): its own allowance, 16 then 10 a second.
  const int one = BoundSocket("127.0.0.2");
  if (one < 0) GTEST_SKIP() << "cannot bind 127.0.0.2 (a loopback address) here";
  const int count = 4000;
  absl::Duration took = flood({one}, count, "n9");
  EXPECT_LE(failed_checks(), 16 + 10 * absl::ToDoubleSeconds(took) + 2)
      << "in " << absl::FormatDuration(took);
  EXPECT_GE(failed_checks(), 16u);
  UdpHeartbeats::Stats stats = b.udp->stats();
  EXPECT_GT(stats.dropped_throttled, 0u);
  EXPECT_EQ(stats.dropped_unauthenticated, failed_checks());
  std::printf(
      "one source: %d forged datagrams in %s cost %llu signature checks; %llu dropped "
      "unchecked\n",
      count, absl::FormatDuration(took).c_str(), static_cast<unsigned long long>(failed_checks()),
      static_cast<unsigned long long>(stats.dropped_throttled));

  // Forty sources (127.0.0.10-49), none a member: together 64, then 100 a second.
  std::vector<int> many;
  for (int i = 10; i < 50; ++i) {
    const int fd = BoundSocket(absl::StrCat("127.0.0.", i));
    if (fd >= 0) many.push_back(fd);
  }
  ASSERT_EQ(many.size(), 40u);
  const uint64_t before = failed_checks();
  took = flood(many, count, "n9");
  EXPECT_LE(failed_checks() - before, 64 + 100 * absl::ToDoubleSeconds(took) + 2)
      << "in " << absl::FormatDuration(took);
  std::printf("40 sources: %d forged datagrams in %s cost %llu signature checks; n1's heartbeat "
              "tried again %d times in both floods\n", count, absl::FormatDuration(took).c_str(),
              static_cast<unsigned long long>(failed_checks() - before), retries);

  // Claiming n1 with n9's (already known) certificate: refused before any signature check.
  absl::SleepFor(absl::Seconds(2));  // the allowances refill
  const uint64_t checked = b_signer->stats().signatures_checked;
  const uint64_t unauthenticated = b.udp->stats().dropped_unauthenticated;
  for (int i = 0; i < 5; ++i) {
    const std::string bytes = forged("n1", 9000 + i);
    sendto(one, bytes.data(), bytes.size(), 0, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
  }
  EXPECT_TRUE(a.udp->Heartbeat(b.address, From("n1")).ok());
  EXPECT_EQ(b.udp->stats().dropped_unauthenticated, unauthenticated + 5);
  EXPECT_EQ(b_signer->stats().signatures_checked, checked + 1) << "only n1's own heartbeat";
  close(one);
  for (int fd : many) close(fd);
}

// Under TLS, the codec with a replay window, as the receiver runs it: a datagram is taken once,
// the second delivery refused before its signature is checked.
TEST_F(SignedHeartbeatsTest, AReplayCostsNoSignatureCheckAndOnlyAVerifiedDatagramMovesTheWindow) {
  std::mt19937_64 rng(Seed() + 10);
  std::shared_ptr<DatagramSigner> n1 = SignerFor("n1");
  std::shared_ptr<DatagramSigner> receiver = SignerFor("n2");
  const uint64_t incarnation = 1 + rng() % (uint64_t{1} << 50);
  ReplayWindow window;
  auto encode = [&](DatagramSigner* signer, uint64_t inc) {
    peer::HeartbeatRequest request;
    request.set_node_id("n1");
    request.set_incarnation(inc);
    request.set_address(RandomString(rng, 1 + rng() % 30));
    auto d = UdpHeartbeats::Encode(1, rng(), request.SerializeAsString(), "", signer, inc);
    EXPECT_TRUE(d.ok()) << d.status();
    return *d;
  };
  auto decode = [&](const std::string& d) {
    return UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(d.data()), d.size(), "",
                                 receiver.get(), &window);
  };
  auto checks = [&] { return receiver->stats().signatures_checked; };
  // Delivered twice: the second costs no signature check.
  const std::string first = encode(n1.get(), incarnation);
  ASSERT_TRUE(decode(first).ok());
  EXPECT_EQ(checks(), 1u);
  absl::StatusOr<UdpHeartbeats::Decoded> again = decode(first);
  EXPECT_TRUE(absl::IsAlreadyExists(again.status())) << again.status();
  EXPECT_EQ(checks(), 1u) << "a replay cost a signature check";
  // Timed: what refusing a replay costs, next to taking a genuine datagram.
  const int n = 200;
  std::vector<std::string> genuine;
  for (int i = 0; i < n; ++i) genuine.push_back(encode(n1.get(), incarnation));
  absl::Time start = absl::Now();
  for (const std::string& d : genuine) ASSERT_TRUE(decode(d).ok());
  const absl::Duration verified = (absl::Now() - start) / n;
  start = absl::Now();
  for (const std::string& d : genuine) ASSERT_FALSE(decode(d).ok());
  const absl::Duration refused = (absl::Now() - start) / n;
  EXPECT_EQ(checks(), 1u + n);
  std::printf("a genuine datagram decoded in %s (signature checked); its replay refused in %s "
              "(%.1fx less)\n", absl::FormatDuration(verified).c_str(),
              absl::FormatDuration(refused).c_str(), absl::FDivDuration(verified, refused));
  // Reordered within the window: both pass.
  const std::string a = encode(n1.get(), incarnation), b = encode(n1.get(), incarnation);
  ASSERT_TRUE(decode(b).ok());
  ASSERT_TRUE(decode(a).ok());
  // Far below the window: one signed before kWindow others were taken, delivered after them.
  const std::string late = encode(n1.get(), incarnation);
  for (uint64_t i = 0; i < ReplayWindow::kWindow; ++i) {
    ASSERT_TRUE(decode(encode(n1.get(), incarnation)).ok());
  }
  uint64_t before = checks();
  EXPECT_TRUE(absl::IsAlreadyExists(decode(late).status())) << decode(late).status();
  EXPECT_EQ(checks(), before);
  // A forged sequence far ahead (a genuine datagram's, changed): fails its signature, budgeted as
  // a failure, and moves nothing: a genuine one held back meanwhile still passes, as does the next.
  const std::string held = encode(n1.get(), incarnation);
  for (int variant = 0; variant < 3; ++variant) {
    std::string forged = encode(n1.get(), incarnation);
    uint64_t forged_sequence = 0;
    for (int i = 7; i >= 0; --i) forged_sequence = (forged_sequence << 8) | uint8_t(forged[28 + i]);
    forged_sequence = variant == 0   ? uint64_t{1} << 62
                      : variant == 1 ? ~uint64_t{0}
                                     : forged_sequence + 1 + rng() % 100;  // just ahead
    for (int i = 0; i < 8; ++i) {
      forged[28 + i] = static_cast<char>((forged_sequence >> (8 * i)) & 0xff);
    }
    before = checks();
    EXPECT_EQ(decode(forged).status().code(), absl::StatusCode::kUnauthenticated)
        << forged_sequence;
    EXPECT_EQ(checks(), before + 1);
  }
  EXPECT_TRUE(decode(encode(n1.get(), incarnation)).ok());
  EXPECT_TRUE(decode(held).ok());
  // A forged newer incarnation moves nothing either.
  std::string forged = encode(n1.get(), incarnation);
  forged[20] = static_cast<char>(forged[20] ^ 0x01);
  forged[27] = static_cast<char>(0x7f);  // far newer
  EXPECT_EQ(decode(forged).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(decode(encode(n1.get(), incarnation)).ok());
  // n1 restarts: a new process (its sequence from 1 again) of a newer incarnation gets a fresh
  // window; its replays are refused, and so are the old incarnation's.
  std::shared_ptr<DatagramSigner> restarted = SignerFor("n1");
  const std::string fresh = encode(restarted.get(), incarnation + 1 + rng() % 1000);
  ASSERT_TRUE(decode(fresh).ok()) << decode(fresh).status();
  EXPECT_TRUE(absl::IsAlreadyExists(decode(fresh).status()));
  EXPECT_TRUE(absl::IsAlreadyExists(decode(first).status()));
  before = checks();
  EXPECT_TRUE(absl::IsAlreadyExists(decode(held).status()));
  EXPECT_EQ(checks(), before);
  // The format is bounded: cut short, or of incarnation or sequence 0, it is malformed.
  const size_t short_of_the_sequence = UdpHeartbeats::kHeaderBytes + 19 + UdpHeartbeats::kMacBytes;
  EXPECT_EQ(decode(fresh.substr(0, short_of_the_sequence)).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::string zero = fresh;
  for (int i = 0; i < 8; ++i) zero[28 + i] = 0;
  EXPECT_EQ(decode(zero).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UdpHeartbeats::Encode(1, 1, "b", "", restarted.get(), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Over the wire: a recorded heartbeat sent again, and a recorded reply sent again, are dropped
// and counted before any signature check; the first of each is answered or taken.
TEST_F(SignedHeartbeatsTest, RecordedRequestsAndRepliesSentAgainAreDroppedUnchecked) {
  std::mt19937_64 rng(Seed() + 11);
  std::shared_ptr<DatagramSigner> b_signer = SignerFor("n2");
  Endpoint b("tok", absl::Seconds(2), b_signer);
  ASSERT_TRUE(b.udp);
  b.reply.peer = MemberInfo{"n2", 7, ""};
  int fd = BoundSocket("127.0.0.1");
  ASSERT_GE(fd, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  to.sin_port = htons(b.udp->port());
  std::shared_ptr<DatagramSigner> n1 = SignerFor("n1");
  peer::HeartbeatRequest request;
  request.set_node_id("n1");
  request.set_incarnation(rng() | 1);
  auto recorded = UdpHeartbeats::Encode(1, rng(), request.SerializeAsString(), "tok", n1.get(),
                                        request.incarnation());
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  const int copies = 2 + static_cast<int>(rng() % 5);
  for (int i = 0; i < copies; ++i) {
    sendto(fd, recorded->data(), recorded->size(), 0, reinterpret_cast<const sockaddr*>(&to),
           sizeof(to));
  }
  // Processed in order: the answer to a heartbeat sent after them.
  Endpoint a("tok", absl::Seconds(2), SignerFor("n1"));
  ASSERT_TRUE(a.udp);
  ASSERT_TRUE(a.udp->Heartbeat(b.address, From("n1")).ok());
  UdpHeartbeats::Stats stats = b.udp->stats();
  EXPECT_EQ(stats.requests_received, 2u) << "the recorded one once, and a's";
  EXPECT_EQ(stats.dropped_replayed, static_cast<uint64_t>(copies - 1));
  EXPECT_EQ(b_signer->stats().signatures_checked, 2u);
  EXPECT_EQ(stats.dropped_throttled + stats.dropped_unauthenticated, 0u);

  // A reply recorded and sent again: taken once, then dropped as replayed (not as unexpected:
  // the window is checked before any pending call is looked up). From another socket: b's
  // answers wait in the first.
  close(fd);
  fd = BoundSocket("127.0.0.1");
  ASSERT_GE(fd, 0);
  std::shared_ptr<DatagramSigner> n3 = SignerFor("n3");
  std::atomic<bool> answered{false};
  std::thread peer([&] {
    std::vector<char> buffer(UdpHeartbeats::kMaxDatagramBytes);
    sockaddr_storage from{};
    socklen_t from_len = sizeof(from);
    const ssize_t n = recvfrom(fd, buffer.data(), buffer.size(), 0,
                               reinterpret_cast<sockaddr*>(&from), &from_len);
    auto asked = UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(buffer.data()),
                                       n < 0 ? 0 : static_cast<size_t>(n), "tok", n3.get());
    if (!asked.ok()) return;
    peer::HeartbeatResponse response;
    response.set_node_id("n3");
    response.set_incarnation(9);
    auto reply = UdpHeartbeats::Encode(2, asked->id, response.SerializeAsString(), "tok",
                                       n3.get(), 9);
    if (!reply.ok()) return;
    for (int i = 0; i < copies; ++i) {
      sendto(fd, reply->data(), reply->size(), 0, reinterpret_cast<const sockaddr*>(&from),
             from_len);
    }
    answered = true;
  });
  sockaddr_in self{};
  socklen_t self_len = sizeof(self);
  getsockname(fd, reinterpret_cast<sockaddr*>(&self), &self_len);
  absl::StatusOr<HeartbeatReply> got =
      a.udp->Heartbeat(absl::StrCat("127.0.0.1:", ntohs(self.sin_port)), From("n1"));
  peer.join();
  ASSERT_TRUE(answered);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->peer.node_id, "n3");
  // The copies were read after the first: wait for a's receiver to count them.
  for (int i = 0; i < 100 && a.udp->stats().dropped_replayed < uint64_t(copies - 1); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  stats = a.udp->stats();
  EXPECT_EQ(stats.replies_received, 2u) << "b's, earlier, and the recorded one once";
  EXPECT_EQ(stats.dropped_replayed, static_cast<uint64_t>(copies - 1));
  EXPECT_EQ(stats.dropped_unexpected, 0u);
  close(fd);
}

TEST_F(SignedHeartbeatsTest, UnsignedAndSignedDoNotMix) {
  Endpoint tls("", absl::Milliseconds(300), SignerFor("n1"));
  Endpoint plain("", absl::Milliseconds(300));
  ASSERT_TRUE(tls.udp && plain.udp);
  EXPECT_EQ(plain.udp->Heartbeat(tls.address, From("n5")).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(tls.udp->stats().dropped_unauthenticated, 1u);
  EXPECT_EQ(tls.udp->Heartbeat(plain.address, From("n1")).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(plain.udp->stats().dropped_unauthenticated, 1u);
  // The codec says why.
  auto signer = SignerFor("n4");
  auto unsigned_datagram = UdpHeartbeats::Encode(1, 1, "body", "");
  ASSERT_TRUE(unsigned_datagram.ok());
  auto refused = UdpHeartbeats::Decode(
      reinterpret_cast<const uint8_t*>(unsigned_datagram->data()), unsigned_datagram->size(), "",
      signer.get());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(refused.status().message().find("takes only datagrams signed"), std::string::npos)
      << refused.status();
  auto signed_datagram = UdpHeartbeats::Encode(1, 1, "body", "", signer.get(), 77);
  ASSERT_TRUE(signed_datagram.ok());
  auto decoded = UdpHeartbeats::Decode(
      reinterpret_cast<const uint8_t*>(signed_datagram->data()), signed_datagram->size(), "",
      signer.get());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->node_id, "n4");
  EXPECT_EQ(decoded->body, "body");
}

}  // namespace
}  // namespace tessera
