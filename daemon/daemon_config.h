// The configuration of tesserad: one TOML file plus "key=value" overrides, loaded and validated
// once at start. Every key, with its documentation and default, is printed by
// DefaultDaemonConfigToml() (`tesserad --print-default-config`).
#ifndef TESSERA_DAEMON_DAEMON_CONFIG_H_
#define TESSERA_DAEMON_DAEMON_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/membership/verification_throttle.h"
#include "daemon/transfer/cluster_tls.h"

namespace tessera {

// The validated configuration. A default-constructed DaemonConfig holds the defaults; the field
// comments name the TOML keys, whose documentation is in DefaultDaemonConfigToml().
struct DaemonConfig {
  struct Node {
    std::string id;  // node.id; empty: the host name
  };
  struct Store {
    std::string directory = "/dev/shm/tessera";  // store.directory
    int64_t capacity_bytes = 0;  // store.capacity_bytes; 0: half the free space at start
    bool prefault = true;        // store.prefault
    int crc_threads = 4;         // store.crc_threads
    // store.filesystem_check: "refuse" or "warn" a store that is not tmpfs/hugetlbfs, or a
    // capacity larger than its filesystem.
    std::string filesystem_check = "refuse";
    // store.seal_checksum: "client" takes the payload CRC32C the agent computed while copying;
    // "daemon" computes it again at seal and refuses a mismatch.
    std::string seal_checksum = "client";
    // store.state_directory: where each job's state file (epoch, commit, drop) is kept, in the
    // subdirectory named by node.id; empty: beside the segments.
    std::string state_directory;
  };
  struct Agent {
    std::string socket_path = "/run/tessera/agent.sock";  // agent.socket_path
    uint32_t socket_mode = 0660;  // agent.socket_mode (written in octal in the file: "0660")
    int64_t max_connections_per_uid = 256;  // agent.max_connections_per_uid
  };
  struct Daemon {
    int64_t drain_timeout_ms = 30000;  // daemon.drain_timeout_ms
  };
  struct Log {
    std::string level = "info";  // log.level
  };
  struct Peer {
    std::string listen_address;     // peer.listen_address; empty: standalone, no peer service
    std::string advertise_address;  // peer.advertise_address; empty: listen_address
    std::string data_path = "tcp";  // peer.data_path: "tcp" or "grpc"
    int64_t data_port = 0;          // peer.data_port; 0: any free port
  };
  struct Cluster {
    std::vector<std::string> members;  // cluster.members: "host:port" peer addresses
    std::string dns_name;              // cluster.dns_name; empty: no DNS discovery
    int64_t dns_port = 7070;           // cluster.dns_port
    int64_t dns_refresh_ms = 10000;    // cluster.dns_refresh_ms
    // cluster.token, or the contents of cluster.token_file (whitespace trimmed) when that is set.
    // Empty: the admin service refuses every call over TCP.
    std::string token;
    std::string token_file;  // cluster.token_file
    // cluster.insecure: run a cluster without cluster.token (refused otherwise).
    bool insecure = false;
    // Mutual TLS on the peer port (daemon/transfer/cluster_tls.h): all three or none.
    std::string tls_cert_file;  // cluster.tls_cert_file
    std::string tls_key_file;   // cluster.tls_key_file
    std::string tls_ca_file;    // cluster.tls_ca_file
    int64_t tls_refresh_s = 60;  // cluster.tls_refresh_s
    // Threads that seal and open the encrypted data path's records (cipher_pool.h), at most the
    // machine's hardware threads.
    int64_t tls_cipher_threads = 8;  // cluster.tls_cipher_threads
    int64_t tls_cipher_nice = 5;     // cluster.tls_cipher_nice: their nice value
    std::string tls_cipher_library = "auto";  // cluster.tls_cipher_library: auto, openssl, ipsec-mb
    // Budgets of the checks that membership costs under attack (verification_throttle.h), per
    // second: membership datagrams failing authentication, per source address
    // (cluster.datagram_failures_per_source_per_s) and over all addresses not a member's
    // (cluster.datagram_failures_per_s); and checks of incarnation proofs not held, per sending
    // member (cluster.proof_checks_per_member_per_s) and in all (cluster.proof_checks_per_s).
    int64_t datagram_failures_per_source_per_s = 10;
    int64_t datagram_failures_per_s = 100;
    int64_t proof_checks_per_member_per_s = 100;
    int64_t proof_checks_per_s = 500;
    // cluster.drop_fence_ms: how long a member refuses a job's registrations once the job's
    // coordinator has checked it for a drop (at least three coordination timeouts).
    int64_t drop_fence_ms = 10000;
  };
  struct Ec {
    int k = 3;  // ec.k
    int m = 2;  // ec.m
  };
  struct Metrics {
    std::string listen_address;  // metrics.listen_address; empty: no metrics endpoint
  };
  struct Liveness {
    int64_t heartbeat_ms = 1000;  // liveness.heartbeat_ms: the SWIM protocol period
    int64_t timeout_ms = 3000;    // liveness.timeout_ms: the probe window
    int indirect_probes = 3;      // liveness.indirect_probes
    int suspicion_mult = 4;       // liveness.suspicion_mult
    std::string transport = "udp";  // liveness.transport: "udp" or "grpc"
  };

  Node node;
  Store store;
  Agent agent;
  Daemon daemon;
  Log log;
  Peer peer;
  Cluster cluster;
  Ec ec;
  Liveness liveness;
  Metrics metrics;

  // The address peers reach this daemon at: advertise_address, else listen_address.
  std::string PeerAddress() const {
    return peer.advertise_address.empty() ? peer.listen_address : peer.advertise_address;
  }
};

// Loads the TOML file at `path_or_empty` (no file when empty: defaults), then applies each
// "key=value" of `overrides` in order, so an override wins over the file.
// Errors: kInvalidArgument listing every problem (unknown key, wrong type, invalid value,
// malformed override, TOML syntax error), each naming the file and line or the override, the
// key, and what is valid; kNotFound and other errno codes when the file cannot be read.
absl::StatusOr<DaemonConfig> LoadDaemonConfig(const std::string& path_or_empty,
                                              const std::vector<std::string>& overrides);

// Every key as a commented TOML file set to its default; loading it yields DaemonConfig{}.
std::string DefaultDaemonConfigToml();

// node.id as configured, or, when empty, the host name (characters other than A-Z a-z 0-9 . _ -
// replaced by '_').
absl::StatusOr<std::string> ResolveNodeId(const std::string& configured);

// The peer port's TLS files of `cluster` (off when its cluster.tls_* are empty).
ClusterTlsFiles ClusterTls(const DaemonConfig::Cluster& cluster);

// The budgets the daemon gives its verification throttles (verification_throttle.h): of
// membership datagrams failing authentication, per source (cluster.datagram_failures_per_source_
// per_s) and over sources not a member's (cluster.datagram_failures_per_s); and of incarnation
// proof checks, per member (cluster.proof_checks_per_member_per_s) and in all
// (cluster.proof_checks_per_s): `base` with those rates, its bursts and the rest as they are
// (for proofs, base is IncarnationProofs::DefaultThrottle()).
VerificationThrottle::Options DatagramThrottleOptions(const DaemonConfig::Cluster& cluster,
                                                      VerificationThrottle::Options base = {});
VerificationThrottle::Options ProofThrottleOptions(const DaemonConfig::Cluster& cluster,
                                                   VerificationThrottle::Options base);

}  // namespace tessera

#endif  // TESSERA_DAEMON_DAEMON_CONFIG_H_
