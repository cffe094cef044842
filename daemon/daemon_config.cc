#include "daemon/daemon_config.h"

#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "common/status.h"
#include "daemon/transfer/node_identity.h"

namespace tessera {
namespace {

constexpr size_t kMaxNodeIdLength = 64;
constexpr size_t kMinTokenLength = 16;
constexpr size_t kMaxTokenLength = 1024;
// A socket path must fit sockaddr_un::sun_path with its terminating NUL.
constexpr size_t kMaxSocketPathLength = sizeof(sockaddr_un{}.sun_path) - 1;

absl::Status CheckNodeId(const std::string& id) {
  bool valid = id.size() <= kMaxNodeIdLength && id != "." && id != "..";
  for (char c : id) {
    valid = valid && ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-');
  }
  if (valid) return absl::OkStatus();
  // The id names a directory under store.directory, hence no '/' and no "." or "..".
  return absl::InvalidArgumentError(absl::StrCat(
      "must be empty (the host name) or 1 to ", kMaxNodeIdLength,
      " characters from A-Z a-z 0-9 . _ - other than \".\" and \"..\"; got \"", id, "\""));
}

absl::Status CheckAbsolutePath(const std::string& path) {
  if (!path.empty() && path[0] == '/') return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("must be an absolute path; got \"", path, "\""));
}

absl::Status CheckSocketPath(const std::string& path) {
  TESSERA_RETURN_IF_ERROR(CheckAbsolutePath(path));
  if (path.size() <= kMaxSocketPathLength) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("must be at most ", kMaxSocketPathLength,
                                                 " bytes long (the limit of a Unix socket "
                                                 "address); got ",
                                                 path.size(), " bytes"));
}

absl::Status CheckOctalMode(const std::string& mode) {
  bool valid = mode.size() == 3 || mode.size() == 4;
  for (char c : mode) valid = valid && c >= '0' && c <= '7';
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("must be 3 or 4 octal digits such as \"0660\"; got \"", mode, "\""));
}

// "host:port" with a non-empty host and a port 1..65535 ("[::1]:7070" for IPv6).
absl::Status CheckHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  bool valid = colon != std::string::npos && colon > 0 && colon + 1 < address.size() &&
               address.size() - colon - 1 <= 5;
  if (valid) {
    int port = 0;
    for (size_t i = colon + 1; i < address.size(); ++i) {
      valid = valid && address[i] >= '0' && address[i] <= '9';
      if (valid) port = port * 10 + (address[i] - '0');
    }
    valid = valid && port >= 1 && port <= 65535;
  }
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("must be \"host:port\" with a port 1 to 65535; got \"", address, "\""));
}

absl::Status CheckOptionalHostPort(const std::string& address) {
  return address.empty() ? absl::OkStatus() : CheckHostPort(address);
}

ConfigValidator HostPortList() {
  return ConfigValidator{"a list of \"host:port\" strings", [](const ConfigValue& value) {
                           for (const std::string& a : std::get<std::vector<std::string>>(value)) {
                             TESSERA_RETURN_IF_ERROR(CheckHostPort(a));
                           }
                           return absl::OkStatus();
                         }};
}

// Printable ASCII without spaces, as gRPC metadata values allow and a file or a flag keeps intact.
absl::Status CheckToken(const std::string& token) {
  if (token.empty()) return absl::OkStatus();
  bool valid = token.size() >= kMinTokenLength && token.size() <= kMaxTokenLength;
  for (char c : token) valid = valid && c > ' ' && c <= '~';
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "must be empty (admin over TCP off) or ", kMinTokenLength, " to ", kMaxTokenLength,
      " printable ASCII characters without spaces; got ", token.size(),
      " characters", token.size() >= kMinTokenLength ? " including a space or control byte" : ""));
}

absl::Status CheckOptionalAbsolutePath(const std::string& path) {
  return path.empty() ? absl::OkStatus() : CheckAbsolutePath(path);
}

