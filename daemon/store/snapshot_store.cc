#include "daemon/store/snapshot_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <chrono>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/dp_slices.h"
#include "common/logging.h"
#include "common/status.h"

namespace tessera {
namespace {

constexpr size_t kMaxEntries = 100000;
constexpr size_t kMaxEntryNameBytes = 256;
constexpr size_t kMaxDims = 16;
constexpr uint64_t kEntryAlignment = 256;  // DMA-friendly offsets for device-to-host copies
constexpr uint64_t kPageBytes = 4096;
constexpr uint32_t kMaxWorldSize = 1u << 20;
constexpr const char* kSlotSuffix = ".slot";

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

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

std::string RankName(const std::string& job_id, uint32_t rank) {
  return absl::StrCat("job '", job_id, "' rank ", rank);
}

bool DefaultProcessAlive(pid_t pid, uint64_t start_ticks) {
  if (pid <= 0) return false;
  uint64_t now = ProcessStartTicks(pid);
  return now != 0 && (start_ticks == 0 || now == start_ticks);
}

}  // namespace

uint64_t ProcessStartTicks(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return 0;
  // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
  size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return 0;
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  }
  return 0;
}

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
  }
  layout.data_bytes = offset;
  layout.manifest_offset = AlignUp(offset, kPageBytes);
  layout.manifest_capacity = AlignUp(worst_case.ByteSizeLong() + 1024, kPageBytes);
  layout.capacity_bytes = layout.manifest_offset + layout.manifest_capacity;
  layout.hash = HashEntries(entries);
  return layout;
}

absl::StatusOr<std::unique_ptr<SnapshotStore>> SnapshotStore::Open(Options options) {
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("store capacity_bytes must be > 0");
  }
  if (options.crc_threads < 1) options.crc_threads = 1;
  if (!options.process_alive) options.process_alive = DefaultProcessAlive;
  std::string dir = options.directory;
  // mkdir -p
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos == dir.size() || dir[pos] == '/') {
      std::string prefix = dir.substr(0, pos);
      if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoStatus(errno, "create store directory " + prefix);
      }
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError("store directory " + dir + " is not a directory");
  }
  std::unique_ptr<SnapshotStore> store(new SnapshotStore(std::move(options)));
  TESSERA_RETURN_IF_ERROR(store->AdoptExisting());
  return store;
}

SnapshotStore::~SnapshotStore() = default;

absl::Status SnapshotStore::AdoptExisting() {
  auto log = Logger("store");
  DIR* d = opendir(options_.directory.c_str());
  if (d == nullptr) return ErrnoStatus(errno, "open store directory " + options_.directory);
  std::vector<std::string> files;
  while (dirent* ent = readdir(d)) {
    std::string name = ent->d_name;
    if (absl::EndsWith(name, kSlotSuffix)) files.push_back(name);
  }
  closedir(d);
  std::sort(files.begin(), files.end());

  // Runs before the store is shared: gather the newest verified segment per rank, then publish.
  Stats counters;
  uint64_t next_generation = 1;
  std::map<RankKey, std::vector<std::unique_ptr<Segment>>> newest;
  for (const std::string& name : files) {
    const std::string path = options_.directory + "/" + name;
    // The generation counter continues past every file seen, adopted or not.
    size_t dot = name.rfind('.', name.size() - strlen(kSlotSuffix) - 1);
    if (dot != std::string::npos) {
      uint64_t gen = std::strtoull(name.c_str() + dot + 1, nullptr, 10);
      next_generation = std::max(next_generation, gen + 1);
    }
    auto opened = Segment::Open(path, /*writable=*/true);
    absl::Status verdict;
    if (!opened.ok()) {
      verdict = opened.status();
    } else {
      const SegmentHeader& h = *(*opened)->header();
      SegmentState state = LoadState(h);
      if (state != SegmentState::kSealed) {
        verdict = absl::AbortedError(absl::StrCat("state ", SegmentStateName(state)));
      } else if (absl::Status s = ValidateSealedHeader(h); !s.ok()) {
        verdict = s;
      } else if (h.kind != static_cast<uint32_t>(SegmentKind::kSlot)) {
        verdict = absl::DataLossError("not a slot");
      } else {
        uint32_t crc = ParallelCrc32c((*opened)->payload(), h.payload_bytes, options_.crc_threads);
        if (crc != h.payload_crc32c) {
          verdict = absl::DataLossError(absl::StrCat("payload CRC32C 0x", absl::Hex(crc),
                                                     " != header 0x", absl::Hex(h.payload_crc32c)));
        }
      }
    }
    if (!verdict.ok()) {
      if (verdict.code() == absl::StatusCode::kDataLoss) {
        ++counters.crc_failures;
        log->error("discarding damaged segment {}: {}", path, verdict.ToString());
      } else {
        log->info("discarding unsealed segment {}: {}", path, verdict.ToString());
      }
      unlink(path.c_str());
      ++counters.discarded_at_start;
      continue;
    }
    std::unique_ptr<Segment> segment = std::move(*opened);
    const SegmentHeader& h = *segment->header();
    // Keep the two newest sealed steps of each rank: the newest, and the one before it, which
    // may be the job's restore point (the newest step that every rank holds).
    auto& held = newest[RankKey{h.job_id, h.rank}];
    held.push_back(std::move(segment));
    std::sort(held.begin(), held.end(), [](const auto& a, const auto& b) {
      return a->header()->step > b->header()->step;
    });
    if (held.size() > 2) {
      log->info("discarding {} step {}: two newer sealed steps are held", held.back()->path(),
                held.back()->header()->step);
      held.back()->Unlink().IgnoreError();
      held.pop_back();
      ++counters.discarded_at_start;
    }
  }

  uint64_t used = 0;
  uint64_t adopted = 0;
  for (auto& [key, segments] : newest) {
    auto state = std::make_shared<RankState>();
    uint32_t state_world = 0;
    int64_t state_newest = -1;
    uint64_t state_epoch = 0;
    {
      absl::MutexLock rank_lock(&state->mu);
      struct stat st;
      state->data_uid = stat(segments[0]->path().c_str(), &st) == 0 ? st.st_uid : 0;
      state->adopted = true;
      state->world_size = segments[0]->header()->world_size;
      state_world = state->world_size;
      state_newest = segments[0]->header()->step;  // sorted newest first
      for (size_t i = 0; i < segments.size(); ++i) {
        const SegmentHeader& h = *segments[i]->header();
        log->info("re-adopted {} step {} ({} payload bytes) from {}",
                  RankName(key.first, key.second), h.step, h.payload_bytes, segments[i]->path());
        used += segments[i]->file_bytes();
        state_epoch = std::max(state_epoch, h.epoch);
        ++adopted;
        state->slots[i] = std::move(segments[i]);
      }
    }
    absl::MutexLock lock(&mu_);
    uint32_t& world = world_size_[key.first];
    world = std::max(world, state_world);
    int64_t& newest = newest_sealed_[key.first];
    newest = std::max(newest, state_newest);
    if (options_.clustered) {
      // The newest epoch its slots were sealed in: the job's epoch is at least that (the
      // coordinator's answer may raise it), so nothing new is sealed in an older history.
      JobView& job = jobs_[key.first];
      job.commit_known = false;
      job.epoch = std::max(job.epoch, state_epoch);
    }
    ranks_[key] = std::move(state);
  }
  absl::MutexLock lock(&mu_);
  counters.adopted_at_start = adopted;
  counters_ = counters;
  used_bytes_ = used;
  segments_ = adopted;
  next_generation_ = next_generation;
  if (used_bytes_ > options_.capacity_bytes) {
    log->warn("re-adopted segments use {} bytes, more than store.capacity_bytes {}", used_bytes_,
              options_.capacity_bytes);
  }
  return absl::OkStatus();
}

