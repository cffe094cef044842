#include "daemon/store/fragment_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <iterator>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/snapshot_store.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace {

constexpr const char* kFragmentSuffix = ".frag";
constexpr const char* kFragmentPrefix = "frag-";
constexpr uint32_t kMaxRank = 1u << 20;  // SnapshotStore's world-size limit
constexpr uint64_t kMaxShardBytes = uint64_t{1} << 40;
// Segment capacities are rounded up to this, so fragments of nearly equal size (a shard's
// manifest length varies by a few bytes between steps) share pooled segments.
constexpr uint64_t kSegmentGranuleBytes = uint64_t{64} << 10;
// Spare creations waiting for the background thread (one per (job, rank)); more are dropped.
constexpr size_t kMaxPrecreateQueue = 256;
// No spare is created this long after the budget ran short (TrimPool), so a Reserve that made
// room by reclaiming is not beaten to the bytes by a speculative spare before it tries again.
constexpr std::chrono::seconds kNoPrecreateAfterTrim{1};

uint64_t RoundUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A pooled segment fits a request when it wastes at most an eighth (plus one granule).
bool PoolFits(uint64_t pooled_capacity, uint64_t wanted_capacity) {
  return pooled_capacity >= wanted_capacity &&
         pooled_capacity - wanted_capacity <= wanted_capacity / 8 + kSegmentGranuleBytes;
}

// Merges [begin, end) into `intervals` (disjoint, keyed by begin) and keeps `covered` the sum of
// their lengths.
void AddCoverage(std::map<uint64_t, uint64_t>* intervals, uint64_t* covered, uint64_t begin,
                 uint64_t end) {
  auto it = intervals->upper_bound(begin);
  if (it != intervals->begin()) {
    auto prev = std::prev(it);
    if (prev->second >= begin) {
      begin = prev->first;
      end = std::max(end, prev->second);
      *covered -= prev->second - prev->first;
      it = intervals->erase(prev);
    }
  }
  while (it != intervals->end() && it->first <= end) {
    end = std::max(end, it->second);
    *covered -= it->second - it->first;
    it = intervals->erase(it);
  }
  (*intervals)[begin] = end;
  *covered += end - begin;
}

absl::Status CheckChunkRange(const FragmentKey& key, uint64_t fragment_bytes, uint64_t offset,
                             uint64_t size) {
  if (size == 0 || offset > fragment_bytes || size > fragment_bytes - offset) {
    return absl::InvalidArgumentError(absl::StrCat(key.ToString(), ": chunk [", offset, ", ",
                                                   offset + size,
                                                   ") must be non-empty and within the "
                                                   "fragment's ",
                                                   fragment_bytes, " bytes"));
  }
  return absl::OkStatus();
}

// Removes [begin, end) from the disjoint intervals (which need not cover it).
void RemoveCoverage(std::map<uint64_t, uint64_t>* intervals, uint64_t* covered, uint64_t begin,
                    uint64_t end) {
  auto it = intervals->upper_bound(begin);
  if (it != intervals->begin()) it = std::prev(it);
  while (it != intervals->end() && it->first < end) {
    const uint64_t a = it->first;
    const uint64_t b = it->second;
    if (b <= begin) {
      ++it;
      continue;
    }
    *covered -= b - a;
    it = intervals->erase(it);
    if (a < begin) {
      (*intervals)[a] = begin;
      *covered += begin - a;
    }
    if (b > end) {
      (*intervals)[end] = b;
      *covered += b - end;
      break;
    }
  }
}

// GF(2) 32x32 matrices as 32 columns: column n is the image of bit n.
using Gf2Matrix = std::array<uint32_t, 32>;

uint32_t Gf2Times(const Gf2Matrix& m, uint32_t v) {
  uint32_t sum = 0;
  for (int n = 0; v != 0; v >>= 1, ++n) {
    if (v & 1) sum ^= m[n];
  }
  return sum;
}

Gf2Matrix Gf2Product(const Gf2Matrix& a, const Gf2Matrix& b) {
  Gf2Matrix c;
  for (int n = 0; n < 32; ++n) c[n] = Gf2Times(a, b[n]);
  return c;
}

// The operator that appends len zero bytes to a (finalised) CRC32C.
Gf2Matrix ZeroBytesOperator(uint64_t len) {
  Gf2Matrix bit;  // one zero bit
  bit[0] = 0x82F63B78u;
  for (int n = 1; n < 32; ++n) bit[n] = 1u << (n - 1);
  Gf2Matrix base = bit;
  for (int i = 0; i < 3; ++i) base = Gf2Product(base, base);  // one zero byte
  Gf2Matrix result;
  for (int n = 0; n < 32; ++n) result[n] = 1u << n;
  for (; len != 0; len >>= 1) {
    if (len & 1) result = Gf2Product(base, result);
    if (len > 1) base = Gf2Product(base, base);
  }
  return result;
}

}  // namespace

