#include "daemon/membership/cluster.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"

namespace tessera {
namespace {

// "host:port" for every address record of `name`, sorted; empty when it does not resolve.
std::vector<std::string> ResolveDns(const std::string& name, int port) {
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  std::set<std::string> out;
  if (getaddrinfo(name.c_str(), nullptr, &hints, &result) != 0) return {};
  for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
    char host[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, host, sizeof(host));
      out.insert(absl::StrCat(host, ":", port));
    } else if (a->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, host,
                sizeof(host));
      out.insert(absl::StrCat("[", host, "]:", port));
    }
  }
  freeaddrinfo(result);
  return {out.begin(), out.end()};
}

// The proofs one message carries at most, in bytes: below a datagram's limit
// (UdpHeartbeats::kMaxDatagramBytes) with room for the updates and the sender's signature. About
// 60 proofs of the P-256 certificates of tools/make-cluster-certs.sh; the updates of a message
// (Options::max_updates_per_message, 16) need at most 17. Past it, updates go without their
// proofs: a receiver that needs one drops the update, and hears it again later.
constexpr size_t kMaxProofBytesPerMessage = 32 * 1024;
// The proofs read of one message at most; the rest are ignored.
constexpr size_t kMaxProofsReadPerMessage = 64;

// Swim's clock: monotonic milliseconds.
int64_t MonoMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

HeartbeatMessage::Kind ToHeartbeatKind(SwimMessage::Kind kind) {
  switch (kind) {
    case SwimMessage::Kind::kPingReq:
      return HeartbeatMessage::Kind::kPingReq;
    case SwimMessage::Kind::kIndirectAck:
      return HeartbeatMessage::Kind::kIndirectAck;
    default:
      return HeartbeatMessage::Kind::kProbe;
  }
}

SwimMessage::Kind ToSwimKind(HeartbeatMessage::Kind kind) {
  switch (kind) {
    case HeartbeatMessage::Kind::kPingReq:
      return SwimMessage::Kind::kPingReq;
    case HeartbeatMessage::Kind::kIndirectAck:
      return SwimMessage::Kind::kIndirectAck;
    case HeartbeatMessage::Kind::kProbe:
      break;
  }
  return SwimMessage::Kind::kProbe;
}

HeartbeatMessage ToHeartbeat(SwimMessage&& m) {
  HeartbeatMessage h;
  h.from = MemberInfo{std::move(m.from_id), m.from_incarnation, std::move(m.from_address)};
  h.updates = std::move(m.updates);
  h.sent_unix_ms = static_cast<uint64_t>(NowUnixMs());
  h.kind = ToHeartbeatKind(m.kind);
  h.seq = m.seq;
  h.version = m.from_version;
  h.probe_seq = m.probe_seq;
  h.target = MemberInfo{std::move(m.target_id), m.target_incarnation,
                        std::move(m.target_address)};
  h.target_acked = m.target_acked;
  h.known_members = m.known_members;
  return h;
}

SwimMessage ToSwim(const HeartbeatMessage& h) {
  SwimMessage m;
  m.kind = ToSwimKind(h.kind);
  m.seq = h.seq;
  m.from_id = h.from.node_id;
  m.from_incarnation = h.from.incarnation;
  m.from_version = h.version;
  m.from_address = h.from.address;
  m.probe_seq = h.probe_seq;
  m.target_id = h.target.node_id;
  m.target_incarnation = h.target.incarnation;
  m.target_address = h.target.address;
  m.target_acked = h.target_acked;
  m.known_members = h.known_members;
  m.updates = h.updates;
  return m;
}

SwimMessage ToSwim(HeartbeatReply&& r) {
  SwimMessage m;
  m.kind = SwimMessage::Kind::kAck;
  m.from_id = std::move(r.peer.node_id);
  m.from_incarnation = r.peer.incarnation;
  m.from_version = r.version;
  m.from_address = std::move(r.peer.address);
  m.known_members = r.known_members;
  m.updates = std::move(r.updates);
  return m;
}

HeartbeatReply ToReply(SwimMessage&& m) {
  HeartbeatReply r;
  r.peer = MemberInfo{std::move(m.from_id), m.from_incarnation, std::move(m.from_address)};
  r.updates = std::move(m.updates);
  r.version = m.from_version;
  r.known_members = m.known_members;
  return r;
}

}  // namespace

int64_t NowUnixMs() { return absl::ToUnixMillis(absl::Now()); }

