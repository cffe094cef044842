// What a hostile member or a forger on the network controls under mutual TLS: membership
// datagrams (UdpHeartbeats' format 3) with their identity block, and the proofs of incarnation
// (incarnation_proof.h) a heartbeat carries, through the code a daemon runs on them:
// ReadIncarnationClaim and VerifyIncarnationProof against the cluster's CA, UdpHeartbeats::Decode
// (the HMAC, then DatagramSigner::Verify, with the receiver's ReplayWindow), and for a request
// that passes, as UdpHeartbeats' receiver hands it on, Cluster::OnHeartbeat: its screening of
// relayed updates
// (IncarnationProofs::Check, then Swim). Replies reach Cluster only through its own probes
// (threads and sockets) and are decoded and checked here but not applied.
//
// Certificates: a CA made in-process (TestCa, as the unit tests do) issuing n0 (the receiver),
// n1, n2, n3, a certificate naming no node, and one naming two; and another CA issuing a second
// "n1". Signatures are made here for each input, so an input describes how to build a datagram,
// not its bytes: who it claims to be, its updates, its proofs (each a claim, a chain, a key and
// changes to its bytes, or raw bytes), which chain and key sign the datagram (DatagramSigner::Sign
// or a signature made here, so that a chain and another's key can be paired), and changes made
// to its bytes afterwards, with the HMAC computed again over them (a member holding the token)
// or not. Raw bytes can stand for a datagram's body or for a proof.
//
// Input: [flags u8: bit 0 a cluster token] then 1 to 3 datagrams (see ReadDatagram), applied in
// order to one receiver (a fresh Cluster of n0, incarnation 150, per input).
//
// Invariants (the oracle is this file's own reading of the formats and the record of what it
// signed with which key):
//   - a proof verifies only if its signed bytes (record and chain) are bytes this input signed
//     with the key of the chain it carries, that chain is of the cluster's CA and names exactly
//     one node, and that node is the claim's; what it returns is that claim. So a valid proof
//     changed anywhere in its signed bytes never verifies (an ECDSA signature may have more than
//     one valid encoding, so only the signed bytes must be unchanged);
//   - a valid proof, unchanged, verifies;
//   - a claim that reads encodes back to the same record (IncarnationRecord);
//   - a datagram decodes only under the same conditions for its signed bytes, returns the node
//     of the key that signed it, a request or reply naming a node names that one, and with a
//     token its HMAC is the token's over its bytes; a valid datagram, unchanged, decodes (each
//     datagram of an input is stamped with a sequence of its own, incarnation 500), and the
//     same bytes again are refused as a replay, with no signature check;
//   - after a request passes, every member the receiver holds (node, incarnation, address) was
//     vouched for in this input: by its own authenticated datagram (its sender's fields, or an
//     update about the sender's own incarnation), or by a valid proof of its own; and the
//     receiver fences itself only on such word of a newer incarnation of n0.
// Plus no crash, leak or undefined behaviour (ASan, UBSan).
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "daemon/membership/cluster.h"
#include "daemon/membership/datagram_signer.h"
#include "daemon/membership/incarnation_proof.h"
#include "daemon/membership/replay_window.h"
#include "daemon/membership/udp_heartbeats.h"
#include "daemon/transfer/peer_service.h"
#include "daemon/transfer/test_certificates.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

constexpr uint64_t kReceiverIncarnation = 150;
constexpr uint64_t kSenderIncarnation = 500;  // in every signed datagram's header
constexpr char kReceiverAddress[] = "10.0.0.0:7070";
constexpr char kToken[] = "fuzz-cluster-token-0123456789";

// Who can sign: a chain (DER, leaf first) and its key, and what a verifier should conclude.
struct Identity {
  std::string name;
  std::string chain;
  EVP_PKEY* key = nullptr;
  std::shared_ptr<DatagramSigner> signer;  // null where DatagramSigner refuses the certificate
  bool trusted = false;                    // of the cluster's CA, naming exactly one node
  std::string node;                        // that node
};

struct Fixture {
  std::unique_ptr<TestCa> ca, rogue;
  std::vector<Identity> ids;
  std::shared_ptr<DatagramSigner> receiver;  // n0's: checks everything received
};
Fixture* fixture = nullptr;

std::string ChainOf(const std::string& pem_file) {
  std::FILE* in = std::fopen(pem_file.c_str(), "r");
  if (in == nullptr) fuzz::Fail("cannot read " + pem_file);
  std::string chain;
  while (X509* cert = PEM_read_X509(in, nullptr, nullptr, nullptr)) {
    unsigned char* der = nullptr;
    const int n = i2d_X509(cert, &der);
    chain.append(reinterpret_cast<const char*>(der), static_cast<size_t>(n));
    OPENSSL_free(der);
    X509_free(cert);
  }
  std::fclose(in);
  return chain;
}

