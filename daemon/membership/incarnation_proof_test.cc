// Proofs of incarnations: made by a member, verified by another against the CA; refused when any
// byte is altered, when signed with another node's certificate, when the chain is not the CA's;
// checked once per (node, incarnation); and checks past a sender's allowance left undone.
#include "daemon/membership/incarnation_proof.h"

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

#include "absl/time/clock.h"
#include "daemon/transfer/test_certificates.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

class IncarnationProofTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ca = TestCa::Create();
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
  }

  std::shared_ptr<DatagramSigner> SignerFor(const std::string& node, TestCa* ca = nullptr,
                                            int refresh_s = 60) {
    auto files = (ca != nullptr ? ca : ca_.get())->IssueNode(node);
    EXPECT_TRUE(files.ok()) << files.status();
    files->refresh_s = refresh_s;
    auto signer = DatagramSigner::Create(*files);
    EXPECT_TRUE(signer.ok()) << signer.status();
    return std::shared_ptr<DatagramSigner>(std::move(*signer));
  }

  std::unique_ptr<IncarnationProofs> ProofsOf(
      std::shared_ptr<DatagramSigner> signer, uint64_t incarnation,
      VerificationThrottle::Options throttle = IncarnationProofs::DefaultThrottle()) {
    IncarnationProofs::Options o;
    o.self = IncarnationClaim{signer->node_id(), incarnation, signer->node_id() + ":7070"};
    o.signer = std::move(signer);
    o.throttle = throttle;
    auto proofs = IncarnationProofs::Create(std::move(o));
    EXPECT_TRUE(proofs.ok()) << proofs.status();
    return std::move(*proofs);
  }

  std::unique_ptr<TestCa> ca_;
};

TEST_F(IncarnationProofTest, AProofNamesItsMembersIncarnationAndAddressAndIsCheckedOnce) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  const IncarnationClaim claim{"n1", 1'700'000'000'123, "10.0.0.1:7070"};
  auto proof = MakeIncarnationProof(n1.get(), claim);
  ASSERT_TRUE(proof.ok()) << proof.status();
  std::printf("a proof of %zu bytes (the record %zu)\n", proof->size(),
              IncarnationRecord(claim).size());
  auto read = ReadIncarnationClaim(*proof);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->node_id, "n1");
  auto verified = VerifyIncarnationProof(n2.get(), *proof);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->node_id, claim.node_id);
  EXPECT_EQ(verified->incarnation, claim.incarnation);
  EXPECT_EQ(verified->address, claim.address);

  // Held by n2's book: checked once, found, relayed as it came.
  auto book = ProofsOf(n2, 42);
  EXPECT_FALSE(book->Find("n1", claim.incarnation).has_value());
  for (int i = 0; i < 3; ++i) {
    auto checked = book->Check(*proof, "n3");
    ASSERT_TRUE(checked.ok()) << checked.status();
    EXPECT_EQ(checked->address, claim.address);
  }
  EXPECT_EQ(book->stats().verified, 1u) << "a proof held is not checked again";
  auto held = book->Find("n1", claim.incarnation);
  ASSERT_TRUE(held.has_value());
  EXPECT_EQ(held->address, claim.address);
  EXPECT_EQ(*held->proof, *proof);
  EXPECT_FALSE(book->Find("n1", claim.incarnation + 1).has_value());
  // An older incarnation's proof, checked, does not replace the newer one held.
  auto older = MakeIncarnationProof(n1.get(), {"n1", claim.incarnation - 1, "10.0.0.9:7070"});
  ASSERT_TRUE(older.ok());
  EXPECT_TRUE(book->Check(*older, "n3").ok());
  EXPECT_TRUE(book->Find("n1", claim.incarnation).has_value());
  EXPECT_FALSE(book->Find("n1", claim.incarnation - 1).has_value());
  // This daemon's own proof, under its own node id and incarnation.
  auto own = book->Find("n2", 42);
  ASSERT_TRUE(own.has_value());
  EXPECT_EQ(own->address, "n2:7070");
  auto own_claim = VerifyIncarnationProof(n1.get(), *own->proof);
  ASSERT_TRUE(own_claim.ok()) << own_claim.status();
  EXPECT_EQ(own_claim->incarnation, 42u);
}