Swim::Options Cluster::SwimOptions(const Options& options) {
  Swim::Options o;
  o.self_id = options.self_id;
  o.self_incarnation = options.incarnation;
  o.self_address = options.self_address;
  o.protocol_period_ms = options.heartbeat_ms;
  o.probe_timeout_ms = std::max(options.heartbeat_ms, options.timeout_ms);
  o.ack_timeout_ms = std::max<int64_t>(1, o.probe_timeout_ms / 2);
  o.indirect_probes = options.indirect_probes;
  o.suspicion_mult = options.suspicion_mult;
  o.retransmit_mult = options.retransmit_mult;
  o.max_updates_per_message = options.max_updates_per_message;
  o.seed_probes_per_period = options.seed_probes_per_period;
  // Determinism matters in simulations; here each daemon only needs its own sequence.
  o.random_seed = options.incarnation ^ std::hash<std::string>()(options.self_id);
  o.seeds = options.members;
  // With proofs the transport authenticates each sender: what it relays about another member is
  // bounded by that member's own word (swim.h).
  o.bound_relayed_news = options.proofs != nullptr;
  return o;
}

Cluster::Cluster(Options options, HeartbeatSender* client)
    : options_(std::move(options)), client_(client) {
  Swim::Options o = SwimOptions(options_);
  o.send = [this](const std::string& address, SwimMessage&& message)
                ABSL_NO_THREAD_SAFETY_ANALYSIS {  // Swim runs under mu_
                  produced_.push_back(Outgoing{address, std::move(message)});
                };
  o.on_event = [this](const Swim::Event& e) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    events_.push_back(e);
  };
  if (absl::Status s = Swim::ValidateOptions(o); !s.ok() || options_.send_threads < 1) {
    std::fprintf(stderr, "tesserad: invalid cluster options: %s\n",
                 s.ok() ? "send_threads must be at least 1" : std::string(s.message()).c_str());
    std::abort();
  }
  absl::MutexLock lock(&mu_);
  swim_ = std::make_unique<Swim>(std::move(o));
}

Cluster::~Cluster() { Stop(); }

void Cluster::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_ || stopping_) return;
    started_ = true;
  }
  for (int i = 0; i < options_.send_threads; ++i) senders_.emplace_back([this] { SendLoop(); });
  thread_ = std::thread([this] { Run(); });
}

void Cluster::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
  for (std::thread& t : senders_) t.join();
  senders_.clear();
}

int64_t Cluster::UnixMsOf(int64_t mono_ms) const {
  return mono_ms < 0 ? -1 : NowUnixMs() - (MonoMs() - mono_ms);
}

void Cluster::FlushLocked(int64_t now_ms) {
  // Handing a message over may fail at once (the queue is full), and Swim's answer to that
  // failure may be more messages: loop until none is left.
  while (!produced_.empty()) {
    std::vector<Outgoing> batch;
    batch.swap(produced_);
    for (Outgoing& out : batch) {
      if (queue_.size() < options_.max_queued_sends) {
        queue_.push_back(std::move(out));
        continue;
      }
      ++sends_dropped_;
      swim_->HandleFailure(now_ms, out.message.seq,
                           absl::ResourceExhaustedError("the heartbeat send queue is full"));
    }
  }
  planned_wake_ms_ = std::min(planned_wake_ms_, swim_->NextWakeMs());
}

void Cluster::Run() {
  for (;;) {
    const int64_t now = MonoMs();
    bool period = false;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      period = swim_->Tick(now);
      planned_wake_ms_ = swim_->NextWakeMs();
      FlushLocked(now);
    }
    Dispatch();
    if (period) {
      RefreshDns(now);
      if (options_.after_round) options_.after_round();
    }
    absl::MutexLock lock(&mu_);
    // Wakes early when a reply or a request brought a deadline forward.
    auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || planned_wake_ms_ <= MonoMs();
    };
    const int64_t wait_ms = std::max<int64_t>(0, planned_wake_ms_ - MonoMs());
    mu_.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(wait_ms));
  }
}