std::shared_ptr<SnapshotStore::RankState> SnapshotStore::FindRank(const std::string& job_id,
                                                                  uint32_t rank) const {
  absl::MutexLock lock(&mu_);
  auto it = ranks_.find({job_id, rank});
  return it == ranks_.end() ? nullptr : it->second;
}

std::shared_ptr<SnapshotStore::RankState> SnapshotStore::FindOrCreateRank(const std::string& job_id,
                                                                          uint32_t rank) {
  absl::MutexLock lock(&mu_);
  auto& state = ranks_[{job_id, rank}];
  if (!state) state = std::make_shared<RankState>();
  return state;
}

absl::Status SnapshotStore::CheckOwner(const RankState& state, const std::string& job_id,
                                       uint32_t rank, const Caller& caller) const {
  if (!state.registered) {
    return absl::NotFoundError(RankName(job_id, rank) + " is not registered: call Register first");
  }
  if (state.owner.pid != caller.pid) {
    return absl::FailedPreconditionError(absl::StrCat(RankName(job_id, rank),
                                                      " is registered by pid ", state.owner.pid,
                                                      ", not by the caller (pid ", caller.pid, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Segment>> SnapshotStore::CreateSlot(const std::string& job_id,
                                                                   uint32_t rank,
                                                                   uint64_t capacity,
                                                                   const Caller& caller) {
  if (options_.before_slot_created) options_.before_slot_created(job_id, rank);
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    generation = next_generation_++;
  }
  SegmentCreateOptions options;
  options.owner_uid = caller.uid;
  options.owner_gid = caller.gid;
  options.mode = 0600;
  options.prefault = options_.prefault;
  const std::string path = absl::StrCat(options_.directory, "/", job_id, ".r", rank, ".",
                                        generation, kSlotSuffix);
  return Segment::Create(path, SegmentKind::kSlot, capacity, options);
}

void SnapshotStore::DeleteSegment(std::unique_ptr<Segment> segment) {
  if (!segment) return;
  if (absl::Status s = segment->Unlink(); !s.ok()) Logger("store")->warn("{}", s.ToString());
  absl::MutexLock lock(&mu_);
  used_bytes_ -= segment->file_bytes();
  --segments_;
}

absl::StatusOr<SnapshotStore::RegisterResult> SnapshotStore::Register(
    const std::string& job_id, uint32_t rank, uint32_t world_size,
    const std::vector<EntrySpec>& entries, const Caller& caller) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  if (world_size == 0 || world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(absl::StrCat("world_size must be 1..", kMaxWorldSize,
                                                   ", got ", world_size));
  }
  if (rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is not below world_size ",
                                                   world_size, " (valid ranks: 0..",
                                                   world_size - 1, ")"));
  }
  TESSERA_ASSIGN_OR_RETURN(SlotLayout layout, ComputeSlotLayout(entries));
  auto log = Logger("store");

  std::shared_ptr<RankState> state = FindOrCreateRank(job_id, rank);
  absl::MutexLock lock(&state->mu);
  state->mu.Await(absl::Condition(
      +[](RankState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) { return !s->creating_slots; },
      state.get()));
  if (state->registered && state->owner.pid != caller.pid &&
      options_.process_alive(state->owner.pid, state->owner_start_ticks)) {
    return absl::FailedPreconditionError(absl::StrCat(
        RankName(job_id, rank), " is held by pid ", state->owner.pid, " (uid ", state->owner.uid,
        "), which is still running; two trainers cannot claim one rank (check RANK, or stop the "
        "other trainer)"));
  }
  const bool has_data = state->slots[0] || state->slots[1] || !state->retained.empty();
  if (has_data && caller.uid != 0 && state->data_uid != caller.uid) {
    return absl::PermissionDeniedError(absl::StrCat(RankName(job_id, rank),
                                                    " holds snapshots of uid ", state->data_uid,
                                                    "; the caller is uid ", caller.uid));
  }
  if (state->world_size != 0 && state->world_size != world_size && has_data) {
    log->warn("{}: world size changes from {} to {}", RankName(job_id, rank), state->world_size,
              world_size);
  }

  // Slots of the same layout are reused; a sealed slot of another layout is retained until the
  // new layout seals a step, so a restarted trainer with a changed model loses nothing.
  std::vector<std::unique_ptr<Segment>> to_delete;
  for (auto& slot : state->slots) {
    if (!slot) continue;
    SegmentHeader* h = slot->header();
    const SegmentState s = LoadState(*h);
    if (h->layout_hash == layout.hash && slot->capacity_bytes() == layout.capacity_bytes) {
      if (s == SegmentState::kWriting) StoreState(h, SegmentState::kEmpty);  // abandoned copy
      continue;
    }
    if (s == SegmentState::kSealed) {
      log->info("{}: layout changed; keeping sealed step {} until the new layout seals one",
                RankName(job_id, rank), h->step);
      state->retained.push_back(std::move(slot));
    } else {
      to_delete.push_back(std::move(slot));
    }
  }
  for (auto& seg : to_delete) DeleteSegment(std::move(seg));

  uint64_t needed = 0;
  for (auto& slot : state->slots) {
    if (!slot) needed += kSegmentHeaderBytes + layout.capacity_bytes;
  }
  if (needed > 0) {
    absl::MutexLock store_lock(&mu_);
    const uint64_t free_bytes =
        options_.capacity_bytes > used_bytes_ ? options_.capacity_bytes - used_bytes_ : 0;
    if (needed > free_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "registering ", RankName(job_id, rank), " needs ", needed, " bytes (2 slots of ",
          kSegmentHeaderBytes + layout.capacity_bytes, ") but only ", free_bytes, " of ",
          options_.capacity_bytes, " bytes of store capacity are free (raise "
          "store.capacity_bytes or free other jobs)"));
    }
    used_bytes_ += needed;
    segments_ += needed / (kSegmentHeaderBytes + layout.capacity_bytes);
  }
  // New slots are created and pre-faulted without the rank's lock (seconds for a large one):
  // listings, status and the agents' connection checks go on meanwhile.
  std::vector<int> missing;
  for (int i = 0; i < 2; ++i) {
    if (!state->slots[i]) missing.push_back(i);
  }
  if (!missing.empty()) {
    state->creating_slots = true;
    state->mu.Unlock();
    std::vector<absl::StatusOr<std::unique_ptr<Segment>>> created;
    for (size_t i = 0; i < missing.size(); ++i) {
      created.push_back(CreateSlot(job_id, rank, layout.capacity_bytes, caller));
      if (!created.back().ok()) break;
    }
    state->mu.Lock();
    state->creating_slots = false;
    if (!created.back().ok()) {
      // The slots made before the failure are deleted (DeleteSegment gives their bytes back);
      // the reservation of the others is given back here.
      size_t made = 0;
      for (auto& c : created) {
        if (!c.ok()) continue;
        DeleteSegment(std::move(*c));
        ++made;
      }
      absl::MutexLock store_lock(&mu_);
      used_bytes_ -= (missing.size() - made) * (kSegmentHeaderBytes + layout.capacity_bytes);
      segments_ -= missing.size() - made;
      return Annotate(created.back().status(), "registering " + RankName(job_id, rank));
    }
    for (size_t i = 0; i < missing.size(); ++i) {
      std::unique_ptr<Segment>& slot = state->slots[missing[i]];
      slot = std::move(*created[i]);
      slot->header()->layout_hash = layout.hash;
    }
  }
  for (auto& slot : state->slots) {
    struct stat st;
    if (stat(slot->path().c_str(), &st) == 0 && st.st_uid != caller.uid &&
        chown(slot->path().c_str(), caller.uid, caller.gid) != 0) {
      return ErrnoStatus(errno, absl::StrCat("give ", slot->path(), " to uid ", caller.uid));
    }
  }

  {
    absl::MutexLock store_lock(&mu_);
    uint32_t& world = world_size_[job_id];
    world = std::max(world, world_size);
  }
  state->registered = true;
  state->owner = caller;
  state->owner_start_ticks = ProcessStartTicks(caller.pid);
  state->data_uid = caller.uid;
  state->world_size = world_size;
  state->entries = entries;
  state->layout = layout;

  RegisterResult result;
  result.layout = layout;
  result.segment_bytes = kSegmentHeaderBytes + layout.capacity_bytes;
  for (auto& slot : state->slots) {
    result.slot_paths.push_back(slot->path());
    if (LoadState(*slot->header()) == SegmentState::kSealed) {
      result.newest_sealed_step = std::max(result.newest_sealed_step, slot->header()->step);
    }
  }
  log->info("registered {} (world {}, {} entries, {} bytes per slot) for pid {} uid {}",
            RankName(job_id, rank), world_size, entries.size(), layout.capacity_bytes, caller.pid,
            caller.uid);
  return result;
}

