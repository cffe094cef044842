// Rendezvous: a small all-gather of payloads among the ranks of a group (proto/rendezvous.proto).
// The ranks of a data-parallel group use it to agree on the step to restore and to share the
// NCCL unique id of the communicator their agents create.
//
// RendezvousTable holds the rounds this daemon hosts. A round collects one join per index; when
// all `size` indices have joined, every waiting call returns all payloads and the next join
// starts a new round. A join that repeats a nonce of the last completed round (a retry after a
// lost reply) gets that round's payloads. A join with a new nonce at an index that already
// joined replaces it (a restarted process); the replaced call returns kAborted. A join with
// another size restarts the round. Groups idle for 10 minutes are forgotten.
//
// RendezvousRouter picks the daemon that hosts a group: itself when standalone, otherwise the
// live member picked by hashing (job, group) over the sorted live node ids, reached over the
// peer port (RendezvousService, cluster.token when set). Members whose views of the cluster
// differ may pick different hosts for a while: the caller's retries meet once the views agree.
//
// Thread-safe.
#ifndef TESSERA_DAEMON_COORDINATION_RENDEZVOUS_H_
#define TESSERA_DAEMON_COORDINATION_RENDEZVOUS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/transfer/cluster_tls.h"
#include "grpcpp/channel.h"
#include "proto/rendezvous.grpc.pb.h"

namespace tessera {

// Checks every field against proto/rendezvous.proto's limits; the error names the field.
absl::Status ValidateJoin(const rendezvous::JoinRequest& request);

class RendezvousTable {
 public:
  static constexpr size_t kMaxGroups = 4096;

  // Joins and waits up to request.wait_ms for the round to complete. kDeadlineExceeded names the
  // indices still missing; the join stays in the round, so a retry keeps waiting.
  absl::StatusOr<rendezvous::JoinResponse> Join(const rendezvous::JoinRequest& request);

  size_t groups() const;
  // How many indices have joined the open round of (job_id, group).
  size_t pending(const std::string& job_id, const std::string& group) const;

 private:
  struct Joined {
    std::string nonce;
    std::string payload;
  };
  struct Group {
    uint32_t size = 0;
    std::vector<std::optional<Joined>> pending;
    uint64_t completed_rounds = 0;
    std::vector<std::string> last_nonces;   // by index, of the last completed round
    std::vector<std::string> last_payloads;
    int64_t last_active_ms = 0;
  };
  // The last completed round's payloads when `nonce` joined it at `index`.
  static std::optional<rendezvous::JoinResponse> CompletedFor(const Group& group, uint32_t index,
                                                             const std::string& nonce);
  void ForgetIdleLocked(int64_t now_ms) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  std::map<std::pair<std::string, std::string>, Group> groups_ ABSL_GUARDED_BY(mu_);
};

class RendezvousRouter {
 public:
  struct Member {
    std::string node_id;
    std::string address;  // peer address
  };
  struct Options {
    std::string self_id;
    // The live members, this daemon included, sorted by node id; unset when standalone.
    std::function<std::vector<Member>()> live_members;
    std::string token;  // cluster.token, sent to the host when set
  };
  // `table` is not owned and must outlive the router.
  RendezvousRouter(RendezvousTable* table, Options options);

  // Validates, then joins at the group's host.
  absl::StatusOr<rendezvous::JoinResponse> Join(const rendezvous::JoinRequest& request);

  // The node id of the member that hosts (job_id, group) among `live` (sorted node ids).
  static size_t HostIndex(const std::string& job_id, const std::string& group, size_t live);

 private:
  // With mutual TLS, to the daemon whose certificate names the target's node only.
  std::shared_ptr<grpc::Channel> ChannelTo(const PeerTarget& host);

  RendezvousTable* const table_;
  const Options options_;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
};

// The peer-facing service: answers joins forwarded by other daemons from this daemon's table.
class RendezvousService final : public rendezvous::Rendezvous::Service {
 public:
  // With a non-empty token, calls must carry it (daemon/transfer/cluster_token.h); with mutual
  // TLS, the caller must present a node's certificate (daemon/transfer/node_identity.h).
  RendezvousService(RendezvousTable* table, std::string token)
      : table_(table), token_(std::move(token)) {}
  grpc::Status Join(grpc::ServerContext* context, const rendezvous::JoinRequest* request,
                    rendezvous::JoinResponse* response) override;

 private:
  RendezvousTable* const table_;
  const std::string token_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_RENDEZVOUS_H_
