// What mutual TLS costs membership per message, next to what the heartbeat loop asks of a daemon.
//
// On one thread, with the P-256 certificates the unit tests make (TestCa, as
// tools/make-cluster-certs.sh makes them): signing a heartbeat datagram (UdpHeartbeats::Encode,
// HMAC included), checking one (UdpHeartbeats::Decode: HMAC, cached chain, signature), checking
// an incarnation proof (VerifyIncarnationProof), and receiving a heartbeat carrying N proofs
// (N = 1, 4, 16: its sender's own and those of the members its updates name), whose proofs are
// either already held (IncarnationProofs::Check finds them: the steady state) or all new (each
// verified: after members restarted). Each in microseconds per message and messages a second on
// one core, the best of --repeats runs of --iterations messages.
//
// The limit, from the same run's rates: under SWIM (cluster.h) each daemon, every
// liveness.heartbeat_ms (1000 by default; Cluster::Options' own default is 500), probes one member
// and answers on average one probe: two datagrams signed and two checked, whatever the cluster's
// size. So for 64 and 1024 members it prints the messages a second the loop must handle and the
// fraction of a core they take, the core time to verify every member's proof once (a cluster
// started or restarted at once), and what the budgets of checks that fail
// (cluster.datagram_failures_per_source_per_s, cluster.datagram_failures_per_s) let a flood of
// forged datagrams cost at most, every member's address forged.
//
// Usage: membership_proof_bench [--iterations=N] [--repeats=R] [--heartbeat_ms=MS]
//        (defaults 2000, 5, 1000)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "daemon/membership/datagram_signer.h"
#include "daemon/membership/incarnation_proof.h"
#include "daemon/membership/udp_heartbeats.h"
#include "daemon/membership/verification_throttle.h"
#include "daemon/transfer/test_certificates.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

constexpr char kToken[] = "bench-cluster-token-0123456789ab";
constexpr uint64_t kIncarnation = 1'700'000'000'000;

struct Options {
  int iterations = 2000;
  int repeats = 5;
  int64_t heartbeat_ms = 1000;
};

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "membership_proof_bench: %s\n", what.c_str());
  std::exit(1);
}

template <typename T>
T Check(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) Die(absl::StrCat(what, ": ", v.status().ToString()));
  return *std::move(v);
}

// Microseconds per call of `body`: the best of `repeats` runs of `iterations` calls, after one
// untimed run.
double BestMicros(const Options& o, const std::function<void()>& body) {
  for (int i = 0; i < o.iterations / 10 + 1; ++i) body();
  double best = 1e30;
  for (int r = 0; r < o.repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < o.iterations; ++i) body();
    const std::chrono::duration<double, std::micro> elapsed =
        std::chrono::steady_clock::now() - start;
    best = std::min(best, elapsed.count() / o.iterations);
  }
  return best;
}

// A heartbeat from n1 with `proofs` proofs: its own, then those of members n2.. its updates name.
std::string HeartbeatBody(const std::vector<std::string>& all_proofs, size_t proofs) {
  peer::HeartbeatRequest request;
  request.set_node_id("n1");
  request.set_incarnation(kIncarnation + 1);
  request.set_address("10.0.0.1:7070");
  request.set_seq(12345);
  request.set_known_members(1024);
  for (size_t i = 1; i < proofs; ++i) {
    auto* u = request.add_updates();
    u->mutable_member()->set_node_id(absl::StrCat("n", i + 1));
    u->mutable_member()->set_incarnation(kIncarnation + i + 1);
    u->mutable_member()->set_address(absl::StrCat("10.0.", i / 256, ".", i % 256, ":7070"));
    u->set_version(3);
  }
  for (size_t i = 0; i < proofs; ++i) request.add_incarnation_proofs(all_proofs[i]);
  return request.SerializeAsString();
}

