// SnapshotStore (snapshot_store.h): a rank's snapshots from its registration to their sealing,
// and its unregistration. Opening the store and re-adopting what it holds is in
// snapshot_store_adopt.cc, the layout of a rank's entries in snapshot_store_layout.cc, and what
// becomes of sealed snapshots (listings, restores, commits, drills) in snapshot_store_sealed.cc.
#include "daemon/store/snapshot_store.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/dp_slices.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/snapshot_store_internal.h"

namespace tessera {
namespace snapshot_store_internal {

std::string RankName(const std::string& job_id, uint32_t rank) {
  return absl::StrCat("job '", job_id, "' rank ", rank);
}

}  // namespace snapshot_store_internal

namespace {

using snapshot_store_internal::kMaxWorldSize;
using snapshot_store_internal::kSlotSuffix;
using snapshot_store_internal::RankName;

uint64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
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

uint64_t SnapshotStore::ReclaimAbandoned(const std::string& except_job, uint32_t except_rank) {
  const RankKey except{except_job, except_rank};
  std::vector<std::pair<RankKey, std::shared_ptr<RankState>>> ranks;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, state] : ranks_) {
      if (key != except) ranks.emplace_back(key, state);
    }
  }
  uint64_t freed = 0;
  for (const auto& [key, state] : ranks) {
    std::vector<std::unique_ptr<Segment>> doomed;
    {
      absl::MutexLock lock(&state->mu);
      if (state->creating_slots || !state->retained.empty() || state->pins[0] > 0 ||
          state->pins[1] > 0) {
        continue;
      }
      bool holds_data = false;
      for (const auto& slot : state->slots) {
        holds_data = holds_data || (slot && LoadState(*slot->header()) != SegmentState::kEmpty);
      }
      if (holds_data || (!state->slots[0] && !state->slots[1])) continue;
      if (state->registered &&
          options_.process_alive(state->owner.pid, state->owner_start_ticks)) {
        continue;
      }
      Logger("store")->warn(
          "{}: reclaiming its empty slots: {} without sealing a snapshot, and a registration "
          "needs the room", RankName(key.first, key.second),
          state->registered ? absl::StrCat("pid ", state->owner.pid, " (uid ", state->owner.uid,
                                           ") registered it and exited")
                            : std::string("it was released"));
      state->registered = false;
      for (auto& slot : state->slots) {
        if (slot) doomed.push_back(std::move(slot));
      }
    }
    for (auto& segment : doomed) {
      freed += segment->file_bytes();
      DeleteSegment(std::move(segment));
    }
  }
  if (freed > 0) {
    absl::MutexLock lock(&mu_);
    counters_.reclaimed_bytes += freed;
  }
  return freed;
}

