#include "daemon/membership/udp_heartbeats.h"

#include <arpa/inet.h>
#include <linux/errqueue.h>
#include <netdb.h>
#include <netinet/icmp6.h>
#include <netinet/ip_icmp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/transfer/data_path.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

constexpr char kMagic[4] = {'T', 'S', 'H', 'B'};
constexpr uint8_t kFormatVersion = 1;
// Version 2 was signed without the sender's incarnation and sequence (replayable); refused.
constexpr uint8_t kUnsequencedFormatVersion = 2;
constexpr uint8_t kSignedFormatVersion = 3;
// Version 3, after the header: the body's length (u32), the incarnation and the sequence (u64).
constexpr size_t kSignedFieldsBytes = 4 + 8 + 8;
constexpr uint8_t kRequest = 1;
constexpr uint8_t kReply = 2;
constexpr uint8_t kRefused = 3;
// In a refusal's code: the message's length (u16) follows, then the message, then the status's
// details (grpc_status.h); without it the message is the rest of the body.
constexpr uint32_t kRefusalHasDetails = 0x80000000u;
constexpr size_t kMaxRefusalMessageBytes = 1024;
// A resolved peer address is looked up again after this long (a DNS name may move).
constexpr absl::Duration kResolveTtl = absl::Seconds(30);

void PutU64(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
uint64_t GetU64(const uint8_t* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(in[i]) << (8 * i);
  return v;
}

void Mac(const std::string& token, const uint8_t* data, size_t size, uint8_t out[32]) {
  if (token.empty()) {
    std::memset(out, 0, 32);
    return;
  }
  unsigned int len = 32;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()), data, size, out, &len);
}

// "host:port" or "[v6]:port" -> host, port.
absl::Status SplitAddress(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 >= address.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", address, "' is not \"host:port\" (or \"[v6]:port\")"));
  }
  *host = HostOfAddress(address);
  *port = address.substr(colon + 1);
  int number = 0;
  if (!absl::SimpleAtoi(*port, &number) || number < 1 || number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", address, "' has port '", *port, "'; a port is 1..65535"));
  }
  return absl::OkStatus();
}

// The node a request's or a reply's message says it comes from ("" when its body does not parse:
// it is dropped as malformed once it is authenticated), and what the message is, for errors.
std::string ClaimedNode(uint8_t type, const std::string& body, const char** what) {
  if (type == kRequest) {
    *what = "a heartbeat";
    peer::HeartbeatRequest request;
    return request.ParseFromString(body) ? request.node_id() : "";
  }
  if (type == kReply) {
    *what = "a reply";
    peer::HeartbeatResponse response;
    return response.ParseFromString(body) ? response.node_id() : "";
  }
  *what = "a refusal";  // names no node
  return "";
}

// The address (without the port) a datagram came from, as text.
std::string SourceOf(const sockaddr_storage& from) {
  char text[INET6_ADDRSTRLEN] = "?";
  if (from.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(from).sin_addr, text, sizeof(text));
  } else if (from.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6&>(from).sin6_addr, text, sizeof(text));
  }
  return text;
}

// The body of a refusal datagram: the handler's error, with its details when it has some.
std::string RefusalBody(const absl::Status& status) {
  const std::string message(status.message().substr(0, kMaxRefusalMessageBytes));
  const std::optional<std::string> details = StatusDetails(status);
  uint32_t code = static_cast<uint32_t>(status.code());
  if (details) code |= kRefusalHasDetails;
  std::string body(4, '\0');
  for (int i = 0; i < 4; ++i) body[i] = static_cast<char>((code >> (8 * i)) & 0xff);
  if (details) {
    body.push_back(static_cast<char>(message.size() & 0xff));
    body.push_back(static_cast<char>((message.size() >> 8) & 0xff));
  }
  body.append(message);
  if (details) body.append(*details);
  return body;
}

