// Reading sealed snapshots without registering their rank (Client::ReadManifest and ReadRange)
// against a real tesserad: a client that registers nothing reads the manifests and random
// ranges of a live writer's snapshots bit-exact, while the writer keeps the rank; damage, a
// reused slot and bad requests each give their own error.
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "agent/client.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/admin.grpc.pb.h"
#include "proto/manifest.pb.h"
#include "tests/harness.h"
#include "tests/trainer_state.h"

namespace tessera::testing {
namespace {

constexpr uint64_t kBlockBytes = uint64_t{8} << 20;  // the agent's CRC block size

// The valid bytes of each entry, by name, as one step snapshotted them.
using Saved = std::map<std::string, std::vector<uint8_t>>;

class ReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = TestSeed();
    rng_.seed(seed_);
    daemon_ = std::make_unique<DaemonProcess>(root_.path(), "n0", uint64_t{512} << 20);
    std::string error;
    ASSERT_TRUE(daemon_->Start(&error)) << error;
    writer_ = Connect();
    reader_ = Connect();
    ASSERT_TRUE(writer_ && reader_);
    // Small tensors of several dtypes, one of 2.6 CRC blocks, and the blob "user_state".
    state_ = MakeState(seed_, 5, 100, 1 << 20, 4 << 20);
    StateEntry big = MakeState(seed_ + 1, 1, 21 << 20, 21 << 20, 21 << 20)[0];
    big.spec.set_name("big");
    state_.insert(state_.begin(), std::move(big));
  }

