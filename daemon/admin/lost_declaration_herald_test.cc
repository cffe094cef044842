// LostDeclarationHerald against a fake PeerClient (the member's answers) and a fake view of the
// cluster: who is asked, when it stops, and when it starts over. Real daemons:
// tests:cluster_test ...ADeclarationReachesAMemberThatWasAway.
#include "daemon/admin/lost_declaration_herald.h"

#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "daemon/membership/incarnation_proof.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

// Answers DeclareLost as each member is told to: taken, refused (not applied), or failed.
class FakeMembers : public PeerClient {
 public:
  enum class Answer { kTake, kRefuse, kFail };

  absl::StatusOr<LostDeclarationReply> DeclareLost(const PeerTarget& peer,
                                                   const LostDeclarationRequest& request) override {
    absl::MutexLock lock(&mu_);
    asked_[peer.node_id].push_back(request);
    LostDeclarationReply reply;
    switch (answers_.count(peer.node_id) ? answers_[peer.node_id] : Answer::kTake) {
      case Answer::kTake:
        reply.applied = true;
        reply.signers = static_cast<uint32_t>(request.declarations.size());
        return reply;
      case Answer::kRefuse:
        reply.reason = "1 of the 3 members live declared it lost";
        return reply;
      case Answer::kFail:
        return absl::UnavailableError("connection refused");
    }
    return reply;
  }
  // The rest of PeerClient is not used by the herald.
  absl::StatusOr<FragmentStatus> PutFragment(const PeerTarget&, const FragmentKey&,
                                             const FragmentMeta&, const uint8_t*, size_t) override {
    return absl::UnimplementedError("not used");
  }
  absl::StatusOr<FragmentStatus> GetFragment(const PeerTarget&, const FragmentKey&, uint64_t,
                                             uint8_t*, size_t) override {
    return absl::UnimplementedError("not used");
  }
  absl::StatusOr<ShardInfo> FetchShard(const PeerTarget&, const std::string&, uint32_t, int64_t,
                                       ShardSink*) override {
    return absl::UnimplementedError("not used");
  }
  absl::StatusOr<HeldInventory> ListHeld(const PeerTarget&, const std::string&) override {
    return absl::UnimplementedError("not used");
  }
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string&, const HeartbeatMessage&) override {
    return absl::UnimplementedError("not used");
  }

  void Set(const std::string& member, Answer answer) {
    absl::MutexLock lock(&mu_);
    answers_[member] = answer;
  }
  size_t Asked(const std::string& member) {
    absl::MutexLock lock(&mu_);
    return asked_[member].size();
  }
  LostDeclarationRequest Last(const std::string& member) {
    absl::MutexLock lock(&mu_);
    return asked_[member].back();
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, Answer> answers_;
  std::map<std::string, std::vector<LostDeclarationRequest>> asked_;
};

std::string Declaration(const std::string& node, uint64_t incarnation, const std::string& by) {
  return LostDeclarationRecord({node, incarnation, by});  // unsigned: the herald only reads them
}

class HeraldTest : public ::testing::Test {
 protected:
  HeraldTest() {
    LostDeclarationHerald::Options o;
    o.self = MemberInfo{"n0", 11, "127.0.0.1:7000"};
    o.lost = [this] { return lost_; };
    o.peers = [this] { return peers_; };
    herald_ = std::make_unique<LostDeclarationHerald>(&members_, o);
  }
  void Peer(const std::string& node, uint64_t incarnation, bool alive) {
    for (Cluster::PeerView& p : peers_) {
      if (p.node_id == node) {
        p.incarnation = incarnation;
        p.alive = alive;
        return;
      }
    }
    peers_.push_back(Cluster::PeerView{"127.0.0.1:7" + node, node, incarnation, 0, alive});
  }

  std::vector<Cluster::LostEvidence> lost_;
  std::vector<Cluster::PeerView> peers_;
  FakeMembers members_;
  std::unique_ptr<LostDeclarationHerald> herald_;
};

