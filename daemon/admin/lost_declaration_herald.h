// LostDeclarationHerald: hands the signed declarations that made a member lost here to the live
// members that have not taken them, so that a declaration is not soft state. Without it a member
// that was away (stopped, partitioned, restarted) when an operator declared NODE lost counts NODE
// dead by its own timer, never lost: it keeps NODE in its majorities and, as a job's coordinator,
// waits for NODE to come back.
//
// Every period, for each member lost here whose declarations are kept (Cluster::LostEvidence)
// and each live member other than it, the herald sends them (Peer.DeclareLost) until that member
// answers that it took them, or kMaxAttempts calls were refused or failed; a member that comes
// back as a new incarnation (a restart: it forgot) is asked again. Not every holder sends: only
// the kHeralds live declarers first in node id order (in this daemon's view), or every holder
// when none of the declarers is live here, so that each member gets a few calls, not one from
// every member that took the declarations. The receiver counts each
// declaration once and takes them only from members that are a majority of those live in its
// view (Cluster::TakeLostDeclarations), so the herald cannot make a member lost that a majority
// did not declare. Its cost: one call per lost member and live member that has not taken it, per
// period, for at most kMaxAttempts periods.
#ifndef TESSERA_DAEMON_ADMIN_LOST_DECLARATION_HERALD_H_
#define TESSERA_DAEMON_ADMIN_LOST_DECLARATION_HERALD_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "daemon/membership/cluster.h"
#include "daemon/transfer/peer_client.h"

namespace tessera {

class LostDeclarationHerald {
 public:
  static constexpr int kMaxAttempts = 30;
  static constexpr size_t kMaxConcurrentCalls = 16;
  static constexpr size_t kHeralds = 2;

  struct Options {
    MemberInfo self;  // the sender of every DeclareLost
    absl::Duration period = absl::Seconds(2);
    // What is kept of the members lost here (Cluster::LostDeclarationsHeld), and the members
    // (Cluster::Peers): functions, so that a unit test can stand in for the cluster.
    std::function<std::vector<Cluster::LostEvidence>()> lost;
    std::function<std::vector<Cluster::PeerView>()> peers;
  };
  // `client` is not owned and must outlive the herald.
  LostDeclarationHerald(PeerClient* client, Options options);
  ~LostDeclarationHerald();  // Stop()

  // Starts the thread that calls RunOnce every period; Stop() ends it (idempotent).
  void Start();
  void Stop();

  // One round: sends every lost member's declarations to each live member that has not taken
  // them and has attempts left. Returns how many calls it made.
  int RunOnce();

 private:
  // What one live member did with one lost member's declarations.
  struct Delivery {
    uint64_t member_incarnation = 0;  // a new incarnation of the member starts over
    int attempts = 0;
    bool taken = false;
    std::string last_refusal;
  };

  // Whether this daemon is one of the kHeralds that hand `lost` on (see above).
  bool Heralds(const Cluster::LostEvidence& lost,
               const std::vector<Cluster::PeerView>& members) const;

  PeerClient* const client_;
  const Options options_;
  absl::Mutex mu_;  // one round at a time
  // By (lost node id, its incarnation), then by live member node id.
  std::map<std::pair<std::string, uint64_t>, std::map<std::string, Delivery>> deliveries_
      ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_ADMIN_LOST_DECLARATION_HERALD_H_
