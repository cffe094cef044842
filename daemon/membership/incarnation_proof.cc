#include "daemon/membership/incarnation_proof.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status.h"

namespace tessera {
namespace {

constexpr char kMagic[4] = {'T', 'S', 'I', 'P'};
constexpr uint8_t kFormatVersion = 1;
constexpr size_t kMaxNodeIdBytes = 255;
constexpr size_t kMaxAddressBytes = 1024;

void PutU16(std::string* out, size_t v) {
  out->push_back(static_cast<char>(v & 0xff));
  out->push_back(static_cast<char>((v >> 8) & 0xff));
}

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
  for (int i = 0; i < 8; ++i) {
    out.push_back(static_cast<char>((claim.incarnation >> (8 * i)) & 0xff));
  }
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
  const auto* p = reinterpret_cast<const uint8_t*>(proof.data());
  const size_t size = proof.size();
  size_t at = sizeof(kMagic) + 1;
  auto u16 = [&](size_t where) { return static_cast<size_t>(p[where] | (p[where + 1] << 8)); };
  if (size < at + 2 || std::memcmp(p, kMagic, sizeof(kMagic)) != 0 || p[4] != kFormatVersion) {
    return absl::InvalidArgumentError("not an incarnation proof (magic or version)");
  }
  IncarnationClaim claim;
  const size_t node_bytes = u16(at);
  at += 2;
  if (size - at < node_bytes + 8 + 2) {
    return absl::InvalidArgumentError("an incarnation proof cut short (node id)");
  }
  claim.node_id.assign(proof, at, node_bytes);
  at += node_bytes;
  for (int i = 0; i < 8; ++i) claim.incarnation |= static_cast<uint64_t>(p[at + i]) << (8 * i);
  at += 8;
  const size_t address_bytes = u16(at);
  at += 2;
  if (size - at < address_bytes) {
    return absl::InvalidArgumentError("an incarnation proof cut short (address)");
  }
  claim.address.assign(proof, at, address_bytes);
  at += address_bytes;
  TESSERA_RETURN_IF_ERROR(CheckLimits(claim));
  if (block != nullptr) *block = at;
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
