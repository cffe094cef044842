// Swim: the protocol (see swim.h). Options, bootstrap and read-only views: swim_views.cc.
#include "daemon/membership/swim.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

// SWIM's order of updates within one incarnation: a higher version wins; at equal versions
// dead > suspect > alive.
bool Overrides(uint32_t version, SwimState state, uint32_t over_version, SwimState over_state) {
  if (version != over_version) return version > over_version;
  return static_cast<int>(state) > static_cast<int>(over_state);
}

uint32_t ClampVersion(uint64_t version) {
  return static_cast<uint32_t>(std::min<uint64_t>(version, Swim::kLostVersion));
}

}  // namespace

void Swim::Grow(uint32_t node) {
  if (node < members_.size()) return;
  // Up to every node id interned so far: Swims sharing names grow once, not once a member.
  const size_t size = std::max<size_t>(node + 1, names_->nodes.size());
  members_.resize(size);
  states_.resize(size, static_cast<uint8_t>(SwimState::kDead));
  if (options_.track_last_heard) last_heard_ms_.resize(size, -1);
  if (options_.bound_relayed_news) {
    vouched_.resize(size, 0);
    flaps_.resize(size);
  }
}

Swim::Update Swim::Intern(const SwimUpdate& u) {
  return Update{u.state, names_->nodes.Intern(u.node_id), u.incarnation, ClampVersion(u.version),
                names_->addresses.Intern(u.address)};
}

int Swim::Log2Ceil() const {
  int bits = 0;
  while ((uint64_t{1} << bits) < live_ + 1) ++bits;
  return bits;
}

int64_t Swim::SuspicionTimeoutMs() const {
  return int64_t{options_.suspicion_mult} * Log2Ceil() * options_.protocol_period_ms;
}

void Swim::Emit(Event::Kind kind, uint32_t node, bool by_self, SwimState previous,
                uint64_t other_incarnation) {
  if (!options_.on_event) return;
  Event e;
  e.kind = kind;
  e.state = StateOf(node);
  e.previous = previous;
  e.node_id = names_->nodes.Name(node);
  e.incarnation = members_[node].incarnation;
  e.other_incarnation = other_incarnation;
  e.version = members_[node].version;
  e.address = names_->addresses.Name(members_[node].address);
  e.by_self = by_self;
  e.lost = lost_.count(node) != 0;
  Emit(std::move(e));
}

void Swim::Emit(Event event) {
  if (options_.on_event) options_.on_event(event);
}

void Swim::Heard(int64_t now_ms, uint32_t node) {
  if (options_.track_last_heard) last_heard_ms_[node] = now_ms;
}

void Swim::Queue(uint32_t node) {
  auto it = queued_.find(node);
  if (it != queued_.end()) queue_.erase(it->second);
  queued_[node] = queue_.insert(Queued{0, queue_order_++, node}).first;
}

void Swim::Settle(Seed* seed) {
  if (seed->settled) return;
  seed->settled = true;
  --unsettled_seeds_;
}

void Swim::SeedProbeEnded(const Request& r) {
  seeds_[r.seed].in_flight = false;
  Settle(&seeds_[r.seed]);
  seed_retries_in_flight_ -= r.retry;
}

void Swim::Acked(int64_t now_ms, uint32_t node, uint64_t incarnation) {
  for (auto it = probes_.begin(); it != probes_.end();) {
    if (it->second.target == node && it->second.incarnation == incarnation) {
      it = probes_.erase(it);
    } else {
      ++it;
    }
  }
  Heard(now_ms, node);
}

void Swim::ResolveSeeds(uint32_t node) {
  auto it = seed_index_.find(members_[node].address);
  if (it == seed_index_.end()) return;
  Seed& seed = seeds_[it->second];
  if (StateOf(node) != SwimState::kDead) {
    seed.resolved = true;
    seed.member = node;
    Settle(&seed);
  } else if (seed.resolved && seed.member == node) {
    seed.resolved = false;  // probed again: a new incarnation may come up there
  }
}

