#include "daemon/transfer/data_path_crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr size_t kIvBytes = 12;

std::string Hmac(const std::string& key, const std::string& data) {
  uint8_t out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const uint8_t*>(data.data()), data.size(), out, &len);
  return std::string(reinterpret_cast<const char*>(out), len);
}

// HKDF-Expand's first block (RFC 5869, L = 32).
std::string HkdfExpand32(const std::string& prk, const std::string& info) {
  return Hmac(prk, info + std::string(1, '\x01'));
}

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void NonceOf(uint64_t sequence, uint8_t iv[kIvBytes]) {
  std::memset(iv, 0, 4);
  for (int i = 0; i < 8; ++i) iv[4 + i] = static_cast<uint8_t>(sequence >> (8 * i));
}

EVP_CIPHER_CTX* Ctx(void* p) { return static_cast<EVP_CIPHER_CTX*>(p); }

// This thread's context for SealRecordAt and OpenRecordAt, set up for the key and direction it
// served last (a connection's records come in runs): a record under them only sets its nonce.
EVP_CIPHER_CTX* ThreadContext(const std::string& key, bool seal, const uint8_t iv[kIvBytes]) {
  struct Context {
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    std::string key;
    bool seal = false;
    ~Context() { EVP_CIPHER_CTX_free(ctx); }
  };
  thread_local Context context;
  const auto* k = reinterpret_cast<const uint8_t*>(key.data());
  if (context.key == key && context.seal == seal) {
    (seal ? EVP_EncryptInit_ex : EVP_DecryptInit_ex)(context.ctx, nullptr, nullptr, nullptr, iv);
  } else {
    (seal ? EVP_EncryptInit_ex : EVP_DecryptInit_ex)(context.ctx, EVP_aes_256_gcm(), nullptr, k,
                                                     iv);
    context.key = key;
    context.seal = seal;
  }
  return context.ctx;
}

}  // namespace

void SealRecordAt(const std::string& key, uint64_t sequence, const uint8_t* in, size_t n,
                  uint8_t* out) {
  uint8_t iv[kIvBytes];
  NonceOf(sequence, iv);
  EVP_CIPHER_CTX* ctx = ThreadContext(key, /*seal=*/true, iv);
  PutU32(out, static_cast<uint32_t>(n));
  int len = 0;
  EVP_EncryptUpdate(ctx, nullptr, &len, out, kRecordHeaderBytes);
  EVP_EncryptUpdate(ctx, out + kRecordHeaderBytes, &len, in, static_cast<int>(n));
  uint8_t none[16];
  EVP_EncryptFinal_ex(ctx, none, &len);
  EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, kRecordTagBytes, out + kRecordHeaderBytes + n);
}

bool OpenRecordAt(const std::string& key, uint64_t sequence, uint8_t* data, size_t n,
                  const uint8_t tag[kRecordTagBytes]) {
  uint8_t iv[kIvBytes];
  NonceOf(sequence, iv);
  EVP_CIPHER_CTX* ctx = ThreadContext(key, /*seal=*/false, iv);
  uint8_t header[kRecordHeaderBytes];
  PutU32(header, static_cast<uint32_t>(n));
  int len = 0;
  EVP_DecryptUpdate(ctx, nullptr, &len, header, kRecordHeaderBytes);
  EVP_DecryptUpdate(ctx, data, &len, data, static_cast<int>(n));
  uint8_t expected[kRecordTagBytes];
  std::memcpy(expected, tag, kRecordTagBytes);
  EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, kRecordTagBytes, expected);
  uint8_t none[16];
  return EVP_DecryptFinal_ex(ctx, none, &len) > 0;
}

absl::StatusOr<std::string> RandomSecret(size_t bytes) {
  std::string out(bytes, '\0');
  if (RAND_bytes(reinterpret_cast<uint8_t*>(out.data()), static_cast<int>(bytes)) != 1) {
    return absl::InternalError("the system's random number generator failed (RAND_bytes)");
  }
  return out;
}

std::string DeriveSessionKey(const std::string& server_secret, const std::string& node_id) {
  return Hmac(server_secret,
              absl::StrCat("tessera data path v2 session key", std::string(1, '\0'), node_id));
}

