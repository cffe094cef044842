#include "daemon/coordination/rendezvous.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/refusals.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/cluster_token.h"
#include "daemon/transfer/node_identity.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace tessera {
namespace {

constexpr int64_t kIdleGroupMs = 10 * 60 * 1000;
constexpr size_t kMaxGroupBytes = 256;
constexpr uint32_t kMaxSize = 65536;
constexpr size_t kMaxPayloadBytes = 64 << 10;
constexpr size_t kMaxNonceBytes = 64;
constexpr uint32_t kMaxWaitMs = 60000;

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

}  // namespace

absl::Status ValidateJoin(const rendezvous::JoinRequest& r) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(r.job_id()));
  if (r.group().empty() || r.group().size() > kMaxGroupBytes) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous group must be 1..", kMaxGroupBytes,
                                                   " bytes, got ", r.group().size()));
  }
  for (char c : r.group()) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
          c == '-')) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rendezvous group '", r.group(), "' may hold only [A-Za-z0-9._:-]"));
    }
  }
  if (r.size() < 1 || r.size() > kMaxSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous size ", r.size(), " must be 1..", kMaxSize));
  }
  if (r.index() >= r.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous index ", r.index(), " must be below the size ", r.size()));
  }
  if (r.payload().size() > kMaxPayloadBytes) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous payload of ", r.payload().size(),
                                                   " bytes exceeds ", kMaxPayloadBytes));
  }
  if (r.nonce().empty() || r.nonce().size() > kMaxNonceBytes) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous nonce must be 1..", kMaxNonceBytes,
                                                   " bytes, got ", r.nonce().size()));
  }
  if (r.wait_ms() < 1 || r.wait_ms() > kMaxWaitMs) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous wait_ms ", r.wait_ms(), " must be 1..", kMaxWaitMs));
  }
  return absl::OkStatus();
}

std::optional<rendezvous::JoinResponse> RendezvousTable::CompletedFor(const Group& group,
                                                                     uint32_t index,
                                                                     const std::string& nonce) {
  if (group.completed_rounds == 0 || index >= group.last_nonces.size() ||
      group.last_nonces[index] != nonce) {
    return std::nullopt;
  }
  rendezvous::JoinResponse response;
  for (const std::string& p : group.last_payloads) response.add_payloads(p);
  return response;
}

void RendezvousTable::ForgetIdleLocked(int64_t now_ms) {
  for (auto it = groups_.begin(); it != groups_.end();) {
    it = now_ms - it->second.last_active_ms > kIdleGroupMs ? groups_.erase(it) : std::next(it);
  }
}

size_t RendezvousTable::groups() const {
  absl::MutexLock lock(&mu_);
  return groups_.size();
}

size_t RendezvousTable::pending(const std::string& job_id, const std::string& group) const {
  absl::MutexLock lock(&mu_);
  auto it = groups_.find({job_id, group});
  if (it == groups_.end()) return 0;
  size_t n = 0;
  for (const auto& j : it->second.pending) n += j.has_value() ? 1 : 0;
  return n;
}