void Swim::AddSeeds(const std::vector<std::string>& addresses) {
  for (const std::string& a : addresses) {
    if (a.empty() || a == options_.self_address) continue;
    const uint32_t address = names_->addresses.Intern(a);
    if (seed_index_.count(address) != 0) continue;
    seed_index_[address] = seeds_.size();
    seeds_.push_back(Seed{address});
    ++unsettled_seeds_;
  }
  for (uint32_t node = 0; node < members_.size(); ++node) {
    if (node != self_ && Known(node)) ResolveSeeds(node);
  }
}

void Swim::SelfFenced(std::string detail) {
  if (self_fenced_) return;
  self_fenced_ = true;
  Event e;
  e.kind = Event::Kind::kSelfFenced;
  e.node_id = options_.self_id;
  e.incarnation = options_.self_incarnation;
  e.detail = std::move(detail);
  Emit(std::move(e));
}

void Swim::DeclaredLostSelf() {
  if (self_lost_) return;
  self_lost_ = true;
  Emit(Event::Kind::kSelfLost, self_, false, SwimState::kAlive);
}

bool Swim::ApplyAboutSelf(const Update& u, bool relayed) {
  const Member& me = members_[self_];
  if (u.incarnation > me.incarnation) {
    SelfFenced(absl::StrCat("an update names incarnation ", u.incarnation, " of its node id"));
    return false;
  }
  if (u.incarnation < me.incarnation || u.state == SwimState::kAlive || u.version < me.version) {
    return false;
  }
  if (relayed && options_.bound_relayed_news && uint64_t{u.version} > uint64_t{me.version} + 1) {
    ++stats_.relayed_dropped;  // no honest member holds this daemon above its version + 1
    return false;
  }
  if (uint64_t{u.version} + 1 >= kLostVersion) {
    DeclaredLostSelf();
    return false;
  }
  members_[self_].version = u.version + 1;
  ++stats_.refutations;
  Queue(self_);
  Emit(Event::Kind::kRefuted, self_, true, SwimState::kAlive);
  return true;
}

void Swim::Transition(int64_t now_ms, uint32_t node, SwimState from, SwimState to, bool by_self,
                      bool emit) {
  states_[node] = static_cast<uint8_t>(to);
  if (from == to) return;
  if (from == SwimState::kSuspect) suspects_.erase(node);
  if (from == SwimState::kSuspect && to == SwimState::kAlive && options_.bound_relayed_news) {
    Flaps& f = flaps_[node];  // a suspicion refuted: one flap
    if (now_ms - f.window_start_ms >= kFlapWindowPeriods * options_.protocol_period_ms) {
      f = Flaps{now_ms, 0};
    }
    ++f.count;
  }
  if (from == SwimState::kDead) {
    ++live_;
    // Back in this round's probe order, at a random place.
    const size_t at = rng_() % (probe_order_.size() + 1);
    probe_order_.insert(probe_order_.begin() + at, node);
    if (at < probe_next_) ++probe_next_;
  }
  if (to == SwimState::kDead) --live_;
  ResolveSeeds(node);
  Event::Kind kind = Event::Kind::kAlive;
  switch (to) {
    case SwimState::kAlive:
      Heard(now_ms, node);
      break;
    case SwimState::kSuspect:
      suspects_[node] = now_ms + SuspicionTimeoutMs();
      kind = Event::Kind::kSuspect;
      break;
    case SwimState::kDead:
      kind = Event::Kind::kDead;
      break;
  }
  if (emit) Emit(kind, node, by_self, from);
}

void Swim::Vouch(uint32_t node, uint32_t version) {
  if (!options_.bound_relayed_news || node == self_) return;
  vouched_[node] = std::max(vouched_[node], version);
}

