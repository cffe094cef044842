// Shard manifests as a trainer writes them into its slot before it asks the daemon to seal: the
// bytes are the trainer's, so the daemon parses and checks them (SnapshotStore::SealSnapshot and
// its ValidateManifest) before it publishes the slot. One registered rank (three entries: a
// tensor, a blob and a sliced tensor) snapshots a new step per input, with the input as its
// manifest, and the daemon seals it or refuses it.
//
// Input: a flags byte, the blob's length (a byte, modulo its capacity + 1), then the manifest
// bytes (at most the layout's manifest capacity).
//   flags bit 0: when the bytes parse, set the job, rank, step, world size and data_bytes the
//                daemon expects (so that the input reaches the checks of the entries)
//         bit 1: ... and the registered entries' specs and offsets
//         bit 2: ... and block checksums of the entries' bytes, in blocks of 1 MiB
//         bit 3: the agent passes the payload's CRC32C (the daemon takes it)
//         bit 4: ... and the entries' lengths
//
// Invariants: a parsed manifest serializes to bytes that parse to the same manifest; a sealed
// step's manifest is the registration's (job, rank, step, world size, data_bytes, the entries'
// specs, offsets, lengths and block checksum counts, a block size of 0 or 1 MiB..1 GiB) and its
// payload and CRC32C are what the slot holds; a refused seal is INVALID_ARGUMENT and leaves the
// step unsealed and the newest sealed step restorable, bit-exact.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/dp_slices.h"
#include "common/segment.h"
#include "daemon/store/snapshot_store.h"
#include "fuzz/fuzz_util.h"
#include "proto/manifest.pb.h"

