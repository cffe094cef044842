// Test only: relays on 127.0.0.1 that stand between two ends, to see, alter or redirect what
// passes.
//
//   TcpRelay  accepts connections on a port and pipes each to a target port, both ways; keeps
//             every byte it forwarded, each direction apart, and can alter one byte on the way
//             (a man in the middle). The target can be changed: connections accepted after that
//             go to the new one (Cut closes the ones open, so that their ends connect again).
//   UdpRelay  forwards each datagram it receives on a port to a target port, from a socket of its
//             own per sender, and what comes back to that socket to the sender: the target
//             answers the relay's address and the sender hears the relay's.
//
// Both stop (and join their threads) on destruction. Thread-safe.
#ifndef TESSERA_TESTS_RELAY_H_
#define TESSERA_TESTS_RELAY_H_

#include <cstdint>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tessera::testing {

class TcpRelay {
 public:
  // Listens on `listen_port` (0: any free one, see port()). Check ok().
  explicit TcpRelay(uint16_t target_port, uint16_t listen_port = 0);
  ~TcpRelay();
  TcpRelay(const TcpRelay&) = delete;
  TcpRelay& operator=(const TcpRelay&) = delete;

  bool ok() const { return listen_fd_ >= 0; }
  uint16_t port() const { return port_; }
  void SetTarget(uint16_t target_port);
  // Closes every connection open now (both ends see it end).
  void Cut();
  // Connections accepted so far.
  int connections();

  // Flips bits `mask` of byte `offset` (counted over every connection's bytes in that direction).
  void AlterByte(bool client_to_server, uint64_t offset, uint8_t mask);
  std::string Captured(bool client_to_server);

 private:
  struct Alteration {
    bool client_to_server = false;
    uint64_t offset = UINT64_MAX;
    uint8_t mask = 0;
  };
  void Accept();
  void Pump(int from, int to, bool client_to_server);

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::thread acceptor_;
  absl::Mutex mu_;
  uint16_t target_port_ ABSL_GUARDED_BY(mu_);
  int connections_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int> fds_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> pumps_;  // joined after the acceptor
  std::string captured_[2] ABSL_GUARDED_BY(mu_);
  Alteration alter_ ABSL_GUARDED_BY(mu_);
};

class UdpRelay {
 public:
  // Receives on `listen_port` (0: any free one). Check ok().
  UdpRelay(uint16_t target_port, uint16_t listen_port = 0);
  ~UdpRelay();
  UdpRelay(const UdpRelay&) = delete;
  UdpRelay& operator=(const UdpRelay&) = delete;

  bool ok() const { return fd_ >= 0; }
  uint16_t port() const { return port_; }

 private:
  void Loop();

  const uint16_t target_port_;
  int fd_ = -1;
  int stop_fd_ = -1;  // an eventfd
  uint16_t port_ = 0;
  std::map<uint64_t, int> upstream_;  // sender (address, port) -> the relay's socket for it
  std::thread loop_;
};

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_RELAY_H_