bool Swim::BoundRelayed(int64_t now_ms, Update* u) {
  const Member& m = members_[u->node];
  // Each daemon decides a death by its own timer (news of a stranger's death is ignored anyway).
  if (u->state == SwimState::kDead && m.incarnation != 0) u->state = SwimState::kSuspect;
  if (u->state == SwimState::kSuspect && u->incarnation == m.incarnation &&
      StateOf(u->node) == SwimState::kAlive) {
    const Flaps& f = flaps_[u->node];
    if (f.count >= kMaxFlaps &&
        now_ms - f.window_start_ms < kFlapWindowPeriods * options_.protocol_period_ms) {
      // It flapped too often here: only this daemon's own probe may suspect it now.
      ++stats_.relayed_damped;
      prompt_probe_ = u->node;
      return false;
    }
  }
  if (u->incarnation != m.incarnation) {
    // A member, or a newer incarnation of it, introduced by another: only the incarnation is the
    // member's word (its proof), not the version.
    u->version = 0;
    return true;
  }
  const uint64_t limit = uint64_t{vouched_[u->node]} + (u->state == SwimState::kAlive ? 1 : 0);
  if (u->version <= limit) return true;
  ++stats_.relayed_dropped;
  // A suspicion past the member's own word here may still be true (its word here is stale when
  // its refutation came relayed): this daemon probes it itself next, instead of waiting for its
  // round to reach the member.
  if (u->state != SwimState::kAlive && StateOf(u->node) == SwimState::kAlive) {
    prompt_probe_ = u->node;
  }
  return false;
}

bool Swim::Apply(int64_t now_ms, const Update& original, bool by_self, bool relayed) {
  if (original.node == self_) return ApplyAboutSelf(original, relayed);
  if (original.incarnation == 0) return false;
  Grow(original.node);
  Update u = original;
  if (relayed && options_.bound_relayed_news && !BoundRelayed(now_ms, &u)) return false;
  Member& m = members_[u.node];
  if (m.incarnation == 0) {
    // News of the death of a stranger changes nothing here.
    if (u.state == SwimState::kDead) return false;
    m = Member{u.incarnation, u.version, u.address};
    if (options_.bound_relayed_news) vouched_[u.node] = relayed || by_self ? 0 : u.version;
    states_[u.node] = static_cast<uint8_t>(SwimState::kAlive);
    ++known_;
    ++live_;
    const size_t at = rng_() % (probe_order_.size() + 1);
    probe_order_.insert(probe_order_.begin() + at, u.node);
    if (at < probe_next_) ++probe_next_;
    Heard(now_ms, u.node);
    ResolveSeeds(u.node);
    Queue(u.node);
    Emit(Event::Kind::kJoined, u.node, by_self, SwimState::kDead);
    Transition(now_ms, u.node, SwimState::kAlive, u.state, by_self);
    return true;
  }
  if (u.incarnation < m.incarnation) return false;  // about a fenced incarnation
  const SwimState before = StateOf(u.node);
  if (u.incarnation > m.incarnation) {
    const uint64_t old = m.incarnation;
    m = Member{u.incarnation, u.version, u.address};
    if (options_.bound_relayed_news) vouched_[u.node] = relayed || by_self ? 0 : u.version;
    lost_.erase(u.node);
    if (before == SwimState::kSuspect) suspects_.erase(u.node);  // a new identity: a new timer
    Transition(now_ms, u.node, before == SwimState::kSuspect ? SwimState::kAlive : before,
               u.state, by_self, /*emit=*/false);
    Emit(Event::Kind::kReplaced, u.node, by_self, before, old);
    if (u.state == SwimState::kAlive) Heard(now_ms, u.node);
    Queue(u.node);
    return true;
  }
  if (!Overrides(u.version, u.state, m.version, before)) return false;
  m.version = u.version;
  m.address = u.address;
  if (u.state == SwimState::kDead && u.version == kLostVersion) lost_.insert(u.node);
  Transition(now_ms, u.node, before, u.state, by_self);
  if (u.state == SwimState::kAlive) Heard(now_ms, u.node);
  Queue(u.node);
  return true;
}

