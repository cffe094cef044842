// What a rank registers (snapshot_store.h): its entries, validated, and their layout in a slot;
// dtypes and job ids.
#include "daemon/store/snapshot_store.h"

#include <cctype>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dp_slices.h"
#include "common/status.h"
#include "daemon/store/snapshot_store_internal.h"

namespace tessera {
namespace {

using snapshot_store_internal::kMaxWorldSize;

constexpr size_t kMaxEntries = 100000;
constexpr size_t kMaxEntryNameBytes = 256;
constexpr size_t kMaxDims = 16;
constexpr uint64_t kEntryAlignment = 256;  // DMA-friendly offsets for device-to-host copies
constexpr uint64_t kPageBytes = 4096;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// FNV-1a over the fields that define a layout.
uint64_t HashEntries(const std::vector<EntrySpec>& entries) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const EntrySpec& e : entries) {
    mix(e.name().data(), e.name().size());
    mix("\0", 1);
    mix(e.dtype().data(), e.dtype().size());
    mix("\0", 1);
    for (int64_t d : e.shape()) mix(&d, sizeof(d));
    uint64_t n = e.nbytes();
    mix(&n, sizeof(n));
    int kind = e.kind();
    mix(&kind, sizeof(kind));
    if (e.has_slice()) {
      const uint64_t slice[2] = {e.slice().offset(), e.slice().length()};
      mix(slice, sizeof(slice));
    }
  }
  return h;
}

}  // namespace

absl::StatusOr<uint64_t> DtypeItemBytes(const std::string& dtype) {
  static const std::map<std::string, uint64_t>* kDtypes = new std::map<std::string, uint64_t>{
      {"bool", 1},      {"uint8", 1},     {"int8", 1},          {"float8_e4m3fn", 1},
      {"float8_e5m2", 1}, {"int16", 2},   {"uint16", 2},        {"float16", 2},
      {"bfloat16", 2},  {"int32", 4},     {"uint32", 4},        {"float32", 4},
      {"int64", 8},     {"uint64", 8},    {"float64", 8},       {"complex64", 8},
      {"complex128", 16}, {"bytes", 1},
  };
  auto it = kDtypes->find(dtype);
  if (it != kDtypes->end()) return it->second;
  std::vector<std::string> names;
  for (const auto& [name, size] : *kDtypes) names.push_back(name);
  return absl::InvalidArgumentError(absl::StrCat("dtype '", dtype, "' is not one of ",
                                                 absl::StrJoin(names, ", ")));
}