// The error a refusal's body carries; kInvalidArgument when the body is malformed.
absl::StatusOr<absl::Status> ReadRefusal(const std::string& body) {
  if (body.size() < 4) return absl::InvalidArgumentError("a refusal without its code");
  uint32_t code = 0;
  for (int i = 0; i < 4; ++i) {
    code |= static_cast<uint32_t>(static_cast<uint8_t>(body[i])) << (8 * i);
  }
  const bool has_details = (code & kRefusalHasDetails) != 0;
  code &= ~kRefusalHasDetails;
  if (code == 0 || code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<uint32_t>(absl::StatusCode::kUnknown);
  }
  if (!has_details) return absl::Status(static_cast<absl::StatusCode>(code), body.substr(4));
  if (body.size() < 6) return absl::InvalidArgumentError("a refusal cut short (message length)");
  const size_t length = static_cast<uint8_t>(body[4]) | (static_cast<uint8_t>(body[5]) << 8);
  if (length > kMaxRefusalMessageBytes || body.size() - 6 < length) {
    return absl::InvalidArgumentError("a refusal cut short (message)");
  }
  return WithStatusDetails(absl::Status(static_cast<absl::StatusCode>(code), body.substr(6, length)),
                           body.substr(6 + length));
}

}  // namespace

absl::StatusOr<std::string> UdpHeartbeats::Encode(uint8_t type, uint64_t id,
                                                  const std::string& body,
                                                  const std::string& token,
                                                  DatagramSigner* signer, uint64_t incarnation) {
  if (signer != nullptr && incarnation == 0) {
    return absl::InvalidArgumentError("a signed datagram needs its sender's incarnation");
  }
  std::string out(kHeaderBytes, '\0');
  std::memcpy(&out[0], kMagic, 4);
  out[4] = static_cast<char>(signer != nullptr ? kSignedFormatVersion : kFormatVersion);
  out[5] = static_cast<char>(type);
  PutU64(id, &out[8]);
  if (signer != nullptr) {
    const uint32_t n = static_cast<uint32_t>(body.size());
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
    char fields[16];
    PutU64(incarnation, fields);
    PutU64(signer->NextSequence(), fields + 8);
    out.append(fields, sizeof(fields));
  }
  out.append(body);
  if (signer != nullptr && out.size() <= kMaxDatagramBytes) {
    TESSERA_RETURN_IF_ERROR(signer->Sign(&out));
  }
  const size_t signed_bytes = out.size();
  if (signed_bytes + kMacBytes > kMaxDatagramBytes) {
    return absl::InvalidArgumentError(absl::StrCat("a membership datagram of ",
                                                   signed_bytes + kMacBytes,
                                                   " bytes exceeds the limit of ",
                                                   kMaxDatagramBytes));
  }
  out.resize(signed_bytes + kMacBytes);
  Mac(token, reinterpret_cast<const uint8_t*>(out.data()), signed_bytes,
      reinterpret_cast<uint8_t*>(&out[signed_bytes]));
  return out;
}

