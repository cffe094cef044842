// What becomes of sealed snapshots (snapshot_store.h): listings, restores and pins, commits and
// the releases they bring, and the recovery drills' damage and repair.
#include "daemon/store/snapshot_store.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/snapshot_store_internal.h"

namespace tessera {
namespace {

using snapshot_store_internal::RankName;

}  // namespace

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
                                                                         int64_t step,
                                                                         bool verify) {
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
  if (!verify) {
    return RestoreInfo{h.step,           best->path(),     h.payload_bytes, h.manifest_offset,
                       h.manifest_bytes, h.payload_crc32c, /*verified=*/false};
  }
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

void SnapshotStore::SupersedeCommit(const std::string& job_id, int64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = committed_.find(job_id);
  if (it != committed_.end() && it->second > step) it->second = step;
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

void SnapshotStore::RaiseEpoch(const std::string& job_id, uint64_t epoch) {
  absl::MutexLock lock(&mu_);
  JobView& job = jobs_[job_id];
  if (epoch > job.epoch) {
    job.epoch = epoch;
    job.dead_steps.clear();
  }
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

void SnapshotStore::NoteResume(const std::string& job_id, uint32_t rank, int64_t step) {
  std::shared_ptr<RankState> state = FindRank(job_id, rank);
  if (!state) return;
  absl::MutexLock lock(&state->mu);
  state->resume_step = step;
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
    info.resume_step = state->resume_step;
    info.data_uid = state->data_uid;
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

}  // namespace tessera
