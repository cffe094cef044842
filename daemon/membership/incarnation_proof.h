// A member's own word for one incarnation of its node id, under mutual TLS (cluster.tls_*).
//
// Why: a signed datagram (datagram_signer.h) proves who sent it, not that what it relays about
// other members is true. SWIM takes gossip as its sender says, so a member holding any valid
// certificate could announce a newer incarnation of another node id at an address of its own:
// every daemon would fence the real one (which, hearing of a newer self, exits), and the real one
// restarted (its incarnation is its start time, lower) would stay fenced. So each daemon signs,
// at start, a proof of its incarnation: its node id, its incarnation and the peer address it
// announces, signed with the key of its certificate and carrying the certificate's chain. Gossip
// that would introduce a member or raise its incarnation carries that member's proof, and a
// receiver applies it only when the proof verifies against the cluster's CA and its certificate
// names that node (Cluster, cluster.h). A member can then speak only for itself, first-hand or
// relayed.
//
// Wire format (little-endian):
//   [0, 4)  magic "TSIP"
//   [4]     format version: 1
//   u16 N, N bytes: the node id (1..255 bytes)
//   u64:    the incarnation (non-zero)
//   u16 A, A bytes: the address (1..1024 bytes)
//   then the identity block of datagram_signer.h: the certificate chain, and a signature over
//   every byte before it (the magic keeps a datagram's signature from passing for a proof's)
// About 550 bytes with the P-256 certificates of tools/make-cluster-certs.sh.
//
// A proof is made once per incarnation (again only when the daemon's certificate is read again,
// rotated), and a receiver checks each (node, incarnation) once: IncarnationProofs holds the
// newest proof verified per node id, to skip the check and to relay the proof onward. What
// proofs that do not verify can cost a receiver is bounded by a budget of checks per sending
// member (IncarnationProofs::Options::throttle).
//
// A proof does not expire with its incarnation's certificate: once verified, it holds for that
// incarnation here. Proofs can be replayed; each says only what its member said once, and an
// older incarnation's proof changes nothing where a newer one is known.
#ifndef TESSERA_DAEMON_MEMBERSHIP_INCARNATION_PROOF_H_
#define TESSERA_DAEMON_MEMBERSHIP_INCARNATION_PROOF_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/membership/datagram_signer.h"
#include "daemon/membership/verification_throttle.h"

