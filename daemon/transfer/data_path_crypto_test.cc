// The data path's record codec on its own, with each AES-GCM library that runs here: records
// round-trip in pieces of any size, and a record altered, replayed, reordered, dropped, or sealed
// with another key is refused, after which the direction stays refused. And the libraries make
// the same records, byte for byte, and open each other's.
#include "daemon/transfer/data_path_crypto.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

// Which libraries run here, for the tests to say what they skip.
std::string LibrariesHere() {
  std::string out;
  for (GcmLibrary library : {GcmLibrary::kOpenSsl, GcmLibrary::kIpsecMb}) {
    out += GcmLibraryId(library) + ": " +
           (GcmLibraryAvailable(library) ? GcmLibraryDescription(library) : "not available") + "; ";
  }
  return out;
}

class DataPathCryptoTest : public ::testing::TestWithParam<GcmLibrary> {
 protected:
  void SetUp() override {
    if (!GcmLibraryAvailable(GetParam())) {
      GTEST_SKIP() << GcmLibraryId(GetParam()) << " does not run here (" << LibrariesHere() << ")";
    }
    ASSERT_TRUE(UseGcmLibrary(GetParam()).ok());
    std::printf("library: %s\n", GcmLibraryDescription(GetParam()).c_str());
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
    auto secret = RandomSecret(kDataPathSecretBytes);
    ASSERT_TRUE(secret.ok());
    const std::string session = DeriveSessionKey(*secret, "n1");
    keys_ = DeriveConnectionKeys(session, "n1", std::string(32, 'c'), std::string(32, 's'));
  }

  std::string RandomBytes(size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng_() & 0xff);
    return s;
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  ConnectionKeys keys_;
};

TEST_P(DataPathCryptoTest, KeysDependOnNodeNoncesAndDirection) {
  const std::string secret(32, 'k');
  EXPECT_EQ(DeriveSessionKey(secret, "n1").size(), 32u);
  EXPECT_EQ(DeriveSessionKey(secret, "n1"), DeriveSessionKey(secret, "n1"));
  EXPECT_NE(DeriveSessionKey(secret, "n1"), DeriveSessionKey(secret, "n2"));
  EXPECT_NE(DeriveSessionKey(secret, "n1"), DeriveSessionKey(std::string(32, 'K'), "n1"));
  const std::string session = DeriveSessionKey(secret, "n1");
  const std::string a(32, 'a'), b(32, 'b');
  const ConnectionKeys k1 = DeriveConnectionKeys(session, "n1", a, b);
  EXPECT_EQ(k1.client_to_server.size(), 32u);
  EXPECT_EQ(k1.server_to_client.size(), 32u);
  EXPECT_NE(k1.client_to_server, k1.server_to_client);
  EXPECT_EQ(DeriveConnectionKeys(session, "n1", a, b).client_to_server, k1.client_to_server);
  EXPECT_NE(DeriveConnectionKeys(session, "n1", b, b).client_to_server, k1.client_to_server);
  EXPECT_NE(DeriveConnectionKeys(session, "n1", a, a).client_to_server, k1.client_to_server);
  EXPECT_NE(DeriveConnectionKeys(session, "n2", a, b).client_to_server, k1.client_to_server);
}

TEST_P(DataPathCryptoTest, RecordsRoundTripInPiecesAndHideThePlaintext) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  RecordOpener opener(keys_.client_to_server, "from test");
  for (size_t size : {size_t{1}, size_t{4}, size_t{16}, size_t{65536}, size_t{1} << 20,
                      (size_t{3} << 20) + 17, kMaxRecordBytes}) {
    SCOPED_TRACE(size);
    const std::string plain = RandomBytes(size);
    // Sealed in random pieces, opened in other random pieces, in place.
    std::vector<uint8_t> wire(kRecordHeaderBytes + size + kRecordTagBytes);
    ASSERT_TRUE(sealer.Begin(size, wire.data()).ok());
    for (size_t pos = 0; pos < size;) {
      const size_t n = std::min<size_t>(size - pos, 1 + rng_() % (size_t{1} << 18));
      sealer.Update(reinterpret_cast<const uint8_t*>(plain.data()) + pos,
                    wire.data() + kRecordHeaderBytes + pos, n);
      pos += n;
    }
    ASSERT_TRUE(sealer.Finish(wire.data() + kRecordHeaderBytes + size).ok());
    if (size >= 16) {
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(wire.data()) + kRecordHeaderBytes, size)
                    .find(plain.substr(0, 16)),
                std::string::npos)
          << "the plaintext shows in the record";
    }
    auto got = opener.Begin(wire.data());
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(*got, size);
    uint8_t* body = wire.data() + kRecordHeaderBytes;
    for (size_t pos = 0; pos < size;) {
      const size_t n = std::min<size_t>(size - pos, 1 + rng_() % (size_t{1} << 18));
      opener.Update(body + pos, n);
      pos += n;
    }
    ASSERT_TRUE(opener.Finish(body + size).ok());
    EXPECT_EQ(std::memcmp(body, plain.data(), size), 0);
  }
  EXPECT_EQ(sealer.records(), 7u);
  EXPECT_EQ(opener.records(), 7u);
}

