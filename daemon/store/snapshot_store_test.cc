#include "daemon/store/snapshot_store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <functional>
#include <future>
#include <chrono>
#include <thread>

#include "common/crc32c.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

EntrySpec Tensor(const std::string& name, std::vector<int64_t> shape, const std::string& dtype = "float32") {
  EntrySpec e;
  e.set_name(name);
  e.set_dtype(dtype);
  uint64_t n = *DtypeItemBytes(dtype);
  for (int64_t d : shape) {
    e.add_shape(d);
    n *= d;
  }
  e.set_nbytes(n);
  e.set_kind(ENTRY_KIND_TENSOR);
  return e;
}

EntrySpec Blob(const std::string& name, uint64_t capacity) {
  EntrySpec e;
  e.set_name(name);
  e.set_dtype("bytes");
  e.set_nbytes(capacity);
  e.set_kind(ENTRY_KIND_BLOB);
  return e;
}

class SnapshotStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-store-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = std::string(tmpl) + "/node0";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
    entries_ = {Tensor("w", {3, 5}), Tensor("b", {7}, "bfloat16"), Blob("rng", 100),
                Tensor("big", {1000, 33}, "uint8")};
    OpenStore();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(std::filesystem::path(dir_).parent_path());
  }

  void OpenStore(uint64_t capacity = 64 << 20,
                 std::function<void(const std::string&, uint32_t)> before_slot_created = {},
                 bool clustered = false) {
    store_.reset();
    SnapshotStore::Options options;
    options.clustered = clustered;
    options.directory = dir_;
    options.capacity_bytes = capacity;
    options.crc_threads = 2;
    options.process_alive = [this](pid_t pid, uint64_t) { return alive_.count(pid) > 0; };
    options.before_slot_created = std::move(before_slot_created);
    auto opened = SnapshotStore::Open(options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
  }

  Caller Trainer(pid_t pid) {
    alive_.insert(pid);
    return Caller{getuid(), getgid(), pid};
  }

  // Does what the agent does: fills the slot with random bytes and writes the manifest.
  // Returns the bytes written for each entry.
  std::vector<std::string> WriteSnapshot(const SnapshotStore::RegisterResult& reg,
                                         uint32_t slot_index, int64_t step, uint32_t rank = 0,
                                         uint64_t blob_length = 37) {
    auto seg = Segment::Open(reg.slot_paths[slot_index], /*writable=*/true);
    EXPECT_TRUE(seg.ok()) << seg.status();
    ShardManifest m;
    m.set_layout_version(kSegmentLayoutVersion);
    m.set_job_id(job_);
    m.set_rank(rank);
    m.set_world_size(world_);
    m.set_step(step);
    m.set_data_bytes(reg.layout.data_bytes);
    std::vector<std::string> written;
    for (size_t i = 0; i < entries_.size(); ++i) {
      uint64_t len = entries_[i].kind() == ENTRY_KIND_BLOB ? blob_length : entries_[i].nbytes();
      std::string bytes(len, '\0');
      for (auto& c : bytes) c = static_cast<char>(rng_());
      std::memcpy((*seg)->payload() + reg.layout.entry_offsets[i], bytes.data(), len);
      written.push_back(bytes);
      ManifestEntry* e = m.add_entries();
      *e->mutable_spec() = entries_[i];
      e->set_offset(reg.layout.entry_offsets[i]);
      e->set_length(len);
    }
    std::string serialized = m.SerializeAsString();
    std::memcpy((*seg)->payload() + reg.layout.manifest_offset, serialized.data(), serialized.size());
    manifest_bytes_ = serialized.size();
    return written;
  }

  // Reads a restorable snapshot back and compares it with what was written.
  void ExpectRestores(uint32_t rank, int64_t step, const std::vector<std::string>& expected) {
    auto info = store_->PrepareRestore(job_, rank, -1);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->step, step);
    auto seg = Segment::Open(info->segment_path, false);
    ASSERT_TRUE(seg.ok());
    ShardManifest m;
    ASSERT_TRUE(m.ParseFromArray((*seg)->payload() + info->manifest_offset,
                                 static_cast<int>(info->manifest_bytes)));
    EXPECT_EQ(m.step(), step);
    ASSERT_EQ(m.entries_size(), static_cast<int>(expected.size()));
    for (int i = 0; i < m.entries_size(); ++i) {
      std::string got(reinterpret_cast<const char*>((*seg)->payload()) + m.entries(i).offset(),
                      m.entries(i).length());
      EXPECT_TRUE(got == expected[i]) << "entry " << i << " differs at step " << step;
    }
  }

  absl::StatusOr<SnapshotStore::RegisterResult> Register(const Caller& c, uint32_t rank = 0) {
    return store_->Register(job_, rank, world_, entries_, c);
  }

  std::string dir_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  std::set<pid_t> alive_;
  std::vector<EntrySpec> entries_;
  std::unique_ptr<SnapshotStore> store_;
  std::string job_ = "job-a";
  uint32_t world_ = 4;
  uint64_t manifest_bytes_ = 0;
};