// The token in `path`: its contents with surrounding whitespace removed.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    return ErrnoStatus(errno, absl::StrCat("cluster.token_file: cannot read ", path));
  }
  std::string contents;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0 &&
         contents.size() <= kMaxTokenLength + 4096) {
    contents.append(buffer, n);
  }
  std::fclose(file);
  std::string token(absl::StripAsciiWhitespace(contents));
  absl::Status valid = CheckToken(token);
  if (token.empty()) valid = absl::InvalidArgumentError("is empty");
  if (!valid.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster.token_file: the token in ", path, " ", valid.message()));
  }
  return token;
}

std::string FormatOctalMode(uint32_t mode) {
  char buffer[16];
  std::snprintf(buffer, sizeof(buffer), "%04o", mode);
  return buffer;
}

ConfigSchema BuildSchema() {
  const DaemonConfig defaults;
  absl::StatusOr<ConfigSchema> schema = ConfigSchema::Create({
      ConfigKey::String(
          "node.id", defaults.node.id,
          "Name of this node in the cluster, unique among its members and stable across "
          "restarts: peers, fragment placement and status refer to the node by it, and its "
          "segments live in <store.directory>/<node.id>. Empty means the host name.",
          StringValidator(absl::StrCat("empty, or 1 to ", kMaxNodeIdLength,
                                       " characters from A-Z a-z 0-9 . _ -"),
                          CheckNodeId)),
      ConfigKey::String(
          "store.directory", defaults.store.directory,
          "Directory that holds this daemon's shared-memory segments, in the subdirectory "
          "named by node.id: a tmpfs such as /dev/shm, or a hugetlbfs mount. On start the "
          "daemon re-adopts the sealed segments it finds there and deletes everything else "
          "in its subdirectory, so give each daemon its own.",
          StringValidator("an absolute path", CheckAbsolutePath)),
      ConfigKey::ByteSize(
          "store.capacity_bytes", defaults.store.capacity_bytes,
          "Shared memory this daemon may use for its snapshot slots and for the fragments it "
          "holds for peers. 0 means half of the space free on the filesystem of "
          "store.directory when the daemon starts. A registration that does not fit is "
          "refused, with the sizes asked and free in the error."),
      ConfigKey::String(
          "store.filesystem_check", defaults.store.filesystem_check,
          "What to do at start when store.directory is not on a tmpfs or hugetlbfs (segments "
          "would be written back to disk, at disk speed) or store.capacity_bytes exceeds the "
          "size of its filesystem (a snapshot could then die of SIGBUS when the filesystem "
          "fills): \"refuse\" to start, saying which, or \"warn\" and start anyway.",
          OneOf({"refuse", "warn"})),
      ConfigKey::Bool(
          "store.prefault", defaults.store.prefault,
          "Touch every page of a segment when it is created, so that the first-touch cost "
          "(about 1.5 GB/s on tmpfs) and any SIGBUS from an exhausted filesystem come at "
          "registration, never on the snapshot path."),
      ConfigKey::Int64("store.crc_threads", defaults.store.crc_threads,
                       "Threads that compute a payload's CRC32C where the daemon reads it whole: "
                       "at seal with store.seal_checksum = \"daemon\" (or for an agent that "
                       "sends none), and when a restore asks the daemon to check it.",
                       InRange(1, 64)),
      ConfigKey::String(
          "store.seal_checksum", defaults.store.seal_checksum,
          "Where a snapshot's payload CRC32C comes from at seal. \"client\": the one the agent "
          "library computed as the bytes landed in shared memory, so the seal ends within a "
          "block of the copy's end. \"daemon\": the daemon reads the whole payload again, "
          "and refuses to seal one whose bytes are not what the agent checksummed (a second "
          "pass at memory speed, for auditing). Either way, bytes changed after they were "
          "checksummed fail the check on restore.",
          OneOf({"client", "daemon"})),
      ConfigKey::String(
          "store.state_directory", defaults.store.state_directory,
          "Directory for the small file this daemon keeps per job (the job's epoch, newest "
          "commit and drop), in the subdirectory named by node.id, created if missing. Empty "
          "means beside the segments: kept across a daemon's restart, lost with the node's "
          "memory at a reboot. On a disk (e.g. /var/lib/tessera) the files outlive a reboot, so "
          "a job dropped while one member was away stays dropped even if every member that "
          "took the drop reboots before it returns; each commit the daemon learns then costs "
          "one fdatasync on that disk. Give each daemon its own.",
          StringValidator("empty, or an absolute path", CheckOptionalAbsolutePath)),
      ConfigKey::String(
          "agent.socket_path", defaults.agent.socket_path,
          "Unix socket on which trainers on this node (the agent library) reach the daemon.",
          StringValidator(
              absl::StrCat("an absolute path of at most ", kMaxSocketPathLength, " bytes"),
              CheckSocketPath)),
      ConfigKey::String(
          "agent.socket_mode", FormatOctalMode(defaults.agent.socket_mode),
          "Permission bits of the agent socket, in octal. With the default, processes of the "
          "daemon's user and group may connect: run trainers in that group.",
          StringValidator("3 or 4 octal digits", CheckOctalMode)),
      ConfigKey::Int64(
          "agent.max_connections_per_uid", defaults.agent.max_connections_per_uid,
          "Open connections to the agent socket one uid may hold; more are closed at once "
          "(logged, counted in tessera_agent_connections_over_uid_cap_total), so that one "
          "user's idle connections cannot take every file descriptor of the daemon from the "
          "others. A trainer holds one; keep it well below the daemon's RLIMIT_NOFILE.",
          InRange(1, 1 << 20)),
      ConfigKey::Int64(
          "daemon.drain_timeout_ms", defaults.daemon.drain_timeout_ms,
          "On SIGTERM the daemon stops accepting new snapshots and waits up to this long for "
          "the seals in flight to finish before it exits. Keep it below the stop timeout of "
          "the service manager (systemd TimeoutStopSec, Kubernetes "
          "terminationGracePeriodSeconds).",
          InRange(0, 3600 * 1000)),
      // The levels tessera::SetLogLevel accepts (common/logging.h).
      ConfigKey::String("log.level", defaults.log.level,
                        "Least severe level of the log messages written to stderr.",
                        OneOf({"trace", "debug", "info", "warn", "error", "critical", "off"})),
      ConfigKey::String(
          "peer.listen_address", defaults.peer.listen_address,
          "host:port on which the peer service (daemon to daemon: heartbeats, fragments, "
          "shards) listens, e.g. \"0.0.0.0:7070\". Empty means standalone: no peer service, "
          "no cross-node protection, and a step is committed once every rank held here sealed "
          "it.",
          StringValidator("empty, or \"host:port\"", CheckOptionalHostPort)),
      ConfigKey::String("peer.advertise_address", defaults.peer.advertise_address,
                        "host:port at which other daemons reach this one, when it differs from "
                        "peer.listen_address (a wildcard listen address, NAT). Empty means "
                        "peer.listen_address.",
                        StringValidator("empty, or \"host:port\"", CheckOptionalHostPort)),
      ConfigKey::String(
          "peer.data_path", defaults.peer.data_path,
          "How fragments move between daemons: \"tcp\", a raw TCP connection per transfer "
          "range into and out of shared memory, negotiated through the peer service (gRPC) "
          "and keyed per daemon run; or \"grpc\", streams on the peer service itself. A "
          "daemon uses tcp with every peer that offers it, and grpc with the others.",
          OneOf({"tcp", "grpc"})),
      ConfigKey::Int64(
          "peer.data_port", defaults.peer.data_port,
          "TCP port of the raw data path (peer.data_path = \"tcp\"), on the host of "
          "peer.listen_address; peers learn it from the peer service. 0 picks a free port; "
          "set one where a firewall or a container's port list must name it.",
          InRange(0, 65535)),
      ConfigKey::StringList(
          "cluster.members", defaults.cluster.members,
          "Peer addresses (\"host:port\") of the daemons of the cluster. The daemon's own "
          "address may be listed: it is ignored. Used with peer.listen_address.",
          HostPortList()),
      ConfigKey::String(
          "cluster.dns_name", defaults.cluster.dns_name,
          "A DNS name whose address records are the cluster's daemons (a Kubernetes headless "
          "service), re-resolved every cluster.dns_refresh_ms and added to cluster.members. "
          "Empty means no DNS discovery."),
      ConfigKey::Int64("cluster.dns_port", defaults.cluster.dns_port,
                       "Peer port of the daemons found through cluster.dns_name.",
                       InRange(1, 65535)),
      ConfigKey::Int64("cluster.dns_refresh_ms", defaults.cluster.dns_refresh_ms,
                       "How often cluster.dns_name is re-resolved.", InRange(100, 3600 * 1000)),
      ConfigKey::String(
          "cluster.token", defaults.cluster.token,
          "Shared secret of the cluster. The admin service (the tessera CLI) answers over the "
          "TCP peer port only to calls that carry it, and daemons use it to ask each other "
          "for cluster-wide status, verification and drills. When set, every daemon-to-daemon "
          "call (heartbeats, fragments, the data path's session key) needs it too, so every "
          "daemon of a cluster must have the same one. Empty, with cluster.token_file "
          "empty too, turns admin over TCP off: the CLI then works through the agent socket "
          "only, and cluster-wide answers name the members they could not ask.",
          StringValidator(absl::StrCat("empty, or ", kMinTokenLength, " to ", kMaxTokenLength,
                                       " printable ASCII characters without spaces"),
                          CheckToken)),
      ConfigKey::String(
          "cluster.token_file", defaults.cluster.token_file,
          "A file holding cluster.token (surrounding whitespace ignored), read at start; keeps "
          "the secret out of the config file and the command line. Set at most one of the two.",
          StringValidator("empty, or an absolute path", CheckOptionalAbsolutePath)),
      ConfigKey::Bool(
          "cluster.insecure", defaults.cluster.insecure,
          "Run a cluster (peer.listen_address set) without cluster.token. Refused by default: "
          "without a token any process that reaches the peer port can read and write every "
          "job's training state, forge fragments and join as a member. Only for a private test "
          "network; the daemon then logs it at every start and status warns of it."),
      ConfigKey::String(
          "cluster.tls_cert_file", defaults.cluster.tls_cert_file,
          "Mutual TLS on the peer port: this daemon's certificate (PEM, with its chain), issued "
          "by the CA of cluster.tls_ca_file. With it every daemon-to-daemon gRPC call is "
          "encrypted and both sides must present a certificate of that CA; the cluster token is "
          "still checked. Set the three cluster.tls_* files together, or none.",
          StringValidator("empty, or an absolute path", CheckOptionalAbsolutePath)),
      ConfigKey::String("cluster.tls_key_file", defaults.cluster.tls_key_file,
                        "The private key (PEM, unencrypted) of cluster.tls_cert_file.",
                        StringValidator("empty, or an absolute path", CheckOptionalAbsolutePath)),
      ConfigKey::String(
          "cluster.tls_ca_file", defaults.cluster.tls_ca_file,
          "The CA certificates (PEM) that issue the cluster's daemon certificates; a peer "
          "presenting any other certificate, or none, is refused in the TLS handshake.",
          StringValidator("empty, or an absolute path", CheckOptionalAbsolutePath)),
      ConfigKey::Int64(
          "cluster.tls_refresh_s", defaults.cluster.tls_refresh_s,
          "How often the three cluster.tls_* files are read again, so that certificates "
          "rotated in place (a mounted Kubernetes secret updated) take effect without a restart.",
          InRange(1, 86400)),
      ConfigKey::Int64(
          "cluster.tls_cipher_threads", defaults.cluster.tls_cipher_threads,
          "Threads that encrypt and decrypt the raw data path's records under mutual TLS, shared "
          "by all its connections (at most the machine's hardware threads are started): about "
          "3 GB/s of fragments per thread and direction with OpenSSL, 7-10 with ipsec-mb "
          "(cluster.tls_cipher_library), so that one connection is not held to what one core "
          "encrypts. 1 keeps each connection's cipher on its own thread.",
          InRange(1, 64)),
      ConfigKey::Int64(
          "cluster.tls_cipher_nice", defaults.cluster.tls_cipher_nice,
          "The nice value of those threads (0 to 19): above 0 they yield to the node's trainers "
          "and to the daemon's connections, whose threads copy the bytes they encrypt through "
          "the kernel. 0 gives the cipher the same share of the cores as everything else.",
          InRange(0, 19)),
      ConfigKey::String(
          "cluster.tls_cipher_library", defaults.cluster.tls_cipher_library,
          "Which library encrypts the raw data path's records (AES-256-GCM; the records are the "
          "same bytes either way, so members may differ): \"ipsec-mb\", Intel's, about twice "
          "as fast as OpenSSL 3.0 on CPUs with VAES (Ice Lake and later, Zen 4); \"openssl\" "
          "(for a FIPS-validated provider, say); or \"auto\", ipsec-mb where it is built in and "
          "the CPU has VAES, else OpenSSL. A daemon asked for a library that does not run on its "
          "machine does not start.",
          OneOf({"auto", "openssl", "ipsec-mb"})),
      ConfigKey::Int64(
          "cluster.datagram_failures_per_source_per_s",
          defaults.cluster.datagram_failures_per_source_per_s,
          "Membership datagrams failing authentication (the token's HMAC; with mutual TLS the "
          "certificate or signature) that are checked per second from one source address, "
          "after 16 at once; past it that address's datagrams are dropped unchecked "
          "(tessera_membership_datagrams_dropped_total{reason=\"throttled\"}). A member's "
          "own datagrams pass and spend nothing. Bounds the CPU a flood from one address costs "
          "(bench:membership_proof_bench measures a check).",
          InRange(1, 100000)),
      ConfigKey::Int64(
          "cluster.datagram_failures_per_s", defaults.cluster.datagram_failures_per_s,
          "Membership datagrams failing authentication that are checked per second over all "
          "source addresses that are not a member's (none of their datagrams passed in the last "
          "minute), after 64 at once; past it only members' addresses are checked. Bounds the "
          "CPU a flood from forged addresses costs.",
          InRange(1, 1000000)),
      ConfigKey::Int64(
          "cluster.proof_checks_per_member_per_s", defaults.cluster.proof_checks_per_member_per_s,
          "With mutual TLS: checks per second (after 64 at once) of the incarnation proofs one "
          "member relays that are not held here yet (each member's incarnation is checked "
          "once); past it the updates needing them are dropped unchecked "
          "(tessera_membership_updates_dropped_total{reason=\"unchecked\"}) and heard again "
          "later. Every check counts, passed or not.",
          InRange(1, 100000)),
      ConfigKey::Int64(
          "cluster.proof_checks_per_s", defaults.cluster.proof_checks_per_s,
          "With mutual TLS: checks per second (after 256 at once) of incarnation proofs relayed "
          "by members none of whose proofs verified in the last minute. A cluster that restarts "
          "many members at once checks one proof per restarted member per receiver.",
          InRange(1, 1000000)),
      ConfigKey::Int64(
          "cluster.drop_fence_ms", defaults.cluster.drop_fence_ms,
          "Once a job's coordinator has checked this member for the job's drop, how long the "
          "member refuses registrations of the job (UNAVAILABLE: register again once the drop "
          "has finished) unless the drop reaches it first; at least three coordination "
          "timeouts (liveness.timeout_ms). Bounds how long a coordinator that died mid-drop, or "
          "a drop refused after its check, keeps the job from registering.",
          InRange(1000, 3600000)),
      ConfigKey::String(
          "metrics.listen_address", defaults.metrics.listen_address,
          "host:port on which Prometheus metrics are served over HTTP at /metrics, e.g. "
          "\"0.0.0.0:9464\". Empty means no metrics endpoint.",
          StringValidator("empty, or \"host:port\"", CheckOptionalHostPort)),
      ConfigKey::Int64(
          "ec.k", defaults.ec.k,
          "Data fragments per shard for cross-node protection (Reed-Solomon). With fewer than "
          "ec.k + ec.m + 1 live nodes, k shrinks (logged).",
          InRange(1, 64)),
      ConfigKey::Int64("ec.m", defaults.ec.m,
                       "Parity fragments per shard: a shard survives the loss of its owner and "
                       "any ec.m of the nodes holding its fragments.",
                       InRange(0, 32)),
      ConfigKey::Int64(
          "liveness.heartbeat_ms", defaults.liveness.heartbeat_ms,
          "The membership protocol period (SWIM): every period the daemon probes one other "
          "member, in turn, so its heartbeat cost does not grow with the cluster.",
          InRange(10, 60 * 1000)),
      ConfigKey::Int64(
          "liveness.timeout_ms", defaults.liveness.timeout_ms,
          "The probe window. A member that answers neither a probe within half of it nor the "
          "members asked to probe it (liveness.indirect_probes) within all of it is "
          "suspected: its fragments count as erasures and it receives no new fragments until "
          "it refutes. Must exceed liveness.heartbeat_ms.",
          InRange(20, 3600 * 1000)),
      ConfigKey::Int64(
          "liveness.indirect_probes", defaults.liveness.indirect_probes,
          "How many other members are asked to probe a member that did not answer a probe, "
          "before it is suspected (so one lossy link does not make a suspect). 0 suspects on "
          "the direct probe alone.",
          InRange(0, 16)),
      ConfigKey::Int64(
          "liveness.suspicion_mult", defaults.liveness.suspicion_mult,
          "A suspected member that does not refute within liveness.suspicion_mult x "
          "ceil(log2(N + 1)) protocol periods (N: members not dead) is declared dead. Larger "
          "values give a paused or overloaded daemon longer to refute.",
          InRange(1, 1000)),
      ConfigKey::String(
          "liveness.transport", defaults.liveness.transport,
          "How this daemon sends membership messages: \"udp\", one datagram each way on the "
          "peer port's number (signed with cluster.token), or \"grpc\", a Heartbeat call on "
          "the peer service. Every daemon answers both, so members may differ; udp costs an idle "
          "daemon a fraction of the CPU. Where a firewall or a network policy passes only TCP, "
          "use grpc.",
          OneOf({"udp", "grpc"})),
  });
  if (!schema.ok()) {
    // The table above is fixed at compile time: a bad entry is a bug that every test catches.
    std::fprintf(stderr, "tesserad: invalid config schema: %s\n",
                 std::string(schema.status().message()).c_str());
    std::abort();
  }
  return *std::move(schema);
}

