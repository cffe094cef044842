// Who sent a membership datagram, under mutual TLS (cluster.tls_*): each datagram carries its
// sender's certificate chain and a signature over the datagram by that certificate's key, so
// that a receiver learns the node that sent it (the node its certificate names,
// daemon/transfer/node_identity.h) from the datagram alone, and UdpHeartbeats drops a datagram
// whose message claims another node.
//
// Why signatures: the cluster token's HMAC (which datagrams carry as well, when there is a token)
// says only that the sender holds the token, which every daemon does, so any daemon could speak
// for another; and a TLS cluster may run without a token (cluster.insecure = true), its datagrams
// then being anyone's. A key handed to each pair of daemons over the TLS calls would tie UDP to a
// round trip over gRPC before the first probe of every peer, and again after every restart,
// which is when membership matters most. A signature needs no state on either side: the
// certificate is the same identity the gRPC calls check, the CA the same trust. The cost is CPU
// (an ECDSA P-256 signature and verification per datagram: tens of microseconds each, see
// datagram_signer_test) and about 600 bytes per datagram; verified chains are cached, so a
// chain is checked against the CA once per refresh period, and so are chains that did not
// verify, so a forged one is refused without a second check. What a flood of forged datagrams
// can cost in all is bounded by UdpHeartbeats (verification_throttle.h).
//
// Replays: a recorded datagram sent again would pass every check, each time at the price of a
// signature check. So each signed membership datagram carries, inside the signed bytes, its
// sender's incarnation and a sequence number from NextSequence (udp_heartbeats.h), and the
// receiver keeps, per node, the highest it verified and a window below it (replay_window.h): a
// datagram already taken, below the window or of an older incarnation is dropped before the
// signature is checked (the `before_signature` argument of Verify), and the window moves only
// once a signature verifies.
//
// The same identity block signs a member's proof of its incarnation (incarnation_proof.h), which
// gossip about the member carries.
//
// Identity block, appended after the message (little-endian):
//   u16 C, C bytes: the certificate chain, DER, leaf first
//   u16 S, S bytes: the signature (DER ECDSA, or RSA / EdDSA as the key is) over every byte of
//                   the datagram before S
//
// The certificate, key and CA files are read again every refresh_s (as the gRPC credentials
// are), so that rotated certificates are used without a restart; a failed read keeps the ones
// held and is logged.
//
// Thread-safe.
#ifndef TESSERA_DAEMON_MEMBERSHIP_DATAGRAM_SIGNER_H_
#define TESSERA_DAEMON_MEMBERSHIP_DATAGRAM_SIGNER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/transfer/cluster_tls.h"

namespace tessera {

// The error for `what` (a datagram, a heartbeat, a reply) whose message says it comes from node
// `claimed` but which is signed with the certificate of node `certified`.
absl::Status Impersonation(const char* what, const std::string& claimed,
                           const std::string& certified);

class DatagramSigner {
 public:
  // Reads the files. kInvalidArgument naming the file when one cannot be read, or when the
  // certificate names no node, or (with `node_id`) another node than `node_id`. A certificate
  // read again later that names another node is not taken either (logged; the one held stays).
  static absl::StatusOr<std::unique_ptr<DatagramSigner>> Create(const ClusterTlsFiles& files,
                                                                const std::string& node_id = "");
  ~DatagramSigner();

  // The node this daemon's certificate names.
  std::string node_id() const;
  // How many times the files were read and taken (1 after Create), reading them again first when
  // refresh_s has passed: what was signed under an older count was signed with a certificate no
  // longer held.
  uint64_t generation();

  // Appends the identity block to `datagram` (whose bytes it signs). kInternal if signing fails.
  absl::Status Sign(std::string* datagram);
  // The next of a counter that starts at 1 with this signer (one per daemon process): the
  // sequence number of a membership datagram about to be signed.
  uint64_t NextSequence();

  // Checks the identity block that starts at data[block] and ends at data[end]: the node the
  // signer's certificate names. kUnauthenticated when the chain does not verify against the CA
  // (or names no node) or the signature does not verify; kInvalidArgument when the block is
  // malformed. With `claimed_node`, the node the datagram's message says it comes from, a
  // certificate naming another node is kUnauthenticated (Impersonation(what, ...)) before the
  // signature is checked: such a datagram costs no signature check. So does one refused by
  // `before_signature`, called with the node the (verified) certificate names just before the
  // signature would be checked: its error is returned as it is.
  absl::StatusOr<std::string> Verify(
      const uint8_t* data, size_t block, size_t end, const std::string& claimed_node = "",
      const char* what = "a datagram",
      const std::function<absl::Status(const std::string& node)>& before_signature = nullptr);

  struct Stats {
    uint64_t signed_datagrams = 0;
    uint64_t verified_datagrams = 0;
    uint64_t chains_checked = 0;      // against the CA; the others came from the cache
    uint64_t chains_refused = 0;      // did not verify against the CA (each checked once)
    uint64_t signatures_checked = 0;  // signature verifications, passed or not
  };
  Stats stats() const;

 private:
  struct Identity;
  struct VerifiedChain;
  DatagramSigner(ClusterTlsFiles files, std::string node_id)
      : files_(std::move(files)), expected_node_id_(std::move(node_id)) {}
  // Reads the files; OK or why not.
  absl::Status Load();
  // Reads them again when refresh_s has passed since the last read.
  void MaybeReload();
  std::shared_ptr<const Identity> Current();

  const ClusterTlsFiles files_;
  std::string expected_node_id_;  // "": the first certificate's, from Create on
  mutable absl::Mutex mu_;
  std::shared_ptr<const Identity> identity_ ABSL_GUARDED_BY(mu_);
  absl::Time loaded_at_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  // By the SHA-256 of the chain's bytes; cleared when the files are read again. Chains that
  // verified, and those that did not (with why, and when it was checked).
  std::map<std::string, std::shared_ptr<const VerifiedChain>> chains_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::pair<absl::Status, absl::Time>> refused_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> next_sequence_{1};
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_DATAGRAM_SIGNER_H_
