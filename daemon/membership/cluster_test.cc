// Cluster (SWIM over PeerClient::Heartbeat) in real time over FakePeerClients: joins through
// seeds, suspicion of a peer that stops answering, refutation by a paused daemon that resumes,
// zombie fencing, the heartbeat handler's contract, DeclareLost, Converged. Each daemon has its
// own FakePeerClient, whose peers are the other daemons' Cluster::OnHeartbeat, so pausing a
// daemon's incoming and outgoing calls is a SIGSTOP. Waits poll for an outcome (up to 10 s);
// nothing asserts how long anything took.
#include "daemon/membership/cluster.h"

#include <atomic>
#include <map>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "daemon/membership/datagram_signer.h"
#include "daemon/membership/incarnation_proof.h"
#include "daemon/transfer/test_certificates.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using Ids = std::vector<std::string>;

// Polls `done` for up to 10 s.
template <typename F>
bool Eventually(F done) {
  for (int i = 0; i < 1000; ++i) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return done();
}

Cluster::Options FastOptions(const std::string& id, uint64_t incarnation,
                             std::vector<std::string> members) {
  Cluster::Options o;
  o.self_id = id;
  o.self_address = id + ":1";
  o.incarnation = incarnation;
  o.members = std::move(members);
  o.heartbeat_ms = 10;
  o.timeout_ms = 100;
  return o;
}

// Each node's certificate, of one CA, as mutual TLS would give it.
class Certificates {
 public:
  Certificates() {
    auto ca = TestCa::Create();
    EXPECT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
  }
  std::shared_ptr<DatagramSigner> SignerOf(const std::string& node) {
    auto it = signers_.find(node);
    if (it != signers_.end()) return it->second;
    auto files = ca_->IssueNode(node);
    EXPECT_TRUE(files.ok()) << files.status();
    auto signer = DatagramSigner::Create(*files);
    EXPECT_TRUE(signer.ok()) << signer.status();
    return signers_[node] = std::shared_ptr<DatagramSigner>(std::move(*signer));
  }
  // `options` with the proofs of its node's certificate.
  Cluster::Options WithProofs(Cluster::Options options) {
    IncarnationProofs::Options o;
    o.signer = SignerOf(options.self_id);
    o.self = IncarnationClaim{options.self_id, options.incarnation, options.self_address};
    auto proofs = IncarnationProofs::Create(std::move(o));
    EXPECT_TRUE(proofs.ok()) << proofs.status();
    options.proofs = std::move(*proofs);
    return options;
  }
  // node's own proof of an incarnation at an address.
  std::string ProofOf(const std::string& node, uint64_t incarnation, const std::string& address) {
    auto proof = MakeIncarnationProof(SignerOf(node).get(), {node, incarnation, address});
    EXPECT_TRUE(proof.ok()) << proof.status();
    return proof.value_or("");
  }

 private:
  std::unique_ptr<TestCa> ca_;
  std::map<std::string, std::shared_ptr<DatagramSigner>> signers_;
};

// The (node id, alive) calls of on_change, in order.
class Changes {
 public:
  std::function<void(const std::string&, bool)> Callback() {
    return [this](const std::string& id, bool alive) {
      absl::MutexLock lock(&mu_);
      seen_.emplace_back(id, alive);
    };
  }
  bool Saw(const std::string& id, bool alive) const {
    absl::MutexLock lock(&mu_);
    return std::find(seen_.begin(), seen_.end(), std::make_pair(id, alive)) != seen_.end();
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::pair<std::string, bool>> seen_ ABSL_GUARDED_BY(mu_);
};

// Daemons that are real Clusters, each reaching the others through its own FakePeerClient.
class Daemons {
 public:
  Cluster* Add(Cluster::Options options) {
    auto d = std::make_unique<Daemon>();
    d->client = std::make_unique<FakePeerClient>(
        FakePeerClient::Options{absl::Milliseconds(50)});
    d->cluster = std::make_unique<Cluster>(options, d->client.get());
    // Everyone reaches the newcomer at its address (a restart there replaces the old one)...
    FakePeerClient::Peer peer;
    peer.self = MemberInfo{options.self_id, options.incarnation, options.self_address};
    Cluster* cluster = d->cluster.get();
    peer.on_heartbeat = [cluster](const HeartbeatMessage& m) { return cluster->OnHeartbeat(m); };
    for (auto& other : daemons_) other->client->AddPeer(options.self_address, peer);
    // ...and the newcomer reaches everyone.
    for (auto& other : daemons_) d->client->AddPeer(other->address, other->peer);
    d->address = options.self_address;
    d->peer = peer;
    daemons_.push_back(std::move(d));
    cluster->Start();
    return cluster;
  }
  // SIGSTOP (true) and SIGCONT (false) of daemon i: calls to and from it wait.
  void Pause(size_t i, bool paused) {
    for (size_t j = 0; j < daemons_.size(); ++j) {
      if (j == i) continue;
      if (paused) {
        daemons_[j]->client->Pause(daemons_[i]->address);
        daemons_[i]->client->Pause(daemons_[j]->address);
      } else {
        daemons_[j]->client->Resume(daemons_[i]->address);
        daemons_[i]->client->Resume(daemons_[j]->address);
      }
    }
  }
  Cluster& operator[](size_t i) { return *daemons_[i]->cluster; }
  ~Daemons() {
    for (auto& d : daemons_) d->cluster->Stop();
  }

