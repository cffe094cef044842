// Cluster: this daemon's membership, SWIM (daemon/membership/swim.h) over the peer service's
// Heartbeat RPC. Its cost per daemon does not grow with the cluster: each protocol period
// (heartbeat_ms) it probes ONE member, asks indirect_probes others to probe it when it does not
// answer, and suspects it when none gets an answer within the probe window (timeout_ms); a
// suspect not heard refuting for suspicion_mult * ceil(log2(N + 1)) periods is dead. Membership
// news rides on the probes and their answers.
//
// Members are keyed by node id and incarnation (the daemon's start time): a newer incarnation of
// a node id replaces the older one, which is fenced from then on (IsFenced, and its heartbeats
// are refused). Seeds are the configured addresses (cluster.members, and the records of
// dns_name re-resolved every dns_refresh_ms), probed until a member is known at each.
//
// Live means ALIVE: a suspect member is not live (its fragments count as erasures and it gets
// no new ones) until it refutes. Joins, suspicions, deaths, refutations and fencing are logged.
//
// Whose word is taken. The transport authenticates the sender of each message (with mutual TLS,
// by its certificate: udp_heartbeats.h, peer_service.h), so what a member says about itself is
// its own word. What it relays about others is checked only with Options::proofs (mutual TLS): a
// relayed update that would introduce a member, or raise its incarnation (fencing the one held,
// or this daemon itself), is applied only with a proof that member signed
// (incarnation_proof.h), and then at the address the proof announces; one without such a proof
// is dropped (Stats, logged at most once per 10 s per reason). Relayed updates of the incarnation
// held here are bounded by that member's own word (swim.h, "Bounded gossip": a suspicion or
// death above the version it announced is dropped, a death is taken as a suspicion that this
// daemon's own timer decides, a "lost" is never taken) and never move the member to another
// address. Every message carries this daemon's proof and those of the members its updates name.
// A refusal of a heartbeat as fenced carries the newer incarnation's proof (the status's details,
// common/grpc_status.h), and this daemon obeys a refusal of its own heartbeat (fences itself)
// only when that proof verifies, names its node id and an incarnation newer than its own; one
// that does not is counted (Stats::refusals_unproven), logged at most once per 10 s, and taken as
// an unanswered call. Without proofs (a token-only cluster) every member's word about any other
// is taken, and every refusal obeyed, as in SWIM.
//
// Threads: one runs the protocol (Start .. Stop); heartbeats go out on a pool of send_threads,
// never one thread per member, through at most max_queued_sends queued (more are dropped, as a
// lost message). `client` should keep few connections open (GrpcPeerClient's
// max_peers_with_channels): every member is probed in turn.
//
// Thread-safe. Callbacks (after_round, on_change) run without Cluster's lock held.
#ifndef TESSERA_DAEMON_MEMBERSHIP_CLUSTER_H_
#define TESSERA_DAEMON_MEMBERSHIP_CLUSTER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/membership/incarnation_proof.h"
#include "daemon/membership/swim.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"

namespace tessera {

class Cluster {
 public:
  struct Options {
    std::string self_id;
    std::string self_address;
    uint64_t incarnation = 0;          // the daemon's start time in ms
    std::vector<std::string> members;  // seeds, "host:port"; self may be listed
    std::string dns_name;              // empty: none
    int dns_port = 0;
    int64_t dns_refresh_ms = 10000;
    int64_t heartbeat_ms = 500;  // the protocol period
    // The probe window: a member is suspected when neither it nor the members asked to probe it
    // answered within timeout_ms of the probe (any message from it counts as an answer). Others
    // are asked after timeout_ms / 2 without an answer. Values below heartbeat_ms count as
    // heartbeat_ms. The client's deadline for a heartbeat should be about timeout_ms.
    int64_t timeout_ms = 3000;
    int indirect_probes = 3;  // 0..16
    int suspicion_mult = 4;   // 1..1000
    int retransmit_mult = 4;  // 1..1000
    int max_updates_per_message = 16;
    int seed_probes_per_period = 2;
    int send_threads = 8;
    size_t max_queued_sends = 256;
    // Called on the protocol thread after every period (periodic work such as commit checks).
    std::function<void()> after_round;
    // Called when a node id becomes alive (it joins, comes back from dead, or a new incarnation
    // replaces the old one) or dead (its suspicion timed out, or it was declared lost). A
    // suspicion alone is not reported. In order, one call at a time, on whichever thread saw it.
    std::function<void(const std::string& node_id, bool alive)> on_change;
    // After any event that may change LiveNodeIds (a join, suspicion, death, refutation or new
    // incarnation), without Cluster's lock held.
    std::function<void()> on_live_set_change;
    // Called once when a newer incarnation of this daemon's own node id is heard of: this
    // process is a zombie (it was replaced), every peer refuses its messages, and it should
    // stop. Runs without Cluster's lock held.
    std::function<void()> on_self_fenced;
    // With mutual TLS: this daemon's proof of its incarnation and the members' proofs (see
    // above). Null: none are sent or asked for.
    std::shared_ptr<IncarnationProofs> proofs;
  };