absl::Status ValidateRankAndWorldSize(uint32_t rank, uint32_t world_size) {
  if (world_size == 0 || world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(absl::StrCat("world_size must be 1..", kMaxWorldSize,
                                                   ", got ", world_size));
  }
  if (rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is not below world_size ",
                                                   world_size, " (valid ranks: 0..",
                                                   world_size - 1, ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateJobId(const std::string& job_id) {
  if (job_id.empty() || job_id.size() > kMaxJobIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("job_id must be 1..", kMaxJobIdBytes,
                                                   " bytes, got ", job_id.size()));
  }
  if (job_id[0] == '.') {
    return absl::InvalidArgumentError("job_id '" + job_id + "' must not start with '.'");
  }
  for (char c : job_id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat("job_id '", job_id, "' has the character 0x", absl::Hex(c, absl::kZeroPad2),
                       "; allowed are letters, digits, '.', '_' and '-'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SlotLayout> ComputeSlotLayout(const std::vector<EntrySpec>& entries) {
  if (entries.empty() || entries.size() > kMaxEntries) {
    return absl::InvalidArgumentError(absl::StrCat("a rank registers 1..", kMaxEntries,
                                                   " entries, got ", entries.size()));
  }
  SlotLayout layout;
  std::set<std::string> names;
  uint64_t offset = 0;
  ShardManifest worst_case;
  uint64_t block_checksum_bytes = 0;
  worst_case.set_layout_version(kSegmentLayoutVersion);
  worst_case.set_job_id(std::string(kMaxJobIdBytes, 'j'));
  worst_case.set_rank(kMaxWorldSize);
  worst_case.set_world_size(kMaxWorldSize);
  worst_case.set_step(INT64_MAX);
  worst_case.set_data_bytes(UINT64_MAX);
  DataParallelGroup* dp = worst_case.mutable_data_parallel();
  dp->set_dp_rank(UINT32_MAX);
  dp->set_dp_size(UINT32_MAX);
  dp->set_replicated_bytes(UINT64_MAX);
  dp->set_members_fingerprint(UINT64_MAX);
  for (size_t i = 0; i < entries.size(); ++i) {
    const EntrySpec& e = entries[i];
    const std::string where = absl::StrCat("entry ", i, " ('", e.name(), "')");
    if (e.name().empty() || e.name().size() > kMaxEntryNameBytes) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": name must be 1..",
                                                     kMaxEntryNameBytes, " bytes"));
    }
    for (char c : e.name()) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        return absl::InvalidArgumentError(where + ": name has a control character");
      }
    }
    if (!names.insert(e.name()).second) {
      return absl::InvalidArgumentError(where + ": the name is registered twice");
    }
    auto item = DtypeItemBytes(e.dtype());
    if (!item.ok()) return Annotate(item.status(), where);
    if (e.shape_size() > static_cast<int>(kMaxDims)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", e.shape_size(),
                                                     " dimensions, at most ", kMaxDims));
    }
    uint64_t elements = 1;
    for (int64_t d : e.shape()) {
      if (d < 0) return absl::InvalidArgumentError(absl::StrCat(where, ": negative dimension ", d));
      if (d != 0 && elements > UINT64_MAX / static_cast<uint64_t>(d)) {
        return absl::InvalidArgumentError(where + ": shape overflows 64 bits");
      }
      elements *= static_cast<uint64_t>(d);
    }
    switch (e.kind()) {
      case ENTRY_KIND_TENSOR:
        if (elements > UINT64_MAX / *item) {
          return absl::InvalidArgumentError(where + ": shape overflows 64 bits");
        }
        if (elements * *item != e.nbytes()) {
          return absl::InvalidArgumentError(absl::StrCat(
              where, ": nbytes ", e.nbytes(), " does not match shape [",
              absl::StrJoin(e.shape(), ","), "] of ", e.dtype(), " (", elements * *item,
              " bytes)"));
        }
        break;
      case ENTRY_KIND_BLOB:
        if (e.nbytes() == 0) {
          return absl::InvalidArgumentError(where + ": a blob needs a capacity nbytes > 0");
        }
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": kind ", static_cast<int>(e.kind()), " must be TENSOR (1) or BLOB (2)"));
    }
    if (e.has_slice()) {
      if (e.kind() != ENTRY_KIND_TENSOR) {
        return absl::InvalidArgumentError(where + ": only a tensor can be stored as a slice "
                                                  "(a blob's length changes per snapshot)");
      }
      if (e.slice().offset() > e.nbytes() || e.slice().length() > e.nbytes() - e.slice().offset()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": slice [", e.slice().offset(), ", +", e.slice().length(),
            ") must lie within the tensor's ", e.nbytes(), " bytes"));
      }
    }
    const uint64_t stored = StoredBytes(e);
    offset = AlignUp(offset, kEntryAlignment);
    if (offset > (uint64_t{1} << 50) - stored) {
      return absl::InvalidArgumentError(where + ": the rank's state exceeds 1 PiB");
    }
    layout.entry_offsets.push_back(offset);
    offset += stored;
    ManifestEntry* m = worst_case.add_entries();
    *m->mutable_spec() = e;
    m->set_offset(UINT64_MAX);
    m->set_length(UINT64_MAX);
    m->set_crc32c(UINT32_MAX);
    // Block checksums at the smallest block size allowed, counted rather than built: packed
    // fixed32, a tag and a length of at most 10 bytes each.
    block_checksum_bytes += 11 + 4 * ((stored + kMinCrcBlockBytes - 1) / kMinCrcBlockBytes);
  }
  worst_case.set_crc_block_bytes(UINT64_MAX);
  layout.data_bytes = offset;
  layout.manifest_offset = AlignUp(offset, kPageBytes);
  layout.manifest_capacity =
      AlignUp(worst_case.ByteSizeLong() + block_checksum_bytes + 1024, kPageBytes);
  layout.capacity_bytes = layout.manifest_offset + layout.manifest_capacity;
  layout.hash = HashEntries(entries);
  return layout;
}

}  // namespace tessera