 private:
  struct Daemon {
    std::unique_ptr<FakePeerClient> client;
    std::unique_ptr<Cluster> cluster;
    std::string address;
    FakePeerClient::Peer peer;
  };
  std::vector<std::unique_ptr<Daemon>> daemons_;
};

TEST(ClusterTest, PeersJoinThroughSeedsAndASilentOneIsSuspectedThenDead) {
  // b and c answer heartbeats with their identity only (no membership of their own).
  FakePeerClient client{FakePeerClient::Options{absl::Milliseconds(50)}};
  for (const char* id : {"b", "c"}) {
    FakePeerClient::Peer peer;
    peer.self = MemberInfo{id, 1, std::string(id) + ":1"};
    client.AddPeer(std::string(id) + ":1", peer);
  }
  Changes changes;
  Cluster::Options o = FastOptions("a", 100, {"a:1", "b:1", "c:1"});
  o.on_change = changes.Callback();
  Cluster cluster(o, &client);
  EXPECT_EQ(cluster.LiveNodeIds(), Ids{"a"});  // nobody heard yet
  EXPECT_FALSE(cluster.Converged());
  cluster.Start();
  ASSERT_TRUE(Eventually([&] { return cluster.LiveNodeIds() == Ids({"a", "b", "c"}); }));
  EXPECT_TRUE(Eventually([&] { return cluster.Converged(); }));
  EXPECT_EQ(cluster.AddressOf("c"), "c:1");
  EXPECT_EQ(cluster.AddressOf("a"), "a:1");
  EXPECT_EQ(cluster.IncarnationOf("b"), 1u);
  // on_change runs after the lock is released: LiveNodeIds may show b before it is called.
  EXPECT_TRUE(Eventually([&] { return changes.Saw("b", true); }));

  client.Pause("c:1");  // a SIGSTOPped daemon
  ASSERT_TRUE(Eventually([&] { return cluster.LiveNodeIds() == Ids({"a", "b"}); }));
  EXPECT_EQ(cluster.AddressOf("c"), std::nullopt);
  EXPECT_EQ(cluster.IncarnationOf("c"), 1u) << "known, though not live";
  // c cannot refute (it has no membership): the suspicion times out.
  ASSERT_TRUE(Eventually([&] { return changes.Saw("c", false); }));
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "b"}));
  for (const Cluster::PeerView& p : cluster.Peers()) {
    EXPECT_EQ(p.alive, p.node_id == "b") << p.node_id;
    EXPECT_GE(p.last_heard_unix_ms, 0) << p.node_id;
  }
  const Cluster::Stats s = cluster.stats();
  EXPECT_GE(s.swim.suspicions_raised, 1u);
  EXPECT_EQ(s.dead, 1u);
  EXPECT_GT(s.swim.probes_sent, 0u);
  EXPECT_GT(s.swim.ping_reqs_sent, 0u) << "c's probes were retried through b";
  cluster.Stop();
  cluster.Stop();  // idempotent
}