  std::unique_ptr<Client> Connect() {
    Client::Options options;
    options.socket_path = daemon_->socket_path();
    options.use_gpu = false;
    options.when_busy = Client::BusyPolicy::kWait;
    auto c = Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // New random bytes in every entry (a new blob length below its capacity) and a snapshot of
  // `step` by `writer`; returns the valid bytes snapshotted.
  Saved SnapshotRandom(Client* writer, int64_t step) {
    Saved saved;
    for (size_t i = 0; i < state_.size(); ++i) {
      StateEntry& e = state_[i];
      for (uint8_t& b : e.bytes) b = static_cast<uint8_t>(rng_());
      if (e.spec.kind() == ENTRY_KIND_BLOB) {
        e.length = 1 + rng_() % (e.bytes.size() / 2);
        EXPECT_TRUE(writer->UpdateEntry(i, e.bytes.data(), e.length).ok());
      }
      saved[e.spec.name()].assign(e.bytes.begin(), e.bytes.begin() + e.length);
    }
    EXPECT_TRUE(writer->Snapshot(step).ok());
    EXPECT_TRUE(writer->Wait().ok());
    return saved;
  }

  // Every entry's whole valid bytes, its edges, ranges around its block boundaries and random
  // ranges, read by reader_, equal `saved` (the bytes of [offset, +length) of the entry).
  void ExpectRangesMatch(const std::string& job, uint32_t rank, int64_t step, const Saved& saved) {
    for (const auto& [name, bytes] : saved) {
      const uint64_t n = bytes.size();
      std::vector<std::pair<uint64_t, uint64_t>> ranges = {{0, n}, {0, 1}, {n - 1, 1}, {n, 0}};
      for (uint64_t edge = kBlockBytes; edge < n; edge += kBlockBytes) {
        ranges.push_back({edge - 3, std::min<uint64_t>(7, n - edge + 3)});
        ranges.push_back({edge, n - edge});
      }
      for (int i = 0; i < 20; ++i) {
        const uint64_t offset = rng_() % n;
        ranges.push_back({offset, rng_() % (n - offset + 1)});
      }
      for (const auto& [offset, length] : ranges) {
        SCOPED_TRACE(absl::StrCat("seed ", seed_, ": step ", step, " '", name, "' [", offset, ", +",
                                  length, ")"));
        std::vector<uint8_t> out(length + 1, 0x5A);
        const absl::Status read =
            reader_->ReadRange(job, rank, step, name, offset, length, out.data());
        ASSERT_TRUE(read.ok()) << read;
        EXPECT_EQ(0, std::memcmp(out.data(), bytes.data() + offset, length));
        EXPECT_EQ(out[length], 0x5A) << "written past the range";
      }
    }
  }

  // Flips the byte at `offset` of the payload of (job, 0, step), through the admin Corrupt RPC.
  void CorruptPayload(const std::string& job, int64_t step, uint64_t offset) {
    auto admin = admin::Admin::NewStub(
        grpc::CreateChannel("unix:" + daemon_->socket_path(), grpc::InsecureChannelCredentials()));
    admin::CorruptRequest request;
    request.set_job_id(job);
    request.set_step(step);
    request.set_target(admin::CorruptRequest::SLOT);
    request.set_offset(offset);
    request.set_yes(true);
    admin::CorruptResponse response;
    grpc::ClientContext context;
    const grpc::Status status = admin->Corrupt(&context, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(response.offset(), offset);
  }

  const ManifestEntry& Find(const ShardManifest& manifest, const std::string& name) {
    for (const ManifestEntry& m : manifest.entries()) {
      if (m.spec().name() == name) return m;
    }
    ADD_FAILURE() << "no entry '" << name << "' in the manifest";
    return manifest.entries(0);
  }

  uint64_t seed_;
  std::mt19937_64 rng_;
  TempRoot root_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> writer_, reader_;
  std::vector<StateEntry> state_;
};

// The writer keeps its rank registered throughout: the reader claims nothing.
TEST_F(ReaderTest, AClientThatNeverRegistersReadsManifestsAndRangesBitExact) {
  ASSERT_TRUE(writer_->Register("live", 0, 1, ClientEntries(&state_)).ok());
  const Saved first = SnapshotRandom(writer_.get(), 1);
  absl::StatusOr<ShardManifest> manifest = reader_->ReadManifest("live", 0, 1);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->step(), 1);
  EXPECT_EQ(Find(*manifest, "user_state").length(), first.at("user_state").size());
  ExpectRangesMatch("live", 0, 1, first);

  // Step 2 is sealed into the other slot; the newest step is read without knowing it.
  const Saved second = SnapshotRandom(writer_.get(), 2);
  manifest = reader_->ReadManifest("live", 0, -1);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->step(), 2);
  EXPECT_EQ(manifest->job_id(), "live");
  EXPECT_EQ(manifest->rank(), 0u);
  EXPECT_EQ(manifest->world_size(), 1u);
  EXPECT_FALSE(manifest->has_data_parallel());
  EXPECT_EQ(manifest->crc_block_bytes(), kBlockBytes);
  ASSERT_EQ(manifest->entries_size(), static_cast<int>(state_.size()));
  for (size_t i = 0; i < state_.size(); ++i) {
    const ManifestEntry& m = manifest->entries(static_cast<int>(i));
    EXPECT_EQ(m.spec().SerializeAsString(), state_[i].spec.SerializeAsString())
        << "entry " << i << ": " << m.spec().ShortDebugString();
    EXPECT_EQ(m.length(), second.at(state_[i].spec.name()).size()) << state_[i].spec.name();
  }
  ExpectRangesMatch("live", 0, 2, second);

  // The rank was never the reader's: the writer snapshots on, and the reader sees it.
  const Saved third = SnapshotRandom(writer_.get(), 3);
  manifest = reader_->ReadManifest("live", 0, -1);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->step(), 3);
  ExpectRangesMatch("live", 0, 3, third);
}

// Step 3 goes into the slot of step 1, which the reader has open (cached). Its next read of
// step 1 fails the block checks, asks the daemon again, and says the step is gone; it never
// returns step 3's bytes.
TEST_F(ReaderTest, ReadsOfAStepWhoseSlotWasReusedFailInsteadOfReturningOtherBytes) {
  ASSERT_TRUE(writer_->Register("reused", 0, 1, ClientEntries(&state_)).ok());
  const Saved first = SnapshotRandom(writer_.get(), 1);
  ExpectRangesMatch("reused", 0, 1, first);
  SnapshotRandom(writer_.get(), 2);
  const Saved third = SnapshotRandom(writer_.get(), 3);
  for (const auto& [name, bytes] : first) {
    std::vector<uint8_t> out(bytes.size());
    const absl::Status read = reader_->ReadRange("reused", 0, 1, name, 0, out.size(), out.data());
    EXPECT_EQ(read.code(), absl::StatusCode::kNotFound) << read;
    EXPECT_TRUE(absl::StrContains(read.message(), "no sealed step 1")) << read;
  }
  EXPECT_EQ(reader_->ReadManifest("reused", 0, 1).status().code(), absl::StatusCode::kNotFound);
  ExpectRangesMatch("reused", 0, 3, third);
}

