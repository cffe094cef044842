// Swim (see swim.h): options, names, bootstrap and read-only views. The protocol: swim.cc.
#include "daemon/membership/swim.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

absl::Status InRange(const char* name, int64_t value, int64_t low, int64_t high) {
  if (value >= low && value <= high) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("swim: ", name, " must be ", low, " to ", high, "; got ", value));
}

}  // namespace

const char* SwimStateName(SwimState state) {
  switch (state) {
    case SwimState::kAlive:
      return "alive";
    case SwimState::kSuspect:
      return "suspect";
    case SwimState::kDead:
      return "dead";
  }
  return "?";
}

uint32_t SwimNames::Table::Intern(const std::string& name) {
  auto [it, inserted] = ids_.emplace(name, static_cast<uint32_t>(names_.size()));
  if (inserted) names_.push_back(&it->first);
  return it->second;
}

std::optional<uint32_t> SwimNames::Table::Find(const std::string& name) const {
  auto it = ids_.find(name);
  if (it == ids_.end()) return std::nullopt;
  return it->second;
}

absl::Status Swim::ValidateOptions(const Options& o) {
  if (o.self_id.empty() || o.self_incarnation == 0 || o.self_address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "swim: self_id, a non-zero self_incarnation and self_address are required; got id '",
        o.self_id, "' incarnation ", o.self_incarnation, " address '", o.self_address, "'"));
  }
  const int64_t window = o.probe_timeout_ms == 0 ? o.protocol_period_ms : o.probe_timeout_ms;
  for (const absl::Status& s :
       {InRange("protocol_period_ms", o.protocol_period_ms, 1, 3600 * 1000),
        InRange("probe_timeout_ms (the probe window)", window, 1, 3600 * 1000),
        InRange("ack_timeout_ms (at most the probe window)", o.ack_timeout_ms, 1, window),
        InRange("indirect_probes", o.indirect_probes, 0, 16),
        InRange("suspicion_mult", o.suspicion_mult, 1, 1000),
        InRange("retransmit_mult", o.retransmit_mult, 1, 1000),
        InRange("max_updates_per_message", o.max_updates_per_message, 1, 1024),
        InRange("seed_probes_per_period", o.seed_probes_per_period, 1, 1024)}) {
    if (!s.ok()) return s;
  }
  if (!o.send) return absl::InvalidArgumentError("swim: the send callback is required");
  return absl::OkStatus();
}

Swim::Swim(Options options)
    : options_(std::move(options)),
      names_(options_.names ? options_.names : std::make_shared<SwimNames>()),
      rng_(options_.random_seed) {
  if (options_.probe_timeout_ms == 0) options_.probe_timeout_ms = options_.protocol_period_ms;
  self_ = names_->nodes.Intern(options_.self_id);
  Grow(self_);
  members_[self_] = Member{options_.self_incarnation, 0,
                           names_->addresses.Intern(options_.self_address)};
  states_[self_] = static_cast<uint8_t>(SwimState::kAlive);
  known_ = live_ = 1;
  AddSeeds(options_.seeds);
}

SwimUpdate Swim::Expand(uint32_t node) const {
  const Member& m = members_[node];
  return SwimUpdate{StateOf(node), names_->nodes.Name(node), m.incarnation, m.version,
                    names_->addresses.Name(m.address)};
}

Swim::MemberView Swim::View(uint32_t node) const {
  const Member& m = members_[node];
  MemberView v;
  v.node_id = names_->nodes.Name(node);
  v.incarnation = m.incarnation;
  v.version = m.version;
  v.address = names_->addresses.Name(m.address);
  v.state = StateOf(node);
  v.lost = lost_.count(node) != 0;
  if (options_.track_last_heard) v.last_heard_ms = last_heard_ms_[node];
  return v;
}

void Swim::Bootstrap(const std::vector<SwimUpdate>& members) {
  std::vector<Update> interned;
  interned.reserve(members.size());
  for (const SwimUpdate& m : members) interned.push_back(Intern(m));
  for (const Update& u : interned) {
    if (u.node == self_ || u.incarnation == 0) continue;
    Grow(u.node);
    if (!Known(u.node)) {
      ++known_;
      if (u.state != SwimState::kDead) ++live_;
    }
    members_[u.node] = Member{u.incarnation, u.version, u.address};
    states_[u.node] = static_cast<uint8_t>(u.state);
    if (options_.bound_relayed_news) vouched_[u.node] = u.version;
  }
  probe_order_.clear();
  probe_next_ = 0;
  for (uint32_t node = 0; node < members_.size(); ++node) {
    if (node == self_ || !Known(node)) continue;
    if (StateOf(node) != SwimState::kDead) probe_order_.push_back(node);
    if (!seeds_.empty()) ResolveSeeds(node);
  }
  std::shuffle(probe_order_.begin(), probe_order_.end(), rng_);
}

void Swim::BootstrapFrom(const Swim& other) {
  members_ = other.members_;
  states_ = other.states_;
  lost_ = other.lost_;
  known_ = other.known_;
  live_ = other.live_;
  Grow(self_);
  // Its view of this daemon may be older than this daemon (or absent).
  Member& me = members_[self_];
  if (me.incarnation == 0) ++known_;
  if (me.incarnation == 0 || StateOf(self_) == SwimState::kDead) ++live_;
  me = Member{options_.self_incarnation, 0, names_->addresses.Intern(options_.self_address)};
  states_[self_] = static_cast<uint8_t>(SwimState::kAlive);
  if (options_.track_last_heard) last_heard_ms_.assign(members_.size(), -1);
  if (options_.bound_relayed_news) {
    vouched_.assign(members_.size(), 0);
    for (uint32_t node = 0; node < members_.size(); ++node) vouched_[node] = members_[node].version;
  }
  Bootstrap({});
}

std::vector<Swim::MemberView> Swim::Members() const {
  std::vector<MemberView> out;
  for (uint32_t node = 0; node < members_.size(); ++node) {
    if (node != self_ && Known(node)) out.push_back(View(node));
  }
  return out;
}

std::vector<std::string> Swim::PendingSeeds() const {
  std::vector<std::string> out;
  for (const Seed& seed : seeds_) {
    if (!seed.resolved) out.push_back(names_->addresses.Name(seed.address));
  }
  return out;
}

std::optional<Swim::MemberView> Swim::Find(const std::string& node_id) const {
  const std::optional<uint32_t> node = names_->nodes.Find(node_id);
  if (!node || !Known(*node)) return std::nullopt;
  return View(*node);
}

bool Swim::IsFenced(const std::string& node_id, uint64_t incarnation) const {
  const std::optional<uint32_t> node = names_->nodes.Find(node_id);
  if (!node || !Known(*node)) return false;
  if (*node == self_ && incarnation == options_.self_incarnation) return self_fenced_;
  return incarnation < members_[*node].incarnation;
}

}  // namespace tessera