uint32_t Crc32cCombineCached(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (len_b == 0) return crc_a;  // as Crc32cCombine: B is empty
  static absl::Mutex* mu = new absl::Mutex;
  static auto* cache = new std::map<uint64_t, std::shared_ptr<const Gf2Matrix>>;
  std::shared_ptr<const Gf2Matrix> op;
  {
    absl::MutexLock lock(mu);
    auto it = cache->find(len_b);
    if (it != cache->end()) op = it->second;
  }
  if (!op) {
    op = std::make_shared<const Gf2Matrix>(ZeroBytesOperator(len_b));
    absl::MutexLock lock(mu);
    if (cache->size() >= 64) cache->clear();  // a handful of chunk lengths in practice
    cache->emplace(len_b, op);
  }
  return Gf2Times(*op, crc_a) ^ crc_b;
}

std::string FragmentKey::ToString() const {
  return absl::StrCat("job '", job_id, "' rank ", rank, " step ", step, " fragment ",
                      fragment_index);
}

absl::Status ValidateFragmentKey(const FragmentKey& key) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(key.job_id));
  if (key.rank >= kMaxRank) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", key.rank, " must be below ", kMaxRank));
  }
  if (key.step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", key.step));
  }
  return absl::OkStatus();
}

absl::Status ValidateFragmentMeta(const FragmentKey& key, const FragmentMeta& meta) {
  const std::string where = key.ToString();
  if (meta.owner_incarnation == 0) {
    return absl::InvalidArgumentError(where + ": owner_incarnation must be > 0");
  }
  if (meta.ec_k < 1 || meta.ec_k > static_cast<uint32_t>(ErasureCodec::kMaxDataFragments) ||
      meta.ec_m > static_cast<uint32_t>(ErasureCodec::kMaxParityFragments)) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": RS(", meta.ec_k, ", ", meta.ec_m, ") is not valid; k must be 1..",
        ErasureCodec::kMaxDataFragments, " and m 0..", ErasureCodec::kMaxParityFragments));
  }
  if (key.fragment_index >= meta.ec_k + meta.ec_m) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": fragment index ", key.fragment_index,
                     " is not below k + m = ", meta.ec_k + meta.ec_m));
  }
  if (meta.shard_bytes > kMaxShardBytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": shard_bytes ", meta.shard_bytes,
                                                   " is above the limit of ", kMaxShardBytes));
  }
  const uint64_t expected = ErasureCodec::FragmentBytes(meta.shard_bytes, meta.ec_k);
  if (meta.fragment_bytes != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": fragment_bytes ", meta.fragment_bytes, " does not match a shard of ",
        meta.shard_bytes, " bytes split ", meta.ec_k, " ways (expected ", expected, ")"));
  }
  return absl::OkStatus();
}

// One held fragment. `key` and `meta` never change; a replacement is a new Entry. Every access
// to the segment checks `retired` under `mu` first: a retired entry's segment may already belong
// to another fragment.
struct FragmentStore::Entry {
  Entry(FragmentKey k, FragmentMeta m, std::shared_ptr<Segment> s)
      : key(std::move(k)), meta(m), segment(std::move(s)) {}

  struct Chunk {
    uint64_t size;
    uint32_t crc32c;
  };

  const FragmentKey key;
  const FragmentMeta meta;
  mutable absl::Mutex mu;
  std::shared_ptr<Segment> segment ABSL_GUARDED_BY(mu);
  bool retired ABSL_GUARDED_BY(mu) = false;
  bool sealed ABSL_GUARDED_BY(mu) = false;
  uint32_t fragment_crc32c ABSL_GUARDED_BY(mu) = 0;
  // Chunks received, by offset, while they tile the fragment without overlap; their CRCs then
  // combine into the fragment's CRC without reading the bytes again. Once two chunks overlap
  // (a retry with other chunk boundaries), `overlapped` is set, `chunks` is dropped and the seal
  // checksums the stored bytes instead.
  std::map<uint64_t, Chunk> chunks ABSL_GUARDED_BY(mu);
  bool overlapped ABSL_GUARDED_BY(mu) = false;
  std::map<uint64_t, uint64_t> covered ABSL_GUARDED_BY(mu);  // received [begin, end)
  uint64_t covered_bytes ABSL_GUARDED_BY(mu) = 0;
  int receiving ABSL_GUARDED_BY(mu) = 0;  // ReceiveChunk calls writing outside mu