absl::StatusOr<UdpHeartbeats::Decoded> UdpHeartbeats::Decode(const uint8_t* data, size_t size,
                                                             const std::string& token,
                                                             DatagramSigner* signer,
                                                             ReplayWindow* replay) {
  if (size < kHeaderBytes + kMacBytes || size > kMaxDatagramBytes) {
    return absl::InvalidArgumentError(absl::StrCat("a datagram of ", size, " bytes; one is ",
                                                   kHeaderBytes + kMacBytes, "..",
                                                   kMaxDatagramBytes));
  }
  if (std::memcmp(data, kMagic, 4) == 0 && data[4] == kUnsequencedFormatVersion) {
    return absl::InvalidArgumentError(
        "a datagram of format 2 (signed without its sender's incarnation and sequence, by a "
        "daemon of an older release): this one takes format 3 under mutual TLS");
  }
  if (std::memcmp(data, kMagic, 4) != 0 ||
      (data[4] != kFormatVersion && data[4] != kSignedFormatVersion) || data[6] != 0 ||
      data[7] != 0) {
    return absl::InvalidArgumentError("not a Tessera membership datagram (magic or version)");
  }
  if (data[5] != kRequest && data[5] != kReply && data[5] != kRefused) {
    return absl::InvalidArgumentError(absl::StrCat("unknown datagram type ", data[5]));
  }
  const size_t signed_bytes = size - kMacBytes;
  if (!token.empty()) {
    uint8_t expected[kMacBytes];
    Mac(token, data, signed_bytes, expected);
    if (CRYPTO_memcmp(expected, data + signed_bytes, kMacBytes) != 0) {
      return absl::UnauthenticatedError(
          "the datagram's HMAC does not verify with this daemon's cluster.token");
    }
  }
  const bool is_signed = data[4] == kSignedFormatVersion;
  if (is_signed != (signer != nullptr)) {
    return absl::UnauthenticatedError(
        signer != nullptr
            ? "an unsigned datagram (format 1): this daemon runs mutual TLS and takes only "
              "datagrams signed with a node's certificate (format 3)"
            : "a signed datagram (format 3): this daemon runs no TLS and takes format 1");
  }
  Decoded d;
  d.type = data[5];
  d.id = GetU64(data + 8);
  if (!is_signed) {
    d.body.assign(reinterpret_cast<const char*>(data + kHeaderBytes), signed_bytes - kHeaderBytes);
    return d;
  }
  const size_t body_at = kHeaderBytes + kSignedFieldsBytes;
  if (signed_bytes < body_at) {
    return absl::InvalidArgumentError("a signed datagram cut short (incarnation, sequence)");
  }
  uint32_t body_bytes = 0;
  for (int i = 3; i >= 0; --i) body_bytes = (body_bytes << 8) | data[kHeaderBytes + i];
  if (signed_bytes - body_at < body_bytes) {
    return absl::InvalidArgumentError("a signed datagram whose body runs past its end");
  }
  d.incarnation = GetU64(data + kHeaderBytes + 4);
  d.sequence = GetU64(data + kHeaderBytes + 12);
  if (d.incarnation == 0 || d.sequence == 0) {
    return absl::InvalidArgumentError("a signed datagram of incarnation or sequence 0");
  }
  d.body.assign(reinterpret_cast<const char*>(data + body_at), body_bytes);
  // The claim is checked against the certificate before the signature (DatagramSigner::Verify):
  // a datagram speaking for another node costs no signature check.
  const char* what = "";
  const std::string claimed = ClaimedNode(d.type, d.body, &what);
  // And a datagram taken already (or below the window, or of an older incarnation) costs none
  // either; the window moves only once the signature verifies (replay_window.h).
  const absl::Time now = absl::Now();
  auto not_replayed = [&](const std::string& node) {
    return replay->Check(node, d.incarnation, d.sequence, now);
  };
  absl::StatusOr<std::string> node =
      signer->Verify(data, body_at + body_bytes, signed_bytes, claimed, what,
                     replay != nullptr ? std::function<absl::Status(const std::string&)>(
                                             not_replayed)
                                       : nullptr);
  if (!node.ok()) return node.status();
  if (replay != nullptr) TESSERA_RETURN_IF_ERROR(replay->Accept(*node, d.incarnation, d.sequence));
  d.node_id = std::move(*node);
  return d;
}

UdpHeartbeats::UdpHeartbeats(Options options)
    : options_(std::move(options)),
      incarnation_(options_.incarnation != 0
                       ? options_.incarnation
                       : static_cast<uint64_t>(absl::ToUnixMillis(absl::Now()))),
      next_id_(std::random_device{}() | 1),
      throttle_(options_.throttle) {
  next_id_ = (next_id_.load() << 32) ^ std::random_device{}();
}

