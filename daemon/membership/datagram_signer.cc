#include "daemon/membership/datagram_signer.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <cstdio>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/transfer/node_identity.h"

namespace tessera {
namespace {

// Chains verified against the CA are remembered at most this many at once.
constexpr size_t kMaxCachedChains = 1024;

absl::StatusOr<std::vector<X509*>> ReadPemCertificates(const std::string& file) {
  std::FILE* in = std::fopen(file.c_str(), "r");
  if (in == nullptr) return absl::InvalidArgumentError(absl::StrCat(file, " cannot be read"));
  std::vector<X509*> certs;
  while (X509* cert = PEM_read_X509(in, nullptr, nullptr, nullptr)) certs.push_back(cert);
  ERR_clear_error();
  std::fclose(in);
  if (certs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(file, " holds no PEM certificate"));
  }
  return certs;
}

void FreeAll(std::vector<X509*>* certs) {
  for (X509* cert : *certs) X509_free(cert);
  certs->clear();
}

const EVP_MD* DigestFor(EVP_PKEY* key) {
  const int type = EVP_PKEY_get_base_id(key);
  return type == EVP_PKEY_ED25519 || type == EVP_PKEY_ED448 ? nullptr : EVP_sha256();
}

void PutU16(std::string* out, size_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>((v >> 8) & 0xff));
}

}  // namespace

absl::Status Impersonation(const char* what, const std::string& claimed,
                           const std::string& certified) {
  return absl::UnauthenticatedError(
      absl::StrCat(what, " claiming node '", claimed, "' signed with the certificate of node '",
                   certified, "': a daemon speaks only for the node its certificate names"));
}

struct DatagramSigner::Identity {
  std::string node_id;
  std::string chain;  // DER, leaf first
  EVP_PKEY* key = nullptr;
  X509_STORE* cas = nullptr;
  ~Identity() {
    EVP_PKEY_free(key);
    X509_STORE_free(cas);
  }
};

struct DatagramSigner::VerifiedChain {
  std::string node_id;
  EVP_PKEY* key = nullptr;  // the leaf's public key
  absl::Time checked_at;
  ~VerifiedChain() { EVP_PKEY_free(key); }
};

absl::StatusOr<std::unique_ptr<DatagramSigner>> DatagramSigner::Create(const ClusterTlsFiles& files,
                                                                       const std::string& node_id) {
  std::unique_ptr<DatagramSigner> signer(new DatagramSigner(files, node_id));
  TESSERA_RETURN_IF_ERROR(signer->Load());
  signer->expected_node_id_ = signer->node_id();
  return signer;
}

DatagramSigner::~DatagramSigner() = default;

absl::Status DatagramSigner::Load() {
  auto identity = std::make_shared<Identity>();
  TESSERA_ASSIGN_OR_RETURN(std::vector<X509*> own, ReadPemCertificates(files_.cert_file));
  absl::Status status = [&]() -> absl::Status {
    absl::StatusOr<std::string> node = NodeIdOfCertificate(own[0]);
    if (!node.ok() || node->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          files_.cert_file, ": ",
          node.ok() ? absl::StrCat("names no node (subjectAltName URI ", kNodeUriScheme,
                                   "<node id>): membership datagrams cannot be signed with it")
                    : std::string(node.status().message())));
    }
    if (!expected_node_id_.empty() && *node != expected_node_id_) {
      return absl::InvalidArgumentError(
          absl::StrCat(files_.cert_file, " names node '", *node, "', not this daemon's node '",
                       expected_node_id_, "': datagrams cannot be signed for another node"));
    }
    identity->node_id = *node;
    for (X509* cert : own) {
      unsigned char* der = nullptr;
      const int n = i2d_X509(cert, &der);
      if (n <= 0) return absl::InternalError(absl::StrCat("DER of ", files_.cert_file));
      identity->chain.append(reinterpret_cast<const char*>(der), static_cast<size_t>(n));
      OPENSSL_free(der);
    }
    if (identity->chain.size() > 0xffff) {
      return absl::InvalidArgumentError(
          absl::StrCat(files_.cert_file, ": a certificate chain of ", identity->chain.size(),
                       " bytes (DER) does not fit a membership datagram's 65535"));
    }
    std::FILE* in = std::fopen(files_.key_file.c_str(), "r");
    if (in == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(files_.key_file, " cannot be read"));
    }
    identity->key = PEM_read_PrivateKey(in, nullptr, nullptr, nullptr);
    std::fclose(in);
    if (identity->key == nullptr || X509_check_private_key(own[0], identity->key) != 1) {
      return absl::InvalidArgumentError(absl::StrCat(files_.key_file, " is not the key of ",
                                                     files_.cert_file, " (",
                                                     OpenSslErrorText("no details"), ")"));
    }
    return absl::OkStatus();
  }();
  FreeAll(&own);
  TESSERA_RETURN_IF_ERROR(status);
  TESSERA_ASSIGN_OR_RETURN(std::vector<X509*> cas, ReadPemCertificates(files_.ca_file));
  identity->cas = X509_STORE_new();
  for (X509* ca : cas) X509_STORE_add_cert(identity->cas, ca);
  FreeAll(&cas);
  absl::MutexLock lock(&mu_);
  identity_ = std::move(identity);
  loaded_at_ = absl::Now();
  ++generation_;
  chains_.clear();
  refused_.clear();
  return absl::OkStatus();
}

