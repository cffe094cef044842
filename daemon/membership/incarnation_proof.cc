#include "daemon/membership/incarnation_proof.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status.h"

namespace tessera {
namespace {

constexpr char kMagic[4] = {'T', 'S', 'I', 'P'};
constexpr char kLostMagic[4] = {'T', 'S', 'L', 'D'};
constexpr uint8_t kFormatVersion = 1;
constexpr size_t kMaxNodeIdBytes = 255;
constexpr size_t kMaxAddressBytes = 1024;

void PutU16(std::string* out, size_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>((v >> 8) & 0xff));
}

void PutU64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Reads the fields of a record in order, each bounded by what is left.
class RecordReader {
 public:
  RecordReader(const std::string& bytes, size_t at) : bytes_(bytes), at_(at) {}
  bool String(std::string* out) {
    if (bytes_.size() - at_ < 2) return false;
    const size_t n = Byte(at_) | (Byte(at_ + 1) << 8);
    if (bytes_.size() - at_ - 2 < n) return false;
    out->assign(bytes_, at_ + 2, n);
    at_ += 2 + n;
    return true;
  }
  bool U64(uint64_t* out) {
    if (bytes_.size() - at_ < 8) return false;
    *out = 0;
    for (int i = 0; i < 8; ++i) *out |= static_cast<uint64_t>(Byte(at_ + i)) << (8 * i);
    at_ += 8;
    return true;
  }
  size_t at() const { return at_; }