absl::Status SnapshotStore::CheckJobAccess(const std::string& job_id,
                                           const Caller& caller) const {
  if (caller.uid == 0) return absl::OkStatus();
  std::vector<std::shared_ptr<RankState>> ranks;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = ranks_.lower_bound({job_id, 0}); it != ranks_.end() && it->first.first == job_id;
         ++it) {
      ranks.push_back(it->second);
    }
  }
  // The caller shows the job is its own by a registration of it here, or by snapshots of its
  // uid held here (a reader that registers nothing, such as a resharding one).
  bool owned_by_caller = false;
  for (const auto& state : ranks) {
    absl::MutexLock lock(&state->mu);
    const bool has_data = state->slots[0] || state->slots[1] || !state->retained.empty();
    if (has_data && state->data_uid != caller.uid) {
      return absl::PermissionDeniedError(absl::StrCat(
          "job '", job_id, "' holds snapshots of uid ", state->data_uid, " here; the caller is uid ",
          caller.uid, " (a job belongs to the uid that registered it)"));
    }
    if (state->registered && state->owner.uid != caller.uid) {
      return absl::PermissionDeniedError(absl::StrCat("job '", job_id, "' is registered here by uid ",
                                                      state->owner.uid, "; the caller is uid ",
                                                      caller.uid));
    }
    owned_by_caller = owned_by_caller || state->registered || has_data;
  }
  if (!owned_by_caller) {
    return absl::FailedPreconditionError(absl::StrCat(
        "no rank of job '", job_id, "' is registered here by uid ", caller.uid,
        " nor holds its snapshots here: register a rank of the job before asking for its "
        "snapshots"));
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
  options.grant_uid = caller.uid;
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
  TESSERA_RETURN_IF_ERROR(ValidateRankAndWorldSize(rank, world_size));
  TESSERA_ASSIGN_OR_RETURN(SlotLayout layout, ComputeSlotLayout(entries));
  {
    // Refused early, before slots are made; checked again where the rank becomes registered.
    absl::MutexLock store_lock(&mu_);
    TESSERA_RETURN_IF_ERROR(CheckDropFenceLocked(job_id));
  }
  auto log = Logger("store");
  // Short of room for two new slots: first free the slots nobody can want (before any rank lock
  // is held, so that two registrations never wait on each other's ranks).
  {
    uint64_t free_bytes;
    {
      absl::MutexLock store_lock(&mu_);
      free_bytes = options_.capacity_bytes > used_bytes_ ? options_.capacity_bytes - used_bytes_ : 0;
    }
    if (free_bytes < 2 * (kSegmentHeaderBytes + layout.capacity_bytes)) {
      ReclaimAbandoned(job_id, rank);
    }
  }

  std::shared_ptr<RankState> state = FindOrCreateRank(job_id, rank);
  absl::MutexLock lock(&state->mu);
  state->mu.Await(absl::Condition(
      +[](RankState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) { return !s->creating_slots; },
      state.get()));
  if (state->dropped) {
    return absl::UnavailableError(absl::StrCat(RankName(job_id, rank),
                                               " was dropped while this registration waited for "
                                               "it: register again"));
  }
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
    // Slots kept from an earlier registration of the rank (without data, or this uid's) are
    // opened by this caller's uid from now on, and by no other.
    absl::StatusOr<uid_t> grantee = SegmentGrantee(slot->path());
    if (!grantee.ok() || *grantee != caller.uid) {
      TESSERA_RETURN_IF_ERROR(GrantSegmentAccess(slot->path(), caller.uid));
    }
  }

  {
    absl::MutexLock store_lock(&mu_);
    // Under the rank's lock and mu_: a CheckDrop either fenced the job before this (refused
    // here; the slots made are an unregistered rank's, which the drop or ReclaimAbandoned
    // deletes) or finds the rank registered when it takes the rank's lock.
    TESSERA_RETURN_IF_ERROR(CheckDropFenceLocked(job_id));
    uint32_t& world = world_size_[job_id];
    world = std::max(world, world_size);
  }
  state->registered = true;
  if (state->owner.pid != caller.pid) state->resume_step = -1;  // a new process: not asked yet
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
  uint64_t dropped_epoch;
  {
    absl::MutexLock lock(&mu_);
    auto c = committed_.find(job_id);
    committed_step = c == committed_.end() ? -1 : c->second;
    auto j = jobs_.find(job_id);
    job_epoch = j == jobs_.end() ? 0 : j->second.epoch;
    commit_known = j == jobs_.end() || j->second.commit_known;
    dead = j != jobs_.end() && j->second.dead_steps.count(h.step) > 0;
    dropped_epoch = j == jobs_.end() ? 0 : j->second.dropped_epoch;
  }
  if (!commit_known) {
    return absl::StrCat("step ", h.step, " is kept until this daemon, restarted, learns the job's "
                        "commit from its coordinator");
  }
  if (dropped_epoch > 0 && h.epoch <= dropped_epoch) return "";  // the job was dropped since
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
  const uint64_t block = m.crc_block_bytes();
  if (block != 0 && (block < kMinCrcBlockBytes || block > kMaxCrcBlockBytes)) {
    return mismatch(absl::StrCat("crc_block_bytes ", block, " must be 0 (no block checksums) or ",
                                 kMinCrcBlockBytes, " to ", kMaxCrcBlockBytes));
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
    const uint64_t blocks = block == 0 ? 0 : (e.length() + block - 1) / block;
    if (static_cast<uint64_t>(e.block_crc32c_size()) != blocks) {
      return mismatch(absl::StrCat("entry '", reg.name(), "' has ", e.block_crc32c_size(),
                                   " block checksums; its ", e.length(), " bytes in blocks of ",
                                   block, " need ", blocks));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SnapshotStore::SealResult> SnapshotStore::SealSnapshot(
    const std::string& job_id, uint32_t rank, int64_t step, uint64_t manifest_bytes,
    const Caller& caller, std::optional<uint32_t> client_crc) {
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
  // The agent's checksum, computed as the bytes landed, unless this daemon checks every seal.
  uint32_t crc;
  if (client_crc && !options_.verify_client_checksums) {
    crc = *client_crc;
  } else {
    crc = ParallelCrc32c(slot.payload(), payload_bytes, options_.crc_threads);
    if (client_crc && crc != *client_crc) {
      {
        absl::MutexLock store_lock(&mu_);
        ++counters_.crc_failures;
      }
      Logger("store")->error("{} step {}: the payload's CRC32C 0x{:08x} is not the 0x{:08x} its "
                             "agent computed while copying: not sealed",
                             RankName(job_id, rank), step, crc, *client_crc);
      return absl::DataLossError(absl::StrCat(
          RankName(job_id, rank), " step ", step, ": the payload's CRC32C 0x", absl::Hex(crc),
          " is not the 0x", absl::Hex(*client_crc), " the agent computed while copying (its "
          "bytes changed after they were checksummed); the step is not sealed"));
    }
  }
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
      state->dropped = true;
      absl::MutexLock store_lock(&mu_);
      auto it = ranks_.find({job_id, rank});
      if (it != ranks_.end() && it->second == state) ranks_.erase(it);
      if (!options_.clustered) ForgetJobIfGoneLocked(job_id);
    }
  }
  for (auto& seg : doomed) DeleteSegment(std::move(seg));
  return absl::OkStatus();
}