const ConfigSchema& DaemonSchema() {
  static const ConfigSchema* const schema = new ConfigSchema(BuildSchema());
  return *schema;
}

DaemonConfig FromConfig(const Config& config) {
  DaemonConfig daemon_config;
  daemon_config.node.id = config.GetString("node.id");
  daemon_config.store.directory = config.GetString("store.directory");
  daemon_config.store.capacity_bytes = config.GetByteSize("store.capacity_bytes");
  daemon_config.store.prefault = config.GetBool("store.prefault");
  daemon_config.store.filesystem_check = config.GetString("store.filesystem_check");
  daemon_config.store.crc_threads = static_cast<int>(config.GetInt64("store.crc_threads"));
  daemon_config.store.seal_checksum = config.GetString("store.seal_checksum");
  daemon_config.store.state_directory = config.GetString("store.state_directory");
  daemon_config.agent.socket_path = config.GetString("agent.socket_path");
  // Validated as 3 or 4 octal digits.
  daemon_config.agent.max_connections_per_uid = config.GetInt64("agent.max_connections_per_uid");
  daemon_config.agent.socket_mode = static_cast<uint32_t>(
      std::strtoul(config.GetString("agent.socket_mode").c_str(), nullptr, 8));
  daemon_config.daemon.drain_timeout_ms = config.GetInt64("daemon.drain_timeout_ms");
  daemon_config.log.level = config.GetString("log.level");
  daemon_config.peer.listen_address = config.GetString("peer.listen_address");
  daemon_config.peer.advertise_address = config.GetString("peer.advertise_address");
  daemon_config.peer.data_path = config.GetString("peer.data_path");
  daemon_config.peer.data_port = config.GetInt64("peer.data_port");
  daemon_config.cluster.members = config.GetStringList("cluster.members");
  daemon_config.cluster.dns_name = config.GetString("cluster.dns_name");
  daemon_config.cluster.dns_port = config.GetInt64("cluster.dns_port");
  daemon_config.cluster.dns_refresh_ms = config.GetInt64("cluster.dns_refresh_ms");
  daemon_config.cluster.token = config.GetString("cluster.token");
  daemon_config.cluster.token_file = config.GetString("cluster.token_file");
  daemon_config.cluster.tls_cert_file = config.GetString("cluster.tls_cert_file");
  daemon_config.cluster.tls_key_file = config.GetString("cluster.tls_key_file");
  daemon_config.cluster.tls_ca_file = config.GetString("cluster.tls_ca_file");
  daemon_config.cluster.tls_refresh_s = config.GetInt64("cluster.tls_refresh_s");
  daemon_config.cluster.tls_cipher_threads = config.GetInt64("cluster.tls_cipher_threads");
  daemon_config.cluster.tls_cipher_nice = config.GetInt64("cluster.tls_cipher_nice");
  daemon_config.cluster.tls_cipher_library = config.GetString("cluster.tls_cipher_library");
  daemon_config.cluster.insecure = config.GetBool("cluster.insecure");
  daemon_config.cluster.datagram_failures_per_source_per_s =
      config.GetInt64("cluster.datagram_failures_per_source_per_s");
  daemon_config.cluster.datagram_failures_per_s = config.GetInt64("cluster.datagram_failures_per_s");
  daemon_config.cluster.proof_checks_per_member_per_s =
      config.GetInt64("cluster.proof_checks_per_member_per_s");
  daemon_config.cluster.proof_checks_per_s = config.GetInt64("cluster.proof_checks_per_s");
  daemon_config.cluster.drop_fence_ms = config.GetInt64("cluster.drop_fence_ms");
  daemon_config.metrics.listen_address = config.GetString("metrics.listen_address");
  daemon_config.ec.k = static_cast<int>(config.GetInt64("ec.k"));
  daemon_config.ec.m = static_cast<int>(config.GetInt64("ec.m"));
  daemon_config.liveness.heartbeat_ms = config.GetInt64("liveness.heartbeat_ms");
  daemon_config.liveness.timeout_ms = config.GetInt64("liveness.timeout_ms");
  daemon_config.liveness.indirect_probes =
      static_cast<int>(config.GetInt64("liveness.indirect_probes"));
  daemon_config.liveness.suspicion_mult =
      static_cast<int>(config.GetInt64("liveness.suspicion_mult"));
  daemon_config.liveness.transport = config.GetString("liveness.transport");
  return daemon_config;
}

}  // namespace