void Cluster::SendLoop() {
  for (;;) {
    Outgoing out;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Cluster* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
            return c->stopping_ || !c->queue_.empty();
          },
          this));
      if (stopping_) return;
      out = std::move(queue_.front());
      queue_.pop_front();
    }
    const uint64_t seq = out.message.seq;
    HeartbeatMessage request = ToHeartbeat(std::move(out.message));
    request.incarnation_proofs = ProofsFor(request.updates);
    absl::StatusOr<HeartbeatReply> reply = client_->Heartbeat(out.address, request);
    SwimMessage answer;
    ProofOutcomes proven;
    if (reply.ok()) {
      if (reply->peer.address.empty()) reply->peer.address = out.address;
      const std::vector<std::string> carried = std::move(reply->incarnation_proofs);
      answer = ToSwim(*std::move(reply));
      proven = CheckProofs(answer, carried);
    }
    absl::Status failure = reply.status();
    std::optional<std::string> refusal_ignored;
    if (absl::IsFailedPrecondition(failure) && options_.proofs != nullptr) {
      refusal_ignored = CheckRefusal(failure);
      if (refusal_ignored) {
        // Not fenced on the refuser's word: the call failed, as one the peer did not answer.
        failure = absl::UnavailableError(absl::StrCat(
            "refused as fenced by ", out.address, " without a valid proof of a newer incarnation "
            "of ", options_.self_id, ": ", *refusal_ignored));
      }
    }
    {
      absl::MutexLock lock(&mu_);
      const int64_t now = MonoMs();
      if (reply.ok()) {
        ScreenLocked(proven, &answer);
        swim_->HandleReply(now, seq, answer);
      } else {
        ++sends_failed_;
        if (refusal_ignored) {
          ++refusals_unproven_;
          dropped_.emplace_back("refusal", std::string(failure.message()));
        }
        swim_->HandleFailure(now, seq, failure);
      }
      FlushLocked(now);
    }
    Dispatch();
  }
}

absl::StatusOr<HeartbeatReply> Cluster::OnHeartbeat(const HeartbeatMessage& message) {
  SwimMessage request = ToSwim(message);
  const ProofOutcomes proven = CheckProofs(request, message.incarnation_proofs);
  absl::StatusOr<SwimMessage> reply;
  uint64_t newer = 0;  // the incarnation that fences the sender, when it is refused so
  {
    absl::MutexLock lock(&mu_);
    const int64_t now = MonoMs();
    ScreenLocked(proven, &request);
    reply = swim_->HandleRequest(now, request);
    if (absl::IsFailedPrecondition(reply.status())) newer = HeldLocked(request.from_id).incarnation;
    FlushLocked(now);
  }
  Dispatch();
  if (!reply.ok() && newer != 0 && options_.proofs != nullptr) {
    // The refused daemon fences itself only on its node's own word: the newer incarnation's
    // proof, which this daemon holds (it took that incarnation only with it, or first-hand with
    // it attached).
    if (std::optional<IncarnationProofs::Held> held =
            options_.proofs->Find(request.from_id, newer);
        held && held->proof != nullptr) {
      return WithStatusDetails(reply.status(), *held->proof);
    }
  }
  if (!reply.ok()) return reply.status();
  HeartbeatReply answer = ToReply(*std::move(reply));
  answer.incarnation_proofs = ProofsFor(answer.updates);
  return answer;
}

Cluster::Held Cluster::HeldLocked(const std::string& node_id) const {
  if (node_id == options_.self_id) return Held{options_.incarnation, options_.self_address};
  std::optional<Swim::MemberView> m = swim_->Find(node_id);
  if (!m) return Held{};
  return Held{m->incarnation, std::move(m->address)};
}

bool Cluster::NeedsProofLocked(const SwimMessage& m, const SwimUpdate& u) const {
  if (u.node_id.empty() || u.incarnation == 0) return false;  // Swim ignores it
  // The sender's own incarnation is its own word, which the transport authenticated.
  if (u.node_id == m.from_id && u.incarnation == m.from_incarnation) return false;
  return u.incarnation > HeldLocked(u.node_id).incarnation;
}

Cluster::ProofOutcomes Cluster::CheckProofs(const SwimMessage& m,
                                            const std::vector<std::string>& carried) {
  ProofOutcomes outcomes;
  if (options_.proofs == nullptr) return outcomes;
  struct Carried {
    IncarnationClaim claim;
    const std::string* proof;
  };
  std::vector<Carried> claims;  // read, not checked
  for (size_t i = 0; i < carried.size() && i < kMaxProofsReadPerMessage; ++i) {
    absl::StatusOr<IncarnationClaim> claim = ReadIncarnationClaim(carried[i]);
    if (claim.ok()) claims.push_back(Carried{*std::move(claim), &carried[i]});
  }
  std::set<std::pair<std::string, uint64_t>> wanted;
  {
    absl::MutexLock lock(&mu_);
    if (HeldLocked(m.from_id).incarnation > m.from_incarnation) return outcomes;  // refused
    for (const SwimUpdate& u : m.updates) {
      if (NeedsProofLocked(m, u)) wanted.insert({u.node_id, u.incarnation});
    }
    // A proof of an incarnation held here, or of the sender's: kept, to relay it.
    for (const Carried& c : claims) {
      if (c.claim.incarnation == HeldLocked(c.claim.node_id).incarnation ||
          (c.claim.node_id == m.from_id && c.claim.incarnation == m.from_incarnation)) {
        wanted.insert({c.claim.node_id, c.claim.incarnation});
      }
    }
  }
  for (const auto& key : wanted) {
    if (std::optional<IncarnationProofs::Held> held =
            options_.proofs->Find(key.first, key.second)) {
      outcomes.emplace(key, std::move(held->address));
    }
  }
  for (const Carried& c : claims) {
    const auto key = std::make_pair(c.claim.node_id, c.claim.incarnation);
    auto known = outcomes.find(key);
    if (wanted.count(key) == 0 || (known != outcomes.end() && known->second.ok())) continue;
    absl::StatusOr<IncarnationClaim> checked = options_.proofs->Check(*c.proof, m.from_id);
    if (checked.ok()) {
      outcomes.insert_or_assign(key, std::move(checked->address));
    } else if (known == outcomes.end()) {
      outcomes.emplace(key, checked.status());
    }
  }
  return outcomes;
}