  // Records a chunk [offset, offset + size) with CRC32C crc; true when that exact chunk was
  // recorded before with the same CRC (a retry: the bytes need not be copied again).
  bool RecordChunk(uint64_t offset, uint64_t size, uint32_t crc)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (overlapped) return false;
    auto exact = chunks.find(offset);
    if (exact != chunks.end() && exact->second.size == size) {
      const bool duplicate = exact->second.crc32c == crc;
      exact->second.crc32c = crc;
      return duplicate;
    }
    auto next = chunks.lower_bound(offset);
    bool overlaps = next != chunks.end() && next->first < offset + size;
    if (next != chunks.begin()) {
      auto prev = std::prev(next);
      overlaps = overlaps || prev->first + prev->second.size > offset;
    }
    if (overlaps) {
      overlapped = true;
      chunks.clear();
    } else {
      chunks[offset] = Chunk{size, crc};
    }
    return false;
  }

  // [offset, offset + size) no longer holds what was received (it was overwritten by bytes that
  // failed their check): it must arrive again, and the seal checksums the stored bytes.
  void ForgetRange(uint64_t offset, uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    overlapped = true;
    chunks.clear();
    RemoveCoverage(&covered, &covered_bytes, offset, offset + size);
  }

  FragmentStatus Status() const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    FragmentStatus s;
    s.key = key;
    s.meta = meta;
    s.state = sealed ? SegmentState::kSealed : SegmentState::kWriting;
    s.bytes_received = sealed ? meta.fragment_bytes : covered_bytes;
    s.fragment_crc32c = fragment_crc32c;
    return s;
  }

  void ResetReceived() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    chunks.clear();
    overlapped = false;
    covered.clear();
    covered_bytes = 0;
  }

  // The first range not received yet, as "[a, b)".
  std::string FirstMissing() const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    uint64_t begin = 0;
    uint64_t end = meta.fragment_bytes;
    if (!covered.empty()) {
      auto first = covered.begin();
      if (first->first > 0) {
        end = first->first;
      } else {
        begin = first->second;
        auto next = std::next(first);
        if (next != covered.end()) end = next->first;
      }
    }
    return absl::StrCat("[", begin, ", ", end, ")");
  }
};