TEST_P(DataPathCryptoTest, EveryAlteredByteIsRefused) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  const std::string plain = RandomBytes(300);
  auto record = sealer.Seal(plain);
  ASSERT_TRUE(record.ok());
  // Each byte of the header, the ciphertext and the tag, flipped in turn: none opens.
  for (size_t i = 0; i < record->size(); ++i) {
    std::string altered = *record;
    altered[i] ^= static_cast<char>(1 << (rng_() % 8));
    RecordOpener opener(keys_.client_to_server, "from test");
    auto opened = opener.Open(altered);
    ASSERT_FALSE(opened.ok()) << "byte " << i << " altered, yet the record opened";
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss) << opened.status();
  }
  RecordOpener opener(keys_.client_to_server, "from 10.0.0.9:7071");
  std::string altered = *record;
  altered[10] ^= 0x40;
  auto opened = opener.Open(altered);
  EXPECT_THAT(std::string(opened.status().message()),
              HasSubstr("data path record 0 (300 bytes) from 10.0.0.9:7071 does not "
                        "authenticate: it was altered, replayed, reordered or sealed with another "
                        "key"));
  // The direction is out of step from then on, even for a genuine record.
  EXPECT_EQ(opener.Open(*record).status().code(), absl::StatusCode::kDataLoss);
}

TEST_P(DataPathCryptoTest, ReplayedReorderedOrDroppedRecordsAreRefused) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  std::vector<std::string> records;
  for (int i = 0; i < 4; ++i) records.push_back(*sealer.Seal(RandomBytes(100 + i)));
  {  // in order: all open
    RecordOpener opener(keys_.client_to_server, "from test");
    for (const std::string& r : records) ASSERT_TRUE(opener.Open(r).ok());
  }
  {  // replayed
    RecordOpener opener(keys_.client_to_server, "from test");
    ASSERT_TRUE(opener.Open(records[0]).ok());
    auto replay = opener.Open(records[0]);
    EXPECT_EQ(replay.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(replay.status().message()), HasSubstr("record 1"));
  }
  {  // reordered
    RecordOpener opener(keys_.client_to_server, "from test");
    EXPECT_EQ(opener.Open(records[1]).status().code(), absl::StatusCode::kDataLoss);
  }
  {  // one dropped
    RecordOpener opener(keys_.client_to_server, "from test");
    ASSERT_TRUE(opener.Open(records[0]).ok());
    EXPECT_EQ(opener.Open(records[2]).status().code(), absl::StatusCode::kDataLoss);
  }
  {  // from another connection (other nonces), or the other direction: another key
    const ConnectionKeys other =
        DeriveConnectionKeys(DeriveSessionKey(std::string(32, 'x'), "n1"), "n1",
                             std::string(32, 'c'), std::string(32, 't'));
    RecordOpener wrong_connection(other.client_to_server, "from test");
    EXPECT_EQ(wrong_connection.Open(records[0]).status().code(), absl::StatusCode::kDataLoss);
    RecordOpener wrong_direction(keys_.server_to_client, "from test");
    EXPECT_EQ(wrong_direction.Open(records[0]).status().code(), absl::StatusCode::kDataLoss);
  }
}