TEST_F(SnapshotStoreTest, RegisterCreatesTwoPreallocatedSlotsOwnedByCaller) {
  auto reg = Register(Trainer(100));
  ASSERT_TRUE(reg.ok()) << reg.status();
  ASSERT_EQ(reg->slot_paths.size(), 2u);
  EXPECT_EQ(reg->newest_sealed_step, -1);
  for (const auto& p : reg->slot_paths) {
    struct stat st;
    ASSERT_EQ(stat(p.c_str(), &st), 0) << p;
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), reg->segment_bytes);
    EXPECT_EQ(st.st_uid, getuid());
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, reg->segment_bytes);  // preallocated
  }
  EXPECT_EQ(reg->layout.entry_offsets.size(), entries_.size());
  for (uint64_t off : reg->layout.entry_offsets) EXPECT_EQ(off % 256, 0u);
  EXPECT_EQ(store_->stats().used_bytes, 2 * reg->segment_bytes);
  // Idempotent.
  auto again = Register(Trainer(100));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->slot_paths, reg->slot_paths);
  EXPECT_EQ(store_->stats().used_bytes, 2 * reg->segment_bytes);
}

TEST_F(SnapshotStoreTest, SnapshotSealRestoreAlternatesSlotsAndKeepsNewest) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  ASSERT_TRUE(reg.ok());
  std::set<uint32_t> used_slots;
  for (int64_t step : {1, 2, 5, 9}) {
    auto slot = store_->BeginSnapshot(job_, 0, step, t);
    ASSERT_TRUE(slot.ok()) << slot.status();
    used_slots.insert(*slot);
    auto written = WriteSnapshot(*reg, *slot, step);
    auto sealed = store_->SealSnapshot(job_, 0, step, manifest_bytes_, t);
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    ExpectRestores(0, step, written);
    auto versions = store_->ListVersions(job_);
    ASSERT_EQ(versions.size(), 1u) << "only the newest sealed step is kept";
    EXPECT_EQ(versions[0].step, step);
    EXPECT_EQ(versions[0].state, SegmentState::kSealed);
    EXPECT_EQ(versions[0].payload_crc32c, sealed->payload_crc32c);
  }
  EXPECT_EQ(used_slots.size(), 2u);
  EXPECT_EQ(store_->stats().seals, 4u);
}

TEST_F(SnapshotStoreTest, BeginAndSealAreIdempotent) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  ASSERT_TRUE(reg.ok());
  auto a = store_->BeginSnapshot(job_, 0, 3, t);
  auto b = store_->BeginSnapshot(job_, 0, 3, t);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  WriteSnapshot(*reg, *a, 3);
  auto s1 = store_->SealSnapshot(job_, 0, 3, manifest_bytes_, t);
  auto s2 = store_->SealSnapshot(job_, 0, 3, manifest_bytes_, t);
  ASSERT_TRUE(s1.ok() && s2.ok()) << s1.status() << s2.status();
  EXPECT_EQ(s1->payload_crc32c, s2->payload_crc32c);
  EXPECT_EQ(store_->stats().seals, 1u);
}

TEST_F(SnapshotStoreTest, BadRequestsAreRejectedAndChangeNothing) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  ASSERT_TRUE(reg.ok());
  auto slot = store_->BeginSnapshot(job_, 0, 10, t);
  ASSERT_TRUE(slot.ok());
  auto written = WriteSnapshot(*reg, *slot, 10);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 10, manifest_bytes_, t).ok());

  // Rank outside the world.
  auto bad_rank = store_->Register(job_, 4, world_, entries_, Trainer(101));
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_rank.status().message().find("valid ranks: 0..3"), std::string::npos)
      << bad_rank.status();
  // Size that does not match the shape.
  std::vector<EntrySpec> bad = entries_;
  bad[0].set_nbytes(bad[0].nbytes() + 1);
  auto bad_size = store_->Register(job_, 1, world_, bad, Trainer(102));
  EXPECT_EQ(bad_size.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_size.status().message().find("does not match shape"), std::string::npos);
  // Unknown dtype, duplicate names, bad job ids.
  bad = entries_;
  bad[1].set_dtype("float13");
  EXPECT_EQ(store_->Register(job_, 1, world_, bad, Trainer(102)).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = entries_;
  bad[1].set_name("w");
  EXPECT_EQ(store_->Register(job_, 1, world_, bad, Trainer(102)).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (std::string job : std::vector<std::string>{"", "../etc", "a/b", ".hidden", std::string(200, 'x')}) {
    EXPECT_EQ(store_->Register(job, 0, 1, entries_, Trainer(103)).status().code(),
              absl::StatusCode::kInvalidArgument)
        << job;
  }
  // A step going backwards.
  auto back = store_->BeginSnapshot(job_, 0, 9, t);
  EXPECT_EQ(back.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(back.status().message().find("newest sealed step 10"), std::string::npos);
  // Seal without begin; a manifest that does not match the registration.
  EXPECT_EQ(store_->SealSnapshot(job_, 0, 11, 10, t).status().code(),
            absl::StatusCode::kFailedPrecondition);
  slot = store_->BeginSnapshot(job_, 0, 11, t);
  ASSERT_TRUE(slot.ok());
  WriteSnapshot(*reg, *slot, /*step=*/12);  // manifest claims another step
  auto mismatch = store_->SealSnapshot(job_, 0, 11, manifest_bytes_, t);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument) << mismatch.status();
  EXPECT_EQ(store_->SealSnapshot(job_, 0, 11, 0, t).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->SealSnapshot(job_, 0, 11, 1, t).status().code(),
            absl::StatusCode::kInvalidArgument);  // one byte does not parse to a valid manifest
  // A caller that is not the owner.
  EXPECT_EQ(store_->BeginSnapshot(job_, 0, 20, Trainer(555)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Through all of it, step 10 stayed intact.
  ExpectRestores(0, 10, written);
}

// A float32 tensor of shape [2^62] was registered as 0 bytes: its size, 2^64 bytes, wrapped
// around (fuzz/rpc_request_fuzz checks every registration's shape against its bytes).
TEST(ComputeSlotLayoutTest, TensorWhoseBytesOverflowIsRefused) {
  EntrySpec e;
  e.set_name("w");
  e.set_dtype("float32");
  e.add_shape(int64_t{1} << 62);
  e.set_nbytes(0);
  e.set_kind(ENTRY_KIND_TENSOR);
  auto layout = ComputeSlotLayout({e});
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(layout.status().message().find("overflows 64 bits"), std::string::npos)
      << layout.status();
}

TEST_F(SnapshotStoreTest, TwoLiveTrainersCannotClaimOneRankButADeadOnesRankIsTakenOver) {
  Caller first = Trainer(100);
  auto reg = Register(first);
  ASSERT_TRUE(reg.ok());
  auto slot = store_->BeginSnapshot(job_, 0, 1, first);
  auto written = WriteSnapshot(*reg, *slot, 1);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 1, manifest_bytes_, first).ok());
  slot = store_->BeginSnapshot(job_, 0, 2, first);  // left WRITING: the trainer dies mid-copy
  ASSERT_TRUE(slot.ok());

  auto second = Register(Trainer(200));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("pid 100"), std::string::npos) << second.status();

  alive_.erase(100);
  auto takeover = Register(Trainer(200));
  ASSERT_TRUE(takeover.ok()) << takeover.status();
  EXPECT_EQ(takeover->newest_sealed_step, 1);
  EXPECT_EQ(takeover->slot_paths, reg->slot_paths);
  ExpectRestores(0, 1, written);
  auto versions = store_->ListVersions(job_);
  ASSERT_EQ(versions.size(), 1u) << "the abandoned WRITING slot was reset";
  // The old owner can no longer write.
  EXPECT_FALSE(store_->BeginSnapshot(job_, 0, 3, first).ok());
}