namespace tessera {

// What a proof says.
struct IncarnationClaim {
  std::string node_id;
  uint64_t incarnation = 0;
  std::string address;  // host:port of the member's peer service, as it announces it
};

// The signed part of a proof: the magic, the version and the claim, before the identity block.
// REQUIRES: the claim's fields are within the limits above.
std::string IncarnationRecord(const IncarnationClaim& claim);

// The claim signed with `signer`'s certificate. kInvalidArgument when the claim is out of the
// limits above or names another node than the certificate; kInternal when signing fails.
absl::StatusOr<std::string> MakeIncarnationProof(DatagramSigner* signer,
                                                 const IncarnationClaim& claim);

// The claim `proof` makes, not checked; *block (when given): where its identity block starts.
// kInvalidArgument when the proof is malformed.
absl::StatusOr<IncarnationClaim> ReadIncarnationClaim(const std::string& proof,
                                                      size_t* block = nullptr);

// The claim, once `proof`'s certificate chain verified against `verifier`'s CA, its certificate
// names the claim's node and its signature verified. kInvalidArgument (malformed) or
// kUnauthenticated (what did not verify, DatagramSigner::Verify).
absl::StatusOr<IncarnationClaim> VerifyIncarnationProof(DatagramSigner* verifier,
                                                        const std::string& proof);

// A member's signed word that another member's incarnation is lost (gone for good), under mutual
// TLS. Why: an operator's `declare-lost` fences a member everywhere and takes it out of every
// majority, and no refutation undoes it, so no member may do that alone (a compromised one could
// then remove every other from the cluster). A member signs a declaration only when the node is
// dead in its own view (its own timer: relayed deaths are only suspicions under mutual TLS) or on
// its own operator's word; a receiver takes the declaration only when members that are a
// majority of those live in its view signed it (Cluster::TakeLostDeclarations).
//
// Wire format (little-endian):
//   [0, 4)  magic "TSLD"
//   [4]     format version: 1
//   u16 N, N bytes: the lost node id (1..255 bytes)
//   u64:    its incarnation (non-zero)
//   u16 D, D bytes: the declaring node id (1..255 bytes), which the certificate must name
//   then the identity block of datagram_signer.h
// A declaration can be replayed: it only repeats what its member said of that incarnation, and
// a newer incarnation of the lost node is not touched by it.
struct LostDeclaration {
  std::string node_id;
  uint64_t incarnation = 0;
  std::string declarer;
};

// The signed part: the magic, the version and the fields, before the identity block.
// REQUIRES: the fields are within the limits above.
std::string LostDeclarationRecord(const LostDeclaration& declaration);

// `declaration` signed with `signer`'s certificate (which must name declaration.declarer).
// kInvalidArgument when a field is out of the limits above; kInternal when signing fails.
absl::StatusOr<std::string> MakeLostDeclaration(DatagramSigner* signer,
                                                const LostDeclaration& declaration);

// What `signed_declaration` says, once its chain verified against `verifier`'s CA, its
// certificate names the declarer and its signature verified. kInvalidArgument (malformed) or
// kUnauthenticated.
absl::StatusOr<LostDeclaration> VerifyLostDeclaration(DatagramSigner* verifier,
                                                      const std::string& signed_declaration);

// What it says, not checked (to skip the declarations not worth a check); *block: where its
// identity block starts.
absl::StatusOr<LostDeclaration> ReadLostDeclaration(const std::string& signed_declaration,
                                                    size_t* block = nullptr);

// This daemon's proof and the members' proofs it verified: the newest incarnation per node id.
// Thread-safe.
class IncarnationProofs {
 public:
  struct Options {
    // Required: this daemon's signer, which also checks the others' proofs.
    std::shared_ptr<DatagramSigner> signer;
    // Required: this daemon's incarnation and announced address (node_id: the signer's).
    IncarnationClaim self;
    // Checks of proofs not held, per sending member (its node id) and in all. Every check spends
    // its sender's allowance, passed or not: a member can make valid proofs of its own node at
    // will. A sender whose check passed lately is not counted in the total (see
    // verification_throttle.h).
    VerificationThrottle::Options throttle = DefaultThrottle();
    // Node ids held at most (more: the oldest held is dropped and is checked again when needed).
    size_t max_held = 65536;
  };
  // 64 checks at once and then 100 a second per sender; 256 and 500 a second in all.
  static VerificationThrottle::Options DefaultThrottle();

  // Signs this daemon's proof. Errors as MakeIncarnationProof.
  static absl::StatusOr<std::unique_ptr<IncarnationProofs>> Create(Options options);

  // This daemon's proof, signed again when its certificate was read again.
  std::shared_ptr<const std::string> Own();

  // The proof held for node_id at `incarnation` (this daemon's included), and the address it
  // announces; nullopt when none is.
  struct Held {
    std::string address;
    std::shared_ptr<const std::string> proof;
  };
  std::optional<Held> Find(const std::string& node_id, uint64_t incarnation);

  // This daemon's signer (which also checks the members' signatures).
  DatagramSigner* signer() const { return options_.signer.get(); }

  // The claim `proof` makes once verified, relayed or sent by member `sender` (the node its
  // message authenticated as). A proof of a (node, incarnation) held is not checked again (the
  // claim held is returned). Errors: as VerifyIncarnationProof, or kResourceExhausted, unchecked,
  // when `sender` (or all senders) spent the allowance of checks.
  absl::StatusOr<IncarnationClaim> Check(const std::string& proof, const std::string& sender);

  struct Stats {
    uint64_t verified = 0;   // checked, and held from then on
    uint64_t refused = 0;    // malformed, or checked and did not verify
    uint64_t throttled = 0;  // left unchecked: the sender's allowance was spent
    size_t held = 0;         // node ids with a proof held
  };
  Stats stats() const;

 private:
  struct Entry {
    uint64_t incarnation = 0;
    std::string address;
    std::shared_ptr<const std::string> proof;
    uint64_t order = 0;  // when it was taken, to drop the oldest first
  };
  explicit IncarnationProofs(Options options)
      : options_(std::move(options)), throttle_(options_.throttle) {}
  void HoldLocked(const IncarnationClaim& claim, std::shared_ptr<const std::string> proof)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const std::string> own_ ABSL_GUARDED_BY(mu_);
  uint64_t own_generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::unordered_map<std::string, Entry> held_ ABSL_GUARDED_BY(mu_);  // by node id
  uint64_t next_order_ ABSL_GUARDED_BY(mu_) = 0;
  VerificationThrottle throttle_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_INCARNATION_PROOF_H_
