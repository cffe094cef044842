// Segment headers as a trainer, a damaged memory or a crash can leave them: every field but the
// file's name is the trainer's to write. The input becomes one segment file in a store directory,
// which a restarting daemon then re-adopts: ValidateSealedHeader, Segment::Open,
// SnapshotStore::Open and FragmentStore::Open, and then what runs on what they adopted (the
// listings, PrepareRestore, Pin, the standalone Coordination's restore point after a restart,
// FragmentStore::Get and VerifyFragment).
//
// Input: a flags byte, the 4096-byte header (zero-padded when shorter), then the payload (at most
// 64 KiB; the file holds exactly the header and it).
//   flags bit 0: recompute the header CRC32C after the changes below (so that the input gets past
//   it)
//         bit 1: recompute the payload CRC32C of [0, payload_bytes) when that lies in the payload
//         bit 2: state SEALED
//         bit 3: name the file as the daemon names a slot of the header's job and rank (when the
//                daemon could have: a valid job id, a rank below kMaxNamedRank); otherwise another
//                job's
//         bit 4: a fragment file ("frag-<n>.frag") instead of a slot file
//         bit 5: the store is clustered
//         bit 6: capacity_bytes = the payload's size
//
// Invariants: a header that validates has its payload and manifest inside its capacity (checked
// in 128 bits) and a NUL-terminated job id; a refused one is DATA_LOSS; Segment::Open refuses a
// capacity larger than the file; both stores open whatever the file holds (a damaged segment
// never keeps a daemon from starting), adopt it only if its header validates, its kind is theirs,
// its payload CRC32C matches and (slots) its name is its job's and rank's; and everything read
// afterwards lies inside the file.
#include <fcntl.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/segment.h"
#include "daemon/coordination/coordination.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "fuzz/fuzz_util.h"
#include "proto/manifest.pb.h"