// A Register creating (pre-faulting) its slots holds no lock others need: listings and other
// ranks go on; a second Register of the same rank waits for the first and gets its slots.
TEST_F(SnapshotStoreTest, RegisterCreatingSlotsHoldsUpNoOneElse) {
  absl::Notification creating, finish;
  OpenStore(64 << 20, [&](const std::string&, uint32_t rank) {
    if (rank != 0 || finish.HasBeenNotified()) return;
    if (!creating.HasBeenNotified()) creating.Notify();
    finish.WaitForNotification();
  });
  absl::StatusOr<SnapshotStore::RegisterResult> first, second;
  std::thread a([&] { first = Register(Trainer(100), 0); });
  creating.WaitForNotification();
  // Rank 0 is stalled in its slot creation: a listing of everything, and rank 1, go on.
  auto listing = std::async(std::launch::async, [&] { return store_->ListVersions(""); });
  ASSERT_EQ(listing.wait_for(std::chrono::seconds(5)), std::future_status::ready)
      << "ListVersions waited for a Register creating its slots";
  EXPECT_TRUE(listing.get().empty());
  auto other = Register(Trainer(101), 1);
  ASSERT_TRUE(other.ok()) << other.status();
  absl::Notification second_done;
  std::thread b([&] {
    second = Register(Trainer(100), 0);
    second_done.Notify();
  });
  EXPECT_FALSE(second_done.WaitForNotificationWithTimeout(absl::Milliseconds(200)))
      << "a second Register of the rank did not wait for the first";
  finish.Notify();
  a.join();
  b.join();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->slot_paths, first->slot_paths);
  EXPECT_EQ(store_->stats().segments, 4u);
  EXPECT_EQ(store_->stats().used_bytes, 2 * first->segment_bytes + 2 * other->segment_bytes);
  // And it works: a snapshot of rank 0 seals.
  ASSERT_TRUE(store_->BeginSnapshot(job_, 0, 1, Trainer(100)).ok());
}

// A slot that cannot be created gives back what the Register reserved and leaves no file.
TEST_F(SnapshotStoreTest, FailedSlotCreationGivesTheCapacityBack) {
  int calls = 0;
  OpenStore(64 << 20, [&](const std::string&, uint32_t) {
    if (++calls == 2) std::filesystem::remove_all(dir_);  // the second slot's directory is gone
  });
  auto reg = Register(Trainer(100));
  EXPECT_FALSE(reg.ok());
  EXPECT_EQ(store_->stats().used_bytes, 0u);
  EXPECT_EQ(store_->stats().segments, 0u);
}

