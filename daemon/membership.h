// Cluster membership and liveness, transport-free. Members are addresses (a static list from the
// config, or a DNS name's records re-resolved periodically); a member's node id and incarnation
// are learned from its heartbeats. A member not heard from for `timeout_ms` is suspected: its
// fragments count as erasures. A restarted daemon is a new incarnation of its node id.
// Thread-safe.
#ifndef TESSERA_DAEMON_MEMBERSHIP_H_
#define TESSERA_DAEMON_MEMBERSHIP_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

struct MemberInfo {
  std::string address;
  std::string node_id;       // empty until first heard
  uint64_t incarnation = 0;
  int64_t last_heard_ms = -1;
  bool alive = false;        // heard within the timeout
  bool declared_lost = false;
  uint64_t restarts_seen = 0;
};

class Membership {
 public:
  Membership(std::string self_id, std::string self_address, uint64_t incarnation,
             int64_t timeout_ms);

  // Replaces the set of peer addresses to watch. Known members keep their state; the daemon's
  // own address is ignored.
  void SetAddresses(const std::vector<std::string>& addresses);

  // A heartbeat answer from `address` (or a heartbeat received from it). Returns a line to log
  // when something changed: a member became known, came back, or restarted (new incarnation).
  std::optional<std::string> Heard(const std::string& address, const std::string& node_id,
                                   uint64_t incarnation, int64_t now_ms);

  // Re-evaluates liveness; returns the node ids newly suspected.
  std::vector<std::string> Tick(int64_t now_ms);

  // Treats `node_id` as lost until it is heard again with a new incarnation.
  absl::Status DeclareLost(const std::string& node_id);

  // Node ids of live members, this daemon included, sorted.
  std::vector<std::string> LiveNodeIds() const;
  std::optional<std::string> AddressOf(const std::string& node_id) const;
  std::vector<std::string> Addresses() const;
  std::vector<MemberInfo> Members() const;

  const std::string& self_id() const { return self_id_; }
  const std::string& self_address() const { return self_address_; }
  uint64_t incarnation() const { return incarnation_; }

 private:
  const std::string self_id_;
  const std::string self_address_;
  const uint64_t incarnation_;
  const int64_t timeout_ms_;
  mutable absl::Mutex mu_;
  std::map<std::string, MemberInfo> by_address_ ABSL_GUARDED_BY(mu_);
};

// "host:port" for every address record of `name` (A and AAAA), sorted. kUnavailable when the
// name does not resolve.
absl::StatusOr<std::vector<std::string>> ResolveMembers(const std::string& name, int port);

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_H_
