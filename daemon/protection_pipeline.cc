#include "daemon/protection_pipeline.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/metrics.h"
#include "daemon/shard_rebuild.h"
#include "ec/erasure_codec.h"
#include "proto/manifest.pb.h"

namespace tessera {
namespace {

constexpr int64_t kMaxBackoffMs = 5000;

// Writes a fetched shard into a segment's payload.
class SegmentSink final : public ShardSink {
 public:
  explicit SegmentSink(Segment* segment) : segment_(segment) {}
  absl::Status Begin(const ShardInfo& info) override {
    if (info.payload_bytes > segment_->capacity_bytes()) {
      return absl::FailedPreconditionError(absl::StrCat("shard of ", info.payload_bytes,
                                                        " bytes does not fit the ",
                                                        segment_->capacity_bytes(),
                                                        " bytes prepared for it"));
    }
    info_ = info;
    return absl::OkStatus();
  }
  absl::Status Write(uint64_t offset, const uint8_t* data, size_t size) override {
    if (offset + size > segment_->capacity_bytes()) {
      return absl::DataLossError("fetched bytes past the end of the shard");
    }
    std::memcpy(segment_->payload() + offset, data, size);
    return absl::OkStatus();
  }
  const ShardInfo& info() const { return info_; }

 private:
  Segment* const segment_;
  ShardInfo info_;
};

// Finds the manifest of a shard payload: the agent writes it at the first 4 KiB boundary at or
// after the data (SlotLayout), and it records data_bytes, so a candidate is only accepted when
// it parses, names (job, rank, step) and says the data ends just before it.
absl::StatusOr<std::pair<uint64_t, uint64_t>> LocateManifest(const uint8_t* payload,
                                                             uint64_t payload_bytes,
                                                             const std::string& job_id,
                                                             uint32_t rank, int64_t step) {
  constexpr uint64_t kAlign = 4096;
  for (uint64_t offset = (payload_bytes / kAlign) * kAlign;; offset -= kAlign) {
    if (offset < payload_bytes) {
      ShardManifest manifest;
      const uint64_t bytes = payload_bytes - offset;
      if (manifest.ParseFromArray(payload + offset, static_cast<int>(bytes)) &&
          manifest.job_id() == job_id && manifest.rank() == rank && manifest.step() == step &&
          (manifest.data_bytes() + kAlign - 1) / kAlign * kAlign == offset) {
        return std::make_pair(offset, bytes);
      }
    }
    if (offset == 0) break;
  }
  return absl::DataLossError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                          ": the rebuilt shard holds no readable manifest"));
}

}  // namespace

ClusterCoordination::ClusterCoordination(SnapshotStore* store, FragmentStore* fragments,
                                         Cluster* cluster, PeerClient* client, Options options)
    : Coordination(store, /*derive_commits=*/false),
      fragments_(fragments),
      cluster_(cluster),
      client_(client),
      options_(options) {
  // Shards made local for a restore are read by the agent during that restore only: what a
  // previous run of the daemon left is stale.
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(fragments_->directory(), ec)) {
    if (absl::EndsWith(entry.path().string(), ".restored")) {
      std::filesystem::remove(entry.path(), ec);
    }
  }
}

ClusterCoordination::~ClusterCoordination() { Stop(); }

void ClusterCoordination::Start() {
  if (worker_.joinable()) return;
  {
    // After a restart, what was sealed may never have been protected (the queue died with the
    // previous run): protect it again. Peers replace fragments of an older incarnation.
    absl::MutexLock lock(&mu_);
    for (const auto& v : store_->ListVersions("")) {
      if (v.state == SegmentState::kSealed) queue_.push_back(Work{v.job_id, v.rank, v.step, 0, 0});
    }
  }
  worker_ = std::thread([this] { Run(); });
  committer_ = std::thread([this] { CommitLoop(); });
}

void ClusterCoordination::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (worker_.joinable()) worker_.join();
  if (committer_.joinable()) committer_.join();
}

