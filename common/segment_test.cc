#include "common/segment.h"

#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "common/crc32c.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

class SegmentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-segment-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(SegmentTest, CreateWriteSealReopen) {
  const uint64_t seed = 4242;
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const std::string path = dir_ + "/a.seg";
  const uint64_t capacity = 3 * 4096 + 17;
  auto created = Segment::Create(path, SegmentKind::kSlot, capacity, {});
  ASSERT_TRUE(created.ok()) << created.status();
  auto& seg = *created;
  EXPECT_EQ(seg->file_bytes(), kSegmentHeaderBytes + capacity);
  EXPECT_EQ(LoadState(*seg->header()), SegmentState::kEmpty);

  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i < capacity; ++i) seg->payload()[i] = static_cast<uint8_t>(rng());
  SegmentHeader* h = seg->header();
  h->step = 77;
  h->rank = 3;
  h->world_size = 8;
  h->payload_bytes = capacity;
  h->payload_crc32c = Crc32c(seg->payload(), capacity);
  std::strcpy(h->job_id, "job-1");
  h->header_crc32c = ComputeHeaderCrc(*h);
  StoreState(h, SegmentState::kSealed);

  auto reopened = Segment::Open(path, /*writable=*/false);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  const SegmentHeader& r = *(*reopened)->header();
  EXPECT_EQ(LoadState(r), SegmentState::kSealed);
  EXPECT_TRUE(ValidateSealedHeader(r).ok());
  EXPECT_EQ(r.step, 77);
  EXPECT_EQ(std::memcmp((*reopened)->payload(), seg->payload(), capacity), 0);
  EXPECT_EQ(Crc32c((*reopened)->payload(), r.payload_bytes), r.payload_crc32c);
}

TEST_F(SegmentTest, CorruptedHeaderIsDataLoss) {
  const std::string path = dir_ + "/b.seg";
  auto seg = Segment::Create(path, SegmentKind::kSlot, 4096, {});
  ASSERT_TRUE(seg.ok());
  SegmentHeader* h = (*seg)->header();
  h->step = 5;
  h->header_crc32c = ComputeHeaderCrc(*h);
  StoreState(h, SegmentState::kSealed);
  ASSERT_TRUE(ValidateSealedHeader(*h).ok());
  // The state word is outside the header CRC; every other field is inside.
  h->rank ^= 1;
  absl::Status s = ValidateSealedHeader(*h);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("header CRC32C"), absl::string_view::npos) << s;
  h->rank ^= 1;
  h->magic ^= 0x100;
  EXPECT_EQ(ValidateSealedHeader(*h).code(), absl::StatusCode::kDataLoss);
}

// Found by fuzz/segment_header_fuzz: a sealed header of step -55834574848 (CRC recomputed) was
// re-adopted, listed, and then refused by PrepareRestore ("step must be >= 0").
TEST_F(SegmentTest, NegativeStepIsDataLoss) {
  const std::string path = dir_ + "/n.seg";
  auto seg = Segment::Create(path, SegmentKind::kSlot, 4096, {});
  ASSERT_TRUE(seg.ok());
  SegmentHeader* h = (*seg)->header();
  StoreState(h, SegmentState::kSealed);
  for (int64_t step : {int64_t{-1}, int64_t{-55834574848}, INT64_MIN}) {
    h->step = step;
    h->header_crc32c = ComputeHeaderCrc(*h);
    absl::Status s = ValidateSealedHeader(*h);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << step;
    EXPECT_NE(s.message().find("negative"), absl::string_view::npos) << s;
  }
  h->step = 0;
  h->header_crc32c = ComputeHeaderCrc(*h);
  EXPECT_TRUE(ValidateSealedHeader(*h).ok());
}

TEST_F(SegmentTest, CreateIsExclusiveAndModeIsApplied) {
  const std::string path = dir_ + "/c.seg";
  SegmentCreateOptions options;
  options.mode = 0640;
  ASSERT_TRUE(Segment::Create(path, SegmentKind::kFragment, 100, options).ok());
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  auto again = Segment::Create(path, SegmentKind::kFragment, 100, options);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
}

// A segment created for another uid stays this process's file, and its POSIX access ACL names
// that uid (SegmentGrantee reads it back); a grant replaces the one before, and a grant to this
// process's own uid removes it. An ACL that names two uids names none. (That the named uid, and
// no other, can open the file is tested with real uids in tests:isolation_test.)
TEST_F(SegmentTest, AGrantNamesOneOtherUidInTheFilesAcl) {
  std::mt19937 rng(std::random_device{}());
  const uid_t self = geteuid();
  const uid_t other = 20000 + rng() % 20000;  // printed by the failure messages below
  const std::string path = dir_ + "/granted.seg";
  SegmentCreateOptions options;
  options.grant_uid = other;
  auto created = Segment::Create(path, SegmentKind::kSlot, 4096, options);
  ASSERT_TRUE(created.ok()) << created.status();
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, self);
  EXPECT_EQ(st.st_mode & 0007, 0u) << "others may open it";
  const bool acls = getxattr(path.c_str(), "system.posix_acl_access", nullptr, 0) > 0;
  if (!acls) {
    // A filesystem without ACLs: the file was given away instead (this test runs as root).
    ASSERT_EQ(self, 0u) << "no ACL and no chown for uid " << other;
  }
  auto grantee = SegmentGrantee(path);
  ASSERT_TRUE(grantee.ok()) << grantee.status();
  EXPECT_EQ(*grantee, other);
  if (!acls) return;

  const uid_t next = other + 1;
  ASSERT_TRUE(GrantSegmentAccess(path, next).ok());
  EXPECT_EQ(SegmentGrantee(path).value_or(0), next);
  ASSERT_TRUE(GrantSegmentAccess(path, self).ok());
  EXPECT_EQ(SegmentGrantee(path).value_or(0), self);
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // Two named uids (not what the daemon writes): the file counts as this process's own.
  const uint32_t two[] = {2,          0x00060001, 0xffffffff, 0x00060002, other,
                          0x00060002, next,       0x00000004, 0xffffffff, 0x00060010,
                          0xffffffff, 0x00000020, 0xffffffff};
  ASSERT_EQ(setxattr(path.c_str(), "system.posix_acl_access", two, sizeof(two), 0), 0)
      << std::strerror(errno);
  EXPECT_EQ(SegmentGrantee(path).value_or(0), self);

  // A file given away (as an older tesserad did) is taken back before it is granted again: its
  // owner would keep access otherwise.
  if (self != 0) return;
  ASSERT_EQ(chown(path.c_str(), other, static_cast<gid_t>(-1)), 0) << std::strerror(errno);
  EXPECT_EQ(SegmentGrantee(path).value_or(0), other);
  ASSERT_TRUE(GrantSegmentAccess(path, next).ok());
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, self);
  EXPECT_EQ(SegmentGrantee(path).value_or(0), next);
}

TEST_F(SegmentTest, TruncatedFileIsDataLoss) {
  const std::string path = dir_ + "/d.seg";
  {
    auto seg = Segment::Create(path, SegmentKind::kSlot, 8192, {});
    ASSERT_TRUE(seg.ok());
  }
  ASSERT_EQ(truncate(path.c_str(), 4096 + 100), 0);
  EXPECT_EQ(Segment::Open(path, false).status().code(), absl::StatusCode::kDataLoss);
  ASSERT_EQ(truncate(path.c_str(), 10), 0);
  EXPECT_EQ(Segment::Open(path, false).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SegmentTest, MissingFileIsNotFound) {
  EXPECT_EQ(Segment::Open(dir_ + "/nope.seg", false).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace tessera