  // `client` is not owned and must outlive this object. Aborts with a message when the options
  // are invalid (self_id, self_address and a non-zero incarnation are required; see above).
  Cluster(Options options, HeartbeatSender* client);
  ~Cluster();

  // Starts the protocol thread and the send pool. Stop() ends them (waiting for heartbeats in
  // flight, at most their RPC deadline); idempotent. Not restartable.
  void Start();
  void Stop();

  // The PeerService heartbeat handler: the reply, or kInvalidArgument (malformed) or
  // kFailedPrecondition (the sender is a fenced incarnation). Idempotent.
  absl::StatusOr<HeartbeatReply> OnHeartbeat(const HeartbeatMessage& message);

  // Node ids of the live members, this daemon included, sorted.
  std::vector<std::string> LiveNodeIds() const;
  // The peer address of a live member (self included).
  std::optional<std::string> AddressOf(const std::string& node_id) const;
  // The newest incarnation known of node_id, in any state (self included).
  std::optional<uint64_t> IncarnationOf(const std::string& node_id) const;
  // True when a newer incarnation than `incarnation` of node_id is known.
  bool IsFenced(const std::string& node_id, uint64_t incarnation) const;
  // Every seed address has answered, is a known member's address, or has timed out once: the
  // view is no longer a partial start-up view.
  bool Converged() const;
  // How long Converged() takes at most from Start when every seed answers or times out.
  int64_t ConvergenceBoundMs() const;
  // How long a suspected member has to refute before it is declared dead (SWIM's suspicion
  // timeout for the members known now).
  int64_t SuspicionTimeoutMs() const;
  // The operator declares node_id lost: dead everywhere until a newer incarnation appears, and
  // no longer counted among the members of a majority (Quorum). Errors: kInvalidArgument for
  // this daemon, kNotFound for a node id no member has, kFailedPrecondition for a member that is
  // alive here unless `force` (it is then fenced: it hears it was declared lost and exits).
  absl::Status DeclareLost(const std::string& node_id, bool force);

  // The members a majority is counted over, and how many of them are live here. Members are
  // every node id known here that was not declared lost, in any state (this daemon included),
  // and every seed address at which no member is known: a daemon cut off from the others, or
  // started while its seeds are unreachable, counts all of them and is in no majority. A
  // decision that must never be taken on both sides of a partition (a restore point) is taken
  // only with majority().
  struct Quorum {
    size_t live = 0;
    size_t members = 0;
    bool majority() const { return live * 2 > members; }
  };
  Quorum CountQuorum() const;
  // True when node_id's newest known incarnation was declared lost (and none newer joined).
  bool IsDeclaredLost(const std::string& node_id) const;