absl::StatusOr<std::unique_ptr<FragmentStore>> FragmentStore::Open(Options options) {
  if (options.budget == nullptr) {
    return absl::InvalidArgumentError("FragmentStore needs a CapacityBudget (Options::budget)");
  }
  if (options.directory.empty()) {
    return absl::InvalidArgumentError("FragmentStore needs a directory (Options::directory)");
  }
  if (options.crc_threads < 1) options.crc_threads = 1;
  if (mkdir(options.directory.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoStatus(errno, "create fragment directory " + options.directory);
  }
  std::unique_ptr<FragmentStore> store(new FragmentStore(std::move(options)));
  TESSERA_RETURN_IF_ERROR(store->AdoptExisting());
  FragmentStore* self = store.get();
  store->reclaimer_id_ = store->options_.budget->AddReclaimer(
      [self](uint64_t bytes) { return self->TrimPool(bytes); });
  if (store->options_.precreate_spares) {
    store->precreate_thread_ = std::thread([self] { self->PrecreateLoop(); });
  }
  return store;
}

FragmentStore::~FragmentStore() {
  // A creation in progress finishes (its spare lands in the pool, deleted below); queued ones
  // are dropped.
  {
    absl::MutexLock lock(&precreate_mu_);
    precreate_stop_ = true;
    precreate_queue_.clear();
  }
  if (precreate_thread_.joinable()) precreate_thread_.join();
  options_.budget->RemoveReclaimer(reclaimer_id_);
  // Segments stay on disk (sealed ones are re-adopted by the next store); only the pool's empty
  // ones are deleted, and every reservation is given back.
  absl::MutexLock lock(&mu_);
  for (auto& [capacity, spare] : pool_) {
    spare.segment->Unlink().IgnoreError();
    options_.budget->Release(spare.segment->file_bytes());
  }
  pool_.clear();
  for (auto& [key, entry] : entries_) {
    absl::MutexLock entry_lock(&entry->mu);
    if (entry->segment) options_.budget->Release(entry->segment->file_bytes());
  }
}

absl::Status FragmentStore::AdoptExisting() {
  auto log = Logger("fragments");
  DIR* d = opendir(options_.directory.c_str());
  if (d == nullptr) return ErrnoStatus(errno, "open fragment directory " + options_.directory);
  std::vector<std::string> files;
  while (dirent* ent = readdir(d)) {
    std::string name = ent->d_name;
    if (absl::EndsWith(name, kFragmentSuffix)) files.push_back(name);
  }
  closedir(d);
  std::sort(files.begin(), files.end());

  uint64_t next_generation = 1;
  uint64_t adopted = 0;
  uint64_t discarded = 0;
  uint64_t crc_failures = 0;
  std::map<FragmentKey, std::shared_ptr<Entry>> adopted_entries;
  for (const std::string& name : files) {
    const std::string path = options_.directory + "/" + name;
    if (absl::StartsWith(name, kFragmentPrefix)) {
      const uint64_t gen = std::strtoull(name.c_str() + strlen(kFragmentPrefix), nullptr, 10);
      next_generation = std::max(next_generation, gen + 1);
    }
    auto opened = Segment::Open(path, /*writable=*/true);
    absl::Status verdict;
    FragmentKey key;
    FragmentMeta meta;
    if (!opened.ok()) {
      verdict = opened.status();
    } else {
      const SegmentHeader& h = *(*opened)->header();
      const SegmentState state = LoadState(h);
      if (state != SegmentState::kSealed) {
        verdict = absl::AbortedError(absl::StrCat("state ", SegmentStateName(state)));
      } else if (absl::Status s = ValidateSealedHeader(h); !s.ok()) {
        verdict = s;
      } else if (h.kind != static_cast<uint32_t>(SegmentKind::kFragment)) {
        verdict = absl::DataLossError(absl::StrCat("segment kind ", h.kind, " is not a fragment"));
      } else {
        key = FragmentKey{h.job_id, h.rank, h.step, h.fragment_index};
        meta = FragmentMeta{h.owner_incarnation, h.ec_k,        h.ec_m,
                            h.payload_bytes,     h.shard_bytes, h.shard_crc32c};
        verdict = ValidateFragmentKey(key);
        if (verdict.ok()) verdict = ValidateFragmentMeta(key, meta);
        if (!verdict.ok()) {
          verdict = absl::DataLossError(absl::StrCat("header: ", verdict.message()));
        } else {
          const uint32_t crc =
              ParallelCrc32c((*opened)->payload(), h.payload_bytes, options_.crc_threads);
          if (crc != h.payload_crc32c) {
            verdict = absl::DataLossError(absl::StrCat(
                "payload CRC32C 0x", absl::Hex(crc), " != header 0x", absl::Hex(h.payload_crc32c)));
          }
        }
      }
    }
    if (!verdict.ok()) {
      if (opened.ok() && LoadState(*(*opened)->header()) == SegmentState::kEmpty) {
        log->debug("deleting spare fragment segment {}", path);
      } else if (verdict.code() == absl::StatusCode::kDataLoss) {
        ++crc_failures;
        log->error("discarding damaged fragment segment {}: {}", path, verdict.ToString());
      } else {
        log->info("discarding unsealed fragment segment {}: {}", path, verdict.ToString());
      }
      unlink(path.c_str());
      ++discarded;
      continue;
    }
    std::shared_ptr<Segment> segment = std::move(*opened);
    auto entry = std::make_shared<Entry>(key, meta, segment);
    {
      absl::MutexLock entry_lock(&entry->mu);
      entry->sealed = true;
      entry->fragment_crc32c = segment->header()->payload_crc32c;
    }
    // Two sealed segments of one key (a crash during a replacement): the newer incarnation wins.
    auto& slot = adopted_entries[key];
    if (slot && slot->meta.owner_incarnation >= meta.owner_incarnation) std::swap(slot, entry);
    if (slot) {
      absl::MutexLock old_lock(&slot->mu);
      log->info("discarding {} of incarnation {}: superseded by incarnation {}",
                slot->key.ToString(), slot->meta.owner_incarnation, meta.owner_incarnation);
      slot->segment->Unlink().IgnoreError();
      ++discarded;
    }
    slot = std::move(entry);
  }

  uint64_t used = 0;
  for (auto& [key, entry] : adopted_entries) {
    absl::MutexLock entry_lock(&entry->mu);
    used += entry->segment->file_bytes();
    log->info("re-adopted {} ({} bytes, CRC32C 0x{:08x}) from {}", key.ToString(),
              entry->meta.fragment_bytes, entry->fragment_crc32c, entry->segment->path());
    ++adopted;
  }
  if (!options_.budget->Charge(used)) {
    log->warn("re-adopted fragments take {} bytes; the budget of {} bytes is now over capacity",
              used, options_.budget->capacity_bytes());
  }
  absl::MutexLock lock(&mu_);
  entries_ = std::move(adopted_entries);
  next_generation_ = next_generation;
  counters_.adopted_at_start = adopted;
  counters_.discarded_at_start = discarded;
  counters_.crc_failures = crc_failures;
  return absl::OkStatus();
}

std::shared_ptr<FragmentStore::Entry> FragmentStore::Find(const FragmentKey& key) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  return it == entries_.end() ? nullptr : it->second;
}

