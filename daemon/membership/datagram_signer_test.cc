// Signed membership datagrams: what a signature proves (the node a CA-issued certificate names),
// what it refuses (any altered byte, another CA, a certificate naming no node), and its cost.
#include "daemon/membership/datagram_signer.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "absl/time/clock.h"
#include "daemon/transfer/test_certificates.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

class DatagramSignerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ca = TestCa::Create();
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
  }

  std::unique_ptr<DatagramSigner> SignerFor(const std::string& node) {
    auto files = ca_->IssueNode(node);
    EXPECT_TRUE(files.ok()) << files.status();
    auto signer = DatagramSigner::Create(*files);
    EXPECT_TRUE(signer.ok()) << signer.status();
    return std::move(*signer);
  }

  // A message of `size` random bytes, signed by `signer`; *block: where the identity starts.
  static std::string Signed(DatagramSigner& signer, size_t size, size_t* block) {
    std::mt19937_64 rng(size);
    std::string d(size, '\0');
    for (char& c : d) c = static_cast<char>(rng());
    *block = d.size();
    EXPECT_TRUE(signer.Sign(&d).ok());
    return d;
  }
  static absl::StatusOr<std::string> Check(DatagramSigner& verifier, const std::string& d,
                                           size_t block) {
    return verifier.Verify(reinterpret_cast<const uint8_t*>(d.data()), block, d.size());
  }

  std::unique_ptr<TestCa> ca_;
};

TEST_F(DatagramSignerTest, ASignatureNamesTheSendersNode) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  EXPECT_EQ(n1->node_id(), "n1");
  size_t block = 0;
  const std::string d = Signed(*n1, 300, &block);
  for (int i = 0; i < 3; ++i) {
    auto node = Check(*n2, d, block);
    ASSERT_TRUE(node.ok()) << node.status();
    EXPECT_EQ(*node, "n1");
  }
  EXPECT_EQ(n2->stats().verified_datagrams, 3u);
  EXPECT_EQ(n2->stats().chains_checked, 1u) << "a chain seen before is not checked again";
}

TEST_F(DatagramSignerTest, EveryAlteredByteIsRefused) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  size_t block = 0;
  const std::string d = Signed(*n1, 120, &block);
  std::mt19937_64 rng(7);
  for (size_t i = 0; i < d.size(); ++i) {
    std::string altered = d;
    altered[i] = static_cast<char>(altered[i] ^ (1 + rng() % 255));
    auto node = Check(*n2, altered, block);
    EXPECT_FALSE(node.ok()) << "byte " << i << " of " << d.size() << " altered, yet accepted";
  }
  // Cut short, or with bytes after the block.
  EXPECT_EQ(Check(*n2, d.substr(0, d.size() - 1), block).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Check(*n2, d + "x", block).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DatagramSignerTest, AnotherCaOrNoNodeIsRefused) {
  auto n2 = SignerFor("n2");
  auto other_ca = TestCa::Create("", "other-ca");
  ASSERT_TRUE(other_ca.ok());
  auto rogue_files = (*other_ca)->IssueNode("n1");
  ASSERT_TRUE(rogue_files.ok());
  auto rogue = DatagramSigner::Create(*rogue_files);
  ASSERT_TRUE(rogue.ok()) << rogue.status();
  size_t block = 0;
  const std::string d = Signed(**rogue, 100, &block);
  auto refused = Check(*n2, d, block);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("does not verify against the CA"));

  auto operator_files = ca_->Issue("operator", {});
  ASSERT_TRUE(operator_files.ok());
  auto no_node = DatagramSigner::Create(*operator_files);
  EXPECT_EQ(no_node.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_node.status().message()), HasSubstr("names no node"));
  auto n3_files = ca_->IssueNode("n3");
  ASSERT_TRUE(n3_files.ok());
  auto other_node = DatagramSigner::Create(*n3_files, "n4");
  EXPECT_EQ(other_node.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(other_node.status().message()),
              HasSubstr("names node 'n3', not this daemon's node 'n4'"));
}

// Certificates are read again every refresh_s: a rotated one of the same node is taken, one
// naming another node is not (the one held stays in use).
TEST_F(DatagramSignerTest, ARotatedCertificateOfAnotherNodeIsNotTaken) {
  auto files = ca_->IssueNode("n5");
  ASSERT_TRUE(files.ok());
  files->refresh_s = 1;
  auto signer = DatagramSigner::Create(*files);
  ASSERT_TRUE(signer.ok()) << signer.status();
  auto verifier = SignerFor("n2");
  // The chain a datagram carries (its identity block's first field).
  auto chain_of = [&](std::string* node) {
    size_t block = 0;
    const std::string d = Signed(**signer, 64, &block);
    auto checked = Check(*verifier, d, block);
    EXPECT_TRUE(checked.ok()) << checked.status();
    *node = checked.value_or("?");
    const size_t chain_bytes =
        static_cast<uint8_t>(d[block]) | (static_cast<uint8_t>(d[block + 1]) << 8);
    return d.substr(block, 2 + chain_bytes);
  };
  std::string node;
  const std::string first = chain_of(&node);
  EXPECT_EQ(node, "n5");
  // A new certificate of n5 in place: taken once refresh_s has passed.
  ASSERT_TRUE(ca_->IssueNode("n5").ok());
  absl::SleepFor(absl::Milliseconds(1100));
  const std::string second = chain_of(&node);
  EXPECT_EQ(node, "n5");
  EXPECT_NE(second, first) << "the rotated certificate was not read";
  // n6's certificate in its place: not taken.
  auto other = ca_->IssueNode("n6");
  ASSERT_TRUE(other.ok());
  std::filesystem::copy_file(other->cert_file, files->cert_file,
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(other->key_file, files->key_file,
                             std::filesystem::copy_options::overwrite_existing);
  absl::SleepFor(absl::Milliseconds(1100));
  EXPECT_EQ(chain_of(&node), second);
  EXPECT_EQ(node, "n5");
  EXPECT_EQ((*signer)->node_id(), "n5");
}

// What a signed datagram costs here: one signature on the sender, one verification (its chain
// cached) on the receiver. Printed, for the record; bounded loosely, so that a loaded machine
// does not fail it.
TEST_F(DatagramSignerTest, CostPerDatagram) {
  auto n1 = SignerFor("n1");
  auto n2 = SignerFor("n2");
  constexpr int kDatagrams = 300;
  std::vector<std::string> signed_datagrams;
  size_t block = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kDatagrams; ++i) signed_datagrams.push_back(Signed(*n1, 200, &block));
  const auto t1 = std::chrono::steady_clock::now();
  for (const std::string& d : signed_datagrams) ASSERT_TRUE(Check(*n2, d, block).ok());
  const auto t2 = std::chrono::steady_clock::now();
  const double sign_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / kDatagrams;
  const double verify_us = std::chrono::duration<double, std::micro>(t2 - t1).count() / kDatagrams;
  std::printf("per datagram: sign %.1f us, verify %.1f us; identity block %zu bytes\n", sign_us,
              verify_us, signed_datagrams[0].size() - block);
  EXPECT_LT(sign_us + verify_us, 20000.0);
}

}  // namespace
}  // namespace tessera