absl::StatusOr<std::unique_ptr<UdpHeartbeats>> UdpHeartbeats::Start(Options options) {
  if (!options.on_request) return absl::InvalidArgumentError("UdpHeartbeats needs on_request");
  std::string host, port;
  TESSERA_RETURN_IF_ERROR(SplitAddress(options.listen_address, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.empty() || host == "0.0.0.0" ? nullptr : host.c_str(),
                             port.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve '", options.listen_address,
                                                   "' for membership datagrams: ",
                                                   gai_strerror(rc)));
  }
  std::unique_ptr<UdpHeartbeats> u(new UdpHeartbeats(std::move(options)));
  std::string errors;
  for (addrinfo* a = found; a != nullptr && u->fd_ < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int on = 1;
    if (a->ai_family == AF_INET6) {
      const int off = 0;  // "[::]" takes IPv4 peers too
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
      setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &on, sizeof(on));
    }
    setsockopt(fd, IPPROTO_IP, IP_RECVERR, &on, sizeof(on));  // ICMP errors: DrainErrors
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0) {
      absl::StrAppend(&errors, errors.empty() ? "" : "; ", std::strerror(errno));
      close(fd);
      continue;
    }
    u->fd_ = fd;
  }
  freeaddrinfo(found);
  if (u->fd_ < 0) {
    return absl::UnavailableError(absl::StrCat(
        "could not bind UDP ", u->options_.listen_address,
        " for membership datagrams (peer.listen_address, UDP on the peer port's number): ",
        errors.empty() ? "no usable address" : errors, "; is the UDP port in use?"));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  getsockname(u->fd_, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  u->port_ = ntohs(bound.ss_family == AF_INET6
                       ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                       : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  u->stop_fd_ = eventfd(0, EFD_CLOEXEC);
  if (u->stop_fd_ < 0) {
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  }
  UdpHeartbeats* const self = u.get();
  u->receiver_ = std::thread([self] { self->ReceiveLoop(); });
  return u;
}

UdpHeartbeats::~UdpHeartbeats() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, pending] : pending_) {
      pending->done = true;
      pending->result = absl::CancelledError("membership datagrams are stopping");
    }
  }
  if (stop_fd_ >= 0) {
    const uint64_t one = 1;
    ssize_t ignored = write(stop_fd_, &one, sizeof(one));
    (void)ignored;
  }
  if (receiver_.joinable()) receiver_.join();
  // Callers still inside Heartbeat see `done` and leave before the members they use go.
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](std::map<uint64_t, Pending*>* p) { return p->empty(); }, &pending_));
  if (fd_ >= 0) close(fd_);
  if (stop_fd_ >= 0) close(stop_fd_);
}

