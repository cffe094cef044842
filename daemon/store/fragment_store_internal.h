// What the files of FragmentStore (fragment_store*.cc) share; not part of its interface: how
// its segment files are named and sized, and a held fragment's entry.
#ifndef TESSERA_DAEMON_STORE_FRAGMENT_STORE_INTERNAL_H_
#define TESSERA_DAEMON_STORE_FRAGMENT_STORE_INTERNAL_H_

#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/segment.h"
#include "daemon/store/fragment_store.h"

namespace tessera {
namespace fragment_store_internal {

inline constexpr const char* kFragmentSuffix = ".frag";
inline constexpr const char* kFragmentPrefix = "frag-";
// Segment capacities are rounded up to this, so fragments of nearly equal size (a shard's
// manifest length varies by a few bytes between steps) share pooled segments.
inline constexpr uint64_t kSegmentGranuleBytes = uint64_t{64} << 10;

// Removes [begin, end) from the disjoint intervals (which need not cover it).
void RemoveCoverage(std::map<uint64_t, uint64_t>* intervals, uint64_t* covered, uint64_t begin,
                    uint64_t end);

}  // namespace fragment_store_internal

// One held fragment. `key` and `meta` never change; a replacement is a new Entry. Every access
// to the segment checks `retired` under `mu` first: a retired entry's segment may already belong
// to another fragment.
struct FragmentStore::Entry {
  Entry(FragmentKey k, FragmentMeta m, std::shared_ptr<Segment> s)
      : key(std::move(k)), meta(m), segment(std::move(s)) {}

  struct Chunk {
    uint64_t size;
    uint32_t crc32c;
  };

  const FragmentKey key;
  const FragmentMeta meta;
  mutable absl::Mutex mu;
  std::shared_ptr<Segment> segment ABSL_GUARDED_BY(mu);
  bool retired ABSL_GUARDED_BY(mu) = false;
  bool sealed ABSL_GUARDED_BY(mu) = false;
  uint32_t fragment_crc32c ABSL_GUARDED_BY(mu) = 0;
  // Chunks received, by offset, while they tile the fragment without overlap; their CRCs then
  // combine into the fragment's CRC without reading the bytes again. Once two chunks overlap
  // (a retry with other chunk boundaries), `overlapped` is set, `chunks` is dropped and the seal
  // checksums the stored bytes instead.
  std::map<uint64_t, Chunk> chunks ABSL_GUARDED_BY(mu);
  bool overlapped ABSL_GUARDED_BY(mu) = false;
  std::map<uint64_t, uint64_t> covered ABSL_GUARDED_BY(mu);  // received [begin, end)
  uint64_t covered_bytes ABSL_GUARDED_BY(mu) = 0;
  int receiving ABSL_GUARDED_BY(mu) = 0;  // ReceiveChunk calls writing outside mu

  // Records a chunk [offset, offset + size) with CRC32C crc; true when that exact chunk was
  // recorded before with the same CRC (a retry: the bytes need not be copied again).
  bool RecordChunk(uint64_t offset, uint64_t size, uint32_t crc)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (overlapped) return false;
    auto exact = chunks.find(offset);
    if (exact != chunks.end() && exact->second.size == size) {
      const bool duplicate = exact->second.crc32c == crc;
      exact->second.crc32c = crc;
      return duplicate;
    }
    auto next = chunks.lower_bound(offset);
    bool overlaps = next != chunks.end() && next->first < offset + size;
    if (next != chunks.begin()) {
      auto prev = std::prev(next);
      overlaps = overlaps || prev->first + prev->second.size > offset;
    }
    if (overlaps) {
      overlapped = true;
      chunks.clear();
    } else {
      chunks[offset] = Chunk{size, crc};
    }
    return false;
  }

  // [offset, offset + size) no longer holds what was received (it was overwritten by bytes that
  // failed their check): it must arrive again, and the seal checksums the stored bytes.
  void ForgetRange(uint64_t offset, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    overlapped = true;
    chunks.clear();
    fragment_store_internal::RemoveCoverage(&covered, &covered_bytes, offset, offset + size);
  }

  FragmentStatus Status() const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    FragmentStatus s;
    s.key = key;
    s.meta = meta;
    s.state = sealed ? SegmentState::kSealed : SegmentState::kWriting;
    s.bytes_received = sealed ? meta.fragment_bytes : covered_bytes;
    s.fragment_crc32c = fragment_crc32c;
    return s;
  }

  void ResetReceived() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    chunks.clear();
    overlapped = false;
    covered.clear();
    covered_bytes = 0;
  }

  // The first range not received yet, as "[a, b)".
  std::string FirstMissing() const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    uint64_t begin = 0;
    uint64_t end = meta.fragment_bytes;
    if (!covered.empty()) {
      auto first = covered.begin();
      if (first->first > 0) {
        end = first->first;
      } else {
        begin = first->second;
        auto next = std::next(first);
        if (next != covered.end()) end = next->first;
      }
    }
    return absl::StrCat("[", begin, ", ", end, ")");
  }
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_FRAGMENT_STORE_INTERNAL_H_