absl::StatusOr<std::shared_ptr<Segment>> FragmentStore::AcquireSegment(const FragmentKey& key,
                                                                       uint64_t capacity_bytes) {
  {
    absl::MutexLock lock(&mu_);
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
  // No spare fitted: the next fragment of this (job, rank) would not find one either.
  MaybePrecreateSpare(key.job_id, key.rank, capacity_bytes);
  return std::shared_ptr<Segment>(std::move(*created));
}

bool FragmentStore::SpareWanted(const std::string& job_id, uint32_t rank,
                                uint64_t capacity_bytes) const {
  if (options_.max_spares_per_rank <= 0) return false;
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

absl::StatusOr<FragmentStatus> FragmentStore::BeginFragment(const FragmentKey& key,
                                                            const FragmentMeta& meta) {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  TESSERA_RETURN_IF_ERROR(ValidateFragmentMeta(key, meta));
  auto log = Logger("fragments");
  for (;;) {
    std::shared_ptr<Entry> existing;
    {
      // Several streams may begin one fragment at once (a fragment sent over several channels):
      // one creates its segment, the others wait for it and then take the idempotent path.
      absl::MutexLock lock(&mu_);
      auto not_creating = [this, &key]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return creating_.count(key) == 0;
      };
      mu_.Await(absl::Condition(&not_creating));
      auto it = entries_.find(key);
      if (it != entries_.end()) existing = it->second;
    }
    if (existing) {
      absl::MutexLock entry_lock(&existing->mu);
      if (existing->retired) continue;  // dropped meanwhile: look again
      const FragmentMeta& held = existing->meta;
      if (held == meta) return existing->Status();
      if (meta.owner_incarnation < held.owner_incarnation) {
        return absl::FailedPreconditionError(
            absl::StrCat(key.ToString(), " is held for owner incarnation ", held.owner_incarnation,
                         "; incarnation ", meta.owner_incarnation, " is older (a stale sender)"));
      }
      // Same incarnation, other metadata: the owner encoded this step again (a restored job
      // snapshotted the step anew, or fewer members were live and k changed). The owner only
      // sends what it holds now, so the new fragment replaces the held one, sealed or not.
    }

    {
      absl::MutexLock lock(&mu_);
      auto it = entries_.find(key);
      if (creating_.count(key) != 0 || (it == entries_.end() ? nullptr : it->second) != existing) {
        continue;  // somebody else got there first: decide again
      }
      creating_.insert(key);
    }
    absl::StatusOr<std::shared_ptr<Segment>> acquired =
        AcquireSegment(key, RoundUp(meta.fragment_bytes, kSegmentGranuleBytes));
    if (!acquired.ok()) {
      absl::MutexLock lock(&mu_);
      creating_.erase(key);
      return acquired.status();
    }
    std::shared_ptr<Segment> segment = std::move(*acquired);
    // A new segment is EMPTY, and so is a spare (Retire): the header is rewritten while nothing
    // can adopt it, and the payload is reused only once it says WRITING.
    SegmentHeader* h = segment->header();
    StoreState(h, SegmentState::kEmpty);
    h->kind = static_cast<uint32_t>(SegmentKind::kFragment);
    h->step = key.step;
    h->rank = key.rank;
    h->world_size = 0;
    h->payload_bytes = 0;
    h->payload_crc32c = 0;
    h->manifest_offset = 0;
    h->manifest_bytes = 0;
    h->layout_hash = 0;
    h->sealed_unix_ms = 0;
    h->fragment_index = key.fragment_index;
    h->ec_k = meta.ec_k;
    h->ec_m = meta.ec_m;
    h->shard_bytes = meta.shard_bytes;
    h->shard_crc32c = meta.shard_crc32c;
    h->owner_incarnation = meta.owner_incarnation;
    h->header_crc32c = 0;
    std::memset(h->job_id, 0, sizeof(h->job_id));
    std::memcpy(h->job_id, key.job_id.data(), key.job_id.size());
    StoreState(h, SegmentState::kWriting);

    auto entry = std::make_shared<Entry>(key, meta, std::move(segment));
    bool raced = false;
    {
      absl::MutexLock lock(&mu_);
      creating_.erase(key);
      auto it = entries_.find(key);
      std::shared_ptr<Entry> now = it == entries_.end() ? nullptr : it->second;
      if (now != existing) {
        raced = true;  // a drop got there meanwhile: decide again
      } else {
        entries_[key] = entry;
      }
    }
    if (raced) {
      Retire(entry);
      continue;
    }
    if (existing) {
      log->info("{}: replacing the fragment of owner incarnation {} (shard {} bytes, CRC32C "
                "0x{:08x}, RS({}, {})) with incarnation {} (shard {} bytes, CRC32C 0x{:08x}, "
                "RS({}, {}))",
                key.ToString(), existing->meta.owner_incarnation, existing->meta.shard_bytes,
                existing->meta.shard_crc32c, existing->meta.ec_k, existing->meta.ec_m,
                meta.owner_incarnation, meta.shard_bytes, meta.shard_crc32c, meta.ec_k, meta.ec_m);
      Retire(existing);
    }
    absl::MutexLock entry_lock(&entry->mu);
    return entry->Status();
  }
}

absl::StatusOr<std::shared_ptr<FragmentStore::Entry>> FragmentStore::FindForWrite(
    const FragmentKey& key, uint64_t owner_incarnation) const {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  std::shared_ptr<Entry> entry = Find(key);
  if (!entry) {
    return absl::NotFoundError(absl::StrCat(key.ToString(),
                                            " is not being stored here: begin it first (the "
                                            "first message of PutFragment carries its info)"));
  }
  if (entry->meta.owner_incarnation != owner_incarnation) {
    return absl::FailedPreconditionError(
        absl::StrCat(key.ToString(), " is held for owner incarnation ",
                     entry->meta.owner_incarnation, ", not ", owner_incarnation));
  }
  return entry;
}

absl::StatusOr<FragmentStatus> FragmentStore::WriteChunk(const FragmentKey& key,
                                                         uint64_t owner_incarnation,
                                                         uint64_t offset, const uint8_t* data,
                                                         size_t size, uint32_t chunk_crc32c) {
  ConstByteRange piece{data, size};
  return WriteChunk(key, owner_incarnation, offset, absl::MakeConstSpan(&piece, 1), chunk_crc32c);
}

absl::StatusOr<FragmentStatus> FragmentStore::WriteChunk(const FragmentKey& key,
                                                         uint64_t owner_incarnation,
                                                         uint64_t offset,
                                                         absl::Span<const ConstByteRange> pieces,
                                                         uint32_t chunk_crc32c) {
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, FindForWrite(key, owner_incarnation));
  uint64_t size = 0;
  for (const ConstByteRange& p : pieces) {
    if (p.data == nullptr && p.size > 0) {
      return absl::InvalidArgumentError(key.ToString() + ": chunk data is null");
    }
    size += p.size;
  }
  TESSERA_RETURN_IF_ERROR(CheckChunkRange(key, entry->meta.fragment_bytes, offset, size));
  // The source is checked before anything is written, so a damaged chunk changes no data.
  uint32_t crc = 0;
  for (const ConstByteRange& p : pieces) crc = Crc32c(p.data, p.size, crc);
  if (crc != chunk_crc32c) {
    {
      absl::MutexLock lock(&mu_);
      ++counters_.crc_failures;
    }
    return absl::DataLossError(absl::StrCat(
        key.ToString(), ": chunk [", offset, ", ", offset + size, ") has CRC32C 0x", absl::Hex(crc),
        " but was sent with 0x", absl::Hex(chunk_crc32c), "; nothing was written"));
  }

  absl::MutexLock entry_lock(&entry->mu);
  if (entry->retired) {
    return absl::NotFoundError(key.ToString() + " was dropped or replaced while being written");
  }
  if (entry->sealed) return entry->Status();  // a retry after a lost reply
  if (!entry->RecordChunk(offset, size, crc)) {
    uint8_t* dst = entry->segment->payload() + offset;
    for (const ConstByteRange& p : pieces) {
      std::memcpy(dst, p.data, p.size);
      dst += p.size;
    }
    AddCoverage(&entry->covered, &entry->covered_bytes, offset, offset + size);
  }
  return entry->Status();
}