ConnectionKeys DeriveConnectionKeys(const std::string& session_key, const std::string& node_id,
                                    const std::string& client_nonce,
                                    const std::string& server_nonce) {
  const std::string prk = Hmac(client_nonce + server_nonce, session_key);  // HKDF-Extract
  const std::string zero(1, '\0');
  ConnectionKeys keys;
  keys.client_to_server =
      HkdfExpand32(prk, absl::StrCat("tessera data path v2 client->server", zero, node_id));
  keys.server_to_client =
      HkdfExpand32(prk, absl::StrCat("tessera data path v2 server->client", zero, node_id));
  return keys;
}

// ---------------------------------------------------------------------------------------------

RecordSealer::RecordSealer(const std::string& key, std::string what)
    : context_(EVP_CIPHER_CTX_new()), key_(key), what_(std::move(what)) {
  EVP_EncryptInit_ex(Ctx(context_), EVP_aes_256_gcm(), nullptr,
                     reinterpret_cast<const uint8_t*>(key.data()), nullptr);
}

RecordSealer::~RecordSealer() { EVP_CIPHER_CTX_free(Ctx(context_)); }

absl::Status RecordSealer::Begin(size_t size, uint8_t header[kRecordHeaderBytes]) {
  if (size == 0 || size > kMaxRecordBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a data path record of ", size, " bytes; one holds 1..", kMaxRecordBytes));
  }
  if (sequence_ >= kMaxRecordsPerDirection) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the data path connection ", what_, " sealed ", sequence_,
                     " records, the most one key may: open a new connection"));
  }
  uint8_t iv[kIvBytes];
  NonceOf(sequence_, iv);
  PutU32(header, static_cast<uint32_t>(size));
  int len = 0;
  EVP_EncryptInit_ex(Ctx(context_), nullptr, nullptr, nullptr, iv);
  EVP_EncryptUpdate(Ctx(context_), nullptr, &len, header, kRecordHeaderBytes);
  size_ = size;
  done_ = 0;
  return absl::OkStatus();
}

void RecordSealer::Update(const uint8_t* in, uint8_t* out, size_t n) {
  int len = 0;
  EVP_EncryptUpdate(Ctx(context_), out, &len, in, static_cast<int>(n));
  done_ += n;
}

absl::Status RecordSealer::Finish(uint8_t tag[kRecordTagBytes]) {
  if (done_ != size_) {
    return absl::InternalError(absl::StrCat("a data path record of ", size_,
                                            " bytes was sealed "
                                            "with ",
                                            done_));
  }
  int len = 0;
  uint8_t none[16];
  EVP_EncryptFinal_ex(Ctx(context_), none, &len);
  EVP_CIPHER_CTX_ctrl(Ctx(context_), EVP_CTRL_GCM_GET_TAG, kRecordTagBytes, tag);
  ++sequence_;
  size_ = done_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> RecordSealer::Reserve(uint64_t count) {
  if (count > kMaxRecordsPerDirection - sequence_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the data path connection ", what_, " sealed ", sequence_, " records and ",
                     count, " more would pass the most one key may: open a new connection"));
  }
  const uint64_t first = sequence_;
  sequence_ += count;
  return first;
}

absl::StatusOr<std::string> RecordSealer::Seal(const std::string& plaintext) {
  std::string out(kRecordHeaderBytes + plaintext.size() + kRecordTagBytes, '\0');
  auto* p = reinterpret_cast<uint8_t*>(out.data());
  if (absl::Status s = Begin(plaintext.size(), p); !s.ok()) return s;
  Update(reinterpret_cast<const uint8_t*>(plaintext.data()), p + kRecordHeaderBytes,
         plaintext.size());
  if (absl::Status s = Finish(p + kRecordHeaderBytes + plaintext.size()); !s.ok()) return s;
  return out;
}

// ---------------------------------------------------------------------------------------------

