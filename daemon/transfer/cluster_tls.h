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
// the caller's certificate names (node_identity.h, daemon/membership/datagram_signer.h). The raw
// data path is encrypted under TLS (data path version 2, data_path_crypto.h): its session key is
// handed out over these TLS calls only, to the node the caller's certificate names, and is never
// sent on the data path itself; a connection proves it holds the key when it opens, and every
// byte after that travels in AES-256-GCM records under keys of that connection alone.
#ifndef TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_
#define TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

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

// Channel credentials for daemon-to-daemon calls, to match.
std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(const ClusterTlsFiles& files);

// The first error on OpenSSL's error queue of this thread, as text (`if_none` when it is empty),
// and the queue cleared.
std::string OpenSslErrorText(const char* if_none);

// The credentials every daemon-to-daemon channel of this process uses: set once as the daemon
// starts (before any peer channel is made), insecure until then.
void SetClusterChannelCredentials(std::shared_ptr<grpc::ChannelCredentials> credentials);
std::shared_ptr<grpc::ChannelCredentials> ClusterChannelCredentials();

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_CLUSTER_TLS_H_