TEST_F(SnapshotStoreTest, CapacityExhaustedSaysHowMuch) {
  OpenStore(/*capacity=*/100 << 10);
  entries_ = {Tensor("huge", {1 << 20}, "uint8")};
  auto reg = Register(Trainer(100));
  EXPECT_EQ(reg.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(reg.status().message().find("102400 bytes of store capacity"), std::string::npos)
      << reg.status();
  EXPECT_EQ(store_->stats().used_bytes, 0u);
  EXPECT_EQ(store_->stats().segments, 0u);
}

TEST_F(SnapshotStoreTest, RestartReadoptsSealedDiscardsWritingAndDamaged) {
  Caller t0 = Trainer(100), t1 = Trainer(101), t2 = Trainer(102);
  auto r0 = Register(t0, 0);
  auto r1 = Register(t1, 1);
  auto r2 = Register(t2, 2);
  ASSERT_TRUE(r0.ok() && r1.ok() && r2.ok());
  std::vector<std::string> w0, w1;
  for (int64_t step : {4, 8}) {
    auto s = store_->BeginSnapshot(job_, 0, step, t0);
    w0 = WriteSnapshot(*r0, *s, step, 0);
    ASSERT_TRUE(store_->SealSnapshot(job_, 0, step, manifest_bytes_, t0).ok());
  }
  auto s1 = store_->BeginSnapshot(job_, 1, 8, t1);
  w1 = WriteSnapshot(*r1, *s1, 8, 1);
  ASSERT_TRUE(store_->SealSnapshot(job_, 1, 8, manifest_bytes_, t1).ok());
  auto s1b = store_->BeginSnapshot(job_, 1, 12, t1);  // in flight at the crash
  WriteSnapshot(*r1, *s1b, 12, 1);
  auto s2 = store_->BeginSnapshot(job_, 2, 8, t2);
  WriteSnapshot(*r2, *s2, 8, 2);
  ASSERT_TRUE(store_->SealSnapshot(job_, 2, 8, manifest_bytes_, t2).ok());
  auto info2 = store_->PrepareRestore(job_, 2, -1);
  ASSERT_TRUE(info2.ok());
  {  // flip one payload bit of rank 2's sealed slot
    auto seg = Segment::Open(info2->segment_path, true);
    (*seg)->payload()[rng_() % info2->payload_bytes] ^= 0x04;
  }

  OpenStore();
  SnapshotStore::Stats st = store_->stats();
  EXPECT_EQ(st.adopted_at_start, 2u);
  EXPECT_EQ(st.crc_failures, 1u);
  ExpectRestores(0, 8, w0);
  ExpectRestores(1, 8, w1);
  EXPECT_EQ(store_->PrepareRestore(job_, 2, -1).status().code(), absl::StatusCode::kNotFound);
  auto versions = store_->ListVersions("");
  ASSERT_EQ(versions.size(), 2u);
  // A restarted trainer re-attaches to the adopted slot and continues after step 8.
  auto again = Register(Trainer(300), 0);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->newest_sealed_step, 8);
  EXPECT_EQ(store_->BeginSnapshot(job_, 0, 8, Trainer(300)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store_->BeginSnapshot(job_, 0, 9, Trainer(300)).ok());
  ExpectRestores(0, 8, w0);
}

TEST_F(SnapshotStoreTest, FlipPayloadByteDamagesAndRepairSealedRewritesWithTheRightBytes) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  auto slot = store_->BeginSnapshot(job_, 0, 3, t);
  WriteSnapshot(*reg, *slot, 3);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 3, manifest_bytes_, t).ok());
  auto info = store_->PrepareRestore(job_, 0, 3);
  ASSERT_TRUE(info.ok());
  auto seg = Segment::Open(info->segment_path, true);
  ASSERT_TRUE(seg.ok());
  const std::string good(reinterpret_cast<const char*>((*seg)->payload()), info->payload_bytes);
  const uint8_t* good_bytes = reinterpret_cast<const uint8_t*>(good.data());

  // Intact: nothing to repair.
  auto repaired = store_->RepairSealed(job_, 0, 3, good_bytes, good.size());
  ASSERT_TRUE(repaired.ok()) << repaired.status();
  EXPECT_FALSE(*repaired);
  const uint64_t offset = rng_() % info->payload_bytes;
  auto before = store_->FlipPayloadByte(job_, 0, 3, offset);  // as a drill damages it
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(*before, static_cast<uint8_t>(good[offset]));
  EXPECT_EQ((*seg)->payload()[offset], static_cast<uint8_t>(good[offset]) ^ 0xFF);
  EXPECT_EQ(store_->FlipPayloadByte(job_, 0, 3, info->payload_bytes).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->FlipPayloadByte(job_, 0, 4, 0).status().code(), absl::StatusCode::kNotFound);
  ASSERT_EQ(store_->PrepareRestore(job_, 0, 3).status().code(), absl::StatusCode::kDataLoss);

  // Other bytes are refused and change nothing; the right ones make it restorable again.
  std::string wrong = good;
  wrong[wrong.size() / 2] ^= 1;
  auto refused = store_->RepairSealed(job_, 0, 3, reinterpret_cast<const uint8_t*>(wrong.data()),
                                      wrong.size());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_EQ(store_->RepairSealed(job_, 0, 9, good_bytes, good.size()).status().code(),
            absl::StatusCode::kNotFound);
  ASSERT_EQ(store_->PrepareRestore(job_, 0, 3).status().code(), absl::StatusCode::kDataLoss);
  repaired = store_->RepairSealed(job_, 0, 3, good_bytes, good.size());
  ASSERT_TRUE(repaired.ok()) << repaired.status();
  EXPECT_TRUE(*repaired);
  EXPECT_TRUE(store_->PrepareRestore(job_, 0, 3).ok());
  EXPECT_EQ(std::memcmp((*seg)->payload(), good.data(), good.size()), 0);
}