ClusterCoordination::Stats ClusterCoordination::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void ClusterCoordination::OnSealed(const std::string& job_id, uint32_t rank, int64_t step,
                                   uint32_t world_size) {
  absl::MutexLock lock(&mu_);
  uint32_t& known = world_sizes_[job_id];
  known = std::max(known, world_size);
  queue_.push_back(Work{job_id, rank, step, 0, 0});
}

void ClusterCoordination::Run() {
  auto log = Logger("protection");
  while (true) {
    std::optional<Work> work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (stopping_) return true;
        const int64_t now = NowUnixMs();
        for (const Work& w : queue_) {
          if (w.not_before_ms <= now) return true;
        }
        return false;
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(50));
      if (stopping_) return;
      const int64_t now = NowUnixMs();
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->not_before_ms <= now) {
          work = *it;
          queue_.erase(it);
          break;
        }
      }
    }
    if (work) {
      absl::Status status = Protect(*work);
      if (status.ok()) {
        // The commit check (a ListHeld round to every member) runs on its own thread, so the
        // next sealed shard's protection never waits for it.
        absl::MutexLock lock(&mu_);
        commit_due_.insert(work->job_id);
      } else {
        Work retry = *work;
        ++retry.attempts;
        const int64_t backoff = std::min<int64_t>(
            kMaxBackoffMs, options_.retry_backoff_ms << std::min(retry.attempts - 1, 8));
        retry.not_before_ms = NowUnixMs() + backoff;
        log->warn("job '{}' rank {} step {}: protection attempt {} failed, retrying in {} ms: {}",
                  work->job_id, work->rank, work->step, retry.attempts, backoff,
                  status.ToString());
        absl::MutexLock lock(&mu_);
        ++stats_.protection_failures;
        queue_.push_back(retry);
      }
    }
  }
}

void ClusterCoordination::CommitLoop() {
  int64_t last_check_ms = 0;
  while (true) {
    std::set<std::string> due;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !commit_due_.empty();
      };
      const int64_t wait_ms =
          std::max<int64_t>(0, options_.commit_check_ms - (NowUnixMs() - last_check_ms));
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(wait_ms));
      if (stopping_) return;
      due.swap(commit_due_);
    }
    for (const std::string& job : due) MaybeCommit(job);
    if (NowUnixMs() - last_check_ms >= options_.commit_check_ms) {
      last_check_ms = NowUnixMs();
      CheckCommits();
    }
  }
}

