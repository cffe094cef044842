// UdpHeartbeats: membership heartbeats (SWIM probes, ping-reqs, indirect acks and their acks) as
// single UDP datagrams on the peer port's number, instead of gRPC calls.
//
// Why: an idle daemon's cost is its heartbeats. A gRPC unary call wakes about ten threads on
// each side (pollers, timers, the callback queue's threads); a datagram wakes the receiver's one
// thread, and the sender's thread that waits for the answer. The messages are the same protobufs
// (peer.HeartbeatRequest / peer.HeartbeatResponse) and go through the same Cluster code.
//
// Wire format of one datagram (little-endian):
//   [0, 4)    magic "TSHB"
//   [4]       format version: 1, or 3 when signed (mutual TLS; 2, signed without incarnation and
//             sequence by an older release, is refused: it could be replayed)
//   [5]       type: 1 request, 2 reply, 3 refused (the handler's error: code u32, then the
//             message; when the error has details (common/grpc_status.h, such as the proof behind
//             a fencing refusal), the code's top bit is set and u16 M, M bytes of message and the
//             details follow instead)
//   [6, 8)    0
//   [8, 16)   id: the sender's request number; a reply repeats it
//   version 1:
//   [16, n)   body: the protobuf (request, reply) or the error (refused)
//   version 3:
//   [16, 20)  u32 B
//   [20, 28)  the sender's incarnation (non-zero; Options::incarnation)
//   [28, 36)  its sequence number (non-zero): one more for each datagram its process signs
//             (DatagramSigner::NextSequence), requests and replies alike
//   [36, ...) B bytes of body, then the sender's identity block: its certificate chain and its
//             signature over all the bytes before it (datagram_signer.h)
//   then, either version:
//   [n, n+32) HMAC-SHA256 of [0, n) keyed by the cluster token; zeros when there is none
// A datagram is at most kMaxDatagramBytes; a message that would not fit is not sent (an error),
// and a longer datagram is dropped unread.
//
// Every received byte is hostile: a datagram that is short, too long, of another magic, version
// or type, whose MAC does not verify (when this daemon has a token), whose protobuf does not
// parse, or a reply to no request outstanding here, is dropped and counted (Stats), and logged at
// most once per 10 s per reason. Authentication: with a token, only holders of the token can
// make a datagram that is accepted. With mutual TLS (Options::signer), only version 2 datagrams
// are accepted, signed with a certificate of the cluster's CA that names a node, and a request
// or reply whose message names another node than the certificate does (node_id) is dropped as
// unauthenticated: a daemon speaks only for its own node, as on the gRPC calls. Replays: a
// signed datagram whose (node, incarnation, sequence) was taken already, lies below the window
// of the sender's highest verified sequence, or is of an older incarnation than the last two
// verified from that node is dropped before its signature is checked (replay_window.h;
// Stats::dropped_replayed, logged at most once per 10 s); requests and replies alike, so an
// indirect probe's ack relayed is covered hop by hop. A replayed datagram costs a MAC and a
// lookup, no signature check, and spends no budget. With a token only (no TLS), a recorded
// datagram can still be replayed: it can only repeat an answer or an update that membership
// already orders by incarnation and version. Without either (an insecure cluster), anyone who
// reaches the port can send membership messages, as with the gRPC path.
//
// Cost of forged datagrams: the cheap checks come first (size, magic, version, type; then the
// MAC; then, under TLS, whether the certificate, when its chain is known, names the node the
// message claims), and the signature last. Datagrams that fail the MAC or the signature are
// budgeted per source address and in all (Options::throttle, verification_throttle.h): past
// its budget, a source's datagrams are dropped unchecked (Stats::dropped_throttled, logged at
// most once per 10 s), so a flood costs a bounded number of checks per second, and members'
// datagrams from other addresses are still checked and answered.
//
// Threads: one receiver thread answers requests (calling `on_request` inline: keep it short) and
// hands replies to the waiting Heartbeat call. Heartbeat may be called from many threads.
#ifndef TESSERA_DAEMON_MEMBERSHIP_UDP_HEARTBEATS_H_
#define TESSERA_DAEMON_MEMBERSHIP_UDP_HEARTBEATS_H_

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/membership/datagram_signer.h"
#include "daemon/membership/replay_window.h"
#include "daemon/membership/verification_throttle.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"

namespace tessera {

class UdpHeartbeats final : public HeartbeatSender {
 public:
  static constexpr size_t kHeaderBytes = 16;
  static constexpr size_t kMacBytes = 32;
  static constexpr size_t kMaxDatagramBytes = 60 * 1024;

  using RequestHandler = std::function<absl::StatusOr<HeartbeatReply>(const HeartbeatMessage&)>;