TEST(ClusterTest, PausedDaemonIsSuspectedAndRefutesWhenItResumes) {
  Daemons d;
  const std::vector<std::string> seeds = {"a:1", "b:1", "c:1"};
  Changes changes;
  Cluster::Options oa = FastOptions("a", 100, seeds);
  oa.on_change = changes.Callback();
  d.Add(oa);
  d.Add(FastOptions("b", 200, seeds));
  d.Add(FastOptions("c", 300, seeds));
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(Eventually([&] { return d[i].LiveNodeIds() == Ids({"a", "b", "c"}); })) << i;
  }
  d.Pause(2, true);
  ASSERT_TRUE(Eventually([&] {
    return d[0].LiveNodeIds() == Ids({"a", "b"}) && d[1].LiveNodeIds() == Ids({"a", "b"});
  }));
  d.Pause(2, false);
  // c hears that it was suspected (or declared dead) and refutes with a higher version.
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(Eventually([&] { return d[i].LiveNodeIds() == Ids({"a", "b", "c"}); })) << i;
  }
  EXPECT_GE(d[2].stats().swim.refutations, 1u);
  EXPECT_TRUE(changes.Saw("c", true));
}

TEST(ClusterTest, NewIncarnationFencesTheOldOne) {
  Daemons d;
  d.Add(FastOptions("a", 100, {"a:1", "b:1"}));
  d.Add(FastOptions("b", 200, {"a:1", "b:1"}));
  ASSERT_TRUE(Eventually([&] { return d[0].LiveNodeIds() == Ids({"a", "b"}); }));
  // b starts again elsewhere while the old b still runs: the old one is a zombie.
  Cluster::Options restarted = FastOptions("b", 900, {"a:1"});
  restarted.self_address = "b:2";
  d.Add(restarted);
  ASSERT_TRUE(Eventually([&] { return d[0].IncarnationOf("b") == 900u; }));
  EXPECT_TRUE(d[0].IsFenced("b", 200));
  EXPECT_FALSE(d[0].IsFenced("b", 900));
  EXPECT_TRUE(Eventually([&] { return d[0].AddressOf("b") == "b:2"; }));
  // The zombie's heartbeats are refused, and it learns that it is fenced.
  EXPECT_TRUE(Eventually([&] { return d[0].stats().swim.refused > 0; }));
  EXPECT_TRUE(Eventually([&] { return d[1].IsFenced("b", 200); }));
  EXPECT_EQ(d[0].LiveNodeIds(), Ids({"a", "b"}));
  EXPECT_EQ(d[0].IncarnationOf("b"), 900u) << "the zombie never comes back";
}

TEST(ClusterTest, HeartbeatHandlerContract) {
  FakePeerClient client;
  Changes changes;
  Cluster::Options o = FastOptions("a", 100, {});
  o.on_change = changes.Callback();
  Cluster cluster(o, &client);  // not started: the handler works on its own
  EXPECT_TRUE(cluster.Converged()) << "no seeds";
  HeartbeatMessage message;
  message.from = MemberInfo{"d", 7, "d:1"};
  message.seq = 5;
  for (int i = 0; i < 2; ++i) {  // idempotent
    absl::StatusOr<HeartbeatReply> reply = cluster.OnHeartbeat(message);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->peer.node_id, "a");
    EXPECT_EQ(reply->peer.incarnation, 100u);
    EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "d"}));
  }
  EXPECT_TRUE(changes.Saw("d", true));
  message.from.incarnation = 8;  // d restarted
  ASSERT_TRUE(cluster.OnHeartbeat(message).ok());
  EXPECT_EQ(cluster.IncarnationOf("d"), 8u);
  EXPECT_TRUE(cluster.IsFenced("d", 7));
  message.from.incarnation = 7;  // the old one again: refused, naming the newer incarnation
  absl::StatusOr<HeartbeatReply> refused = cluster.OnHeartbeat(message);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("incarnation 8"), std::string::npos)
      << refused.status();
  message.from.incarnation = 0;
  EXPECT_EQ(cluster.OnHeartbeat(message).status().code(), absl::StatusCode::kInvalidArgument);
  // Its own identity (its address listed as a seed elsewhere) changes nothing.
  message.from = MemberInfo{"a", 100, "a:1"};
  ASSERT_TRUE(cluster.OnHeartbeat(message).ok());
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "d"}));

  EXPECT_EQ(cluster.DeclareLost("d", /*force=*/false).code(), absl::StatusCode::kFailedPrecondition)
      << "d is alive here";
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "d"}));
  EXPECT_EQ(cluster.CountQuorum().members, 2u);
  ASSERT_TRUE(cluster.DeclareLost("d", /*force=*/true).ok());
  EXPECT_EQ(cluster.LiveNodeIds(), Ids{"a"});
  EXPECT_EQ(cluster.CountQuorum().members, 1u) << "a member declared lost is not counted";
  EXPECT_TRUE(cluster.IsDeclaredLost("d"));
  EXPECT_FALSE(cluster.IsDeclaredLost("a"));
  EXPECT_TRUE(cluster.CountQuorum().majority());
  EXPECT_TRUE(changes.Saw("d", false));
  message.from = MemberInfo{"d", 8, "d:1"};
  ASSERT_TRUE(cluster.OnHeartbeat(message).ok());
  EXPECT_EQ(cluster.LiveNodeIds(), Ids{"a"}) << "lost until a new incarnation";
  message.from.incarnation = 9;
  ASSERT_TRUE(cluster.OnHeartbeat(message).ok());
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "d"}));
  EXPECT_EQ(cluster.DeclareLost("nobody", false).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cluster.DeclareLost("a", true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "d"}));
}