void Cluster::ScreenLocked(const ProofOutcomes& outcomes, SwimMessage* m) {
  // Without proofs, nothing to screen; from a fenced sender, Swim refuses the whole message.
  if (options_.proofs == nullptr || HeldLocked(m->from_id).incarnation > m->from_incarnation) {
    return;
  }
  std::vector<SwimUpdate> kept;
  kept.reserve(m->updates.size());
  for (SwimUpdate& u : m->updates) {
    const Held held = HeldLocked(u.node_id);
    if (u.incarnation != 0 && u.incarnation == held.incarnation) {
      u.address = held.address;  // relayed news of an incarnation held never moves it
    } else if (NeedsProofLocked(*m, u)) {
      auto it = outcomes.find({u.node_id, u.incarnation});
      if (it != outcomes.end() && it->second.ok()) {
        u.address = *it->second;
      } else {
        const char* reason = "unproven";
        std::string why = absl::StrCat("no proof signed by ", u.node_id, " came with it");
        if (it == outcomes.end()) {
          ++updates_unproven_;
        } else if (absl::IsResourceExhausted(it->second.status())) {
          reason = "unchecked";
          ++updates_proof_unchecked_;
          why = std::string(it->second.status().message());
        } else {
          reason = "refused";
          ++updates_proof_refused_;
          why = std::string(it->second.status().message());
        }
        // Not the update's address: it is what the sender claims, and may be anyone's.
        dropped_.emplace_back(
            reason, absl::StrCat(m->from_id, " relayed incarnation ", u.incarnation, " of ",
                                 u.node_id, " (", SwimStateName(u.state), "; incarnation ",
                                 held.incarnation, " held here): ", why));
        continue;
      }
    }
    kept.push_back(std::move(u));
  }
  m->updates = std::move(kept);
}

std::optional<std::string> Cluster::CheckRefusal(const absl::Status& refusal) {
  const std::optional<std::string> proof = StatusDetails(refusal);
  if (!proof) return "no proof came with it";
  absl::StatusOr<IncarnationClaim> claim =
      options_.proofs->Check(*proof, absl::StrCat("refusal of ", options_.self_id));
  if (!claim.ok()) return std::string(claim.status().message());
  if (claim->node_id != options_.self_id || claim->incarnation <= options_.incarnation) {
    return absl::StrCat("the proof that came with it is of ", claim->node_id, " incarnation ",
                        claim->incarnation, ", not of a newer incarnation than ",
                        options_.incarnation, " of ", options_.self_id);
  }
  return std::nullopt;
}

std::vector<std::string> Cluster::ProofsFor(const std::vector<SwimUpdate>& updates) const {
  std::vector<std::string> out;
  if (options_.proofs == nullptr) return out;
  std::set<std::pair<std::string, uint64_t>> added;
  size_t bytes = 0;
  auto add = [&](const std::string& node_id, uint64_t incarnation) {
    if (!added.insert({node_id, incarnation}).second) return;
    std::optional<IncarnationProofs::Held> held = options_.proofs->Find(node_id, incarnation);
    if (!held || held->proof == nullptr || bytes + held->proof->size() > kMaxProofBytesPerMessage) {
      return;
    }
    bytes += held->proof->size();
    out.push_back(*held->proof);
  };
  add(options_.self_id, options_.incarnation);
  for (const SwimUpdate& u : updates) add(u.node_id, u.incarnation);
  return out;
}