void DatagramSigner::MaybeReload() {
  {
    absl::MutexLock lock(&mu_);
    if (absl::Now() - loaded_at_ < absl::Seconds(files_.refresh_s)) return;
    loaded_at_ = absl::Now();  // one reader at a time; the others go on with what is held
  }
  if (absl::Status s = Load(); !s.ok()) {
    Logger("membership")
        ->warn(
            "reading the certificates again for membership datagrams: {}; "
            "the ones read before stay in use",
            s.ToString());
  }
}

std::shared_ptr<const DatagramSigner::Identity> DatagramSigner::Current() {
  absl::MutexLock lock(&mu_);
  return identity_;
}

std::string DatagramSigner::node_id() const {
  absl::MutexLock lock(&mu_);
  return identity_->node_id;
}

uint64_t DatagramSigner::generation() {
  MaybeReload();
  absl::MutexLock lock(&mu_);
  return generation_;
}

absl::Status DatagramSigner::Sign(std::string* datagram) {
  MaybeReload();
  const std::shared_ptr<const Identity> identity = Current();
  PutU16(datagram, identity->chain.size());
  datagram->append(identity->chain);
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  size_t size = 0;
  bool ok =
      EVP_DigestSignInit(context, nullptr, DigestFor(identity->key), nullptr, identity->key) == 1 &&
      EVP_DigestSign(context, nullptr, &size, reinterpret_cast<const uint8_t*>(datagram->data()),
                     datagram->size()) == 1;
  std::string signature(size, '\0');
  ok = ok &&
       EVP_DigestSign(context, reinterpret_cast<uint8_t*>(signature.data()), &size,
                      reinterpret_cast<const uint8_t*>(datagram->data()), datagram->size()) == 1;
  EVP_MD_CTX_free(context);
  if (!ok)
    return absl::InternalError(
        absl::StrCat("signing a datagram: ", OpenSslErrorText("no details")));
  signature.resize(size);
  PutU16(datagram, signature.size());
  datagram->append(signature);
  absl::MutexLock lock(&mu_);
  ++stats_.signed_datagrams;
  return absl::OkStatus();
}

uint64_t DatagramSigner::NextSequence() { return next_sequence_.fetch_add(1); }

