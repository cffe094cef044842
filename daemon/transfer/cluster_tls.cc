#include "daemon/transfer/cluster_tls.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "daemon/transfer/node_identity.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_certificate_verifier.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace tessera {
namespace {

absl::Status Bad(const char* setting, const std::string& file, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(setting, ": ", file, ": ", what));
}

// Reads every PEM certificate of `file` (at least one).
absl::Status ReadCertificates(const char* setting, const std::string& file,
                              std::vector<X509*>* out) {
  std::FILE* in = std::fopen(file.c_str(), "r");
  if (in == nullptr) return Bad(setting, file, "cannot be read");
  while (X509* cert = PEM_read_X509(in, nullptr, nullptr, nullptr)) out->push_back(cert);
  ERR_clear_error();  // the end of the file reads as an error
  std::fclose(in);
  if (out->empty()) return Bad(setting, file, "holds no PEM certificate");
  return absl::OkStatus();
}

struct Certificates {
  std::vector<X509*> certs;
  ~Certificates() {
    for (X509* cert : certs) X509_free(cert);
  }
};

std::shared_ptr<grpc::experimental::FileWatcherCertificateProvider> Provider(
    const ClusterTlsFiles& files) {
  return std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key_file, files.cert_file, files.ca_file,
      static_cast<unsigned int>(files.refresh_s));
}

absl::Mutex process_credentials_mu;
std::shared_ptr<ClusterCredentials>& ProcessCredentialsSlot() {
  static auto* slot = new std::shared_ptr<ClusterCredentials>();
  return *slot;
}

// A node's credentials are kept at most this many at once (a cluster's members, and then some).
constexpr size_t kMaxCachedNodes = 4096;

}  // namespace

struct ClusterCredentials::State {
  // A server refused in a handshake: counted, and logged at most once per 10 s per (node called,
  // node presented), the next line saying how many went unlogged.
  void Refused(const std::string& called, const std::string& presented,
               const std::string& message) {
    uint64_t unlogged = 0;
    {
      absl::MutexLock lock(&mu);
      ++servers_refused;
      Logged& logged = last_logged[{called, presented}];
      const absl::Time now = absl::Now();
      if (logged.at != absl::InfinitePast() && now - logged.at < absl::Seconds(10)) {
        ++logged.unlogged;
        return;
      }
      if (last_logged.size() > kMaxCachedNodes) last_logged.clear();  // bounded
      logged.at = now;
      unlogged = logged.unlogged;
      logged.unlogged = 0;
    }
    Logger("peer")->warn(
        "refused a connection: {} (tessera_peer_servers_refused_total counts "
        "them; logged at most once per 10 s per node pair{})",
        message, unlogged == 0 ? "" : absl::StrCat("; ", unlogged, " unlogged since"));
  }

  struct Logged {
    absl::Time at = absl::InfinitePast();
    uint64_t unlogged = 0;
  };
  absl::Mutex mu;
  uint64_t servers_refused ABSL_GUARDED_BY(mu) = 0;
  std::map<std::pair<std::string, std::string>, Logged> last_logged ABSL_GUARDED_BY(mu);
  std::map<std::string, std::shared_ptr<grpc::ChannelCredentials>> by_node ABSL_GUARDED_BY(mu);
};

namespace {

// Runs in the TLS handshake, after the server's chain was verified against the CA: the server's
// certificate must name node `node_id_` (any one node when it is empty).
class ServerNodeVerifier final : public grpc::experimental::ExternalCertificateVerifier {
 public:
  // `state` may be null (credentials made outside a ClusterCredentials: nothing is counted).
  ServerNodeVerifier(std::string node_id, std::shared_ptr<ClusterCredentials::State> state)
      : node_id_(std::move(node_id)), state_(std::move(state)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> /*callback*/, grpc::Status* sync_status) override {
    absl::StatusOr<std::string> named = NodeIdOfUris(request->uri_names());
    if (named.ok() && !named->empty() && (node_id_.empty() || *named == node_id_)) {
      *sync_status = grpc::Status::OK;
      return true;  // synchronous
    }
    const std::string cn(request->common_name().data(), request->common_name().size());
    const std::string presented = named.ok() ? *named : "";
    const std::string names = !named.ok()      ? std::string(named.status().message())
                              : named->empty() ? std::string("names no node")
                                               : absl::StrCat("names node '", *named, "'");
    const std::string message = absl::StrCat(
        "the server at ", std::string(request->target_name().data(), request->target_name().size()),
        " presented a certificate (CN=", cn, ") that ", names,
        node_id_.empty()
            ? std::string(
                  ", and only a daemon's certificate (naming its node) answers daemon calls")
            : absl::StrCat(", but node '", node_id_,
                           "' was called: a member's calls go only to the daemon whose "
                           "certificate names it"));
    if (state_ != nullptr) state_->Refused(node_id_, presented, message);
    *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, message);
    return true;
  }

  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest* /*request*/) override {}

 private:
  const std::string node_id_;
  const std::shared_ptr<ClusterCredentials::State> state_;
};

std::shared_ptr<grpc::ChannelCredentials> TlsChannelCredentials(
    std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider,
    const std::string& server_node_id, std::shared_ptr<ClusterCredentials::State> state) {
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(std::move(provider));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);  // the chain, against the CA
  // Not the address dialled (peers are dialled by address, and the CA is the identity): the node
  // the server's certificate names.
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<ServerNodeVerifier>(
          server_node_id, std::move(state)));
  options.set_check_call_host(false);
  return grpc::experimental::TlsCredentials(options);
}

}  // namespace