// A byte changed inside an entry fails exactly the ranges that overlap its CRC block, here and
// then on the daemon, naming job, rank, step, entry and block. The manifest and every other
// range still verify: the layout check reads no entry bytes. A byte changed outside the entries
// (in a blob's unused capacity) fails the payload checksum, and with it every read.
TEST_F(ReaderTest, ADamagedBlockFailsTheRangesOverItAndOnlyThose) {
  ASSERT_TRUE(writer_->Register("damaged", 0, 1, ClientEntries(&state_)).ok());
  const Saved saved = SnapshotRandom(writer_.get(), 1);
  absl::StatusOr<ShardManifest> manifest = reader_->ReadManifest("damaged", 0, 1);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  const ManifestEntry& big = Find(*manifest, "big");
  const uint64_t bad = kBlockBytes + rng_() % kBlockBytes;  // in block 1 of "big"
  CorruptPayload("damaged", 1, big.offset() + bad);

  for (const auto& [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {bad, 1}, {kBlockBytes - 5, 10}, {0, big.length()}, {bad - 100, 200}}) {
    SCOPED_TRACE(absl::StrCat("seed ", seed_, ": [", offset, ", +", length, ")"));
    std::vector<uint8_t> out(length);
    const absl::Status read =
        reader_->ReadRange("damaged", 0, 1, "big", offset, length, out.data());
    EXPECT_EQ(read.code(), absl::StatusCode::kDataLoss) << read;
    EXPECT_TRUE(absl::StrContains(read.message(),
                                  "job 'damaged' rank 0 step 1 entry 'big': block 1 (bytes "
                                  "[8388608, 16777216) of the entry) has CRC32C"))
        << read;
    EXPECT_TRUE(absl::StrContains(read.message(), "with the daemon checking the snapshot first"))
        << read;
    EXPECT_TRUE(absl::StrContains(read.message(), "payload CRC32C")) << read;
  }
  ASSERT_TRUE(reader_->ReadManifest("damaged", 0, 1).ok());
  Saved elsewhere = saved;
  elsewhere.erase("big");
  ExpectRangesMatch("damaged", 0, 1, elsewhere);
  for (const auto& [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {0, kBlockBytes}, {2 * kBlockBytes, big.length() - 2 * kBlockBytes}}) {
    std::vector<uint8_t> out(length);
    ASSERT_TRUE(reader_->ReadRange("damaged", 0, 1, "big", offset, length, out.data()).ok());
    EXPECT_EQ(0, std::memcmp(out.data(), saved.at("big").data() + offset, length));
  }

  const ManifestEntry& blob = Find(*manifest, "user_state");
  CorruptPayload("damaged", 1, blob.offset() + blob.length() + rng_() % 16);
  const absl::Status layout = reader_->ReadManifest("damaged", 0, 1).status();
  EXPECT_EQ(layout.code(), absl::StatusCode::kDataLoss) << layout;
  EXPECT_TRUE(absl::StrContains(layout.message(), "the payload's CRC32C")) << layout;
  std::vector<uint8_t> out(1);
  const absl::Status read = reader_->ReadRange("damaged", 0, 1, "user_state", 0, 1, out.data());
  EXPECT_EQ(read.code(), absl::StatusCode::kDataLoss) << read;
}

