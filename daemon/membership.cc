#include "daemon/membership.h"

#include <arpa/inet.h>
#include <netdb.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"

namespace tessera {

Membership::Membership(std::string self_id, std::string self_address, uint64_t incarnation,
                       int64_t timeout_ms)
    : self_id_(std::move(self_id)),
      self_address_(std::move(self_address)),
      incarnation_(incarnation),
      timeout_ms_(timeout_ms) {}

void Membership::SetAddresses(const std::vector<std::string>& addresses) {
  absl::MutexLock lock(&mu_);
  std::map<std::string, MemberInfo> next;
  for (const std::string& a : addresses) {
    if (a == self_address_) continue;
    auto it = by_address_.find(a);
    if (it != by_address_.end()) {
      next[a] = it->second;
    } else {
      next[a].address = a;
    }
  }
  by_address_ = std::move(next);
}

std::optional<std::string> Membership::Heard(const std::string& address,
                                             const std::string& node_id, uint64_t incarnation,
                                             int64_t now_ms) {
  if (node_id == self_id_) return std::nullopt;
  absl::MutexLock lock(&mu_);
  MemberInfo& m = by_address_[address];
  m.address = address;
  std::optional<std::string> change;
  if (m.node_id.empty()) {
    change = absl::StrCat("member ", node_id, " at ", address, " is up (incarnation ",
                          incarnation, ")");
  } else if (incarnation != m.incarnation) {
    ++m.restarts_seen;
    m.declared_lost = false;
    change = absl::StrCat("member ", node_id, " at ", address, " restarted: incarnation ",
                          m.incarnation, " -> ", incarnation);
  } else if (!m.alive && !m.declared_lost) {
    change = absl::StrCat("member ", node_id, " at ", address, " is answering again");
  }
  if (m.declared_lost && incarnation == m.incarnation) return std::nullopt;  // stays lost
  m.node_id = node_id;
  m.incarnation = incarnation;
  m.last_heard_ms = now_ms;
  m.alive = true;
  return change;
}

std::vector<std::string> Membership::Tick(int64_t now_ms) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> suspected;
  for (auto& [address, m] : by_address_) {
    bool alive = !m.declared_lost && m.last_heard_ms >= 0 && now_ms - m.last_heard_ms <= timeout_ms_;
    if (m.alive && !alive && !m.node_id.empty()) suspected.push_back(m.node_id);
    m.alive = alive;
  }
  return suspected;
}

absl::Status Membership::DeclareLost(const std::string& node_id) {
  absl::MutexLock lock(&mu_);
  for (auto& [address, m] : by_address_) {
    if (m.node_id == node_id) {
      m.declared_lost = true;
      m.alive = false;
      return absl::OkStatus();
    }
  }
  return absl::NotFoundError("no member has node id '" + node_id + "'");
}

std::vector<std::string> Membership::LiveNodeIds() const {
  absl::MutexLock lock(&mu_);
  std::set<std::string> ids = {self_id_};
  for (const auto& [address, m] : by_address_) {
    if (m.alive) ids.insert(m.node_id);
  }
  return {ids.begin(), ids.end()};
}

std::optional<std::string> Membership::AddressOf(const std::string& node_id) const {
  if (node_id == self_id_) return self_address_;
  absl::MutexLock lock(&mu_);
  for (const auto& [address, m] : by_address_) {
    if (m.node_id == node_id) return address;
  }
  return std::nullopt;
}

std::vector<std::string> Membership::Addresses() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& [address, m] : by_address_) out.push_back(address);
  return out;
}

std::vector<MemberInfo> Membership::Members() const {
  absl::MutexLock lock(&mu_);
  std::vector<MemberInfo> out;
  for (const auto& [address, m] : by_address_) out.push_back(m);
  return out;
}

absl::StatusOr<std::vector<std::string>> ResolveMembers(const std::string& name, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  int rc = getaddrinfo(name.c_str(), nullptr, &hints, &result);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolving ", name, ": ", gai_strerror(rc)));
  }
  std::set<std::string> out;
  for (addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    char host[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_addr, host, sizeof(host));
      out.insert(absl::StrCat(host, ":", port));
    } else if (ai->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_addr, host, sizeof(host));
      out.insert(absl::StrCat("[", host, "]:", port));
    }
  }
  freeaddrinfo(result);
  return std::vector<std::string>(out.begin(), out.end());
}

}  // namespace tessera