void SnapshotStore::ForgetJobIfGoneLocked(const std::string& job_id) {
  auto it = ranks_.lower_bound({job_id, 0});
  if (it != ranks_.end() && it->first.first == job_id) return;
  committed_.erase(job_id);
  newest_sealed_.erase(job_id);
  world_size_.erase(job_id);
  jobs_.erase(job_id);
}

// Every rank of the job is locked at once, so the analysis cannot follow the locks.
absl::StatusOr<SnapshotStore::DropJobResult> SnapshotStore::DropJob(
    const std::string& job_id, std::optional<uid_t> owner_uid,
    bool force) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  if (options_.clustered) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", job_id, "' was not dropped here alone: this daemon is a member of a cluster, "
        "where the job's fragments on the other members and its commit would let a relaunch "
        "resume it; the job's coordinator drops it on every member"));
  }
  std::vector<std::pair<uint32_t, std::shared_ptr<RankState>>> ranks;
  std::set<std::string> other_jobs;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, state] : ranks_) {
      if (key.first == job_id) {
        ranks.emplace_back(key.second, state);
      } else {
        other_jobs.insert(key.first);
      }
    }
  }
  if (ranks.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "job '", job_id, "' has no snapshot and no registered rank on this daemon; jobs here: ",
        other_jobs.empty() ? std::string("none")
                           : absl::StrCat("'", absl::StrJoin(other_jobs, "', '"), "'")));
  }
  // In rank order; no other code holds two ranks' locks at once, and mu_ is taken after a rank's
  // lock as Register does.
  for (auto& [rank, state] : ranks) {
    state->mu.Lock();
    state->mu.Await(absl::Condition(
        +[](RankState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) { return !s->creating_slots; },
        state.get()));
  }
  auto unlock_all = [&ranks] {
    for (auto it = ranks.rbegin(); it != ranks.rend(); ++it) it->second->mu.Unlock();
  };
  DropJobResult result;
  std::vector<std::string> running;
  for (auto& [rank, state] : ranks) {
    if (state->dropped) {
      unlock_all();
      return absl::UnavailableError(absl::StrCat(
          RankName(job_id, rank), " was being dropped by another call: ask again"));
    }
    if (absl::Status s = CheckDropOwner(*state, job_id, rank, owner_uid); !s.ok()) {
      unlock_all();
      return s;
    }
    if (state->registered && state->owner.pid > 0 &&
        options_.process_alive(state->owner.pid, state->owner_start_ticks)) {
      result.running_ranks.push_back(rank);
      result.running_pids.push_back(state->owner.pid);
      running.push_back(absl::StrCat("rank ", rank, " (pid ", state->owner.pid, ")"));
    }
  }
  if (!running.empty() && !force) {
    unlock_all();
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", job_id, "' is still being trained here: ", absl::StrJoin(running, ", "),
        running.size() == 1 ? " is" : " are",
        " registered and running; nothing was dropped. Stop the trainers (or end the run with "
        "Snapshotter.close(drop=True)) first, or drop with force (a trainer that still runs "
        "registers again at its next snapshot and keeps snapshotting)"));
  }
  std::vector<std::unique_ptr<Segment>> doomed;
  for (auto& [rank, state] : ranks) {
    result.ranks.push_back(rank);
    for (const auto& slot : state->slots) {
      if (slot && LoadState(*slot->header()) == SegmentState::kSealed) {
        result.newest_sealed_step = std::max(result.newest_sealed_step, slot->header()->step);
      }
    }
    for (auto& slot : state->slots) {
      if (slot) doomed.push_back(std::move(slot));
    }
    for (auto& seg : state->retained) doomed.push_back(std::move(seg));
    state->retained.clear();
    state->registered = false;
    state->dropped = true;
  }
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [rank, state] : ranks) {
      auto it = ranks_.find({job_id, rank});
      if (it != ranks_.end() && it->second == state) ranks_.erase(it);
    }
    ForgetJobIfGoneLocked(job_id);
  }
  unlock_all();
  for (auto& segment : doomed) {
    result.bytes_deleted += segment->file_bytes();
    ++result.segments_deleted;
    DeleteSegment(std::move(segment));
  }
  Logger("store")->warn(
      "dropped job '{}': {} ranks, {} slot segments ({} bytes){}", job_id, result.ranks.size(),
      result.segments_deleted, result.bytes_deleted,
      running.empty() ? std::string()
                      : absl::StrCat("; forced while registered and running: ",
                                     absl::StrJoin(running, ", ")));
  return result;
}

