// Swim: a transport-free SWIM membership core (Das, Gupta, Motivala 2002; as in HashiCorp
// memberlist), keyed by node id and incarnation.
//
// Every protocol period this daemon probes ONE member, round-robin over a shuffled list of the
// members not dead. No ack within ack_timeout_ms: it asks `indirect_probes` other live members to
// probe it (ping-req); still no ack when the probe window closes (probe_timeout_ms after the
// probe), or every helper answered that the member did not ack either: the member is SUSPECT.
// Until the window closes, a late ack, a helper's late ack, or any message from the member
// answers the probe.
// A member suspect for suspicion_mult * ceil(log2(N + 1)) periods is DEAD (N: members not dead,
// this one included). Updates (alive / suspect / dead, each with the member's node id,
// incarnation, liveness version and address) ride on probes, ping-reqs and acks: each is sent
// about retransmit_mult * ceil(log2(N + 1)) times, at most max_updates_per_message per message.
//
// Identity. A member is a node id; its incarnation is the daemon's start time. A newer
// incarnation of a node id replaces the older one everywhere, and the older one is FENCED: it is
// never alive again, updates about it are ignored, and its messages are refused
// (HandleRequest returns kFailedPrecondition). Within an incarnation the liveness version orders
// updates: a higher version wins, and at equal versions dead > suspect > alive. A member that
// hears itself suspected (or declared dead) refutes: it raises its version above the one heard
// and gossips alive. An operator's DeclareLost gives the highest version, which no refutation
// can pass: only a new incarnation brings the node id back.
//
// Bounded gossip (Options::bound_relayed_news, on under mutual TLS, where the transport
// authenticates each message's sender). What a member says of itself (its messages' version, and
// the updates its messages carry about its own incarnation) is its own word; what it relays of
// another member's incarnation is not, and is bounded by that member's own word: let V be the
// highest version this daemon heard from member X itself (its "vouched" version). A relayed
// suspicion or death of X above V, or a relayed alive above V + 1 (X's refutation of a suspicion
// at V), is dropped (Stats::relayed_dropped); a relayed death is taken as a suspicion, so that
// each daemon's own suspicion timer decides a death, and a relayed lost (kLostVersion) is never
// taken: an operator's declaration reaches other daemons otherwise (Cluster). A relayed update
// that introduces a member or a newer incarnation of it (Cluster checks the member's proof) is
// taken at version 0 (a death of a member known as a suspicion). This daemon refutes a relayed
// suspicion or death of itself at up to its own version + 1 (no honest member holds it higher),
// and ignores one above. So every suspicion a member can relay is cleared by one refutation of
// the member's, and no relayed word makes a member dead while its refutations get through, or
// lost. A relayed suspicion dropped for being past the bound may still be true (the member's
// refutation came here relayed, so its own word here is a version behind): this daemon then
// probes the member itself next (at most every other period), so a death right after a
// refutation is detected about as fast as under SWIM's rules (swim_test). And a member whose
// suspicions here were refuted kMaxFlaps times within kFlapWindowPeriods periods is not made
// suspect again by relayed news for the rest of that window: a relayed suspicion (or death) of
// it only makes this daemon probe it itself next (Stats::relayed_damped), and only this daemon's
// own probes can suspect it. So a member that relays suspicions of another at its current
// version, each cleared by a refutation, flaps it at most kMaxFlaps times per window. Off:
// SWIM's rules, every member's word taken as relayed.
//
// Seeds are addresses (the configured list, DNS records). One not yet known as some member's
// address is probed (up to seed_probes_per_period a period; seeds tried before, one at a time)
// until it answers; its node id then comes from the answer. A reply to a peer that says it knows
// fewer members than this daemon (one joining) fills its spare update slots with other members,
// so a joiner learns the cluster without a full-state exchange and without a larger message.
//
// Determinism: the core never reads a clock or a global random source. Time comes in as now_ms
// on every call (any monotonic millisecond clock), and every random choice comes from a
// generator seeded with Options::random_seed. The same calls in the same order give the same
// messages and events.
//
// Messages leave through Options::send; every request (kProbe, kPingReq, kIndirectAck) expects
// one reply (kAck), which the transport hands to HandleReply, or HandleFailure when there will be
// none (unreachable, refused, timed out). Lost messages need no call: their deadlines pass.
//
// Thread-safety: none. The caller serializes every call on one Swim and on all the Swims that
// share a SwimNames. Callbacks (send, on_event) run inside the calls and must not call back
// into this Swim.
#ifndef TESSERA_DAEMON_MEMBERSHIP_SWIM_H_
#define TESSERA_DAEMON_MEMBERSHIP_SWIM_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tessera {

