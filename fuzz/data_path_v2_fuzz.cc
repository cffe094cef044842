// The raw TCP data path's version 2 (encrypted, with mutual TLS:
// daemon/transfer/data_path_crypto.h) as a hostile peer speaks it, both ways: the handshake
// (hello, challenge, sealed proof) and the records, then the frames and chunks inside them.
//
// Server: a DataPathServer with encrypt = true over a FragmentStore listens on loopback. An input
//   [flags u8][node piece][client nonce: 32 bytes][record bytes u16][tamper at u16][mask u8]
//   [stream: the grammar of fuzz/data_path_stream.h]
// is one connection: a hello (version 2, the node, "n1" when the piece is empty, and the nonce;
// flags bit 1: the node piece as the whole hello frame instead), the server's challenge read, then
// the proof (the hello again, sealed; bit 3: naming another node) and the stream, sealed in
// records of 1 + (record bytes % 16384) plaintext bytes under the connection's keys (bit 2: keys
// from another session key than the server gave the node); bit 4: byte `tamper at` of the sealed
// bytes flipped by `mask` (1 when 0). Invariants: a valid hello is challenged with a 32-byte
// nonce; with the right key and an intact proof the key check passes; with another key it is
// refused (PERMISSION_DENIED), with a proof naming another node too (INVALID_ARGUMENT), and an
// altered proof is refused as well, each answered in clear with nothing after it; everything the
// server sends after a passed key check is whole records that open under the server-to-client key
// in sequence (it never answers in clear); a connection that fails its key check stores nothing;
// the server closes the connection within the time allowed; each sealed fragment still matches its
// CRC32C and no connection stays open.
//
// Client (flags bit 0): DataPathClient, version 2, against a fake peer that challenges it, reads
// its sealed proof, and answers: [op u8][begin u16][end u16][key check code u8][record bytes u16]
// [in clear u8][stream]: the key check's answer (code % 17), then the stream sealed under the
// connection's server-to-client key (or sent as it is when `in clear` is odd), while what the
// client sends is read and dropped. A GetRange, PutRange or Seal. Invariants: the call returns
// within its deadline; a GetRange that succeeds read a range inside the fragment and the
// caller's buffer, and the CRC32C it returns is that of the bytes it wrote; no call succeeds on
// answers sent in clear after the key check, or on a refused key check.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "daemon/transfer/data_path.h"
#include "daemon/transfer/data_path_crypto.h"
#include "daemon/transfer/data_path_wire.h"
#include "ec/erasure_codec.h"
#include "fuzz/data_path_stream.h"
#include "fuzz/fuzz_util.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

using data_path_wire::GetU32;
using data_path_wire::kMaxFrameBytes;
using fuzz::kConnectionLimit;

constexpr size_t kClientBufferBytes = size_t{1} << 20;
constexpr size_t kMaxRecordPlaintext = 16384;
constexpr char kJob[] = "job-dp2";
constexpr char kNode[] = "n1";
// The session key the fake peer of the client mode gave its client.
const std::string kFakeSessionKey(32, 'K');

enum Flags : uint8_t {
  kClientMode = fuzz::kClientModeFlag,
  kRawHello = 1 << 1,
  kWrongKey = 1 << 2,
  kProofOfAnotherNode = 1 << 3,
  kTamper = 1 << 4,
};

// `plaintext` sealed in records of at most `record_bytes` each.
std::string Seal(RecordSealer* sealer, const std::string& plaintext, size_t record_bytes) {
  std::string out;
  for (size_t at = 0; at < plaintext.size(); at += record_bytes) {
    auto record = sealer->Seal(plaintext.substr(at, record_bytes));
    if (!record.ok()) fuzz::Fail("sealing a record: " + record.status().ToString());
    out += *record;
  }
  return out;
}

