#include "common/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace tessera {
namespace {

// A POSIX access ACL as Linux stores it in this extended attribute: a 4-byte version (2), then
// 8-byte entries (16-bit tag, 16-bit permissions, 32-bit id), little-endian, sorted by tag.
constexpr char kAclAttribute[] = "system.posix_acl_access";
constexpr uint32_t kAclVersion = 2;
constexpr uint16_t kAclUserObj = 0x01, kAclUser = 0x02, kAclGroupObj = 0x04, kAclMask = 0x10,
                   kAclOther = 0x20;
constexpr uint16_t kAclReadWrite = 06;
constexpr uint32_t kAclNoId = 0xffffffff;
constexpr size_t kAclEntryBytes = 8;

void PutLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

uint64_t GetLe(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The owner and `uid` may read and write; the file's group and others nothing.
std::string AclGranting(uid_t uid) {
  std::string acl;
  PutLe(&acl, kAclVersion, 4);
  const std::pair<uint16_t, uint32_t> entries[] = {{kAclUserObj, kAclNoId},
                                                   {kAclUser, static_cast<uint32_t>(uid)},
                                                   {kAclGroupObj, kAclNoId},
                                                   {kAclMask, kAclNoId},
                                                   {kAclOther, kAclNoId}};
  for (const auto& [tag, id] : entries) {
    const bool allowed = tag == kAclUserObj || tag == kAclUser || tag == kAclMask;
    PutLe(&acl, tag, 2);
    PutLe(&acl, allowed ? kAclReadWrite : 0, 2);
    PutLe(&acl, id, 4);
  }
  return acl;
}

}  // namespace

absl::Status GrantSegmentAccess(int fd, const std::string& path, uid_t uid) {
  // A file given away before (an older tesserad, or a hugetlbfs) comes back first: its owner
  // would keep access whatever the ACL says.
  struct stat st;
  if (fstat(fd, &st) != 0) return ErrnoStatus(errno, "stat segment " + path);
  if (st.st_uid != geteuid() && fchown(fd, geteuid(), static_cast<gid_t>(-1)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("take back segment ", path, " from uid ", st.st_uid));
  }
  if (uid == geteuid()) {
    if (fremovexattr(fd, kAclAttribute) != 0 && errno != ENODATA && errno != EOPNOTSUPP) {
      return ErrnoStatus(errno, "remove the access ACL of segment " + path);
    }
    if (fchmod(fd, 0600) != 0) return ErrnoStatus(errno, "chmod " + path);
    return absl::OkStatus();
  }
  const std::string acl = AclGranting(uid);
  if (fsetxattr(fd, kAclAttribute, acl.data(), acl.size(), 0) == 0) return absl::OkStatus();
  if (errno != EOPNOTSUPP) {
    return ErrnoStatus(
        errno, absl::StrCat("let uid ", uid, " open segment ", path, " (a POSIX access ACL)"));
  }
  // No ACLs here: the file itself changes hands.
  if (fchown(fd, uid, static_cast<gid_t>(-1)) == 0) return absl::OkStatus();
  return ErrnoStatus(errno, absl::StrCat("give segment ", path, " to uid ", uid,
                                         ": its filesystem has no POSIX ACLs (a hugetlbfs?), so "
                                         "the file must change owner, which needs tesserad to "
                                         "run as root or with CAP_CHOWN (on a tmpfs it needs "
                                         "neither)"));
}

absl::Status GrantSegmentAccess(const std::string& path, uid_t uid) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return ErrnoStatus(errno, "open segment " + path);
  absl::Status granted = GrantSegmentAccess(fd, path, uid);
  close(fd);
  return granted;
}

absl::StatusOr<uid_t> SegmentGrantee(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return ErrnoStatus(errno, "stat segment " + path);
  if (st.st_uid != geteuid()) return st.st_uid;
  // Bounded: an ACL of this many entries names more than one uid, which counts as none.
  uint8_t acl[4 + 16 * kAclEntryBytes];
  const ssize_t n = lgetxattr(path.c_str(), kAclAttribute, acl, sizeof(acl));
  if (n < 4 || (n - 4) % kAclEntryBytes != 0 || GetLe(acl, 4) != kAclVersion) return st.st_uid;
  std::optional<uid_t> named;
  for (ssize_t at = 4; at < n; at += kAclEntryBytes) {
    if (GetLe(acl + at, 2) != kAclUser) continue;
    if (named) return st.st_uid;
    named = static_cast<uid_t>(GetLe(acl + at + 4, 4));
  }
  return named.value_or(st.st_uid);
}

const char* SegmentStateName(SegmentState state) {
  switch (state) {
    case SegmentState::kEmpty:
      return "EMPTY";
    case SegmentState::kWriting:
      return "WRITING";
    case SegmentState::kSealed:
      return "SEALED";
  }
  return "UNKNOWN";
}

SegmentState LoadState(const SegmentHeader& header) {
  return static_cast<SegmentState>(__atomic_load_n(&header.state, __ATOMIC_ACQUIRE));
}

void StoreState(SegmentHeader* header, SegmentState state) {
  __atomic_store_n(&header->state, static_cast<uint32_t>(state), __ATOMIC_RELEASE);
}

uint32_t ComputeHeaderCrc(const SegmentHeader& header) {
  SegmentHeader copy;
  std::memcpy(&copy, &header, sizeof(copy));
  copy.state = 0;
  copy.header_crc32c = 0;
  return Crc32c(&copy, sizeof(copy));
}