TEST_F(IncarnationProofTest, ADeclarationThatAMemberIsLostSpeaksOnlyForItsDeclarer) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  auto n3 = SignerFor("n3");
  const LostDeclaration said{"n3", 1'700'000'000'777, "n1"};
  auto declaration = MakeLostDeclaration(n1.get(), said);
  ASSERT_TRUE(declaration.ok()) << declaration.status();
  auto verified = VerifyLostDeclaration(n2.get(), *declaration);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->node_id, "n3");
  EXPECT_EQ(verified->incarnation, said.incarnation);
  EXPECT_EQ(verified->declarer, "n1");
  // Every altered byte is refused (none passes for another declaration).
  const uint64_t seed = 0x1057ull ^ static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < declaration->size(); ++i) {
    std::string altered = *declaration;
    altered[i] = static_cast<char>(altered[i] ^ (1 + rng() % 255));
    EXPECT_FALSE(VerifyLostDeclaration(n2.get(), altered).ok()) << "byte " << i;
  }
  // n2 cannot sign for n1, through the API or by signing n1's record with its own key.
  auto as_n1 = MakeLostDeclaration(n2.get(), said);
  EXPECT_EQ(as_n1.status().code(), absl::StatusCode::kInvalidArgument) << as_n1.status();
  std::string forged = LostDeclarationRecord(said);
  ASSERT_TRUE(n2->Sign(&forged).ok());
  auto refused = VerifyLostDeclaration(n3.get(), forged);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated) << refused.status();
  // A proof of an incarnation is no declaration, nor the other way round (the magic differs).
  auto proof = MakeIncarnationProof(n1.get(), {"n1", 9, "10.0.0.1:7070"});
  ASSERT_TRUE(proof.ok());
  EXPECT_EQ(VerifyLostDeclaration(n2.get(), *proof).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(VerifyIncarnationProof(n2.get(), *declaration).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Cut short anywhere: malformed, never read past its end.
  for (size_t n = 0; n < LostDeclarationRecord(said).size(); ++n) {
    EXPECT_EQ(ReadLostDeclaration(declaration->substr(0, n)).status().code(),
              absl::StatusCode::kInvalidArgument)
        << n;
  }
  EXPECT_FALSE(MakeLostDeclaration(n1.get(), {"n3", 0, "n1"}).ok()) << "incarnation 0";
  EXPECT_FALSE(MakeLostDeclaration(n1.get(), {"", 5, "n1"}).ok()) << "no node id";
}

TEST_F(IncarnationProofTest, EveryAlteredByteIsRefused) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  auto proof = MakeIncarnationProof(n1.get(), {"n1", 77, "10.0.0.1:7070"});
  ASSERT_TRUE(proof.ok()) << proof.status();
  std::mt19937_64 rng(11);
  for (size_t i = 0; i < proof->size(); ++i) {
    std::string altered = *proof;
    altered[i] = static_cast<char>(altered[i] ^ (1 + rng() % 255));
    auto verified = VerifyIncarnationProof(n2.get(), altered);
    EXPECT_FALSE(verified.ok()) << "byte " << i << " of " << proof->size()
                                << " altered, yet accepted";
  }
  EXPECT_FALSE(VerifyIncarnationProof(n2.get(), proof->substr(0, proof->size() - 1)).ok());
  EXPECT_FALSE(VerifyIncarnationProof(n2.get(), *proof + "x").ok());
  EXPECT_FALSE(VerifyIncarnationProof(n2.get(), "").ok());
}

TEST_F(IncarnationProofTest, AProofSignedWithAnotherNodesCertificateIsRefused) {
  auto n2 = SignerFor("n2");
  auto n3 = SignerFor("n3");
  const IncarnationClaim of_n1{"n1", 99, "10.0.0.66:7070"};
  auto made = MakeIncarnationProof(n2.get(), of_n1);
  EXPECT_EQ(made.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(made.status().message()),
              HasSubstr("cannot be signed with the certificate of node 'n2'"));
  // Made by hand: n1's record, signed by n2.
  std::string forged = IncarnationRecord(of_n1);
  ASSERT_TRUE(n2->Sign(&forged).ok());
  auto refused = VerifyIncarnationProof(n3.get(), forged);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("an incarnation proof claiming node 'n1' signed with the certificate of "
                        "node 'n2'"));
  auto book = ProofsOf(n3, 5);
  EXPECT_EQ(book->Check(forged, "n2").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_FALSE(book->Find("n1", 99).has_value());
  EXPECT_EQ(book->stats().refused, 1u);
}

TEST_F(IncarnationProofTest, AChainNotFromTheCaIsRefused) {
  auto n2 = SignerFor("n2");
  auto other_ca = TestCa::Create("", "other-ca");
  ASSERT_TRUE(other_ca.ok()) << other_ca.status();
  auto rogue_n1 = SignerFor("n1", other_ca->get());
  auto proof = MakeIncarnationProof(rogue_n1.get(), {"n1", 99, "10.0.0.66:7070"});
  ASSERT_TRUE(proof.ok()) << proof.status();
  auto refused = VerifyIncarnationProof(n2.get(), *proof);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("an incarnation proof: its certificate does not verify against the CA"));
}