TEST_F(SnapshotStoreTest, ListRanksAndFindSealedSlot) {
  Caller t = Trainer(4242);
  auto reg = Register(t, 1);
  ASSERT_TRUE(reg.ok());
  auto ranks = store_->ListRanks(job_);
  ASSERT_EQ(ranks.size(), 1u);
  EXPECT_EQ(ranks[0].rank, 1u);
  EXPECT_EQ(ranks[0].owner.pid, 4242);
  EXPECT_TRUE(ranks[0].registered);
  EXPECT_TRUE(ranks[0].alive);
  EXPECT_EQ(ranks[0].newest_sealed_step, -1);
  EXPECT_EQ(store_->FindSealedSlot(job_, 1, -1).status().code(), absl::StatusCode::kNotFound);
  auto slot = store_->BeginSnapshot(job_, 1, 7, t);
  WriteSnapshot(*reg, *slot, 7, 1);
  ASSERT_TRUE(store_->SealSnapshot(job_, 1, 7, manifest_bytes_, t).ok());
  alive_.erase(4242);
  ranks = store_->ListRanks("");
  ASSERT_EQ(ranks.size(), 1u);
  EXPECT_FALSE(ranks[0].alive);
  EXPECT_EQ(ranks[0].newest_sealed_step, 7);
  auto sealed = store_->FindSealedSlot(job_, 1, -1);
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  EXPECT_EQ(sealed->step, 7);
  EXPECT_EQ(sealed->path, reg->slot_paths[*slot]);
  auto missing = store_->FindSealedSlot(job_, 1, 8);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("sealed steps here: 7"), std::string::npos)
      << missing.status();
}

TEST_F(SnapshotStoreTest, DamagedPayloadIsDataLossOnRestore) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  auto slot = store_->BeginSnapshot(job_, 0, 1, t);
  WriteSnapshot(*reg, *slot, 1);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 1, manifest_bytes_, t).ok());
  auto info = store_->PrepareRestore(job_, 0, 1);
  ASSERT_TRUE(info.ok());
  auto seg = Segment::Open(info->segment_path, true);
  (*seg)->payload()[rng_() % info->payload_bytes] ^= 0x80;
  auto damaged = store_->PrepareRestore(job_, 0, 1);
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(damaged.status().message().find("damaged"), std::string::npos);
  EXPECT_EQ(store_->stats().crc_failures, 1u);
  // A damaged header is data loss too.
  (*seg)->payload()[0] ^= 0;
  (*seg)->header()->rank ^= 1;
  EXPECT_EQ(store_->PrepareRestore(job_, 0, 1).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SnapshotStoreTest, ChangedLayoutKeepsOldSnapshotUntilNewOneSeals) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  auto slot = store_->BeginSnapshot(job_, 0, 5, t);
  auto old_written = WriteSnapshot(*reg, *slot, 5);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 5, manifest_bytes_, t).ok());
  alive_.erase(100);

  auto old_entries = entries_;
  entries_[0] = Tensor("w", {3, 6});  // the model changed shape
  Caller t2 = Trainer(200);
  auto reg2 = Register(t2);
  ASSERT_TRUE(reg2.ok()) << reg2.status();
  EXPECT_NE(reg2->slot_paths, reg->slot_paths);
  entries_ = old_entries;
  ExpectRestores(0, 5, old_written);  // still there, with its own manifest
  entries_[0] = Tensor("w", {3, 6});
  EXPECT_FALSE(store_->BeginSnapshot(job_, 0, 5, t2).ok());
  auto s = store_->BeginSnapshot(job_, 0, 6, t2);
  ASSERT_TRUE(s.ok());
  auto new_written = WriteSnapshot(*reg2, *s, 6);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 6, manifest_bytes_, t2).ok());
  ExpectRestores(0, 6, new_written);
  EXPECT_EQ(store_->ListVersions(job_).size(), 1u);
  EXPECT_EQ(store_->stats().used_bytes, 2 * reg2->segment_bytes);
}

TEST_F(SnapshotStoreTest, CommittedStepIsKeptAndPinnedSlotsAreNotOverwritten) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  std::vector<std::string> written[10];
  auto snap = [&](int64_t step) -> absl::Status {
    auto slot = store_->BeginSnapshot(job_, 0, step, t);
    if (!slot.ok()) return slot.status();
    written[step] = WriteSnapshot(*reg, *slot, step);
    return store_->SealSnapshot(job_, 0, step, manifest_bytes_, t).status();
  };
  ASSERT_TRUE(snap(1).ok());
  store_->Commit(job_, 1);
  EXPECT_EQ(store_->committed(job_), 1);
  ASSERT_TRUE(snap(2).ok());
  ASSERT_TRUE(snap(3).ok());  // replaces uncommitted step 2, never committed step 1
  auto versions = store_->ListVersions(job_);
  ASSERT_EQ(versions.size(), 2u);
  EXPECT_EQ(versions[0].step, 1);
  EXPECT_EQ(versions[1].step, 3);
  auto info = store_->PrepareRestore(job_, 0, 1);
  ASSERT_TRUE(info.ok()) << info.status();

  // Protection of step 3 reads its slot: step 4 may not overwrite it.
  auto pinned = store_->Pin(job_, 0, 3);
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(pinned->payload_bytes, versions[1].payload_bytes);
  absl::Status busy = snap(4);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  store_->Commit(job_, 3);  // step 1 is released; step 3 is the restore point
  store_->Unpin(job_, 0, 3);
  ASSERT_TRUE(snap(5).ok());
  versions = store_->ListVersions(job_);
  ASSERT_EQ(versions.size(), 2u);
  EXPECT_EQ(versions[0].step, 3);
  EXPECT_EQ(versions[1].step, 5);
  ExpectRestores(0, 5, written[5]);
  store_->Commit(job_, 2);  // an older commit changes nothing
  EXPECT_EQ(store_->committed(job_), 3);
  EXPECT_EQ(store_->Pin(job_, 0, 4).status().code(), absl::StatusCode::kNotFound);
}