// Takes a whole frame holding a DataPathResponse from `bytes` at *at. false when there is none.
bool TakeResponse(const std::string& bytes, size_t* at, peer::DataPathResponse* response) {
  if (bytes.size() - *at < 4) return false;
  const uint32_t size = GetU32(reinterpret_cast<const uint8_t*>(bytes.data() + *at));
  FUZZ_CHECK(size <= kMaxFrameBytes, "the server's plain frames have a valid length");
  if (bytes.size() - *at - 4 < size) return false;
  FUZZ_CHECK(response->ParseFromArray(bytes.data() + *at + 4, static_cast<int>(size)),
             "the server's plain frames are DataPathResponses");
  *at += 4 + size;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Client mode: the fake peer

// What the fake peer answers its next connection with.
struct Script {
  int32_t check_code = 0;
  size_t record_bytes = kMaxRecordPlaintext;
  bool in_clear = false;
  std::string stream;
};

// The fake version 2 peer of the client mode: for each connection, reads the hello, challenges
// it, reads the sealed proof (one record), answers the key check in clear, then sends the
// script's stream sealed under the connection's server-to-client key (or in clear) and closes
// its side, reading and dropping whatever the client sends until it closes.
class FakePeer {
 public:
  FakePeer() {
    listen_fd_ = fuzz::ListenLoopback(&port_);
    std::thread([this] { Loop(); }).detach();
  }
  uint16_t port() const { return port_; }
  void SetScript(Script script) {
    std::lock_guard<std::mutex> lock(mu_);
    script_ = std::move(script);
  }

 private:
  // Reads exactly `n` bytes into *out before `until`. false when the client closed or the time
  // is up.
  static bool ReadExactly(int fd, size_t n, std::string* out, absl::Time until) {
    out->clear();
    char scratch[65536];
    while (out->size() < n && absl::Now() < until) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t got = ::recv(fd, scratch, std::min(sizeof(scratch), n - out->size()), 0);
      if (got <= 0) return false;
      out->append(scratch, static_cast<size_t>(got));
    }
    return out->size() == n;
  }

  static void SendAll(int fd, const std::string& bytes, absl::Time until) {
    size_t sent = 0;
    while (sent < bytes.size() && absl::Now() < until) {
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return;
      sent += static_cast<size_t>(n);
    }
  }

  void Serve(int fd, const Script& script) {
    const absl::Time until = absl::Now() + kConnectionLimit;
    std::string bytes;
    if (!ReadExactly(fd, 4, &bytes, until)) return;
    const uint32_t hello_size = GetU32(reinterpret_cast<const uint8_t*>(bytes.data()));
    peer::DataPathHello hello;
    if (hello_size > kMaxFrameBytes || !ReadExactly(fd, hello_size, &bytes, until) ||
        !hello.ParseFromString(bytes)) {
      return;
    }
    const std::string server_nonce(kDataPathNonceBytes, 's');
    peer::DataPathResponse challenge;
    challenge.set_server_nonce(server_nonce);
    SendAll(fd, fuzz::Frame(challenge.SerializeAsString()), until);
    // The proof: one record.
    if (!ReadExactly(fd, kRecordHeaderBytes, &bytes, until)) return;
    const uint32_t proof_size = GetU32(reinterpret_cast<const uint8_t*>(bytes.data()));
    if (proof_size > kMaxRecordBytes ||
        !ReadExactly(fd, proof_size + kRecordTagBytes, &bytes, until)) {
      return;
    }
    peer::DataPathResponse check;
    check.set_code(script.check_code);
    if (script.check_code != 0) check.set_message("refused by the fake peer");
    std::string answer = fuzz::Frame(check.SerializeAsString());
    if (script.in_clear) {
      answer += script.stream;
    } else {
      const ConnectionKeys keys = DeriveConnectionKeys(kFakeSessionKey, hello.node_id(),
                                                       hello.client_nonce(), server_nonce);
      RecordSealer sealer(keys.server_to_client, "to the client");
      answer += Seal(&sealer, script.stream, script.record_bytes);
    }
    SendAll(fd, answer, until);
    ::shutdown(fd, SHUT_WR);  // nothing more comes: the client must not wait for it
    // Drop what the client sends until it closes (or the time is up).
    while (absl::Now() < until && ReadExactly(fd, 1, &bytes, until)) {
    }
  }

  void Loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      Script script;
      {
        std::lock_guard<std::mutex> lock(mu_);
        script = script_;
      }
      Serve(fd, script);
      ::close(fd);
    }
  }

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::mutex mu_;
  Script script_;
};

