#include "common/dp_slices.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tessera {

uint64_t StoredBytes(const EntrySpec& spec) {
  return spec.has_slice() ? spec.slice().length() : spec.nbytes();
}

uint64_t StableFingerprint(const std::string& bytes) {
  uint64_t h = 14695981039346656037ull;  // the FNV-1a 64 offset basis
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

uint64_t MembersFingerprint(const std::vector<uint32_t>& members) {
  std::string bytes;
  for (uint32_t m : members) {
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<char>((m >> (8 * i)) & 0xff));
  }
  return StableFingerprint(bytes);
}

absl::StatusOr<DpSlicing> DpSlicing::Create(const std::vector<EntrySpec>& entries,
                                            const std::vector<bool>& replicated,
                                            uint32_t dp_size) {
  if (dp_size < 1 || dp_size > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("data-parallel size ", dp_size, " must be 1..65536"));
  }
  if (replicated.size() != entries.size()) {
    return absl::InvalidArgumentError(absl::StrCat("replicated flags for ", replicated.size(),
                                                   " entries, but ", entries.size(),
                                                   " are registered"));
  }
  DpSlicing s;
  s.dp_size_ = dp_size;
  s.spans_.resize(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!replicated[i]) continue;
    if (entries[i].kind() != ENTRY_KIND_TENSOR) {
      return absl::InvalidArgumentError(absl::StrCat(
          "entry ", i, " ('", entries[i].name(), "') is a blob: only tensors can be replicated "
          "across the data-parallel group (a blob's length changes per snapshot)"));
    }
    s.spans_[i] = std::make_pair(s.replicated_bytes_, entries[i].nbytes());
    s.replicated_bytes_ += entries[i].nbytes();
  }
  const unsigned __int128 total = s.replicated_bytes_;
  s.bounds_.push_back(0);
  for (uint32_t r = 1; r < dp_size; ++r) {
    const uint64_t even = static_cast<uint64_t>(total * r / dp_size);
    s.bounds_.push_back(std::max(s.bounds_.back(), even / kAlignment * kAlignment));
  }
  s.bounds_.push_back(s.replicated_bytes_);
  return s;
}

std::optional<EntrySlice> DpSlicing::slice(uint32_t r, size_t entry) const {
  const auto& span = spans_[entry];
  if (!span) return std::nullopt;
  const uint64_t begin = std::max(bounds_[r], span->first);
  const uint64_t end = std::min(bounds_[r + 1], span->first + span->second);
  EntrySlice out;
  if (end > begin) {
    out.set_offset(begin - span->first);
    out.set_length(end - begin);
  }
  return out;
}

std::vector<DpPiece> DpSlicing::pieces(uint32_t r) const {
  std::vector<DpPiece> out;
  for (size_t i = 0; i < spans_.size(); ++i) {
    std::optional<EntrySlice> s = slice(r, i);
    if (s && s->length() > 0) out.push_back({i, s->offset(), s->length()});
  }
  return out;
}

}  // namespace tessera