absl::StatusOr<sockaddr_storage> UdpHeartbeats::Resolve(const std::string& peer,
                                                        socklen_t* len) {
  {
    absl::MutexLock lock(&mu_);
    auto it = resolved_.find(peer);
    if (it != resolved_.end() && absl::Now() - it->second.at < kResolveTtl) {
      *len = it->second.len;
      return it->second.addr;
    }
  }
  std::string host, port;
  TESSERA_RETURN_IF_ERROR(SplitAddress(peer, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0 || found == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve member address '", peer, "': ", gai_strerror(rc)));
  }
  Resolved r{};
  std::memcpy(&r.addr, found->ai_addr, found->ai_addrlen);
  r.len = found->ai_addrlen;
  r.at = absl::Now();
  freeaddrinfo(found);
  // An IPv4 peer from an IPv6 socket: as a mapped address.
  sockaddr_storage local{};
  socklen_t local_len = sizeof(local);
  getsockname(fd_, reinterpret_cast<sockaddr*>(&local), &local_len);
  if (local.ss_family == AF_INET6 && r.addr.ss_family == AF_INET) {
    sockaddr_in v4;
    std::memcpy(&v4, &r.addr, sizeof(v4));
    sockaddr_in6 v6{};
    v6.sin6_family = AF_INET6;
    v6.sin6_port = v4.sin_port;
    v6.sin6_addr.s6_addr[10] = 0xff;
    v6.sin6_addr.s6_addr[11] = 0xff;
    std::memcpy(&v6.sin6_addr.s6_addr[12], &v4.sin_addr, 4);
    std::memset(&r.addr, 0, sizeof(r.addr));
    std::memcpy(&r.addr, &v6, sizeof(v6));
    r.len = sizeof(v6);
  }
  absl::MutexLock lock(&mu_);
  if (resolved_.size() > 4096) resolved_.clear();  // bounded, whatever the cluster's churn
  resolved_[peer] = r;
  *len = r.len;
  return r.addr;
}

absl::StatusOr<HeartbeatReply> UdpHeartbeats::Heartbeat(const std::string& peer,
                                                        const HeartbeatMessage& message) {
  if (message.from.node_id.empty() || message.from.incarnation == 0) {
    return absl::InvalidArgumentError(
        "a heartbeat needs the sender's node_id and a non-zero incarnation");
  }
  socklen_t len = 0;
  TESSERA_ASSIGN_OR_RETURN(sockaddr_storage to, Resolve(peer, &len));
  peer::HeartbeatRequest request;
  peer_wire::ToProto(message, &request);
  const uint64_t id = next_id_.fetch_add(1);
  TESSERA_ASSIGN_OR_RETURN(std::string datagram,
                           Encode(kRequest, id, request.SerializeAsString(), options_.token,
                                  options_.signer.get(), incarnation_));
  Pending pending;
  pending.address = peer;
  pending.to = to;
  pending.to_len = len;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::CancelledError("membership datagrams are stopping");
    pending_[id] = &pending;
  }
  ssize_t sent = -1;
  int send_errno = 0;
  // An ICMP error about another peer can fail the next send once (the socket's pending error):
  // that error is not this send's, so it is sent again.
  for (int attempt = 0; attempt < 2 && sent < 0; ++attempt) {
    sent = sendto(fd_, datagram.data(), datagram.size(), MSG_DONTWAIT,
                  reinterpret_cast<const sockaddr*>(&to), len);
    send_errno = errno;
    if (sent < 0 && send_errno != ECONNREFUSED && send_errno != EHOSTUNREACH &&
        send_errno != ENETUNREACH) {
      break;
    }
  }
  absl::MutexLock lock(&mu_);
  if (sent < 0) {
    pending_.erase(id);
    return absl::UnavailableError(absl::StrCat("sending a membership datagram to ", peer, ": ",
                                               std::strerror(send_errno)));
  }
  ++stats_.sent;
  mu_.AwaitWithTimeout(absl::Condition(&pending.done), options_.timeout);
  pending_.erase(id);
  if (!pending.done) {
    ++stats_.timeouts;
    return absl::DeadlineExceededError(absl::StrCat("no answer from ", peer, " within ",
                                                    absl::FormatDuration(options_.timeout)));
  }
  return std::move(pending.result);
}

void UdpHeartbeats::ReceiveLoop() {
  std::vector<uint8_t> buffer(kMaxDatagramBytes + 1);
  for (;;) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Logger("membership")->error("membership datagrams: poll: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLERR) != 0) DrainErrors();
    // Drain what is queued before polling again.
    for (;;) {
      sockaddr_storage from{};
      socklen_t from_len = sizeof(from);
      const ssize_t n = recvfrom(fd_, buffer.data(), buffer.size(), MSG_DONTWAIT | MSG_TRUNC,
                                 reinterpret_cast<sockaddr*>(&from), &from_len);
      if (n < 0) break;  // EAGAIN: nothing more now (errors are per datagram: ICMP and such)
      if (static_cast<size_t>(n) > kMaxDatagramBytes) {
        absl::MutexLock lock(&mu_);
        Drop("oversized", absl::InvalidArgumentError(absl::StrCat("a datagram of ", n,
                                                                  " bytes")),
             &stats_.dropped_malformed);
        continue;
      }
      HandleDatagram(buffer.data(), static_cast<size_t>(n), from, from_len);
    }
  }
}

