// Encryption of the raw TCP data path (proto/peer.proto, "Raw TCP data path", version 2), used
// when the peer port runs mutual TLS: after the handshake every byte of a connection, frames and
// chunk headers and fragment bytes alike, travels in AES-256-GCM records.
//
// Keys. A daemon's data path server holds a random 32-byte secret, new with every start. Through
// OpenDataPath (over mutual TLS) it hands node N the session key
//     K_N = HMAC-SHA256(secret, "tessera data path v2 session key" 0x00 N)
// where N is the node its certificate names, so that a key opens connections for its own node
// only. Each connection then derives one key per direction with HKDF-SHA256 (RFC 5869):
//     PRK = HKDF-Extract(salt = client_nonce || server_nonce, IKM = K_N)
//     key = HKDF-Expand(PRK, "tessera data path v2 client->server" (or "server->client")
//                       0x00 N, 32)
// from 32 random bytes of each side's hello, so that no two connections (nor a replayed one)
// share a key.
//
// Records. Each direction is a sequence of records:
//     u32 length L (1..kMaxRecordBytes, little-endian) | L bytes of ciphertext | 16-byte tag
// sealed with the direction's key under the 96-bit nonce 0^32 || u64 sequence number
// (little-endian), the record's place in its direction (0, 1, 2, ...), and with the 4-byte length
// as additional authenticated data. The sequence number is never sent: a receiver opens record i
// under nonce i only, so a record altered, dropped, replayed or moved (within a connection or
// from another one) does not authenticate (kDataLoss), and no nonce is used twice with a key.
// A direction seals at most kMaxRecordsPerDirection records; past that the connection must be
// replaced (it never is in practice: a connection lives minutes).
//
// Libraries. AES-256-GCM is deterministic, so a record is the same bytes whichever library
// sealed it, and the two ends of a connection need not use the same one. OpenSSL runs it
// everywhere; Intel's ipsec-mb (Debian's libipsec-mb, where the build found it) runs it about
// twice as fast on CPUs with VAES and VPCLMULQDQ (Ice Lake and later, Zen 4), where OpenSSL 3.0
// has no code for them. The library is chosen once per process (UseGcmLibrary; the default is
// FastestGcmLibrary()).
//
// Thread-compatible: one RecordSealer / RecordOpener per direction of one connection.
#ifndef TESSERA_DAEMON_TRANSFER_DATA_PATH_CRYPTO_H_
#define TESSERA_DAEMON_TRANSFER_DATA_PATH_CRYPTO_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera {

inline constexpr size_t kDataPathSecretBytes = 32;
inline constexpr size_t kDataPathNonceBytes = 32;  // each hello's random contribution
inline constexpr size_t kRecordHeaderBytes = 4;
inline constexpr size_t kRecordTagBytes = 16;
inline constexpr size_t kMaxRecordBytes = size_t{16} << 20;  // a whole chunk (kMaxChunkBytes)
inline constexpr uint64_t kMaxRecordsPerDirection = uint64_t{1} << 48;

enum class GcmLibrary { kOpenSsl, kIpsecMb };

// Whether `library` runs here: OpenSSL always; ipsec-mb when the build has it and the CPU has
// AES-NI and PCLMULQDQ.
bool GcmLibraryAvailable(GcmLibrary library);
// ipsec-mb where it is available and the CPU has VAES and VPCLMULQDQ with AVX-512 or AVX2 (its
// fast code), else OpenSSL.
GcmLibrary FastestGcmLibrary();
// Seals and opens records with `library` from now on, in the whole process (a record begun goes
// on with the library it began with). kFailedPrecondition when it does not run here.
absl::Status UseGcmLibrary(GcmLibrary library);
GcmLibrary CurrentGcmLibrary();
// "openssl" or "ipsec-mb", as cluster.tls_cipher_library names them; and parsed back, "auto"
// as FastestGcmLibrary() (kInvalidArgument naming the choices).
std::string GcmLibraryId(GcmLibrary library);
absl::StatusOr<GcmLibrary> ParseGcmLibrary(const std::string& id);
// What runs it here, for logs: "Intel ipsec-mb 1.3.0 (AVX-512)", "OpenSSL 3.0.13".
std::string GcmLibraryDescription(GcmLibrary library);

// 32 random bytes from the system's CSPRNG (OpenSSL RAND_bytes). kInternal if it fails.
absl::StatusOr<std::string> RandomSecret(size_t bytes);

// K_N above.
std::string DeriveSessionKey(const std::string& server_secret, const std::string& node_id);

struct ConnectionKeys {
  std::string client_to_server;  // 32 bytes
  std::string server_to_client;  // 32 bytes
};
// The per-direction keys above.
ConnectionKeys DeriveConnectionKeys(const std::string& session_key, const std::string& node_id,
                                    const std::string& client_nonce,
                                    const std::string& server_nonce);

// Seals one direction's records. A record is Begin, then Update over exactly its bytes (in
// any number of pieces), then Finish.
class GcmStream;  // data_path_crypto.cc