absl::StatusOr<std::string> DatagramSigner::Verify(
    const uint8_t* data, size_t block, size_t end, const std::string& claimed_node,
    const char* what,
    const std::function<absl::Status(const std::string& node)>& before_signature) {
  auto u16 = [&](size_t at) { return static_cast<size_t>(data[at] | (data[at + 1] << 8)); };
  if (end < block + 2 || end - block - 2 < u16(block)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": its identity block is cut short (chain)"));
  }
  const size_t chain_bytes = u16(block);
  const uint8_t* chain = data + block + 2;
  const size_t signed_end = block + 2 + chain_bytes;
  if (end < signed_end + 2 || end - signed_end - 2 != u16(signed_end) || chain_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": its identity block is malformed (signature)"));
  }
  const uint8_t* signature = data + signed_end + 2;
  const size_t signature_bytes = u16(signed_end);

  MaybeReload();
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(chain, chain_bytes, digest);
  const std::string id(reinterpret_cast<const char*>(digest), sizeof(digest));
  std::shared_ptr<const VerifiedChain> verified;
  {
    absl::MutexLock lock(&mu_);
    auto it = chains_.find(id);
    if (it != chains_.end() &&
        absl::Now() - it->second->checked_at < absl::Seconds(files_.refresh_s)) {
      verified = it->second;
    }
    // A chain refused lately is refused again without a second check (a flood of one forged
    // chain costs one check per refresh period).
    auto refused = refused_.find(id);
    if (verified == nullptr && refused != refused_.end() &&
        absl::Now() - refused->second.second < absl::Seconds(files_.refresh_s)) {
      return refused->second.first;
    }
  }
  if (verified == nullptr) {
    // Not seen lately: the chain, against the CA, now.
    std::vector<X509*> certs;
    const uint8_t* p = chain;
    const uint8_t* const chain_end = chain + chain_bytes;
    while (p < chain_end) {
      X509* cert = d2i_X509(nullptr, &p, static_cast<long>(chain_end - p));
      if (cert == nullptr) break;
      certs.push_back(cert);
    }
    ERR_clear_error();
    const std::shared_ptr<const Identity> identity = Current();
    absl::Status status = [&]() -> absl::Status {
      if (certs.empty() || p != chain_end) {
        return absl::UnauthenticatedError(absl::StrCat(what, ": its certificate chain is not DER"));
      }
      STACK_OF(X509)* untrusted = sk_X509_new_null();
      for (size_t i = 1; i < certs.size(); ++i) sk_X509_push(untrusted, certs[i]);
      X509_STORE_CTX* context = X509_STORE_CTX_new();
      X509_STORE_CTX_init(context, identity->cas, certs[0], untrusted);
      const bool trusted = X509_verify_cert(context) == 1;
      const int error = X509_STORE_CTX_get_error(context);
      X509_STORE_CTX_free(context);
      sk_X509_free(untrusted);
      ERR_clear_error();
      if (!trusted) {
        return absl::UnauthenticatedError(
            absl::StrCat(what, ": its certificate does not verify against the CA (",
                         X509_verify_cert_error_string(error), ")"));
      }
      absl::StatusOr<std::string> node = NodeIdOfCertificate(certs[0]);
      if (!node.ok() || node->empty()) {
        return absl::UnauthenticatedError(
            absl::StrCat(what,
                         ": its certificate names no node (one node, as subjectAltName URI "
                         "tessera-node:<node id>)"));
      }
      auto fresh = std::make_shared<VerifiedChain>();
      fresh->node_id = *node;
      fresh->key = X509_get_pubkey(certs[0]);
      fresh->checked_at = absl::Now();
      verified = std::move(fresh);
      return absl::OkStatus();
    }();
    FreeAll(&certs);
    absl::MutexLock lock(&mu_);
    ++stats_.chains_checked;
    if (!status.ok()) {
      ++stats_.chains_refused;
      if (refused_.size() >= kMaxCachedChains) refused_.clear();
      refused_[id] = {status, absl::Now()};
      return status;
    }
    if (chains_.size() >= kMaxCachedChains) chains_.clear();
    chains_[id] = verified;
  }
  // Cheap checks first: a datagram that speaks for another node than its certificate's is
  // refused before the signature costs anything.
  if (!claimed_node.empty() && claimed_node != verified->node_id) {
    return Impersonation(what, claimed_node, verified->node_id);
  }
  if (before_signature) TESSERA_RETURN_IF_ERROR(before_signature(verified->node_id));
  {
    absl::MutexLock lock(&mu_);
    ++stats_.signatures_checked;
  }
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  const bool authentic =
      EVP_DigestVerifyInit(context, nullptr, DigestFor(verified->key), nullptr, verified->key) ==
          1 &&
      EVP_DigestVerify(context, signature, signature_bytes, data, signed_end) == 1;
  EVP_MD_CTX_free(context);
  ERR_clear_error();
  if (!authentic) {
    return absl::UnauthenticatedError(absl::StrCat(
        what, ": its signature does not verify with the key of node '", verified->node_id,
        "''s certificate (altered on the way, or signed with another key)"));
  }
  absl::MutexLock lock(&mu_);
  ++stats_.verified_datagrams;
  return verified->node_id;
}

DatagramSigner::Stats DatagramSigner::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tessera