namespace tessera {
namespace {

constexpr char kJob[] = "fuzz-job";
constexpr uint32_t kWorldSize = 2;
constexpr uint32_t kRank = 1;

enum Flags : uint8_t {
  kFixIdentity = 1 << 0,
  kFixEntries = 1 << 1,
  kFixBlocks = 1 << 2,
  kClientCrc = 1 << 3,
  kFixLengths = 1 << 4,
};

struct State {
  std::unique_ptr<SnapshotStore> store;
  Caller caller;
  std::vector<EntrySpec> entries;
  SnapshotStore::RegisterResult registered;
  std::vector<std::unique_ptr<Segment>> slots;  // the trainer's own mappings
  int64_t step = 0;
  int64_t newest_sealed = -1;
  std::string newest_payload;  // its bytes as sealed
};
State* state = nullptr;

std::vector<EntrySpec> Entries() {
  std::vector<EntrySpec> entries(3);
  entries[0].set_name("layer.0.weight");
  entries[0].set_dtype("float32");
  entries[0].add_shape(8);
  entries[0].add_shape(16);
  entries[0].set_nbytes(8 * 16 * 4);
  entries[0].set_kind(ENTRY_KIND_TENSOR);
  entries[1].set_name("rng");
  entries[1].set_dtype("uint8");
  entries[1].add_shape(100);
  entries[1].set_nbytes(100);
  entries[1].set_kind(ENTRY_KIND_BLOB);
  entries[2].set_name("optimizer.exp_avg");
  entries[2].set_dtype("bfloat16");
  entries[2].add_shape(300);
  entries[2].set_nbytes(600);
  entries[2].set_kind(ENTRY_KIND_TENSOR);
  entries[2].mutable_slice()->set_offset(200);
  entries[2].mutable_slice()->set_length(300);
  return entries;
}

// The manifest an agent writes for `step` over the data written (as RunSnapshot does).
ShardManifest AgentManifest(int64_t step, const uint8_t* payload, uint64_t blob_length) {
  const SlotLayout& layout = state->registered.layout;
  ShardManifest m;
  m.set_layout_version(kSegmentLayoutVersion);
  m.set_job_id(kJob);
  m.set_rank(kRank);
  m.set_world_size(kWorldSize);
  m.set_step(step);
  m.set_data_bytes(layout.data_bytes);
  m.set_crc_block_bytes(kMinCrcBlockBytes);
  for (size_t i = 0; i < state->entries.size(); ++i) {
    ManifestEntry* e = m.add_entries();
    *e->mutable_spec() = state->entries[i];
    e->set_offset(layout.entry_offsets[i]);
    const uint64_t length =
        state->entries[i].kind() == ENTRY_KIND_BLOB ? blob_length : StoredBytes(state->entries[i]);
    e->set_length(length);
    e->set_crc32c(Crc32c(payload + layout.entry_offsets[i], length));
    if (length > 0) e->add_block_crc32c(e->crc32c());  // one block: every entry is under 1 MiB
  }
  return m;
}

// What ValidateManifest promises of a sealed step's manifest, restated.
void CheckSealedManifest(const ShardManifest& m, int64_t step) {
  const SlotLayout& layout = state->registered.layout;
  FUZZ_CHECK(
      m.job_id() == kJob && m.rank() == kRank && m.step() == step && m.world_size() == kWorldSize,
      "a sealed manifest names its job, rank, step and world size");
  FUZZ_CHECK(m.data_bytes() == layout.data_bytes, "a sealed manifest has the layout's data_bytes");
  FUZZ_CHECK(m.entries_size() == static_cast<int>(state->entries.size()),
             "a sealed manifest has every registered entry");
  const uint64_t block = m.crc_block_bytes();
  FUZZ_CHECK(block == 0 || (block >= kMinCrcBlockBytes && block <= kMaxCrcBlockBytes),
             "a sealed manifest's block size is 0 or 1 MiB..1 GiB");
  for (int i = 0; i < m.entries_size(); ++i) {
    const ManifestEntry& e = m.entries(i);
    const EntrySpec& reg = state->entries[i];
    FUZZ_CHECK(e.spec().SerializeAsString() == reg.SerializeAsString(),
               "a sealed entry is the registered one");
    FUZZ_CHECK(e.offset() == layout.entry_offsets[i], "a sealed entry is at its layout offset");
    const uint64_t stored = StoredBytes(reg);
    FUZZ_CHECK(reg.kind() == ENTRY_KIND_TENSOR ? e.length() == stored : e.length() <= stored,
               "a sealed entry's length is the registered one");
    FUZZ_CHECK(e.offset() + e.length() <= layout.data_bytes, "a sealed entry lies in the data");
    const uint64_t blocks = block == 0 ? 0 : (e.length() + block - 1) / block;
    FUZZ_CHECK(static_cast<uint64_t>(e.block_crc32c_size()) == blocks,
               "a sealed entry has one checksum per block");
  }
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  std::vector<uint8_t> payload(state->registered.layout.data_bytes, 0x11);
  auto add = [&](uint8_t flags, uint8_t blob, const ShardManifest& m) {
    std::string seed;
    fuzz::PutU8(&seed, flags);
    fuzz::PutU8(&seed, blob);
    seeds.push_back(seed + m.SerializeAsString());
  };
  for (uint8_t blob : {0, 1, 57, 100}) {
    const ShardManifest m = AgentManifest(1, payload.data(), blob);
    add(kFixIdentity | kFixLengths, blob, m);
    add(kFixIdentity | kFixBlocks | kClientCrc | kFixLengths, blob, m);
    add(kFixIdentity | kFixEntries | kFixBlocks | kFixLengths, blob, m);
  }
  // Without the agent's fixes: the bytes as they are.
  add(0, 9, AgentManifest(1, payload.data(), 9));
  ShardManifest wrong = AgentManifest(1, payload.data(), 9);
  wrong.mutable_entries(0)->set_offset(UINT64_MAX - 7);
  wrong.mutable_entries(1)->set_length(UINT64_MAX);
  wrong.set_crc_block_bytes(UINT64_MAX);
  add(kFixIdentity, 9, wrong);
  return seeds;
}

void Initialize() {
  state = new State;
  SnapshotStore::Options options;
  options.directory = fuzz::ScratchDirectory("manifest");
  options.capacity_bytes = uint64_t{64} << 20;
  options.prefault = false;
  options.crc_threads = 1;
  auto store = SnapshotStore::Open(options);
  if (!store.ok()) fuzz::Fail("store: " + store.status().ToString());
  state->store = std::move(*store);
  state->caller = Caller{geteuid(), getegid(), getpid()};
  state->entries = Entries();
  auto registered = state->store->Register(kJob, kRank, kWorldSize, state->entries, state->caller);
  if (!registered.ok()) fuzz::Fail("register: " + registered.status().ToString());
  state->registered = *registered;
  for (const std::string& path : registered->slot_paths) {
    auto slot = Segment::Open(path, /*writable=*/true);
    if (!slot.ok()) fuzz::Fail("map slot: " + slot.status().ToString());
    state->slots.push_back(std::move(*slot));
  }
}

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::Initialize();
  tessera::fuzz::Setup(tessera::Seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  State& s = *state;
  const SlotLayout& layout = s.registered.layout;
  fuzz::Input in(data, size);
  const uint8_t flags = in.U8();
  const uint8_t blob_length = in.U8() % (s.entries[1].nbytes() + 1);
  std::string manifest_bytes = in.Bytes(layout.manifest_capacity);

  // The parser alone: what parses serializes to bytes that parse to the same manifest.
  ShardManifest parsed;
  const bool parses = parsed.ParseFromString(manifest_bytes);
  if (parses) {
    const std::string again = parsed.SerializeAsString();
    ShardManifest reparsed;
    FUZZ_CHECK(reparsed.ParseFromString(again), "a serialized manifest parses");
    FUZZ_CHECK(reparsed.SerializeAsString() == again, "a manifest survives a round trip");
  }

  const int64_t step = ++s.step;
  auto slot_index = s.store->BeginSnapshot(kJob, kRank, step, s.caller);
  FUZZ_CHECK(slot_index.ok(), "a new step can be written: " + slot_index.status().ToString());
  Segment& slot = *s.slots[*slot_index];
  uint8_t* payload = slot.payload();
  std::mt19937_64 random(static_cast<uint64_t>(step));
  for (uint64_t i = 0; i < layout.data_bytes; ++i) payload[i] = static_cast<uint8_t>(random());

  if (parses && (flags & (kFixIdentity | kFixEntries | kFixBlocks | kFixLengths))) {
    const ShardManifest agent = AgentManifest(step, payload, blob_length);
    if (flags & kFixIdentity) {
      parsed.set_job_id(agent.job_id());
      parsed.set_rank(agent.rank());
      parsed.set_step(agent.step());
      parsed.set_world_size(agent.world_size());
      parsed.set_data_bytes(agent.data_bytes());
    }
    for (int i = 0; i < parsed.entries_size() && i < agent.entries_size(); ++i) {
      ManifestEntry* e = parsed.mutable_entries(i);
      if (flags & kFixEntries) {
        *e->mutable_spec() = agent.entries(i).spec();
        e->set_offset(agent.entries(i).offset());
      }
      if (flags & kFixLengths) e->set_length(agent.entries(i).length());
      if (flags & kFixBlocks) {
        e->set_crc32c(agent.entries(i).crc32c());
        *e->mutable_block_crc32c() = agent.entries(i).block_crc32c();
      }
    }
    if (flags & kFixBlocks) parsed.set_crc_block_bytes(agent.crc_block_bytes());
    manifest_bytes = parsed.SerializeAsString().substr(0, layout.manifest_capacity);
  }
  std::memcpy(payload + layout.manifest_offset, manifest_bytes.data(), manifest_bytes.size());
  const uint64_t payload_bytes = layout.manifest_offset + manifest_bytes.size();
  const uint32_t crc = Crc32c(payload, payload_bytes);
  std::optional<uint32_t> client_crc;
  if (flags & kClientCrc) client_crc = crc;

  auto sealed =
      s.store->SealSnapshot(kJob, kRank, step, manifest_bytes.size(), s.caller, client_crc);
  if (fuzz::Verbose()) {
    std::fprintf(stderr, "step %lld: %s\n", static_cast<long long>(step),
                 sealed.ok() ? "sealed" : sealed.status().ToString().c_str());
  }
  if (sealed.ok()) {
    ShardManifest m;
    FUZZ_CHECK(
        m.ParseFromArray(payload + layout.manifest_offset, static_cast<int>(manifest_bytes.size())),
        "a sealed manifest parses");
    CheckSealedManifest(m, step);
    FUZZ_CHECK(sealed->payload_bytes == payload_bytes, "a seal covers data and manifest");
    FUZZ_CHECK(sealed->payload_crc32c == crc, "a seal's CRC32C is its payload's");
    auto info = s.store->PrepareRestore(kJob, kRank, step, /*verify=*/true);
    FUZZ_CHECK(info.ok(), "a sealed step can be restored: " + info.status().ToString());
    FUZZ_CHECK(info->payload_bytes == payload_bytes &&
                   info->manifest_offset == layout.manifest_offset &&
                   info->manifest_bytes == manifest_bytes.size() && info->payload_crc32c == crc,
               "a restore answers what was sealed");
    s.newest_sealed = step;
    s.newest_payload.assign(reinterpret_cast<const char*>(payload), payload_bytes);
  } else {
    FUZZ_CHECK(absl::IsInvalidArgument(sealed.status()),
               "a refused manifest is INVALID_ARGUMENT: " + sealed.status().ToString());
    for (const auto& v : s.store->ListVersions(kJob)) {
      FUZZ_CHECK(v.step != step || v.state != SegmentState::kSealed,
                 "a refused manifest leaves its step unsealed");
    }
    if (s.newest_sealed >= 0) {
      auto info = s.store->PrepareRestore(kJob, kRank, s.newest_sealed, /*verify=*/true);
      FUZZ_CHECK(info.ok(), "a refused seal keeps the newest sealed step restorable: " +
                                info.status().ToString());
      const Segment& held = *s.slots[s.slots[0]->path() == info->segment_path ? 0 : 1];
      FUZZ_CHECK(
          info->payload_bytes == s.newest_payload.size() &&
              std::memcmp(held.payload(), s.newest_payload.data(), s.newest_payload.size()) == 0,
          "a refused seal changes no byte of the newest sealed step");
    }
  }
  return 0;
}