bool Swim::ApplySender(int64_t now_ms, const SwimMessage& m, uint32_t* node, bool* rebut) {
  *node = names_->nodes.Intern(m.from_id);
  *rebut = false;
  Grow(*node);
  if (*node == self_) {
    // Ourselves, through our own address among the seeds; or another incarnation of our id.
    if (m.from_incarnation > options_.self_incarnation) {
      ApplyAboutSelf(Update{SwimState::kAlive, self_, m.from_incarnation, 0, 0});
    }
    if (m.from_incarnation < options_.self_incarnation) {
      ++stats_.refused;
      return false;
    }
    return true;
  }
  const Member& known = members_[*node];
  if (known.incarnation > m.from_incarnation) {
    ++stats_.refused;
    if (options_.on_event) {
      Event e;
      e.kind = Event::Kind::kRefused;
      e.node_id = m.from_id;
      e.incarnation = m.from_incarnation;
      e.other_incarnation = known.incarnation;
      e.address = m.from_address;
      Emit(std::move(e));
    }
    return false;
  }
  Apply(now_ms, Update{SwimState::kAlive, *node, m.from_incarnation, ClampVersion(m.from_version),
                       names_->addresses.Intern(m.from_address)},
        /*by_self=*/false);
  if (members_[*node].incarnation == m.from_incarnation) {
    Vouch(*node, ClampVersion(m.from_version));
  }
  Acked(now_ms, *node, m.from_incarnation);
  *rebut = StateOf(*node) != SwimState::kAlive;
  return true;
}

void Swim::ApplyUpdates(int64_t now_ms, const SwimMessage& m) {
  for (const SwimUpdate& u : m.updates) {
    if (u.node_id.empty() || u.incarnation == 0) continue;
    const Update update = Intern(u);
    // What the sender says of its own incarnation is its own word.
    const bool own_word = u.node_id == m.from_id && u.incarnation == m.from_incarnation;
    Apply(now_ms, update, /*by_self=*/false, /*relayed=*/!own_word);
    if (own_word && update.node != self_ && members_[update.node].incarnation == u.incarnation) {
      Vouch(update.node, update.version);
    }
  }
}

SwimMessage Swim::NewMessage(SwimMessage::Kind kind, uint64_t seq) const {
  SwimMessage m;
  m.kind = kind;
  m.seq = seq;
  m.from_id = options_.self_id;
  m.from_incarnation = options_.self_incarnation;
  m.from_version = members_[self_].version;
  m.from_address = options_.self_address;
  m.known_members = static_cast<uint32_t>(known_);
  return m;
}

void Swim::Piggyback(SwimMessage* m, std::optional<uint32_t> about, bool fill) {
  const size_t max = static_cast<size_t>(options_.max_updates_per_message);
  std::vector<uint32_t> added;
  auto add = [&](uint32_t node) {
    if (std::find(added.begin(), added.end(), node) != added.end()) return;
    added.push_back(node);
    m->updates.push_back(Expand(node));
  };
  if (about && Known(*about)) add(*about);
  // The least sent first; each taken counts as sent once, and goes after its limit.
  const uint32_t limit = static_cast<uint32_t>(options_.retransmit_mult * Log2Ceil());
  std::vector<Queued> taken;
  while (!queue_.empty() && m->updates.size() < max) {
    Queued q = *queue_.begin();
    queue_.erase(queue_.begin());
    queued_.erase(q.member);
    add(q.member);
    taken.push_back(q);
  }
  for (Queued& q : taken) {
    if (++q.transmits < limit) queued_[q.member] = queue_.insert(q).first;
  }
  // A peer that knows fewer members than this daemon (one joining) gets some of the others.
  if (fill && members_.size() > 1) {
    for (size_t scanned = 0; scanned < 4 * max && m->updates.size() < max; ++scanned) {
      fill_cursor_ = (fill_cursor_ + 1) % members_.size();
      if (fill_cursor_ != self_ && Known(fill_cursor_) &&
          StateOf(fill_cursor_) != SwimState::kDead) {
        add(fill_cursor_);
      }
    }
  }
  stats_.updates_sent += m->updates.size();
  stats_.max_updates_in_message =
      std::max<uint32_t>(stats_.max_updates_in_message, m->updates.size());
}

