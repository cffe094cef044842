// Mutual TLS on the peer port (cluster.tls_cert_file, cluster.tls_key_file, cluster.tls_ca_file):
// every daemon-to-daemon gRPC call is encrypted, and each side presents a certificate issued by
// the cluster's CA and verifies the other's, so that a process without such a certificate cannot
// reach a peer call at all (the cluster token is still checked on top). The files are re-read
// every cluster.tls_refresh_s, so certificates rotated in place (a Kubernetes secret updated)
// take effect without a restart.
//
// Peers are dialled by address, so a certificate is not checked against the address dialled.
// What it is checked against is the node it speaks for: a daemon's certificate names its node id
// (subjectAltName URI tessera-node:<node id>), the daemon refuses to start with another node's,
// and its peers refuse every call, and every membership datagram, that claims another node than
// the caller's certificate names (node_identity.h, daemon/membership/datagram_signer.h). The
// other way round, a daemon that calls member X (to send it fragments, read fragments or a shard
// from it, ask it what it holds, report to it as a job's coordinator, forward to it) completes
// the TLS handshake only with a server whose certificate names X: any other daemon of the
// cluster (or a copy of its key) at X's address gets no byte of the call, not even the token.
// Checked in the handshake (a certificate verifier) rather than from the call's auth context
// afterwards, because by then the request, and for a fragment write its bytes, would have been
// sent; and per connection, so a channel that reconnects (to whatever now answers at that
// address) is checked again.
//
// The raw data path is encrypted under TLS (data path version 2, data_path_crypto.h): its
// session key is handed out over these TLS calls only, to the node the caller's certificate
// names, by the node the server's certificate names, and is never sent on the data path itself;
// a connection proves it holds the key when it opens, and every byte after that travels in
// AES-256-GCM records under keys of that connection alone.
#ifndef TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_
#define TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"

namespace tessera {

struct ClusterTlsFiles {
  std::string cert_file;  // PEM: this daemon's certificate (chain)
  std::string key_file;   // PEM: its private key
  std::string ca_file;    // PEM: the CA certificates that issue the cluster's certificates
  int64_t refresh_s = 60;
  bool enabled() const { return !cert_file.empty(); }
};

// Checks the files as the daemon starts: each readable and PEM, the key the certificate's, the
// certificate valid now and issued by one of the CA certificates. kInvalidArgument naming the
// setting, the file and what is wrong otherwise. OK when TLS is off.
absl::Status CheckClusterTlsFiles(const ClusterTlsFiles& files);

// Server credentials of the peer port: insecure when TLS is off; otherwise TLS with this
// daemon's certificate, requiring a client certificate the CA issued.
std::shared_ptr<grpc::ServerCredentials> PeerServerCredentials(const ClusterTlsFiles& files);

// Channel credentials for daemon-to-daemon calls, to match: insecure when TLS is off; otherwise
// TLS with this daemon's certificate, and the server's certificate must chain to the CA and name
// node `server_node_id` (its tessera-node: URI), or any one node when it is empty (a daemon whose
// node is not known yet: a seed address, the CLI's --address), or the handshake fails.
std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(
    const ClusterTlsFiles& files, const std::string& server_node_id = "");

// The first error on OpenSSL's error queue of this thread, as text (`if_none` when it is empty),
// and the queue cleared.
std::string OpenSslErrorText(const char* if_none);

// A daemon to call: its peer address ("host:port") and, where the caller knows it, the node that
// must answer there. With mutual TLS a channel to a target with a node id completes its handshake
// only with a server whose certificate names that node (ClusterCredentials); without a node id,
// with any daemon of the cluster. Converts implicitly from an address (no node id: membership
// probes of addresses, the CLI, tests).
struct PeerTarget {
  PeerTarget(std::string address) : address(std::move(address)) {}  // NOLINT(runtime/explicit)
  PeerTarget(const char* address) : address(address) {}             // NOLINT(runtime/explicit)
  PeerTarget(std::string address, std::string node_id)
      : address(std::move(address)), node_id(std::move(node_id)) {}

  // "10.0.0.2:7070", or "10.0.0.2:7070 (node n2)": for messages, and as a key.
  std::string ToString() const;

  std::string address;
  std::string node_id;  // empty: any node of the cluster
};

// How this process dials daemons: channel credentials per node called. Insecure (no TLS: the
// cluster token is the only credential), or mutual TLS where the server must present a
// certificate of the cluster's CA that names the node called (PeerChannelCredentials). One
// certificate provider (one watcher of the files) serves every node's credentials. A server
// refused in a handshake for naming another node (or none) is counted (stats) and logged, at
// most once per 10 s per (node called, node presented). Thread-safe.
class ClusterCredentials {
 public:
  static std::shared_ptr<ClusterCredentials> Insecure();
  // REQUIRES: files.enabled(), and CheckClusterTlsFiles(files) is OK.
  static std::shared_ptr<ClusterCredentials> Tls(const ClusterTlsFiles& files);
  ~ClusterCredentials();

  // The credentials of channels to `node_id` (empty: any node). The same object for the same
  // node, so gRPC may share connections between channels to one node and never across nodes.
  std::shared_ptr<grpc::ChannelCredentials> For(const std::string& node_id);
  bool tls() const { return tls_; }

  struct Stats {
    uint64_t servers_refused = 0;  // handshakes where the server's certificate was not the node's
  };
  Stats stats() const;

  struct State;  // shared with the certificate verifiers gRPC owns

 private:
  explicit ClusterCredentials(
      std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider);

  const bool tls_;
  const std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider_;  // TLS
  const std::shared_ptr<State> state_;
};

// The ClusterCredentials every daemon-to-daemon channel of this process uses: set once as the
// daemon starts (before any peer channel is made), insecure until then (and after a null).
void SetClusterCredentials(std::shared_ptr<ClusterCredentials> credentials);
std::shared_ptr<ClusterCredentials> ProcessClusterCredentials();
// ProcessClusterCredentials()->For(server_node_id).
std::shared_ptr<grpc::ChannelCredentials> ClusterChannelCredentials(
    const std::string& server_node_id = "");

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_