// Every check spends its sender's allowance, passed or not; past it, that sender's proofs are
// left unchecked (and refused), while another member's are still checked.
TEST_F(IncarnationProofTest, ChecksPastASendersAllowanceAreNotMade) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  auto n3 = SignerFor("n3");
  VerificationThrottle::Options throttle = IncarnationProofs::DefaultThrottle();
  throttle.source_burst = 3;
  throttle.source_interval = absl::Hours(1);
  auto book = ProofsOf(n3, 5, throttle);
  // n2 relays forged proofs of n1, then its own proofs: three checks, then none.
  for (uint64_t i = 0; i < 2; ++i) {
    std::string forged = IncarnationRecord({"n1", 100 + i, "10.0.0.66:7070"});
    ASSERT_TRUE(n2->Sign(&forged).ok());
    EXPECT_EQ(book->Check(forged, "n2").status().code(), absl::StatusCode::kUnauthenticated);
  }
  auto own = MakeIncarnationProof(n2.get(), {"n2", 7, "10.0.0.2:7070"});
  ASSERT_TRUE(own.ok());
  EXPECT_TRUE(book->Check(*own, "n2").ok());
  auto newer = MakeIncarnationProof(n2.get(), {"n2", 8, "10.0.0.2:7070"});
  ASSERT_TRUE(newer.ok());
  auto unchecked = book->Check(*newer, "n2");
  EXPECT_EQ(unchecked.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(book->Find("n2", 8).has_value());
  // n1's proof relayed by n4 is still checked, and one held costs nothing more, whoever relays.
  auto of_n1 = MakeIncarnationProof(n1.get(), {"n1", 100, "10.0.0.1:7070"});
  ASSERT_TRUE(of_n1.ok());
  EXPECT_TRUE(book->Check(*of_n1, "n4").ok());
  EXPECT_TRUE(book->Check(*of_n1, "n2").ok());
  EXPECT_TRUE(book->Check(*own, "n2").ok());
  const IncarnationProofs::Stats s = book->stats();
  EXPECT_EQ(s.verified, 2u);
  EXPECT_EQ(s.refused, 2u);
  EXPECT_EQ(s.throttled, 1u);
  EXPECT_EQ(s.held, 2u);
}

// A certificate read again (rotation): this daemon's proof is signed again with it.
TEST_F(IncarnationProofTest, ARotatedCertificateSignsTheOwnProofAgain) {
  auto n1 = SignerFor("n1", nullptr, /*refresh_s=*/1);
  auto n2 = SignerFor("n2");
  auto book = ProofsOf(n1, 1234);
  const std::shared_ptr<const std::string> first = book->Own();
  EXPECT_EQ(book->Own(), first) << "signed once while the certificate is the same";
  ASSERT_TRUE(ca_->IssueNode("n1").ok());  // a new certificate of n1 in place
  absl::SleepFor(absl::Milliseconds(1100));
  const std::shared_ptr<const std::string> second = book->Own();
  EXPECT_NE(*second, *first);
  auto claim = VerifyIncarnationProof(n2.get(), *second);
  ASSERT_TRUE(claim.ok()) << claim.status();
  EXPECT_EQ(claim->incarnation, 1234u);
}

// What a proof costs: made once per incarnation, checked once per receiver.
TEST_F(IncarnationProofTest, Cost) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  constexpr int kProofs = 200;
  std::vector<std::string> proofs;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kProofs; ++i) {
    auto proof = MakeIncarnationProof(n1.get(), {"n1", 1000u + i, "10.0.0.1:7070"});
    ASSERT_TRUE(proof.ok());
    proofs.push_back(*std::move(proof));
  }
  const auto t1 = std::chrono::steady_clock::now();
  for (const std::string& p : proofs) ASSERT_TRUE(VerifyIncarnationProof(n2.get(), p).ok());
  const auto t2 = std::chrono::steady_clock::now();
  const double make_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / kProofs;
  const double verify_us = std::chrono::duration<double, std::micro>(t2 - t1).count() / kProofs;
  std::printf("per proof: make %.1f us, verify %.1f us (chain cached); %zu bytes\n", make_us,
              verify_us, proofs[0].size());
  EXPECT_LT(make_us + verify_us, 20000.0);
}

}  // namespace
}  // namespace tessera