int Run(const Options& o) {
  auto ca = Check(TestCa::Create(), "making a test CA");
  constexpr size_t kNodes = 17;  // n0 receives; n1 sends; n1..n16 have proofs
  std::vector<std::shared_ptr<DatagramSigner>> signers;
  for (size_t i = 0; i < kNodes; ++i) {
    ClusterTlsFiles files = Check(ca->IssueNode(absl::StrCat("n", i)), "issuing a certificate");
    signers.push_back(Check(DatagramSigner::Create(files), "a signer"));
  }
  std::vector<std::string> proofs = {""};  // by node index; n0's unused
  for (size_t i = 1; i < kNodes; ++i) {
    const IncarnationClaim claim{absl::StrCat("n", i), kIncarnation + i,
                                 absl::StrCat("10.0.0.", i, ":7070")};
    proofs.push_back(Check(MakeIncarnationProof(signers[i].get(), claim), "a proof"));
  }
  proofs.erase(proofs.begin());  // proofs[j]: node n(j+1)
  DatagramSigner* const sender = signers[1].get();
  DatagramSigner* const receiver = signers[0].get();

  const std::string body1 = HeartbeatBody(proofs, 1);
  const std::string datagram1 =
      Check(UdpHeartbeats::Encode(1, 7, body1, kToken, sender, 7), "encode");
  std::printf(
      "membership under mutual TLS, one thread; P-256 certificates (TestCa); "
      "heartbeat with 1 proof: %zu bytes, a proof %zu bytes\n\n",
      datagram1.size(), proofs[0].size());
  std::printf("%-44s %10s %12s\n", "per message", "us", "msgs/s/core");
  std::printf("------------------------------------------------------------------------\n");
  auto row = [](const std::string& what, double us) {
    std::printf("%-44s %10.1f %12.0f\n", what.c_str(), us, 1e6 / us);
    return us;
  };

  auto hmac_only = [&] {
    auto d = UdpHeartbeats::Encode(1, 7, body1, kToken);
    auto back =
        UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(d->data()), d->size(), kToken);
    if (!back.ok()) Die("HMAC decode");
  };
  auto sign = [&] {
    if (!UdpHeartbeats::Encode(1, 7, body1, kToken, sender, 7).ok()) Die("encode");
  };
  auto check = [&] {
    auto d = UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(datagram1.data()),
                                   datagram1.size(), kToken, receiver);
    if (!d.ok()) Die("decode: " + d.status().ToString());
  };
  auto verify_proof = [&] {
    if (!VerifyIncarnationProof(receiver, proofs[0]).ok()) Die("verify proof");
  };
  const double hmac_only_us =
      row("HMAC only (token, no TLS): encode + decode", BestMicros(o, hmac_only));
  const double sign_us = row("sign a heartbeat datagram (Encode)", BestMicros(o, sign));
  const double verify_us = row("check a datagram's signature (Decode)", BestMicros(o, check));
  const double proof_us = row("verify an incarnation proof", BestMicros(o, verify_proof));

  // The receiver's book of proofs, holding n1..n16's: the steady state.
  IncarnationProofs::Options book_options;
  book_options.signer = signers[0];
  book_options.self = IncarnationClaim{"n0", kIncarnation, "10.0.0.0:7070"};
  book_options.throttle.source_burst = book_options.throttle.total_burst = 1 << 30;
  auto book = Check(IncarnationProofs::Create(book_options), "the receiver's proofs");
  for (const std::string& p : proofs) Check(book->Check(p, "n1"), "holding a proof");

  struct HeartbeatCost {
    size_t proofs;
    double held_us, new_us;
  };
  std::vector<HeartbeatCost> heartbeats;
  for (size_t n : {1, 4, 16}) {
    const std::string body = HeartbeatBody(proofs, n);
    const std::string datagram = Check(UdpHeartbeats::Encode(1, 7, body, kToken, sender, 7), "enc");
    auto receive = [&](bool held) {
      auto d = UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(datagram.data()),
                                     datagram.size(), kToken, receiver);
      if (!d.ok()) Die("decode");
      peer::HeartbeatRequest request;
      if (!request.ParseFromString(d->body)) Die("parse");
      for (const std::string& p : request.incarnation_proofs()) {
        // A proof not held is checked as IncarnationProofs::Check does, by VerifyIncarnationProof
        // (the book would hold it after the first time).
        if (!(held ? book->Check(p, "n1").ok() : VerifyIncarnationProof(receiver, p).ok())) {
          Die("proof");
        }
      }
    };
    HeartbeatCost c{n, 0, 0};
    c.held_us = row(absl::StrCat("receive a heartbeat + ", n, " proofs held"),
                    BestMicros(o, [&] { receive(true); }));
    c.new_us = row(absl::StrCat("receive a heartbeat + ", n, " proofs, all new"),
                   BestMicros(o, [&] { receive(false); }));
    heartbeats.push_back(c);
  }

  // The limits.
  const VerificationThrottle::Options datagram_budget;  // the defaults of cluster.datagram_*
  const double failures_per_source =
      absl::FDivDuration(absl::Seconds(1), datagram_budget.source_interval);
  const double failures_total =
      absl::FDivDuration(absl::Seconds(1), datagram_budget.total_interval);
  std::printf(
      "\nwhat the heartbeat loop asks of one daemon (SWIM: each period it probes one member "
      "and answers one probe on average, whatever the size: 2 datagrams signed, 2 checked)"
      "\n");
  std::printf("%-8s %-6s %-40s %12s %12s %10s\n", "members", "hb ms", "load", "msgs/s", "core us/s",
              "of a core");
  std::printf(
      "-----------------------------------------------------------------------------------"
      "------------\n");
  std::vector<int64_t> periods = {o.heartbeat_ms};
  if (o.heartbeat_ms != 500) periods.push_back(500);
  for (int64_t period_ms : periods) {
    for (int members : {64, 1024}) {
      const double periods_per_s = 1000.0 / period_ms;
      auto line = [&](const std::string& load, double msgs_per_s, double us_per_s) {
        std::printf("%-8d %-6lld %-40s %12.1f %12.0f %9.3f%%\n", members,
                    static_cast<long long>(period_ms), load.c_str(), msgs_per_s, us_per_s,
                    us_per_s / 1e4);
      };
      const HeartbeatCost& h1 = heartbeats[0];
      const HeartbeatCost& h16 = heartbeats[2];
      line("steady: 1 proof each, held", 4 * periods_per_s,
           periods_per_s * 2 * (sign_us + h1.held_us));
      line("busy gossip: 16 proofs each, held", 4 * periods_per_s,
           periods_per_s * 2 * (sign_us + h16.held_us));
      line("16 new proofs in every message received", 4 * periods_per_s,
           periods_per_s * 2 * (sign_us + h16.new_us));
      // Not per second: the core time to verify every other member's proof once.
      std::printf("%-8d %-6lld %-40s %12d %12.0f %10s\n", members,
                  static_cast<long long>(period_ms), "all restart: verify each proof once",
                  members - 1, (members - 1) * proof_us, "(us once)");
      // A flood of datagrams failing the signature check, from every member's address (each
      // within its own budget) and from made-up addresses (within the total).
      const double flood = failures_per_source * (members - 1) + failures_total;
      line("flood: budgets of failed checks", flood, flood * verify_us);
    }
  }
  std::printf(
      "\nHMAC alone (no TLS) costs %.1f us for encode and decode together: signatures "
      "cost %.0fx that.\n",
      hmac_only_us, (sign_us + verify_us) / hmac_only_us);
  std::printf(
      "flood: %.0f failed checks/s per member's address and %.0f/s from all other "
      "addresses (cluster.datagram_failures_per_source_per_s, "
      "cluster.datagram_failures_per_s), each costing a signature check at most.\n",
      failures_per_source, failures_total);
  return 0;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::Options o;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (std::strncmp(a, "--iterations=", 13) == 0) {
      o.iterations = std::max(1, std::atoi(a + 13));
    } else if (std::strncmp(a, "--repeats=", 10) == 0) {
      o.repeats = std::max(1, std::atoi(a + 10));
    } else if (std::strncmp(a, "--heartbeat_ms=", 15) == 0) {
      o.heartbeat_ms = std::max(1, std::atoi(a + 15));
    } else {
      std::fprintf(stderr, "usage: %s [--iterations=N] [--repeats=R] [--heartbeat_ms=MS]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!tessera::SetLogLevel("warn").ok()) return 1;
  return tessera::Run(o);
}
