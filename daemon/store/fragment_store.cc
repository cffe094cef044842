// FragmentStore (fragment_store.h): fragment keys and their checks, opening the store
// (re-adopting the sealed fragments a previous daemon left), reads, listings and drops. The
// receive path is in fragment_store_write.cc, the pool of spare segments in
// fragment_store_spares.cc.
#include "daemon/store/fragment_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/fragment_store_internal.h"
#include "daemon/store/snapshot_store.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace {

using fragment_store_internal::kFragmentPrefix;
using fragment_store_internal::kFragmentSuffix;

constexpr uint32_t kMaxRank = 1u << 20;  // SnapshotStore's world-size limit
constexpr uint64_t kMaxShardBytes = uint64_t{1} << 40;

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

bool FragmentMayReplace(const FragmentMeta& held, const FragmentMeta& incoming) {
  if (held.epoch != 0 && incoming.epoch != 0 && held.epoch != incoming.epoch) {
    return incoming.epoch > held.epoch;
  }
  return incoming.owner_incarnation >= held.owner_incarnation;
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
        meta = FragmentMeta{h.owner_incarnation, h.ec_k,         h.ec_m, h.payload_bytes,
                            h.shard_bytes,       h.shard_crc32c, h.epoch};
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
    // Two sealed segments of one key (a crash during a replacement): the one that may replace
    // the other wins (the newer epoch, then the newer incarnation).
    auto& slot = adopted_entries[key];
    if (slot && !FragmentMayReplace(slot->meta, meta)) std::swap(slot, entry);
    if (slot) {
      absl::MutexLock old_lock(&slot->mu);
      log->info("discarding {} of epoch {} incarnation {}: superseded by epoch {} incarnation {}",
                slot->key.ToString(), slot->meta.epoch, slot->meta.owner_incarnation,
                entry->meta.epoch, entry->meta.owner_incarnation);
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
                                   int64_t step, uint64_t up_to_epoch, bool unknown_too,
                                   uint64_t* bytes_dropped) {
  auto doomed_epoch = [&](uint64_t epoch) {
    return epoch == 0 ? unknown_too : epoch <= up_to_epoch;
  };
  std::vector<std::shared_ptr<Entry>> doomed;
  std::vector<std::shared_ptr<Segment>> spares;
  {
    absl::MutexLock lock(&mu_);
    if (all_ranks) {
      ++job_drops_;  // a spare being created for it meanwhile is discarded
      for (auto it = peak_held_.lower_bound({job_id, 0});
           it != peak_held_.end() && it->first.first == job_id;) {
        it = peak_held_.erase(it);
      }
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
      if (all_ranks ? doomed_epoch(it->second->meta.epoch) : it->first.step < step) {
        if (bytes_dropped != nullptr) *bytes_dropped += it->second->meta.fragment_bytes;
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

size_t FragmentStore::DropJob(const std::string& job_id, uint64_t dropped_epoch, bool unknown_too,
                              uint64_t* bytes_dropped) {
  return DropMatching(job_id, /*all_ranks=*/true, 0, 0, dropped_epoch, unknown_too, bytes_dropped);
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
