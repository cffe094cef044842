// VerificationThrottle: bounds the CPU that membership datagrams failing authentication can take.
// Checking a datagram (its token's HMAC; under mutual TLS its certificate chain and signature,
// datagram_signer.h) costs as much when it fails as when it passes, tens to hundreds of
// microseconds, so a flood of forged datagrams would otherwise cost a core. Failures are
// budgeted, per source (an IP address: the port is free to choose) and over all sources:
//
//   - a source may fail `source_burst` checks at once, then one per `source_interval` (a token
//     bucket); while its allowance is spent, its datagrams are dropped unchecked;
//   - sources not heard from lately (no check passed within `known_for`: not a member) may fail
//     `total_burst` checks together, then one per `total_interval`; while that allowance is
//     spent, only the members' sources are checked (each still within its own allowance).
//
// So over T, N forged datagrams cost at most source_burst + T / source_interval checks from one
// source, and at most total_burst + T / total_interval from any number of made-up sources (UDP
// sources are easy to forge), plus each member's own allowance when its address is forged. A
// datagram that passes spends nothing: members' datagrams go through a flood from elsewhere. The
// price: while a flood forges a member's address, that member's datagrams are dropped with it
// (it is probed through others, and suspected if the flood goes on); the flood shows in
// tessera_membership_datagrams_dropped_total{reason="throttled"} and in the log.
//
// Memory is bounded: at most max_sources failing sources (the least recently failed forgotten
// first; a new failing source is admitted only within the total allowance, so members' entries
// are not pushed out faster than that) and max_sources members.
//
// Thread-compatible: UdpHeartbeats calls it from its receiver thread only.
#ifndef TESSERA_DAEMON_MEMBERSHIP_VERIFICATION_THROTTLE_H_
#define TESSERA_DAEMON_MEMBERSHIP_VERIFICATION_THROTTLE_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <string>

#include "absl/time/time.h"

namespace tessera {

class VerificationThrottle {
 public:
  struct Options {
    int source_burst = 16;
    absl::Duration source_interval = absl::Milliseconds(100);  // 10 failures/s per source
    int total_burst = 64;
    absl::Duration total_interval = absl::Milliseconds(10);  // 100/s over unknown sources
    absl::Duration known_for = absl::Seconds(60);
    size_t max_sources = 4096;
  };

  VerificationThrottle() : VerificationThrottle(Options()) {}
  explicit VerificationThrottle(Options options);

  // Whether a datagram from `source` may be checked at `now`. false: drop it unchecked.
  bool Admit(const std::string& source, absl::Time now);
  // The check of a datagram from `source` (admitted at `now`) failed: spends its allowance.
  void Failed(const std::string& source, absl::Time now);
  // It passed: `source` is a member's for known_for.
  void Passed(const std::string& source, absl::Time now);

 private:
  struct Bucket {
    double tokens = 0;
    absl::Time at;
  };
  struct Failing {
    Bucket bucket;
    std::list<std::string>::iterator lru;  // into failing_lru_
  };
  static void Refill(Bucket* bucket, int burst, absl::Duration interval, absl::Time now);
  bool Known(const std::string& source, absl::Time now) const;

  const Options options_;
  Bucket total_;
  std::map<std::string, Failing> failing_;
  std::list<std::string> failing_lru_;       // most recently failed first
  std::map<std::string, absl::Time> known_;  // source -> when a check last passed
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_VERIFICATION_THROTTLE_H_