void Cluster::Dispatch() {
  absl::MutexLock order(&dispatch_mu_);
  std::vector<Swim::Event> events;
  {
    absl::MutexLock lock(&mu_);
    events.swap(events_);
  }
  for (const Swim::Event& e : events) Report(e);
  LogDropped();
}

void Cluster::LogDropped() {
  std::vector<std::pair<const char*, std::string>> dropped;
  {
    absl::MutexLock lock(&mu_);
    dropped.swap(dropped_);
  }
  const absl::Time now = absl::Now();
  for (const auto& [reason, line] : dropped) {
    DropLog& log = dropped_logged_[reason];
    if (now - log.last < absl::Seconds(10)) {
      ++log.unlogged;
      continue;
    }
    Logger("cluster")->warn(
        "{} ({}): {} (logged at most once per 10 s per reason{}; "
        "tessera_membership_updates_dropped_total counts them)",
        std::string(reason) == "refusal" ? "fencing refusal not obeyed" : "membership update dropped",
        reason, line,
        log.unlogged == 0 ? std::string()
                          : absl::StrCat(", ", log.unlogged, " more since the last line"));
    log.last = now;
    log.unlogged = 0;
  }
}

void Cluster::Report(const Swim::Event& e) {
  using Kind = Swim::Event::Kind;
  auto log = Logger("cluster");
  std::optional<bool> change;  // for on_change
  switch (e.kind) {
    case Kind::kJoined:
      log->info("member {} at {} joined (incarnation {})", e.node_id, e.address, e.incarnation);
      change = true;
      break;
    case Kind::kAlive:
      log->info("member {} at {} is alive again: it refuted the {} (version {})", e.node_id,
                e.address, e.previous == SwimState::kDead ? "death" : "suspicion", e.version);
      if (e.previous == SwimState::kDead) change = true;
      break;
    case Kind::kSuspect:
      log->warn("member {} at {} suspected: {}", e.node_id, e.address,
                e.by_self ? "no answer to a direct or indirect probe"
                          : "another member could not reach it");
      break;
    case Kind::kDead:
      if (e.lost) {
        log->warn("member {} at {} (incarnation {}) declared lost by an operator: dead until a "
                  "new incarnation joins", e.node_id, e.address, e.incarnation);
      } else {
        log->warn("member {} at {} is dead: {}", e.node_id, e.address,
                  e.by_self ? "suspected for the whole suspicion timeout without refuting"
                            : "another member's suspicion of it timed out");
      }
      change = false;
      break;
    case Kind::kReplaced:
      log->warn("member {} at {} restarted: incarnation {} -> {} ({}); incarnation {} is fenced",
                e.node_id, e.address, e.other_incarnation, e.incarnation, SwimStateName(e.state),
                e.other_incarnation);
      if (e.state == SwimState::kAlive) change = true;
      if (e.state == SwimState::kDead && e.previous != SwimState::kDead) change = false;
      break;
    case Kind::kRefuted:
      log->info("this daemon was suspected or declared dead; refuted with version {}", e.version);
      break;
    case Kind::kSelfLost:
      log->error("this daemon ({} incarnation {}) was declared lost by an operator and cannot "
                 "refute it: restart it to rejoin as a new incarnation", e.node_id,
                 e.incarnation);
      break;
    case Kind::kSelfFenced:
      log->error("this daemon ({} incarnation {}) is fenced ({}): a newer incarnation of its "
                 "node id is known, and its heartbeats are refused; stop it", e.node_id,
                 options_.incarnation, e.detail);
      if (options_.on_self_fenced) options_.on_self_fenced();
      break;
    case Kind::kRefused:
      // Once at warn per zombie; it keeps trying every period.
      log->log(refused_logged_.insert({e.node_id, e.incarnation}).second ? spdlog::level::warn
                                                                          : spdlog::level::debug,
               "refused a heartbeat from {} incarnation {} at {}: fenced by incarnation {}",
               e.node_id, e.incarnation, e.address, e.other_incarnation);
      break;
  }
  if (change && options_.on_change) options_.on_change(e.node_id, *change);
  const bool live_set = e.kind == Kind::kJoined || e.kind == Kind::kAlive ||
                        e.kind == Kind::kSuspect || e.kind == Kind::kDead ||
                        e.kind == Kind::kReplaced;
  if (live_set && options_.on_live_set_change) options_.on_live_set_change();
}