// Records sealed apart (on any thread, under reserved sequence numbers) are the records the
// streaming sealer would make at those places: a stream of both kinds opens in order either way,
// and a record opened apart under another sequence number, or altered, does not authenticate.
TEST_P(DataPathCryptoTest, RecordsSealedAndOpenedApartAreTheStreamsRecords) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  RecordOpener opener(keys_.client_to_server, "from test");
  std::vector<std::string> plains;
  std::vector<std::vector<uint8_t>> wires;
  for (int i = 0; i < 12; ++i) {
    const std::string plain = RandomBytes(1 + rng_() % (size_t{300} << 10));
    std::vector<uint8_t> wire(kRecordHeaderBytes + plain.size() + kRecordTagBytes);
    if (i % 3 == 0) {  // the streaming sealer
      auto record = sealer.Seal(plain);
      ASSERT_TRUE(record.ok());
      std::memcpy(wire.data(), record->data(), wire.size());
    } else {  // reserved, and sealed apart
      auto sequence = sealer.Reserve(1);
      ASSERT_TRUE(sequence.ok());
      EXPECT_EQ(*sequence, static_cast<uint64_t>(i));
      SealRecordAt(sealer.key(), *sequence, reinterpret_cast<const uint8_t*>(plain.data()),
                   plain.size(), wire.data());
    }
    plains.push_back(plain);
    wires.push_back(std::move(wire));
  }
  EXPECT_EQ(sealer.records(), 12u);
  for (size_t i = 0; i < wires.size(); ++i) {
    SCOPED_TRACE(i);
    std::vector<uint8_t>& wire = wires[i];
    const size_t n = plains[i].size();
    if (i % 2 == 0) {  // the streaming opener
      auto opened = opener.Open(std::string(wire.begin(), wire.end()));
      ASSERT_TRUE(opened.ok()) << opened.status();
      EXPECT_EQ(*opened, plains[i]);
      continue;
    }
    uint64_t sequence = 0;
    auto size = opener.BeginAt(wire.data(), &sequence);
    ASSERT_TRUE(size.ok()) << size.status();
    ASSERT_EQ(*size, n);
    EXPECT_EQ(sequence, i);
    uint8_t* body = wire.data() + kRecordHeaderBytes;
    std::vector<uint8_t> copy(body, body + n);
    EXPECT_FALSE(OpenRecordAt(opener.key(), sequence + 1, copy.data(), n, body + n))
        << "opened under the next record's nonce";
    copy.assign(body, body + n);
    copy[rng_() % n] ^= 0x20;
    EXPECT_FALSE(OpenRecordAt(opener.key(), sequence, copy.data(), n, body + n)) << "altered";
    ASSERT_TRUE(OpenRecordAt(opener.key(), sequence, body, n, body + n));
    EXPECT_EQ(std::memcmp(body, plains[i].data(), n), 0);
  }
  EXPECT_EQ(opener.records(), 12u);
  // A failure reported for a record opened apart breaks the direction, as Finish's does.
  const absl::Status failed = opener.Failed(7, 4096);
  EXPECT_EQ(failed.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(failed.message()),
              HasSubstr("data path record 7 (4096 bytes) from test does not authenticate"));
  auto next = sealer.Seal("after");
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(opener.Open(*next).status().code(), absl::StatusCode::kDataLoss);
}

TEST_P(DataPathCryptoTest, ReservingPastTheLimitIsRefused) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  ASSERT_TRUE(sealer.Reserve(kMaxRecordsPerDirection - 1).ok());
  auto refused = sealer.Reserve(2);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("open a new connection"));
  auto last = sealer.Reserve(1);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, kMaxRecordsPerDirection - 1);
  uint8_t header[kRecordHeaderBytes];
  EXPECT_EQ(sealer.Begin(1, header).code(), absl::StatusCode::kResourceExhausted);
}

TEST_P(DataPathCryptoTest, SizesOutOfRangeAreRefused) {
  RecordSealer sealer(keys_.client_to_server, "to test");
  uint8_t header[kRecordHeaderBytes];
  EXPECT_EQ(sealer.Begin(0, header).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sealer.Begin(kMaxRecordBytes + 1, header).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(sealer.Begin(10, header).ok());
  uint8_t data[10] = {};
  sealer.Update(data, data, 5);
  uint8_t tag[kRecordTagBytes];
  EXPECT_EQ(sealer.Finish(tag).code(), absl::StatusCode::kInternal) << "5 of 10 bytes sealed";

  RecordOpener opener(keys_.client_to_server, "from test");
  const uint8_t huge[kRecordHeaderBytes] = {0xff, 0xff, 0xff, 0x7f};
  auto refused = opener.Begin(huge);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("not encrypted"));
  EXPECT_EQ(opener.Open(std::string(3, 'x')).status().code(), absl::StatusCode::kDataLoss);
}

