#include "daemon/transfer/cluster_tls.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <cstdio>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
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

absl::Mutex channel_credentials_mu;
std::shared_ptr<grpc::ChannelCredentials>& ChannelCredentialsSlot() {
  static auto* slot = new std::shared_ptr<grpc::ChannelCredentials>();
  return *slot;
}

}  // namespace

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

std::shared_ptr<grpc::ChannelCredentials> PeerChannelCredentials(const ClusterTlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(Provider(files));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);  // the chain, against the CA
  // Not the address dialled: peers are dialled by address, and the CA is the identity.
  options.set_certificate_verifier(std::make_shared<grpc::experimental::NoOpCertificateVerifier>());
  options.set_check_call_host(false);
  return grpc::experimental::TlsCredentials(options);
}

void SetClusterChannelCredentials(std::shared_ptr<grpc::ChannelCredentials> credentials) {
  absl::MutexLock lock(&channel_credentials_mu);
  ChannelCredentialsSlot() = std::move(credentials);
}

std::shared_ptr<grpc::ChannelCredentials> ClusterChannelCredentials() {
  absl::MutexLock lock(&channel_credentials_mu);
  if (ChannelCredentialsSlot() == nullptr) return grpc::InsecureChannelCredentials();
  return ChannelCredentialsSlot();
}

}  // namespace tessera
