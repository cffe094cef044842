// Opening a SnapshotStore: its directory, and the sealed slots a previous daemon left there,
// re-adopted after their checks (snapshot_store.h, Open).
#include "daemon/store/snapshot_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/snapshot_store_internal.h"

namespace tessera {
namespace {

using snapshot_store_internal::kSlotSuffix;
using snapshot_store_internal::RankName;

bool DefaultProcessAlive(pid_t pid, uint64_t start_ticks) {
  if (pid <= 0) return false;
  uint64_t now = ProcessStartTicks(pid);
  return now != 0 && (start_ticks == 0 || now == start_ticks);
}

}  // namespace

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

namespace {

// Whether `name` is the file name the store gives a slot of the header's job and rank:
// "<job>.r<rank>.<generation>.slot".
bool NamedFor(const std::string& name, const SegmentHeader& h) {
  const size_t job_bytes = strnlen(h.job_id, sizeof(h.job_id));
  const std::string prefix =
      absl::StrCat(absl::string_view(h.job_id, job_bytes), ".r", h.rank, ".");
  if (job_bytes == sizeof(h.job_id) || !absl::StartsWith(name, prefix) ||
      !absl::EndsWith(name, kSlotSuffix)) {
    return false;
  }
  const absl::string_view generation = absl::string_view(name).substr(
      prefix.size(), name.size() - prefix.size() - strlen(kSlotSuffix));
  return !generation.empty() &&
         std::all_of(generation.begin(), generation.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

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
      } else if (!NamedFor(name, h)) {
        // The daemon named the file for the job and rank it created it for, in a directory only
        // it writes; the header is the trainer's to write. One that claims another job or rank
        // would be adopted as that job's newest step and push its real steps out.
        verdict = absl::DataLossError(absl::StrCat(
            "its header claims job '", absl::CEscape(h.job_id), "' rank ", h.rank,
            ", but the file was created for another"));
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
      // The uid the daemon gave the slot to (its ACL, or its owner), never what a header says.
      state->data_uid = SegmentGrantee(segments[0]->path()).value_or(0);
      state->adopted = true;
      state->world_size = segments[0]->header()->world_size;
      state_world = state->world_size;
      state_newest = segments[0]->header()->step;  // sorted newest first
      // The rank's last seal before the restart: a step it was writing then is lost, and its
      // next seal in that epoch names this one as its previous, so the lost step becomes dead
      // (ranks waiting for it are released) instead of unknown.
      state->last_seal_step = state_newest;
      state->last_seal_epoch = segments[0]->header()->epoch;
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

}  // namespace tessera