absl::StatusOr<uint32_t> SnapshotStore::BeginSnapshot(const std::string& job_id, uint32_t rank,
                                                      int64_t step, const Caller& caller,
                                                      bool replace_uncommitted) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) {
    return absl::NotFoundError(RankName(job_id, rank) + " is not registered: call Register first");
  }
  absl::MutexLock lock(&state->mu);
  TESSERA_RETURN_IF_ERROR(CheckOwner(*state, job_id, rank, caller));
  if (step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", step));
  }
  const int64_t committed_step = committed(job_id);
  int keep = -1;  // the restore point: the committed step if a slot holds it, else the newest
  int64_t newest_step = -1;
  for (int i = 0; i < 2; ++i) {
    const SegmentHeader& h = *state->slots[i]->header();
    SegmentState s = LoadState(h);
    if (s == SegmentState::kWriting && h.step == step) return static_cast<uint32_t>(i);
    if (s != SegmentState::kSealed) continue;
    newest_step = std::max(newest_step, h.step);
    if (h.step == committed_step) keep = i;
  }
  if (keep < 0) {
    for (int i = 0; i < 2; ++i) {
      const SegmentHeader& h = *state->slots[i]->header();
      if (LoadState(h) == SegmentState::kSealed && h.step == newest_step) keep = i;
    }
  }
  for (const auto& seg : state->retained) newest_step = std::max(newest_step, seg->header()->step);
  if (step <= newest_step) {
    return absl::FailedPreconditionError(absl::StrCat(
        RankName(job_id, rank), ": step ", step, " is not after the newest sealed step ",
        newest_step, " (steps must increase; to start over from an earlier step, unregister "
        "with drop_snapshots first)"));
  }
  if (options_.clustered) {
    // docs/PROTOCOL.md: a slot is reused only when what it holds is no longer needed; prefer an
    // unsealed slot, then the older releasable one.
    if (!CommitKnown(job_id)) {
      return absl::UnavailableError(absl::StrCat(
          RankName(job_id, rank), ": the snapshot of step ", step, " waits until this daemon, "
          "restarted, has learned the job's commit and epoch from its coordinator"));
    }
    std::string busy[2];
    int target = -1;
    for (int i = 0; i < 2; ++i) busy[i] = SlotBusyReason(*state, i, job_id, replace_uncommitted);
    for (int i = 0; i < 2; ++i) {
      if (!busy[i].empty()) continue;
      if (target < 0 || LoadState(*state->slots[i]->header()) != SegmentState::kSealed ||
          (LoadState(*state->slots[target]->header()) == SegmentState::kSealed &&
           state->slots[i]->header()->step < state->slots[target]->header()->step)) {
        target = i;
      }
    }
    // Under the wait policy a rank holds at most one live uncommitted step.
    for (int i = 0; i < 2 && !replace_uncommitted; ++i) {
      const std::string reason = SlotBusyReason(*state, i, job_id, /*replace_uncommitted=*/true);
      const SegmentHeader& h = *state->slots[i]->header();
      if (!reason.empty() && LoadState(h) == SegmentState::kSealed && h.step > committed_step) {
        return absl::UnavailableError(absl::StrCat(RankName(job_id, rank), ": the snapshot of step ",
                                                   step, " waits: ", reason));
      }
    }
    if (target < 0) {
      return absl::UnavailableError(absl::StrCat(RankName(job_id, rank), ": the snapshot of step ",
                                                 step, " has no free slot: ", busy[0], "; ",
                                                 busy[1]));
    }
    ClaimSlot(state.get(), target, job_id, rank, step, epoch(job_id));
    return static_cast<uint32_t>(target);
  }
  uint32_t target = keep == 0 ? 1 : 0;
  int64_t job_newest_sealed;
  bool commits_decided;
  {
    absl::MutexLock store_lock(&mu_);
    job_newest_sealed = newest_sealed_[job_id];
    // Commits come from this store's ranks (whole job here) or from the cluster (a commit seen).
    commits_decided = HoldsWholeJobLocked(job_id) || committed_.count(job_id) > 0;
  }
  // Under the wait policy a rank holds at most one live uncommitted step: a step that is sealed,
  // newer than the commit, and not yet passed by another rank (a step some rank went past without
  // sealing can never be committed, so it does not hold anyone back).
  for (int i = 0; i < 2 && !replace_uncommitted && commits_decided; ++i) {
    const SegmentHeader& h = *state->slots[i]->header();
    if (LoadState(h) == SegmentState::kSealed && h.step > committed_step &&
        h.step >= job_newest_sealed) {
      return absl::UnavailableError(absl::StrCat(
          RankName(job_id, rank), ": step ", h.step,
          " is not committed yet (not every rank of the job has sealed it); the snapshot of step ",
          step, " waits for it"));
    }
  }
  if (state->pins[target] > 0) {
    return absl::UnavailableError(absl::StrCat(
        RankName(job_id, rank), ": step ", state->slots[target]->header()->step,
        " is still being protected (sent to peers); the snapshot of step ", step,
        " cannot use its slot yet"));
  }
  ClaimSlot(state.get(), target, job_id, rank, step, /*epoch=*/0);
  return target;
}