void Cluster::RefreshDns(int64_t now_ms) {
  if (options_.dns_name.empty()) return;
  if (last_dns_ms_ >= 0 && now_ms - last_dns_ms_ < options_.dns_refresh_ms) return;
  last_dns_ms_ = now_ms;
  std::vector<std::string> found = ResolveDns(options_.dns_name, options_.dns_port);
  if (found.empty()) {
    Logger("cluster")->warn("{} does not resolve; keeping the members known", options_.dns_name);
    return;
  }
  absl::MutexLock lock(&mu_);
  const size_t before = swim_->seed_count();
  swim_->AddSeeds(found);
  if (swim_->seed_count() > before) {
    Logger("cluster")->info("{} lists {} new member addresses", options_.dns_name,
                            swim_->seed_count() - before);
  }
}

std::vector<std::string> Cluster::LiveNodeIds() const {
  std::vector<std::string> ids = {options_.self_id};
  {
    absl::MutexLock lock(&mu_);
    for (const Swim::MemberView& m : swim_->Members()) {
      if (m.state == SwimState::kAlive) ids.push_back(m.node_id);
    }
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::optional<std::string> Cluster::AddressOf(const std::string& node_id) const {
  if (node_id == options_.self_id) return options_.self_address;
  absl::MutexLock lock(&mu_);
  std::optional<Swim::MemberView> m = swim_->Find(node_id);
  if (!m || m->state != SwimState::kAlive) return std::nullopt;
  return m->address;
}

std::optional<uint64_t> Cluster::IncarnationOf(const std::string& node_id) const {
  absl::MutexLock lock(&mu_);
  if (node_id == options_.self_id) return options_.incarnation;
  std::optional<Swim::MemberView> m = swim_->Find(node_id);
  if (!m) return std::nullopt;
  return m->incarnation;
}

bool Cluster::IsFenced(const std::string& node_id, uint64_t incarnation) const {
  absl::MutexLock lock(&mu_);
  return swim_->IsFenced(node_id, incarnation);
}

bool Cluster::Converged() const {
  absl::MutexLock lock(&mu_);
  return swim_->Converged();
}

int64_t Cluster::SuspicionTimeoutMs() const {
  absl::MutexLock lock(&mu_);
  return swim_->SuspicionTimeoutMs();
}

int64_t Cluster::ConvergenceBoundMs() const {
  absl::MutexLock lock(&mu_);
  const int64_t per_period = options_.seed_probes_per_period;
  const int64_t periods =
      (static_cast<int64_t>(swim_->seed_count()) + per_period - 1) / per_period;
  return (periods + 1) * options_.heartbeat_ms + std::max(options_.heartbeat_ms,
                                                          options_.timeout_ms);
}

absl::Status Cluster::DeclareLost(const std::string& node_id, bool force) {
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    const int64_t now = MonoMs();
    std::optional<Swim::MemberView> m = swim_->Find(node_id);
    if (!force && node_id != options_.self_id && m && m->state == SwimState::kAlive) {
      return absl::FailedPreconditionError(absl::StrCat(
          "'", node_id, "' (incarnation ", m->incarnation, ", ", m->address, ") is alive here: "
          "declaring it lost fences that daemon, which then exits. Declare lost only a node that "
          "is gone for good, or pass force to fence it anyway"));
    }
    status = swim_->DeclareLost(now, node_id);
    if (status.ok()) FlushLocked(now);
  }
  if (status.ok()) {
    Logger("cluster")->warn("{} declared lost by an operator{}: fenced until a newer incarnation "
                            "joins, and no longer counted in majorities",
                            node_id, force ? " (forced)" : "");
  }
  Dispatch();
  return status;
}

Cluster::Quorum Cluster::CountQuorum() const {
  Quorum q;
  q.live = q.members = 1;  // this daemon
  absl::MutexLock lock(&mu_);
  std::set<std::string> known_addresses;
  for (const Swim::MemberView& m : swim_->Members()) {
    known_addresses.insert(m.address);
    if (m.lost) continue;
    ++q.members;
    if (m.state == SwimState::kAlive) ++q.live;
  }
  for (const std::string& address : swim_->PendingSeeds()) {
    if (known_addresses.count(address) == 0 && address != options_.self_address) ++q.members;
  }
  return q;
}

bool Cluster::IsDeclaredLost(const std::string& node_id) const {
  absl::MutexLock lock(&mu_);
  std::optional<Swim::MemberView> m = swim_->Find(node_id);
  return m && m->lost;
}

std::vector<Cluster::PeerView> Cluster::Peers() const {
  std::vector<PeerView> out;
  absl::MutexLock lock(&mu_);
  for (const Swim::MemberView& m : swim_->Members()) {
    out.push_back(PeerView{m.address, m.node_id, m.incarnation, UnixMsOf(m.last_heard_ms),
                           m.state == SwimState::kAlive});
  }
  std::set<std::string> known;
  for (const PeerView& p : out) known.insert(p.address);
  for (const std::string& address : swim_->PendingSeeds()) {
    if (known.count(address) == 0) out.push_back(PeerView{address, "", 0, -1, false});
  }
  return out;
}

Cluster::Stats Cluster::stats() const {
  Stats s;
  absl::MutexLock lock(&mu_);
  s.swim = swim_->stats();
  s.sends_dropped = sends_dropped_;
  s.sends_failed = sends_failed_;
  s.updates_unproven = updates_unproven_;
  s.updates_proof_refused = updates_proof_refused_;
  s.updates_proof_unchecked = updates_proof_unchecked_;
  s.refusals_unproven = refusals_unproven_;
  for (const Swim::MemberView& m : swim_->Members()) {
    (m.state == SwimState::kAlive ? s.alive : m.state == SwimState::kSuspect ? s.suspect : s.dead)++;
  }
  return s;
}

namespace {

absl::Status NeedsProofs() {
  return absl::FailedPreconditionError(
      "signed declarations that a member is lost go with mutual TLS (cluster.tls_*); without it "
      "a declaration is gossiped");
}

}  // namespace

absl::StatusOr<std::string> Cluster::SignLostDeclaration(const std::string& node_id,
                                                         uint64_t incarnation,
                                                         bool operator_word) {
  if (options_.proofs == nullptr) return NeedsProofs();
  if (node_id == options_.self_id) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", node_id, "' is this daemon: it does not declare itself lost"));
  }
  {
    absl::MutexLock lock(&mu_);
    std::optional<Swim::MemberView> m = swim_->Find(node_id);
    if (!m || m->incarnation != incarnation) {
      return absl::NotFoundError(absl::StrCat(
          options_.self_id, " holds ",
          m ? absl::StrCat("incarnation ", m->incarnation, " of '", node_id, "'")
            : absl::StrCat("no member '", node_id, "'"),
          ", not incarnation ", incarnation));
    }
    if (!operator_word && !m->lost && m->state != SwimState::kDead) {
      return absl::FailedPreconditionError(absl::StrCat(
          "'", node_id, "' is ", SwimStateName(m->state), " in ", options_.self_id,
          "'s view: a member declares lost only a member dead by its own timer, or on its own "
          "operator's word"));
    }
  }
  return MakeLostDeclaration(options_.proofs->signer(),
                             LostDeclaration{node_id, incarnation, options_.self_id});
}

