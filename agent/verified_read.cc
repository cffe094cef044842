#include "agent/verified_read.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/dp_slices.h"
#include "common/segment.h"

namespace tessera {
namespace {

// Copied and checksummed this many bytes at a time, so that the checksum reads from cache what
// the copy has just written.
constexpr uint64_t kChunkBytes = uint64_t{1} << 20;

// Whether `s` is 1..max_bytes bytes without control characters (it goes into messages and JSON).
bool Printable(const std::string& s, size_t max_bytes) {
  if (s.empty() || s.size() > max_bytes) return false;
  return std::none_of(s.begin(), s.end(),
                      [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

// Copies `bytes` at `src` into `buffer` a chunk at a time and returns their CRC32C, continuing
// `crc`: what is checksummed is what was copied, never read twice from `src`.
uint32_t CopiedCrc32c(const uint8_t* src, uint64_t bytes, uint8_t* buffer, uint32_t crc) {
  for (uint64_t at = 0; at < bytes; at += kChunkBytes) {
    const uint64_t n = std::min(kChunkBytes, bytes - at);
    std::memcpy(buffer, src + at, n);
    crc = Crc32c(buffer, n, crc);
  }
  return crc;
}

}  // namespace

absl::Status CheckReadableManifest(const ShardManifest& manifest, const std::string& job_id,
                                   uint32_t rank, int64_t step) {
  if (manifest.job_id() != job_id || manifest.rank() != rank || manifest.step() != step) {
    return absl::DataLossError(absl::StrCat(
        "the manifest is of job '", manifest.job_id(), "' rank ", manifest.rank(), " step ",
        manifest.step(), ", not of job '", job_id, "' rank ", rank, " step ", step));
  }
  if (rank >= manifest.world_size()) {
    return absl::DataLossError(absl::StrCat("the manifest's world_size ", manifest.world_size(),
                                            " does not hold rank ", rank));
  }
  const DataParallelGroup& group = manifest.data_parallel();
  if (manifest.has_data_parallel() && group.dp_rank() >= group.dp_size()) {
    return absl::DataLossError(absl::StrCat("the manifest's DP rank ", group.dp_rank(),
                                            " is not below its DP size ", group.dp_size()));
  }
  std::set<std::string> names;
  for (int i = 0; i < manifest.entries_size(); ++i) {
    const ManifestEntry& m = manifest.entries(i);
    const EntrySpec& spec = m.spec();
    if (!Printable(spec.name(), 256)) {
      return absl::DataLossError(absl::StrCat("manifest entry ", i, " has a name of ",
                                              spec.name().size(),
                                              " bytes; names are 1..256 "
                                              "bytes without control characters"));
    }
    const std::string where = absl::StrCat("manifest entry ", i, " ('", spec.name(), "')");
    if (!names.insert(spec.name()).second) {
      return absl::DataLossError(where + ": the name is in the manifest twice");
    }
    if (!Printable(spec.dtype(), 32)) {
      return absl::DataLossError(where +
                                 ": its dtype is not 1..32 bytes without control "
                                 "characters");
    }
    if (spec.kind() != ENTRY_KIND_TENSOR && spec.kind() != ENTRY_KIND_BLOB) {
      return absl::DataLossError(absl::StrCat(where, ": kind ", static_cast<int>(spec.kind()),
                                              " is neither a tensor nor a blob"));
    }
    if (spec.has_slice() &&
        (spec.kind() != ENTRY_KIND_TENSOR ||
         !RangeWithin(spec.slice().offset(), spec.slice().length(), spec.nbytes()))) {
      return absl::DataLossError(
          absl::StrCat(where, ": slice [", spec.slice().offset(), ", +", spec.slice().length(),
                       ") is not a part of a tensor of ", spec.nbytes(), " bytes"));
    }
    const uint64_t stored = StoredBytes(spec);
    const bool tensor = spec.kind() == ENTRY_KIND_TENSOR;
    if ((tensor && m.length() != stored) || m.length() > stored) {
      return absl::DataLossError(absl::StrCat(where, ": length ", m.length(), ", but the shard ",
                                              "stores ", tensor ? "exactly " : "at most ", stored,
                                              " bytes of it"));
    }
  }
  return absl::OkStatus();
}

absl::Status CopyVerifiedRange(const uint8_t* entry, uint64_t entry_length, uint64_t block_bytes,
                               absl::Span<const uint32_t> block_crc32c, uint64_t offset,
                               uint64_t length, void* dst) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  std::unique_ptr<uint8_t[]> scratch;  // for the bytes of edge blocks outside the range
  const uint64_t end = offset + length;
  for (uint64_t b = offset / block_bytes; length > 0 && b * block_bytes < end; ++b) {
    const uint64_t begin = b * block_bytes;
    const uint64_t block_end = begin + std::min(block_bytes, entry_length - begin);
    const uint64_t inside_begin = std::max(begin, offset);
    const uint64_t inside_end = std::min(block_end, end);
    if ((begin < inside_begin || inside_end < block_end) && !scratch) {
      scratch.reset(new uint8_t[std::min(kChunkBytes, block_bytes)]);
    }
    uint32_t crc = CopiedCrc32c(entry + begin, inside_begin - begin, scratch.get(), 0);
    for (uint64_t at = inside_begin; at < inside_end; at += kChunkBytes) {
      const uint64_t n = std::min(kChunkBytes, inside_end - at);
      std::memcpy(out + (at - offset), entry + at, n);
      crc = Crc32c(out + (at - offset), n, crc);
    }
    crc = CopiedCrc32c(entry + inside_end, block_end - inside_end, scratch.get(), crc);
    if (crc != block_crc32c[b]) {
      return absl::DataLossError(absl::StrCat(
          "block ", b, " (bytes [", begin, ", ", block_end, ") of the entry) has CRC32C 0x",
          absl::Hex(crc), ", not the manifest's 0x", absl::Hex(block_crc32c[b])));
    }
  }
  return absl::OkStatus();
}

}  // namespace tessera