void SnapshotStore::ClaimSlot(RankState* state, int index, const std::string& job_id,
                              uint32_t rank, int64_t step, uint64_t epoch) {
  SegmentHeader* h = state->slots[index]->header();
  StoreState(h, SegmentState::kEmpty);
  state->is_protected[index] = false;
  h->step = step;
  h->rank = rank;
  h->world_size = state->world_size;
  h->payload_bytes = 0;
  h->payload_crc32c = 0;
  h->manifest_offset = state->layout.manifest_offset;
  h->manifest_bytes = 0;
  h->layout_hash = state->layout.hash;
  h->epoch = epoch;
  std::memset(h->job_id, 0, sizeof(h->job_id));
  std::memcpy(h->job_id, job_id.data(), job_id.size());
  StoreState(h, SegmentState::kWriting);
}

std::string SnapshotStore::SlotBusyReason(const RankState& state, int i, const std::string& job_id,
                                          bool replace_uncommitted) const {
  const SegmentHeader& h = *state.slots[i]->header();
  if (state.pins[i] > 0) {
    return absl::StrCat("step ", h.step, " is still being protected (sent to peers)");
  }
  if (LoadState(h) != SegmentState::kSealed) return "";
  int64_t committed_step;
  uint64_t job_epoch;
  bool commit_known;
  bool dead;
  {
    absl::MutexLock lock(&mu_);
    auto c = committed_.find(job_id);
    committed_step = c == committed_.end() ? -1 : c->second;
    auto j = jobs_.find(job_id);
    job_epoch = j == jobs_.end() ? 0 : j->second.epoch;
    commit_known = j == jobs_.end() || j->second.commit_known;
    dead = j != jobs_.end() && j->second.dead_steps.count(h.step) > 0;
  }
  if (!commit_known) {
    return absl::StrCat("step ", h.step, " is kept until this daemon, restarted, learns the job's "
                        "commit from its coordinator");
  }
  if (h.step == committed_step) return absl::StrCat("step ", h.step, " is the committed step");
  if (h.step < committed_step) return "";                  // superseded by the commit
  if (h.epoch < job_epoch) return "";                      // an abandoned history (void)
  if (dead && h.epoch == job_epoch) return "";             // some rank skipped it
  if (!state.is_protected[i]) {
    return absl::StrCat("step ", h.step, " is not protected yet (its fragments are not all "
                        "stored on peers)");
  }
  if (!replace_uncommitted) {
    return absl::StrCat("step ", h.step, " is not committed yet (not every rank of the job has "
                        "it protected)");
  }
  return "";  // protected: its fragments keep it restorable if it commits later
}