EVP_PKEY* KeyOf(const std::string& pem_file) {
  std::FILE* in = std::fopen(pem_file.c_str(), "r");
  if (in == nullptr) fuzz::Fail("cannot read " + pem_file);
  EVP_PKEY* key = PEM_read_PrivateKey(in, nullptr, nullptr, nullptr);
  std::fclose(in);
  if (key == nullptr) fuzz::Fail("no key in " + pem_file);
  return key;
}

void Init() {
  fixture = new Fixture;
  const std::string dir = fuzz::ScratchDirectory("membership-proof");
  auto ca = TestCa::Create(dir, "cluster-ca");
  auto rogue = TestCa::Create(dir, "rogue-ca");
  if (!ca.ok() || !rogue.ok()) fuzz::Fail("cannot make the test CAs");
  fixture->ca = std::move(*ca);
  fixture->rogue = std::move(*rogue);
  struct Wanted {
    TestCa* ca;
    std::string file;
    std::vector<std::string> nodes;
    bool trusted;
  };
  const std::vector<Wanted> wanted = {
      {fixture->ca.get(), "n0", {"n0"}, true},
      {fixture->ca.get(), "n1", {"n1"}, true},
      {fixture->ca.get(), "n2", {"n2"}, true},
      {fixture->ca.get(), "n3", {"n3"}, true},
      {fixture->rogue.get(), "rogue-n1", {"n1"}, false},
      {fixture->ca.get(), "operator", {}, false},
      {fixture->ca.get(), "two-nodes", {"n1", "n2"}, false},
  };
  for (const Wanted& w : wanted) {
    auto files = w.ca->Issue(w.file, w.nodes);
    if (!files.ok()) fuzz::Fail("cannot issue " + w.file + ": " + files.status().ToString());
    // The receiver trusts only the cluster's CA, whoever signs.
    files->ca_file = fixture->ca->ca_file();
    files->refresh_s = 86400;
    Identity id;
    id.name = w.file;
    id.chain = ChainOf(files->cert_file);
    id.key = KeyOf(files->key_file);
    id.trusted = w.trusted;
    id.node = w.nodes.size() == 1 ? w.nodes[0] : "";
    if (w.nodes.size() == 1) {
      auto signer = DatagramSigner::Create(*files);
      if (!signer.ok()) fuzz::Fail("cannot make the signer of " + w.file);
      id.signer = std::move(*signer);
    }
    fixture->ids.push_back(std::move(id));
  }
  fixture->receiver = fixture->ids[0].signer;
}

// ---------------------------------------------------------------------------------------------
// What this input signed, by signed bytes: the chain and the key used.

struct Signed {
  size_t chain = 0;
  size_t key = 0;
};
// The same bytes can be signed more than once in an input, with several keys: each is kept.
using SignedBytes = std::map<std::string, std::vector<Signed>>;

void PutLe16(std::string* out, size_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>((v >> 8) & 0xff));
}
size_t Le16(const std::string& s, size_t at) {
  return static_cast<uint8_t>(s[at]) | (static_cast<size_t>(static_cast<uint8_t>(s[at + 1])) << 8);
}

// Appends an identity block to `bytes`: `chain`'s certificates and a signature by `key`'s key
// (DatagramSigner::Sign when they are the same identity and `use_signer`), and records it.
void SignWith(std::string* bytes, size_t chain, size_t key, bool use_signer, SignedBytes* made) {
  const Identity& c = fixture->ids[chain];
  const Identity& k = fixture->ids[key];
  if (use_signer && chain == key && c.signer != nullptr) {
    const size_t prefix = bytes->size() + 2 + c.chain.size();
    if (!c.signer->Sign(bytes).ok()) fuzz::Fail("DatagramSigner::Sign failed");
    (*made)[bytes->substr(0, prefix)].push_back(Signed{chain, key});
    return;
  }
  PutLe16(bytes, c.chain.size());
  bytes->append(c.chain);
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  size_t size = 0;
  const auto* data = reinterpret_cast<const uint8_t*>(bytes->data());
  bool ok = EVP_DigestSignInit(context, nullptr, EVP_sha256(), nullptr, k.key) == 1 &&
            EVP_DigestSign(context, nullptr, &size, data, bytes->size()) == 1;
  std::string signature(size, '\0');
  ok = ok && EVP_DigestSign(context, reinterpret_cast<uint8_t*>(signature.data()), &size, data,
                            bytes->size()) == 1;
  EVP_MD_CTX_free(context);
  if (!ok) fuzz::Fail("EVP_DigestSign failed");
  signature.resize(size);
  (*made)[*bytes].push_back(Signed{chain, key});
  PutLe16(bytes, signature.size());
  bytes->append(signature);
}