 private:
  size_t Byte(size_t i) const { return static_cast<uint8_t>(bytes_[i]); }
  const std::string& bytes_;
  size_t at_;
};

absl::Status CheckLimits(const IncarnationClaim& claim) {
  if (claim.node_id.empty() || claim.node_id.size() > kMaxNodeIdBytes || claim.incarnation == 0 ||
      claim.address.empty() || claim.address.size() > kMaxAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("an incarnation proof needs a node id of 1..", kMaxNodeIdBytes,
                     " bytes, a non-zero incarnation and an address of 1..", kMaxAddressBytes,
                     " bytes; got ", claim.node_id.size(), "-byte node id, incarnation ",
                     claim.incarnation, ", ", claim.address.size(), "-byte address"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string IncarnationRecord(const IncarnationClaim& claim) {
  std::string out(kMagic, sizeof(kMagic));
  out.push_back(static_cast<char>(kFormatVersion));
  PutU16(&out, claim.node_id.size());
  out.append(claim.node_id);
  PutU64(&out, claim.incarnation);
  PutU16(&out, claim.address.size());
  out.append(claim.address);
  return out;
}

absl::StatusOr<std::string> MakeIncarnationProof(DatagramSigner* signer,
                                                 const IncarnationClaim& claim) {
  TESSERA_RETURN_IF_ERROR(CheckLimits(claim));
  const std::string certified = signer->node_id();
  if (claim.node_id != certified) {
    return absl::InvalidArgumentError(
        absl::StrCat("an incarnation proof of node '", claim.node_id,
                     "' cannot be signed with the certificate of node '", certified, "'"));
  }
  std::string proof = IncarnationRecord(claim);
  TESSERA_RETURN_IF_ERROR(signer->Sign(&proof));
  return proof;
}

absl::StatusOr<IncarnationClaim> ReadIncarnationClaim(const std::string& proof, size_t* block) {
  const size_t header = sizeof(kMagic) + 1;
  if (proof.size() < header || std::memcmp(proof.data(), kMagic, sizeof(kMagic)) != 0 ||
      static_cast<uint8_t>(proof[4]) != kFormatVersion) {
    return absl::InvalidArgumentError("not an incarnation proof (magic or version)");
  }
  IncarnationClaim claim;
  RecordReader in(proof, header);
  if (!in.String(&claim.node_id) || !in.U64(&claim.incarnation)) {
    return absl::InvalidArgumentError("an incarnation proof cut short (node id)");
  }
  if (!in.String(&claim.address)) {
    return absl::InvalidArgumentError("an incarnation proof cut short (address)");
  }
  TESSERA_RETURN_IF_ERROR(CheckLimits(claim));
  if (block != nullptr) *block = in.at();
  return claim;
}

absl::StatusOr<IncarnationClaim> VerifyIncarnationProof(DatagramSigner* verifier,
                                                        const std::string& proof) {
  size_t block = 0;
  TESSERA_ASSIGN_OR_RETURN(IncarnationClaim claim, ReadIncarnationClaim(proof, &block));
  TESSERA_RETURN_IF_ERROR(verifier
                              ->Verify(reinterpret_cast<const uint8_t*>(proof.data()), block,
                                       proof.size(), claim.node_id, "an incarnation proof")
                              .status());
  return claim;
}

namespace {

absl::Status CheckLostLimits(const LostDeclaration& d) {
  if (d.node_id.empty() || d.node_id.size() > kMaxNodeIdBytes || d.incarnation == 0 ||
      d.declarer.empty() || d.declarer.size() > kMaxNodeIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a declaration that a member is lost needs node ids of 1..", kMaxNodeIdBytes,
        " bytes and a non-zero incarnation; got a ", d.node_id.size(),
        "-byte node id, incarnation ", d.incarnation, ", a ", d.declarer.size(),
        "-byte declarer"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string LostDeclarationRecord(const LostDeclaration& declaration) {
  std::string out(kLostMagic, sizeof(kLostMagic));
  out.push_back(static_cast<char>(kFormatVersion));
  PutU16(&out, declaration.node_id.size());
  out.append(declaration.node_id);
  PutU64(&out, declaration.incarnation);
  PutU16(&out, declaration.declarer.size());
  out.append(declaration.declarer);
  return out;
}

absl::StatusOr<std::string> MakeLostDeclaration(DatagramSigner* signer,
                                                const LostDeclaration& declaration) {
  TESSERA_RETURN_IF_ERROR(CheckLostLimits(declaration));
  const std::string certified = signer->node_id();
  if (declaration.declarer != certified) {
    return absl::InvalidArgumentError(
        absl::StrCat("a declaration by node '", declaration.declarer,
                     "' cannot be signed with the certificate of node '", certified, "'"));
  }
  std::string out = LostDeclarationRecord(declaration);
  TESSERA_RETURN_IF_ERROR(signer->Sign(&out));
  return out;
}

absl::StatusOr<LostDeclaration> ReadLostDeclaration(const std::string& signed_declaration,
                                                    size_t* block) {
  const size_t header = sizeof(kLostMagic) + 1;
  if (signed_declaration.size() < header ||
      std::memcmp(signed_declaration.data(), kLostMagic, sizeof(kLostMagic)) != 0 ||
      static_cast<uint8_t>(signed_declaration[4]) != kFormatVersion) {
    return absl::InvalidArgumentError("not a declaration that a member is lost (magic or version)");
  }
  LostDeclaration d;
  RecordReader in(signed_declaration, header);
  if (!in.String(&d.node_id) || !in.U64(&d.incarnation) || !in.String(&d.declarer)) {
    return absl::InvalidArgumentError("a declaration that a member is lost cut short");
  }
  TESSERA_RETURN_IF_ERROR(CheckLostLimits(d));
  if (block != nullptr) *block = in.at();
  return d;
}

absl::StatusOr<LostDeclaration> VerifyLostDeclaration(DatagramSigner* verifier,
                                                      const std::string& signed_declaration) {
  size_t block = 0;
  TESSERA_ASSIGN_OR_RETURN(LostDeclaration d, ReadLostDeclaration(signed_declaration, &block));
  TESSERA_RETURN_IF_ERROR(
      verifier
          ->Verify(reinterpret_cast<const uint8_t*>(signed_declaration.data()), block,
                   signed_declaration.size(), d.declarer, "a declaration that a member is lost")
          .status());
  return d;
}

VerificationThrottle::Options IncarnationProofs::DefaultThrottle() {
  VerificationThrottle::Options o;
  o.source_burst = 64;
  o.source_interval = absl::Milliseconds(10);
  o.total_burst = 256;
  o.total_interval = absl::Milliseconds(2);
  return o;
}

absl::StatusOr<std::unique_ptr<IncarnationProofs>> IncarnationProofs::Create(Options options) {
  if (options.signer == nullptr) {
    return absl::InvalidArgumentError("incarnation proofs need this daemon's signer");
  }
  std::unique_ptr<IncarnationProofs> proofs(new IncarnationProofs(std::move(options)));
  const uint64_t generation = proofs->options_.signer->generation();
  TESSERA_ASSIGN_OR_RETURN(
      std::string own, MakeIncarnationProof(proofs->options_.signer.get(), proofs->options_.self));
  absl::MutexLock lock(&proofs->mu_);
  proofs->own_ = std::make_shared<const std::string>(std::move(own));
  proofs->own_generation_ = generation;
  return proofs;
}

std::shared_ptr<const std::string> IncarnationProofs::Own() {
  const uint64_t generation = options_.signer->generation();
  {
    absl::MutexLock lock(&mu_);
    if (generation == own_generation_) return own_;
  }
  // The certificate was read again: a proof carrying the one held now (the old one may expire).
  absl::StatusOr<std::string> own = MakeIncarnationProof(options_.signer.get(), options_.self);
  absl::MutexLock lock(&mu_);
  if (own.ok()) {
    own_ = std::make_shared<const std::string>(*std::move(own));
    own_generation_ = generation;
  }
  return own_;
}

std::optional<IncarnationProofs::Held> IncarnationProofs::Find(const std::string& node_id,
                                                               uint64_t incarnation) {
  if (node_id == options_.self.node_id && incarnation == options_.self.incarnation) {
    return Held{options_.self.address, Own()};
  }
  absl::MutexLock lock(&mu_);
  auto it = held_.find(node_id);
  if (it == held_.end() || it->second.incarnation != incarnation) return std::nullopt;
  return Held{it->second.address, it->second.proof};
}

void IncarnationProofs::HoldLocked(const IncarnationClaim& claim,
                                   std::shared_ptr<const std::string> proof) {
  auto it = held_.find(claim.node_id);
  if (it != held_.end() && it->second.incarnation >= claim.incarnation) return;
  if (it == held_.end() && held_.size() >= options_.max_held) {
    auto oldest = held_.begin();
    for (auto e = held_.begin(); e != held_.end(); ++e) {
      if (e->second.order < oldest->second.order) oldest = e;
    }
    held_.erase(oldest);
  }
  held_[claim.node_id] = Entry{claim.incarnation, claim.address, std::move(proof), next_order_++};
}

absl::StatusOr<IncarnationClaim> IncarnationProofs::Check(const std::string& proof,
                                                          const std::string& sender) {
  absl::StatusOr<IncarnationClaim> claim = ReadIncarnationClaim(proof);
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    if (!claim.ok()) {
      ++stats_.refused;
      return claim.status();
    }
    if (claim->node_id == options_.self.node_id &&
        claim->incarnation == options_.self.incarnation) {
      return options_.self;
    }
    auto it = held_.find(claim->node_id);
    if (it != held_.end() && it->second.incarnation == claim->incarnation) {
      return IncarnationClaim{claim->node_id, claim->incarnation, it->second.address};
    }
    if (!throttle_.Admit(sender, now)) {
      ++stats_.throttled;
      return absl::ResourceExhaustedError(absl::StrCat(
          "left unchecked: proofs relayed by ", sender,
          " (or by members whose proofs did not verify lately) spent their allowance of checks"));
    }
    throttle_.Failed(sender, now);  // every check spends the allowance (see Options::throttle)
  }
  absl::StatusOr<IncarnationClaim> verified = VerifyIncarnationProof(options_.signer.get(), proof);
  absl::MutexLock lock(&mu_);
  if (!verified.ok()) {
    ++stats_.refused;
    return verified.status();
  }
  ++stats_.verified;
  throttle_.Passed(sender, now);
  HoldLocked(*verified, std::make_shared<const std::string>(proof));
  return verified;
}

IncarnationProofs::Stats IncarnationProofs::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.held = held_.size();
  return s;
}

}  // namespace tessera