absl::StatusOr<FragmentStatus> FragmentStore::ReceiveChunk(
    const FragmentKey& key, uint64_t owner_incarnation, uint64_t offset, size_t size,
    uint32_t chunk_crc32c, absl::FunctionRef<absl::Status(uint8_t* dst)> fill) {
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, FindForWrite(key, owner_incarnation));
  TESSERA_RETURN_IF_ERROR(CheckChunkRange(key, entry->meta.fragment_bytes, offset, size));
  // A reference of our own: should the fragment be dropped or replaced while fill runs, its
  // segment is deleted once we let go, never recycled under our writes.
  std::shared_ptr<Segment> segment;
  {
    absl::MutexLock entry_lock(&entry->mu);
    if (entry->retired) {
      return absl::NotFoundError(key.ToString() + " was dropped or replaced while being written");
    }
    if (entry->sealed) return entry->Status();  // a retry after a lost reply
    segment = entry->segment;
    ++entry->receiving;
  }
  uint8_t* dst = segment->payload() + offset;
  absl::Status filled = fill(dst);
  uint32_t crc = 0;
  if (filled.ok()) {
    crc = Crc32c(dst, size);
    if (crc != chunk_crc32c) {
      filled = absl::DataLossError(absl::StrCat(
          key.ToString(), ": chunk [", offset, ", ", offset + size, ") arrived with CRC32C 0x",
          absl::Hex(crc), " but was sent with 0x", absl::Hex(chunk_crc32c),
          "; that range must be sent again"));
      absl::MutexLock lock(&mu_);
      ++counters_.crc_failures;
    }
  }
  absl::MutexLock entry_lock(&entry->mu);
  --entry->receiving;
  if (entry->retired) {
    return absl::NotFoundError(key.ToString() + " was dropped or replaced while being written");
  }
  if (!filled.ok()) {
    entry->ForgetRange(offset, size);
    return filled;
  }
  entry->RecordChunk(offset, size, crc);
  AddCoverage(&entry->covered, &entry->covered_bytes, offset, offset + size);
  return entry->Status();
}