absl::StatusOr<LostDeclaration> Cluster::CheckLostDeclaration(const std::string& declaration) {
  if (options_.proofs == nullptr) return NeedsProofs();
  {
    absl::MutexLock lock(&declarations_mu_);
    if (declarations_verified_.count(declaration) > 0) return ReadLostDeclaration(declaration);
  }
  TESSERA_ASSIGN_OR_RETURN(LostDeclaration d,
                           VerifyLostDeclaration(options_.proofs->signer(), declaration));
  absl::MutexLock lock(&declarations_mu_);
  if (declarations_verified_.size() >= 4096) declarations_verified_.clear();
  declarations_verified_.insert(declaration);
  return d;
}

absl::StatusOr<Cluster::LostTally> Cluster::TakeLostDeclarations(
    const std::string& node_id, uint64_t incarnation,
    const std::vector<std::string>& declarations) {
  if (options_.proofs == nullptr) return NeedsProofs();
  LostTally tally;
  std::set<std::string> counted;
  std::vector<std::string> kept;  // the declarations counted, kept once the member is lost here
  absl::StatusOr<std::string> own = SignLostDeclaration(node_id, incarnation, false);
  if (own.ok()) {
    tally.own_declaration = *own;
    counted.insert(options_.self_id);
    kept.push_back(*own);
  } else if (absl::IsInvalidArgument(own.status())) {
    return own.status();  // this daemon itself
  } else {
    tally.reason = std::string(own.status().message());
  }
  std::set<std::string> declarers;  // members live here, other than node_id
  bool lost_here = false;
  tally.live = 1;
  {
    absl::MutexLock lock(&mu_);
    for (const Swim::MemberView& m : swim_->Members()) {
      if (m.node_id == node_id && m.incarnation == incarnation && m.lost) lost_here = true;
      if (m.state != SwimState::kAlive || m.lost) continue;
      ++tally.live;
      if (m.node_id != node_id) declarers.insert(m.node_id);
    }
  }
  // Each declarer is checked at most once here, and one that would count but does not verify
  // refuses the whole call: a caller that pads its call with forged declarations costs one
  // signature check.
  for (const std::string& declaration : declarations) {
    absl::StatusOr<LostDeclaration> said = ReadLostDeclaration(declaration);
    if (!said.ok() || said->node_id != node_id || said->incarnation != incarnation ||
        declarers.count(said->declarer) == 0 || counted.count(said->declarer) > 0) {
      continue;
    }
    absl::StatusOr<LostDeclaration> verified = CheckLostDeclaration(declaration);
    if (!verified.ok()) {
      return absl::UnauthenticatedError(absl::StrCat("the declaration of ", said->declarer,
                                                     " that '", node_id, "' is lost: ",
                                                     verified.status().message()));
    }
    counted.insert(said->declarer);
    kept.push_back(declaration);
  }
  tally.signers.assign(counted.begin(), counted.end());
  if (lost_here) {
    tally.applied = true;
    KeepLostDeclarations(node_id, incarnation, kept);
    return tally;
  }
  if (counted.size() * 2 <= tally.live) {
    tally.reason = absl::StrCat(
        counted.size(), " of the ", tally.live, " members live in ", options_.self_id,
        "'s view declared '", node_id, "' lost (", absl::StrJoin(tally.signers, ", "),
        "): a majority is ", tally.live / 2 + 1, tally.reason.empty() ? "" : "; ", tally.reason);
    return tally;
  }
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    std::optional<Swim::MemberView> m = swim_->Find(node_id);
    if (!m || m->incarnation != incarnation) {
      tally.reason = absl::StrCat("incarnation ", incarnation, " of '", node_id,
                                  "' is no longer the one held here");
      return tally;
    }
    const int64_t now = MonoMs();
    status = swim_->DeclareLost(now, node_id);
    if (status.ok()) FlushLocked(now);
  }
  if (status.ok()) {
    tally.applied = true;
    tally.reason.clear();
    KeepLostDeclarations(node_id, incarnation, kept);
    Logger("cluster")->warn(
        "{} declared lost by {} of the {} members live here ({}): fenced until a newer "
        "incarnation joins, and no longer counted in majorities",
        node_id, counted.size(), tally.live, absl::StrJoin(tally.signers, ", "));
  } else {
    tally.reason = std::string(status.message());
  }
  Dispatch();
  return tally;
}