absl::Status SnapshotStore::ValidateManifest(const ShardManifest& m, const RankState& state,
                                             const std::string& job_id, uint32_t rank,
                                             int64_t step) const {
  auto mismatch = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("manifest of ", RankName(job_id, rank),
                                                   " step ", step, ": ", what));
  };
  if (m.job_id() != job_id || m.rank() != rank || m.step() != step) {
    return mismatch(absl::StrCat("names job '", m.job_id(), "' rank ", m.rank(), " step ",
                                 m.step()));
  }
  if (m.world_size() != state.world_size) {
    return mismatch(absl::StrCat("world_size ", m.world_size(), ", registered ",
                                 state.world_size));
  }
  if (m.data_bytes() != state.layout.data_bytes) {
    return mismatch(absl::StrCat("data_bytes ", m.data_bytes(), ", layout has ",
                                 state.layout.data_bytes));
  }
  if (static_cast<size_t>(m.entries_size()) != state.entries.size()) {
    return mismatch(absl::StrCat(m.entries_size(), " entries, registered ",
                                 state.entries.size()));
  }
  for (int i = 0; i < m.entries_size(); ++i) {
    const ManifestEntry& e = m.entries(i);
    const EntrySpec& reg = state.entries[i];
    if (e.spec().SerializeAsString() != reg.SerializeAsString()) {
      return mismatch(absl::StrCat("entry ", i, " is '", e.spec().name(), "' ", e.spec().dtype(),
                                   " ", e.spec().nbytes(), " bytes; registered '", reg.name(),
                                   "' ", reg.dtype(), " ", reg.nbytes(), " bytes"));
    }
    if (e.offset() != state.layout.entry_offsets[i]) {
      return mismatch(absl::StrCat("entry '", reg.name(), "' at offset ", e.offset(),
                                   ", layout has ", state.layout.entry_offsets[i]));
    }
    const bool tensor = reg.kind() == ENTRY_KIND_TENSOR;
    const uint64_t stored = StoredBytes(reg);
    if ((tensor && e.length() != stored) || e.length() > stored) {
      return mismatch(absl::StrCat("entry '", reg.name(), "' length ", e.length(), ", must be ",
                                   tensor ? "exactly " : "at most ", stored));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SnapshotStore::SealResult> SnapshotStore::SealSnapshot(const std::string& job_id,
                                                                      uint32_t rank, int64_t step,
                                                                      uint64_t manifest_bytes,
                                                                      const Caller& caller) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) {
    return absl::NotFoundError(RankName(job_id, rank) + " is not registered: call Register first");
  }
  absl::MutexLock lock(&state->mu);
  TESSERA_RETURN_IF_ERROR(CheckOwner(*state, job_id, rank, caller));
  int index = -1;
  for (int i = 0; i < 2; ++i) {
    const SegmentHeader& h = *state->slots[i]->header();
    if (h.step != step) continue;
    SegmentState s = LoadState(h);
    if (s == SegmentState::kSealed) {
      return SealResult{h.payload_crc32c, h.payload_bytes, h.world_size};
    }
    if (s == SegmentState::kWriting) index = i;
  }
  if (index < 0) {
    return absl::FailedPreconditionError(absl::StrCat(RankName(job_id, rank), ": step ", step,
                                                      " is not being written (call "
                                                      "BeginSnapshot first)"));
  }
  if (manifest_bytes == 0 || manifest_bytes > state->layout.manifest_capacity) {
    return absl::InvalidArgumentError(absl::StrCat("manifest_bytes ", manifest_bytes,
                                                   " must be 1..",
                                                   state->layout.manifest_capacity));
  }
  Segment& slot = *state->slots[index];
  SegmentHeader* h = slot.header();
  ShardManifest manifest;
  if (!manifest.ParseFromArray(slot.payload() + state->layout.manifest_offset,
                               static_cast<int>(manifest_bytes))) {
    return absl::InvalidArgumentError(absl::StrCat(
        RankName(job_id, rank), " step ", step, ": the ", manifest_bytes,
        " bytes at the manifest offset do not parse as a ShardManifest"));
  }
  TESSERA_RETURN_IF_ERROR(ValidateManifest(manifest, *state, job_id, rank, step));

  const uint64_t payload_bytes = state->layout.manifest_offset + manifest_bytes;
  const uint32_t crc = ParallelCrc32c(slot.payload(), payload_bytes, options_.crc_threads);
  h->kind = static_cast<uint32_t>(SegmentKind::kSlot);
  h->payload_bytes = payload_bytes;
  h->payload_crc32c = crc;
  h->manifest_offset = state->layout.manifest_offset;
  h->manifest_bytes = manifest_bytes;
  h->sealed_unix_ms = NowUnixMs();
  h->header_crc32c = ComputeHeaderCrc(*h);
  StoreState(h, SegmentState::kSealed);
  state->is_protected[index] = false;
  // Every seal of the rank since this daemon started is seen here, so the previous seal in this
  // epoch is known, unless the rank's slots were re-adopted (it may have sealed in this epoch
  // before the restart) and it has not sealed since.
  int64_t previous_step;
  if (state->last_seal_step >= -1 && state->last_seal_epoch == h->epoch) {
    previous_step = state->last_seal_step;
  } else if (state->last_seal_step == -2 && state->adopted) {
    previous_step = -2;
  } else {
    previous_step = -1;
  }
  state->previous_step[index] = previous_step;
  state->last_seal_step = step;
  state->last_seal_epoch = h->epoch;

  // Where this store decides the job's commits, the older step stays until a commit releases it
  // or a snapshot replaces it: it may be the step the other ranks are about to seal.
  bool commits_decided;
  {
    absl::MutexLock store_lock(&mu_);
    commits_decided =
        options_.clustered || HoldsWholeJobLocked(job_id) || committed_.count(job_id) > 0;
  }
  SegmentHeader* other = state->slots[1 - index]->header();
  if (!commits_decided && LoadState(*other) == SegmentState::kSealed && other->step < step &&
      state->pins[1 - index] == 0) {
    StoreState(other, SegmentState::kEmpty);
  }
  std::vector<std::unique_ptr<Segment>> retained = std::move(state->retained);
  state->retained.clear();
  for (auto& seg : retained) DeleteSegment(std::move(seg));
  {
    absl::MutexLock store_lock(&mu_);
    ++counters_.seals;
    counters_.sealed_bytes += payload_bytes;
    int64_t& newest = newest_sealed_[job_id];
    newest = std::max(newest, step);
  }
  return SealResult{crc, payload_bytes, state->world_size, h->epoch, previous_step};
}