absl::StatusOr<FragmentStatus> FragmentStore::SealFragment(const FragmentKey& key,
                                                           uint64_t owner_incarnation,
                                                           uint32_t fragment_crc32c) {
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, FindForWrite(key, owner_incarnation));
  bool crc_failed = false;
  absl::StatusOr<FragmentStatus> result;
  {
    absl::MutexLock entry_lock(&entry->mu);
    if (entry->retired) {
      return absl::NotFoundError(key.ToString() + " was dropped or replaced while being written");
    }
    if (entry->sealed) {
      if (entry->fragment_crc32c == fragment_crc32c) return entry->Status();
      return absl::DataLossError(absl::StrCat(
          key.ToString(), " is sealed with CRC32C 0x", absl::Hex(entry->fragment_crc32c),
          "; the sender now says 0x", absl::Hex(fragment_crc32c)));
    }
    if (entry->receiving > 0) {
      return absl::UnavailableError(absl::StrCat(
          key.ToString(), ": ", entry->receiving,
          " chunk(s) of it are still arriving on other connections; seal it again once they "
          "are in"));
    }
    const uint64_t fragment_bytes = entry->meta.fragment_bytes;
    if (entry->covered_bytes != fragment_bytes) {
      return absl::FailedPreconditionError(absl::StrCat(
          key.ToString(), ": ", entry->covered_bytes, " of ", fragment_bytes,
          " bytes have arrived (first missing: ", entry->FirstMissing(), "); cannot seal yet"));
    }
    Segment& segment = *entry->segment;
    // Each chunk's CRC was checked on the bytes that were then copied in; while the chunks tile
    // the fragment exactly, their combination is the CRC of the stored fragment.
    uint32_t crc = 0;
    if (entry->overlapped) {
      crc = ParallelCrc32c(segment.payload(), fragment_bytes, options_.crc_threads);
    } else {
      for (const auto& [offset, chunk] : entry->chunks) {
        crc = offset == 0 ? chunk.crc32c : Crc32cCombineCached(crc, chunk.crc32c, chunk.size);
      }
    }
    if (crc != fragment_crc32c) {
      entry->ResetReceived();
      crc_failed = true;
      result = absl::DataLossError(
          absl::StrCat(key.ToString(), ": the received fragment has CRC32C 0x", absl::Hex(crc),
                       " but the sender says 0x", absl::Hex(fragment_crc32c),
                       "; not sealed, every byte must be sent again"));
    } else {
      SegmentHeader* h = segment.header();
      h->payload_bytes = fragment_bytes;
      h->payload_crc32c = crc;
      h->sealed_unix_ms = NowUnixMs();
      h->header_crc32c = ComputeHeaderCrc(*h);
      StoreState(h, SegmentState::kSealed);
      entry->sealed = true;
      entry->fragment_crc32c = crc;
      entry->chunks.clear();
      entry->covered.clear();
      result = entry->Status();
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (crc_failed) {
      ++counters_.crc_failures;
    } else {
      ++counters_.seals;
    }
  }
  // The next step's fragment of this (job, rank) will want a segment of this size.
  if (!crc_failed) {
    MaybePrecreateSpare(key.job_id, key.rank,
                        RoundUp(entry->meta.fragment_bytes, kSegmentGranuleBytes));
  }
  return result;
}

absl::StatusOr<FragmentView> FragmentStore::Get(const FragmentKey& key,
                                                uint64_t owner_incarnation) const {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  std::shared_ptr<Entry> entry = Find(key);
  if (entry) {
    absl::MutexLock entry_lock(&entry->mu);
    if (!entry->retired &&
        (owner_incarnation == 0 || owner_incarnation == entry->meta.owner_incarnation)) {
      if (!entry->sealed) {
        return absl::FailedPreconditionError(
            absl::StrCat(key.ToString(), " is still being written (", entry->covered_bytes, " of ",
                         entry->meta.fragment_bytes, " bytes have arrived)"));
      }
      return FragmentView(entry->segment, entry->Status());
    }
  }
  std::vector<std::string> held;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.lower_bound(FragmentKey{key.job_id, key.rank, key.step, 0});
         it != entries_.end() && it->first.job_id == key.job_id && it->first.rank == key.rank &&
         it->first.step == key.step;
         ++it) {
      held.push_back(absl::StrCat(it->first.fragment_index, " (incarnation ",
                                  it->second->meta.owner_incarnation, ")"));
    }
  }
  return absl::NotFoundError(absl::StrCat(
      key.ToString(),
      owner_incarnation != 0 ? absl::StrCat(" of incarnation ", owner_incarnation) : "",
      " is not held here",
      held.empty() ? ""
                   : absl::StrCat("; fragments held for that shard: ", absl::StrJoin(held, ", "))));
}