void Swim::Send(uint32_t address, SwimMessage&& m) {
  // Replies (kAck) are counted where they are made.
  stats_.probes_sent += m.kind == SwimMessage::Kind::kProbe;
  stats_.ping_reqs_sent += m.kind == SwimMessage::Kind::kPingReq;
  stats_.indirect_acks_sent += m.kind == SwimMessage::Kind::kIndirectAck;
  options_.send(names_->addresses.Name(address), std::move(m));
}

uint64_t Swim::NewRequest(Request request) {
  const uint64_t seq = next_seq_++;
  requests_[seq] = request;
  return seq;
}

absl::StatusOr<SwimMessage> Swim::HandleRequest(int64_t now_ms, const SwimMessage& request) {
  using Kind = SwimMessage::Kind;
  if (request.kind == Kind::kAck) {
    return absl::InvalidArgumentError("swim: an ack is a reply; a request is a probe, ping-req "
                                      "or indirect ack");
  }
  if (request.from_id.empty() || request.from_incarnation == 0 || request.from_address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a heartbeat needs the sender's node id, a non-zero incarnation and its address; got "
        "node '", request.from_id, "' incarnation ", request.from_incarnation, " address '",
        request.from_address, "'"));
  }
  if (request.kind != Kind::kProbe &&
      (request.target_id.empty() || request.target_incarnation == 0 ||
       (request.kind == Kind::kPingReq && request.target_address.empty()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a ping-req or indirect ack needs the target's node id, a non-zero incarnation and (for "
        "a ping-req) its address; got node '", request.target_id, "' incarnation ",
        request.target_incarnation, " address '", request.target_address, "'"));
  }
  uint32_t sender = 0;
  bool rebut = false;
  if (!ApplySender(now_ms, request, &sender, &rebut)) {
    const uint64_t newer =
        sender == self_ ? options_.self_incarnation : members_[sender].incarnation;
    return absl::FailedPreconditionError(absl::StrCat(
        "node '", request.from_id, "' incarnation ", request.from_incarnation,
        " is fenced: incarnation ", newer, " of that node id is known, so this one is refused; "
        "restart it to join as a new incarnation"));
  }
  ApplyUpdates(now_ms, request);
  stats_.probes_received += request.kind == Kind::kProbe;
  stats_.ping_reqs_received += request.kind == Kind::kPingReq;
  stats_.indirect_acks_received += request.kind == Kind::kIndirectAck;
  switch (request.kind) {
    case Kind::kPingReq: {
      const Request helper{RequestKind::kHelperProbe,
                           names_->nodes.Intern(request.target_id),
                           request.target_incarnation,
                           request.probe_seq,
                           names_->addresses.Intern(request.target_address),
                           names_->addresses.Intern(request.from_address),
                           now_ms + options_.ack_timeout_ms};
      Grow(helper.member);
      if (helper.member == self_) {
        SendIndirectAck(now_ms, helper, helper.incarnation == options_.self_incarnation);
        break;
      }
      const uint64_t seq = NewRequest(helper);
      SwimMessage probe = NewMessage(Kind::kProbe, seq);
      Piggyback(&probe, StateOf(helper.member) != SwimState::kAlive
                            ? std::optional<uint32_t>(helper.member) : std::nullopt,
                false);
      Send(helper.address, std::move(probe));
      break;
    }
    case Kind::kIndirectAck: {
      auto it = probes_.find(request.probe_seq);
      const std::optional<uint32_t> target = names_->nodes.Find(request.target_id);
      if (it == probes_.end() || !target || *target != it->second.target ||
          request.target_incarnation != it->second.incarnation) {
        break;  // late, or not ours
      }
      if (request.target_acked) {
        Acked(now_ms, *target, request.target_incarnation);
      } else if (++it->second.nacks >= it->second.helpers && it->second.escalated) {
        ProbeFailed(now_ms, request.probe_seq);  // every helper failed too: no need to wait
      }
      break;
    }
    default:
      break;
  }
  SwimMessage reply = NewMessage(Kind::kAck, request.seq);
  Piggyback(&reply, rebut ? std::optional<uint32_t>(sender) : std::nullopt,
            request.known_members < known_);
  ++stats_.acks_sent;
  return reply;
}