// With proofs (mutual TLS), a member speaks only for itself: b, a member whose messages are its
// own, relays a newer incarnation of c at an address of its own, of a itself, and a stranger:
// without the proof of the member named, or with one b signed, nothing changes. Relayed news of
// the incarnation held keeps SWIM's rules but moves no one. With the member's own proof, a newer
// incarnation fences the old one as before, at the address the proof gives.
TEST(ClusterTest, WithProofsARelayedNewerIncarnationNeedsItsMembersProof) {
  Certificates certs;
  FakePeerClient client;
  std::atomic<bool> self_fenced{false};
  Cluster::Options o = certs.WithProofs(FastOptions("a", 100, {}));
  o.on_self_fenced = [&] { self_fenced = true; };
  Cluster cluster(o, &client);  // not started: the handler works on its own
  auto from_b = [&](std::vector<SwimUpdate> updates, std::vector<std::string> proofs) {
    HeartbeatMessage m;
    m.from = MemberInfo{"b", 200, "b:1"};
    m.seq = 1;
    m.updates = std::move(updates);
    m.incarnation_proofs = std::move(proofs);
    absl::StatusOr<HeartbeatReply> reply = cluster.OnHeartbeat(m);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->incarnation_proofs : std::vector<std::string>{};
  };
  // b and c, first-hand (their proofs along, as every message carries its sender's).
  const std::vector<std::string> a_sends = from_b({}, {certs.ProofOf("b", 200, "b:1")});
  ASSERT_GE(a_sends.size(), 1u) << "a's answer carries its own proof (first)";
  auto own = ReadIncarnationClaim(a_sends[0]);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->node_id, "a");
  EXPECT_EQ(own->incarnation, 100u);
  HeartbeatMessage from_c;
  from_c.from = MemberInfo{"c", 300, "c:1"};
  from_c.incarnation_proofs = {certs.ProofOf("c", 300, "c:1")};
  ASSERT_TRUE(cluster.OnHeartbeat(from_c).ok());
  ASSERT_EQ(cluster.LiveNodeIds(), Ids({"a", "b", "c"}));

  const uint64_t newer = 999;
  std::string forged_c = IncarnationRecord({"c", newer, "rogue:1"});
  ASSERT_TRUE(certs.SignerOf("b")->Sign(&forged_c).ok());
  std::string forged_a = IncarnationRecord({"a", newer, "rogue:1"});
  ASSERT_TRUE(certs.SignerOf("b")->Sign(&forged_a).ok());
  const SwimUpdate c_newer{SwimState::kAlive, "c", newer, 1, "rogue:1"};
  const SwimUpdate a_newer{SwimState::kAlive, "a", newer, 1, "rogue:1"};
  const SwimUpdate d_joins{SwimState::kAlive, "d", 400, 0, "rogue:1"};
  from_b({c_newer, a_newer, d_joins}, {});
  from_b({c_newer, a_newer}, {forged_c, forged_a});
  // Proofs of other members and incarnations do not stand in for the one needed.
  from_b({c_newer}, {certs.ProofOf("c", 301, "c:1"), certs.ProofOf("d", 400, "d:1")});
  EXPECT_EQ(cluster.IncarnationOf("c"), 300u);
  EXPECT_FALSE(cluster.IsFenced("c", 300));
  EXPECT_EQ(cluster.AddressOf("c"), "c:1");
  EXPECT_EQ(cluster.IncarnationOf("a"), 100u);
  EXPECT_FALSE(self_fenced.load());
  EXPECT_EQ(cluster.IncarnationOf("d"), std::nullopt);
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "b", "c"}));
  for (const Cluster::PeerView& p : cluster.Peers()) EXPECT_NE(p.address, "rogue:1");
  Cluster::Stats s = cluster.stats();
  EXPECT_EQ(s.updates_unproven, 4u);
  EXPECT_EQ(s.updates_proof_refused, 2u);
  EXPECT_EQ(s.updates_proof_unchecked, 0u);

  // The incarnation held: a suspicion at c's own version is taken (c suspected), one above it
  // is not (bounded gossip, swim.h), and the address never is.
  from_b({SwimUpdate{SwimState::kSuspect, "c", 300, 3, "rogue:1"}}, {});
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "b", "c"}));
  from_b({SwimUpdate{SwimState::kSuspect, "c", 300, 0, "rogue:1"}}, {});
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "b"}));
  std::optional<uint64_t> incarnation = cluster.IncarnationOf("c");
  EXPECT_EQ(incarnation, 300u);
  for (const Cluster::PeerView& p : cluster.Peers()) EXPECT_NE(p.address, "rogue:1");
  from_b({SwimUpdate{SwimState::kAlive, "c", 300, 1, "rogue:1"}}, {});  // c's refutation
  EXPECT_EQ(cluster.AddressOf("c"), "c:1");
  EXPECT_EQ(cluster.stats().swim.relayed_dropped, 1u);

  // d's own proof introduces d, at the address it gives; c's own proof of a newer incarnation
  // fences the old one as before.
  from_b({d_joins}, {certs.ProofOf("d", 400, "d:1")});
  EXPECT_EQ(cluster.AddressOf("d"), "d:1");
  from_b({c_newer}, {certs.ProofOf("c", newer, "c:2")});
  EXPECT_EQ(cluster.IncarnationOf("c"), newer);
  EXPECT_TRUE(cluster.IsFenced("c", 300));
  EXPECT_EQ(cluster.AddressOf("c"), "c:2");
  EXPECT_FALSE(self_fenced.load());
  // What a relays about c from now on carries c's proof.
  HeartbeatMessage probe;
  probe.from = MemberInfo{"e", 500, "e:1"};
  probe.incarnation_proofs = {certs.ProofOf("e", 500, "e:1")};
  probe.known_members = 0;  // a joiner: a fills its answer with the members it knows
  absl::StatusOr<HeartbeatReply> filled = cluster.OnHeartbeat(probe);
  ASSERT_TRUE(filled.ok()) << filled.status();
  bool c_proven = false;
  for (const std::string& proof : filled->incarnation_proofs) {
    auto claim = ReadIncarnationClaim(proof);
    c_proven = c_proven || (claim.ok() && claim->node_id == "c" && claim->incarnation == newer);
  }
  EXPECT_TRUE(c_proven) << filled->incarnation_proofs.size() << " proofs";
  // And a's own newer incarnation, proven by a's key: a is fenced, as before.
  from_b({a_newer}, {certs.ProofOf("a", newer, "a:2")});
  EXPECT_TRUE(self_fenced.load());
  s = cluster.stats();
  EXPECT_EQ(s.updates_unproven + s.updates_proof_refused + s.updates_proof_unchecked, 6u);
}

