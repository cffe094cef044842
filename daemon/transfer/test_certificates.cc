#include "daemon/transfer/test_certificates.h"

#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "daemon/transfer/node_identity.h"

namespace tessera {
namespace {

absl::Status OpenSslFailed(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", OpenSslErrorText("no details")));
}

bool AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX context;
  X509V3_set_ctx_nodb(&context);
  X509V3_set_ctx(&context, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &context, nid, value.c_str());
  if (ext == nullptr) return false;
  const bool added = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return added;
}

// A certificate for `key`, common name `cn`, issued by (issuer, issuer_key); self-signed when
// issuer is null.
X509* MakeCertificate(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                      long serial, const std::vector<std::string>& extensions_by_nid_value,
                      const std::vector<int>& nids) {
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 24 * 3600);
  X509_set_pubkey(cert, key);
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert, issuer == nullptr ? name : X509_get_subject_name(issuer));
  for (size_t i = 0; i < nids.size(); ++i) {
    if (!AddExtension(cert, issuer == nullptr ? cert : issuer, nids[i],
                      extensions_by_nid_value[i])) {
      X509_free(cert);
      return nullptr;
    }
  }
  if (X509_sign(cert, issuer_key == nullptr ? key : issuer_key, EVP_sha256()) == 0) {
    X509_free(cert);
    return nullptr;
  }
  return cert;
}

absl::Status WritePem(const std::string& path, X509* cert, EVP_PKEY* key) {
  std::FILE* out = std::fopen(path.c_str(), "w");
  if (out == nullptr) return absl::InternalError(absl::StrCat("cannot write ", path));
  const bool ok = cert != nullptr
                      ? PEM_write_X509(out, cert) == 1
                      : PEM_write_PrivateKey(out, key, nullptr, nullptr, 0, nullptr, nullptr) == 1;
  std::fclose(out);
  if (!ok) return OpenSslFailed(absl::StrCat("PEM to ", path));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<TestCa>> TestCa::Create(const std::string& dir,
                                                       const std::string& name) {
  std::unique_ptr<TestCa> ca(new TestCa());
  ca->dir_ = dir;
  if (dir.empty()) {
    char tmpl[] = "/tmp/tessera-test-ca-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp in /tmp failed");
    ca->dir_ = tmpl;
    ca->own_dir_ = true;
  }
  EVP_PKEY* key = EVP_EC_gen("P-256");
  if (key == nullptr) return OpenSslFailed("EC key");
  ca->key_ = key;
  X509* cert = MakeCertificate(key, name, nullptr, nullptr, 1,
                               {"critical,CA:TRUE", "critical,keyCertSign,cRLSign", "hash"},
                               {NID_basic_constraints, NID_key_usage, NID_subject_key_identifier});
  if (cert == nullptr) return OpenSslFailed("CA certificate");
  ca->cert_ = cert;
  ca->ca_file_ = absl::StrCat(ca->dir_, "/", name, ".crt");
  if (absl::Status s = WritePem(ca->ca_file_, cert, nullptr); !s.ok()) return s;
  return ca;
}

TestCa::~TestCa() {
  X509_free(static_cast<X509*>(cert_));
  EVP_PKEY_free(static_cast<EVP_PKEY*>(key_));
  if (own_dir_) std::filesystem::remove_all(dir_);
}

absl::StatusOr<ClusterTlsFiles> TestCa::Issue(const std::string& name,
                                              const std::vector<std::string>& node_ids) {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  if (key == nullptr) return OpenSslFailed("EC key");
  std::vector<std::string> sans = {absl::StrCat("DNS:", name)};
  for (const std::string& id : node_ids) sans.push_back(absl::StrCat("URI:", NodeUri(id)));
  X509* cert =
      MakeCertificate(key, name, static_cast<X509*>(cert_), static_cast<EVP_PKEY*>(key_), ++serial_,
                      {absl::StrJoin(sans, ","), "serverAuth,clientAuth", "CA:FALSE"},
                      {NID_subject_alt_name, NID_ext_key_usage, NID_basic_constraints});
  if (cert == nullptr) {
    EVP_PKEY_free(key);
    return OpenSslFailed("certificate");
  }
  ClusterTlsFiles files;
  files.cert_file = absl::StrCat(dir_, "/", name, ".crt");
  files.key_file = absl::StrCat(dir_, "/", name, ".key");
  files.ca_file = ca_file_;
  absl::Status status = WritePem(files.cert_file, cert, nullptr);
  if (status.ok()) status = WritePem(files.key_file, nullptr, key);
  X509_free(cert);
  EVP_PKEY_free(key);
  if (!status.ok()) return status;
  return files;
}

}  // namespace tessera