  struct Options {
    std::string listen_address;  // "host:port" (port > 0): the peer port's number, over UDP
    std::string token;           // the cluster token; empty: datagrams carry no MAC
    // With mutual TLS: signs what is sent and checks what is received (version 2). Null: none.
    std::shared_ptr<DatagramSigner> signer;
    // With a signer: this daemon's incarnation, stamped on every datagram it signs (receivers
    // keep a replay window per node and incarnation). 0: the time Start is called, in unix ms.
    uint64_t incarnation = 0;
    absl::Duration timeout = absl::Seconds(3);  // how long Heartbeat waits for the answer
    RequestHandler on_request;                  // required
    // How many datagrams failing authentication are checked, per source and in all.
    VerificationThrottle::Options throttle;
  };

  // Dropped datagrams by reason, and what went through.
  struct Stats {
    uint64_t requests_received = 0;
    uint64_t replies_received = 0;
    uint64_t sent = 0;
    uint64_t timeouts = 0;            // Heartbeat calls that got no answer in time
    uint64_t unreachable = 0;         // ended at once by an ICMP "port unreachable"
    uint64_t dropped_malformed = 0;   // short, long, wrong magic/version/type, bad protobuf
    // MAC missing or wrong; with TLS, unsigned, a signature or certificate that does not verify,
    // or a message claiming another node than its certificate names.
    uint64_t dropped_unauthenticated = 0;
    uint64_t dropped_unexpected = 0;  // a reply to no outstanding request
    // Unchecked: their source (or, for a source not heard from lately, all such sources) had
    // failed authentication past its budget.
    uint64_t dropped_throttled = 0;
    // With TLS, refused before their signature: taken already, below the sender's window, or of
    // an older incarnation (replay_window.h).
    uint64_t dropped_replayed = 0;
  };

  // Binds the socket and starts the receiver thread.
  static absl::StatusOr<std::unique_ptr<UdpHeartbeats>> Start(Options options);
  ~UdpHeartbeats() override;  // stops the receiver; pending calls end with kCancelled

  // Sends `message` to `peer` ("host:port") and waits for its answer: the reply, the peer's
  // error (refused), kDeadlineExceeded after `timeout`, or kUnavailable when it cannot be sent or
  // the peer's host answers that nothing listens on the port (ICMP port unreachable, read from
  // the socket's error queue: a crashed daemon on a live host fails its probe at once, as a
  // refused TCP connection would).
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string& peer,
                                           const HeartbeatMessage& message) override;

  Stats stats() const;
  uint16_t port() const { return port_; }

  // The datagram codec, exposed for tests. With a signer, version 3 (signed, stamped with
  // `incarnation` and the signer's next sequence number); without, version 1. Encode returns
  // kInvalidArgument when the body does not fit in kMaxDatagramBytes, or with a signer and no
  // incarnation.
  static absl::StatusOr<std::string> Encode(uint8_t type, uint64_t id, const std::string& body,
                                            const std::string& token,
                                            DatagramSigner* signer = nullptr,
                                            uint64_t incarnation = 0);
  struct Decoded {
    uint8_t type = 0;
    uint64_t id = 0;
    std::string body;
    std::string node_id;  // version 3: the node the signer's certificate names
    uint64_t incarnation = 0;  // version 3: the sender's, and its sequence number
    uint64_t sequence = 0;
  };
  // kInvalidArgument (malformed) or kUnauthenticated (MAC; with a signer, unsigned or a
  // signature or certificate that does not verify, or a request or reply whose message names
  // another node than the certificate), naming what was wrong. With a signer and `replay`:
  // kAlreadyExists, with no signature check, for a datagram `replay` refuses, and a datagram
  // that verifies is marked there.
  static absl::StatusOr<Decoded> Decode(const uint8_t* data, size_t size,
                                        const std::string& token,
                                        DatagramSigner* signer = nullptr,
                                        ReplayWindow* replay = nullptr);

 private:
  struct Pending {
    bool done = false;
    absl::StatusOr<HeartbeatReply> result = absl::UnknownError("no answer yet");
    std::string address;
    sockaddr_storage to{};  // where the request went, to match ICMP errors
    socklen_t to_len = 0;
  };
  explicit UdpHeartbeats(Options options);
  void ReceiveLoop();
  void HandleDatagram(const uint8_t* data, size_t size, const sockaddr_storage& from,
                      socklen_t from_len);
  void Drop(const char* reason, const absl::Status& status, uint64_t* counter);
  // Reads the socket's error queue: each "port unreachable" ends the calls waiting on that
  // address.
  void DrainErrors();
  absl::StatusOr<sockaddr_storage> Resolve(const std::string& peer, socklen_t* len);

  const Options options_;
  const uint64_t incarnation_;
  int fd_ = -1;
  int stop_fd_ = -1;  // an eventfd that wakes the receiver to stop
  uint16_t port_ = 0;
  std::atomic<uint64_t> next_id_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Pending*> pending_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, absl::Time> last_logged_ ABSL_GUARDED_BY(mu_);  // by drop reason
  struct Resolved {
    sockaddr_storage addr;
    socklen_t len;
    absl::Time at;
  };
  std::map<std::string, Resolved> resolved_ ABSL_GUARDED_BY(mu_);  // peer address -> socket
  // Used by the receiver thread only.
  VerificationThrottle throttle_;
  ReplayWindow replay_;
  std::thread receiver_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_UDP_HEARTBEATS_H_