namespace {

bool SameAddress(const sockaddr_storage& a, const sockaddr_storage& b) {
  if (a.ss_family != b.ss_family) return false;
  if (a.ss_family == AF_INET) {
    const auto& x = reinterpret_cast<const sockaddr_in&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in&>(b);
    return x.sin_port == y.sin_port && x.sin_addr.s_addr == y.sin_addr.s_addr;
  }
  if (a.ss_family == AF_INET6) {
    const auto& x = reinterpret_cast<const sockaddr_in6&>(a);
    const auto& y = reinterpret_cast<const sockaddr_in6&>(b);
    return x.sin6_port == y.sin6_port &&
           std::memcmp(&x.sin6_addr, &y.sin6_addr, sizeof(x.sin6_addr)) == 0;
  }
  return false;
}

}  // namespace

void UdpHeartbeats::DrainErrors() {
  for (;;) {
    sockaddr_storage offender{};
    char control[512];
    char byte;
    iovec iov{&byte, sizeof(byte)};
    msghdr msg{};
    msg.msg_name = &offender;
    msg.msg_namelen = sizeof(offender);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    if (recvmsg(fd_, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return;  // EAGAIN: drained
    bool port_unreachable = false;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      const bool v4 = c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_RECVERR;
      const bool v6 = c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_RECVERR;
      if (!v4 && !v6) continue;
      sock_extended_err e;
      std::memcpy(&e, CMSG_DATA(c), sizeof(e));
      port_unreachable =
          port_unreachable ||
          (e.ee_origin == SO_EE_ORIGIN_ICMP && e.ee_type == ICMP_DEST_UNREACH &&
           e.ee_code == ICMP_PORT_UNREACH) ||
          (e.ee_origin == SO_EE_ORIGIN_ICMP6 && e.ee_type == ICMP6_DST_UNREACH &&
           e.ee_code == ICMP6_DST_UNREACH_NOPORT);
    }
    if (!port_unreachable || msg.msg_namelen == 0) continue;
    absl::MutexLock lock(&mu_);
    for (auto& [id, pending] : pending_) {
      if (pending->done || !SameAddress(pending->to, offender)) continue;
      pending->result = absl::UnavailableError(absl::StrCat(
          "nothing listens for membership datagrams at ", pending->address,
          " (ICMP port unreachable): its daemon is not running"));
      pending->done = true;
      ++stats_.unreachable;
    }
  }
}

void UdpHeartbeats::Drop(const char* reason, const absl::Status& status, uint64_t* counter) {
  ++*counter;
  // A late answer (its call gave up) is normal under load: counted, not logged.
  if (counter == &stats_.dropped_unexpected) return;
  const absl::Time now = absl::Now();
  auto [it, first] = last_logged_.emplace(reason, now);
  if (!first && now - it->second < absl::Seconds(10)) return;
  it->second = now;
  Logger("membership")->warn("membership datagram dropped ({}): {} (logged at most once per "
                             "10 s; tessera_membership_datagrams_dropped_total counts them)",
                             reason, std::string(status.message()));
}

void UdpHeartbeats::HandleDatagram(const uint8_t* data, size_t size, const sockaddr_storage& from,
                                   socklen_t from_len) {
  const std::string source = SourceOf(from);
  const absl::Time now = absl::Now();
  if (!throttle_.Admit(source, now)) {
    absl::MutexLock lock(&mu_);
    Drop("throttled",
         absl::ResourceExhaustedError(absl::StrCat(
             "datagrams from ", source,
             " are dropped unchecked: too many failed authentication lately (from it, or from "
             "addresses that are not members')")),
         &stats_.dropped_throttled);
    return;
  }
  absl::StatusOr<Decoded> d =
      Decode(data, size, options_.token, options_.signer.get(), &replay_);
  if (absl::IsAlreadyExists(d.status())) {
    // Refused before its signature: it cost no check, so spends no budget.
    absl::MutexLock lock(&mu_);
    Drop("replayed", d.status(), &stats_.dropped_replayed);
    return;
  }
  if (!d.ok()) {
    if (absl::IsUnauthenticated(d.status())) throttle_.Failed(source, now);
    absl::MutexLock lock(&mu_);
    if (absl::IsUnauthenticated(d.status())) {
      Drop("unauthenticated", d.status(), &stats_.dropped_unauthenticated);
    } else {
      Drop("malformed", d.status(), &stats_.dropped_malformed);
    }
    return;
  }
  throttle_.Passed(source, now);
  if (d->type == kRequest) {
    peer::HeartbeatRequest request;
    if (!request.ParseFromString(d->body)) {
      absl::MutexLock lock(&mu_);
      Drop("malformed", absl::InvalidArgumentError("a request that does not parse"),
           &stats_.dropped_malformed);
      return;
    }
    if (options_.signer != nullptr && request.node_id() != d->node_id) {
      absl::MutexLock lock(&mu_);
      Drop("unauthenticated", Impersonation("a heartbeat", request.node_id(), d->node_id),
           &stats_.dropped_unauthenticated);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      ++stats_.requests_received;
    }
    absl::StatusOr<HeartbeatReply> reply =
        request.node_id().empty() || request.incarnation() == 0
            ? absl::InvalidArgumentError(absl::StrCat(
                  "a heartbeat needs the sender's node_id and a non-zero incarnation; got node '",
                  request.node_id(), "' incarnation ", request.incarnation()))
            : options_.on_request(peer_wire::FromProto(request));
    std::string body;
    uint8_t type = kReply;
    if (reply.ok()) {
      peer::HeartbeatResponse response;
      peer_wire::ToProto(*reply, &response);
      body = response.SerializeAsString();
    } else {
      type = kRefused;
      body = RefusalBody(reply.status());
    }
    absl::StatusOr<std::string> datagram =
        Encode(type, d->id, body, options_.token, options_.signer.get(), incarnation_);
    if (!datagram.ok()) return;  // too many updates to fit: the asker's deadline passes
    if (sendto(fd_, datagram->data(), datagram->size(), MSG_DONTWAIT,
               reinterpret_cast<const sockaddr*>(&from), from_len) >= 0) {
      absl::MutexLock lock(&mu_);
      ++stats_.sent;
    }
    return;
  }
  absl::StatusOr<HeartbeatReply> result = absl::UnknownError("unset");
  if (d->type == kReply) {
    peer::HeartbeatResponse response;
    if (!response.ParseFromString(d->body)) {
      absl::MutexLock lock(&mu_);
      Drop("malformed", absl::InvalidArgumentError("a reply that does not parse"),
           &stats_.dropped_malformed);
      return;
    }
    if (options_.signer != nullptr && response.node_id() != d->node_id) {
      absl::MutexLock lock(&mu_);
      Drop("unauthenticated", Impersonation("a reply", response.node_id(), d->node_id),
           &stats_.dropped_unauthenticated);
      return;
    }
    result = peer_wire::FromProto(response, "");  // the address is the pending call's
  } else {
    absl::StatusOr<absl::Status> refusal = ReadRefusal(d->body);
    if (!refusal.ok()) {
      absl::MutexLock lock(&mu_);
      Drop("malformed", refusal.status(), &stats_.dropped_malformed);
      return;
    }
    result = *std::move(refusal);
  }
  absl::MutexLock lock(&mu_);
  auto it = pending_.find(d->id);
  if (it == pending_.end() || it->second->done) {
    Drop("unexpected", absl::NotFoundError(absl::StrCat("a reply to request ", d->id,
                                                        ", which is not waiting here")),
         &stats_.dropped_unexpected);
    return;
  }
  ++stats_.replies_received;
  if (result.ok()) result->peer.address = it->second->address;
  it->second->result = std::move(result);
  it->second->done = true;
}

UdpHeartbeats::Stats UdpHeartbeats::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tessera