absl::Status SnapshotStore::CheckDropOwner(const RankState& state, const std::string& job_id,
                                           uint32_t rank, std::optional<uid_t> owner_uid) {
  const bool has_data = state.slots[0] || state.slots[1] || !state.retained.empty();
  if (!owner_uid || !((has_data && state.data_uid != *owner_uid) ||
                      (state.registered && state.owner.uid != *owner_uid))) {
    return absl::OkStatus();
  }
  const uid_t owner = has_data ? state.data_uid : state.owner.uid;
  return absl::PermissionDeniedError(absl::StrCat(
      "job '", job_id, "' belongs to uid ", owner, " here (", RankName(job_id, rank),
      "); the caller is uid ", *owner_uid,
      ": only root, the daemon's uid or the uid that registered the job may drop it"));
}

absl::Status SnapshotStore::CheckDropFenceLocked(const std::string& job_id) {
  auto fence = drop_fences_.find(job_id);
  if (fence == drop_fences_.end()) return absl::OkStatus();
  const absl::Time now = absl::Now();
  if (fence->second <= now) {
    drop_fences_.erase(fence);  // the drop was abandoned (its coordinator died or gave up)
    return absl::OkStatus();
  }
  return absl::UnavailableError(
      absl::StrCat("job '", job_id,
                   "' is being dropped (its coordinator is deciding the drop; this daemon "
                   "refuses its registrations for at most ",
                   absl::FormatDuration(absl::Ceil(fence->second - now, absl::Seconds(1))),
                   " more): register again once the drop has finished"));
}

void SnapshotStore::LiftDropFence(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  drop_fences_.erase(job_id);
}