absl::Status ClusterCoordination::Protect(const Work& work) {
  auto log = Logger("protection");
  const absl::Time started = absl::Now();
  auto pinned = store_->Pin(work.job_id, work.rank, work.step);
  if (!pinned.ok()) {
    // The slot was reused for a newer step: that step is protected instead.
    log->debug("job '{}' rank {} step {} is no longer sealed here: not protected ({})",
               work.job_id, work.rank, work.step, pinned.status().ToString());
    return absl::OkStatus();
  }
  struct Unpinner {
    SnapshotStore* store;
    const Work& work;
    ~Unpinner() { store->Unpin(work.job_id, work.rank, work.step); }
  } unpin{store_, work};

  TESSERA_ASSIGN_OR_RETURN(FragmentPlacement placement,
                           PlaceFragments(cluster_->LiveNodeIds(), cluster_->self_id(),
                                          work.rank, options_.k, options_.m));
  if (placement.nodes.empty()) {
    if (!cluster_->Peers().empty()) {
      // Members are configured but none is live (yet: a restarted daemon protects what it
      // re-adopted before it has heard its peers): retry, or the step is never committed.
      return absl::UnavailableError(
          absl::StrCat("no live member can hold fragments yet (", placement.reason, ")"));
    }
    log->warn("job '{}' rank {} step {}: {}", work.job_id, work.rank, work.step,
              placement.reason);
    return absl::OkStatus();
  }
  if (placement.degraded) {
    log->info("job '{}' rank {} step {}: RS({}, {}) instead of RS({}, {}): {}", work.job_id,
              work.rank, work.step, placement.k, placement.m, options_.k, options_.m,
              placement.reason);
  }
  TESSERA_ASSIGN_OR_RETURN(ErasureCodec codec, ErasureCodec::Create(placement.k, placement.m));
  const uint64_t shard_bytes = pinned->payload_bytes;
  const size_t fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, placement.k);
  // Data fragments that lie wholly inside the payload are sent from it in place; the others
  // (the padded last one, if any) are copied into scratch, which also takes the parity.
  std::vector<const uint8_t*> data(placement.k);
  std::vector<int> copied;
  for (int i = 0; i < placement.k; ++i) {
    if ((i + 1) * fragment_bytes <= shard_bytes) {
      data[i] = pinned->payload + i * fragment_bytes;
    } else {
      copied.push_back(i);
    }
  }
  uint8_t* const scratch = Scratch((copied.size() + placement.m) * fragment_bytes);
  for (size_t c = 0; c < copied.size(); ++c) {
    const uint64_t begin = copied[c] * fragment_bytes;
    uint8_t* dst = scratch + c * fragment_bytes;
    const uint64_t present = begin < shard_bytes ? std::min<uint64_t>(fragment_bytes, shard_bytes - begin) : 0;
    if (present > 0) std::memcpy(dst, pinned->payload + begin, present);
    std::memset(dst + present, 0, fragment_bytes - present);
    data[copied[c]] = dst;
  }
  std::vector<uint8_t*> parity(placement.m);
  for (int j = 0; j < placement.m; ++j) {
    parity[j] = scratch + (copied.size() + j) * fragment_bytes;
  }

  FragmentMeta meta;
  meta.owner_incarnation = cluster_->incarnation();
  meta.ec_k = static_cast<uint32_t>(placement.k);
  meta.ec_m = static_cast<uint32_t>(placement.m);
  meta.fragment_bytes = fragment_bytes;
  meta.shard_bytes = shard_bytes;
  meta.shard_crc32c = pinned->payload_crc32c;
  const int total = placement.k + placement.m;
  std::vector<absl::Status> results(total);
  std::vector<std::thread> senders;
  auto send = [&](int i) {
    const std::string& node = placement.nodes[i];
    auto address = cluster_->AddressOf(node);
    if (!address) {
      results[i] = absl::UnavailableError(absl::StrCat("member ", node, " is not live"));
      return;
    }
    FragmentKey key{work.job_id, work.rank, work.step, static_cast<uint32_t>(i)};
    const uint8_t* bytes = i < placement.k ? data[i] : parity[i - placement.k];
    results[i] = client_->PutFragment(*address, key, meta, bytes, fragment_bytes).status();
    if (!results[i].ok()) {
      results[i] = absl::Status(results[i].code(), absl::StrCat("fragment ", i, " to ", node,
                                                                ": ", results[i].message()));
    }
  };
  // The data fragments go at once; the parity is encoded on several threads meanwhile (it takes
  // a fraction of the transfer time) and each parity fragment goes as soon as it is complete.
  for (int i = 0; i < placement.k; ++i) senders.emplace_back(send, i);
  absl::Status encoded =
      placement.m > 0 ? codec.EncodeOnThreads(data.data(), parity.data(), fragment_bytes,
                                              EncodeThreads())
                      : absl::OkStatus();
  if (encoded.ok()) {
    for (int i = placement.k; i < total; ++i) senders.emplace_back(send, i);
  } else {
    for (int i = placement.k; i < total; ++i) results[i] = encoded;
  }
  for (std::thread& t : senders) t.join();
  std::vector<std::string> failed;
  for (const absl::Status& s : results) {
    if (!s.ok()) failed.push_back(s.ToString());
  }
  if (!failed.empty()) return absl::UnavailableError(absl::StrJoin(failed, "; "));
  const absl::Duration took = absl::Now() - started;
  log->info("job '{}' rank {} step {}: protected ({} bytes) in {} ms, RS({}, {}) on {}; {} ms "
            "after it was sealed",
            work.job_id, work.rank, work.step, shard_bytes, absl::ToInt64Milliseconds(took),
            placement.k, placement.m, absl::StrJoin(placement.nodes, ","),
            std::max<int64_t>(0, NowUnixMs() - pinned->sealed_unix_ms));
  Metrics().protection_seconds->Observe(
      static_cast<double>(std::max<int64_t>(0, NowUnixMs() - pinned->sealed_unix_ms)) / 1000.0);
  absl::MutexLock lock(&mu_);
  ++stats_.protected_shards;
  return absl::OkStatus();
}