// Without proofs (a token-only cluster) a member's word about another is taken, as in SWIM.
TEST(ClusterTest, WithoutProofsARelayedNewerIncarnationIsTaken) {
  FakePeerClient client;
  Cluster cluster(FastOptions("a", 100, {}), &client);
  HeartbeatMessage m;
  m.from = MemberInfo{"c", 300, "c:1"};
  ASSERT_TRUE(cluster.OnHeartbeat(m).ok());
  m.from = MemberInfo{"b", 200, "b:1"};
  m.updates = {SwimUpdate{SwimState::kAlive, "c", 999, 1, "rogue:1"}};
  ASSERT_TRUE(cluster.OnHeartbeat(m).ok());
  EXPECT_TRUE(cluster.IsFenced("c", 300));
  EXPECT_EQ(cluster.AddressOf("c"), "rogue:1");
  EXPECT_EQ(cluster.stats().updates_unproven, 0u);
}

// With proofs on every daemon, members join through gossip and a restarted member's new
// incarnation fences the old one everywhere, every relayed update with its proof.
TEST(ClusterTest, WithProofsMembersJoinAndANewIncarnationFencesTheOldOne) {
  Certificates certs;
  Daemons d;
  // a knows only b's address, c only a's: each learns the third from the other's gossip.
  d.Add(certs.WithProofs(FastOptions("a", 100, {"b:1"})));
  d.Add(certs.WithProofs(FastOptions("b", 200, {"b:1"})));
  d.Add(certs.WithProofs(FastOptions("c", 300, {"a:1"})));
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(Eventually([&] { return d[i].LiveNodeIds() == Ids({"a", "b", "c"}); })) << i;
  }
  Cluster::Options restarted = certs.WithProofs(FastOptions("b", 900, {"a:1"}));
  restarted.self_address = "b:2";
  d.Add(restarted);
  for (size_t i : {0, 2}) {
    ASSERT_TRUE(Eventually([&] { return d[i].IncarnationOf("b") == 900u; })) << i;
    EXPECT_TRUE(Eventually([&] { return d[i].AddressOf("b") == "b:2"; })) << i;
    EXPECT_TRUE(d[i].IsFenced("b", 200));
  }
  EXPECT_TRUE(Eventually([&] { return d[1].IsFenced("b", 200); })) << "the zombie learns it";
  for (size_t i = 0; i < 4; ++i) {
    const Cluster::Stats s = d[i].stats();
    EXPECT_EQ(s.updates_unproven + s.updates_proof_refused + s.updates_proof_unchecked, 0u)
        << i << ": an honest update was dropped";
  }
}