absl::StatusOr<SnapshotStore::DropJobResult> SnapshotStore::CheckDrop(
    const std::string& job_id, std::optional<uid_t> owner_uid, absl::Duration fence) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  std::vector<std::pair<uint32_t, std::shared_ptr<RankState>>> ranks;
  std::optional<absl::Time> fenced_before;  // the fence a check still in force had set
  {
    absl::MutexLock lock(&mu_);
    // Bounded: checks come from members, whatever job ids they name.
    if (drop_fences_.size() >= kMaxDropFences && drop_fences_.count(job_id) == 0) {
      const absl::Time now = absl::Now();
      for (auto it = drop_fences_.begin(); it != drop_fences_.end();) {
        it = it->second <= now ? drop_fences_.erase(it) : std::next(it);
      }
      if (drop_fences_.size() >= kMaxDropFences) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "the drops of ", drop_fences_.size(), " jobs are being decided here (at most ",
            kMaxDropFences, "): drop job '", job_id, "' again once some have finished"));
      }
    }
    // Fenced before the ranks are listed and locked (see Register).
    absl::Time& until = drop_fences_[job_id];
    if (until != absl::Time()) fenced_before = until;
    until = std::max(until, absl::Now() + fence);
    for (const auto& [key, state] : ranks_) {
      if (key.first == job_id) ranks.emplace_back(key.second, state);
    }
  }
  auto unfence = [&] {
    absl::MutexLock lock(&mu_);
    if (fenced_before) {
      drop_fences_[job_id] = *fenced_before;
    } else {
      drop_fences_.erase(job_id);
    }
  };
  DropJobResult result;
  for (auto& [rank, state] : ranks) {
    absl::MutexLock lock(&state->mu);
    if (absl::Status owner = CheckDropOwner(*state, job_id, rank, owner_uid); !owner.ok()) {
      unfence();
      return owner;
    }
    result.ranks.push_back(rank);
    if (state->registered && state->owner.pid > 0 &&
        options_.process_alive(state->owner.pid, state->owner_start_ticks)) {
      result.running_ranks.push_back(rank);
      result.running_pids.push_back(state->owner.pid);
    }
    for (const auto& slot : state->slots) {
      if (!slot) continue;
      ++result.segments_deleted;
      result.bytes_deleted += slot->file_bytes();
      if (LoadState(*slot->header()) == SegmentState::kSealed) {
        result.newest_sealed_step = std::max(result.newest_sealed_step, slot->header()->step);
      }
    }
    for (const auto& seg : state->retained) {
      ++result.segments_deleted;
      result.bytes_deleted += seg->file_bytes();
    }
  }
  return result;
}