struct State {
  std::unique_ptr<fuzz::DataPathHost> host;
  std::unique_ptr<FakePeer> fake_peer;
};
State* state = nullptr;

// ---------------------------------------------------------------------------------------------
// Server mode

void RunServer(uint8_t flags, fuzz::Input* in) {
  DataPathServer& server = *state->host->server;
  std::string node = in->Piece();
  const std::string client_nonce = in->Bytes(kDataPathNonceBytes);
  const size_t record_bytes = 1 + in->U16() % kMaxRecordPlaintext;
  const size_t tamper_at = in->U16();
  const uint8_t mask = in->U8();
  const std::string stream = fuzz::StreamOf(in);

  peer::DataPathHello hello;
  std::string hello_frame;
  if (flags & kRawHello) {
    hello_frame = fuzz::Frame(node);
    (void)hello.ParseFromString(node);  // what the server reads, should it be a valid hello
  } else {
    if (node.empty()) node = kNode;
    hello.set_version(kDataPathVersionEncrypted);
    hello.set_node_id(node);
    hello.set_client_nonce(client_nonce);
    hello_frame = fuzz::Frame(hello.SerializeAsString());
  }
  // node_id is a proto3 string: one that is not UTF-8 does not parse on the other side.
  peer::DataPathHello parsed;
  const bool valid_hello = !(flags & kRawHello) && node.size() <= 256 &&
                           client_nonce.size() == kDataPathNonceBytes &&
                           parsed.ParseFromString(hello.SerializeAsString());
  const uint64_t refused_before = server.stats().connections_refused;

  fuzz::LoopbackConnection connection(server.port());
  connection.Send(hello_frame);
  size_t at = 0;
  peer::DataPathResponse challenge;
  while (!TakeResponse(connection.received(), &at, &challenge)) {
    if (!connection.ReceiveAtLeast(connection.received().size() + 1)) break;
  }
  const bool challenged =
      at > 0 && challenge.code() == 0 && challenge.server_nonce().size() == kDataPathNonceBytes;
  if (valid_hello) FUZZ_CHECK(challenged, "a valid version 2 hello is challenged");
  if (!challenged) {
    connection.Send(stream);
    connection.Finish();
    FUZZ_CHECK(server.stats().connections_refused > refused_before,
               "a connection not challenged is counted as refused");
    FUZZ_CHECK(state->host->fragments->List("").empty(), "a refused connection stores nothing");
    state->host->CheckAndReset();
    return;
  }

  // The client's side of the keys: the node's session key (or another), the two nonces.
  const std::string& named = hello.node_id();
  const std::string session_key = (flags & kWrongKey)
                                      ? DeriveSessionKey(std::string(32, 'x'), named)
                                      : server.SessionKeyFor(named);
  const ConnectionKeys keys =
      DeriveConnectionKeys(session_key, named, hello.client_nonce(), challenge.server_nonce());
  RecordSealer sealer(keys.client_to_server, "to the server");
  peer::DataPathHello proof;
  proof.set_version(kDataPathVersionEncrypted);
  proof.set_node_id((flags & kProofOfAnotherNode) ? named + "-other" : named);
  const std::string proof_frame = fuzz::Frame(proof.SerializeAsString());
  // The proof alone in its records, so that the ones it took are known.
  std::string sealed = Seal(&sealer, proof_frame, record_bytes);
  const size_t proof_records_bytes = sealed.size();
  sealed += Seal(&sealer, stream, record_bytes);
  const bool tampered = (flags & kTamper) && tamper_at < sealed.size();
  if (tampered) sealed[tamper_at] = static_cast<char>(sealed[tamper_at] ^ (mask == 0 ? 1 : mask));
  connection.Send(sealed);
  connection.Finish();

  const std::string& received = connection.received();
  peer::DataPathResponse check;
  FUZZ_CHECK(TakeResponse(received, &at, &check), "the key check is answered");
  const bool proof_altered = tampered && tamper_at < proof_records_bytes;
  if (proof_altered) {
    // Refused, how depends on the byte: a record that does not open, or one whose altered length
    // waits for bytes that never come.
    FUZZ_CHECK(check.code() != 0, "an altered proof is refused");
  } else if (flags & kWrongKey) {
    FUZZ_CHECK(check.code() == static_cast<int>(absl::StatusCode::kPermissionDenied),
               "a proof sealed with another key is refused");
  } else if (flags & kProofOfAnotherNode) {
    FUZZ_CHECK(check.code() == static_cast<int>(absl::StatusCode::kInvalidArgument),
               "a proof naming another node than the hello is refused");
  } else {
    FUZZ_CHECK(check.code() == 0, "a key check with the node's key passes");
  }
  if (check.code() != 0) {
    FUZZ_CHECK(at == received.size(), "nothing follows a refused key check");
    FUZZ_CHECK(state->host->fragments->List("").empty(),
               "a connection that failed its key check stores nothing");
  } else {
    // Everything after it: whole records, each opening under the server-to-client key.
    RecordOpener opener(keys.server_to_client, "from the server");
    while (at < received.size()) {
      FUZZ_CHECK(received.size() - at >= kRecordHeaderBytes, "the server sends whole records");
      const uint32_t size = GetU32(reinterpret_cast<const uint8_t*>(received.data() + at));
      const size_t whole = kRecordHeaderBytes + size + kRecordTagBytes;
      FUZZ_CHECK(size >= 1 && size <= kMaxRecordBytes && received.size() - at >= whole,
                 "the server sends whole records");
      auto opened = opener.Open(received.substr(at, whole));
      FUZZ_CHECK(opened.ok(), "every record the server sends opens: " + opened.status().ToString());
      at += whole;
    }
  }
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "server: hello %s, key check %d, %zu bytes sealed%s, %zu received\n",
                 valid_hello ? "valid" : "invalid", check.code(), sealed.size(),
                 tampered ? " (one altered)" : "", received.size());
  }
  state->host->CheckAndReset();
}