absl::Status FragmentStore::VerifyFragment(const FragmentKey& key) const {
  TESSERA_ASSIGN_OR_RETURN(FragmentView view, Get(key));
  const uint32_t crc = ParallelCrc32c(view.data(), view.size(), options_.crc_threads);
  if (crc != view.fragment_crc32c()) {
    return absl::DataLossError(absl::StrCat(key.ToString(), ": stored bytes have CRC32C 0x",
                                            absl::Hex(crc), ", sealed with 0x",
                                            absl::Hex(view.fragment_crc32c())));
  }
  return absl::OkStatus();
}

std::vector<FragmentStatus> FragmentStore::List(const std::string& job_id) const {
  std::vector<std::shared_ptr<Entry>> entries;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, entry] : entries_) {
      if (job_id.empty() || key.job_id == job_id) entries.push_back(entry);
    }
  }
  std::vector<FragmentStatus> out;
  out.reserve(entries.size());
  for (const auto& entry : entries) {
    absl::MutexLock entry_lock(&entry->mu);
    if (!entry->retired) out.push_back(entry->Status());
  }
  return out;
}

size_t FragmentStore::DropMatching(const std::string& job_id, bool all_ranks, uint32_t rank,
                                   int64_t step) {
  std::vector<std::shared_ptr<Entry>> doomed;
  std::vector<std::shared_ptr<Segment>> spares;
  {
    absl::MutexLock lock(&mu_);
    if (all_ranks) {
      ++job_drops_;  // a spare being created for it meanwhile is discarded
      // The job is gone: nothing of it will be sent again, so neither are its spares kept.
      for (auto it = pool_.begin(); it != pool_.end();) {
        if (it->second.job_id != job_id) {
          ++it;
          continue;
        }
        pool_bytes_ -= it->second.segment->file_bytes();
        spares.push_back(std::move(it->second.segment));
        it = pool_.erase(it);
      }
    }
    for (auto it = entries_.lower_bound(FragmentKey{job_id, all_ranks ? 0 : rank, INT64_MIN, 0});
         it != entries_.end() && it->first.job_id == job_id;) {
      if (!all_ranks && it->first.rank != rank) break;
      if (all_ranks || it->first.step < step) {
        doomed.push_back(std::move(it->second));
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (all_ranks) {
    absl::MutexLock lock(&precreate_mu_);
    precreate_queue_.erase(std::remove_if(precreate_queue_.begin(), precreate_queue_.end(),
                                          [&job_id](const PrecreateRequest& r) {
                                            return r.job_id == job_id;
                                          }),
                           precreate_queue_.end());
  }
  DeleteSpares(std::move(spares));
  for (const auto& entry : doomed) Retire(entry, /*keep_spare=*/!all_ranks);
  return doomed.size();
}

size_t FragmentStore::DropOlderThan(const std::string& job_id, uint32_t rank, int64_t step) {
  return DropMatching(job_id, /*all_ranks=*/false, rank, step);
}

size_t FragmentStore::DropJob(const std::string& job_id) {
  return DropMatching(job_id, /*all_ranks=*/true, 0, 0);
}

absl::Status FragmentStore::DropFragment(const FragmentKey& key) {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  std::shared_ptr<Entry> entry;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return absl::NotFoundError(key.ToString() + " is not held here");
    entry = std::move(it->second);
    entries_.erase(it);
  }
  Retire(entry);
  return absl::OkStatus();
}

FragmentStore::Stats FragmentStore::stats() const {
  std::vector<std::shared_ptr<Entry>> entries;
  Stats s;
  {
    absl::MutexLock lock(&mu_);
    s = counters_;
    s.pool_segments = pool_.size();
    s.pool_bytes = pool_bytes_;
    for (const auto& [key, entry] : entries_) entries.push_back(entry);
  }
  for (const auto& entry : entries) {
    absl::MutexLock entry_lock(&entry->mu);
    if (entry->retired || !entry->segment) continue;
    (entry->sealed ? s.fragments_sealed : s.fragments_writing)++;
    s.held_bytes += entry->segment->file_bytes();
  }
  return s;
}

}  // namespace tessera