// With proofs, a daemon refuses a fenced incarnation's heartbeat with the newer incarnation's
// proof attached, so that the refused daemon can check it; without proofs, with none.
TEST(ClusterTest, WithProofsARefusalCarriesTheNewerIncarnationsProof) {
  Certificates certs;
  for (bool with_proofs : {true, false}) {
    FakePeerClient client;
    Cluster::Options o = FastOptions("a", 100, {});
    Cluster cluster(with_proofs ? certs.WithProofs(o) : o, &client);  // not started
    const std::string newer_proof = certs.ProofOf("c", 400, "c:2");
    HeartbeatMessage from_c;
    from_c.from = MemberInfo{"c", 300, "c:1"};
    from_c.incarnation_proofs = {certs.ProofOf("c", 300, "c:1")};
    ASSERT_TRUE(cluster.OnHeartbeat(from_c).ok());
    HeartbeatMessage from_new_c;
    from_new_c.from = MemberInfo{"c", 400, "c:2"};
    from_new_c.incarnation_proofs = {newer_proof};
    ASSERT_TRUE(cluster.OnHeartbeat(from_new_c).ok());
    absl::StatusOr<HeartbeatReply> refused = cluster.OnHeartbeat(from_c);
    ASSERT_TRUE(absl::IsFailedPrecondition(refused.status())) << refused.status();
    if (with_proofs) {
      EXPECT_EQ(StatusDetails(refused.status()), newer_proof);
    } else {
      EXPECT_EQ(StatusDetails(refused.status()), std::nullopt);
    }
    // Twice: the same answer.
    absl::StatusOr<HeartbeatReply> again = cluster.OnHeartbeat(from_c);
    EXPECT_EQ(again.status(), refused.status());
  }
}