// The node a valid signature of `signed_bytes` speaks for, or "" when none: what this input
// signed with the key of the chain it carries, that chain of the cluster's CA naming one node.
// (Bytes signed both so and with another key: only the valid signature can verify, since the
// chain's key checks it.)
std::string ValidSigner(const SignedBytes& made, const std::string& signed_bytes) {
  auto it = made.find(signed_bytes);
  if (it == made.end()) return "";
  for (const Signed& s : it->second) {
    const Identity& id = fixture->ids[s.key];
    if (s.chain == s.key && id.trusted) return id.node;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Proofs.

struct Claim {
  std::string node;
  uint64_t incarnation = 0;
  std::string address;
  bool operator<(const Claim& o) const {
    return std::tie(node, incarnation, address) < std::tie(o.node, o.incarnation, o.address);
  }
};

// The record of incarnation_proof.h, written here from its documentation (any lengths).
std::string Record(const Claim& c) {
  std::string out = "TSIP";
  out.push_back(1);
  PutLe16(&out, c.node.size());
  out.append(c.node);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((c.incarnation >> (8 * i)) & 0xff));
  PutLe16(&out, c.address.size());
  out.append(c.address);
  return out;
}

// This file's reading of a proof: its claim (without the limits) and where its signed bytes end;
// false when it is cut short.
bool ReadProof(const std::string& p, Claim* claim, size_t* block, size_t* signed_end) {
  if (p.size() < 7 || p.compare(0, 4, "TSIP") != 0 || p[4] != 1) return false;
  size_t at = 5;
  const size_t n = Le16(p, at);
  at += 2;
  if (p.size() - at < n + 10) return false;
  claim->node = p.substr(at, n);
  at += n;
  claim->incarnation = 0;
  for (int i = 0; i < 8; ++i) {
    claim->incarnation |= static_cast<uint64_t>(static_cast<uint8_t>(p[at + i])) << (8 * i);
  }
  at += 8;
  const size_t a = Le16(p, at);
  at += 2;
  if (p.size() - at < a + 2) return false;
  claim->address = p.substr(at, a);
  at += a;
  *block = at;
  const size_t c = Le16(p, at);
  if (p.size() - at - 2 < c) return false;
  *signed_end = at + 2 + c;
  return true;
}

std::string NodeName(fuzz::Input& in) {
  const uint8_t b = in.U8();
  if (b % 8 < 5) return absl::StrCat("n", b % 8);
  if (b % 8 == 5) return "";
  return in.Piece();
}
uint64_t Incarnation(fuzz::Input& in) {
  const uint8_t b = in.U8();
  if (b & 0x80) return in.U64();
  return 100 + (b & 0x7f);  // around the receiver's 150
}
std::string Address(fuzz::Input& in) {
  const uint8_t b = in.U8();
  if (b == 0xff) return in.Piece();
  return absl::StrCat("10.0.0.", b % 8, ":7070");
}

// Changes to `bytes`: [n u8 % 4] times [offset u16][x u8]: x != 0 xors the byte at offset
// (modulo the size), x == 0 cuts the bytes at offset. Whether anything changed.
bool Mutate(fuzz::Input& in, std::string* bytes) {
  const int n = in.U8() % 4;
  const std::string before = *bytes;
  for (int i = 0; i < n && !bytes->empty(); ++i) {
    const size_t offset = in.U16() % bytes->size();
    const uint8_t x = in.U8();
    if (x != 0) {
      (*bytes)[offset] = static_cast<char>((*bytes)[offset] ^ x);
    } else {
      bytes->resize(offset);
    }
  }
  return *bytes != before;
}

struct BuiltProof {
  std::string bytes;
  bool should_verify = false;  // valid and unchanged
};

// [mode u8]: bit 7 raw bytes (a piece); else a claim (NodeName, Incarnation, Address), [chain u8]
// [key u8] (modulo the identities; bit 7 of key: DatagramSigner::Sign where it can) and Mutate.
BuiltProof ReadProofSpec(fuzz::Input& in, SignedBytes* made) {
  BuiltProof out;
  const uint8_t mode = in.U8();
  if (mode & 0x80) {
    out.bytes = in.Piece();
    return out;
  }
  Claim claim;
  claim.node = NodeName(in);
  claim.incarnation = Incarnation(in);
  claim.address = Address(in);
  const size_t ids = fixture->ids.size();
  const size_t chain = in.U8() % ids;
  const uint8_t key_byte = in.U8();
  const size_t key = (key_byte & 0x7f) % ids;
  out.bytes = Record(claim);
  const bool in_limits = !claim.node.empty() && claim.node.size() <= 255 &&
                         claim.incarnation != 0 && !claim.address.empty() &&
                         claim.address.size() <= 1024;
  if (in_limits) {
    FUZZ_CHECK(IncarnationRecord(IncarnationClaim{claim.node, claim.incarnation, claim.address}) ==
                   out.bytes,
               "IncarnationRecord writes the documented format");
  }
  SignWith(&out.bytes, chain, key, key_byte & 0x80, made);
  const bool changed = Mutate(in, &out.bytes);
  out.should_verify = !changed && in_limits && chain == key && fixture->ids[key].trusted &&
                      fixture->ids[key].node == claim.node;
  return out;
}

// Checks one proof on its own; the claim it makes when it is a valid one (by the oracle).
std::optional<Claim> CheckProof(const BuiltProof& built, const SignedBytes& made) {
  const std::string& p = built.bytes;
  size_t code_block = 0;
  absl::StatusOr<IncarnationClaim> read = ReadIncarnationClaim(p, &code_block);
  Claim mine;
  size_t block = 0, signed_end = 0;
  const bool readable = ReadProof(p, &mine, &block, &signed_end);
  if (read.ok()) {
    FUZZ_CHECK(code_block <= p.size(), "a claim's block lies in the proof");
    FUZZ_CHECK(IncarnationRecord(*read) == p.substr(0, code_block),
               "a claim that reads encodes back to its record");
  }
  absl::StatusOr<IncarnationClaim> verified = VerifyIncarnationProof(fixture->receiver.get(), p);
  std::optional<Claim> valid;
  if (readable) {
    const std::string node = ValidSigner(made, p.substr(0, signed_end));
    if (!node.empty() && node == mine.node) valid = mine;
  }
  if (fuzz::Verbose() && readable) {
    auto it = made.find(p.substr(0, signed_end));
    std::string how = "not signed here";
    if (it != made.end()) {
      how = "signed with";
      for (const Signed& s : it->second) {
        absl::StrAppend(&how, " (chain ", fixture->ids[s.chain].name, ", key ",
                        fixture->ids[s.key].name, ")");
      }
    }
    std::printf("  claim '%s' %llu '%s'; %s\n", mine.node.c_str(),
                static_cast<unsigned long long>(mine.incarnation), mine.address.c_str(),
                how.c_str());
  }
  if (fuzz::Verbose()) {
    std::printf("  proof of %zu bytes: %s%s\n", p.size(),
                verified.ok() ? "verified" : verified.status().ToString().c_str(),
                valid ? " (its claim was signed validly here)" : "");
  }
  if (verified.ok()) {
    FUZZ_CHECK(read.ok() && readable && block == code_block,
               "a proof that verifies reads, where this file reads it");
    FUZZ_CHECK(valid.has_value(),
               "a proof verifies only if signed by a certificate of the CA naming its node");
    FUZZ_CHECK(verified->node_id == mine.node && verified->incarnation == mine.incarnation &&
                   verified->address == mine.address,
               "a proof that verifies returns its claim");
  }
  if (built.should_verify) {
    FUZZ_CHECK(verified.ok(),
               "a valid proof, unchanged, verifies: " + verified.status().ToString());
  }
  return valid;
}

// ---------------------------------------------------------------------------------------------
// Datagrams.

std::string Hmac(const std::string& data) {
  uint8_t out[32];
  unsigned int len = 32;
  HMAC(EVP_sha256(), kToken, sizeof(kToken) - 1, reinterpret_cast<const uint8_t*>(data.data()),
       data.size(), out, &len);
  return std::string(reinterpret_cast<const char*>(out), 32);
}

// The node a request's or a reply's body names as its sender; "" when it names none or does not
// parse (nor does the receiver's).
std::string NodeNamed(uint8_t type, const std::string& body) {
  if (type == 1) {
    peer::HeartbeatRequest r;
    return r.ParseFromString(body) ? r.node_id() : "";
  }
  if (type == 2) {
    peer::HeartbeatResponse r;
    return r.ParseFromString(body) ? r.node_id() : "";
  }
  return "";
}

class NoHeartbeats final : public HeartbeatSender {
 public:
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string&, const HeartbeatMessage&) override {
    return absl::UnavailableError("the fuzz target sends nothing");
  }
};