void Swim::HandleReply(int64_t now_ms, uint64_t request_seq, const SwimMessage& reply) {
  ++stats_.acks_received;
  std::optional<Request> request;
  if (auto it = requests_.find(request_seq); it != requests_.end()) {
    request = it->second;
    requests_.erase(it);
  } else {
    ++stats_.late_replies;
  }
  uint32_t responder = 0;
  bool rebut = false;
  if (reply.from_id.empty() || reply.from_incarnation == 0 || reply.from_address.empty() ||
      !ApplySender(now_ms, reply, &responder, &rebut)) {
    if (request) RequestEnded(now_ms, *request);
    return;
  }
  ApplyUpdates(now_ms, reply);
  if (!request) return;
  const bool from_target =
      responder == request->member && reply.from_incarnation == request->incarnation;
  switch (request->kind) {
    case RequestKind::kProbe:
      // From the target: ApplySender counted it. From someone else at that address: not.
      if (!from_target) RequestEnded(now_ms, *request);
      break;
    case RequestKind::kSeedProbe:
      SeedProbeEnded(*request);
      seeds_[request->seed].resolved = true;
      seeds_[request->seed].member = responder;
      break;
    case RequestKind::kHelperProbe:
      if (from_target || !request->nacked) SendIndirectAck(now_ms, *request, from_target);
      break;
    case RequestKind::kPingReq:
    case RequestKind::kIndirectAck:
      break;
  }
}

void Swim::HandleFailure(int64_t now_ms, uint64_t request_seq, const absl::Status& why) {
  ++stats_.requests_failed;
  if (absl::IsFailedPrecondition(why)) SelfFenced(std::string(why.message()));
  auto it = requests_.find(request_seq);
  if (it == requests_.end()) return;
  const Request request = it->second;
  requests_.erase(it);
  RequestEnded(now_ms, request);
}

void Swim::RequestEnded(int64_t now_ms, const Request& r) {
  switch (r.kind) {
    case RequestKind::kProbe:
      Escalate(now_ms, r.probe_seq);
      break;
    case RequestKind::kSeedProbe:
      SeedProbeEnded(r);
      break;
    case RequestKind::kHelperProbe:
      if (!r.nacked) SendIndirectAck(now_ms, r, /*acked=*/false);
      break;
    case RequestKind::kPingReq:
    case RequestKind::kIndirectAck:
      break;
  }
}

void Swim::SendIndirectAck(int64_t now_ms, const Request& helper_probe, bool acked) {
  const Request r{RequestKind::kIndirectAck,     helper_probe.member,
                  helper_probe.incarnation,       helper_probe.probe_seq,
                  helper_probe.origin_address,    0,
                  now_ms + options_.probe_timeout_ms};
  SwimMessage m = NewMessage(SwimMessage::Kind::kIndirectAck, NewRequest(r));
  m.probe_seq = helper_probe.probe_seq;
  m.target_id = names_->nodes.Name(helper_probe.member);
  m.target_incarnation = helper_probe.incarnation;
  m.target_address = names_->addresses.Name(helper_probe.address);
  m.target_acked = acked;
  Piggyback(&m, std::nullopt, false);
  Send(r.address, std::move(m));
}