void Cluster::KeepLostDeclarations(const std::string& node_id, uint64_t incarnation,
                                   const std::vector<std::string>& declarations) {
  if (options_.proofs == nullptr) return;
  absl::MutexLock lock(&declarations_mu_);
  auto it = lost_kept_.find(node_id);
  if (it == lost_kept_.end()) {
    if (lost_kept_.size() >= kMaxLostKept) return;
    it = lost_kept_
             .emplace(node_id, std::make_pair(incarnation, std::map<std::string, std::string>()))
             .first;
  }
  if (it->second.first != incarnation) it->second = {incarnation, {}};
  for (const std::string& d : declarations) {
    // Only declarations of this member and incarnation, one per declarer; the callers pass
    // declarations that verified here.
    absl::StatusOr<LostDeclaration> said = ReadLostDeclaration(d);
    if (!said.ok() || said->node_id != node_id || said->incarnation != incarnation) continue;
    it->second.second.emplace(said->declarer, d);
  }
}

std::vector<Cluster::LostEvidence> Cluster::LostDeclarationsHeld() {
  std::vector<LostEvidence> held;
  {
    absl::MutexLock lock(&declarations_mu_);
    for (const auto& [node_id, kept] : lost_kept_) {
      LostEvidence e{node_id, kept.first, {}};
      for (const auto& [declarer, d] : kept.second) e.declarations.push_back(d);
      held.push_back(std::move(e));
    }
  }
  // Forget the members no longer lost here at the incarnation kept (a newer one joined).
  std::vector<LostEvidence> lost;
  std::vector<std::pair<std::string, uint64_t>> forget;
  {
    absl::MutexLock lock(&mu_);
    for (LostEvidence& e : held) {
      std::optional<Swim::MemberView> m = swim_->Find(e.node_id);
      if (m && m->lost && m->incarnation == e.incarnation) {
        lost.push_back(std::move(e));
      } else {
        forget.emplace_back(e.node_id, e.incarnation);
      }
    }
  }
  if (!forget.empty()) {
    absl::MutexLock lock(&declarations_mu_);
    for (const auto& [node_id, incarnation] : forget) {
      auto it = lost_kept_.find(node_id);
      if (it != lost_kept_.end() && it->second.first == incarnation) lost_kept_.erase(it);
    }
  }
  return lost;
}

}  // namespace tessera
