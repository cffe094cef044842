#include "daemon/transfer/node_identity.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "grpc/grpc_security_constants.h"

namespace tessera {
namespace {

struct X509Free {
  void operator()(X509* cert) const { X509_free(cert); }
};

// Whether a subjectAltName URI names a node ("tessera-node:<id>"), and which.
bool NodeOfUri(absl::string_view uri, std::string* node_id) {
  if (!absl::StartsWith(uri, kNodeUriScheme)) return false;
  *node_id = std::string(uri.substr(sizeof(kNodeUriScheme) - 1));
  return true;
}

// Folds one more URI into the node id found so far.
absl::Status AddNodeUri(absl::string_view uri, std::string* found) {
  std::string node_id;
  if (!NodeOfUri(uri, &node_id)) return absl::OkStatus();
  if (node_id.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the certificate's subjectAltName URI '", uri, "' names an empty node id"));
  }
  if (!found->empty() && *found != node_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the certificate names two nodes ('", *found, "' and '", node_id,
        "'); a daemon's certificate names exactly one (URI ", kNodeUriScheme, "<node id>)"));
  }
  *found = node_id;
  return absl::OkStatus();
}

std::string First(const grpc::AuthContext& context, const char* property) {
  const std::vector<grpc::string_ref> values = context.FindPropertyValues(property);
  return values.empty() ? std::string() : std::string(values[0].data(), values[0].size());
}

}  // namespace

std::string NodeUri(absl::string_view node_id) { return absl::StrCat(kNodeUriScheme, node_id); }

absl::StatusOr<std::string> NodeIdOfCertificate(X509* cert) {
  std::string found;
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (names == nullptr) return found;
  absl::Status status;
  for (int i = 0; i < sk_GENERAL_NAME_num(names) && status.ok(); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
    if (name->type != GEN_URI) continue;
    const ASN1_IA5STRING* uri = name->d.uniformResourceIdentifier;
    status = AddNodeUri(absl::string_view(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)),
                                          static_cast<size_t>(ASN1_STRING_length(uri))),
                        &found);
  }
  GENERAL_NAMES_free(names);
  if (!status.ok()) return status;
  return found;
}

absl::StatusOr<std::string> NodeIdOfUris(const std::vector<grpc::string_ref>& uris) {
  std::string found;
  for (const grpc::string_ref& uri : uris) {
    TESSERA_RETURN_IF_ERROR(AddNodeUri(absl::string_view(uri.data(), uri.size()), &found));
  }
  return found;
}

absl::StatusOr<std::string> NodeIdOfCertificateFile(const std::string& pem_file) {
  std::FILE* in = std::fopen(pem_file.c_str(), "r");
  if (in == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(pem_file, " cannot be read"));
  }
  std::unique_ptr<X509, X509Free> cert(PEM_read_X509(in, nullptr, nullptr, nullptr));
  std::fclose(in);
  ERR_clear_error();
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(pem_file, " holds no PEM certificate"));
  }
  return NodeIdOfCertificate(cert.get());
}

absl::Status CheckCertificateNamesNode(const std::string& cert_file, const std::string& node_id) {
  absl::StatusOr<std::string> named = NodeIdOfCertificateFile(cert_file);
  if (!named.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cluster.tls_cert_file: ", cert_file, ": ", named.status().message()));
  }
  if (*named == node_id) return absl::OkStatus();
  const std::string how = named->empty()
                              ? std::string("names no node")
                              : absl::StrCat("names node '", *named, "' (", NodeUri(*named), ")");
  return absl::InvalidArgumentError(absl::StrCat(
      "cluster.tls_cert_file: ", cert_file, " ", how, ", but this daemon's node.id is '", node_id,
      "': with mutual TLS each daemon presents a certificate naming its own node id as "
      "the subjectAltName URI ",
      NodeUri(node_id), " (tools/make-cluster-certs.sh DIR ", node_id,
      " issues one), and its peers refuse calls "
      "that claim another node"));
}

std::string PeerIdentity::Describe() const {
  if (!certified) return "an uncertified caller";
  const std::string cn = subject.empty() ? "" : absl::StrCat(" (CN=", subject, ")");
  if (node_id.empty()) return absl::StrCat("a certificate", cn, " that names no node");
  return absl::StrCat("a certificate", cn, " of node '", node_id, "'");
}

absl::StatusOr<PeerIdentity> IdentityOf(const grpc::AuthContext& context) {
  PeerIdentity identity;
  // "ssl" from grpc::SslCredentials, "tls" from the grpc::experimental::TlsCredentials that
  // cluster_tls.h makes: either way the peer's certificate was verified against the CA.
  const std::string security = First(context, GRPC_TRANSPORT_SECURITY_TYPE_PROPERTY_NAME);
  identity.certified =
      security == GRPC_SSL_TRANSPORT_SECURITY_TYPE || security == GRPC_TLS_TRANSPORT_SECURITY_TYPE;
  if (!identity.certified) return identity;
  identity.subject = First(context, GRPC_X509_CN_PROPERTY_NAME);
  absl::StatusOr<std::string> node =
      NodeIdOfUris(context.FindPropertyValues(GRPC_PEER_URI_PROPERTY_NAME));
  if (!node.ok()) return absl::PermissionDeniedError(node.status().message());
  identity.node_id = std::move(*node);
  return identity;
}

absl::Status CheckClaim(const PeerIdentity& caller, absl::string_view claimed,
                        absl::string_view what) {
  if (!caller.certified || caller.node_id == claimed) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      what, " claims node '", claimed, "', but the caller presented ", caller.Describe(),
      ": with mutual TLS a daemon speaks only for the node its certificate names"));
}

absl::Status CheckIsNode(const PeerIdentity& caller, absl::string_view what) {
  if (!caller.certified || !caller.node_id.empty()) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat(what, " are for daemons: the caller presented ", caller.Describe(),
                   ", and only a certificate naming a node (subjectAltName URI ", kNodeUriScheme,
                   "<node id>) may make them"));
}

absl::Status CheckCallerIs(const grpc::ServerContextBase& context, absl::string_view claimed,
                           absl::string_view what) {
  absl::StatusOr<PeerIdentity> caller = IdentityOf(*context.auth_context());
  if (!caller.ok()) return caller.status();
  return CheckClaim(*caller, claimed, what);
}

absl::StatusOr<PeerIdentity> RequireNodeCaller(const grpc::ServerContextBase& context,
                                               absl::string_view what) {
  absl::StatusOr<PeerIdentity> caller = IdentityOf(*context.auth_context());
  if (!caller.ok()) return caller.status();
  if (absl::Status s = CheckIsNode(*caller, what); !s.ok()) return s;
  return caller;
}

absl::Status CheckServerIs(const grpc::ClientContext& context, absl::string_view claimed,
                           absl::string_view what) {
  absl::StatusOr<PeerIdentity> server = IdentityOf(*context.auth_context());
  if (!server.ok()) return server.status();
  if (!server->certified || server->node_id == claimed) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(what, " says it comes from node '", claimed,
                                                  "', but the answering daemon presented ",
                                                  server->Describe()));
}

}  // namespace tessera