void Swim::Escalate(int64_t now_ms, uint64_t probe_seq) {
  auto it = probes_.find(probe_seq);
  if (it == probes_.end() || it->second.escalated) return;
  Probe& p = it->second;
  p.escalated = true;
  std::vector<uint32_t> helpers;
  const size_t want = static_cast<size_t>(options_.indirect_probes);
  for (size_t attempt = 0; attempt < 4 * want && helpers.size() < want && !probe_order_.empty();
       ++attempt) {
    const uint32_t c = probe_order_[rng_() % probe_order_.size()];
    if (c == self_ || c == p.target || !Known(c) || StateOf(c) != SwimState::kAlive ||
        std::find(helpers.begin(), helpers.end(), c) != helpers.end()) {
      continue;
    }
    helpers.push_back(c);
  }
  p.helpers = static_cast<int>(helpers.size());
  (void)now_ms;
  const Member target = members_[p.target];
  for (uint32_t h : helpers) {
    const Request r{RequestKind::kPingReq, h, members_[h].incarnation, probe_seq,
                    members_[h].address, 0, p.end_ms};
    SwimMessage m = NewMessage(SwimMessage::Kind::kPingReq, NewRequest(r));
    m.probe_seq = probe_seq;
    m.target_id = names_->nodes.Name(p.target);
    m.target_incarnation = p.incarnation;
    m.target_address = names_->addresses.Name(target.address);
    Piggyback(&m, std::nullopt, false);
    Send(r.address, std::move(m));
  }
}

void Swim::ProbeFailed(int64_t now_ms, uint64_t probe_seq) {
  auto it = probes_.find(probe_seq);
  if (it == probes_.end()) return;
  const Probe p = it->second;
  probes_.erase(it);
  if (!Known(p.target) || members_[p.target].incarnation != p.incarnation ||
      StateOf(p.target) != SwimState::kAlive) {
    return;
  }
  const Member& m = members_[p.target];
  if (Apply(now_ms, Update{SwimState::kSuspect, p.target, m.incarnation, m.version, m.address},
            /*by_self=*/true)) {
    ++stats_.suspicions_raised;
  }
}

std::optional<uint32_t> Swim::NextProbeTarget() {
  // A member to probe at once (BoundRelayed), at most every other period, so that relayed news
  // cannot take over the probe round.
  const std::optional<uint32_t> prompt = std::exchange(prompt_probe_, std::nullopt);
  const bool prompted_last = std::exchange(prompted_last_, false);
  if (prompt && !prompted_last && *prompt != self_ && Known(*prompt) &&
      StateOf(*prompt) == SwimState::kAlive) {
    prompted_last_ = true;
    ++stats_.prompt_probes;
    return prompt;
  }
  for (int pass = 0; pass < 2; ++pass) {
    while (probe_next_ < probe_order_.size()) {
      const uint32_t c = probe_order_[probe_next_++];
      if (c != self_ && Known(c) && StateOf(c) != SwimState::kDead) return c;
    }
    // A new round: the members not dead, in a new random order.
    probe_order_.clear();
    probe_next_ = 0;
    for (uint32_t node = 0; node < members_.size(); ++node) {
      if (node != self_ && Known(node) && StateOf(node) != SwimState::kDead) {
        probe_order_.push_back(node);
      }
    }
    std::shuffle(probe_order_.begin(), probe_order_.end(), rng_);
  }
  return std::nullopt;
}

void Swim::StartPeriod(int64_t now_ms) {
  ++stats_.periods;
  if (std::optional<uint32_t> target = NextProbeTarget()) {
    const Member& m = members_[*target];
    const uint64_t seq = next_seq_;
    // An answer counts until the window closes, even after the ping-reqs went out.
    NewRequest(Request{RequestKind::kProbe, *target, m.incarnation, seq, m.address, 0,
                       now_ms + options_.probe_timeout_ms});
    probes_[seq] = Probe{*target, m.incarnation, now_ms + options_.ack_timeout_ms,
                         now_ms + options_.probe_timeout_ms};
    SwimMessage probe = NewMessage(SwimMessage::Kind::kProbe, seq);
    // A suspect hears of it from its prober, and can refute at once.
    Piggyback(&probe, StateOf(*target) != SwimState::kAlive ? target : std::nullopt, false);
    Send(m.address, std::move(probe));
  }
  int budget = options_.seed_probes_per_period;
  for (size_t scanned = 0; budget > 0 && scanned < seeds_.size(); ++scanned) {
    const size_t index = seed_cursor_;
    seed_cursor_ = (seed_cursor_ + 1) % seeds_.size();
    Seed& seed = seeds_[index];
    // Seeds tried before are tried again one at a time: dead addresses must not tie up the
    // transport while a whole window passes for each.
    if (seed.resolved || seed.in_flight || (seed.settled && seed_retries_in_flight_ > 0)) {
      continue;
    }
    seed.in_flight = true;
    seed_retries_in_flight_ += seed.settled;
    --budget;
    const Request r{RequestKind::kSeedProbe, 0, 0, 0, seed.address, 0,
                    now_ms + options_.probe_timeout_ms, index, seed.settled};
    SwimMessage probe = NewMessage(SwimMessage::Kind::kProbe, NewRequest(r));
    Piggyback(&probe, std::nullopt, false);
    Send(r.address, std::move(probe));
  }
}