// With proofs, a member's refusal of this daemon's heartbeat as fenced is obeyed only when it
// carries this node's own proof of a newer incarnation: without one, with one another member
// signed, with this incarnation's own proof or an older one's, or with bytes that are no proof,
// the daemon is not fenced, counts and logs the refusal, and goes on (the member is then probed
// as one that did not answer). Without proofs (a token-only cluster) a refusal fences as before.
TEST(ClusterTest, WithProofsARefusalFencesOnlyWithTheNewerIncarnationsProof) {
  Certificates certs;
  const uint64_t newer = 900;
  std::string forged = IncarnationRecord({"a", newer, "a:2"});
  ASSERT_TRUE(certs.SignerOf("b")->Sign(&forged).ok());
  struct Case {
    const char* what;
    bool with_proofs;
    std::optional<std::string> proof;
    bool fences;
  };
  const std::vector<Case> cases = {
      {"no proof", true, std::nullopt, false},
      {"a proof b signed", true, forged, false},
      {"a's proof of this incarnation", true, certs.ProofOf("a", 100, "a:1"), false},
      {"a's proof of an older incarnation", true, certs.ProofOf("a", 50, "a:1"), false},
      {"another member's proof", true, certs.ProofOf("b", newer, "b:1"), false},
      {"bytes that are no proof", true, std::string("TSIP\x01garbage"), false},
      {"a's proof of a newer incarnation", true, certs.ProofOf("a", newer, "a:2"), true},
      {"without proofs, no proof", false, std::nullopt, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    FakePeerClient client;
    FakePeerClient::Peer b;
    b.self = MemberInfo{"b", 200, "b:1"};
    b.on_heartbeat = [&c](const HeartbeatMessage&) -> absl::StatusOr<HeartbeatReply> {
      absl::Status refused = absl::FailedPreconditionError(
          "node 'a' incarnation 100 is fenced: incarnation 900 of that node id is known");
      return c.proof ? WithStatusDetails(refused, *c.proof) : refused;
    };
    client.AddPeer("b:1", b);
    std::atomic<bool> fenced{false};
    Cluster::Options o = FastOptions("a", 100, {"b:1"});
    if (c.with_proofs) o = certs.WithProofs(o);
    o.on_self_fenced = [&] { fenced = true; };
    Cluster cluster(o, &client);
    cluster.Start();
    if (c.fences) {
      EXPECT_TRUE(Eventually([&] { return fenced.load(); }));
      EXPECT_EQ(cluster.stats().refusals_unproven, 0u);
    } else {
      ASSERT_TRUE(Eventually([&] { return cluster.stats().refusals_unproven >= 3; }));
      EXPECT_FALSE(fenced.load());
      EXPECT_EQ(cluster.IncarnationOf("a"), 100u);
    }
    cluster.Stop();
  }
}

TEST(ClusterTest, ConvergesWhenEverySeedAnsweredOrFailedOnce) {
  FakePeerClient client{FakePeerClient::Options{absl::Milliseconds(50)}};
  FakePeerClient::Peer b;
  b.self = MemberInfo{"b", 1, "b:1"};
  client.AddPeer("b:1", b);
  client.Pause("z:1");  // answers nothing: its probe times out
  Cluster cluster(FastOptions("a", 100, {"b:1", "x:1", "y:1", "z:1"}), &client);
  EXPECT_FALSE(cluster.Converged());
  cluster.Start();
  ASSERT_TRUE(Eventually([&] { return cluster.Converged(); }));
  EXPECT_EQ(cluster.LiveNodeIds(), Ids({"a", "b"}));
  // The addresses nobody answered at stay in the status view, as never heard.
  size_t unknown = 0;
  for (const Cluster::PeerView& p : cluster.Peers()) {
    if (p.node_id.empty()) {
      ++unknown;
      EXPECT_FALSE(p.alive);
      EXPECT_EQ(p.last_heard_unix_ms, -1);
    }
  }
  EXPECT_EQ(unknown, 3u);
  // A majority is counted over every member and every seed address nobody answered at: 2 of 5
  // live is a minority (a node cut off at start-up must not decide alone).
  const Cluster::Quorum quorum = cluster.CountQuorum();
  EXPECT_EQ(quorum.live, 2u);
  EXPECT_EQ(quorum.members, 5u);
  EXPECT_FALSE(quorum.majority());
  cluster.Stop();
}

}  // namespace
}  // namespace tessera