enum class SwimState : uint8_t { kAlive = 0, kSuspect = 1, kDead = 2 };
const char* SwimStateName(SwimState state);

// A member's state as one daemon holds it: what gossip carries.
struct SwimUpdate {
  SwimState state = SwimState::kAlive;
  std::string node_id;
  uint64_t incarnation = 0;  // the member daemon's start time: its identity
  uint64_t version = 0;      // liveness version, raised by the member itself to refute
  std::string address;       // host:port of its peer service
};

struct SwimMessage {
  enum class Kind : uint8_t {
    kProbe,        // "are you alive?"
    kPingReq,      // "probe target_* for me": answered at once; the outcome follows as below
    kIndirectAck,  // the outcome of a ping-req: target_acked, for the asker's probe probe_seq
    kAck,          // the reply to any of the above; seq is the request's
  };
  Kind kind = Kind::kProbe;
  uint64_t seq = 0;  // the sender's request number; a reply repeats it
  std::string from_id;
  uint64_t from_incarnation = 0;
  uint64_t from_version = 0;
  std::string from_address;
  uint64_t probe_seq = 0;  // kPingReq, kIndirectAck: the asker's probe
  std::string target_id;   // kPingReq, kIndirectAck: the member probed
  uint64_t target_incarnation = 0;
  std::string target_address;
  bool target_acked = false;   // kIndirectAck
  uint32_t known_members = 0;  // how many members the sender knows (any state, itself included)
  std::vector<SwimUpdate> updates;
};

// The strings (node ids, addresses) of the Swims of one process, each interned once, so that a
// Swim keeps a few bytes per member: a simulator runs thousands of Swims that each know
// thousands of members. Grows only. Not thread-safe (see Swim).
struct SwimNames {
  class Table {
   public:
    uint32_t Intern(const std::string& name);
    std::optional<uint32_t> Find(const std::string& name) const;
    const std::string& Name(uint32_t id) const { return *names_[id]; }
    size_t size() const { return names_.size(); }

   private:
    std::unordered_map<std::string, uint32_t> ids_;
    std::vector<const std::string*> names_;  // the keys of ids_, by id
  };
  Table nodes;      // node ids
  Table addresses;  // host:port
};

class Swim {
 public:
  static constexpr uint64_t kLostVersion = std::numeric_limits<uint32_t>::max();
  // Bounded gossip's damping of flapping members (see above).
  static constexpr uint32_t kMaxFlaps = 3;
  static constexpr int64_t kFlapWindowPeriods = 100;

  // What changed, for logs, callbacks and simulators.
  struct Event {
    enum class Kind {
      kJoined,          // a member became known (alive or suspect)
      kAlive,           // a suspect or dead member is alive again (it refuted)
      kSuspect,         // by_self: this daemon's own probe failed; otherwise heard
      kDead,            // by_self: its suspicion timed out here; lost: DeclareLost somewhere
      kReplaced,        // a newer incarnation (in `state`) replaced other_incarnation (fenced)
      kRefuted,         // this daemon heard itself suspected or dead and raised its version
      kSelfLost,        // this daemon was declared lost: it cannot refute, only restart
      kSelfFenced,      // a newer incarnation of this daemon's node id exists: restart it
      kRefused,         // a message from a fenced incarnation was refused
    };
    Kind kind = Kind::kJoined;
    std::string node_id;
    uint64_t incarnation = 0;        // kRefused: the refused sender's; kSelfFenced: the newer one
    uint64_t other_incarnation = 0;  // kReplaced: the old, fenced one; kRefused: the newer one
    uint64_t version = 0;
    std::string address;
    SwimState state = SwimState::kAlive;     // the member's state after the event
    SwimState previous = SwimState::kDead;   // before it (kDead also for "not known")
    bool by_self = false;
    bool lost = false;
    std::string detail;  // kSelfFenced: what told it
  };

