#include "daemon/transfer/data_path_crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#ifdef TESSERA_HAVE_IPSEC_MB
#include <intel-ipsec-mb.h>
#endif

#include <atomic>
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

#ifdef TESSERA_HAVE_IPSEC_MB
// ipsec-mb's expanded key and a record's running state (its code wants them aligned).
struct alignas(64) ImbKey {
  gcm_key_data data;
};
struct alignas(64) ImbContext {
  gcm_context_data data;
};

// The process's ipsec-mb manager, or nullptr where it does not run (no AES-NI or PCLMULQDQ, or
// its self-test failed). Its GCM functions keep no state of their own: any thread calls them with
// its own key and context.
IMB_MGR* ImbManager() {
  static IMB_MGR* const manager = []() -> IMB_MGR* {
    IMB_MGR* m = alloc_mb_mgr(0);
    if (m == nullptr) return nullptr;
    IMB_ARCH arch = IMB_ARCH_NONE;
    init_mb_mgr_auto(m, &arch);
    const uint64_t needed = IMB_FEATURE_AESNI | IMB_FEATURE_PCLMULQDQ;
    const bool self_test_failed = (m->features & IMB_FEATURE_SELF_TEST) != 0 &&
                                  (m->features & IMB_FEATURE_SELF_TEST_PASS) == 0;
    if (imb_get_errno(m) != 0 || arch < IMB_ARCH_SSE || (m->features & needed) != needed ||
        self_test_failed) {
      free_mb_mgr(m);
      return nullptr;
    }
    return m;
  }();
  return manager;
}

bool ImbFast() {
  const IMB_MGR* m = ImbManager();
  const uint64_t fast = IMB_FEATURE_VAES | IMB_FEATURE_VPCLMULQDQ;
  return m != nullptr && (m->features & fast) == fast &&
         (m->features & (IMB_FEATURE_AVX2 | IMB_FEATURE_AVX512F)) != 0;
}
#endif

constexpr int kUnchosen = -1;
std::atomic<int> chosen_library{kUnchosen};

}  // namespace

// One record's AES-256-GCM, begun, fed and finished, by the library chosen when it was made.
class GcmStream {
 public:
  GcmStream(const std::string& key, bool seal) : seal_(seal), library_(CurrentGcmLibrary()) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (library_ == GcmLibrary::kIpsecMb) {
      imb_key_ = std::make_unique<ImbKey>();
      imb_context_ = std::make_unique<ImbContext>();
      IMB_AES256_GCM_PRE(ImbManager(), key.data(), &imb_key_->data);
      return;
    }
#endif
    ctx_ = EVP_CIPHER_CTX_new();
    (seal ? EVP_EncryptInit_ex : EVP_DecryptInit_ex)(
        ctx_, EVP_aes_256_gcm(), nullptr, reinterpret_cast<const uint8_t*>(key.data()), nullptr);
  }
  ~GcmStream() {
    if (ctx_ != nullptr) EVP_CIPHER_CTX_free(ctx_);  // which clears the key it held
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      OPENSSL_cleanse(imb_key_.get(), sizeof(ImbKey));
      OPENSSL_cleanse(imb_context_.get(), sizeof(ImbContext));
    }
#endif
  }

  GcmLibrary library() const { return library_; }

  // A whole record: `n` bytes from `in` sealed to `out`, and its tag.
  void Seal(const uint8_t iv[kIvBytes], const uint8_t* aad, size_t aad_bytes, const uint8_t* in,
            size_t n, uint8_t* out, uint8_t tag[kRecordTagBytes]) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      IMB_AES256_GCM_ENC(ImbManager(), &imb_key_->data, &imb_context_->data, out, in, n, iv, aad,
                         aad_bytes, tag, kRecordTagBytes);
      return;
    }
#endif
    Begin(iv, aad, aad_bytes);
    Update(in, out, n);
    FinishSeal(tag);
  }

  // A whole record's `n` bytes opened in place: whether `tag` is the record's.
  bool Open(const uint8_t iv[kIvBytes], const uint8_t* aad, size_t aad_bytes, uint8_t* data,
            size_t n, const uint8_t tag[kRecordTagBytes]) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      uint8_t computed[kRecordTagBytes];
      IMB_AES256_GCM_DEC(ImbManager(), &imb_key_->data, &imb_context_->data, data, data, n, iv, aad,
                         aad_bytes, computed, kRecordTagBytes);
      return CRYPTO_memcmp(computed, tag, kRecordTagBytes) == 0;
    }
