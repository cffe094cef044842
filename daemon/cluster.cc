#include "daemon/cluster.h"

#include <netdb.h>
#include <sys/socket.h>
#include <arpa/inet.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/logging.h"

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

}  // namespace

int64_t NowUnixMs() { return absl::ToUnixMillis(absl::Now()); }

Cluster::Cluster(Options options, PeerClient* client)
    : options_(std::move(options)), client_(client) {
  absl::MutexLock lock(&mu_);
  for (const std::string& a : options_.members) {
    if (a != options_.self_address) peers_[a];
  }
}

Cluster::~Cluster() { Stop(); }

void Cluster::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { Run(); });
}

void Cluster::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void Cluster::RefreshAddresses(int64_t now_ms) {
  if (options_.dns_name.empty()) return;
  if (last_dns_ms_ >= 0 && now_ms - last_dns_ms_ < options_.dns_refresh_ms) return;
  last_dns_ms_ = now_ms;
  std::vector<std::string> found = ResolveDns(options_.dns_name, options_.dns_port);
  if (found.empty()) {
    Logger("cluster")->warn("{} does not resolve; keeping the members known", options_.dns_name);
    return;
  }
  absl::MutexLock lock(&mu_);
  for (const std::string& a : found) {
    if (a == options_.self_address || peers_.count(a) != 0) continue;
    peers_[a];
    Logger("cluster")->info("{} lists a new member address {}", options_.dns_name, a);
  }
}

void Cluster::Heard(const std::string& address, const std::string& node_id,
                    uint64_t incarnation) {
  if (address.empty() || address == options_.self_address) return;
  auto log = Logger("cluster");
  absl::MutexLock lock(&mu_);
  Peer& p = peers_[address];
  if (p.node_id.empty()) {
    log->info("member {} at {} joined (incarnation {})", node_id, address, incarnation);
  } else if (incarnation != p.incarnation) {
    log->warn("member {} at {} restarted: incarnation {} -> {}", node_id, address, p.incarnation,
              incarnation);
  } else if (!p.alive) {
    log->info("member {} at {} is back", node_id, address);
  }
  p.node_id = node_id;
  p.incarnation = incarnation;
  p.last_heard_ms = NowUnixMs();
  p.alive = true;
}

std::vector<MemberInfo> Cluster::LiveMembers() const {
  std::vector<MemberInfo> out;
  out.push_back(MemberInfo{options_.self_id, options_.incarnation, options_.self_address});
  absl::MutexLock lock(&mu_);
  for (const auto& [address, p] : peers_) {
    if (p.alive) out.push_back(MemberInfo{p.node_id, p.incarnation, address});
  }
  return out;
}

std::vector<MemberInfo> Cluster::OnHeartbeat(const HeartbeatMessage& message) {
  Heard(message.from.address, message.from.node_id, message.from.incarnation);
  return LiveMembers();
}

void Cluster::Run() {
  auto log = Logger("cluster");
  while (!stop_.WaitForNotificationWithTimeout(absl::Milliseconds(options_.heartbeat_ms))) {
    RefreshAddresses(NowUnixMs());
    std::vector<std::string> addresses;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& entry : peers_) addresses.push_back(entry.first);
    }
    HeartbeatMessage message;
    message.from = MemberInfo{options_.self_id, options_.incarnation, options_.self_address};
    message.members = LiveMembers();
    message.sent_unix_ms = static_cast<uint64_t>(NowUnixMs());
    // One thread per member: a peer that stopped answering must not delay the others.
    std::vector<std::thread> senders;
    for (const std::string& address : addresses) {
      senders.emplace_back([this, address, &message] {
        auto reply = client_->Heartbeat(address, message);
        if (reply.ok()) Heard(address, reply->peer.node_id, reply->peer.incarnation);
      });
    }
    for (std::thread& t : senders) t.join();
    const int64_t now = NowUnixMs();
    {
      absl::MutexLock lock(&mu_);
      for (auto& [address, p] : peers_) {
        if (p.alive && now - p.last_heard_ms > options_.timeout_ms) {
          p.alive = false;
          log->warn("member {} at {} suspected: not heard for {} ms", p.node_id, address,
                    now - p.last_heard_ms);
        }
      }
    }
    if (options_.after_round) options_.after_round();
  }
}

std::vector<std::string> Cluster::LiveNodeIds() const {
  std::vector<std::string> ids;
  for (const MemberInfo& m : LiveMembers()) ids.push_back(m.node_id);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

std::vector<Cluster::PeerView> Cluster::Peers() const {
  std::vector<PeerView> out;
  absl::MutexLock lock(&mu_);
  for (const auto& [address, p] : peers_) {
    out.push_back(PeerView{address, p.node_id, p.incarnation, p.last_heard_ms, p.alive});
  }
  return out;
}

std::optional<std::string> Cluster::AddressOf(const std::string& node_id) const {
  for (const MemberInfo& m : LiveMembers()) {
    if (m.node_id == node_id) return m.address;
  }
  return std::nullopt;
}

}  // namespace tessera