  // With proofs (mutual TLS), a member is declared lost on every other daemon only on signed
  // declarations (incarnation_proof.h, LostDeclaration) from members that are a majority of
  // those live in that daemon's view: no member can fence another alone, and a lone survivor
  // can still declare the others lost.
  //
  // This daemon's own declaration that node_id at `incarnation` is lost. It signs when the
  // member is dead here by its own timer (relayed deaths are only suspicions with proofs) or
  // lost already, or on its own operator's word (`operator_word`, DeclareLost here).
  // kFailedPrecondition without proofs, or naming the member's state here when it does not
  // sign; kNotFound when no member has node_id at that incarnation.
  absl::StatusOr<std::string> SignLostDeclaration(const std::string& node_id, uint64_t incarnation,
                                                  bool operator_word);
  // Counts `declarations` of node_id at `incarnation`, this daemon's own added when it signs
  // (SignLostDeclaration without operator_word), and declares the member lost here when the
  // declarers counted are more than half the live members here (this daemon included). One
  // declaration per declarer is counted, from members live here other than node_id; each is
  // verified once, the others are not checked at all. kFailedPrecondition without proofs;
  // kUnauthenticated when one that would count does not verify (the whole call is refused).
  struct LostTally {
    bool applied = false;              // node_id at `incarnation` is lost here (now or already)
    std::vector<std::string> signers;  // the declarers counted, this daemon included if it signed
    size_t live = 0;                   // live members here, this daemon included
    std::string own_declaration;       // this daemon's, when it signs
    std::string reason;                // why not applied, or why this daemon did not sign
  };
  absl::StatusOr<LostTally> TakeLostDeclarations(const std::string& node_id, uint64_t incarnation,
                                                 const std::vector<std::string>& declarations);
  // What a signed declaration says, once it verified (each distinct one is checked once).
  // kFailedPrecondition without proofs; otherwise as VerifyLostDeclaration.
  absl::StatusOr<LostDeclaration> CheckLostDeclaration(const std::string& declaration);

  // The signed declarations that made a member lost here, kept so that they can be handed to a
  // member that was away when it was declared (LostDeclarationHerald): without them that member
  // would count the lost one dead by its own timer, never lost. Kept by TakeLostDeclarations
  // when it applies (every declaration it counted, its own included) and by KeepLostDeclarations
  // (the operator's daemon, once it spread them); forgotten once node_id is no longer lost here
  // (a newer incarnation joined). At most one per declarer, for kMaxLostKept members.
  struct LostEvidence {
    std::string node_id;
    uint64_t incarnation = 0;
    std::vector<std::string> declarations;  // verified, one per declarer
  };
  static constexpr size_t kMaxLostKept = 1024;
  void KeepLostDeclarations(const std::string& node_id, uint64_t incarnation,
                            const std::vector<std::string>& declarations);
  // What is kept of the members lost here now (those no longer lost are forgotten).
  std::vector<LostEvidence> LostDeclarationsHeld();

  // Every known member other than this daemon, and every seed address where none is known yet
  // (node_id empty) (status views).
  struct PeerView {
    std::string address;
    std::string node_id;           // empty while never heard
    uint64_t incarnation = 0;
    int64_t last_heard_unix_ms = -1;  // last news of it alive; -1 never
    bool alive = false;
  };
  std::vector<PeerView> Peers() const;

  struct Stats {
    Swim::Stats swim;           // messages by kind, sent and received
    uint64_t sends_dropped = 0;  // the send queue was full
    uint64_t sends_failed = 0;   // heartbeats that got no answer
    // Relayed updates dropped for want of their member's proof (with proofs): none came with the
    // update, the one that came did not verify, or it was left unchecked (its sender had spent
    // its allowance of checks).
    uint64_t updates_unproven = 0, updates_proof_refused = 0, updates_proof_unchecked = 0;
    // Refusals of this daemon's heartbeats as a fenced incarnation that were not obeyed (with
    // proofs): they came without a valid proof, signed by this node, of a newer incarnation.
    uint64_t refusals_unproven = 0;
    size_t alive = 0, suspect = 0, dead = 0;  // other members, by state
  };
  Stats stats() const;

  const std::string& self_id() const { return options_.self_id; }
  const std::string& self_address() const { return options_.self_address; }
  uint64_t incarnation() const { return options_.incarnation; }