// ---------------------------------------------------------------------------------------------
// Client mode, continued

void RunClient(fuzz::Input* in) {
  const uint8_t op = in->U8();
  const uint64_t begin = in->U16();
  const uint64_t end = in->U16();
  Script script;
  script.check_code = in->U8() % 17;
  script.record_bytes = 1 + in->U16() % kMaxRecordPlaintext;
  script.in_clear = (in->U8() & 1) != 0;
  script.stream = fuzz::StreamOf(in);
  state->fake_peer->SetScript(script);

  DataPathClient::Options options;
  options.self_node_id = kNode;
  DataPathClient client(options);
  const DataPathClient::Endpoint endpoint{"127.0.0.1", state->fake_peer->port(), kFakeSessionKey,
                                          kDataPathVersionEncrypted};
  const FragmentKey key{kJob, 1, 2, 0};
  const FragmentMeta meta{7, 2, 1, ErasureCodec::FragmentBytes(4096, 2), 4096, 0};
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  const absl::Time started = absl::Now();
  // No answer can be believed after a refused key check, or in clear after a passed one.
  const bool believable = script.check_code == 0 && !script.in_clear;
  absl::Status status;
  switch (op % 3) {
    case 0: {
      std::vector<uint8_t> buffer(kClientBufferBytes);
      auto read = client.GetRange("peer", endpoint, key, 7, begin, end, buffer.data(),
                                  buffer.size(), deadline);
      status = read.status();
      if (read.ok()) {
        FUZZ_CHECK(read->begin <= read->end && read->end <= read->meta.fragment_bytes &&
                       read->meta.fragment_bytes <= buffer.size(),
                   "a range read lies in the fragment and the buffer");
        if (read->end > read->begin) {
          FUZZ_CHECK(
              Crc32c(buffer.data() + read->begin, read->end - read->begin) == read->range_crc32c,
              "a range read's CRC32C is that of the bytes written");
        }
      }
      break;
    }
    case 1: {
      std::vector<uint8_t> data(meta.fragment_bytes, 0x42);
      uint32_t crc = 0;
      status = client
                   .PutRange("peer", endpoint, key, meta, data.data(), begin % data.size(),
                             data.size(), deadline, &crc)
                   .status();
      break;
    }
    case 2:
      status = client.Seal("peer", endpoint, key, meta, 0x1234, deadline).status();
      break;
  }
  FUZZ_CHECK(believable || !status.ok(),
             "a call succeeded on answers sent in clear, or after a refused key check");
  FUZZ_CHECK(absl::Now() - started < absl::Seconds(10), "a data path call keeps its deadline");
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "client: op %d, key check %d%s: %s\n", op % 3, script.check_code,
                 script.in_clear ? ", answers in clear" : "", status.ToString().c_str());
  }
}