namespace tessera {
namespace {

constexpr size_t kMaxPayloadBytes = size_t{64} << 10;
// The daemon names slots of ranks below 2^20; the restore point it derives after a restart costs
// time linear in the highest rank (under ASan, 9 s for 2^20), so the fuzzer stays below this.
constexpr uint32_t kMaxNamedRank = 4096;

enum Flags : uint8_t {
  kFixHeaderCrc = 1 << 0,
  kFixPayloadCrc = 1 << 1,
  kSealed = 1 << 2,
  kNameForHeader = 1 << 3,
  kFragmentFile = 1 << 4,
  kClustered = 1 << 5,
  kCapacityIsPayload = 1 << 6,
};

using u128 = unsigned __int128;

std::string JobOf(const SegmentHeader& h) {
  return std::string(h.job_id, strnlen(h.job_id, sizeof(h.job_id)));
}

// What ValidateSealedHeader promises, restated without its helpers.
void CheckValidHeader(const SegmentHeader& h) {
  FUZZ_CHECK(h.magic == kSegmentMagic && h.layout_version == kSegmentLayoutVersion,
             "a valid header has the magic and layout version");
  FUZZ_CHECK(h.kind == static_cast<uint32_t>(SegmentKind::kSlot) ||
                 h.kind == static_cast<uint32_t>(SegmentKind::kFragment),
             "a valid header is a slot or a fragment");
  FUZZ_CHECK(ComputeHeaderCrc(h) == h.header_crc32c, "a valid header matches its CRC32C");
  FUZZ_CHECK(h.payload_bytes <= h.capacity_bytes, "a valid header's payload fits its capacity");
  FUZZ_CHECK(u128{h.manifest_offset} + h.manifest_bytes <= u128{h.payload_bytes},
             "a valid header's manifest lies in its payload");
  FUZZ_CHECK(h.job_id[sizeof(h.job_id) - 1] == '\0', "a valid header's job id is terminated");
}

// The checks the client library makes of a restore's bounds (agent/client.cc, OpenRestore),
// which a daemon must never fail: it answers only from headers it validated.
void CheckRestoreInfo(const SnapshotStore::RestoreInfo& info, uint64_t file_payload_bytes,
                      const std::string& file) {
  FUZZ_CHECK(info.payload_bytes <= file_payload_bytes, "a restore's payload lies in the file");
  FUZZ_CHECK(RangeWithin(info.manifest_offset, info.manifest_bytes, info.payload_bytes),
             "a restore's manifest lies in its payload");
  FUZZ_CHECK(info.manifest_bytes <= static_cast<uint64_t>(INT_MAX),
             "a restore's manifest can be parsed in one piece");
  // As the client does next: parse the manifest where the daemon says it is.
  ShardManifest manifest;
  (void)manifest.ParseFromArray(file.data() + kSegmentHeaderBytes + info.manifest_offset,
                                static_cast<int>(info.manifest_bytes));
}

void CheckSnapshotStore(const std::string& dir, bool clustered, const std::string& name,
                        const SegmentHeader& h, const std::string& file) {
  const uint64_t file_payload_bytes = file.size() - kSegmentHeaderBytes;
  SnapshotStore::Options options;
  options.directory = dir;
  options.capacity_bytes = uint64_t{1} << 30;
  options.prefault = false;
  options.crc_threads = 1;
  options.clustered = clustered;
  options.process_alive = [](pid_t, uint64_t) { return false; };
  auto store = SnapshotStore::Open(options);
  FUZZ_CHECK(store.ok(),
             "a store opens whatever segment its directory holds: " + store.status().ToString());
  const SnapshotStore::Stats stats = (*store)->stats();
  FUZZ_CHECK(stats.adopted_at_start + stats.discarded_at_start ==
                 (absl::EndsWith(name, ".slot") ? 1u : 0u),
             "a slot file is adopted or discarded");
  if (stats.adopted_at_start == 1) {
    CheckValidHeader(h);
    FUZZ_CHECK(LoadState(h) == SegmentState::kSealed, "only a sealed slot is adopted");
    FUZZ_CHECK(h.kind == static_cast<uint32_t>(SegmentKind::kSlot), "only a slot is adopted");
    FUZZ_CHECK(h.capacity_bytes <= file_payload_bytes, "an adopted slot's capacity is its file's");
    FUZZ_CHECK(Crc32c(file.data() + kSegmentHeaderBytes, h.payload_bytes) == h.payload_crc32c,
               "an adopted slot's payload matches its CRC32C");
    FUZZ_CHECK(name == absl::StrCat(JobOf(h), ".r", h.rank, ".1.slot"),
               "an adopted slot is named for its header's job and rank");
  }
  for (const auto& v : (*store)->ListVersions("")) {
    FUZZ_CHECK(stats.adopted_at_start == 1, "only an adopted slot is listed");
    FUZZ_CHECK(v.payload_bytes <= file_payload_bytes, "a listed payload lies in the file");
    auto info = (*store)->PrepareRestore(v.job_id, v.rank, v.step, /*verify=*/true);
    FUZZ_CHECK(info.ok(), "an adopted slot can be restored: " + info.status().ToString());
    CheckRestoreInfo(*info, file_payload_bytes, file);
    auto newest = (*store)->PrepareRestore(v.job_id, v.rank, -1, /*verify=*/false);
    if (newest.ok()) CheckRestoreInfo(*newest, file_payload_bytes, file);
    auto pinned = (*store)->Pin(v.job_id, v.rank, v.step);
    if (pinned.ok()) {
      FUZZ_CHECK(pinned->payload_bytes <= file_payload_bytes, "a pinned payload lies in the file");
      FUZZ_CHECK(
          RangeWithin(pinned->manifest_offset, pinned->manifest_bytes, pinned->payload_bytes),
          "a pinned shard's manifest lies in its payload");
      (*store)->Unpin(v.job_id, v.rank, v.step);
    }
  }
  (*store)->ListRanks("");
  if (!clustered) {
    // A restarted standalone daemon derives each job's restore point from what it adopted.
    Coordination coordination(store->get());
    for (const auto& v : (*store)->ListVersions("")) {
      auto step = coordination.FindLatestRestorable(v.job_id, 0, v.rank, 1);
      if (step.ok()) {
        auto info = coordination.PrepareRestore(v.job_id, v.rank, *step, /*verify=*/true);
        if (info.ok()) CheckRestoreInfo(*info, file_payload_bytes, file);
      }
    }
  }
}

void CheckFragmentStore(const std::string& dir, const std::string& name, const SegmentHeader& h,
                        const std::string& file) {
  const uint64_t file_payload_bytes = file.size() - kSegmentHeaderBytes;
  CapacityBudget budget(uint64_t{1} << 30);
  FragmentStore::Options options;
  options.directory = dir;
  options.budget = &budget;
  options.prefault = false;
  options.crc_threads = 1;
  options.precreate_spares = false;
  auto store = FragmentStore::Open(options);
  FUZZ_CHECK(store.ok(), "a fragment store opens whatever segment its directory holds: " +
                             store.status().ToString());
  const FragmentStore::Stats stats = (*store)->stats();
  FUZZ_CHECK(stats.adopted_at_start + stats.discarded_at_start ==
                 (absl::EndsWith(name, ".frag") ? 1u : 0u),
             "a fragment file is adopted or discarded");
  if (stats.adopted_at_start == 1) {
    CheckValidHeader(h);
    FUZZ_CHECK(h.kind == static_cast<uint32_t>(SegmentKind::kFragment),
               "only a fragment is adopted as one");
    FUZZ_CHECK(Crc32c(file.data() + kSegmentHeaderBytes, h.payload_bytes) == h.payload_crc32c,
               "an adopted fragment's payload matches its CRC32C");
  }
  for (const FragmentStatus& held : (*store)->List("")) {
    FUZZ_CHECK(stats.adopted_at_start == 1, "only an adopted fragment is listed");
    auto view = (*store)->Get(held.key, 0);
    FUZZ_CHECK(view.ok(), "an adopted fragment can be read: " + view.status().ToString());
    FUZZ_CHECK(view->size() <= file_payload_bytes, "a fragment's bytes lie in its file");
    FUZZ_CHECK(Crc32c(view->data(), view->size()) == view->fragment_crc32c(),
               "an adopted fragment's bytes match its CRC32C");
    FUZZ_CHECK((*store)->VerifyFragment(held.key).ok(), "an adopted fragment verifies");
  }
}

std::string HeaderBytes(const SegmentHeader& h) {
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  auto add = [&](uint8_t flags, SegmentHeader h, const std::string& payload) {
    std::string seed(1, static_cast<char>(flags));
    seed += HeaderBytes(h);
    seeds.push_back(seed + payload);
  };
  // A sealed slot as SealSnapshot leaves it: data, then a manifest naming it.
  ShardManifest manifest;
  manifest.set_layout_version(1);
  manifest.set_job_id("job-1");
  manifest.set_world_size(2);
  manifest.set_step(7);
  ManifestEntry* e = manifest.add_entries();
  e->mutable_spec()->set_name("w");
  e->mutable_spec()->set_dtype("float32");
  e->mutable_spec()->add_shape(4);
  e->mutable_spec()->set_nbytes(16);
  e->mutable_spec()->set_kind(ENTRY_KIND_TENSOR);
  e->set_length(16);
  std::string data = "0123456789abcdef";
  e->set_crc32c(Crc32c(data.data(), data.size()));
  manifest.set_data_bytes(16);
  std::string payload(4096, '\0');
  payload.replace(0, data.size(), data);
  const std::string m = manifest.SerializeAsString();
  payload.replace(4096 - 1024, m.size(), m);
  SegmentHeader h;
  std::memset(&h, 0, sizeof(h));
  h.magic = kSegmentMagic;
  h.layout_version = kSegmentLayoutVersion;
  h.kind = static_cast<uint32_t>(SegmentKind::kSlot);
  h.state = static_cast<uint32_t>(SegmentState::kSealed);
  h.step = 7;
  h.rank = 0;
  h.world_size = 2;
  h.capacity_bytes = payload.size();
  h.manifest_offset = 4096 - 1024;
  h.manifest_bytes = m.size();
  h.payload_bytes = h.manifest_offset + h.manifest_bytes;
  h.payload_crc32c = Crc32c(payload.data(), h.payload_bytes);
  std::strcpy(h.job_id, "job-1");
  h.epoch = 3;
  h.header_crc32c = ComputeHeaderCrc(h);
  add(kSealed | kNameForHeader, h, payload);
  add(kSealed | kNameForHeader | kClustered, h, payload);
  // The case: a manifest range that wraps around 2^64, CRC recomputed.
  SegmentHeader wrapped = h;
  wrapped.manifest_offset = UINT64_MAX - 15;
  wrapped.manifest_bytes = 32;
  add(kSealed | kNameForHeader | kFixHeaderCrc, wrapped, payload);
  // Another job's header in this job's file.
  SegmentHeader other = h;
  std::strcpy(other.job_id, "victim");
  add(kSealed | kFixHeaderCrc, other, payload);
  // A sealed fragment of RS(2, 1).
  SegmentHeader f = h;
  f.kind = static_cast<uint32_t>(SegmentKind::kFragment);
  f.fragment_index = 1;
  f.ec_k = 2;
  f.ec_m = 1;
  f.shard_bytes = 2 * 2048;
  f.owner_incarnation = 5;
  f.payload_bytes = 2048;
  f.capacity_bytes = 2048;
  f.manifest_offset = 0;
  f.manifest_bytes = 0;
  std::string fragment(2048, '\x5a');
  f.payload_crc32c = Crc32c(fragment.data(), fragment.size());
  f.header_crc32c = ComputeHeaderCrc(f);
  add(kSealed | kFragmentFile, f, fragment);
  // An empty (recycled) segment.
  SegmentHeader empty = h;
  empty.state = static_cast<uint32_t>(SegmentState::kEmpty);
  add(kNameForHeader | kFixHeaderCrc, empty, payload);
  return seeds;
}

std::string* directory = nullptr;

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::fuzz::Setup(tessera::Seeds);
  tessera::directory = new std::string(tessera::fuzz::ScratchDirectory("segment"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  fuzz::Input in(data, size);
  const uint8_t flags = in.U8();
  SegmentHeader h;
  std::memset(&h, 0, sizeof(h));
  const std::string header = in.Bytes(sizeof(h));
  std::memcpy(&h, header.data(), header.size());
  const std::string payload = in.Bytes(kMaxPayloadBytes);

  if (flags & kSealed) h.state = static_cast<uint32_t>(SegmentState::kSealed);
  if (flags & kCapacityIsPayload) h.capacity_bytes = payload.size();
  if ((flags & kFixPayloadCrc) && h.payload_bytes <= payload.size()) {
    h.payload_crc32c = Crc32c(payload.data(), h.payload_bytes);
  }
  if (flags & kFixHeaderCrc) h.header_crc32c = ComputeHeaderCrc(h);

  const absl::Status valid = ValidateSealedHeader(h);
  if (valid.ok()) {
    CheckValidHeader(h);
  } else {
    FUZZ_CHECK(absl::IsDataLoss(valid), "a refused header is DATA_LOSS: " + valid.ToString());
  }

  // The daemon names a slot file for the job and rank it registered; a trainer cannot rename it.
  const std::string job = JobOf(h);
  std::string name;
  if (flags & kFragmentFile) {
    name = "frag-1.frag";
  } else if ((flags & kNameForHeader) && ValidateJobId(job).ok() && h.rank < kMaxNamedRank) {
    name = absl::StrCat(job, ".r", h.rank, ".1.slot");
  } else {
    name = "job-0.r0.1.slot";
  }
  const std::string& dir = *directory;
  fuzz::RemoveFiles(dir);
  const std::string file = HeaderBytes(h) + payload;
  const std::string path = dir + "/" + name;
  FUZZ_CHECK(fuzz::WriteFile(path, file), "the segment file can be written");

  {
    auto opened = Segment::Open(path, /*writable=*/false);
    if (opened.ok()) {
      FUZZ_CHECK((*opened)->header()->capacity_bytes <= (*opened)->capacity_bytes(),
                 "an opened segment's header capacity fits its file");
    } else {
      FUZZ_CHECK(h.capacity_bytes > payload.size(),
                 "Segment::Open refuses only a short file: " + opened.status().ToString());
    }
  }

  CheckSnapshotStore(dir, (flags & kClustered) != 0, name, h, file);
  // The slot store deleted what it did not adopt; write the file again for the fragment store.
  fuzz::RemoveFiles(dir);
  FUZZ_CHECK(fuzz::WriteFile(path, file), "the segment file can be written");
  CheckFragmentStore(dir, name, h, file);
  fuzz::RemoveFiles(dir);
  return 0;
}