uint8_t* ClusterCoordination::Scratch(size_t bytes) {
  if (bytes > scratch_bytes_) {
    scratch_.reset();  // the old buffer goes before the new one is faulted in
    scratch_.reset(new uint8_t[bytes]);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

int ClusterCoordination::EncodeThreads() {
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
}

JobHoldings ClusterCoordination::GatherHoldings(const std::string& job_id) {
  JobHoldings holdings;
  const std::string self = cluster_->self_id();
  for (const auto& v : store_->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed) continue;
    holdings.shards.push_back({self, v.rank, v.step, 0, v.payload_bytes, v.payload_crc32c});
  }
  auto add_fragments = [&holdings](const std::string& node,
                                   const std::vector<FragmentStatus>& list) {
    for (const FragmentStatus& f : list) {
      if (f.state != SegmentState::kSealed) continue;
      holdings.fragments.push_back({node, f.key.rank, f.key.step, 0, f.key.fragment_index,
                                    f.meta.ec_k, f.meta.ec_m, f.meta.shard_bytes,
                                    f.meta.shard_crc32c});
    }
  };
  add_fragments(self, fragments_->List(job_id));
  for (const std::string& node : cluster_->LiveNodeIds()) {
    if (node == self) continue;
    auto address = cluster_->AddressOf(node);
    if (!address) continue;
    auto held = client_->ListHeld(*address, job_id);
    if (!held.ok()) {
      Logger("coordinator")->warn("ListHeld from {}: {}", node, held.status().ToString());
      continue;
    }
    for (const ShardInfo& s : held->shards) {
      holdings.shards.push_back({node, s.rank, s.step, 0, s.payload_bytes, s.payload_crc32c});
    }
    add_fragments(node, held->fragments);
  }
  const uint32_t world = WorldSize(job_id, holdings);
  for (auto& s : holdings.shards) s.world_size = world;
  for (auto& f : holdings.fragments) f.world_size = world;
  return holdings;
}

uint32_t ClusterCoordination::WorldSize(const std::string& job_id, const JobHoldings& holdings) {
  uint32_t world = 0;
  for (const auto& s : holdings.shards) world = std::max(world, s.rank + 1);
  for (const auto& f : holdings.fragments) world = std::max(world, f.rank + 1);
  absl::MutexLock lock(&mu_);
  auto it = world_sizes_.find(job_id);
  if (it != world_sizes_.end()) world = std::max(world, it->second);
  return world;
}

void ClusterCoordination::CheckCommits() {
  std::set<std::string> jobs;
  for (const auto& v : store_->ListVersions("")) jobs.insert(v.job_id);
  for (const auto& f : fragments_->List("")) jobs.insert(f.key.job_id);
  for (const std::string& job : jobs) MaybeCommit(job);
}

void ClusterCoordination::MaybeCommit(const std::string& job_id) {
  const JobHoldings holdings = GatherHoldings(job_id);
  if (holdings.shards.empty() && holdings.fragments.empty()) return;
  const uint32_t world = holdings.shards.empty() ? holdings.fragments[0].world_size
                                                 : holdings.shards[0].world_size;
  // (rank, step) -> sealed fragment indexes, per (k, m).
  std::map<std::pair<int64_t, uint32_t>, std::map<std::pair<uint32_t, uint32_t>,
                                                  std::set<uint32_t>>> sealed;
  for (const HeldFragment& f : holdings.fragments) {
    sealed[{f.step, f.rank}][{f.k, f.m}].insert(f.index);
  }
  const bool alone = cluster_->LiveNodeIds().size() == 1;
  std::set<int64_t> steps;
  for (const HeldShard& s : holdings.shards) steps.insert(s.step);
  for (const HeldFragment& f : holdings.fragments) steps.insert(f.step);
  const int64_t committed = store_->committed(job_id);
  for (auto it = steps.rbegin(); it != steps.rend() && *it > committed; ++it) {
    const int64_t step = *it;
    bool all = world > 0;
    for (uint32_t rank = 0; all && rank < world; ++rank) {
      bool ok = false;
      auto found = sealed.find({step, rank});
      if (found != sealed.end()) {
        for (const auto& [km, indexes] : found->second) {
          ok = ok || indexes.size() >= km.first + km.second;
        }
      }
      if (!ok && alone) {
        for (const HeldShard& s : holdings.shards) ok = ok || (s.rank == rank && s.step == step);
      }
      all = ok;
    }
    if (!all) continue;
    store_->Commit(job_id, step);
    coordinator_.Adopt(job_id, step);
    for (uint32_t rank = 0; rank < world; ++rank) fragments_->DropOlderThan(job_id, rank, step);
    {
      absl::MutexLock lock(&mu_);
      ++stats_.commits;
    }
    Logger("coordinator")->info("job '{}' committed step {} ({} ranks protected)", job_id, step,
                                world);
    {
      // A restore of an older step is over: its trainer has resumed and moved past it. (Skipped
      // while a restore runs, so protection never waits for one; the next commit cleans up.)
      if (!restore_mu_.TryLock()) return;
      for (auto r = restored_.begin(); r != restored_.end();) {
        if (std::get<0>(r->first) == job_id && std::get<2>(r->first) < step) {
          r->second.first->Unlink().IgnoreError();
          fragments_->budget()->Release(r->second.first->file_bytes());
          r = restored_.erase(r);
        } else {
          ++r;
        }
      }
      restore_mu_.Unlock();
    }
    return;
  }
}

absl::StatusOr<int64_t> ClusterCoordination::FindLatestRestorable(const std::string& job_id,
                                                                  uint32_t world_size_hint) {
  // Shards listed by peers carry no world size: the seals seen here, the ranks held and the
  // caller's hint bound it, so a step that only the ranks that started first sealed is not taken
  // as complete.
  const JobHoldings holdings = GatherHoldings(job_id);
  return tessera::FindLatestRestorable(holdings,
                                       std::max(world_size_hint, WorldSize(job_id, holdings)));
}

absl::StatusOr<SnapshotStore::RestoreInfo> ClusterCoordination::PrepareRestore(
    const std::string& job_id, uint32_t rank, int64_t step) {
  auto local = store_->PrepareRestore(job_id, rank, step);
  // A local shard that fails its CRC32C is damaged memory: restore as if it were not here, from
  // a copy elsewhere or from fragments.
  const bool damaged = absl::IsDataLoss(local.status()) && step >= 0;
  if (!damaged &&
      (local.ok() || local.status().code() != absl::StatusCode::kNotFound || step < 0)) {
    if (local.ok() && step >= 0) AdoptRestorePoint(job_id, step);
    return local;
  }
  if (damaged) {
    Logger("recovery")->warn("job '{}' rank {} step {}: the local shard is damaged ({}); "
                             "restoring it from the other nodes instead",
                             job_id, rank, step, local.status().ToString());
  }
  absl::MutexLock lock(&restore_mu_);
  auto it = restored_.find({job_id, rank, step});
  if (it != restored_.end()) return it->second.second;
  auto made = MakeLocal(job_id, rank, step, /*skip_local_shard=*/damaged);
  if (!made.ok()) Metrics().restore_failures->Increment();
  if (made.ok()) AdoptRestorePoint(job_id, step);
  return made;
}

void ClusterCoordination::AdoptRestorePoint(const std::string& job_id, int64_t step) {
  if (step <= store_->committed(job_id)) return;
  store_->Commit(job_id, step);
  coordinator_.Adopt(job_id, step);
  Logger("coordinator")->info("job '{}' restores step {}: adopted here as its restore point",
                              job_id, step);
}

absl::StatusOr<SnapshotStore::RestoreInfo> ClusterCoordination::MakeLocal(
    const std::string& job_id, uint32_t rank, int64_t step, bool skip_local_shard) {
  auto log = Logger("recovery");
  JobHoldings holdings = GatherHoldings(job_id);
  if (skip_local_shard) {
    const std::string self = cluster_->self_id();
    auto& shards = holdings.shards;
    shards.erase(std::remove_if(shards.begin(), shards.end(),
                                [&](const HeldShard& s) {
                                  return s.node == self && s.rank == rank && s.step == step;
                                }),
                 shards.end());
  }
  std::set<std::pair<uint32_t, std::string>> exclude;
  static std::atomic<uint64_t> sequence{0};
  for (int attempt = 0;; ++attempt) {
    auto plan = PlanRestore(holdings, cluster_->self_id(), rank, step, exclude);
    if (!plan.ok()) {
      return absl::Status(plan.status().code(),
                          absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                       " cannot be restored or rebuilt from the live nodes: ",
                                       plan.status().message()));
    }
    if (plan->source == RestorePlan::Source::kLocal) {
      return store_->PrepareRestore(job_id, rank, step);
    }
    const std::string path =
        absl::StrCat(fragments_->directory(), "/", job_id, ".r", rank, ".s", step, ".",
                     sequence.fetch_add(1), ".restored");
    SegmentCreateOptions create;
    create.prefault = false;
    // Readable by the daemon's group, like the agent socket (slots belong to the trainer's uid,
    // which this call does not know).
    create.mode = 0640;
    // The segment counts against the daemon's capacity, like the fragments it holds, from
    // before it is created until it is deleted.
    CapacityBudget* const budget = fragments_->budget();
    // A rebuild reads its data fragments straight into the segment, padding included.
    const uint64_t capacity = std::max<uint64_t>(
        plan->source == RestorePlan::Source::kRebuild
            ? plan->k * ErasureCodec::FragmentBytes(plan->shard_bytes, plan->k)
            : plan->shard_bytes,
        1);
    TESSERA_RETURN_IF_ERROR(budget->Reserve(
        kSegmentHeaderBytes + capacity,
        absl::StrCat("making job '", job_id, "' rank ", rank, " step ", step, " local")));
    auto created = Segment::Create(path, SegmentKind::kSlot, capacity, create);
    if (!created.ok()) {
      budget->Release(kSegmentHeaderBytes + capacity);
      return created.status();
    }
    std::unique_ptr<Segment> segment = std::move(*created);
    // Deletes the segment and gives its bytes back, unless it was kept for the restore.
    struct Discard {
      std::unique_ptr<Segment>* segment;
      CapacityBudget* budget;
      ~Discard() {
        if (*segment == nullptr) return;
        (*segment)->Unlink().IgnoreError();
        budget->Release((*segment)->file_bytes());
      }
    } discard{&segment, budget};
    const absl::Time start = absl::Now();
    absl::Status status;
    uint64_t payload_bytes = plan->shard_bytes;
    uint32_t payload_crc = plan->shard_crc32c;
    std::optional<uint32_t> rebuilt_crc;  // computed by DecodeShard
    std::string phases;                   // where a rebuild's time went, for the log
    if (plan->source == RestorePlan::Source::kCopy) {
      auto address = cluster_->AddressOf(plan->node);
      SegmentSink sink(segment.get());
      if (!address) {
        status = absl::UnavailableError(absl::StrCat("member ", plan->node, " is not live"));
      } else {
        auto fetched = client_->FetchShard(*address, job_id, rank, step, &sink);
        status = fetched.status();
        if (fetched.ok()) {
          payload_bytes = fetched->payload_bytes;
          payload_crc = fetched->payload_crc32c;
        }
      }
      if (!status.ok()) {
        return absl::Status(status.code(), absl::StrCat("copying job '", job_id, "' rank ", rank,
                                                        " step ", step, " from ", plan->node,
                                                        ": ", status.message()));
      }
    } else {
      // The k fragments are read in parallel, each from its node (or this daemon's store),
      // the data fragments straight into the segment (its capacity includes their padding).
      FragmentReader read = [&](uint32_t index, const std::string& node, uint8_t* dst,
                                size_t bytes) -> absl::StatusOr<uint32_t> {
        const FragmentKey key{job_id, rank, step, index};
        if (node != cluster_->self_id()) {
          auto address = cluster_->AddressOf(node);
          if (!address) return absl::UnavailableError("not live");
          TESSERA_ASSIGN_OR_RETURN(FragmentStatus got,
                                   client_->GetFragment(*address, key, 0, dst, bytes));
          if (got.bytes_received != bytes) {
            return absl::DataLossError(absl::StrCat("the fragment has ", got.bytes_received,
                                                    " bytes, not ", bytes));
          }
          return got.fragment_crc32c;  // GetFragment checked the bytes against it
        }
        TESSERA_ASSIGN_OR_RETURN(FragmentView view, fragments_->Get(key));
        if (view.size() != bytes) {
          return absl::DataLossError(
              absl::StrCat("held fragment has ", view.size(), " bytes, not ", bytes));
        }
        std::memcpy(dst, view.data(), bytes);
        if (Crc32c(dst, bytes) != view.fragment_crc32c()) {
          return absl::DataLossError("held fragment does not match its CRC32C");
        }
        return view.fragment_crc32c();
      };
      DecodeOptions decode;
      decode.shard_capacity = capacity;
      TESSERA_ASSIGN_OR_RETURN(ShardDecode decoded,
                               DecodeShard(*plan, read, segment->payload(), decode));
      for (const ShardDecode::FailedRead& failed : decoded.failed) {
        if (absl::IsDataLoss(failed.status)) Metrics().fragment_crc_failures->Increment();
        log->warn("{} from {}: {}; counted as an erasure",
                  FragmentKey{job_id, rank, step, failed.index}.ToString(), failed.node,
                  failed.status.ToString());
        exclude.insert({failed.index, failed.node});
      }
      if (!decoded.failed.empty()) continue;
      rebuilt_crc = decoded.crc32c;
      phases = absl::StrCat(" (reading ", absl::ToInt64Milliseconds(decoded.read_time),
                            " ms, decoding ", absl::ToInt64Milliseconds(decoded.decode_time),
                            " ms, checking ", absl::ToInt64Milliseconds(decoded.crc_time), " ms)");
    }
    const uint32_t crc = rebuilt_crc ? *rebuilt_crc
                                      : ParallelCrc32c(segment->payload(), payload_bytes,
                                                       static_cast<int>(std::clamp(
                                                           std::thread::hardware_concurrency(),
                                                           1u, 8u)));
    if (crc != payload_crc) {
      if (attempt < 3 && plan->source == RestorePlan::Source::kRebuild) {
        log->warn("job '{}' rank {} step {}: the rebuilt shard fails its CRC32C; retrying",
                  job_id, rank, step);
        continue;
      }
      return absl::DataLossError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                              ": the shard made local does not match its CRC32C"));
    }
    TESSERA_ASSIGN_OR_RETURN(auto manifest, LocateManifest(segment->payload(), payload_bytes,
                                                           job_id, rank, step));
    SegmentHeader* h = segment->header();
    h->step = step;
    h->rank = rank;
    h->payload_bytes = payload_bytes;
    h->payload_crc32c = payload_crc;
    h->manifest_offset = manifest.first;
    h->manifest_bytes = manifest.second;
    std::snprintf(h->job_id, sizeof(h->job_id), "%s", job_id.c_str());
    h->header_crc32c = ComputeHeaderCrc(*h);
    StoreState(h, SegmentState::kSealed);

    SnapshotStore::RestoreInfo info;
    info.step = step;
    info.segment_path = segment->path();
    info.payload_bytes = payload_bytes;
    info.manifest_offset = manifest.first;
    info.manifest_bytes = manifest.second;
    info.payload_crc32c = payload_crc;
    const bool copied = plan->source == RestorePlan::Source::kCopy;
    log->info("job '{}' rank {} step {}: {} ({} bytes) in {} ms{}", job_id, rank, step,
              copied ? absl::StrCat("copied from ", plan->node)
                     : absl::StrCat("rebuilt from ", plan->k, " of ", plan->k + plan->m,
                                    " fragments"),
              payload_bytes, absl::ToInt64Milliseconds(absl::Now() - start), phases);
    Metrics().restore_seconds->Observe(absl::ToDoubleSeconds(absl::Now() - start));
    {
      absl::MutexLock lock(&mu_);
      ++(copied ? stats_.copied_shards : stats_.rebuilt_shards);
    }
    restored_[{job_id, rank, step}] = {std::move(segment), info};
    return info;
  }
}

}  // namespace tessera
