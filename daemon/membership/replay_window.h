// ReplayWindow: which signed membership datagrams (datagram_signer.h) a
// receiver has already taken, so that a recorded genuine datagram sent again is
// refused before its signature costs anything. Each signed datagram names its
// sender's incarnation and a sequence number that grows with every datagram
// that sender signs in that incarnation (udp_heartbeats.h); the sender's node
// is the one its certificate names.
//
// Per node, as IPsec and DTLS do per connection: for each of its last
// kIncarnationsPerNode incarnations, the highest sequence verified and a bitmap
// of the kWindow below it. Check (before the signature) refuses a sequence
// already marked or below the window; Accept (only after the signature
// verified) marks it, so a forged datagram, whatever sequence or incarnation it
// claims, moves nothing. Modest reordering (up to kWindow sequences) passes.
//
// Incarnations: a verified datagram of a newer incarnation starts a fresh
// window, and the oldest one tracked is forgotten. Two are tracked, not one,
// because two processes may sign for one node at once: a replaced daemon that
// comes back must still have its heartbeat heard to be answered that it is
// fenced (cluster.h), while its successor's datagrams go on. A datagram of an
// incarnation older than both is refused unchecked, except one per node every
// older_interval (that same returning daemon, two restarts late); such a
// datagram, verified, marks nothing.
//
// Memory is bounded: state is made only after a signature verifies (so for
// nodes certified by the cluster's CA, never for what a datagram merely
// claims), for at most max_nodes nodes, the least recently verified forgotten
// first (its next replay then costs one signature check again).
//
// Thread-compatible: UdpHeartbeats calls it from its receiver thread only.
#ifndef TESSERA_DAEMON_MEMBERSHIP_REPLAY_WINDOW_H_
#define TESSERA_DAEMON_MEMBERSHIP_REPLAY_WINDOW_H_

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace tessera {

class ReplayWindow {
 public:
  static constexpr uint64_t kWindow = 128;
  static constexpr size_t kIncarnationsPerNode = 2;

  struct Options {
    size_t max_nodes = 4096;
    absl::Duration older_interval = absl::Seconds(1);
  };

  ReplayWindow() : ReplayWindow(Options()) {}
  explicit ReplayWindow(Options options) : options_(options) {}

  // Before the signature: OK when a datagram of `node`'s `incarnation` numbered
  // `sequence` may be new; kAlreadyExists (saying why) when it was taken
  // already, is below the window or is of an older incarnation (then it spends
  // that node's older allowance when it is OK).
  absl::Status Check(const std::string &node, uint64_t incarnation, uint64_t sequence,
                     absl::Time now);
  // After the signature verified: marks it. kAlreadyExists as Check (nothing
  // marked).
  absl::Status Accept(const std::string &node, uint64_t incarnation, uint64_t sequence);

  size_t nodes() const { return nodes_.size(); }

 private:
  struct Window {
    uint64_t incarnation = 0;  // 0: unused
    uint64_t highest = 0;
    std::bitset<kWindow> seen;  // bit i: highest - i was taken
  };
  struct Node {
    Window windows[kIncarnationsPerNode];
    absl::Time older_checked_at = absl::InfinitePast();
    uint64_t last_accepted = 0;  // in accepted_ ticks, for forgetting the least recent
  };
  // Where `incarnation` is tracked, or null.
  static Window *Find(Node *node, uint64_t incarnation);
  // Whether `incarnation` is older than every incarnation tracked, all slots
  // being used.
  static bool Older(const Node &node, uint64_t incarnation);
  static absl::Status Seen(const Window &w, const std::string &node, uint64_t sequence);

  const Options options_;
  std::map<std::string, Node> nodes_;
  uint64_t accepted_ = 0;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_REPLAY_WINDOW_H_