bool Swim::Tick(int64_t now_ms) {
  for (auto it = requests_.begin(); it != requests_.end();) {
    Request& open = it->second;
    if (open.deadline_ms > now_ms) {
      ++it;
      continue;
    }
    if (open.kind == RequestKind::kHelperProbe && !open.nacked) {
      // Tell the asker in time, and keep listening: a late answer is still good news.
      SendIndirectAck(now_ms, open, /*acked=*/false);
      open.nacked = true;
      open.deadline_ms += options_.probe_timeout_ms - options_.ack_timeout_ms;
      if (open.deadline_ms > now_ms) {
        ++it;
        continue;
      }
    }
    const Request r = it->second;
    it = requests_.erase(it);  // RequestEnded may add requests: map iterators stay valid
    RequestEnded(now_ms, r);
  }
  for (auto it = probes_.begin(); it != probes_.end();) {
    const uint64_t seq = it->first;
    const bool escalate = !it->second.escalated && it->second.escalate_ms <= now_ms;
    const bool due = it->second.end_ms <= now_ms;
    ++it;
    if (escalate) Escalate(now_ms, seq);
    if (due) ProbeFailed(now_ms, seq);
  }
  for (auto it = suspects_.begin(); it != suspects_.end();) {
    const uint32_t node = it->first;
    const bool due = it->second <= now_ms;
    ++it;
    if (!due) continue;
    const Member& m = members_[node];
    if (Apply(now_ms, Update{SwimState::kDead, node, m.incarnation, m.version, m.address},
              /*by_self=*/true)) {
      ++stats_.deaths_declared;
    }
  }
  if (next_period_ms_ >= 0 && now_ms < next_period_ms_) return false;
  next_period_ms_ = next_period_ms_ < 0 ? now_ms + options_.protocol_period_ms
                                        : next_period_ms_ + options_.protocol_period_ms;
  if (next_period_ms_ <= now_ms) next_period_ms_ = now_ms + options_.protocol_period_ms;
  StartPeriod(now_ms);
  return true;
}

int64_t Swim::NextWakeMs() const {
  int64_t wake = next_period_ms_ < 0 ? 0 : next_period_ms_;
  for (const auto& [seq, r] : requests_) wake = std::min(wake, r.deadline_ms);
  for (const auto& [seq, p] : probes_) {
    wake = std::min(wake, p.escalated ? p.end_ms : p.escalate_ms);
  }
  for (const auto& [node, deadline] : suspects_) wake = std::min(wake, deadline);
  return wake;
}

absl::Status Swim::DeclareLost(int64_t now_ms, const std::string& node_id) {
  const std::optional<uint32_t> node = names_->nodes.Find(node_id);
  if (node && *node == self_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", node_id, "' is this daemon: declare it lost from another member"));
  }
  if (!node || !Known(*node)) {
    return absl::NotFoundError(absl::StrCat("no member has node id '", node_id, "'; ", live_,
                                            " members are live (this daemon included)"));
  }
  const Member& m = members_[*node];
  Apply(now_ms, Update{SwimState::kDead, *node, m.incarnation, ClampVersion(kLostVersion),
                       m.address},
        /*by_self=*/true);
  return absl::OkStatus();
}

}  // namespace tessera