SnapshotStore::DropJobResult SnapshotStore::ApplyDrop(const std::string& job_id,
                                                      uint64_t dropped_epoch) {
  DropJobResult result;
  std::vector<std::pair<uint32_t, std::shared_ptr<RankState>>> ranks;
  {
    absl::MutexLock lock(&mu_);
    drop_fences_.erase(job_id);  // the drop is decided: a registration now is of a later run
    JobView& job = jobs_[job_id];
    if (dropped_epoch <= job.dropped_epoch) return result;
    job.dropped_epoch = dropped_epoch;
    job.commit_known = true;  // what a restarted daemon waited for: the job's state
    if (job.epoch < dropped_epoch) {
      job.epoch = dropped_epoch;
      job.dead_steps.clear();
    }
    // The committed step is of the dropped history: a later run's commit comes with the state
    // that brought the drop (SetJobState after this), or later.
    committed_.erase(job_id);
    for (const auto& [key, state] : ranks_) {
      if (key.first == job_id) ranks.emplace_back(key.second, state);
    }
  }
  std::vector<std::unique_ptr<Segment>> doomed;
  std::vector<uint32_t> forgotten;
  for (auto& [rank, state] : ranks) {
    absl::MutexLock lock(&state->mu);
    auto void_segment = [&](const Segment& seg) {
      const SegmentHeader& h = *seg.header();
      return LoadState(h) != SegmentState::kSealed || h.epoch <= dropped_epoch;
    };
    bool later_run = false;  // a relaunch sealed here already (the drop reached this node late)
    for (const auto& slot : state->slots) later_run = later_run || (slot && !void_segment(*slot));
    for (const auto& seg : state->retained) later_run = later_run || !void_segment(*seg);
    bool counted = false;  // it held a sealed snapshot of the dropped history
    for (int i = 0; i < 2; ++i) {
      auto& slot = state->slots[i];
      if (!slot) continue;
      SegmentHeader* h = slot->header();
      const bool sealed = LoadState(*h) == SegmentState::kSealed;
      if (!sealed || !void_segment(*slot)) continue;
      result.newest_sealed_step = std::max(result.newest_sealed_step, h->step);
      counted = true;
      if (later_run || state->pins[i] > 0) {
        // Emptied, not deleted: protection still reads it, or the rank lives on in a later run.
        StoreState(h, SegmentState::kEmpty);
        state->is_protected[i] = false;
      } else {
        doomed.push_back(std::move(slot));
      }
    }
    for (auto it = state->retained.begin(); it != state->retained.end();) {
      if (void_segment(**it)) {
        doomed.push_back(std::move(*it));
        it = state->retained.erase(it);
        counted = true;
      } else {
        ++it;
      }
    }
    if (counted) result.ranks.push_back(rank);
    const bool running = state->registered && state->owner.pid > 0 &&
                         options_.process_alive(state->owner.pid, state->owner_start_ticks);
    if (running && counted) {
      result.running_ranks.push_back(rank);
      result.running_pids.push_back(state->owner.pid);
    }
    // A running trainer that has sealed nothing here may be the relaunch itself (registered
    // before its restore answer brought the drop here): it keeps its registration.
    if (!later_run && (counted || !running) && state->pins[0] == 0 && state->pins[1] == 0 &&
        !state->creating_slots) {
      // Nothing of the rank is left: it is forgotten, as DropJob forgets it.
      for (auto& slot : state->slots) {
        if (slot) doomed.push_back(std::move(slot));
      }
      state->registered = false;
      state->dropped = true;
      forgotten.push_back(rank);
      if (!counted) result.ranks.push_back(rank);
    }
  }
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [rank, state] : ranks) {
      if (std::find(forgotten.begin(), forgotten.end(), rank) == forgotten.end()) continue;
      auto it = ranks_.find({job_id, rank});
      if (it != ranks_.end() && it->second == state) ranks_.erase(it);
    }
    auto left = ranks_.lower_bound({job_id, 0});
    if (left == ranks_.end() || left->first.first != job_id) {
      // A relaunch may register another world size; the drop itself is remembered (jobs_).
      newest_sealed_.erase(job_id);
      world_size_.erase(job_id);
    }
  }
  for (auto& segment : doomed) {
    result.bytes_deleted += segment->file_bytes();
    ++result.segments_deleted;
    DeleteSegment(std::move(segment));
  }
  std::sort(result.ranks.begin(), result.ranks.end());
  Logger("store")->warn("job '{}' dropped at epoch {}: {} ranks here, {} slot segments ({} bytes) "
                        "deleted{}",
                        job_id, dropped_epoch, result.ranks.size(), result.segments_deleted,
                        result.bytes_deleted,
                        result.running_ranks.empty()
                            ? std::string()
                            : absl::StrCat("; trainers still running: ranks ",
                                           absl::StrJoin(result.running_ranks, ", ")));
  return result;
}

void SnapshotStore::ReleaseDroppedSlots(const std::string& job_id, uint32_t rank) {
  const uint64_t dropped = dropped_epoch(job_id);
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (dropped == 0 || !state) return;
  std::vector<std::unique_ptr<Segment>> doomed;
  {
    absl::MutexLock lock(&state->mu);
    for (int i = 0; i < 2; ++i) {
      if (!state->slots[i]) continue;
      SegmentHeader* h = state->slots[i]->header();
      if (LoadState(*h) != SegmentState::kSealed || h->epoch > dropped) continue;
      // Emptied even while protection reads it: no snapshot reuses a pinned slot.
      StoreState(h, SegmentState::kEmpty);
      state->is_protected[i] = false;
    }
    for (auto it = state->retained.begin(); it != state->retained.end();) {
      if ((*it)->header()->epoch <= dropped) {
        doomed.push_back(std::move(*it));
        it = state->retained.erase(it);
      } else {
        ++it;
      }
    }
    state->last_seal_step = -1;
    state->last_seal_epoch = 0;
  }
  for (auto& seg : doomed) DeleteSegment(std::move(seg));
}

uint64_t SnapshotStore::dropped_epoch(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? 0 : it->second.dropped_epoch;
}

void SnapshotStore::ForgetDrop(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) it->second.dropped_epoch = 0;
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