struct Receiver {
  ReplayWindow replay;         // UdpHeartbeats' receiver's, for this input's datagrams
  uint64_t next_sequence = 1;  // the senders' (every datagram of an input a sequence its own)
  std::unique_ptr<Cluster> cluster;
  bool self_fenced = false;
  std::set<Claim> vouched;  // by a member's own datagram or a valid proof of its own
};

// [type u8]: type 1 + (b % 3) (request, reply, refusal); bit 7: the body is raw bytes (a piece).
// Else: NodeName, Incarnation, Address of the sender, [kind u8], [seq u8], [n u8 % 5] updates
// (NodeName, Incarnation, [state u8], [version u8], Address), [n u8 % 5] proofs
// (ReadProofSpec). Then [chain u8] [key u8] as for a proof (key 0xff: no signature, format 1),
// Mutate over the signed bytes, and [mac u8]: bit 0, the HMAC of the bytes as changed.
void ReadDatagram(fuzz::Input& in, bool token, Receiver* receiver) {
  SignedBytes made;
  const uint8_t type_byte = in.U8();
  const uint8_t type = 1 + (type_byte & 0x7f) % 3;
  std::string body;
  std::vector<BuiltProof> proofs;
  if (type_byte & 0x80) {
    body = in.Piece();
  } else if (type == 3) {
    body = in.Piece();  // a refusal: code and message
  } else {
    peer::HeartbeatRequest request;
    request.set_node_id(NodeName(in));
    request.set_incarnation(Incarnation(in));
    request.set_address(Address(in));
    request.set_kind(static_cast<peer::HeartbeatRequest::Kind>(in.U8() % 3));
    request.set_seq(in.U8());
    const int updates = in.U8() % 5;
    for (int i = 0; i < updates; ++i) {
      auto* u = request.add_updates();
      u->mutable_member()->set_node_id(NodeName(in));
      u->mutable_member()->set_incarnation(Incarnation(in));
      u->set_state(static_cast<peer::HeartbeatRequest::Update::State>(in.U8() % 3));
      u->set_version(in.U8());
      u->mutable_member()->set_address(Address(in));
    }
    const int n = in.U8() % 5;
    for (int i = 0; i < n; ++i) proofs.push_back(ReadProofSpec(in, &made));
    for (const BuiltProof& p : proofs) request.add_incarnation_proofs(p.bytes);
    if (type == 1) {
      body = request.SerializeAsString();
    } else {
      // A reply: the same sender, updates and proofs, under the response's field numbers.
      peer::HeartbeatResponse response;
      response.set_node_id(request.node_id());
      response.set_incarnation(request.incarnation());
      *response.mutable_updates() = request.updates();
      for (const BuiltProof& p : proofs) response.add_incarnation_proofs(p.bytes);
      body = response.SerializeAsString();
    }
  }
  // The datagram (UdpHeartbeats' format, from its documentation).
  const size_t ids = fixture->ids.size();
  const size_t chain = in.U8() % ids;
  const uint8_t key_byte = in.U8();
  const bool unsigned_format = key_byte == 0xff;
  const size_t key = (key_byte & 0x7f) % ids;
  std::string bytes = "TSHB";
  bytes.push_back(static_cast<char>(unsigned_format ? 1 : 3));
  bytes.push_back(static_cast<char>(type));
  bytes.append(2, '\0');
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>(0x11 * (i + 1)));
  const uint64_t sequence = receiver->next_sequence++;
  if (!unsigned_format) {
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<char>((body.size() >> (8 * i)) & 0xff));
    for (uint64_t v : {kSenderIncarnation, sequence}) {
      for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    }
  }
  bytes.append(body);
  if (!unsigned_format) SignWith(&bytes, chain, key, key_byte & 0x80, &made);
  const bool changed = Mutate(in, &bytes);
  const bool mac_again = in.U8() & 1;
  std::string datagram = bytes;
  if (!changed || mac_again) {
    datagram += token ? Hmac(bytes) : std::string(32, '\0');
  } else {
    // Changed by someone without the token: any HMAC but the right one.
    datagram += token ? Hmac(bytes + "x") : std::string(32, '\0');
  }

  // The claimed node, as this file reads the body.
  const std::string claimed = NodeNamed(type, body);
  const bool should_decode = !changed && !unsigned_format && datagram.size() <= 60 * 1024 &&
                             chain == key && fixture->ids[key].trusted &&
                             (claimed.empty() || claimed == fixture->ids[key].node);

  const std::string token_string = token ? kToken : "";
  absl::StatusOr<UdpHeartbeats::Decoded> d =
      UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(datagram.data()), datagram.size(),
                            token_string, fixture->receiver.get(), &receiver->replay);
  if (fuzz::Verbose()) {
    std::printf("datagram type %d of %zu bytes, %zu proofs: %s\n", type, datagram.size(),
                proofs.size(), d.ok() ? "decoded" : d.status().ToString().c_str());
  }
  // Each proof on its own, whatever became of the datagram.
  std::vector<std::optional<Claim>> valid_proofs;
  for (const BuiltProof& p : proofs) valid_proofs.push_back(CheckProof(p, made));
  if (should_decode) {
    FUZZ_CHECK(d.ok(), "a valid datagram, unchanged, decodes: " + d.status().ToString());
  }
  if (!d.ok()) return;

  // The oracle for what decoded.
  const std::string signed_part = datagram.substr(0, datagram.size() - 32);
  if (token) {
    FUZZ_CHECK(Hmac(signed_part) == datagram.substr(signed_part.size()),
               "with a token, a datagram decodes only with the token's HMAC");
  }
  FUZZ_CHECK(signed_part.size() >= 38 && datagram[4] == 3, "a datagram decodes only signed");
  // Taken once: the same bytes again are refused before their signature is checked.
  const uint64_t checked = fixture->receiver->stats().signatures_checked;
  absl::StatusOr<UdpHeartbeats::Decoded> again =
      UdpHeartbeats::Decode(reinterpret_cast<const uint8_t*>(datagram.data()), datagram.size(),
                            token_string, fixture->receiver.get(), &receiver->replay);
  FUZZ_CHECK(absl::IsAlreadyExists(again.status()),
             "a datagram decoded once is refused as a replay: " + again.status().ToString());
  FUZZ_CHECK(fixture->receiver->stats().signatures_checked == checked,
             "a replay costs no signature check");
  size_t body_bytes = 0;
  for (int i = 3; i >= 0; --i) {
    body_bytes = (body_bytes << 8) | static_cast<uint8_t>(signed_part[16 + i]);
  }
  FUZZ_CHECK(body_bytes <= signed_part.size() - 38, "a decoded datagram's body lies in it");
  const size_t block = 36 + body_bytes;
  const size_t chain_bytes = Le16(signed_part, block);
  FUZZ_CHECK(chain_bytes <= signed_part.size() - block - 2,
             "a decoded datagram's chain lies in it");
  const std::string signer = ValidSigner(made, signed_part.substr(0, block + 2 + chain_bytes));
  FUZZ_CHECK(!signer.empty(),
             "a datagram decodes only if signed by a certificate of the CA naming a node");
  FUZZ_CHECK(d->node_id == signer, "a decoded datagram names the node that signed it");
  FUZZ_CHECK(d->type == static_cast<uint8_t>(signed_part[5]) &&
                 d->body == signed_part.substr(36, body_bytes) &&
                 d->incarnation == kSenderIncarnation && d->sequence == sequence,
             "a decoded datagram is its bytes");
  if (d->type == 1 || d->type == 2) {
    const std::string named = NodeNamed(d->type, d->body);
    FUZZ_CHECK(named.empty() || named == signer,
               "a decoded request or reply names the node that signed it");
  }
  if (d->type != 1) return;

  // As UdpHeartbeats' receiver hands a request to Cluster (udp_heartbeats.cc, HandleDatagram).
  peer::HeartbeatRequest request;
  if (!request.ParseFromString(d->body) || request.node_id() != d->node_id ||
      request.node_id().empty() || request.incarnation() == 0) {
    return;
  }
  // What the sender says of its own incarnation is its own word, wherever in its message: its
  // address, and the address of an update about that incarnation (Swim applies the update after
  // the sender, so its address is the one held).
  receiver->vouched.insert(Claim{request.node_id(), request.incarnation(), request.address()});
  for (const auto& u : request.updates()) {
    if (u.member().node_id() == request.node_id() &&
        u.member().incarnation() == request.incarnation()) {
      receiver->vouched.insert(
          Claim{u.member().node_id(), u.member().incarnation(), u.member().address()});
    }
  }
  // The valid proofs the request carries, by this file's reading (the datagram may have been
  // changed after they were built, so read them from the body that decoded).
  for (const std::string& p : request.incarnation_proofs()) {
    Claim claim;
    size_t proof_block = 0, signed_end = 0;
    if (!ReadProof(p, &claim, &proof_block, &signed_end)) continue;
    const std::string node = ValidSigner(made, p.substr(0, signed_end));
    if (!node.empty() && node == claim.node) receiver->vouched.insert(claim);
  }
  absl::StatusOr<HeartbeatReply> reply =
      receiver->cluster->OnHeartbeat(peer_wire::FromProto(request));
  if (fuzz::Verbose()) {
    std::printf("  heartbeat from %s: %s\n", request.node_id().c_str(),
                reply.ok() ? "answered" : reply.status().ToString().c_str());
  }
  for (const Cluster::PeerView& m : receiver->cluster->Peers()) {
    if (m.node_id.empty()) continue;
    FUZZ_CHECK(receiver->vouched.count(Claim{m.node_id, m.incarnation, m.address}) == 1,
               absl::StrCat("member ", m.node_id, " incarnation ", m.incarnation, " at ", m.address,
                            " is held only on its own word"));
  }
  if (receiver->self_fenced) {
    bool newer = false;
    for (const Claim& c : receiver->vouched) {
      newer = newer || (c.node == "n0" && c.incarnation > kReceiverIncarnation);
    }
    FUZZ_CHECK(newer, "the receiver fences itself only on n0's word of a newer incarnation");
  }
}

