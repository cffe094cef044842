// FragmentStore's pool of spare segments (fragment_store.h, Options::max_spares_per_rank): a
// segment for a new fragment, taken from the pool or created; a fragment's segment kept as a
// spare when it goes; spares pre-created in the background, and given back when the capacity
// budget runs short.
#include "daemon/store/fragment_store.h"

#include <chrono>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/fragment_store_internal.h"

namespace tessera {
namespace {

using fragment_store_internal::kFragmentPrefix;
using fragment_store_internal::kFragmentSuffix;
using fragment_store_internal::kSegmentGranuleBytes;

// Fragments a (job, rank) is taken to hold at once before it has held more: a peer holds the
// committed step's and the next one's.
constexpr int kFragmentsARankHolds = 2;
// Spare creations waiting for the background thread (one per (job, rank)); more are dropped.
constexpr size_t kMaxPrecreateQueue = 256;
// No spare is created this long after the budget ran short (TrimPool), so a Reserve that made
// room by reclaiming is not beaten to the bytes by a speculative spare before it tries again.
constexpr std::chrono::seconds kNoPrecreateAfterTrim{1};

// A pooled segment fits a request when it wastes at most an eighth (plus one granule).
bool PoolFits(uint64_t pooled_capacity, uint64_t wanted_capacity) {
  return pooled_capacity >= wanted_capacity &&
         pooled_capacity - wanted_capacity <= wanted_capacity / 8 + kSegmentGranuleBytes;
}

}  // namespace

int FragmentStore::HeldLocked(const std::string& job_id, uint32_t rank) const {
  const FragmentKey first{job_id, rank, INT64_MIN, 0};
  auto ours = [&](const FragmentKey& k) { return k.job_id == job_id && k.rank == rank; };
  int held = 0;
  for (auto it = entries_.lower_bound(first); it != entries_.end() && ours(it->first); ++it) {
    ++held;
  }
  for (auto it = creating_.lower_bound(first); it != creating_.end() && ours(*it); ++it) {
    if (entries_.count(*it) == 0) ++held;  // not a replacement of one held
  }
  return held;
}

absl::StatusOr<std::shared_ptr<Segment>> FragmentStore::AcquireSegment(const FragmentKey& key,
                                                                       uint64_t capacity_bytes) {
  {
    absl::MutexLock lock(&mu_);
    int& peak = peak_held_[{key.job_id, key.rank}];
    peak = std::max(peak, HeldLocked(key.job_id, key.rank));  // key is in creating_
    auto it = pool_.lower_bound(capacity_bytes);
    if (it != pool_.end() && PoolFits(it->first, capacity_bytes)) {
      std::shared_ptr<Segment> segment = std::move(it->second.segment);
      Logger("fragments")
          ->debug("{}: reusing {} ({} payload bytes for {}), a spare of job '{}' rank {}",
                  key.ToString(), segment->path(), segment->capacity_bytes(), capacity_bytes,
                  it->second.job_id, it->second.rank);
      pool_bytes_ -= segment->file_bytes();
      pool_.erase(it);
      ++counters_.segments_recycled;
      return segment;
    }
  }
  const uint64_t file_bytes = kSegmentHeaderBytes + capacity_bytes;
  // Not under mu_: the budget may call TrimPool to make room.
  TESSERA_RETURN_IF_ERROR(
      options_.budget->Reserve(file_bytes, absl::StrCat("storing ", key.ToString())));
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    generation = next_generation_++;
  }
  SegmentCreateOptions create;
  create.mode = 0600;
  create.prefault = options_.prefault;
  const std::string path =
      absl::StrCat(options_.directory, "/", kFragmentPrefix, generation, kFragmentSuffix);
  auto created = Segment::Create(path, SegmentKind::kFragment, capacity_bytes, create);
  if (!created.ok()) {
    options_.budget->Release(file_bytes);
    return Annotate(created.status(), "storing " + key.ToString());
  }
  Logger("fragments")->debug("{}: created {} ({} payload bytes)", key.ToString(), path,
                             capacity_bytes);
  {
    absl::MutexLock lock(&mu_);
    ++counters_.segments_created;
  }
  // No spare fitted: one more is wanted if the rank still holds fewer fragments than it has.
  MaybePrecreateSpare(key.job_id, key.rank, capacity_bytes);
  return std::shared_ptr<Segment>(std::move(*created));
}