absl::StatusOr<rendezvous::JoinResponse> RendezvousTable::Join(
    const rendezvous::JoinRequest& request) {
  TESSERA_RETURN_IF_ERROR(ValidateJoin(request));
  const auto key = std::make_pair(request.job_id(), request.group());
  const std::string name = absl::StrCat("rendezvous '", request.group(), "' of job '",
                                        request.job_id(), "'");
  const absl::Time deadline = absl::Now() + absl::Milliseconds(request.wait_ms());
  const uint32_t index = request.index();
  absl::MutexLock lock(&mu_);
  const int64_t now = NowMs();
  ForgetIdleLocked(now);
  auto found = groups_.find(key);
  if (found == groups_.end()) {
    if (groups_.size() >= kMaxGroups) {
      return absl::ResourceExhaustedError(absl::StrCat(
          name, ": this daemon already hosts ", kMaxGroups, " rendezvous groups"));
    }
    found = groups_.emplace(key, Group{}).first;
  }
  Group& group = found->second;
  group.last_active_ms = now;
  if (auto done = CompletedFor(group, index, request.nonce())) return *done;
  if (group.size != request.size()) {
    if (group.size != 0) {
      Logger("rendezvous")->warn("{}: a join of size {} restarts the round of size {}", name,
                                 request.size(), group.size);
    }
    group.size = request.size();
    group.pending.assign(request.size(), std::nullopt);
    group.last_nonces.clear();
    group.last_payloads.clear();
    group.completed_rounds = 0;
  }
  group.pending[index] = Joined{request.nonce(), request.payload()};
  bool complete = true;
  for (const auto& j : group.pending) complete = complete && j.has_value();
  if (complete) {
    group.last_nonces.clear();
    group.last_payloads.clear();
    for (auto& j : group.pending) {
      group.last_nonces.push_back(std::move(j->nonce));
      group.last_payloads.push_back(std::move(j->payload));
      j.reset();
    }
    ++group.completed_rounds;
    changed_.SignalAll();
    return *CompletedFor(group, index, request.nonce());
  }
  changed_.SignalAll();  // a replaced join returns
  while (true) {
    const bool timed_out = changed_.WaitWithDeadline(&mu_, deadline);
    auto again = groups_.find(key);
    if (again == groups_.end()) {
      return absl::AbortedError(absl::StrCat(name, " was forgotten while waiting"));
    }
    Group& g = again->second;
    if (auto done = CompletedFor(g, index, request.nonce())) return *done;
    if (g.size != request.size() || !g.pending[index] || g.pending[index]->nonce != request.nonce()) {
      return absl::AbortedError(absl::StrCat(name, ": index ", index,
                                             " was joined again by a newer caller, or the round "
                                             "restarted with another size"));
    }
    if (timed_out) {
      std::vector<uint32_t> missing;
      for (uint32_t i = 0; i < g.size; ++i) {
        if (!g.pending[i]) missing.push_back(i);
      }
      const size_t shown = std::min<size_t>(missing.size(), 16);
      return absl::DeadlineExceededError(absl::StrCat(
          name, ": after ", request.wait_ms(), " ms still waiting for ", missing.size(), " of ",
          g.size, " (indices ", absl::StrJoin(missing.begin(), missing.begin() + shown, ","),
          missing.size() > shown ? ",..." : "", ")"));
    }
  }
}

RendezvousRouter::RendezvousRouter(RendezvousTable* table, Options options)
    : table_(table), options_(std::move(options)) {}

size_t RendezvousRouter::HostIndex(const std::string& job_id, const std::string& group,
                                   size_t live) {
  uint64_t h = 1469598103934665603ull;
  for (const std::string* s : {&job_id, &group}) {
    for (char c : *s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
  }
  return live == 0 ? 0 : h % live;
}

std::shared_ptr<grpc::Channel> RendezvousRouter::ChannelTo(const PeerTarget& host) {
  absl::MutexLock lock(&mu_);
  auto& channel = channels_[host.ToString()];
  if (!channel) {
    channel = grpc::CreateChannel(host.address, ClusterChannelCredentials(host.node_id));
  }
  return channel;
}

absl::StatusOr<rendezvous::JoinResponse> RendezvousRouter::Join(
    const rendezvous::JoinRequest& request) {
  TESSERA_RETURN_IF_ERROR(ValidateJoin(request));
  if (!options_.live_members) return table_->Join(request);
  const std::vector<Member> live = options_.live_members();
  if (live.empty()) return table_->Join(request);
  const Member& host = live[HostIndex(request.job_id(), request.group(), live.size())];
  if (host.node_id == options_.self_id) return table_->Join(request);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(request.wait_ms() + 5000));
  if (!options_.token.empty()) context.AddMetadata(kClusterTokenMetadataKey, options_.token);
  rendezvous::JoinResponse response;
  absl::Status status = FromGrpcStatus(
      rendezvous::Rendezvous::NewStub(ChannelTo(PeerTarget(host.address, host.node_id)))
          ->Join(&context, request, &response));
  if (!status.ok()) {
    return Annotate(status, absl::StrCat("rendezvous at its host ", host.node_id, " (",
                                         host.address, ")"));
  }
  return response;
}

grpc::Status RendezvousService::Join(grpc::ServerContext* context,
                                     const rendezvous::JoinRequest* request,
                                     rendezvous::JoinResponse* response) {
  absl::Status status = token_.empty() ? absl::OkStatus()
                                       : CheckClusterToken(*context, token_, "rendezvous calls");
  // Only daemons forward joins: with mutual TLS, a node's certificate (node_identity.h).
  if (status.ok()) status = RequireNodeCaller(*context, "rendezvous calls").status();
  if (status.ok()) {
    absl::StatusOr<rendezvous::JoinResponse> joined = table_->Join(*request);
    status = joined.status();
    if (joined.ok()) *response = std::move(*joined);
  }
  return AnswerCall("rendezvous", "Join", status);  // a failure counted and logged
}

}  // namespace tessera