 private:
  struct Outgoing {
    std::string address;
    SwimMessage message;
  };
  static Swim::Options SwimOptions(const Options& options);
  // What the proofs a message carries established, by (node id, incarnation): the address proven,
  // or why not.
  using ProofOutcomes = std::map<std::pair<std::string, uint64_t>, absl::StatusOr<std::string>>;
  // A member's incarnation held here (0: unknown) and its address; this daemon's own included.
  struct Held {
    uint64_t incarnation = 0;
    std::string address;
  };
  Held HeldLocked(const std::string& node_id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether `u`, relayed in `m`, would introduce its member or raise its incarnation here.
  bool NeedsProofLocked(const SwimMessage& m, const SwimUpdate& u) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks the proofs `carried` by `m` that this daemon wants: those its updates need, and those
  // of members it holds without one (to relay them). The checks run without mu_ held.
  ProofOutcomes CheckProofs(const SwimMessage& m, const std::vector<std::string>& carried)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Drops the updates of `m` that need a proof `outcomes` does not hold, and sets the address of
  // the others to the one held or proven.
  void ScreenLocked(const ProofOutcomes& outcomes, SwimMessage* m)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a peer's refusal of this daemon's heartbeat as fenced (kFailedPrecondition) is
  // backed by what it must carry (with proofs): this node's own proof of a newer incarnation.
  // nullopt when it is; otherwise why not. Runs without mu_ held.
  std::optional<std::string> CheckRefusal(const absl::Status& refusal) ABSL_LOCKS_EXCLUDED(mu_);
  // The proofs to send with `updates`: this daemon's, then those of the members they name.
  std::vector<std::string> ProofsFor(const std::vector<SwimUpdate>& updates) const;
  // Logs the updates dropped since the last call, at most once per 10 s per reason.
  void LogDropped() ABSL_EXCLUSIVE_LOCKS_REQUIRED(dispatch_mu_) ABSL_LOCKS_EXCLUDED(mu_);
  void Run();
  void SendLoop();
  // Hands the messages Swim produced to the send pool, dropping beyond max_queued_sends.
  void FlushLocked(int64_t now_ms) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Logs and reports the events gathered so far, in order.
  void Dispatch() ABSL_LOCKS_EXCLUDED(mu_);
  void Report(const Swim::Event& e);
  void RefreshDns(int64_t now_ms);
  int64_t UnixMsOf(int64_t mono_ms) const;

  const Options options_;
  HeartbeatSender* const client_;
  mutable absl::Mutex mu_;
  std::unique_ptr<Swim> swim_ ABSL_GUARDED_BY(mu_);
  std::vector<Outgoing> produced_ ABSL_GUARDED_BY(mu_);  // by Swim's send, until flushed
  std::deque<Outgoing> queue_ ABSL_GUARDED_BY(mu_);      // for the send pool
  std::vector<Swim::Event> events_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  int64_t planned_wake_ms_ ABSL_GUARDED_BY(mu_) = 0;  // when the protocol thread wakes next
  uint64_t sends_dropped_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t sends_failed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t updates_unproven_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t updates_proof_refused_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t updates_proof_unchecked_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t refusals_unproven_ ABSL_GUARDED_BY(mu_) = 0;
  // Updates dropped, for the log: the reason ("unproven", "refused", "unchecked"; "refusal": a
  // refusal not obeyed) and the line.
  std::vector<std::pair<const char*, std::string>> dropped_ ABSL_GUARDED_BY(mu_);
  absl::Mutex dispatch_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::set<std::pair<std::string, uint64_t>> refused_logged_ ABSL_GUARDED_BY(dispatch_mu_);
  struct DropLog {
    absl::Time last = absl::InfinitePast();
    uint64_t unlogged = 0;
  };
  std::map<std::string, DropLog> dropped_logged_ ABSL_GUARDED_BY(dispatch_mu_);  // by reason
  // Signed declarations that a member is lost which verified here (their bytes), so that the
  // same declarations handed over again cost no second check; cleared when 4096 are held.
  absl::Mutex declarations_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::set<std::string> declarations_verified_ ABSL_GUARDED_BY(declarations_mu_);
  // By lost node id: its incarnation and the declarations, by declarer.
  std::map<std::string, std::pair<uint64_t, std::map<std::string, std::string>>> lost_kept_
      ABSL_GUARDED_BY(declarations_mu_);
  int64_t last_dns_ms_ = -1;  // protocol thread only
  std::thread thread_;
  std::vector<std::thread> senders_;
};

int64_t NowUnixMs();

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_CLUSTER_H_