RecordOpener::RecordOpener(const std::string& key, std::string what)
    : context_(EVP_CIPHER_CTX_new()), key_(key), what_(std::move(what)) {
  EVP_DecryptInit_ex(Ctx(context_), EVP_aes_256_gcm(), nullptr,
                     reinterpret_cast<const uint8_t*>(key.data()), nullptr);
}

RecordOpener::~RecordOpener() { EVP_CIPHER_CTX_free(Ctx(context_)); }

absl::StatusOr<size_t> RecordOpener::CheckHeader(const uint8_t header[kRecordHeaderBytes]) {
  if (broken_) {
    return absl::DataLossError(absl::StrCat("the data path connection ", what_,
                                            " is out of step after a record that did not "
                                            "authenticate"));
  }
  const size_t size = GetU32(header);
  if (size == 0 || size > kMaxRecordBytes) {
    broken_ = true;
    return absl::DataLossError(absl::StrCat("data path record ", sequence_, " ", what_, " says ",
                                            size, " bytes; a record holds 1..", kMaxRecordBytes,
                                            " (the stream was altered or is not encrypted)"));
  }
  return size;
}

absl::StatusOr<size_t> RecordOpener::Begin(const uint8_t header[kRecordHeaderBytes]) {
  absl::StatusOr<size_t> size = CheckHeader(header);
  if (!size.ok()) return size;
  uint8_t iv[kIvBytes];
  NonceOf(sequence_, iv);
  int len = 0;
  EVP_DecryptInit_ex(Ctx(context_), nullptr, nullptr, nullptr, iv);
  EVP_DecryptUpdate(Ctx(context_), nullptr, &len, header, kRecordHeaderBytes);
  size_ = *size;
  done_ = 0;
  return size;
}

absl::StatusOr<size_t> RecordOpener::BeginAt(const uint8_t header[kRecordHeaderBytes],
                                             uint64_t* sequence) {
  absl::StatusOr<size_t> size = CheckHeader(header);
  if (!size.ok()) return size;
  *sequence = sequence_++;
  return size;
}

absl::Status RecordOpener::Failed(uint64_t sequence, size_t size) {
  broken_ = true;
  return absl::DataLossError(absl::StrCat(
      "data path record ", sequence, " (", size, " bytes) ", what_,
      " does not authenticate: it was altered, replayed, reordered or sealed with another key; "
      "the connection is closed"));
}

void RecordOpener::Update(uint8_t* data, size_t n) {
  int len = 0;
  EVP_DecryptUpdate(Ctx(context_), data, &len, data, static_cast<int>(n));
  done_ += n;
}

absl::Status RecordOpener::Finish(const uint8_t tag[kRecordTagBytes]) {
  uint8_t expected[kRecordTagBytes];
  std::memcpy(expected, tag, kRecordTagBytes);
  EVP_CIPHER_CTX_ctrl(Ctx(context_), EVP_CTRL_GCM_SET_TAG, kRecordTagBytes, expected);
  int len = 0;
  uint8_t none[16];
  const bool authentic = done_ == size_ && EVP_DecryptFinal_ex(Ctx(context_), none, &len) > 0;
  if (!authentic) return Failed(sequence_, size_);
  ++sequence_;
  size_ = done_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<std::string> RecordOpener::Open(const std::string& record) {
  if (record.size() < kRecordHeaderBytes + kRecordTagBytes) {
    return absl::DataLossError(absl::StrCat("a data path record of ", record.size(),
                                            " bytes is shorter than its header and tag"));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(record.data());
  absl::StatusOr<size_t> size = Begin(p);
  if (!size.ok()) return size.status();
  if (*size != record.size() - kRecordHeaderBytes - kRecordTagBytes) {
    broken_ = true;
    return absl::DataLossError(absl::StrCat("data path record ", sequence_, " ", what_, " says ",
                                            *size, " bytes but carries ",
                                            record.size() - kRecordHeaderBytes - kRecordTagBytes));
  }
  std::string plaintext = record.substr(kRecordHeaderBytes, *size);
  Update(reinterpret_cast<uint8_t*>(plaintext.data()), plaintext.size());
  if (absl::Status s = Finish(p + kRecordHeaderBytes + *size); !s.ok()) return s;
  return plaintext;
}

}  // namespace tessera