// docs/PROTOCOL.md, owner side: in a cluster a sealed step is reused only once it is protected
// (skip policy), committed past, of a void epoch or dead; under the wait policy a rank holds at
// most one live uncommitted step.
TEST_F(SnapshotStoreTest, ClusteredSealedStepIsKeptUntilProtectedCommittedVoidOrDead) {
  OpenStore(64 << 20, {}, /*clustered=*/true);
  Caller t = Trainer(100);
  auto reg = Register(t);
  ASSERT_TRUE(reg.ok()) << reg.status();
  store_->SetJobState(job_, 7, -1, {});
  auto snap = [&](int64_t step, bool replace) -> absl::Status {
    auto slot = store_->BeginSnapshot(job_, 0, step, t, replace);
    if (!slot.ok()) return slot.status();
    WriteSnapshot(*reg, *slot, step);
    auto sealed = store_->SealSnapshot(job_, 0, step, manifest_bytes_, t);
    if (sealed.ok()) {
      EXPECT_EQ(sealed->epoch, 7u);
    }
    return sealed.status();
  };
  ASSERT_TRUE(snap(10, true).ok());
  ASSERT_TRUE(snap(20, true).ok());  // the other slot was free
  // Both slots hold unprotected steps: nothing may be overwritten, whatever the policy.
  absl::Status busy = snap(30, true);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  EXPECT_NE(busy.message().find("not protected yet"), std::string::npos) << busy;
  // Step 10 protected: the skip policy may overwrite it (its fragments keep it), the wait policy
  // may not (it waits for step 10's commit).
  store_->MarkProtected(job_, 0, 10);
  busy = snap(30, false);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  ASSERT_TRUE(snap(30, true).ok());
  auto versions = store_->ListVersions(job_);
  ASSERT_EQ(versions.size(), 2u);
  EXPECT_EQ(versions[0].step, 20);
  EXPECT_EQ(versions[1].step, 30);
  EXPECT_EQ(versions[1].previous_step, 20);  // the previous seal of the rank in this epoch
  EXPECT_EQ(versions[0].previous_step, 10);
  // Step 20 is committed: it stays; 30 unprotected stays too.
  store_->SetJobState(job_, 7, 20, {});
  busy = snap(40, true);
  EXPECT_EQ(busy.code(), absl::StatusCode::kUnavailable) << busy;
  // Step 30 is dead (another rank skipped it): it may go.
  store_->SetJobState(job_, 7, 20, {30});
  ASSERT_TRUE(snap(40, false).ok());
  // A new epoch (the job resumed elsewhere) voids uncommitted step 40 of epoch 7.
  store_->SetJobState(job_, 9, 20, {});
  auto slot = store_->BeginSnapshot(job_, 0, 50, t, /*replace_uncommitted=*/false);
  ASSERT_TRUE(slot.ok()) << slot.status();
  versions = store_->ListVersions(job_);
  EXPECT_EQ(versions[0].step, 20);
  EXPECT_EQ(versions[0].state, SegmentState::kSealed);
}

// A restarted clustered daemon keeps every re-adopted slot until it learns the job's state, so
// a restart can never leave a step that blocks the wait policy nor lose an uncommitted one.
TEST_F(SnapshotStoreTest, ClusteredRestartKeepsEverySlotUntilTheJobStateIsKnown) {
  OpenStore(64 << 20, {}, /*clustered=*/true);
  Caller t = Trainer(100);
  auto reg = Register(t);
  ASSERT_TRUE(reg.ok());
  store_->SetJobState(job_, 3, -1, {});
  for (int64_t step : {5, 6}) {
    auto slot = store_->BeginSnapshot(job_, 0, step, t);
    ASSERT_TRUE(slot.ok()) << slot.status();
    WriteSnapshot(*reg, *slot, step);
    ASSERT_TRUE(store_->SealSnapshot(job_, 0, step, manifest_bytes_, t).ok());
  }
  OpenStore(64 << 20, {}, /*clustered=*/true);
  EXPECT_FALSE(store_->CommitKnown(job_));
  Caller t2 = Trainer(101);
  reg = Register(t2);
  ASSERT_TRUE(reg.ok()) << reg.status();
  auto refused = store_->BeginSnapshot(job_, 0, 7, t2);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  auto versions = store_->ListVersions(job_);
  ASSERT_EQ(versions.size(), 2u);
  EXPECT_EQ(versions[0].epoch, 3u);  // the epoch survives in the slot header
  EXPECT_EQ(versions[1].previous_step, -2);  // unknown after a restart
  store_->SetJobState(job_, 3, 5, {});  // the coordinator says: 5 is committed
  auto slot = store_->BeginSnapshot(job_, 0, 7, t2, /*replace_uncommitted=*/true);
  EXPECT_EQ(slot.status().code(), absl::StatusCode::kUnavailable)
      << "step 6 is not protected yet: " << slot.status();
  store_->MarkProtected(job_, 0, 6);
  slot = store_->BeginSnapshot(job_, 0, 7, t2, /*replace_uncommitted=*/true);
  ASSERT_TRUE(slot.ok()) << slot.status();
  versions = store_->ListVersions(job_);
  EXPECT_EQ(versions[0].step, 5);
}

