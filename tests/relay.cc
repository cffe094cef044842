#include "tests/relay.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace tessera::testing {
namespace {

// A socket of `type` bound to 127.0.0.1:`port` (0: any), or -1; *bound gets the port.
int BoundLoopback(int type, uint16_t port, uint16_t* bound) {
  const int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
      (type == SOCK_STREAM && listen(fd, 64) != 0) ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return -1;
  }
  *bound = ntohs(addr.sin_port);
  return fd;
}

sockaddr_in Loopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  return addr;
}

}  // namespace

TcpRelay::TcpRelay(uint16_t target_port, uint16_t listen_port) : target_port_(target_port) {
  listen_fd_ = BoundLoopback(SOCK_STREAM, listen_port, &port_);
  if (listen_fd_ >= 0) acceptor_ = std::thread([this] { Accept(); });
}

TcpRelay::~TcpRelay() {
  if (listen_fd_ < 0) return;
  shutdown(listen_fd_, SHUT_RDWR);
  close(listen_fd_);
  acceptor_.join();
  {
    absl::MutexLock lock(&mu_);
    for (int fd : fds_) shutdown(fd, SHUT_RDWR);
  }
  for (auto& t : pumps_) t.join();
  for (int fd : fds_) close(fd);
}

void TcpRelay::SetTarget(uint16_t target_port) {
  absl::MutexLock lock(&mu_);
  target_port_ = target_port;
}

void TcpRelay::Cut() {
  absl::MutexLock lock(&mu_);
  for (int fd : fds_) shutdown(fd, SHUT_RDWR);
}

int TcpRelay::connections() {
  absl::MutexLock lock(&mu_);
  return connections_;
}

void TcpRelay::AlterByte(bool client_to_server, uint64_t offset, uint8_t mask) {
  absl::MutexLock lock(&mu_);
  alter_ = {client_to_server, offset, mask};
}

std::string TcpRelay::Captured(bool client_to_server) {
  absl::MutexLock lock(&mu_);
  return captured_[client_to_server ? 0 : 1];
}

void TcpRelay::Accept() {
  for (;;) {
    const int client = accept(listen_fd_, nullptr, nullptr);
    if (client < 0) return;
    uint16_t target = 0;
    {
      absl::MutexLock lock(&mu_);
      target = target_port_;
      ++connections_;
    }
    const int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const sockaddr_in addr = Loopback(target);
    if (connect(server, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(client);
      close(server);
      continue;
    }
    absl::MutexLock lock(&mu_);
    fds_.push_back(client);
    fds_.push_back(server);
    pumps_.emplace_back([this, client, server] { Pump(client, server, true); });
    pumps_.emplace_back([this, client, server] { Pump(server, client, false); });
  }
}

void TcpRelay::Pump(int from, int to, bool client_to_server) {
  std::vector<uint8_t> buffer(1 << 16);
  bool broken = false;  // `to` refused a send (its end reset the connection)
  for (;;) {
    const ssize_t n = recv(from, buffer.data(), buffer.size(), 0);
    if (n <= 0) break;
    // What `from` sends after `to` broke is read and dropped, as the reset would have ended it:
    // left unread, it would fill the socket and hold a sender until its deadline.
    if (broken) continue;
    {
      absl::MutexLock lock(&mu_);
      std::string& seen = captured_[client_to_server ? 0 : 1];
      const uint64_t begin = seen.size();
      if (alter_.client_to_server == client_to_server && alter_.offset >= begin &&
          alter_.offset < begin + static_cast<uint64_t>(n)) {
        buffer[alter_.offset - begin] ^= alter_.mask;
      }
      seen.append(reinterpret_cast<const char*>(buffer.data()), static_cast<size_t>(n));
    }
    if (send(to, buffer.data(), static_cast<size_t>(n), MSG_NOSIGNAL) != n) broken = true;
  }
  shutdown(to, SHUT_WR);
}

UdpRelay::UdpRelay(uint16_t target_port, uint16_t listen_port) : target_port_(target_port) {
  fd_ = BoundLoopback(SOCK_DGRAM, listen_port, &port_);
  stop_fd_ = eventfd(0, EFD_CLOEXEC);
  if (fd_ >= 0 && stop_fd_ >= 0) loop_ = std::thread([this] { Loop(); });
}

UdpRelay::~UdpRelay() {
  if (loop_.joinable()) {
    const uint64_t one = 1;
    ssize_t ignored = write(stop_fd_, &one, sizeof(one));
    (void)ignored;
    loop_.join();
  }
  for (const auto& [sender, fd] : upstream_) close(fd);
  if (fd_ >= 0) close(fd_);
  if (stop_fd_ >= 0) close(stop_fd_);
}

void UdpRelay::Loop() {
  std::vector<uint8_t> buffer(1 << 16);
  std::map<int, sockaddr_in> sender_of;  // upstream socket -> the sender it serves
  const sockaddr_in target = Loopback(target_port_);
  for (;;) {
    std::vector<pollfd> fds = {{stop_fd_, POLLIN, 0}, {fd_, POLLIN, 0}};
    for (const auto& [fd, sender] : sender_of) fds.push_back({fd, POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[0].revents != 0) return;
    if (fds[1].revents & POLLIN) {
      sockaddr_in from{};
      socklen_t len = sizeof(from);
      const ssize_t n = recvfrom(fd_, buffer.data(), buffer.size(), MSG_DONTWAIT,
                                 reinterpret_cast<sockaddr*>(&from), &len);
      if (n >= 0) {
        const uint64_t key = (uint64_t{from.sin_addr.s_addr} << 16) | from.sin_port;
        auto it = upstream_.find(key);
        if (it == upstream_.end()) {
          uint16_t unused = 0;
          const int up = BoundLoopback(SOCK_DGRAM, 0, &unused);
          if (up < 0) continue;
          it = upstream_.emplace(key, up).first;
          sender_of[up] = from;
        }
        sendto(it->second, buffer.data(), static_cast<size_t>(n), MSG_DONTWAIT,
               reinterpret_cast<const sockaddr*>(&target), sizeof(target));
      }
    }
    for (size_t i = 2; i < fds.size(); ++i) {
      if ((fds[i].revents & (POLLIN | POLLERR)) == 0) continue;
      const ssize_t n = recv(fds[i].fd, buffer.data(), buffer.size(), MSG_DONTWAIT);
      if (n < 0) continue;  // an ICMP error (the target is not there): the sender times out
      const sockaddr_in& sender = sender_of[fds[i].fd];
      sendto(fd_, buffer.data(), static_cast<size_t>(n), MSG_DONTWAIT,
             reinterpret_cast<const sockaddr*>(&sender), sizeof(sender));
    }
  }
}

}  // namespace tessera::testing
