// FragmentStore's receive path (fragment_store.h): a fragment begun, its chunks as they arrive
// (checked, then copied in or received in place), and its seal.
#include "daemon/store/fragment_store.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/store/fragment_store_internal.h"

namespace tessera {
namespace fragment_store_internal {

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

}  // namespace fragment_store_internal

namespace {

using fragment_store_internal::kSegmentGranuleBytes;

uint64_t RoundUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
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

}  // namespace

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
      if (!FragmentMayReplace(held, meta)) {
        if (held.epoch != meta.epoch) {
          return absl::FailedPreconditionError(absl::StrCat(
              key.ToString(), " is held of the job's epoch ", held.epoch, "; epoch ", meta.epoch,
              " is older (a step of an abandoned history; the job went on from another)"));
        }
        return absl::FailedPreconditionError(
            absl::StrCat(key.ToString(), " is held for owner incarnation ", held.owner_incarnation,
                         "; incarnation ", meta.owner_incarnation, " is older (a stale sender)"));
      }
      // A newer epoch (the job resumed and sealed this step again, perhaps on another node), or
      // the same incarnation with other metadata (the owner encoded this step again: fewer
      // members were live and k changed). The owner only sends what it holds now, so the new
      // fragment replaces the held one, sealed or not.
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
    h->epoch = meta.epoch;
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
      log->info(
          "{}: replacing the fragment of epoch {} owner incarnation {} (shard {} bytes, "
          "CRC32C 0x{:08x}, RS({}, {})) with epoch {} incarnation {} (shard {} bytes, "
          "CRC32C 0x{:08x}, RS({}, {}))",
          key.ToString(), existing->meta.epoch, existing->meta.owner_incarnation,
          existing->meta.shard_bytes, existing->meta.shard_crc32c, existing->meta.ec_k,
          existing->meta.ec_m, meta.epoch, meta.owner_incarnation, meta.shard_bytes,
          meta.shard_crc32c, meta.ec_k, meta.ec_m);
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
  return ReceiveChunkChecked(key, owner_incarnation, offset, size, chunk_crc32c,
                             [&](uint8_t* dst) -> absl::StatusOr<uint32_t> {
                               TESSERA_RETURN_IF_ERROR(fill(dst));
                               return Crc32c(dst, size);
                             });
}

absl::StatusOr<FragmentStatus> FragmentStore::ReceiveChunkChecked(
    const FragmentKey& key, uint64_t owner_incarnation, uint64_t offset, size_t size,
    uint32_t chunk_crc32c, absl::FunctionRef<absl::StatusOr<uint32_t>(uint8_t* dst)> fill) {
  TESSERA_ASSIGN_OR_RETURN(ChunkReceipt receipt,
                           BeginReceive(key, owner_incarnation, offset, size, chunk_crc32c));
  if (receipt.done()) return *receipt.done();
  absl::StatusOr<uint32_t> received = fill(receipt.dst());
  return FinishReceive(std::move(receipt), std::move(received));
}

absl::StatusOr<FragmentStore::ChunkReceipt> FragmentStore::BeginReceive(const FragmentKey& key,
                                                                        uint64_t owner_incarnation,
                                                                        uint64_t offset,
                                                                        size_t size,
                                                                        uint32_t chunk_crc32c) {
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, FindForWrite(key, owner_incarnation));
  TESSERA_RETURN_IF_ERROR(CheckChunkRange(key, entry->meta.fragment_bytes, offset, size));
  ChunkReceipt receipt;
  absl::MutexLock entry_lock(&entry->mu);
  if (entry->retired) {
    return absl::NotFoundError(key.ToString() + " was dropped or replaced while being written");
  }
  if (entry->sealed) {  // a retry after a lost reply
    receipt.done_ = entry->Status();
    return receipt;
  }
  // A reference of our own: should the fragment be dropped or replaced while the bytes arrive,
  // its segment is deleted once we let go, never recycled under our writes.
  receipt.segment_ = entry->segment;
  receipt.dst_ = receipt.segment_->payload() + offset;
  receipt.offset_ = offset;
  receipt.size_ = size;
  receipt.chunk_crc32c_ = chunk_crc32c;
  ++entry->receiving;
  receipt.entry_ = std::move(entry);
  return receipt;
}

absl::StatusOr<FragmentStatus> FragmentStore::FinishReceive(ChunkReceipt receipt,
                                                            absl::StatusOr<uint32_t> received) {
  if (receipt.done()) return *receipt.done();
  if (!receipt.entry_) {
    return absl::FailedPreconditionError("FinishReceive of a receipt already finished");
  }
  // Ours until the end: the receipt may hold the last reference to a fragment dropped meanwhile,
  // and the entry's lock must not outlive it.
  const std::shared_ptr<Entry> held = std::move(receipt.entry_);
  Entry& entry = *held;
  const uint64_t offset = receipt.offset_;
  const size_t size = receipt.size_;
  absl::Status filled = received.status();
  uint32_t crc = 0;
  if (filled.ok()) {
    crc = *received;
    if (crc != receipt.chunk_crc32c_) {
      filled = absl::DataLossError(
          absl::StrCat(entry.key.ToString(), ": chunk [", offset, ", ", offset + size,
                       ") arrived with CRC32C 0x", absl::Hex(crc), " but was sent with 0x",
                       absl::Hex(receipt.chunk_crc32c_), "; that range must be sent again"));
      absl::MutexLock lock(&mu_);
      ++counters_.crc_failures;
    }
  }
  absl::MutexLock entry_lock(&entry.mu);
  --entry.receiving;
  if (entry.retired) {
    return absl::NotFoundError(entry.key.ToString() +
                               " was dropped or replaced while being written");
  }
  if (!filled.ok()) {
    entry.ForgetRange(offset, size);  // overwritten: whatever it held counts as not received
    return filled;
  }
  entry.RecordChunk(offset, size, crc);
  AddCoverage(&entry.covered, &entry.covered_bytes, offset, offset + size);
  return entry.Status();
}

FragmentStore::ChunkReceipt& FragmentStore::ChunkReceipt::operator=(ChunkReceipt&& other) noexcept {
  if (this != &other) {
    Abandon();
    entry_ = std::move(other.entry_);
    segment_ = std::move(other.segment_);
    dst_ = other.dst_;
    offset_ = other.offset_;
    size_ = other.size_;
    chunk_crc32c_ = other.chunk_crc32c_;
    done_ = std::move(other.done_);
    other.entry_ = nullptr;
    other.dst_ = nullptr;
    other.done_.reset();
  }
  return *this;
}

FragmentStore::ChunkReceipt::~ChunkReceipt() { Abandon(); }

void FragmentStore::ChunkReceipt::Abandon() {
  if (!entry_) return;
  // Released once unlocked (it may be the last reference to a fragment dropped meanwhile).
  const std::shared_ptr<Entry> entry = std::move(entry_);
  // The range was (or may have been) overwritten: whatever it held counts as not received.
  absl::MutexLock entry_lock(&entry->mu);
  --entry->receiving;
  if (!entry->retired) entry->ForgetRange(offset_, size_);
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

}  // namespace tessera