// A rank that resumes releases only its own later steps; other ranks keep theirs.
TEST_F(SnapshotStoreTest, RollbackRankTouchesOnlyThatRank) {
  world_ = 2;  // both ranks here: this store decides commits and keeps step 1 after step 2
  Caller t0 = Trainer(100), t1 = Trainer(101);
  auto reg0 = Register(t0, 0);
  auto reg1 = Register(t1, 1);
  ASSERT_TRUE(reg0.ok() && reg1.ok());
  for (int64_t step : {1, 2}) {
    for (uint32_t rank : {0u, 1u}) {
      const Caller& t = rank == 0 ? t0 : t1;
      auto slot = store_->BeginSnapshot(job_, rank, step, t);
      ASSERT_TRUE(slot.ok()) << slot.status();
      WriteSnapshot(rank == 0 ? *reg0 : *reg1, *slot, step, rank);
      ASSERT_TRUE(store_->SealSnapshot(job_, rank, step, manifest_bytes_, t).ok());
    }
  }
  store_->RollbackRank(job_, 0, 1);
  std::vector<std::pair<uint32_t, int64_t>> sealed;
  for (const auto& v : store_->ListVersions(job_)) {
    if (v.state == SegmentState::kSealed) sealed.emplace_back(v.rank, v.step);
  }
  EXPECT_EQ(sealed, (std::vector<std::pair<uint32_t, int64_t>>{{0, 1}, {1, 1}, {1, 2}}));
}

TEST_F(SnapshotStoreTest, UnregisterKeepsOrDropsSnapshots) {
  Caller t = Trainer(100);
  auto reg = Register(t);
  auto slot = store_->BeginSnapshot(job_, 0, 1, t);
  auto written = WriteSnapshot(*reg, *slot, 1);
  ASSERT_TRUE(store_->SealSnapshot(job_, 0, 1, manifest_bytes_, t).ok());
  Caller intruder = Trainer(999);
  intruder.uid = intruder.gid = 12345;  // not root, not the owner
  EXPECT_EQ(store_->Unregister(job_, 0, false, intruder).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Register(intruder).status().code(), absl::StatusCode::kFailedPrecondition);
  alive_.erase(100);
  EXPECT_EQ(Register(intruder).status().code(), absl::StatusCode::kPermissionDenied)
      << "another uid's snapshots are not handed over";
  alive_.insert(100);
  ASSERT_TRUE(store_->Unregister(job_, 0, false, t).ok());
  ASSERT_TRUE(store_->Unregister(job_, 0, false, t).ok());  // idempotent
  ExpectRestores(0, 1, written);
  ASSERT_TRUE(store_->Unregister(job_, 0, true, t).ok());
  EXPECT_EQ(store_->PrepareRestore(job_, 0, -1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->stats().used_bytes, 0u);
  EXPECT_TRUE(std::filesystem::is_empty(dir_));
}

TEST_F(SnapshotStoreTest, DropJobDeletesEveryRankOrNoneAndForgetsTheJob) {
  world_ = 2;
  Caller t0 = Trainer(100), t1 = Trainer(101);
  auto reg0 = Register(t0, 0);
  auto reg1 = Register(t1, 1);
  ASSERT_TRUE(reg0.ok() && reg1.ok());
  for (int64_t step : {3, 4}) {
    for (uint32_t rank : {0u, 1u}) {
      const Caller& t = rank == 0 ? t0 : t1;
      auto slot = store_->BeginSnapshot(job_, rank, step, t);
      ASSERT_TRUE(slot.ok()) << slot.status();
      WriteSnapshot(rank == 0 ? *reg0 : *reg1, *slot, step, rank);
      ASSERT_TRUE(store_->SealSnapshot(job_, rank, step, manifest_bytes_, t).ok());
    }
  }
  store_->Commit(job_, 4);  // as the daemon's coordination does
  ASSERT_EQ(store_->committed(job_), 4);
  // Another job, which stays.
  const std::string other = job_;
  job_ = "job-b";
  world_ = 1;
  Caller t2 = Trainer(102);
  auto reg2 = Register(t2, 0);
  ASSERT_TRUE(reg2.ok());
  const uint64_t other_bytes = 2 * reg2->segment_bytes;
  job_ = other;
  world_ = 2;
  const uint64_t used = store_->stats().used_bytes;

  auto unknown = store_->DropJob("job-z", std::nullopt, false);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("jobs here: 'job-a', 'job-b'"), std::string::npos)
      << unknown.status();
  EXPECT_EQ(store_->DropJob("../x", std::nullopt, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Rank 1's trainer still runs: nothing is dropped, rank 0 included.
  alive_.erase(100);
  auto refused = store_->DropJob(job_, std::nullopt, false);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("rank 1 (pid 101) is registered and running"),
            std::string::npos)
      << refused.status();
  EXPECT_EQ(store_->stats().used_bytes, used);
  auto held = store_->PrepareRestore(job_, 0, -1);
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(held->step, 4);
  // Another uid may not drop it, even with force.
  auto foreign = store_->DropJob(job_, getuid() + 1, true);
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(foreign.status().message().find(absl::StrCat("belongs to uid ", getuid())),
            std::string::npos)
      << foreign.status();
  EXPECT_EQ(store_->stats().used_bytes, used);

  auto dropped = store_->DropJob(job_, getuid(), /*force=*/true);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  EXPECT_EQ(dropped->ranks, (std::vector<uint32_t>{0, 1}));
  EXPECT_EQ(dropped->segments_deleted, 4u);
  EXPECT_EQ(dropped->bytes_deleted, 2 * (reg0->segment_bytes + reg1->segment_bytes));
  EXPECT_EQ(dropped->newest_sealed_step, 4);
  EXPECT_EQ(dropped->running_ranks, (std::vector<uint32_t>{1}));
  EXPECT_EQ(dropped->running_pids, (std::vector<pid_t>{101}));
  EXPECT_EQ(store_->stats().used_bytes, other_bytes);
  EXPECT_TRUE(store_->ListVersions(job_).empty());
  EXPECT_TRUE(store_->ListRanks(job_).empty());
  EXPECT_EQ(store_->committed(job_), -1) << "the job's commit is forgotten";
  EXPECT_EQ(store_->PrepareRestore(job_, 0, -1).status().code(), absl::StatusCode::kNotFound);
  // The forced trainer's rank is gone (its agent registers again); a relaunch starts afresh, at
  // any step.
  EXPECT_EQ(store_->BeginSnapshot(job_, 1, 5, t1).status().code(), absl::StatusCode::kNotFound);
  auto again = Register(t1, 1);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->newest_sealed_step, -1);
  auto slot = store_->BeginSnapshot(job_, 1, 0, t1);
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(store_->DropJob(job_, std::nullopt, false).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->ListRanks("job-b").size(), 1u) << "the other job stays";
}

