// Data-parallel sharding of replicated tensors. Under data parallelism every member of a DP group
// holds the same replicated tensors (parameters, optimizer state), so each member's snapshot
// stores only its slice of their bytes: the replicated tensors, concatenated in registration
// order, are cut into dp_size contiguous ranges of (nearly) equal size, member r storing range
// r. A tensor may straddle two ranges; each member then stores a piece of it (EntrySpec.slice).
// Every member derives every other member's ranges from the same specs, so a restoring rank
// knows which member holds which bytes without asking.
//
//   DpSlicing slicing = *DpSlicing::Create(specs, replicated, /*dp_size=*/4);
//   for (const DpPiece& p : slicing.pieces(dp_rank)) copy entry p.entry's [p.offset, +p.length)
#ifndef TESSERA_COMMON_DP_SLICES_H_
#define TESSERA_COMMON_DP_SLICES_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/manifest.pb.h"

namespace tessera {

// The bytes of an entry that a shard stores: its slice's length when it has one, otherwise the
// whole tensor (or a blob's capacity).
uint64_t StoredBytes(const EntrySpec& spec);

// FNV-1a of the members' job ranks in DP-rank order (DataParallelGroup.members_fingerprint).
uint64_t MembersFingerprint(const std::vector<uint32_t>& members);

// FNV-1a of `bytes`: the same in every process (unlike absl::Hash, which is seeded per process),
// so members can compare fingerprints.
uint64_t StableFingerprint(const std::string& bytes);

// Bytes [offset, offset + length) of entry `entry`.
struct DpPiece {
  size_t entry = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

class DpSlicing {
 public:
  // Range boundaries are multiples of this (except the end), so pieces start DMA-aligned.
  static constexpr uint64_t kAlignment = 256;

  // `replicated[i]` marks entry i replicated across the group (tensors only). dp_size is
  // 1..65536. Errors name the entry at fault.
  static absl::StatusOr<DpSlicing> Create(const std::vector<EntrySpec>& entries,
                                          const std::vector<bool>& replicated, uint32_t dp_size);

  uint32_t dp_size() const { return dp_size_; }
  uint64_t replicated_bytes() const { return replicated_bytes_; }
  bool replicated(size_t entry) const { return spans_[entry].has_value(); }
  // The range [begin, end) of the replicated bytes that DP rank r stores.
  std::pair<uint64_t, uint64_t> range(uint32_t r) const { return {bounds_[r], bounds_[r + 1]}; }
  // The pieces DP rank r stores, in entry order; pieces of no bytes are left out.
  std::vector<DpPiece> pieces(uint32_t r) const;
  // What DP rank r stores of entry i: nullopt when i is not replicated (stored whole), otherwise
  // its slice (length 0 when r stores none of it).
  std::optional<EntrySlice> slice(uint32_t r, size_t entry) const;

 private:
  DpSlicing() = default;
  uint32_t dp_size_ = 1;
  uint64_t replicated_bytes_ = 0;
  // Per entry: where its bytes start in the replicated concatenation and how many; nullopt when
  // not replicated.
  std::vector<std::optional<std::pair<uint64_t, uint64_t>>> spans_;
  std::vector<uint64_t> bounds_;  // dp_size + 1 boundaries
};

}  // namespace tessera

#endif  // TESSERA_COMMON_DP_SLICES_H_
