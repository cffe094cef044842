#include "daemon/admin/lost_declaration_herald.h"

#include <algorithm>
#include <set>

#include "common/logging.h"
#include "daemon/membership/incarnation_proof.h"

namespace tessera {

LostDeclarationHerald::LostDeclarationHerald(PeerClient* client, Options options)
    : client_(client), options_(std::move(options)) {}

LostDeclarationHerald::~LostDeclarationHerald() { Stop(); }

void LostDeclarationHerald::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options_.period)) RunOnce();
  });
}

void LostDeclarationHerald::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

bool LostDeclarationHerald::Heralds(const Cluster::LostEvidence& lost,
                                    const std::vector<Cluster::PeerView>& members) const {
  std::set<std::string> alive = {options_.self.node_id};
  for (const Cluster::PeerView& p : members) {
    if (p.alive && !p.node_id.empty()) alive.insert(p.node_id);
  }
  std::set<std::string> declarers;  // sorted; only those live here
  for (const std::string& d : lost.declarations) {
    absl::StatusOr<LostDeclaration> said = ReadLostDeclaration(d);
    if (said.ok() && alive.count(said->declarer) > 0) declarers.insert(said->declarer);
  }
  if (declarers.empty()) return true;
  auto it = declarers.begin();
  for (size_t i = 0; i < kHeralds && it != declarers.end(); ++i, ++it) {
    if (*it == options_.self.node_id) return true;
  }
  return false;
}

int LostDeclarationHerald::RunOnce() {
  absl::MutexLock lock(&mu_);
  const std::vector<Cluster::LostEvidence> lost = options_.lost();
  // Deliveries of members no longer lost here are forgotten with them.
  std::set<std::pair<std::string, uint64_t>> held;
  for (const Cluster::LostEvidence& e : lost) held.emplace(e.node_id, e.incarnation);
  for (auto it = deliveries_.begin(); it != deliveries_.end();) {
    it = held.count(it->first) > 0 ? std::next(it) : deliveries_.erase(it);
  }
  if (lost.empty()) return 0;

  struct Call {
    const Cluster::LostEvidence* evidence;
    Cluster::PeerView member;
    Delivery* delivery;
    absl::StatusOr<LostDeclarationReply> reply = absl::UnknownError("not sent");
  };
  std::vector<Call> calls;
  const std::vector<Cluster::PeerView> members = options_.peers();
  for (const Cluster::LostEvidence& e : lost) {
    if (e.declarations.empty() || !Heralds(e, members)) continue;
    std::map<std::string, Delivery>& to = deliveries_[{e.node_id, e.incarnation}];
    for (const Cluster::PeerView& p : members) {
      if (!p.alive || p.node_id.empty() || p.node_id == e.node_id ||
          p.node_id == options_.self.node_id) {
        continue;
      }
      Delivery& d = to[p.node_id];
      if (d.member_incarnation != p.incarnation) d = Delivery{p.incarnation};
      if (d.taken || d.attempts >= kMaxAttempts) continue;
      calls.push_back(Call{&e, p, &d});
    }
  }
  // At most kMaxConcurrentCalls at a time, so that a round with many members stays bounded.
  for (size_t start = 0; start < calls.size(); start += kMaxConcurrentCalls) {
    const size_t end = std::min(calls.size(), start + kMaxConcurrentCalls);
    std::vector<std::thread> threads;
    for (size_t i = start; i < end; ++i) {
      threads.emplace_back([this, &calls, i] {
        Call& c = calls[i];
        LostDeclarationRequest ask;
        ask.from = options_.self;
        ask.node_id = c.evidence->node_id;
        ask.incarnation = c.evidence->incarnation;
        ask.declarations = c.evidence->declarations;
        c.reply = client_->DeclareLost(PeerTarget(c.member.address, c.member.node_id), ask);
      });
    }
    for (std::thread& t : threads) t.join();
  }
  for (Call& c : calls) {
    Delivery& d = *c.delivery;
    ++d.attempts;
    if (c.reply.ok() && c.reply->applied) {
      d.taken = true;
      Logger("cluster")->info(
          "{} holds {} lost (incarnation {}): handed the {} declarations kept here ({} of {} "
          "live there signed)",
          c.member.node_id, c.evidence->node_id, c.evidence->incarnation,
          c.evidence->declarations.size(), c.reply->signers, c.reply->live_members);
      continue;
    }
    d.last_refusal = c.reply.ok() ? c.reply->reason : c.reply.status().ToString();
    if (d.attempts == kMaxAttempts) {
      Logger("cluster")->warn(
          "{} did not take the declarations that {} (incarnation {}) is lost after {} calls, "
          "and is not asked again until it restarts: {}",
          c.member.node_id, c.evidence->node_id, c.evidence->incarnation, d.attempts,
          d.last_refusal);
    }
  }
  return static_cast<int>(calls.size());
}

}  // namespace tessera