  struct Options {
    std::string self_id;           // required
    uint64_t self_incarnation = 0; // required, non-zero
    std::string self_address;      // required
    int64_t protocol_period_ms = 1000;
    int64_t ack_timeout_ms = 500;   // 1..probe window: then ping-reqs
    int64_t probe_timeout_ms = 0;   // the probe window; 0: protocol_period_ms
    int indirect_probes = 3;        // 0..16
    int suspicion_mult = 4;         // 1..1000
    int retransmit_mult = 4;        // 1..1000
    int max_updates_per_message = 16;  // 1..1024
    int seed_probes_per_period = 4;    // 1..1024
    uint64_t random_seed = 1;
    // Keep each member's last-heard time (Members().last_heard_ms); off saves 8 bytes a member.
    bool track_last_heard = true;
    std::vector<std::string> seeds;  // addresses; this daemon's own is ignored
    // Bound what is relayed about a member by its own word (see "Bounded gossip" above): for a
    // transport that authenticates each message's sender (mutual TLS).
    bool bound_relayed_news = false;
    // Required. Sends a request or, never, a reply (replies are HandleRequest's result).
    std::function<void(const std::string& address, SwimMessage&& message)> send;
    std::function<void(const Event& event)> on_event;  // optional
    std::shared_ptr<SwimNames> names;  // null: a private one
  };

  struct MemberView {
    std::string node_id;
    uint64_t incarnation = 0;
    uint64_t version = 0;
    std::string address;
    SwimState state = SwimState::kAlive;
    bool lost = false;           // declared lost by an operator
    int64_t last_heard_ms = -1;  // last news of it alive (a message, an ack, an update); -1 never
  };

  struct Stats {
    uint64_t periods = 0;
    uint64_t probes_sent = 0, probes_received = 0;
    uint64_t ping_reqs_sent = 0, ping_reqs_received = 0;
    uint64_t indirect_acks_sent = 0, indirect_acks_received = 0;  // acked or not
    uint64_t acks_sent = 0, acks_received = 0;
    uint64_t updates_sent = 0;           // piggybacked, over all messages
    uint32_t max_updates_in_message = 0;
    uint64_t suspicions_raised = 0;      // by this daemon's own probes
    uint64_t deaths_declared = 0;        // by this daemon's own suspicion timeouts
    uint64_t refutations = 0;
    uint64_t refused = 0;                // requests and replies from fenced incarnations
    uint64_t requests_failed = 0;        // HandleFailure calls
    uint64_t late_replies = 0;           // replies to requests already expired
    // bound_relayed_news: relayed updates dropped for claiming more than their member's own word
    // allows (about this daemon included).
    uint64_t relayed_dropped = 0;
    // bound_relayed_news: probes sent out of turn to a member such a dropped suspicion named.
    uint64_t prompt_probes = 0;
    // bound_relayed_news: relayed suspicions of a member that flapped kMaxFlaps times in the
    // window, taken only as a reason to probe it (see "Bounded gossip" above).
    uint64_t relayed_damped = 0;
    uint64_t messages_sent() const {
      return probes_sent + ping_reqs_sent + indirect_acks_sent + acks_sent;
    }
    uint64_t messages_received() const {
      return probes_received + ping_reqs_received + indirect_acks_received + acks_received;
    }
  };

  // kInvalidArgument naming the option and its valid range.
  static absl::Status ValidateOptions(const Options& options);
  // REQUIRES: ValidateOptions(options).ok().
  explicit Swim(Options options);

  // Runs what is due at now_ms: expired probes and requests, suspicion timeouts, and a new
  // protocol period when one is due (the first at the first call). Returns whether a period
  // started.
  bool Tick(int64_t now_ms);
  // When Tick next has something to do.
  int64_t NextWakeMs() const;

  // A request from a peer. Returns the reply to send back (kAck), or kInvalidArgument (malformed:
  // no sender id, incarnation 0, a ping-req without target) or kFailedPrecondition (the sender
  // is a fenced incarnation; the message names the newer one). Either error changes nothing.
  absl::StatusOr<SwimMessage> HandleRequest(int64_t now_ms, const SwimMessage& request);
  // The reply to our request `request_seq`. `reply.seq` is not read: the transport matches.
  void HandleReply(int64_t now_ms, uint64_t request_seq, const SwimMessage& reply);
  // Our request `request_seq` will get no reply. kFailedPrecondition means the peer refused it
  // because this daemon is fenced.
  void HandleFailure(int64_t now_ms, uint64_t request_seq, const absl::Status& why);

