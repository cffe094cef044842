// Shared-memory segments: a file (tmpfs or hugetlbfs) that starts with a 4 KiB versioned header,
// followed by the payload. The daemon creates and seals them; the agent maps them to write a
// snapshot or read one back; a restarted daemon re-adopts the sealed ones.
//
// Header protocol: every field but `state` is written while state is kEmpty or kWriting; the
// writer then computes header_crc32c and publishes with a release-store of kSealed. Readers
// acquire-load `state` before reading other fields. A sealed header is never modified again
// except to move it back to kEmpty when the segment is recycled.
#ifndef TESSERA_COMMON_SEGMENT_H_
#define TESSERA_COMMON_SEGMENT_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace tessera {

inline constexpr uint64_t kSegmentMagic = 0x3141524553534554ull;  // "TESSERA1", little endian
inline constexpr uint32_t kSegmentLayoutVersion = 1;
inline constexpr size_t kSegmentHeaderBytes = 4096;
inline constexpr size_t kMaxJobIdBytes = 128;
// The block size of a manifest's per-entry block checksums (ShardManifest.crc_block_bytes).
inline constexpr uint64_t kMinCrcBlockBytes = uint64_t{1} << 20;
inline constexpr uint64_t kMaxCrcBlockBytes = uint64_t{1} << 30;

enum class SegmentKind : uint32_t { kSlot = 1, kFragment = 2 };
enum class SegmentState : uint32_t { kEmpty = 0, kWriting = 1, kSealed = 2 };

const char* SegmentStateName(SegmentState state);

struct SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t kind;            // SegmentKind
  uint32_t state;           // SegmentState; access only through LoadState / StoreState
  uint32_t header_crc32c;   // CRC32C of the header with `state` and this field as zero
  int64_t step;
  uint32_t rank;
  uint32_t world_size;
  uint64_t capacity_bytes;  // payload capacity: file size minus the header
  uint64_t payload_bytes;   // valid payload once sealed (data, then manifest)
  uint32_t payload_crc32c;  // CRC32C of payload[0, payload_bytes)
  uint32_t reserved0;
  uint64_t manifest_offset;  // payload offset of the serialized ShardManifest
  uint64_t manifest_bytes;
  uint64_t layout_hash;      // hash of the registered entries (slots)
  uint64_t sealed_unix_ms;
  // Fragments (cross-node protection): which piece of which shard this is.
  uint32_t fragment_index;
  uint32_t ec_k;
  uint32_t ec_m;
  uint32_t reserved1;
  uint64_t shard_bytes;
  uint32_t shard_crc32c;
  uint32_t reserved2;
  uint64_t owner_incarnation;
  char job_id[kMaxJobIdBytes + 8];  // NUL-terminated
  // The job's epoch (history, docs/PROTOCOL.md) the slot was sealed in, or the fragment's shard
  // was; 0 in segments written before epochs existed and by standalone daemons.
  uint64_t epoch;
  uint8_t reserved[4096 - 280];
};
static_assert(sizeof(SegmentHeader) == kSegmentHeaderBytes, "header must be exactly 4 KiB");

SegmentState LoadState(const SegmentHeader& header);            // acquire
void StoreState(SegmentHeader* header, SegmentState state);     // release
uint32_t ComputeHeaderCrc(const SegmentHeader& header);

// Whether [offset, offset + length) lies within [0, limit), computed without overflow: a header
// or manifest that a trainer wrote may hold any 64-bit values.
inline bool RangeWithin(uint64_t offset, uint64_t length, uint64_t limit) {
  return offset <= limit && length <= limit - offset;
}

// Checks magic, layout version, kind and header CRC of a header that was published as sealed,
// then that its step is not negative and its payload and manifest lie in its capacity.
// kDataLoss names the first check that failed.
absl::Status ValidateSealedHeader(const SegmentHeader& header);

struct SegmentCreateOptions {
  // Another uid that may open the segment read-write (GrantSegmentAccess); -1: none.
  uid_t grant_uid = static_cast<uid_t>(-1);
  mode_t mode = 0600;
  bool prefault = true;  // touch every page now, not during the first snapshot
};

// A mapped segment file. Not thread-safe as an object; the mapped bytes follow the header
// protocol above. Unmaps (but does not delete the file) on destruction.
class Segment {
 public:
  // Creates `path` exclusively, preallocates header + capacity_bytes with posix_fallocate (so
  // running out of memory fails here, never as SIGBUS later), maps it read-write, optionally
  // pre-faults it, and writes an empty header of `kind`. kResourceExhausted when the filesystem
  // cannot hold it, with the bytes asked for. The file is removed again on any failure.
  static absl::StatusOr<std::unique_ptr<Segment>> Create(const std::string& path,
                                                         SegmentKind kind,
                                                         uint64_t capacity_bytes,
                                                         const SegmentCreateOptions& options);

  // Maps an existing segment. kDataLoss if the file is smaller than a header or than the
  // capacity its header claims; the header is otherwise not validated here.
  static absl::StatusOr<std::unique_ptr<Segment>> Open(const std::string& path, bool writable,
                                                       bool prefault = false);

  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Removes the file; the mapping stays valid until destruction.
  absl::Status Unlink();

  const std::string& path() const { return path_; }
  uint64_t file_bytes() const { return file_bytes_; }
  uint64_t capacity_bytes() const { return file_bytes_ - kSegmentHeaderBytes; }
  SegmentHeader* header() { return reinterpret_cast<SegmentHeader*>(base_); }
  const SegmentHeader* header() const { return reinterpret_cast<const SegmentHeader*>(base_); }
  uint8_t* payload() { return base_ + kSegmentHeaderBytes; }
  const uint8_t* payload() const { return base_ + kSegmentHeaderBytes; }

 private:
  Segment(std::string path, uint8_t* base, uint64_t file_bytes)
      : path_(std::move(path)), base_(base), file_bytes_(file_bytes) {}

  std::string path_;
  uint8_t* base_;
  uint64_t file_bytes_;
};

// Lets `uid` open the segment file `fd` (at `path`) read-write, and no other uid but this
// process's: the file stays this process's, mode 0600, with a POSIX access ACL naming `uid` (a
// tmpfs has them), so the daemon needs no privilege to serve trainers of any uid, and a trainer
// can change neither the file's owner nor its ACL. Replaces an earlier grant; for this process's
// own uid it removes it. On a filesystem without POSIX ACLs (a hugetlbfs) the file itself is
// given to `uid`, which needs root or CAP_CHOWN; the error then says so.
absl::Status GrantSegmentAccess(int fd, const std::string& path, uid_t uid);
absl::Status GrantSegmentAccess(const std::string& path, uid_t uid);

// The uid a segment file is for: the one its POSIX access ACL names when the file is this
// process's (only the owner, or CAP_FOWNER, sets an ACL), else the file's owner (a file given
// away, or one of this process's own uid). An ACL that does not name exactly one uid counts as
// none.
absl::StatusOr<uid_t> SegmentGrantee(const std::string& path);

// Touches every page of [p, p + len) for writing (MADV_POPULATE_WRITE where the kernel has it).
void PrefaultForWrite(void* p, size_t len);

}  // namespace tessera

#endif  // TESSERA_COMMON_SEGMENT_H_