std::vector<SnapshotStore::VersionInfo> SnapshotStore::ListVersions(
    const std::string& job_id) const {
  std::vector<std::pair<RankKey, std::shared_ptr<RankState>>> ranks;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, state] : ranks_) {
      if (job_id.empty() || key.first == job_id) ranks.emplace_back(key, state);
    }
  }
  std::vector<VersionInfo> out;
  for (const auto& [key, state] : ranks) {
    absl::MutexLock lock(&state->mu);
    std::vector<const Segment*> segments;
    for (const auto& slot : state->slots) {
      if (slot) segments.push_back(slot.get());
    }
    for (const auto& seg : state->retained) segments.push_back(seg.get());
    for (const Segment* seg : segments) {
      const SegmentHeader& h = *seg->header();
      SegmentState s = LoadState(h);
      if (s == SegmentState::kEmpty) continue;
      VersionInfo v{key.first, key.second, h.step, h.payload_bytes, h.payload_crc32c, s};
      v.epoch = h.epoch;
      v.world_size = h.world_size;
      for (int i = 0; i < 2; ++i) {
        if (state->slots[i].get() == seg) {
          v.is_protected = state->is_protected[i];
          v.previous_step = state->previous_step[i];
        }
      }
      out.push_back(std::move(v));
    }
  }
  std::sort(out.begin(), out.end(), [](const VersionInfo& a, const VersionInfo& b) {
    return std::tie(a.job_id, a.rank, a.step) < std::tie(b.job_id, b.rank, b.step);
  });
  return out;
}

absl::StatusOr<SnapshotStore::RestoreInfo> SnapshotStore::PrepareRestore(const std::string& job_id,
                                                                         uint32_t rank,
                                                                         int64_t step) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  if (step < -1) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, or -1 for the newest; got ",
                                                   step));
  }
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) {
    return absl::NotFoundError(RankName(job_id, rank) + " has no snapshot on this node");
  }
  absl::MutexLock lock(&state->mu);
  const Segment* best = nullptr;
  std::vector<int64_t> held;
  auto consider = [&](const Segment* seg) {
    const SegmentHeader& h = *seg->header();
    if (LoadState(h) != SegmentState::kSealed) return;
    held.push_back(h.step);
    if (step >= 0 ? h.step == step : (!best || h.step > best->header()->step)) best = seg;
  };
  for (const auto& slot : state->slots) {
    if (slot) consider(slot.get());
  }
  for (const auto& seg : state->retained) consider(seg.get());
  if (!best) {
    return absl::NotFoundError(absl::StrCat(
        RankName(job_id, rank), step >= 0 ? absl::StrCat(" has no sealed step ", step) : "",
        held.empty() ? " has no sealed snapshot on this node"
                     : absl::StrCat("; sealed steps here: ", absl::StrJoin(held, ", "))));
  }
  const SegmentHeader& h = *best->header();
  TESSERA_RETURN_IF_ERROR(Annotate(ValidateSealedHeader(h), best->path()));
  const uint32_t crc = ParallelCrc32c(best->payload(), h.payload_bytes, options_.crc_threads);
  if (crc != h.payload_crc32c) {
    {
      absl::MutexLock store_lock(&mu_);
      ++counters_.crc_failures;
    }
    Logger("store")->error("{} step {}: payload CRC32C 0x{:08x} != sealed 0x{:08x} in {}",
                           RankName(job_id, rank), h.step, crc, h.payload_crc32c, best->path());
    return absl::DataLossError(absl::StrCat(
        RankName(job_id, rank), " step ", h.step, ": payload CRC32C 0x", absl::Hex(crc),
        " does not match the sealed 0x", absl::Hex(h.payload_crc32c), " (", best->path(),
        " is damaged)"));
  }
  return RestoreInfo{h.step, best->path(), h.payload_bytes, h.manifest_offset, h.manifest_bytes,
                     h.payload_crc32c};
}

absl::StatusOr<SnapshotStore::PinnedShard> SnapshotStore::Pin(const std::string& job_id,
                                                               uint32_t rank, int64_t step) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (state) {
    absl::MutexLock lock(&state->mu);
    for (int i = 0; i < 2; ++i) {
      if (!state->slots[i]) continue;
      const SegmentHeader& h = *state->slots[i]->header();
      if (LoadState(h) != SegmentState::kSealed || h.step != step) continue;
      ++state->pins[i];
      return PinnedShard{state->slots[i]->payload(), h.payload_bytes,   h.payload_crc32c,
                         h.world_size,               h.manifest_offset, h.manifest_bytes,
                         static_cast<int64_t>(h.sealed_unix_ms), h.epoch, state->previous_step[i]};
    }
  }
  return absl::NotFoundError(absl::StrCat(RankName(job_id, rank), " has no sealed step ", step,
                                          " in a slot on this node"));
}