INSTANTIATE_TEST_SUITE_P(Libraries, DataPathCryptoTest,
                         ::testing::Values(GcmLibrary::kOpenSsl, GcmLibrary::kIpsecMb),
                         [](const ::testing::TestParamInfo<GcmLibrary>& info) {
                           return info.param == GcmLibrary::kOpenSsl ? "OpenSsl" : "IpsecMb";
                         });

// Records sealed by one library are byte for byte those of the other, whole or streamed in
// pieces, and each opens the other's; an altered byte is refused by both. So the two ends of a
// connection may use either.
TEST(GcmLibrariesTest, BothLibrariesMakeTheSameRecordsAndOpenEachOthers) {
  if (!GcmLibraryAvailable(GcmLibrary::kIpsecMb)) {
    GTEST_SKIP() << "only one library runs here (" << LibrariesHere() << ")";
  }
  const uint64_t seed = std::random_device{}();
  std::printf("seed=%llu; %s\n", static_cast<unsigned long long>(seed), LibrariesHere().c_str());
  std::mt19937_64 rng(seed);
  const auto random_bytes = [&](size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng() & 0xff);
    return s;
  };
  const GcmLibrary libraries[2] = {GcmLibrary::kOpenSsl, GcmLibrary::kIpsecMb};
  for (size_t size : {size_t{1}, size_t{3}, size_t{15}, size_t{16}, size_t{17}, size_t{255},
                      size_t{4103}, size_t{256} << 10, (size_t{1} << 20) + 13}) {
    for (int sealed_by = 0; sealed_by < 2; ++sealed_by) {
      const GcmLibrary sealer_library = libraries[sealed_by];
      const GcmLibrary opener_library = libraries[1 - sealed_by];
      SCOPED_TRACE(testing::Message()
                   << size << " bytes sealed by " << GcmLibraryId(sealer_library));
      const std::string key = random_bytes(32);
      const std::string plain = random_bytes(size);
      const auto* in = reinterpret_cast<const uint8_t*>(plain.data());
      const size_t wire_bytes = kRecordHeaderBytes + size + kRecordTagBytes;
      // Whole records, at a sequence number anywhere in the direction's range.
      const uint64_t far = rng() % kMaxRecordsPerDirection;
      std::vector<uint8_t> wire[2];
      for (int by = 0; by < 2; ++by) {
        ASSERT_TRUE(UseGcmLibrary(libraries[by]).ok());
        wire[by].resize(wire_bytes);
        SealRecordAt(key, far, in, size, wire[by].data());
      }
      ASSERT_EQ(wire[0], wire[1]) << "the libraries sealed different records";
      ASSERT_TRUE(UseGcmLibrary(opener_library).ok());
      std::vector<uint8_t> body(wire[0].begin() + kRecordHeaderBytes,
                                wire[0].begin() + kRecordHeaderBytes + size);
      ASSERT_TRUE(OpenRecordAt(key, far, body.data(), size, wire[0].data() + wire_bytes - 16));
      ASSERT_EQ(std::memcmp(body.data(), in, size), 0);
      // One byte of the ciphertext or the tag altered: refused by both.
      const size_t at = kRecordHeaderBytes + rng() % (size + kRecordTagBytes);
      std::vector<uint8_t> altered = wire[0];
      altered[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
      for (GcmLibrary library : libraries) {
        ASSERT_TRUE(UseGcmLibrary(library).ok());
        std::vector<uint8_t> copy = altered;
        EXPECT_FALSE(OpenRecordAt(key, far, copy.data() + kRecordHeaderBytes, size,
                                  copy.data() + wire_bytes - 16))
            << "byte " << at << " altered, yet " << GcmLibraryId(library) << " opened it";
      }
      // The streaming sealer of one library, fed random pieces, makes the record the other seals
      // whole; the other's streaming opener opens it, in random pieces.
      const uint64_t near = rng() % 8;
      ASSERT_TRUE(UseGcmLibrary(opener_library).ok());
      std::vector<uint8_t> whole(wire_bytes);
      SealRecordAt(key, near, in, size, whole.data());
      ASSERT_TRUE(UseGcmLibrary(sealer_library).ok());
      RecordSealer sealer(key, "to test");
      ASSERT_TRUE(sealer.Reserve(near).ok());
      std::vector<uint8_t> streamed(wire_bytes);
      ASSERT_TRUE(sealer.Begin(size, streamed.data()).ok());
      for (size_t pos = 0; pos < size;) {
        const size_t n = std::min<size_t>(size - pos, 1 + rng() % 70000);
        sealer.Update(in + pos, streamed.data() + kRecordHeaderBytes + pos, n);
        pos += n;
      }
      ASSERT_TRUE(sealer.Finish(streamed.data() + kRecordHeaderBytes + size).ok());
      ASSERT_EQ(streamed, whole) << "the streaming sealer made another record";
      ASSERT_TRUE(UseGcmLibrary(opener_library).ok());
      RecordOpener opener(key, "from test");
      const uint8_t one_byte[kRecordHeaderBytes] = {1, 0, 0, 0};
      uint64_t skipped = 0;
      for (uint64_t i = 0; i < near; ++i) ASSERT_TRUE(opener.BeginAt(one_byte, &skipped).ok());
      ASSERT_EQ(opener.Begin(streamed.data()).value_or(0), size);
      uint8_t* streamed_body = streamed.data() + kRecordHeaderBytes;
      for (size_t pos = 0; pos < size;) {
        const size_t n = std::min<size_t>(size - pos, 1 + rng() % 70000);
        opener.Update(streamed_body + pos, n);
        pos += n;
      }
      ASSERT_TRUE(opener.Finish(streamed_body + size).ok());
      ASSERT_EQ(std::memcmp(streamed_body, in, size), 0);
    }
  }
  ASSERT_TRUE(UseGcmLibrary(FastestGcmLibrary()).ok());
}