TEST_F(SnapshotStoreTest, DropJobIsRefusedOnAClusteredStore) {
  OpenStore(64 << 20, {}, /*clustered=*/true);
  ASSERT_TRUE(Register(Trainer(100)).ok());
  alive_.erase(100);
  auto dropped = store_->DropJob(job_, std::nullopt, true);
  EXPECT_EQ(dropped.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(dropped.status().message().find("member of a cluster"), std::string::npos)
      << dropped.status();
  EXPECT_EQ(store_->ListRanks(job_).size(), 1u);
}

// A trainer registering while the job's coordinator decides its drop would seal into the
// dropped epoch: from the check on, the job's registrations are refused until the drop is
// applied, the check is lifted, or the fence lapses.
TEST_F(SnapshotStoreTest, ACheckedDropFencesTheJobsRegistrations) {
  OpenStore(64 << 20, {}, /*clustered=*/true);
  ASSERT_TRUE(store_->CheckDrop(job_, std::nullopt, absl::Hours(1)).ok());
  auto refused = Register(Trainer(100));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find("is being dropped"), std::string::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("register again once the drop has finished"),
            std::string::npos)
      << refused.status();
  EXPECT_TRUE(store_->ListRanks(job_).empty());
  store_->ApplyDrop(job_, 5);
  EXPECT_TRUE(Register(Trainer(100)).ok());

  // Lifted (an abandoned check), and lapsed (a coordinator that died mid-drop).
  ASSERT_TRUE(store_->CheckDrop(job_, std::nullopt, absl::Hours(1)).ok());
  EXPECT_EQ(Register(Trainer(101), 1).status().code(), absl::StatusCode::kUnavailable);
  store_->LiftDropFence(job_);
  EXPECT_TRUE(Register(Trainer(101), 1).ok());
  ASSERT_TRUE(store_->CheckDrop(job_, std::nullopt, absl::Milliseconds(1)).ok());
  absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(Register(Trainer(102), 2).ok());
  // A check refused (another uid's job) fences nothing.
  EXPECT_EQ(store_->CheckDrop(job_, getuid() + 1, absl::Hours(1)).status().code(),
            absl::StatusCode::kPermissionDenied);
  alive_.erase(102);
  EXPECT_TRUE(Register(Trainer(103), 2).ok());
}

// Checks name whatever job ids a member sends: the fences they set are bounded, and a fence
// that lapsed makes room.
TEST_F(SnapshotStoreTest, DropFencesAreBounded) {
  OpenStore(64 << 20, {}, /*clustered=*/true);
  for (int i = 0; i < 4095; ++i) {
    ASSERT_TRUE(store_->CheckDrop(absl::StrCat("other-", i), std::nullopt, absl::Hours(1)).ok())
        << i;
  }
  ASSERT_TRUE(store_->CheckDrop(job_, std::nullopt, absl::Milliseconds(1)).ok());
  auto full = store_->CheckDrop("one-too-many", std::nullopt, absl::Hours(1));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_TRUE(store_->CheckDrop("other-7", std::nullopt, absl::Hours(1)).ok())
      << "a job fenced already is checked again";
  absl::SleepFor(absl::Milliseconds(5));  // job_'s fence lapses
  EXPECT_TRUE(store_->CheckDrop("one-too-many", std::nullopt, absl::Hours(1)).ok());
}

// The check comes while a registration creates its slots (without the rank's lock): the check
// does not see the rank registered, so the registration must be refused.
TEST_F(SnapshotStoreTest, ARegistrationTheCheckDidNotSeeIsRefused) {
  std::optional<absl::StatusOr<SnapshotStore::DropJobResult>> checked;
  OpenStore(64 << 20,
            [&](const std::string&, uint32_t) {
              if (!checked) checked = store_->CheckDrop(job_, std::nullopt, absl::Hours(1));
            },
            /*clustered=*/true);
  auto refused = Register(Trainer(100));
  ASSERT_TRUE(checked && checked->ok());
  EXPECT_TRUE((*checked)->running_ranks.empty());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  store_->LiftDropFence(job_);
  EXPECT_TRUE(Register(Trainer(100)).ok());
}

}  // namespace
}  // namespace tessera