// Writers of the same input, for seeds.
struct ProofSeed {
  int node = 1;              // n<node>
  uint8_t incarnation = 20;  // 100 + it
  int address = 1;
  int chain = 1, key = 1;
  bool use_signer = false;
  std::vector<std::pair<uint16_t, uint8_t>> changes;
};
void PutProof(std::string* s, const ProofSeed& p) {
  fuzz::PutU8(s, 0);
  fuzz::PutU8(s, static_cast<uint8_t>(p.node));
  fuzz::PutU8(s, p.incarnation);
  fuzz::PutU8(s, static_cast<uint8_t>(p.address));
  fuzz::PutU8(s, static_cast<uint8_t>(p.chain));
  fuzz::PutU8(s, static_cast<uint8_t>(p.key | (p.use_signer ? 0x80 : 0)));
  fuzz::PutU8(s, static_cast<uint8_t>(p.changes.size()));
  for (const auto& [offset, x] : p.changes) {
    fuzz::PutU16(s, offset);
    fuzz::PutU8(s, x);
  }
}
struct UpdateSeed {
  int node = 2;
  uint8_t incarnation = 30;
  uint8_t state = 0;
  uint8_t version = 0;
  int address = 2;
};
struct DatagramSeed {
  uint8_t type = 0;  // 0 request, 1 reply, 2 refusal
  int node = 1;
  uint8_t incarnation = 20;
  int address = 1;
  uint8_t kind = 0;
  std::vector<UpdateSeed> updates;
  std::vector<ProofSeed> proofs;
  int chain = 1, key = 1;
  bool use_signer = true;
  std::vector<std::pair<uint16_t, uint8_t>> changes;
  bool mac_again = false;
};
void PutDatagram(std::string* s, const DatagramSeed& d) {
  fuzz::PutU8(s, d.type);
  if (d.type == 2) {
    fuzz::PutPiece(s, std::string("\x09\0\0\0refused", 11));
  } else {
    fuzz::PutU8(s, static_cast<uint8_t>(d.node));
    fuzz::PutU8(s, d.incarnation);
    fuzz::PutU8(s, static_cast<uint8_t>(d.address));
    fuzz::PutU8(s, d.kind);
    fuzz::PutU8(s, 7);
    fuzz::PutU8(s, static_cast<uint8_t>(d.updates.size()));
    for (const UpdateSeed& u : d.updates) {
      fuzz::PutU8(s, static_cast<uint8_t>(u.node));
      fuzz::PutU8(s, u.incarnation);
      fuzz::PutU8(s, u.state);
      fuzz::PutU8(s, u.version);
      fuzz::PutU8(s, static_cast<uint8_t>(u.address));
    }
    fuzz::PutU8(s, static_cast<uint8_t>(d.proofs.size()));
    for (const ProofSeed& p : d.proofs) PutProof(s, p);
  }
  fuzz::PutU8(s, static_cast<uint8_t>(d.chain));
  fuzz::PutU8(s, static_cast<uint8_t>(d.key == 0xff ? 0xff : d.key | (d.use_signer ? 0x80 : 0)));
  fuzz::PutU8(s, static_cast<uint8_t>(d.changes.size()));
  for (const auto& [offset, x] : d.changes) {
    fuzz::PutU16(s, offset);
    fuzz::PutU8(s, x);
  }
  fuzz::PutU8(s, d.mac_again ? 1 : 0);
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  auto add = [&](bool token, const std::vector<DatagramSeed>& datagrams) {
    std::string s;
    fuzz::PutU8(&s, token ? 1 : 0);
    fuzz::PutU8(&s, static_cast<uint8_t>(datagrams.size() - 1));
    for (const DatagramSeed& d : datagrams) PutDatagram(&s, d);
    seeds.push_back(s);
  };
  DatagramSeed hello;  // n1's heartbeat with its own proof
  hello.proofs = {ProofSeed{}};
  add(false, {hello});
  add(true, {hello});
  // n1 relays n2's incarnation with n2's proof (taken), then with one n1 signed (dropped).
  DatagramSeed relay = hello;
  relay.updates = {UpdateSeed{}};
  relay.proofs.push_back(ProofSeed{2, 30, 2, 2, 2, true, {}});
  add(true, {relay});
  DatagramSeed forged = hello;
  forged.updates = {UpdateSeed{}};
  forged.proofs.push_back(ProofSeed{2, 30, 5, 1, 1, false, {}});
  add(true, {forged});
  // A proof of n2 carrying n2's chain, signed with n1's key; another CA's n1; an operator's
  // certificate; a certificate naming two nodes.
  DatagramSeed mixed = relay;
  mixed.proofs[1] = ProofSeed{2, 30, 2, 2, 1, false, {}};
  add(true, {mixed});
  DatagramSeed rogue = hello;
  rogue.chain = rogue.key = 4;
  rogue.use_signer = false;
  add(true, {rogue});
  DatagramSeed rogue_proof = relay;
  rogue_proof.updates = {UpdateSeed{1, 90, 0, 0, 3}};
  rogue_proof.proofs[1] = ProofSeed{1, 90, 3, 4, 4, true, {}};
  add(false, {rogue_proof});
  for (int id : {5, 6}) {
    DatagramSeed odd = hello;
    odd.chain = odd.key = id;
    odd.use_signer = false;
    add(false, {odd});
  }
  // A valid proof with a byte changed in its claim, its chain and its signature.
  for (uint16_t offset : {9, 200, 600}) {
    DatagramSeed changed = relay;
    changed.proofs[1].changes = {{offset, 0x01}};
    add(true, {changed});
  }
  // The datagram changed after it was signed, with the HMAC made again and not.
  for (bool mac_again : {false, true}) {
    DatagramSeed changed = relay;
    changed.changes = {{40, 0x20}};
    changed.mac_again = mac_again;
    add(true, {changed});
  }
  // Claiming n2 while signed by n1; unsigned (format 1); a reply; a refusal.
  DatagramSeed impostor = hello;
  impostor.node = 2;
  add(false, {impostor});
  DatagramSeed plain = hello;
  plain.key = 0xff;
  add(true, {plain});
  DatagramSeed reply = relay;
  reply.type = 1;
  add(true, {reply});
  DatagramSeed refusal = hello;
  refusal.type = 2;
  add(true, {refusal});
  // n1 joins, n2 joins, then n1 relays a newer n2 (proven) and a newer n0 (proven: the receiver
  // is fenced; unproven: dropped).
  DatagramSeed n2 = hello;
  n2.node = n2.address = 2;
  n2.incarnation = 30;
  n2.chain = n2.key = 2;
  n2.proofs = {ProofSeed{2, 30, 2, 2, 2, false, {}}};
  DatagramSeed newer = hello;
  newer.updates = {UpdateSeed{2, 40, 0, 0, 4}, UpdateSeed{0, 60, 0, 0, 0}};
  newer.proofs.push_back(ProofSeed{2, 40, 4, 2, 2, true, {}});
  newer.proofs.push_back(ProofSeed{0, 60, 0, 0, 0, true, {}});
  add(true, {hello, n2, newer});
  newer.proofs.pop_back();
  add(true, {hello, n2, newer});
  // Suspicion and death of n2's incarnation held, relayed by n1.
  DatagramSeed suspect = hello;
  suspect.updates = {UpdateSeed{2, 30, 1, 3, 2}, UpdateSeed{2, 30, 2, 4, 5}};
  add(false, {hello, n2, suspect});
  return seeds;
}

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::fuzz::Setup(tessera::Seeds);
  // Names from the input need not be UTF-8: protobuf then refuses the message (the receiver drops
  // it), and would log every time.
  google::protobuf::SetLogHandler(nullptr);
  tessera::Init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  fuzz::Input in(data, size);
  const bool token = in.U8() & 1;
  const int datagrams = 1 + in.U8() % 3;

  Receiver receiver;
  IncarnationProofs::Options proof_options;
  proof_options.signer = fixture->receiver;
  proof_options.self = IncarnationClaim{"n0", kReceiverIncarnation, kReceiverAddress};
  auto proofs = IncarnationProofs::Create(std::move(proof_options));
  if (!proofs.ok()) fuzz::Fail("cannot make the receiver's proof: " + proofs.status().ToString());
  static NoHeartbeats no_heartbeats;
  Cluster::Options options;
  options.self_id = "n0";
  options.self_address = kReceiverAddress;
  options.incarnation = kReceiverIncarnation;
  options.proofs = std::shared_ptr<IncarnationProofs>(std::move(*proofs));
  bool* self_fenced = &receiver.self_fenced;
  options.on_self_fenced = [self_fenced] { *self_fenced = true; };
  receiver.cluster = std::make_unique<Cluster>(std::move(options), &no_heartbeats);
  receiver.vouched.insert(Claim{"n0", kReceiverIncarnation, kReceiverAddress});

  for (int i = 0; i < datagrams; ++i) ReadDatagram(in, token, &receiver);
  return 0;
}