bool FragmentStore::SpareWanted(const std::string& job_id, uint32_t rank,
                                uint64_t capacity_bytes) const {
  if (options_.max_spares_per_rank <= 0) return false;
  auto peak = peak_held_.find({job_id, rank});
  const int wanted = std::max(kFragmentsARankHolds, peak == peak_held_.end() ? 0 : peak->second);
  if (HeldLocked(job_id, rank) >= wanted) return false;
  int kept = 0;
  for (const auto& [capacity, spare] : pool_) {
    if (spare.job_id != job_id || spare.rank != rank) continue;
    if (PoolFits(capacity, capacity_bytes)) return false;
    ++kept;
  }
  // At the per-rank bound a pre-created spare would evict one: leave that to Retire.
  const uint64_t file_bytes = kSegmentHeaderBytes + capacity_bytes;
  return kept < options_.max_spares_per_rank && options_.pool_max_bytes >= pool_bytes_ &&
         file_bytes <= options_.pool_max_bytes - pool_bytes_;
}

void FragmentStore::MaybePrecreateSpare(const std::string& job_id, uint32_t rank,
                                        uint64_t capacity_bytes) {
  if (!options_.precreate_spares) return;
  uint64_t job_drops;
  {
    absl::MutexLock lock(&mu_);
    if (!SpareWanted(job_id, rank, capacity_bytes)) return;
    job_drops = job_drops_;
  }
  absl::MutexLock lock(&precreate_mu_);
  if (precreate_stop_) return;
  for (PrecreateRequest& queued : precreate_queue_) {
    if (queued.job_id == job_id && queued.rank == rank) {
      queued.capacity_bytes = capacity_bytes;  // the size the rank sends now
      queued.job_drops = job_drops;
      return;
    }
  }
  if (precreate_queue_.size() >= kMaxPrecreateQueue) return;
  precreate_queue_.push_back(PrecreateRequest{job_id, rank, capacity_bytes, job_drops});
}

void FragmentStore::PrecreateLoop() {
  for (;;) {
    PrecreateRequest request;
    {
      absl::MutexLock lock(&precreate_mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(precreate_mu_) {
        return precreate_stop_ || !precreate_queue_.empty();
      };
      precreate_mu_.Await(absl::Condition(&ready));
      if (precreate_stop_) return;
      request = std::move(precreate_queue_.front());
      precreate_queue_.pop_front();
    }
    PrecreateSpare(request);
  }
}

void FragmentStore::PrecreateSpare(const PrecreateRequest& request) {
  auto log = Logger("fragments");
  const uint64_t file_bytes = kSegmentHeaderBytes + request.capacity_bytes;
  const std::string what =
      absl::StrCat("a spare for job '", request.job_id, "' rank ", request.rank);
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    if (request.job_drops != job_drops_ ||
        !SpareWanted(request.job_id, request.rank, request.capacity_bytes)) {
      return;
    }
    if (last_trim_ > std::chrono::steady_clock::now() - kNoPrecreateAfterTrim) {
      ++counters_.spares_precreate_skipped;
      log->debug("not creating {}: the budget ran short just now", what);
      return;
    }
    // Set before the reservation, so a TrimPool from now on waits for this creation.
    precreate_in_flight_bytes_ = file_bytes;
    generation = next_generation_++;
  }
  // Only free bytes: a speculative spare must never make the budget reclaim anything.
  absl::Status reserved = options_.budget->ReserveIfFree(file_bytes, what);
  std::shared_ptr<Segment> segment;
  if (reserved.ok()) {
    SegmentCreateOptions create;
    create.mode = 0600;
    create.prefault = options_.prefault;
    const std::string path =
        absl::StrCat(options_.directory, "/", kFragmentPrefix, generation, kFragmentSuffix);
    // Outside mu_. Create writes a zeroed header that says EMPTY with no header CRC: a spare
    // (see Retire), never adopted after a crash.
    auto created = Segment::Create(path, SegmentKind::kFragment, request.capacity_bytes, create);
    if (created.ok()) {
      segment = std::move(*created);
    } else {
      log->info("could not create {}: {}", what, created.status().ToString());
    }
  } else {
    log->debug("not creating {}: {}", what, reserved.ToString());
  }
  bool kept = false;
  bool cancelled = false;
  {
    absl::MutexLock lock(&mu_);
    cancelled = precreate_cancel_;
    if (segment && !cancelled && request.job_drops == job_drops_ &&
        SpareWanted(request.job_id, request.rank, request.capacity_bytes)) {
      pool_bytes_ += file_bytes;
      pool_.emplace(request.capacity_bytes, Spare{segment, request.job_id, request.rank,
                                                  next_spare_sequence_++});
      ++counters_.spares_precreated;
      precreate_in_flight_bytes_ = 0;
      ++precreate_finished_;
      kept = true;
    } else if (!reserved.ok()) {
      ++counters_.spares_precreate_skipped;
      precreate_cancel_ = false;
      precreate_in_flight_bytes_ = 0;
      ++precreate_finished_;
      return;
    }
  }
  if (kept) {
    log->debug("created spare {} ({} payload bytes) ahead of the next fragment of job '{}' rank {}",
               segment->path(), request.capacity_bytes, request.job_id, request.rank);
    return;
  }
  // Not wanted any more (a spare came back meanwhile, the job was dropped, the pool's bounds
  // moved, or TrimPool needs the bytes), or not created: the file goes, then the bytes.
  if (segment) {
    {
      absl::MutexLock lock(&mu_);
      ++counters_.spares_precreate_discarded;
    }
    log->debug("discarding pre-created spare {} of job '{}' rank {}{}", segment->path(),
               request.job_id, request.rank, cancelled ? ": the budget needs the bytes" : "");
    segment->Unlink().IgnoreError();
    segment.reset();
  }
  options_.budget->Release(file_bytes);
  absl::MutexLock lock(&mu_);
  if (precreate_cancel_) precreate_cancelled_bytes_ += file_bytes;
  precreate_cancel_ = false;
  precreate_in_flight_bytes_ = 0;
  ++precreate_finished_;
}