absl::Status ValidateSealedHeader(const SegmentHeader& header) {
  if (header.magic != kSegmentMagic) {
    return absl::DataLossError(absl::StrCat("bad magic 0x", absl::Hex(header.magic),
                                            ", expected 0x", absl::Hex(kSegmentMagic)));
  }
  if (header.layout_version != kSegmentLayoutVersion) {
    return absl::DataLossError(absl::StrCat("layout version ", header.layout_version,
                                            ", this build reads ", kSegmentLayoutVersion));
  }
  if (header.kind != static_cast<uint32_t>(SegmentKind::kSlot) &&
      header.kind != static_cast<uint32_t>(SegmentKind::kFragment)) {
    return absl::DataLossError(absl::StrCat("unknown segment kind ", header.kind));
  }
  uint32_t crc = ComputeHeaderCrc(header);
  if (crc != header.header_crc32c) {
    return absl::DataLossError(absl::StrCat("header CRC32C 0x", absl::Hex(crc),
                                            " does not match the stored 0x",
                                            absl::Hex(header.header_crc32c)));
  }
  // Every sealed step is >= 0 (-1 means "the newest" to PrepareRestore and "none" elsewhere).
  if (header.step < 0) {
    return absl::DataLossError(absl::StrCat("step ", header.step, " is negative"));
  }
  if (header.payload_bytes > header.capacity_bytes ||
      !RangeWithin(header.manifest_offset, header.manifest_bytes, header.payload_bytes)) {
    return absl::DataLossError(absl::StrCat("payload ", header.payload_bytes, " bytes, manifest at ",
                                            header.manifest_offset, "+", header.manifest_bytes,
                                            " do not fit capacity ", header.capacity_bytes));
  }
  if (header.job_id[sizeof(header.job_id) - 1] != '\0') {
    return absl::DataLossError("job id is not NUL-terminated");
  }
  return absl::OkStatus();
}

void PrefaultForWrite(void* p, size_t len) {
  if (len == 0) return;
  if (madvise(p, len, MADV_POPULATE_WRITE) == 0) return;
  // Older kernels: write each page once. The value written is the value read, so this is safe on
  // memory that already holds data.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto* bytes = static_cast<volatile uint8_t*>(p);
  for (size_t off = 0; off < len; off += page) bytes[off] = bytes[off];
}

absl::StatusOr<std::unique_ptr<Segment>> Segment::Create(const std::string& path,
                                                         SegmentKind kind,
                                                         uint64_t capacity_bytes,
                                                         const SegmentCreateOptions& options) {
  const uint64_t file_bytes = kSegmentHeaderBytes + capacity_bytes;
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, options.mode);
  if (fd < 0) return ErrnoStatus(errno, "create segment " + path);
  auto fail = [&](absl::Status status) {
    close(fd);
    unlink(path.c_str());
    return status;
  };
  if (fchmod(fd, options.mode) != 0) return fail(ErrnoStatus(errno, "chmod " + path));
  if (options.grant_uid != static_cast<uid_t>(-1) && options.grant_uid != geteuid()) {
    if (absl::Status s = GrantSegmentAccess(fd, path, options.grant_uid); !s.ok()) return fail(s);
  }
  int err = posix_fallocate(fd, 0, static_cast<off_t>(file_bytes));
  if (err != 0) {
    if (err == ENOSPC) {
      return fail(absl::ResourceExhaustedError(
          absl::StrCat("preallocating ", file_bytes, " bytes for segment ", path,
                       ": the filesystem is full (size /dev/shm or the hugetlbfs mount larger, "
                       "or lower store.capacity_bytes)")));
    }
    return fail(ErrnoStatus(err, absl::StrCat("posix_fallocate ", file_bytes, " bytes for ", path)));
  }
  void* base = mmap(nullptr, file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail(ErrnoStatus(errno, "mmap " + path));
  close(fd);
  if (options.prefault) PrefaultForWrite(base, file_bytes);
  std::unique_ptr<Segment> segment(new Segment(path, static_cast<uint8_t*>(base), file_bytes));
  SegmentHeader* h = segment->header();
  std::memset(h, 0, sizeof(*h));
  h->magic = kSegmentMagic;
  h->layout_version = kSegmentLayoutVersion;
  h->kind = static_cast<uint32_t>(kind);
  h->capacity_bytes = capacity_bytes;
  h->step = -1;
  StoreState(h, SegmentState::kEmpty);
  return segment;
}

absl::StatusOr<std::unique_ptr<Segment>> Segment::Open(const std::string& path, bool writable,
                                                       bool prefault) {
  int fd = open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "open segment " + path);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return ErrnoStatus(e, "stat " + path);
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kSegmentHeaderBytes) {
    close(fd);
    return absl::DataLossError(absl::StrCat("segment ", path, " is ", file_bytes,
                                            " bytes, smaller than its 4096-byte header"));
  }
  void* base = mmap(nullptr, file_bytes, writable ? PROT_READ | PROT_WRITE : PROT_READ,
                    MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (base == MAP_FAILED) return ErrnoStatus(e, "mmap " + path);
  std::unique_ptr<Segment> segment(new Segment(path, static_cast<uint8_t*>(base), file_bytes));
  if (segment->header()->capacity_bytes > file_bytes - kSegmentHeaderBytes) {
    return absl::DataLossError(absl::StrCat(
        "segment ", path, " header claims ", segment->header()->capacity_bytes,
        " payload bytes but the file holds ", file_bytes - kSegmentHeaderBytes));
  }
  if (prefault && writable) PrefaultForWrite(base, file_bytes);
  return segment;
}

Segment::~Segment() { munmap(base_, file_bytes_); }

absl::Status Segment::Unlink() {
  if (unlink(path_.c_str()) != 0 && errno != ENOENT) return ErrnoStatus(errno, "unlink " + path_);
  return absl::OkStatus();
}

}  // namespace tessera