std::string PeerTarget::ToString() const {
  return node_id.empty() ? address : absl::StrCat(address, " (node ", node_id, ")");
}

std::string OpenSslErrorText(const char* if_none) {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return if_none;
  char buffer[256];
  ERR_error_string_n(code, buffer, sizeof(buffer));
  return buffer;
}

absl::Status CheckClusterTlsFiles(const ClusterTlsFiles& files) {
  if (!files.enabled() && files.key_file.empty() && files.ca_file.empty()) return absl::OkStatus();
  if (files.cert_file.empty() || files.key_file.empty() || files.ca_file.empty()) {
    return absl::InvalidArgumentError(
        "cluster.tls_cert_file, cluster.tls_key_file and cluster.tls_ca_file go together: set "
        "all three (mutual TLS on the peer port) or none");
  }
  Certificates own, cas;
  if (absl::Status s = ReadCertificates("cluster.tls_cert_file", files.cert_file, &own.certs);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = ReadCertificates("cluster.tls_ca_file", files.ca_file, &cas.certs);
      !s.ok()) {
    return s;
  }
  std::FILE* in = std::fopen(files.key_file.c_str(), "r");
  if (in == nullptr) return Bad("cluster.tls_key_file", files.key_file, "cannot be read");
  EVP_PKEY* key = PEM_read_PrivateKey(in, nullptr, nullptr, nullptr);
  std::fclose(in);
  if (key == nullptr) {
    return Bad("cluster.tls_key_file", files.key_file,
               absl::StrCat("holds no unencrypted PEM private key (",
                            OpenSslErrorText("no PEM data found"), ")"));
  }
  const bool matches = X509_check_private_key(own.certs[0], key) == 1;
  EVP_PKEY_free(key);
  ERR_clear_error();
  if (!matches) {
    return Bad("cluster.tls_key_file", files.key_file,
               absl::StrCat("is not the key of the certificate in ", files.cert_file));
  }
  X509_STORE* store = X509_STORE_new();
  for (X509* ca : cas.certs) X509_STORE_add_cert(store, ca);
  STACK_OF(X509)* chain = sk_X509_new_null();
  for (size_t i = 1; i < own.certs.size(); ++i) sk_X509_push(chain, own.certs[i]);
  X509_STORE_CTX* context = X509_STORE_CTX_new();
  X509_STORE_CTX_init(context, store, own.certs[0], chain);
  const bool verified = X509_verify_cert(context) == 1;
  const int error = X509_STORE_CTX_get_error(context);
  X509_STORE_CTX_free(context);
  sk_X509_free(chain);
  X509_STORE_free(store);
  ERR_clear_error();
  if (!verified) {
    return Bad("cluster.tls_cert_file", files.cert_file,
               absl::StrCat("does not verify against the CA certificates in ", files.ca_file,
                            ": ", X509_verify_cert_error_string(error)));
  }
  if (files.refresh_s < 1) {
    return absl::InvalidArgumentError(absl::StrCat("cluster.tls_refresh_s is ", files.refresh_s,
                                                   "; it must be at least 1"));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> PeerServerCredentials(const ClusterTlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  grpc::experimental::TlsServerCredentialsOptions options(Provider(files));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  return grpc::experimental::TlsServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(
    const ClusterTlsFiles& files, const std::string& server_node_id) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  return TlsChannelCredentials(Provider(files), server_node_id, nullptr);
}

ClusterCredentials::ClusterCredentials(
    std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider)
    : tls_(provider != nullptr),
      provider_(std::move(provider)),
      state_(std::make_shared<State>()) {}

ClusterCredentials::~ClusterCredentials() = default;

std::shared_ptr<ClusterCredentials> ClusterCredentials::Insecure() {
  return std::shared_ptr<ClusterCredentials>(new ClusterCredentials(nullptr));
}

std::shared_ptr<ClusterCredentials> ClusterCredentials::Tls(const ClusterTlsFiles& files) {
  return std::shared_ptr<ClusterCredentials>(new ClusterCredentials(Provider(files)));
}

std::shared_ptr<grpc::ChannelCredentials> ClusterCredentials::For(const std::string& node_id) {
  if (!tls_) return grpc::InsecureChannelCredentials();
  absl::MutexLock lock(&state_->mu);
  if (state_->by_node.size() >= kMaxCachedNodes && state_->by_node.count(node_id) == 0) {
    state_->by_node.clear();  // bounded; channels made before keep theirs
  }
  std::shared_ptr<grpc::ChannelCredentials>& credentials = state_->by_node[node_id];
  if (credentials == nullptr) credentials = TlsChannelCredentials(provider_, node_id, state_);
  return credentials;
}

ClusterCredentials::Stats ClusterCredentials::stats() const {
  absl::MutexLock lock(&state_->mu);
  Stats s;
  s.servers_refused = state_->servers_refused;
  return s;
}

void SetClusterCredentials(std::shared_ptr<ClusterCredentials> credentials) {
  absl::MutexLock lock(&process_credentials_mu);
  ProcessCredentialsSlot() = std::move(credentials);
}

std::shared_ptr<ClusterCredentials> ProcessClusterCredentials() {
  absl::MutexLock lock(&process_credentials_mu);
  if (ProcessCredentialsSlot() == nullptr)
    ProcessCredentialsSlot() = ClusterCredentials::Insecure();
  return ProcessCredentialsSlot();
}

std::shared_ptr<grpc::ChannelCredentials> ClusterChannelCredentials(
    const std::string& server_node_id) {
  return ProcessClusterCredentials()->For(server_node_id);
}

}  // namespace tessera