absl::StatusOr<DaemonConfig> LoadDaemonConfig(const std::string& path_or_empty,
                                              const std::vector<std::string>& overrides) {
  TESSERA_ASSIGN_OR_RETURN(Config config, LoadConfig(DaemonSchema(), path_or_empty, overrides));
  DaemonConfig result = FromConfig(config);
  // Checks across keys.
  if (result.liveness.timeout_ms <= result.liveness.heartbeat_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "liveness.timeout_ms (", result.liveness.timeout_ms,
        ") must exceed liveness.heartbeat_ms (", result.liveness.heartbeat_ms,
        "): a probe's window must outlast a protocol period"));
  }
  if (result.peer.listen_address.empty() &&
      (!result.peer.advertise_address.empty() || !result.cluster.members.empty() ||
       !result.cluster.dns_name.empty())) {
    return absl::InvalidArgumentError(
        "peer.advertise_address, cluster.members and cluster.dns_name need "
        "peer.listen_address: without it the daemon runs standalone");
  }
  if (!result.cluster.token.empty() && !result.cluster.token_file.empty()) {
    return absl::InvalidArgumentError(
        "cluster.token and cluster.token_file are both set: set one (the file keeps the secret "
        "out of the config and the command line)");
  }
  if (!result.cluster.token_file.empty()) {
    TESSERA_ASSIGN_OR_RETURN(result.cluster.token, ReadTokenFile(result.cluster.token_file));
  }
  const bool tls = !result.cluster.tls_cert_file.empty() ||
                   !result.cluster.tls_key_file.empty() || !result.cluster.tls_ca_file.empty();
  if (tls && result.peer.listen_address.empty()) {
    return absl::InvalidArgumentError(
        "cluster.tls_* files are set but peer.listen_address is not: TLS is for the peer port "
        "of a cluster; a standalone daemon has none");
  }
  if (tls) {
    TESSERA_RETURN_IF_ERROR(CheckClusterTlsFiles(ClusterTls(result.cluster)));
    // Peers refuse every call that claims another node than the certificate names: a daemon
    // whose certificate is another node's could not take part, so it does not start.
    TESSERA_ASSIGN_OR_RETURN(const std::string node_id, ResolveNodeId(result.node.id));
    TESSERA_RETURN_IF_ERROR(CheckCertificateNamesNode(result.cluster.tls_cert_file, node_id));
  }
  if (!result.peer.listen_address.empty() && result.cluster.token.empty() &&
      !result.cluster.insecure) {
    return absl::InvalidArgumentError(
        "peer.listen_address is set (cluster mode) but cluster.token and cluster.token_file "
        "are not: any process that reaches the peer port could read and write every job's "
        "state and join as a member. Set cluster.token_file to a file holding a secret shared "
        "by the cluster's daemons (for example the output of `openssl rand -base64 32`), or "
        "cluster.insecure = true for a private test network");
  }
  return result;
}