  // More seed addresses (DNS records); known ones are ignored.
  void AddSeeds(const std::vector<std::string>& addresses);
  // Starts from a converged view, as if each member had joined long ago: no events, nothing
  // gossiped. For simulations and tests. Updates about this daemon are ignored.
  void Bootstrap(const std::vector<SwimUpdate>& members);
  // The same, copying `other`'s view (faster for thousands of members).
  // REQUIRES: both Swims share Options::names.
  void BootstrapFrom(const Swim& other);
  // The operator declares `node_id` lost: dead at kLostVersion, gossiped; it stays dead until a
  // newer incarnation appears. kNotFound when unknown, kInvalidArgument for this daemon itself.
  absl::Status DeclareLost(int64_t now_ms, const std::string& node_id);
  // This daemon was declared lost (under bound_relayed_news, where no relayed update says so,
  // the caller established it): it cannot refute, only restart (Event kSelfLost, self_lost()).
  void DeclaredLostSelf();

  // Every known member but this daemon, in no particular order.
  std::vector<MemberView> Members() const;
  std::optional<MemberView> Find(const std::string& node_id) const;
  // True when a newer incarnation than `incarnation` of node_id is known.
  bool IsFenced(const std::string& node_id, uint64_t incarnation) const;
  // Every seed has answered, been found as a member's address, or timed out once.
  bool Converged() const { return unsettled_seeds_ == 0; }
  // How long a suspected member has to refute: suspicion_mult x log2(members) periods.
  int64_t SuspicionTimeoutMs() const;
  // Seed addresses where no member (not dead) is known.
  std::vector<std::string> PendingSeeds() const;
  size_t seed_count() const { return seeds_.size(); }
  bool self_fenced() const { return self_fenced_; }
  bool self_lost() const { return self_lost_; }
  uint64_t self_version() const { return members_[self_].version; }
  // Members not dead, this daemon included: the N of the formulas above.
  size_t live_count() const { return live_; }
  size_t known_count() const { return known_; }
  const Stats& stats() const { return stats_; }
  const Options& options() const { return options_; }

 private:
  struct Member {           // indexed by the node id's SwimNames id
    uint64_t incarnation = 0;  // 0: not known
    uint32_t version = 0;
    uint32_t address = 0;      // SwimNames id
  };
  struct Update {           // SwimUpdate with interned strings
    SwimState state;
    uint32_t node;
    uint64_t incarnation;
    uint32_t version;
    uint32_t address;
  };
  enum class RequestKind : uint8_t { kProbe, kSeedProbe, kPingReq, kHelperProbe, kIndirectAck };
  struct Request {
    RequestKind kind = RequestKind::kProbe;
    uint32_t member = 0;          // probe, helper probe: the target; ping-req: the helper
    uint64_t incarnation = 0;     // of `member`
    uint64_t probe_seq = 0;       // kProbe, kPingReq, kIndirectAck: the probe's (ours or asker's)
    uint32_t address = 0;         // where it went
    uint32_t origin_address = 0;  // kHelperProbe: the asker's
    int64_t deadline_ms = 0;
    size_t seed = 0;              // kSeedProbe
    bool retry = false;           // kSeedProbe: the seed was tried before
    bool nacked = false;          // kHelperProbe: the asker was told "no answer" already
  };
  struct Probe {
    uint32_t target;
    uint64_t incarnation;
    int64_t escalate_ms;  // no ack by then: ping-reqs
    int64_t end_ms;       // no ack by then: suspect
    bool escalated = false;
    int helpers = 0;
    int nacks = 0;
  };
  struct Seed {
    uint32_t address;
    uint32_t member = 0;     // when resolved
    bool settled = false;    // answered, found, or timed out once
    bool in_flight = false;
    bool resolved = false;   // a member not dead has this address
  };
  struct Queued {
    uint32_t transmits;
    uint64_t order;  // newer first among equal transmits
    uint32_t member;
    bool operator<(const Queued& o) const {
      return transmits != o.transmits ? transmits < o.transmits : order > o.order;
    }
  };

  SwimState StateOf(uint32_t node) const {
    return node < states_.size() ? static_cast<SwimState>(states_[node]) : SwimState::kDead;
  }
  bool Known(uint32_t node) const {
    return node < members_.size() && members_[node].incarnation != 0;
  }
  void Grow(uint32_t node);
  Update Intern(const SwimUpdate& u);
  SwimUpdate Expand(uint32_t node) const;
  MemberView View(uint32_t node) const;
  int Log2Ceil() const;  // ceil(log2(live_ + 1))