TEST_F(HeraldTest, EachLiveMemberIsHandedTheDeclarationsUntilItTakesThem) {
  lost_ = {{"n3", 33, {Declaration("n3", 33, "n0"), Declaration("n3", 33, "n1")}}};
  Peer("n1", 1, true);
  Peer("n2", 2, true);
  Peer("n3", 33, false);
  Peer("n4", 4, false);  // away: not asked while it is not alive
  members_.Set("n2", FakeMembers::Answer::kRefuse);

  EXPECT_EQ(herald_->RunOnce(), 2);  // n1 and n2; never n3 itself, n4 away, nor n0 (self)
  EXPECT_EQ(members_.Asked("n1"), 1u);
  EXPECT_EQ(members_.Asked("n2"), 1u);
  EXPECT_EQ(members_.Asked("n3"), 0u);
  EXPECT_EQ(members_.Asked("n4"), 0u);
  const LostDeclarationRequest sent = members_.Last("n2");
  EXPECT_EQ(sent.from.node_id, "n0");
  EXPECT_EQ(sent.node_id, "n3");
  EXPECT_EQ(sent.incarnation, 33u);
  EXPECT_EQ(sent.declarations, lost_[0].declarations);

  // n1 took them: never asked again. n2 refused: asked again each round. n4 came back: asked.
  Peer("n4", 4, true);
  members_.Set("n2", FakeMembers::Answer::kFail);
  EXPECT_EQ(herald_->RunOnce(), 2);
  EXPECT_EQ(members_.Asked("n1"), 1u);
  EXPECT_EQ(members_.Asked("n2"), 2u);
  EXPECT_EQ(members_.Asked("n4"), 1u);
  members_.Set("n2", FakeMembers::Answer::kTake);
  EXPECT_EQ(herald_->RunOnce(), 1);
  EXPECT_EQ(members_.Asked("n2"), 3u);
  EXPECT_EQ(herald_->RunOnce(), 0);  // every live member took them

  // n1 restarted (a new incarnation holds nothing of it): asked again, once.
  Peer("n1", 5, true);
  EXPECT_EQ(herald_->RunOnce(), 1);
  EXPECT_EQ(members_.Asked("n1"), 2u);
  EXPECT_EQ(herald_->RunOnce(), 0);
}

TEST_F(HeraldTest, AMemberThatNeverTakesThemIsAskedABoundedNumberOfTimes) {
  lost_ = {{"n3", 33, {Declaration("n3", 33, "n0")}}};
  Peer("n1", 1, true);
  members_.Set("n1", FakeMembers::Answer::kRefuse);
  for (int i = 0; i < 3 * LostDeclarationHerald::kMaxAttempts; ++i) herald_->RunOnce();
  EXPECT_EQ(members_.Asked("n1"), static_cast<size_t>(LostDeclarationHerald::kMaxAttempts));
  Peer("n1", 2, true);  // until it restarts
  EXPECT_EQ(herald_->RunOnce(), 1);
}

TEST_F(HeraldTest, OnlyTheFirstLiveDeclarersHandThemOn) {
  // n0 is the third declarer in node id order: the two before it are live, so it stays quiet.
  lost_ = {
      {"n9",
       99,
       {Declaration("n9", 99, "a1"), Declaration("n9", 99, "a2"), Declaration("n9", 99, "n0")}}};
  Peer("a1", 1, true);
  Peer("a2", 2, true);
  Peer("n5", 5, true);
  EXPECT_EQ(herald_->RunOnce(), 0);
  EXPECT_EQ(members_.Asked("n5"), 0u);
  // a1 is down: n0 is now among the first two live declarers and hands them on.
  Peer("a1", 1, false);
  EXPECT_EQ(herald_->RunOnce(), 2);  // a2 and n5
  EXPECT_EQ(members_.Asked("n5"), 1u);
  // A holder that declared nothing hands them on when no declarer is live in its view.
  lost_ = {{"n9", 99, {Declaration("n9", 99, "a1")}}};
  Peer("n6", 6, true);
  EXPECT_EQ(herald_->RunOnce(), 1);  // n6; the others took them already
  EXPECT_EQ(members_.Asked("n6"), 1u);
}

TEST_F(HeraldTest, AMemberNoLongerLostIsForgotten) {
  lost_ = {{"n3", 33, {Declaration("n3", 33, "n0")}}};
  Peer("n1", 1, true);
  EXPECT_EQ(herald_->RunOnce(), 1);
  lost_.clear();  // n3 came back as a new incarnation
  EXPECT_EQ(herald_->RunOnce(), 0);
  // Declared lost again at its new incarnation: handed on afresh.
  lost_ = {{"n3", 34, {Declaration("n3", 34, "n0")}}};
  EXPECT_EQ(herald_->RunOnce(), 1);
  EXPECT_EQ(members_.Asked("n1"), 2u);
  EXPECT_EQ(members_.Last("n1").incarnation, 34u);
}

}  // namespace
}  // namespace tessera