void SnapshotStore::Unpin(const std::string& job_id, uint32_t rank, int64_t step) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return;
  absl::MutexLock lock(&state->mu);
  for (int i = 0; i < 2; ++i) {
    if (state->slots[i] && state->slots[i]->header()->step == step && state->pins[i] > 0) {
      --state->pins[i];
      return;
    }
  }
}

int64_t SnapshotStore::committed(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = committed_.find(job_id);
  return it == committed_.end() ? -1 : it->second;
}

void SnapshotStore::Commit(const std::string& job_id, int64_t step) {
  std::vector<std::shared_ptr<RankState>> ranks;
  {
    absl::MutexLock lock(&mu_);
    auto it = committed_.find(job_id);
    if (it != committed_.end() && it->second >= step) return;
    committed_[job_id] = step;
    for (const auto& [key, state] : ranks_) {
      if (key.first == job_id) ranks.push_back(state);
    }
  }
  std::vector<std::unique_ptr<Segment>> doomed;
  for (const auto& state : ranks) {
    absl::MutexLock lock(&state->mu);
    for (int i = 0; i < 2; ++i) {
      if (!state->slots[i] || state->pins[i] > 0) continue;
      SegmentHeader* h = state->slots[i]->header();
      if (LoadState(*h) == SegmentState::kSealed && h->step < step) StoreState(h, SegmentState::kEmpty);
    }
    auto& retained = state->retained;
    for (auto it = retained.begin(); it != retained.end();) {
      if ((*it)->header()->step < step) {
        doomed.push_back(std::move(*it));
        it = retained.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& seg : doomed) DeleteSegment(std::move(seg));
}

void SnapshotStore::RollbackRank(const std::string& job_id, uint32_t rank, int64_t step) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return;
  std::vector<std::unique_ptr<Segment>> doomed;
  {
    absl::MutexLock lock(&state->mu);
    for (int i = 0; i < 2; ++i) {
      if (!state->slots[i] || state->pins[i] > 0) continue;
      SegmentHeader* h = state->slots[i]->header();
      if (LoadState(*h) == SegmentState::kSealed && h->step > step) {
        Logger("store")->info("{} resumes from step {}: releasing its step {} of the abandoned run",
                              RankName(job_id, rank), step, h->step);
        StoreState(h, SegmentState::kEmpty);
        state->is_protected[i] = false;
      }
    }
    auto& retained = state->retained;
    for (auto it = retained.begin(); it != retained.end();) {
      if ((*it)->header()->step > step) {
        doomed.push_back(std::move(*it));
        it = retained.erase(it);
      } else {
        ++it;
      }
    }
    state->last_seal_step = -1;  // a new run of the rank: nothing sealed in it yet
    state->last_seal_epoch = 0;
  }
  for (auto& seg : doomed) DeleteSegment(std::move(seg));
  // The job's newest sealed step is what the ranks still hold.
  int64_t newest = -1;
  for (const VersionInfo& v : ListVersions(job_id)) {
    if (v.state == SegmentState::kSealed) newest = std::max(newest, v.step);
  }
  absl::MutexLock lock(&mu_);
  newest_sealed_[job_id] = newest;
}

void SnapshotStore::SetJobState(const std::string& job_id, uint64_t epoch, int64_t committed_step,
                                const std::vector<int64_t>& dead_steps) {
  {
    absl::MutexLock lock(&mu_);
    JobView& job = jobs_[job_id];
    job.commit_known = true;
    if (epoch > job.epoch) {
      job.epoch = epoch;
      job.dead_steps.clear();
    }
    if (epoch == job.epoch) {
      job.dead_steps.insert(dead_steps.begin(), dead_steps.end());
      while (job.dead_steps.size() > 256) job.dead_steps.erase(job.dead_steps.begin());
    }
  }
  if (committed_step >= 0) Commit(job_id, committed_step);
}

uint64_t SnapshotStore::epoch(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? 0 : it->second.epoch;
}

bool SnapshotStore::CommitKnown(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  return it == jobs_.end() || it->second.commit_known;
}

void SnapshotStore::MarkProtected(const std::string& job_id, uint32_t rank, int64_t step) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return;
  absl::MutexLock lock(&state->mu);
  for (int i = 0; i < 2; ++i) {
    if (!state->slots[i]) continue;
    const SegmentHeader& h = *state->slots[i]->header();
    if (LoadState(h) == SegmentState::kSealed && h.step == step) state->is_protected[i] = true;
  }
}

absl::Status SnapshotStore::Unregister(const std::string& job_id, uint32_t rank,
                                       bool drop_snapshots, const Caller& caller) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return absl::OkStatus();
  std::vector<std::unique_ptr<Segment>> doomed;
  {
    absl::MutexLock lock(&state->mu);
    if (state->registered && state->owner.pid != caller.pid && caller.uid != 0 &&
        options_.process_alive(state->owner.pid, state->owner_start_ticks)) {
      return absl::FailedPreconditionError(absl::StrCat(
          RankName(job_id, rank), " is registered by running pid ", state->owner.pid,
          "; only that process (or root) may unregister it"));
    }
    if (!state->registered && !drop_snapshots) return absl::OkStatus();
    state->registered = false;
    for (auto& slot : state->slots) {
      if (slot && LoadState(*slot->header()) == SegmentState::kWriting) {
        StoreState(slot->header(), SegmentState::kEmpty);
      }
    }
    if (drop_snapshots) {
      if (caller.uid != 0 && state->data_uid != caller.uid) {
        return absl::PermissionDeniedError(absl::StrCat(
            RankName(job_id, rank), " holds snapshots of uid ", state->data_uid,
            "; the caller is uid ", caller.uid));
      }
      for (auto& slot : state->slots) doomed.push_back(std::move(slot));
      for (auto& seg : state->retained) doomed.push_back(std::move(seg));
      state->retained.clear();
    }
  }
  for (auto& seg : doomed) DeleteSegment(std::move(seg));
  if (drop_snapshots) {
    absl::MutexLock lock(&mu_);
    ranks_.erase({job_id, rank});
  }
  return absl::OkStatus();
}