#endif
    Begin(iv, aad, aad_bytes);
    Update(data, data, n);
    return FinishOpen(tag);
  }

  void Begin(const uint8_t iv[kIvBytes], const uint8_t* aad, size_t aad_bytes) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      IMB_AES256_GCM_INIT(ImbManager(), &imb_key_->data, &imb_context_->data, iv, aad, aad_bytes);
      return;
    }
#endif
    int len = 0;
    if (seal_) {
      EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv);
      EVP_EncryptUpdate(ctx_, nullptr, &len, aad, static_cast<int>(aad_bytes));
    } else {
      EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv);
      EVP_DecryptUpdate(ctx_, nullptr, &len, aad, static_cast<int>(aad_bytes));
    }
  }

  void Update(const uint8_t* in, uint8_t* out, size_t n) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      if (seal_) {
        IMB_AES256_GCM_ENC_UPDATE(ImbManager(), &imb_key_->data, &imb_context_->data, out, in, n);
      } else {
        IMB_AES256_GCM_DEC_UPDATE(ImbManager(), &imb_key_->data, &imb_context_->data, out, in, n);
      }
      return;
    }
#endif
    int len = 0;
    (seal_ ? EVP_EncryptUpdate : EVP_DecryptUpdate)(ctx_, out, &len, in, static_cast<int>(n));
  }

  // Sealing: the tag.
  void FinishSeal(uint8_t tag[kRecordTagBytes]) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      IMB_AES256_GCM_ENC_FINALIZE(ImbManager(), &imb_key_->data, &imb_context_->data, tag,
                                  kRecordTagBytes);
      return;
    }
#endif
    int len = 0;
    uint8_t none[16];
    EVP_EncryptFinal_ex(ctx_, none, &len);
    EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kRecordTagBytes, tag);
  }

  // Opening: whether `tag` is the record's.
  bool FinishOpen(const uint8_t tag[kRecordTagBytes]) {
#ifdef TESSERA_HAVE_IPSEC_MB
    if (imb_key_ != nullptr) {
      uint8_t computed[kRecordTagBytes];
      IMB_AES256_GCM_DEC_FINALIZE(ImbManager(), &imb_key_->data, &imb_context_->data, computed,
                                  kRecordTagBytes);
      return CRYPTO_memcmp(computed, tag, kRecordTagBytes) == 0;
    }
#endif
    uint8_t expected[kRecordTagBytes];
    std::memcpy(expected, tag, kRecordTagBytes);
    EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kRecordTagBytes, expected);
    int len = 0;
    uint8_t none[16];
    return EVP_DecryptFinal_ex(ctx_, none, &len) > 0;
  }

 private:
  const bool seal_;
  const GcmLibrary library_;
  EVP_CIPHER_CTX* ctx_ = nullptr;
#ifdef TESSERA_HAVE_IPSEC_MB
  std::unique_ptr<ImbKey> imb_key_;
  std::unique_ptr<ImbContext> imb_context_;
#endif
};

namespace {

// This thread's stream for SealRecordAt or OpenRecordAt, set up for the key it served last in
// that direction (a connection's records come in runs), and made again when the key or the
// process's library changes.
GcmStream& ThreadStream(const std::string& key, bool seal) {
  struct Cached {
    std::string key;
    std::unique_ptr<GcmStream> stream;
  };
  thread_local Cached cached[2];
  Cached& c = cached[seal ? 1 : 0];
  if (c.stream == nullptr || c.key != key || c.stream->library() != CurrentGcmLibrary()) {
    c.stream = std::make_unique<GcmStream>(key, seal);
    c.key = key;
  }
  return *c.stream;
}

}  // namespace

bool GcmLibraryAvailable(GcmLibrary library) {
  if (library == GcmLibrary::kOpenSsl) return true;
#ifdef TESSERA_HAVE_IPSEC_MB
  return ImbManager() != nullptr;
#else
  return false;
#endif
}

GcmLibrary FastestGcmLibrary() {
#ifdef TESSERA_HAVE_IPSEC_MB
  if (ImbFast()) return GcmLibrary::kIpsecMb;
#endif
  return GcmLibrary::kOpenSsl;
}