  // Applies one update. `relayed`: a member's word about another member (or about this
  // daemon), not this daemon's own judgment nor the member's own word. Returns true when the
  // state changed.
  bool Apply(int64_t now_ms, const Update& u, bool by_self, bool relayed = false);
  bool ApplyAboutSelf(const Update& u, bool relayed = false);
  // bound_relayed_news: what a relayed update `u` about a member may be taken as (see above);
  // false when it is dropped.
  bool BoundRelayed(int64_t now_ms, Update* u);
  // bound_relayed_news: the member's own word raised its version to `version`.
  void Vouch(uint32_t node, uint32_t version);
  void SelfFenced(std::string detail);
  // Moves `node` from `from` to `to`: counts, timers, probe order, seeds, and (emit) events.
  void Transition(int64_t now_ms, uint32_t node, SwimState from, SwimState to, bool by_self,
                  bool emit = true);
  void Heard(int64_t now_ms, uint32_t node);
  // The sender or responder as a first-hand alive update. Returns false when it is fenced.
  // *rebut: our view of it is worse than what it claims (it should refute).
  bool ApplySender(int64_t now_ms, const SwimMessage& m, uint32_t* node, bool* rebut);
  void ApplyUpdates(int64_t now_ms, const SwimMessage& m);
  void Queue(uint32_t node);
  void Emit(Event::Kind kind, uint32_t node, bool by_self, SwimState previous,
            uint64_t other_incarnation = 0);
  void Emit(Event event);
  void ResolveSeeds(uint32_t node);

  SwimMessage NewMessage(SwimMessage::Kind kind, uint64_t seq) const;
  // Piggybacks updates: first `about` (a member whose bad news it should hear), then the queue,
  // then (fill) others at random, up to max_updates_per_message.
  void Piggyback(SwimMessage* m, std::optional<uint32_t> about, bool fill);
  void Send(uint32_t address, SwimMessage&& m);
  uint64_t NewRequest(Request request);

  void StartPeriod(int64_t now_ms);
  std::optional<uint32_t> NextProbeTarget();
  void Escalate(int64_t now_ms, uint64_t probe_seq);
  void ProbeFailed(int64_t now_ms, uint64_t probe_seq);
  // A request ended without a useful reply (failed, expired, or answered by someone else).
  void RequestEnded(int64_t now_ms, const Request& r);
  void SendIndirectAck(int64_t now_ms, const Request& helper_probe, bool acked);
  void Settle(Seed* seed);
  void SeedProbeEnded(const Request& r);
  // Any message from `node` (incarnation) answers our open probes of it.
  void Acked(int64_t now_ms, uint32_t node, uint64_t incarnation);

  Options options_;
  std::shared_ptr<SwimNames> names_;
  std::mt19937_64 rng_;
  uint32_t self_ = 0;
  std::vector<Member> members_;
  std::vector<uint8_t> states_;          // SwimState, by node
  std::vector<int64_t> last_heard_ms_;   // by node, when track_last_heard
  // By node, when bound_relayed_news: the highest version of its incarnation held that the
  // member announced itself.
  std::vector<uint32_t> vouched_;
  // bound_relayed_news: per member, its suspicions refuted in the current flap window, and when
  // that window started (see "Bounded gossip" above).
  struct Flaps {
    int64_t window_start_ms = 0;
    uint32_t count = 0;
  };
  std::vector<Flaps> flaps_;
  // bound_relayed_news: a member a dropped relayed suspicion named, probed next (not twice in a
  // row: prompted_last_).
  std::optional<uint32_t> prompt_probe_;
  bool prompted_last_ = false;
  size_t known_ = 0;
  size_t live_ = 0;
  std::set<uint32_t> lost_;              // declared lost (version kLostVersion)
  std::vector<uint32_t> probe_order_;
  size_t probe_next_ = 0;
  std::map<uint32_t, int64_t> suspects_;  // node -> when it is declared dead
  std::map<uint64_t, Request> requests_;  // by seq
  std::map<uint64_t, Probe> probes_;      // by probe seq
  uint64_t next_seq_ = 1;
  std::vector<Seed> seeds_;
  std::unordered_map<uint32_t, size_t> seed_index_;  // address -> seeds_ index
  size_t unsettled_seeds_ = 0;
  size_t seed_cursor_ = 0;
  int seed_retries_in_flight_ = 0;
  std::set<Queued> queue_;
  std::unordered_map<uint32_t, std::set<Queued>::iterator> queued_;
  uint64_t queue_order_ = 0;
  uint32_t fill_cursor_ = 0;
  int64_t next_period_ms_ = -1;
  bool self_fenced_ = false;
  bool self_lost_ = false;
  Stats stats_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_SWIM_H_