// ---------------------------------------------------------------------------------------------

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  const fuzz::SampleFragment sample(kJob, kNode);
  // Server: a valid connection that puts, seals and reads back a fragment, in records of 4096
  // bytes; the same with each of the flags; and records of one byte.
  auto server = [&](uint8_t flags, uint16_t record_bytes, uint16_t tamper_at) {
    std::string input(1, static_cast<char>(flags));
    fuzz::PutPiece(&input, kNode);
    input += std::string(kDataPathNonceBytes, 'c');
    fuzz::PutU16(&input, record_bytes - 1);
    fuzz::PutU16(&input, tamper_at);
    fuzz::PutU8(&input, 0x20);
    return input + sample.Stream();
  };
  seeds.push_back(server(0, 4096, 0));
  seeds.push_back(server(0, 1, 0));
  seeds.push_back(server(kWrongKey, 4096, 0));
  seeds.push_back(server(kProofOfAnotherNode, 4096, 0));
  seeds.push_back(server(kTamper, 4096, 10));   // in the proof
  seeds.push_back(server(kTamper, 64, 2000));   // in a chunk
  seeds.push_back(server(kRawHello, 4096, 0));  // a hello that is not one
  // Client: a peer's answers (key check OK, then a response and its chunks), sealed, in clear,
  // and after a refused key check.
  peer::DataPathResponse ok;
  for (uint8_t op : {0, 1, 2}) {
    for (uint8_t variant : {0, 1, 2}) {
      std::string input(1, static_cast<char>(kClientMode));
      fuzz::PutU8(&input, op);
      fuzz::PutU16(&input, 0);
      fuzz::PutU16(&input, 0);
      fuzz::PutU8(&input, variant == 2 ? 7 : 0);  // PERMISSION_DENIED
      fuzz::PutU16(&input, 4095);                 // records of 4096 bytes
      fuzz::PutU8(&input, variant == 1 ? 1 : 0);  // in clear
      fuzz::PutFrameRecord(&input, op == 0 ? sample.range : ok);
      if (op == 0) {
        fuzz::PutChunkRecord(&input, 0, sample.bytes.substr(0, fuzz::SampleFragment::kHalf), false);
        fuzz::PutChunkRecord(&input, fuzz::SampleFragment::kHalf,
                             sample.bytes.substr(fuzz::SampleFragment::kHalf), false);
      }
      seeds.push_back(input);
    }
  }
  return seeds;
}

void Initialize() {
  state = new State;
  state->host = fuzz::DataPathHost::Start("data-path-v2", /*encrypt=*/true);
  state->fake_peer = std::make_unique<FakePeer>();
}

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::fuzz::Setup(tessera::Seeds);
  tessera::Initialize();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tessera::fuzz::RunDataPathInput(data, size, tessera::RunServer, tessera::RunClient);
  return 0;
}