absl::Status UseGcmLibrary(GcmLibrary library) {
  if (!GcmLibraryAvailable(library)) {
    return absl::FailedPreconditionError(
        absl::StrCat("AES-256-GCM by ", GcmLibraryId(library), " does not run here (",
#ifdef TESSERA_HAVE_IPSEC_MB
                     "this CPU lacks AES-NI or PCLMULQDQ, or ipsec-mb's self-test failed",
#else
                      "this build has no ipsec-mb: install libipsec-mb-dev and build again",
#endif
                     "); use 'openssl' or 'auto'"));
  }
  chosen_library.store(static_cast<int>(library), std::memory_order_relaxed);
  return absl::OkStatus();
}

GcmLibrary CurrentGcmLibrary() {
  int chosen = chosen_library.load(std::memory_order_relaxed);
  if (chosen == kUnchosen) {
    int fastest = static_cast<int>(FastestGcmLibrary());
    // The first caller decides; UseGcmLibrary may have been faster.
    chosen = chosen_library.compare_exchange_strong(chosen, fastest) ? fastest : chosen;
  }
  return static_cast<GcmLibrary>(chosen);
}

std::string GcmLibraryId(GcmLibrary library) {
  return library == GcmLibrary::kIpsecMb ? "ipsec-mb" : "openssl";
}

absl::StatusOr<GcmLibrary> ParseGcmLibrary(const std::string& id) {
  if (id == "auto") return FastestGcmLibrary();
  if (id == "openssl") return GcmLibrary::kOpenSsl;
  if (id == "ipsec-mb") return GcmLibrary::kIpsecMb;
  return absl::InvalidArgumentError(absl::StrCat(
      "'", id, "' is not an AES-GCM library: 'auto' (the fastest here), 'openssl' or 'ipsec-mb'"));
}

std::string GcmLibraryDescription(GcmLibrary library) {
  if (library == GcmLibrary::kOpenSsl) return OpenSSL_version(OPENSSL_VERSION);
#ifdef TESSERA_HAVE_IPSEC_MB
  const IMB_MGR* m = ImbManager();
  if (m != nullptr) {
    const char* code =
        ImbFast() ? ((m->features & IMB_FEATURE_AVX512F) != 0 ? "AVX-512, VAES" : "AVX2, VAES")
                  : "AES-NI";
    return absl::StrCat("Intel ipsec-mb ", imb_get_version_str(), " (", code, ")");
  }
#endif
  return "Intel ipsec-mb (not available here)";
}

void SealRecordAt(const std::string& key, uint64_t sequence, const uint8_t* in, size_t n,
                  uint8_t* out) {
  uint8_t iv[kIvBytes];
  NonceOf(sequence, iv);
  PutU32(out, static_cast<uint32_t>(n));
  ThreadStream(key, /*seal=*/true)
      .Seal(iv, out, kRecordHeaderBytes, in, n, out + kRecordHeaderBytes,
            out + kRecordHeaderBytes + n);
}

bool OpenRecordAt(const std::string& key, uint64_t sequence, uint8_t* data, size_t n,
                  const uint8_t tag[kRecordTagBytes]) {
  uint8_t iv[kIvBytes];
  NonceOf(sequence, iv);
  uint8_t header[kRecordHeaderBytes];
  PutU32(header, static_cast<uint32_t>(n));
  return ThreadStream(key, /*seal=*/false).Open(iv, header, kRecordHeaderBytes, data, n, tag);
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
    : gcm_(std::make_unique<GcmStream>(key, /*seal=*/true)), key_(key), what_(std::move(what)) {}

RecordSealer::~RecordSealer() = default;

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
  gcm_->Begin(iv, header, kRecordHeaderBytes);
  size_ = size;
  done_ = 0;
  return absl::OkStatus();
}

void RecordSealer::Update(const uint8_t* in, uint8_t* out, size_t n) {
  gcm_->Update(in, out, n);
  done_ += n;
}

absl::Status RecordSealer::Finish(uint8_t tag[kRecordTagBytes]) {
  if (done_ != size_) {
    return absl::InternalError(absl::StrCat("a data path record of ", size_,
                                            " bytes was sealed "
                                            "with ",
                                            done_));
  }
  gcm_->FinishSeal(tag);
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
    : gcm_(std::make_unique<GcmStream>(key, /*seal=*/false)), key_(key), what_(std::move(what)) {}

RecordOpener::~RecordOpener() = default;

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
  gcm_->Begin(iv, header, kRecordHeaderBytes);
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
  gcm_->Update(data, data, n);
  done_ += n;
}

absl::Status RecordOpener::Finish(const uint8_t tag[kRecordTagBytes]) {
  const bool authentic = done_ == size_ && gcm_->FinishOpen(tag);
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
