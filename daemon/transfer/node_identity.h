// Which node a peer is, under mutual TLS (cluster.tls_*). A daemon's certificate names the node
// id it speaks for as a subjectAltName URI "tessera-node:<node id>" (exactly one such URI;
// tools/make-cluster-certs.sh issues them so), and a daemon refuses to start with a certificate
// that does not name its own node.id.
//
// On the peer port, with mutual TLS:
//   - a call that says which node sends it (a heartbeat's node_id, a fragment write's
//     owner_node_id, OpenDataPath's node_id, a coordination call's `from`) is refused with
//     kPermissionDenied, naming both, unless the caller's certificate names that node
//     (CheckCallerIs);
//   - the calls only daemons make (the Peer, Coordination and Rendezvous services) need a node's
//     certificate (RequireNodeCaller); a certificate that names no node (an operator's, for the
//     CLI) reaches the Admin service only;
//   - a heartbeat's answer must come from the node it names (CheckServerIs);
//   - and a daemon that calls a member by its node id reaches it only over a connection whose
//     server certificate names that node, checked in the TLS handshake (ClusterCredentials,
//     cluster_tls.h).
// Without TLS (a cluster token only, or an insecure cluster) a caller has no certified identity
// and these checks pass: the token is then the only credential.
//
// Thread-safe: plain functions.
#ifndef TESSERA_DAEMON_TRANSFER_NODE_IDENTITY_H_
#define TESSERA_DAEMON_TRANSFER_NODE_IDENTITY_H_

#include <openssl/x509.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/auth_context.h"
#include "grpcpp/server_context.h"

namespace tessera {

inline constexpr char kNodeUriScheme[] = "tessera-node:";

// "tessera-node:<node_id>".
std::string NodeUri(absl::string_view node_id);

// The node id that `cert`'s subjectAltName URIs name: "" when none does; kInvalidArgument when
// two name different nodes or one names an empty id.
absl::StatusOr<std::string> NodeIdOfCertificate(X509* cert);

// The same from the subjectAltName URIs of a certificate (as gRPC hands them over).
absl::StatusOr<std::string> NodeIdOfUris(const std::vector<grpc::string_ref>& uris);

// The same for the first certificate of a PEM file. kInvalidArgument when it cannot be read.
absl::StatusOr<std::string> NodeIdOfCertificateFile(const std::string& pem_file);

// At a daemon's start: OK when the certificate of `cert_file` (cluster.tls_cert_file) names
// `node_id`; kInvalidArgument naming the file, the node it names (or that it names none) and
// node.id otherwise.
absl::Status CheckCertificateNamesNode(const std::string& cert_file, const std::string& node_id);

// Who is at the other end of a call.
struct PeerIdentity {
  bool certified = false;  // over mutual TLS, with a certificate the CA issued
  std::string node_id;     // the node the certificate names; empty: none (an operator's)
  std::string subject;     // the certificate's common name, for messages
  // "the caller's certificate (CN=..., node n1)" / "... names no node" / "an uncertified caller".
  std::string Describe() const;
};

// From a call's auth context. kPermissionDenied when the certificate names two nodes.
absl::StatusOr<PeerIdentity> IdentityOf(const grpc::AuthContext& context);

// OK when `caller` is uncertified (no TLS) or its certificate names node `claimed`;
// kPermissionDenied naming the certificate's node and the claimed one otherwise. `what` names
// the call and the field ("Heartbeat node_id").
absl::Status CheckClaim(const PeerIdentity& caller, absl::string_view claimed,
                        absl::string_view what);

// OK when `caller` is uncertified or its certificate names a node; kPermissionDenied otherwise.
// `what` names the calls ("peer calls").
absl::Status CheckIsNode(const PeerIdentity& caller, absl::string_view what);

// Server side: IdentityOf the caller, then CheckClaim.
absl::Status CheckCallerIs(const grpc::ServerContextBase& context, absl::string_view claimed,
                           absl::string_view what);

// Server side, for calls that only daemons make: IdentityOf the caller, then CheckIsNode.
absl::StatusOr<PeerIdentity> RequireNodeCaller(const grpc::ServerContextBase& context,
                                               absl::string_view what);

// Client side, after a call: with mutual TLS on the channel, OK when the server's certificate
// names `claimed` (the node its answer says it is); kPermissionDenied otherwise. Without: OK.
absl::Status CheckServerIs(const grpc::ClientContext& context, absl::string_view claimed,
                           absl::string_view what);

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_NODE_IDENTITY_H_