TEST_F(ReaderTest, BadRequestsGetTheirOwnCodes) {
  ASSERT_TRUE(writer_->Register("bad", 0, 1, ClientEntries(&state_)).ok());
  const Saved saved = SnapshotRandom(writer_.get(), 4);
  const uint64_t blob = saved.at("user_state").size();
  std::vector<uint8_t> out(16);
  auto read = [&](int64_t step, const std::string& entry, uint64_t offset, uint64_t length,
                  void* dst) {
    return reader_->ReadRange("bad", 0, step, entry, offset, length, dst);
  };

  absl::Status s = read(4, "nope", 0, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(absl::StrContains(s.message(),
                                "job 'bad' rank 0 step 4 has no entry 'nope'; it "
                                "has 7: 'big', 'layer0."))
      << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "'user_state'")) << s;
  // Past the blob's valid length, though within its capacity.
  s = read(4, "user_state", blob, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat("entry 'user_state' holds ", blob,
                                                          " valid bytes: the range [", blob,
                                                          ", +1) must lie "
                                                          "within [0, ",
                                                          blob, ")")))
      << s;
  s = read(4, "user_state", 1, ~uint64_t{0}, out.data());  // offset + length wraps
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = read(4, "user_state", ~uint64_t{0}, 2, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(read(4, "user_state", blob, 0, nullptr).ok());  // nothing, at the very end
  s = read(4, "user_state", 0, 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = read(-1, "user_state", 0, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;

  s = read(5, "user_state", 0, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "no sealed step 5; sealed steps here: 4")) << s;
  s = reader_->ReadManifest("bad", 0, 5).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  s = reader_->ReadManifest("bad", 0, -2).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = reader_->ReadManifest("bad", 1, -1).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  s = reader_->ReadManifest("unknown-job", 0, -1).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  s = reader_->ReadManifest("bad job", 0, -1).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  // None of it disturbed the next read.
  ExpectRangesMatch("bad", 0, 4, saved);
}

// Under data parallelism each member stores a slice of every replicated tensor. The manifests
// say which: the slices of all members tile each tensor, and reading each member's stored bytes
// into place rebuilds it.
TEST_F(ReaderTest, DpShardedManifestsSayWhichRankStoresWhichBytes) {
  std::vector<bool> replicated;
  for (const StateEntry& e : state_) replicated.push_back(e.spec.kind() == ENTRY_KIND_TENSOR);
  std::unique_ptr<Client> other = Connect();
  ASSERT_NE(other, nullptr);
  Client* members[] = {writer_.get(), other.get()};
  for (uint32_t r = 0; r < 2; ++r) {
    ASSERT_TRUE(members[r]->SetDataParallel({{0, 1}, replicated}).ok());
    ASSERT_TRUE(members[r]->Register("dp", r, 2, ClientEntries(&state_)).ok());
  }
  const Saved saved = SnapshotRandom(writer_.get(), 1);
  ASSERT_TRUE(
      other->UpdateEntry(state_.size() - 1, state_.back().bytes.data(), state_.back().length).ok());
  ASSERT_TRUE(other->Snapshot(1).ok());
  ASSERT_TRUE(other->Wait().ok());

  std::map<std::string, std::vector<uint8_t>> rebuilt;
  std::map<std::string, uint64_t> covered;
  for (uint32_t r = 0; r < 2; ++r) {
    absl::StatusOr<ShardManifest> manifest = reader_->ReadManifest("dp", r, -1);
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    ASSERT_TRUE(manifest->has_data_parallel());
    EXPECT_EQ(manifest->data_parallel().dp_rank(), r);
    EXPECT_EQ(manifest->data_parallel().dp_size(), 2u);
    for (const ManifestEntry& m : manifest->entries()) {
      const std::string& name = m.spec().name();
      const std::vector<uint8_t>& want = saved.at(name);
      EXPECT_EQ(m.spec().has_slice(), m.spec().kind() == ENTRY_KIND_TENSOR) << name;
      const uint64_t at = m.spec().has_slice() ? m.spec().slice().offset() : 0;
      ASSERT_LE(at + m.length(), want.size()) << name;
      std::vector<uint8_t>& into = rebuilt[name];
      into.resize(want.size(), 0);
      ASSERT_TRUE(reader_->ReadRange("dp", r, 1, name, 0, m.length(), into.data() + at).ok());
      covered[name] += m.length();
    }
  }
  for (const auto& [name, want] : saved) {
    const bool replicated_entry = name != "user_state";
    EXPECT_EQ(covered[name], replicated_entry ? want.size() : 2 * want.size()) << name;
    EXPECT_TRUE(rebuilt[name] == want) << name << " (seed " << seed_ << ")";
  }
}

}  // namespace
}  // namespace tessera::testing