void FragmentStore::Retire(const std::shared_ptr<Entry>& entry, bool keep_spare) {
  std::shared_ptr<Segment> segment;
  {
    absl::MutexLock entry_lock(&entry->mu);  // waits for a chunk being copied
    if (entry->retired) return;
    entry->retired = true;
    segment = std::move(entry->segment);
  }
  if (!segment) return;
  // A dropped fragment must never be re-adopted after a crash, kept as a spare or not: EMPTY
  // first, and a header CRC that no longer verifies should the state word ever say otherwise.
  SegmentHeader* h = segment->header();
  StoreState(h, SegmentState::kEmpty);
  h->header_crc32c = 0;
  std::vector<std::shared_ptr<Segment>> doomed;
  // Views hold their own references; a segment somebody still reads is deleted, not recycled.
  if (keep_spare && segment.use_count() == 1 && options_.max_spares_per_rank > 0) {
    absl::MutexLock lock(&mu_);
    // At the limit for this (job, rank): the oldest spare goes (the newest has the size the rank
    // sends now).
    int kept = 0;
    auto oldest = pool_.end();
    for (auto it = pool_.begin(); it != pool_.end(); ++it) {
      if (it->second.job_id != entry->key.job_id || it->second.rank != entry->key.rank) continue;
      ++kept;
      if (oldest == pool_.end() || it->second.sequence < oldest->second.sequence) oldest = it;
    }
    const bool evict = kept >= options_.max_spares_per_rank;
    const uint64_t pooled = pool_bytes_ - (evict ? oldest->second.segment->file_bytes() : 0);
    if (options_.pool_max_bytes >= pooled &&
        segment->file_bytes() <= options_.pool_max_bytes - pooled) {
      if (evict) {
        doomed.push_back(std::move(oldest->second.segment));
        pool_.erase(oldest);
      }
      Logger("fragments")
          ->debug("{}: its segment {} is kept as a spare", entry->key.ToString(), segment->path());
      pool_bytes_ = pooled + segment->file_bytes();
      const uint64_t capacity = segment->capacity_bytes();
      pool_.emplace(capacity, Spare{std::move(segment), entry->key.job_id, entry->key.rank,
                                    next_spare_sequence_++});
    }
  }
  if (segment) doomed.push_back(std::move(segment));
  DeleteSpares(std::move(doomed));
}

void FragmentStore::DeleteSpares(std::vector<std::shared_ptr<Segment>> spares) {
  for (auto& segment : spares) {
    segment->Unlink().IgnoreError();
    options_.budget->Release(segment->file_bytes());
  }
}

uint64_t FragmentStore::TrimPool(uint64_t bytes) {
  std::vector<std::shared_ptr<Segment>> doomed;
  uint64_t freed = 0;
  {
    absl::MutexLock lock(&mu_);
    last_trim_ = std::chrono::steady_clock::now();
    // Largest first: fewest files for the bytes wanted.
    while (freed < bytes && !pool_.empty()) {
      auto it = std::prev(pool_.end());
      freed += it->second.segment->file_bytes();
      pool_bytes_ -= it->second.segment->file_bytes();
      doomed.push_back(std::move(it->second.segment));
      pool_.erase(it);
      ++counters_.spares_reclaimed;
    }
    if (freed < bytes && precreate_in_flight_bytes_ > 0) {
      // A spare being created holds bytes the budget cannot reclaim yet: wait for that one
      // creation to finish and have it discarded, rather than refuse the Reserve.
      precreate_cancel_ = true;
      const uint64_t finished = precreate_finished_;
      const uint64_t cancelled_before = precreate_cancelled_bytes_;
      auto done = [this, finished]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return precreate_finished_ != finished;
      };
      mu_.Await(absl::Condition(&done));
      freed += precreate_cancelled_bytes_ - cancelled_before;
    }
  }
  if (!doomed.empty()) {
    Logger("fragments")
        ->debug("deleting {} spare segments ({} bytes) to make room", doomed.size(), freed);
  }
  DeleteSpares(std::move(doomed));
  return freed;
}

}  // namespace tessera