absl::StatusOr<std::string> ResolveNodeId(const std::string& configured) {
  if (!configured.empty()) return configured;
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) return ErrnoStatus(errno, "gethostname");
  std::string id = host;
  for (char& c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) c = '_';
  }
  return id;
}

ClusterTlsFiles ClusterTls(const DaemonConfig::Cluster& cluster) {
  return ClusterTlsFiles{cluster.tls_cert_file, cluster.tls_key_file, cluster.tls_ca_file,
                         cluster.tls_refresh_s};
}

VerificationThrottle::Options DatagramThrottleOptions(const DaemonConfig::Cluster& cluster,
                                                      VerificationThrottle::Options base) {
  base.source_interval = absl::Seconds(1) / cluster.datagram_failures_per_source_per_s;
  base.total_interval = absl::Seconds(1) / cluster.datagram_failures_per_s;
  return base;
}

VerificationThrottle::Options ProofThrottleOptions(const DaemonConfig::Cluster& cluster,
                                                   VerificationThrottle::Options base) {
  base.source_interval = absl::Seconds(1) / cluster.proof_checks_per_member_per_s;
  base.total_interval = absl::Seconds(1) / cluster.proof_checks_per_s;
  return base;
}

std::string DefaultDaemonConfigToml() {
  return absl::StrCat(
      "# tesserad configuration. Every key is optional: a missing key takes the default shown.\n"
      "# Start with `tesserad --config FILE`; override a key with `--set key=value`.\n\n",
      DaemonSchema().RenderDefaults());
}

}  // namespace tessera
