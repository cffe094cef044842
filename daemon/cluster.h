// Cluster: this daemon's view of its peers. A heartbeat thread sends PeerClient::Heartbeat every
// heartbeat_ms to every member address (the static list, plus the records of a DNS name
// re-resolved every dns_refresh_ms) and learns each member's node id and incarnation from the
// answers and from the heartbeats it receives. A member not heard from for timeout_ms is
// suspected: it is not live, receives no fragments, and its fragments count as erasures. Joins,
// suspicions and restarts (a new incarnation) are logged.
//
// (This keeps its own small liveness table instead of daemon/membership.h's Membership: that
// header's MemberInfo collides with peer_service.h's, so the two cannot share a translation unit.)
//
// Thread-safe.
#ifndef TESSERA_DAEMON_CLUSTER_H_
#define TESSERA_DAEMON_CLUSTER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "daemon/peer_client.h"
#include "daemon/peer_service.h"

namespace tessera {

class Cluster {
 public:
  struct Options {
    std::string self_id;
    std::string self_address;
    uint64_t incarnation = 0;          // the daemon's start time in ms
    std::vector<std::string> members;  // "host:port"; self may be listed
    std::string dns_name;              // empty: none
    int dns_port = 0;
    int64_t dns_refresh_ms = 10000;
    int64_t heartbeat_ms = 500;
    int64_t timeout_ms = 3000;
    // Called on the heartbeat thread after every round (periodic work such as commit checks).
    std::function<void()> after_round;
  };

  // `client` is not owned and must outlive this object.
  Cluster(Options options, PeerClient* client);
  ~Cluster();

  // Starts the heartbeat thread. Stop() ends it; idempotent.
  void Start();
  void Stop();

  // The PeerService heartbeat handler: records the sender, answers with the live members.
  std::vector<MemberInfo> OnHeartbeat(const HeartbeatMessage& message);

  // Node ids of the live members, this daemon included, sorted.
  std::vector<std::string> LiveNodeIds() const;
  // The peer address of a live member (self included).
  std::optional<std::string> AddressOf(const std::string& node_id) const;

  // Every known member address other than this daemon's, live or not (status views).
  struct PeerView {
    std::string address;
    std::string node_id;           // empty while never heard
    uint64_t incarnation = 0;
    int64_t last_heard_unix_ms = -1;
    bool alive = false;
  };
  std::vector<PeerView> Peers() const;

  const std::string& self_id() const { return options_.self_id; }
  const std::string& self_address() const { return options_.self_address; }
  uint64_t incarnation() const { return options_.incarnation; }

 private:
  struct Peer {
    std::string node_id;
    uint64_t incarnation = 0;
    int64_t last_heard_ms = -1;
    bool alive = false;
  };
  void Run();
  void Heard(const std::string& address, const std::string& node_id, uint64_t incarnation);
  void RefreshAddresses(int64_t now_ms);
  std::vector<MemberInfo> LiveMembers() const;

  const Options options_;
  PeerClient* const client_;
  mutable absl::Mutex mu_;
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);  // by address, self excluded
  int64_t last_dns_ms_ = -1;  // heartbeat thread only
  absl::Notification stop_;
  std::thread thread_;
};

int64_t NowUnixMs();

}  // namespace tessera

#endif  // TESSERA_DAEMON_CLUSTER_H_