TEST(GcmLibrariesTest, NamesParseAndALibraryThatDoesNotRunIsRefused) {
  for (GcmLibrary library : {GcmLibrary::kOpenSsl, GcmLibrary::kIpsecMb}) {
    auto parsed = ParseGcmLibrary(GcmLibraryId(library));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, library);
  }
  auto automatic = ParseGcmLibrary("auto");
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ(*automatic, FastestGcmLibrary());
  for (const char* id : {"boringssl", "", "OpenSSL", "auto "}) {
    auto bad = ParseGcmLibrary(id);
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << "'" << id << "'";
    EXPECT_THAT(std::string(bad.status().message()),
                HasSubstr(std::string("'") + id +
                          "' is not an AES-GCM library: 'auto' (the fastest here), 'openssl' or "
                          "'ipsec-mb'"));
  }
  EXPECT_TRUE(GcmLibraryAvailable(GcmLibrary::kOpenSsl));
  EXPECT_TRUE(UseGcmLibrary(GcmLibrary::kOpenSsl).ok());
  EXPECT_EQ(CurrentGcmLibrary(), GcmLibrary::kOpenSsl);
  const absl::Status ipsec = UseGcmLibrary(GcmLibrary::kIpsecMb);
  if (GcmLibraryAvailable(GcmLibrary::kIpsecMb)) {
    EXPECT_TRUE(ipsec.ok()) << ipsec;
    EXPECT_EQ(CurrentGcmLibrary(), GcmLibrary::kIpsecMb);
    EXPECT_THAT(GcmLibraryDescription(GcmLibrary::kIpsecMb), HasSubstr("Intel ipsec-mb"));
  } else {
    EXPECT_EQ(ipsec.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(ipsec.message()), HasSubstr("use 'openssl' or 'auto'"));
    EXPECT_EQ(CurrentGcmLibrary(), GcmLibrary::kOpenSsl) << "a refused choice changed nothing";
  }
  EXPECT_THAT(GcmLibraryDescription(GcmLibrary::kOpenSsl), HasSubstr("OpenSSL"));
  ASSERT_TRUE(UseGcmLibrary(FastestGcmLibrary()).ok());
}

}  // namespace
}  // namespace tessera