class RecordSealer {
 public:
  // `key`: 32 bytes. `what` names the direction in errors ("to 10.0.0.2:7071").
  RecordSealer(const std::string& key, std::string what);
  ~RecordSealer();
  RecordSealer(const RecordSealer&) = delete;
  RecordSealer& operator=(const RecordSealer&) = delete;

  // Starts a record of `size` bytes (1..kMaxRecordBytes) and writes its header. kInvalidArgument
  // for a size out of range, kResourceExhausted past kMaxRecordsPerDirection.
  absl::Status Begin(size_t size, uint8_t header[kRecordHeaderBytes]);
  // Encrypts the record's next `n` bytes from `in` to `out` (which may be `in`).
  void Update(const uint8_t* in, uint8_t* out, size_t n);
  // Ends the record (after exactly `size` bytes) and writes its tag. kInternal if fewer or more
  // bytes were sealed.
  absl::Status Finish(uint8_t tag[kRecordTagBytes]);

  // One whole record: header, ciphertext and tag.
  absl::StatusOr<std::string> Seal(const std::string& plaintext);

  // Reserves the sequence numbers of the next `count` records, to be sealed on other threads
  // (SealRecordAt) and sent in order: the first. kResourceExhausted past
  // kMaxRecordsPerDirection. REQUIRES: no record begun and not finished.
  absl::StatusOr<uint64_t> Reserve(uint64_t count);
  const std::string& key() const { return key_; }

  uint64_t records() const { return sequence_; }

 private:
  std::unique_ptr<GcmStream> gcm_;
  const std::string key_;
  const std::string what_;
  uint64_t sequence_ = 0;
  size_t size_ = 0;
  size_t done_ = 0;
};

// Opens one direction's records, in order.
class RecordOpener {
 public:
  RecordOpener(const std::string& key, std::string what);
  ~RecordOpener();
  RecordOpener(const RecordOpener&) = delete;
  RecordOpener& operator=(const RecordOpener&) = delete;

  // Reads a record's header: its length, or kDataLoss when it is out of range.
  absl::StatusOr<size_t> Begin(const uint8_t header[kRecordHeaderBytes]);
  // Decrypts the record's next `n` bytes in place. They are not to be trusted until Finish.
  void Update(uint8_t* data, size_t n);
  // Checks the tag after exactly the record's bytes: OK, or kDataLoss ("record i ... does not
  // authenticate"). After an error the direction is out of step: the connection must close.
  absl::Status Finish(const uint8_t tag[kRecordTagBytes]);

  // One whole record (as RecordSealer::Seal makes it): its plaintext.
  absl::StatusOr<std::string> Open(const std::string& record);

  // Takes the next record's header for opening on another thread (OpenRecordAt): its length, or
  // kDataLoss as Begin; *sequence is the record's sequence number, and the opener moves past the
  // record as if it had been opened.
  absl::StatusOr<size_t> BeginAt(const uint8_t header[kRecordHeaderBytes], uint64_t* sequence);
  // Record `sequence` of `size` bytes did not authenticate (OpenRecordAt): the error Finish
  // gives, and the direction is out of step from now on.
  absl::Status Failed(uint64_t sequence, size_t size);
  const std::string& key() const { return key_; }

  uint64_t records() const { return sequence_; }

  // Plaintext of a record opened whole (longer than what a read asked for), handed out in
  // order by later reads.
  std::vector<uint8_t>& buffer() { return buffer_; }
  size_t buffer_offset = 0;

 private:
  absl::StatusOr<size_t> CheckHeader(const uint8_t header[kRecordHeaderBytes]);

  std::unique_ptr<GcmStream> gcm_;
  const std::string key_;
  const std::string what_;
  uint64_t sequence_ = 0;
  size_t size_ = 0;
  size_t done_ = 0;
  bool broken_ = false;
  std::vector<uint8_t> buffer_;
};

// One record sealed or opened whole, on any thread (a context per thread), under `key` (32
// bytes) and the nonce of `sequence`, as RecordSealer and RecordOpener would at that place in
// their direction.
// SealRecordAt writes header | ciphertext | tag, n + kRecordHeaderBytes + kRecordTagBytes bytes,
// to `out`. REQUIRES: n in 1..kMaxRecordBytes, `sequence` reserved (RecordSealer::Reserve).
void SealRecordAt(const std::string& key, uint64_t sequence, const uint8_t* in, size_t n,
                  uint8_t* out);
// OpenRecordAt decrypts `n` bytes in place and checks `tag`: true when the record authenticates
// (its bytes are not to be trusted otherwise).
bool OpenRecordAt(const std::string& key, uint64_t sequence, uint8_t* data, size_t n,
                  const uint8_t tag[kRecordTagBytes]);

// Both directions of one connection, from one side's point of view.
struct DataPathCiphers {
  std::string node_id;  // the node whose session key the connection was opened with
  std::unique_ptr<RecordSealer> sealer;
  std::unique_ptr<RecordOpener> opener;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_DATA_PATH_CRYPTO_H_