bool SnapshotStore::HoldsWholeJobLocked(const std::string& job_id) const {
  auto it = world_size_.find(job_id);
  if (it == world_size_.end()) return false;
  size_t ranks = 0;
  for (const auto& [key, state] : ranks_) ranks += key.first == job_id;
  return ranks >= it->second;
}

bool SnapshotStore::HoldsWholeJob(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  return HoldsWholeJobLocked(job_id);
}

size_t SnapshotStore::RankCount(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  size_t n = 0;
  for (const auto& [key, state] : ranks_) n += key.first == job_id;
  return n;
}

std::vector<SnapshotStore::RankInfo> SnapshotStore::ListRanks(const std::string& job_id) const {
  std::vector<std::pair<RankKey, std::shared_ptr<RankState>>> ranks;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, state] : ranks_) {
      if (job_id.empty() || key.first == job_id) ranks.emplace_back(key, state);
    }
  }
  std::vector<RankInfo> out;
  for (const auto& [key, state] : ranks) {
    absl::MutexLock lock(&state->mu);
    RankInfo info;
    info.job_id = key.first;
    info.rank = key.second;
    info.world_size = state->world_size;
    info.owner = state->owner;
    info.registered = state->registered;
    info.alive = state->owner.pid > 0 &&
                 options_.process_alive(state->owner.pid, state->owner_start_ticks);
    for (const auto& slot : state->slots) {
      if (slot && LoadState(*slot->header()) == SegmentState::kSealed) {
        info.newest_sealed_step = std::max(info.newest_sealed_step, slot->header()->step);
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

absl::StatusOr<SnapshotStore::SealedSlot> SnapshotStore::FindSealedSlot(const std::string& job_id,
                                                                        uint32_t rank,
                                                                        int64_t step) const {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return absl::NotFoundError(RankName(job_id, rank) + " has no snapshot on this node");
  absl::MutexLock lock(&state->mu);
  const Segment* best = nullptr;
  std::vector<int64_t> held;
  for (const auto& slot : state->slots) {
    if (!slot || LoadState(*slot->header()) != SegmentState::kSealed) continue;
    const int64_t s = slot->header()->step;
    held.push_back(s);
    if (step >= 0 ? s == step : (!best || s > best->header()->step)) best = slot.get();
  }
  if (!best) {
    return absl::NotFoundError(absl::StrCat(
        RankName(job_id, rank), step >= 0 ? absl::StrCat(" has no sealed step ", step) : "",
        held.empty() ? " has no sealed slot on this node"
                     : absl::StrCat("; sealed steps here: ", absl::StrJoin(held, ", "))));
  }
  return SealedSlot{best->path(), best->header()->step, best->header()->payload_bytes};
}

absl::StatusOr<uint8_t> SnapshotStore::FlipPayloadByte(const std::string& job_id, uint32_t rank,
                                                       int64_t step, uint64_t offset) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return absl::NotFoundError(RankName(job_id, rank) + " has no snapshot on this node");
  absl::MutexLock lock(&state->mu);
  for (auto& slot : state->slots) {
    if (!slot || LoadState(*slot->header()) != SegmentState::kSealed ||
        slot->header()->step != step) {
      continue;
    }
    if (offset >= slot->header()->payload_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("offset must be below the payload's ",
                                                     slot->header()->payload_bytes,
                                                     " bytes; got ", offset));
    }
    const uint8_t before = slot->payload()[offset];
    slot->payload()[offset] = before ^ 0xFF;
    return before;
  }
  return absl::NotFoundError(absl::StrCat(RankName(job_id, rank), " has no sealed step ", step,
                                          " in a slot on this node"));
}

absl::StatusOr<bool> SnapshotStore::RepairSealed(const std::string& job_id, uint32_t rank,
                                                  int64_t step, const uint8_t* payload,
                                                  uint64_t payload_bytes) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return absl::NotFoundError(RankName(job_id, rank) + " has no snapshot on this node");
  absl::MutexLock lock(&state->mu);
  for (int i = 0; i < 2; ++i) {
    Segment* slot = state->slots[i].get();
    if (!slot || LoadState(*slot->header()) != SegmentState::kSealed ||
        slot->header()->step != step) {
      continue;
    }
    const SegmentHeader& h = *slot->header();
    if (payload_bytes != h.payload_bytes || Crc32c(payload, payload_bytes) != h.payload_crc32c) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the repair of ", RankName(job_id, rank), " step ", step, " has ", payload_bytes,
          " bytes, CRC32C 0x", absl::Hex(Crc32c(payload, payload_bytes)), "; the sealed shard has ",
          h.payload_bytes, " bytes, CRC32C 0x", absl::Hex(h.payload_crc32c)));
    }
    if (ParallelCrc32c(slot->payload(), h.payload_bytes, options_.crc_threads) ==
        h.payload_crc32c) {
      return false;
    }
    std::memcpy(slot->payload(), payload, payload_bytes);
    Logger("store")->warn("{} step {}: damaged payload rewritten from redundancy in {}",
                          RankName(job_id, rank), step, slot->path());
    return true;
  }
  return absl::NotFoundError(absl::StrCat(RankName(job_id, rank), " has no sealed step ", step,
                                          " in a slot on this node"));
}

SnapshotStore::Stats SnapshotStore::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = counters_;
  s.capacity_bytes = options_.capacity_bytes;
  s.used_bytes = used_bytes_;
  s.segments = segments_;
  return s;
}

}  // namespace tessera
