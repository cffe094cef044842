#include "common/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace tessera {

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
  if ((options.owner_uid != static_cast<uid_t>(-1) && options.owner_uid != geteuid()) ||
      options.owner_gid != static_cast<gid_t>(-1)) {
    if (fchown(fd, options.owner_uid, options.owner_gid) != 0) {
      return fail(ErrnoStatus(errno, absl::StrCat("give segment ", path, " to uid ",
                                                  options.owner_uid,
                                                  " (tesserad must run as root or as that uid)")));
    }
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
